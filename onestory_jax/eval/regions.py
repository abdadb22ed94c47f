"""Character / background regions of synthetic-story frames, and colour attribute votes.

Generated frames do not line up with the ground-truth masks, so regions come from colour alone.
Every palette colour c is matched as a *ray segment* {s * c : lo <= s <= hi}, which absorbs the
renderer's brightness changes: the background's vertical shading (x0.75..1) and the characters'
dark pattern (x0.35). A pixel is background when it lies within BACKGROUND_DISTANCE (RGB units)
of a ray of the shot's scene: its base colour, its texture colour, or a blend of the two (BLENDS;
blur and compression mix fine texture into the base). Every other pixel is character. A 3x3 majority filter
removes isolated character pixels. With two characters in a shot, each 8-connected component of
character pixels (per frame) goes to the present character whose colour ray is nearest to most of
its pixels.

Masks use the ground-truth convention: 0 = background, 1 + index into `Story.characters`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from onestory_jax.data import synthetic

SCENE_SHADE = (0.65, 1.05)  # the renderer shades backgrounds by 0.75..1; a margin either side
CHARACTER_SHADE = (0.3, 1.1)  # characters: full colour or x0.35 where patterned
BACKGROUND_DISTANCE = 45.0  # RGB distance to a scene ray beyond which a pixel is character
MIN_SHARE = 0.5  # a dominant colour / scene must hold this share of all pixels, abstentions included
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # base-to-texture mixes
COLOUR_NAMES = tuple(synthetic.COLOURS)
SCENE_NAMES = tuple(synthetic.SCENES)


def scene_palette(scene: str) -> np.ndarray:
    """The scene's base and texture colours and their blends, float [len(BLENDS), 3], base first."""
    _, base, texture, _ = synthetic.SCENES[scene]
    a = np.asarray(BLENDS, np.float32)[:, None]
    return (1 - a) * np.asarray(base, np.float32) + a * np.asarray(texture, np.float32)


def colour_palette(names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Character colours by name, float [K, 3]."""
    return np.asarray([synthetic.COLOURS[n] for n in names], np.float32)


def ray_distance(pixels: np.ndarray, colours: np.ndarray, shade: tuple[float, float]) -> np.ndarray:
    """RGB distance of pixels [..., 3] to each segment {s * c : s in shade}, c in colours [K, 3] -> [..., K]."""
    p = np.asarray(pixels, np.float32)
    c = np.asarray(colours, np.float32)
    dot = p @ c.T
    cc = np.sum(c * c, -1)
    s = np.clip(dot / np.maximum(cc, 1e-6), *shade)
    d2 = np.sum(p * p, -1, keepdims=True) - 2 * s * dot + s * s * cc
    return np.sqrt(np.maximum(d2, 0.0))


def majority_filter(mask: np.ndarray) -> np.ndarray:
    """Keep a pixel of a bool mask [..., H, W] when at least 5 of its 3x3 neighbourhood are set."""
    pad = [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)]
    m = np.pad(mask.astype(np.uint8), pad)
    h, w = mask.shape[-2:]
    count = sum(m[..., dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return count >= 5


def segment_shot(frames: np.ndarray, story: synthetic.SyntheticStory, index: int) -> np.ndarray:
    """Identity masks uint8 [T, H, W] of generated frames uint8 [T, H, W, 3] of shot `index`."""
    shot = story.shots[index]
    scene = scene_palette(shot.scene)
    present = np.asarray(shot.characters)
    colours = colour_palette([story.characters[c].colour for c in present])
    masks = np.zeros(frames.shape[:-1], np.uint8)
    for t, frame in enumerate(frames):  # frame by frame: bounded memory at full resolution
        character = majority_filter(ray_distance(frame, scene, SCENE_SHADE).min(-1) > BACKGROUND_DISTANCE)
        if len(present) == 1:
            who = np.full(character.shape, present[0])
        else:
            who = present[_component_vote(character, ray_distance(frame, colours, CHARACTER_SHADE).argmin(-1))]
        masks[t] = np.where(character, who + 1, 0)
    return masks


def _component_vote(mask: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Per-pixel choices [H, W] replaced by the majority of their 8-connected component of `mask`.

    Dark (patterned) pixels lie near every colour ray; their component's bright pixels decide.
    """
    labels, n = ndimage.label(mask, np.ones((3, 3), bool))
    k = int(nearest.max()) + 1
    votes = np.bincount((labels * k + nearest).ravel(), minlength=(n + 1) * k).reshape(n + 1, k)
    return votes.argmax(-1)[labels]


def _thin(pixels: np.ndarray, limit: int = 200_000) -> np.ndarray:
    """An evenly strided subset of at most about `limit` pixels [N, 3] (votes need no more)."""
    return pixels[:: max(1, len(pixels) // limit)]


def _vote(labels: np.ndarray, names: tuple[str, ...]) -> str | None:
    """The most frequent label (index into names; -1 = abstain) when it holds at least MIN_SHARE of
    all pixels, abstentions included; else None (no colour dominates)."""
    if labels.size == 0:
        return None
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    best = int(counts.argmax())
    return names[best] if counts[best] >= MIN_SHARE * labels.size else None


def dominant_colour(pixels: np.ndarray) -> str | None:
    """Name of the synthetic.COLOURS ray nearest to most of the pixels [N, 3]; pixels farther than
    BACKGROUND_DISTANCE from every colour ray abstain. None if no colour holds MIN_SHARE."""
    d = ray_distance(_thin(pixels), colour_palette(COLOUR_NAMES), CHARACTER_SHADE)
    return _vote(np.where(d.min(-1) <= BACKGROUND_DISTANCE, d.argmin(-1), -1), COLOUR_NAMES)


def dominant_scene(pixels: np.ndarray) -> str | None:
    """Scene whose base/texture rays are nearest to most pixels [N, 3] of whole frames (scene-agnostic).

    Candidates are all scenes' base/texture rays and all character colour rays; pixels nearest a
    character colour, or farther than BACKGROUND_DISTANCE from every scene ray, abstain, so the
    vote depends on no segmentation. None unless one scene holds MIN_SHARE of all pixels.
    """
    pixels = _thin(pixels)
    scenes = np.concatenate([scene_palette(s) for s in SCENE_NAMES])  # [len(BLENDS) * S, 3]
    d_scene = ray_distance(pixels, scenes, SCENE_SHADE)
    d_char = ray_distance(pixels, colour_palette(COLOUR_NAMES), CHARACTER_SHADE).min(-1)
    ok = (d_scene.min(-1) <= d_char) & (d_scene.min(-1) <= BACKGROUND_DISTANCE)
    return _vote(np.where(ok, d_scene.argmin(-1) // len(BLENDS), -1), SCENE_NAMES)
