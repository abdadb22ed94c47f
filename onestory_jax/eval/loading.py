"""Read what the evaluator scores: sample.py run directories and synthetic ground-truth folders.

A run directory (sample.py) holds manifest.json and shot_01.mp4 ... (1-based); decoded frames exist
only as those mp4s (H.264, yuv420p), read back with PyAV. A ground-truth folder
(synthetic.save_synthetic) holds story.json and, when rendered, shot_00.npz ... (0-based) with
`frames` uint8 [T, H, W, 3] and `masks` uint8 [T, H, W]. Every problem is a one-line UserError.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onestory_jax.data import synthetic
from onestory_jax.data.video import read_video
from onestory_jax.errors import UserError
from onestory_jax.io import shot_name


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} '{path}' does not exist or is not a directory")
    return path


def load_run(run: Path) -> list[np.ndarray]:
    """Frames uint8 [T, H, W, 3] of every shot of a sample.py output directory, in order."""
    run = _folder(Path(run), "run directory")
    manifest = run / "manifest.json"
    if manifest.is_file():
        try:
            n = len(json.loads(manifest.read_text())["shots"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"'{manifest}' is not a sample.py manifest ({type(e).__name__}: {e})") from None
        paths = [run / shot_name(i, ".mp4") for i in range(n)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"run directory '{run}' lacks {', '.join(missing)} named by its manifest.json")
    else:
        paths = sorted(run.glob("shot_[0-9][0-9].mp4"))
        gaps = [shot_name(i, ".mp4") for i in range(len(paths)) if paths[i].name != shot_name(i, ".mp4")]
        if gaps:  # scoring the shots around a gap would pair the wrong shots
            raise UserError(f"run directory '{run}' lacks {gaps[0]} (it has {', '.join(p.name for p in paths)})")
    if not paths:
        raise UserError(f"run directory '{run}' has no shot_NN.mp4 files (is it a sample.py output directory?)")
    return [read_video(p) for p in paths]


def load_truth(path: Path) -> synthetic.SyntheticStory:
    """The ground-truth story of a synthetic.save_synthetic folder (or its story.json)."""
    path = Path(path)
    file = path / "story.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"ground truth '{path}' not found (expected a folder with story.json, or the file)")
    try:
        return synthetic.synthetic_from_dict(json.loads(file.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"'{file}' is not a synthetic story ({type(e).__name__}: {e})") from None


def load_rendered(folder: Path) -> tuple[synthetic.SyntheticStory, list[np.ndarray], list[np.ndarray]]:
    """(story, frames per shot, masks per shot) of a rendered synthetic.save_synthetic folder."""
    story = load_truth(_folder(Path(folder), "story folder"))
    frames, masks = [], []
    for i in range(len(story.shots)):
        path = Path(folder) / f"shot_{i:02d}.npz"
        try:
            with np.load(path) as data:
                frames.append(data["frames"])
                masks.append(data["masks"])
        except FileNotFoundError:
            raise UserError(
                f"story folder '{folder}' has no {path.name}: render it with synthetic.save_synthetic(folder, story, rendered)"
            ) from None
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"'{path}' is not a rendered shot (frames, masks): {e}") from None
    return story, frames, masks


def story_folders(root: Path) -> list[Path]:
    """Subfolders of `root` holding a story.json, sorted by name."""
    found = sorted(p for p in _folder(Path(root), "stories directory").iterdir() if (p / "story.json").is_file())
    if not found:
        raise UserError(f"stories directory '{root}' has no subfolders with a story.json")
    return found
