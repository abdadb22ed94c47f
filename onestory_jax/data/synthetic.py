"""Procedural multi-shot stories: the embedded default's training data and its benchmark.

The world (`../shared/research/toyworld-spec.md` §2.1, docs/demo.md) is built so that a character's
identity is learnable at 64x64 and only memory can tell a returning character's colour:

- 4 characters a story (4 shapes, 4 of 6 hues 60 degrees apart), plain, radius 0.28 (about 18% of
  the frame, 9-12 of the 64 latent cells), one per shot;
- 5 low-saturation scenes (S <= 0.15) that differ in luminance and tint, so the character is the
  only saturated region and blending with the background keeps its hue;
- slow motion (half the old amplitude) and a slight camera pan, a fixed zoom;
- a first appearance is named ("A red square hops across a snowy field."), every return is
  referential ("The same square returns to a desert."): its colour is only in memory;
- characters are introduced at random shots and return with no immediate repeat, so the recalled
  character is not always shot 1's and a uniform pick of earlier frames misses it about half the time.

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

from onestory_jax.errors import UserError

SHAPES = ("square", "circle", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (230, 210, 40),
    "green": (50, 190, 60),
    "cyan": (40, 200, 210),
    "blue": (50, 70, 230),
    "magenta": (210, 50, 210),
}
# name -> (caption phrase, base colour, texture colour, texture kind): grey-ish, low-contrast textures
SCENES = {
    "snow": ("a snowy field", (200, 200, 206), (185, 186, 194), "dots"),
    "desert": ("a desert", (166, 157, 143), (151, 143, 130), "dunes"),
    "forest": ("a forest", (95, 110, 95), (82, 96, 82), "trunks"),
    "night": ("a night city", (70, 70, 82), (86, 86, 99), "windows"),
    "ocean": ("the ocean shore", (124, 135, 145), (138, 148, 158), "waves"),
}
MOTIONS = {"hops": "hops across", "slides": "slides through", "rests": "rests in", "drifts": "drifts over"}
RADIUS = 0.28  # character half-size, in image widths
CHARACTERS_PER_STORY = 4


@dataclasses.dataclass(frozen=True)
class Character:
    shape: str
    colour: str

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Shot:
    caption: str
    characters: tuple[int, ...]  # indices into SyntheticStory.characters (one a shot in this world)
    scene: str
    motion: str
    pan: tuple[float, float]  # camera centre offset, world units (image widths)
    starts: tuple[tuple[float, float], ...]  # per character: world start position (x, y) in [0, 1]


@dataclasses.dataclass(frozen=True)
class SyntheticStory:
    characters: tuple[Character, ...]
    shots: tuple[Shot, ...]


def _distinct_characters(rng: np.random.Generator, n: int) -> tuple[Character, ...]:
    """n characters differing in shape and colour."""
    shapes = rng.choice(len(SHAPES), n, replace=False)
    colours = rng.choice(len(COLOURS), n, replace=False)
    return tuple(Character(SHAPES[s], list(COLOURS)[c]) for s, c in zip(shapes, colours))


def cast_size(n_shots: int) -> int:
    """Characters a story of n_shots shows: 4 from 5 shots on (8 shots: 4 introductions, 4 returns)."""
    return min(CHARACTERS_PER_STORY, max(n_shots - n_shots // 3, 2))


def character_order(rng: np.random.Generator, n_shots: int) -> list[int]:
    """Who is in each shot: characters 0..n-1 introduced in order at random shots (an introduction
    is forced when the shots left are needed for them), the other shots a return of an earlier
    character that was not in the shot before."""
    n = cast_size(n_shots)
    order = [0]
    for i in range(1, n_shots):
        new, left = len(set(order)), n_shots - i
        returnable = [c for c in range(new) if c != order[-1]]
        introduce = new < n and (not returnable or n - new >= left or rng.random() < 0.5)
        order.append(new if introduce else int(rng.choice(returnable)))
    return order


def make_story(seed: int, n_shots: int | None = None) -> SyntheticStory:
    """A random story (deterministic in `seed`) of n_shots (default 3-8) shots."""
    rng = np.random.default_rng(seed)
    n_shots = n_shots or int(rng.integers(3, 9))
    if n_shots < 2:
        raise ValueError(f"a story needs >= 2 shots, got {n_shots}")
    order = character_order(rng, n_shots)
    chars = _distinct_characters(rng, cast_size(n_shots))
    shots = []
    for i, c in enumerate(order):
        scene = list(SCENES)[int(rng.integers(len(SCENES)))]
        motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
        pan = tuple(float(v) for v in rng.uniform(-0.1, 0.1, 2))
        start = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.35, 0.65)))
        place = SCENES[scene][0]
        if c in order[:i]:
            caption = f"The same {chars[c].shape} returns to {place}."
        else:
            name = chars[c].name()
            caption = f"{'An' if name[0] in 'aeiou' else 'A'} {name} {MOTIONS[motion]} {place}."
        shots.append(Shot(caption, (c,), scene, motion, pan, (start,)))
    return SyntheticStory(chars, tuple(shots))


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


def _position(motion: str, start: tuple[float, float], t: float) -> tuple[float, float]:
    """World position at time t in [0, 1]."""
    x, y = start
    if motion == "hops":
        return x - 0.1 + 0.2 * t, y - 0.075 * abs(np.sin(t * 3 * np.pi))
    if motion == "slides":
        return x + 0.15 * (t - 0.5), y
    if motion == "drifts":
        return x + 0.1 * (t - 0.5), y + 0.075 * (t - 0.5)
    return x + 0.01 * np.sin(t * 2 * np.pi), y  # rests


def render_shot(story: SyntheticStory, index: int, frames: int = 17, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and identity masks uint8 [T, H, W] of one shot."""
    shot = story.shots[index]
    pix = (np.arange(size, dtype=np.float32) + 0.5) / size
    px, py = np.meshgrid(pix, pix)  # [H, W], x to the right, y down
    video = np.zeros((frames, size, size, 3), np.uint8)
    masks = np.zeros((frames, size, size), np.uint8)
    for f in range(frames):
        t = f / max(frames - 1, 1)
        wx = px + shot.pan[0] + 0.05 * t  # a slow camera pan within the shot
        wy = py + shot.pan[1]
        img = _background(shot.scene, wx, wy)
        for slot, c in enumerate(shot.characters):
            ch = story.characters[c]
            cx, cy = _position(shot.motion, shot.starts[slot], t)
            u, v = (wx - cx) / RADIUS, (wy - cy) / RADIUS
            inside = _inside(ch.shape, u, v)
            img = np.where(inside[..., None], np.asarray(COLOURS[ch.colour], np.float32), img)
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
    shots = tuple(
        Shot(s["caption"], tuple(s["characters"]), s["scene"], s["motion"], tuple(s["pan"]), tuple(tuple(p) for p in s["starts"]))
        for s in data["shots"]
    )
    return SyntheticStory(chars, shots)


def save_synthetic(
    folder: str | Path, story: SyntheticStory, rendered: list[tuple[np.ndarray, np.ndarray]] | None = None
) -> Path:
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
    return {
        "settings": {"width": size, "height": size, "frames": frames, **settings},
        "shots": [{"caption": s.caption} for s in story.shots],
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m onestory_jax.data.synthetic`: write ground-truth stories and their story files."""
    import argparse

    import yaml

    ap = argparse.ArgumentParser(
        description="Write synthetic ground-truth stories: OUT/sSEED/story.json (what "
        "`python -m onestory_jax.eval --truth` reads), story.yaml (what sample.py renders) "
        "and, with --render, the true frames and masks (shot_NN.npz, for `eval --stories`)."
    )
    ap.add_argument("--seed", type=int, default=1_000_000, help="first seed (held-out stories start at 1,000,000)")
    ap.add_argument("--stories", type=int, default=1)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--frames", type=int, default=9, help="frames a shot, 4k + 1")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.shots < 2 or args.stories < 1 or args.frames < 1 or (args.frames - 1) % 4 or args.size % 16:
        raise UserError("--shots must be >= 2, --stories >= 1, --frames 4k + 1 and --size a multiple of 16")
    for seed in range(args.seed, args.seed + args.stories):
        story = make_story(seed, args.shots)
        folder = save_synthetic(
            args.out / f"s{seed}", story, render_synthetic(story, args.frames, args.size) if args.render else None
        )
        (folder / "story.yaml").write_text(yaml.safe_dump(story_file(story, args.frames, args.size), sort_keys=False))
        print(
            f"{folder}: {len(story.shots)} shots; render with `python sample.py --checkpoint models/demo --story "
            f"{folder}/story.yaml --out out/s{seed}`, score with `python -m onestory_jax.eval --run out/s{seed} "
            f"--truth {folder}`"
        )
    return 0


if __name__ == "__main__":
    from onestory_jax.errors import run_cli

    run_cli(main)
