"""Procedural multi-shot stories: the embedded default's training data and its benchmark.

A story is 2-6 shots of characters (shape + colour + pattern: a distinct identity) moving through
environments (distinct textured backgrounds), filmed by a camera that changes between shots (zoom,
pan). Captions come from templates and are referential: a returning character is "the same
square", so only memory can tell its colour and pattern. Three patterns from the paper:

  main_subject    one character through changing scenes
  insert_recall   a new character (in a new scene) is inserted, then the story returns to the first
  composition     two characters met apart later appear together

Rendering is pure NumPy: frames uint8 [T, H, W, 3] and identity masks uint8 [T, H, W]
(0 = background, 1 + index into `SyntheticStory.characters`). `save_synthetic` writes them with the ground truth
(`story.json`) that `onestory_jax.eval` reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("square", "circle", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 230), "yellow": (240, 210, 30),
           "magenta": (210, 40, 200), "cyan": (40, 210, 220), "orange": (245, 130, 20)}
PATTERNS = ("plain", "striped", "dotted", "checked")
# name -> (caption phrase, base colour, texture colour, texture kind)
SCENES = {  # low-contrast, low-frequency textures: the scenes differ mostly in colour
    "snow": ("a snowy field", (235, 240, 245), (205, 215, 230), "dots"),
    "desert": ("a desert", (215, 180, 120), (190, 150, 95), "dunes"),
    "forest": ("a green forest", (60, 130, 60), (40, 95, 40), "trunks"),
    "night": ("a night city", (25, 30, 70), (70, 70, 110), "windows"),
    "ocean": ("the ocean shore", (60, 140, 200), (110, 170, 215), "waves"),
}
MOTIONS = {"hops": "hops across", "slides": "slides through", "rests": "rests in", "drifts": "drifts over"}
PATTERN_WORDS = {"plain": "", "striped": "striped ", "dotted": "dotted ", "checked": "checked "}
KINDS = ("main_subject", "insert_recall", "composition")


@dataclasses.dataclass(frozen=True)
class Character:
    shape: str
    colour: str
    pattern: str

    def name(self) -> str:
        return f"{self.colour} {PATTERN_WORDS[self.pattern]}{self.shape}"


@dataclasses.dataclass(frozen=True)
class Shot:
    caption: str
    characters: tuple[int, ...]  # indices into SyntheticStory.characters
    scene: str
    motion: str
    zoom: float  # camera zoom (> 1: closer)
    pan: tuple[float, float]  # camera centre offset, world units (image widths)
    starts: tuple[tuple[float, float], ...]  # per character: world start position (x, y) in [0, 1]


@dataclasses.dataclass(frozen=True)
class SyntheticStory:
    kind: str
    characters: tuple[Character, ...]
    shots: tuple[Shot, ...]


def _distinct_characters(rng: np.random.Generator, n: int) -> tuple[Character, ...]:
    """n characters differing in shape and colour (pattern random)."""
    shapes = rng.choice(len(SHAPES), n, replace=False)
    colours = rng.choice(len(COLOURS), n, replace=False)
    return tuple(Character(SHAPES[s], list(COLOURS)[c], PATTERNS[int(rng.integers(len(PATTERNS)))])
                 for s, c in zip(shapes, colours))


def _plan(rng: np.random.Generator, kind: str, n_shots: int) -> list[tuple[tuple[int, ...], str]]:
    """(characters present, scene) per shot for a story pattern."""
    scenes = list(rng.permutation(list(SCENES)))
    if kind == "main_subject":
        return [((0,), scenes[i % len(scenes)] if rng.random() < 0.7 or i == 0 else scenes[(i - 1) % len(scenes)])
                for i in range(n_shots)]
    if kind == "insert_recall":
        insert_at = int(rng.integers(1, n_shots - 1))
        length = 1 if rng.random() < 0.7 or insert_at + 2 >= n_shots else 2
        plan = []
        for i in range(n_shots):
            if insert_at <= i < insert_at + length:
                plan.append(((1,), scenes[1]))
            else:
                plan.append(((0,), scenes[0] if i < insert_at or rng.random() < 0.6 else scenes[2]))
        return plan
    if kind == "composition":
        plan = [((0,), scenes[0]), ((1,), scenes[1])]
        for i in range(2, n_shots):
            plan.append(((0, 1), scenes[int(rng.integers(0, 3))]) if rng.random() < 0.7 else ((int(rng.integers(0, 2)),), scenes[2]))
        return plan[:n_shots]
    raise ValueError(f"unknown story kind {kind!r}; expected one of {KINDS}")


def _caption(chars: tuple[Character, ...], present: tuple[int, ...], seen: set[int], scene: str, motion: str,
             zoom: float, returning: bool, withhold: bool) -> str:
    """Template caption; returning characters are referred to, not described (when `withhold`)."""
    names = []
    for c in present:
        ch = chars[c]
        if c not in seen:
            names.append(f"{'an' if ch.name()[0] in 'aeiou' else 'a'} {ch.name()}")
        elif withhold:
            names.append(f"the same {ch.shape}")
        else:
            names.append(f"the {ch.name()}")
    subject = " and ".join(names)
    subject = subject[0].upper() + subject[1:]
    place = SCENES[scene][0]
    if returning:
        verb = "returns to" if len(present) == 1 else "return to"
    elif len(present) > 1:
        verb = "meet in"
    else:
        verb = MOTIONS[motion]
    framing = "Close-up: " if zoom > 1.1 else ("Wide shot: " if zoom < 0.9 else "")
    return f"{framing}{subject} {verb} {place}."


def make_story(seed: int, n_shots: int | None = None, kind: str | None = None, withhold_prob: float = 0.8) -> SyntheticStory:
    """A random story (deterministic in `seed`): 2-6 shots of one of KINDS unless given."""
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    n_shots = n_shots or int(rng.integers(3, 7))
    if n_shots < 2 or (kind != "main_subject" and n_shots < 3):
        raise ValueError(f"a {kind} story needs >= {2 if kind == 'main_subject' else 3} shots, got {n_shots}")
    chars = _distinct_characters(rng, 2)
    seen: set[int] = set()
    scenes_seen: set[str] = set()
    shots = []
    for present, scene in _plan(rng, kind, n_shots):
        motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
        zoom = float(rng.choice([0.8, 1.0, 1.0, 1.3]))
        pan = tuple(float(v) for v in rng.uniform(-0.15, 0.15, 2))
        starts = tuple((float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.35, 0.65))) for _ in present)
        if len(present) == 2:  # keep two characters apart
            starts = ((0.3, starts[0][1]), (0.7, starts[1][1]))
        returning = scene in scenes_seen and all(c in seen for c in present) and len(present) == 1
        caption = _caption(chars, present, seen, scene, motion, zoom, returning, rng.random() < withhold_prob)
        shots.append(Shot(caption, present, scene, motion, zoom, pan, starts))
        seen.update(present)
        scenes_seen.add(scene)
    return SyntheticStory(kind, chars, tuple(shots))


def _background(scene: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Scene texture at world coordinates x, y [H, W] -> [H, W, 3] float in [0, 255]."""
    _, base, tex, kind = SCENES[scene]
    if kind == "dots":
        on = (np.sin(x * 20) * np.sin(y * 20)) > 0.6
    elif kind == "dunes":
        on = np.sin(y * 10 + 2 * np.sin(x * 4)) > 0.3
    elif kind == "trunks":
        on = np.sin(x * 12) > 0.5
    elif kind == "windows":
        on = (np.sin(x * 16) > 0.3) & (np.sin(y * 16) > 0.3)
    else:  # waves
        on = np.sin(y * 12 + 2 * np.sin(x * 6)) > 0.4
    out = np.where(on[..., None], np.asarray(tex, np.float32), np.asarray(base, np.float32))
    shade = 1.0 - 0.25 * np.clip(y, 0, 1)[..., None]  # a gentle vertical gradient
    return out * shade


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape membership at local coordinates u, v in [-1, 1]."""
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "circle":
        return u**2 + v**2 <= 0.9
    if shape == "triangle":
        return (v <= 0.85) & (v >= -0.85) & (np.abs(u) <= (v + 0.85) / 1.7 * 0.95)
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern darkens the character."""
    if pattern == "striped":
        return np.sin(u * 6) > 0.3
    if pattern == "dotted":
        return (np.sin(u * 6) * np.sin(v * 6)) > 0.4
    if pattern == "checked":
        return (np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0
    return np.zeros_like(u, bool)


def _position(motion: str, start: tuple[float, float], t: float) -> tuple[float, float]:
    """World position at time t in [0, 1]."""
    x, y = start
    if motion == "hops":
        return x - 0.2 + 0.4 * t, y - 0.15 * abs(np.sin(t * 3 * np.pi))
    if motion == "slides":
        return x + 0.3 * (t - 0.5), y
    if motion == "drifts":
        return x + 0.2 * (t - 0.5), y + 0.15 * (t - 0.5)
    return x + 0.02 * np.sin(t * 2 * np.pi), y  # rests


def render_shot(story: SyntheticStory, index: int, frames: int = 17, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and identity masks uint8 [T, H, W] of one shot."""
    shot = story.shots[index]
    pix = (np.arange(size, dtype=np.float32) + 0.5) / size
    px, py = np.meshgrid(pix, pix)  # [H, W], x to the right, y down
    video = np.zeros((frames, size, size, 3), np.uint8)
    masks = np.zeros((frames, size, size), np.uint8)
    for f in range(frames):
        t = f / max(frames - 1, 1)
        wx = (px - 0.5) / shot.zoom + 0.5 + shot.pan[0] + 0.05 * t  # a slow camera pan within the shot
        wy = (py - 0.5) / shot.zoom + 0.5 + shot.pan[1]
        img = _background(shot.scene, wx, wy)
        for slot, c in enumerate(shot.characters):
            ch = story.characters[c]
            cx, cy = _position(shot.motion, shot.starts[slot], t)
            radius = 0.16
            u, v = (wx - cx) / radius, (wy - cy) / radius
            inside = _inside(ch.shape, u, v)
            colour = np.asarray(COLOURS[ch.colour], np.float32)
            fill = np.where(_pattern(ch.pattern, u, v)[..., None], colour * 0.35, colour)
            img = np.where(inside[..., None], fill, img)
            masks[f][inside] = c + 1
        video[f] = np.clip(img, 0, 255).astype(np.uint8)
    return video, masks


def render_synthetic(story: SyntheticStory, frames: int = 17, size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frames, masks) of every shot."""
    return [render_shot(story, i, frames, size) for i in range(len(story.shots))]


def synthetic_to_dict(story: SyntheticStory) -> dict[str, Any]:
    return dataclasses.asdict(story)


def synthetic_from_dict(data: dict[str, Any]) -> SyntheticStory:
    chars = tuple(Character(**c) for c in data["characters"])
    shots = tuple(Shot(s["caption"], tuple(s["characters"]), s["scene"], s["motion"], float(s["zoom"]),
                       tuple(s["pan"]), tuple(tuple(p) for p in s["starts"])) for s in data["shots"])
    return SyntheticStory(data["kind"], chars, shots)


def save_synthetic(folder: str | Path, story: SyntheticStory, rendered: list[tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Write `story.json` (ground truth) and, when given, `shot_NN.npz` (frames, masks) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "story.json").write_text(json.dumps(synthetic_to_dict(story), indent=1))
    for i, (video, masks) in enumerate(rendered or []):
        np.savez_compressed(folder / f"shot_{i:02d}.npz", frames=video, masks=masks)
    return folder


def load_synthetic(folder: str | Path) -> SyntheticStory:
    """The ground-truth story of a folder written by `save_synthetic`."""
    return synthetic_from_dict(json.loads((Path(folder) / "story.json").read_text()))


def story_file(story: SyntheticStory, frames: int = 17, size: int = 64, **settings: Any) -> dict[str, Any]:
    """A sample.py story dict (captions only) for a synthetic story."""
    return {"settings": {"width": size, "height": size, "frames": frames, **settings},
            "shots": [{"caption": s.caption} for s in story.shots]}
