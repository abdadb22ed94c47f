"""Story outputs, each written atomically (`onestory_jax.io.atomic_path`).

shot_NN.mp4, story.mp4, contact_sheet.png, shot_NN.npy (latents) and manifest.json. The file names,
the atomic write and the video encoding live in lower modules (the evaluator reads them too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onestory_jax.data.video import to_uint8, write_mp4
from onestory_jax.io import atomic_path, save_json, shot_name
from onestory_jax.io import save_npy as save_latents

__all__ = ["atomic_path", "contact_sheet", "remove_leftovers", "save_json", "save_latents", "shot_name", "to_uint8", "write_mp4"]


LABEL_MARGIN = 24  # px left of each row: the shot's number


def contact_sheet(path: Path, shots: Sequence[np.ndarray], per_shot: int = 5, max_width: int = 2000) -> None:
    """One row per shot with `per_shot` evenly spaced frames, labelled with its number in a left margin;
    uint8 shots [T, H, W, 3].

    Small frames are enlarged (nearest) to at least 128 px high; the sheet is at most max_width wide.
    """
    from PIL import Image, ImageDraw

    rows = []
    for video in shots:
        idx = np.linspace(0, len(video) - 1, min(per_shot, len(video))).round().astype(int)
        rows.append(np.concatenate([video[i] for i in idx], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]  # 2 px separator
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, 128 // shots[0].shape[1])
    scale = min(scale, max_width / sheet.width)
    if scale != 1:
        sheet = sheet.resize((int(sheet.width * scale), int(sheet.height * scale)), Image.NEAREST)
    labelled = Image.new("RGB", (sheet.width + LABEL_MARGIN, sheet.height), (255, 255, 255))
    labelled.paste(sheet, (LABEL_MARGIN, 0))
    draw, row_height = ImageDraw.Draw(labelled), sheet.height / len(shots)
    for i in range(len(shots)):
        draw.text((4, int((i + 0.5) * row_height) - 6), str(i + 1), fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        labelled.save(tmp, format="PNG")


# atomic_path's temporaries of the files a run writes (`.shot_01.k2j4x.mp4`): left behind by a killed run
_TEMPORARY = re.compile(r"\.(shot_\d+|story|contact_sheet|manifest)\.\w+\.(mp4|npy|json|png)")
_SHOT_FILE = re.compile(r"shot_(\d+)\.(mp4|npy|json)")


def remove_leftovers(out: Path, shots: int) -> list[str]:
    """Remove from a run folder (already known to be a run's) what a killed run's temporaries and a
    longer earlier version of the story left: files of shots after the story's `shots`, where the shot's
    record shows sample.py wrote it. Returns the names removed."""
    removed = []
    for path in sorted(out.iterdir()) if out.is_dir() else ():  # decided for every file before any is removed
        stale = bool(_TEMPORARY.fullmatch(path.name))
        if (m := _SHOT_FILE.fullmatch(path.name)) and int(m[1]) > shots:
            try:
                record = json.loads((out / shot_name(int(m[1]) - 1, ".json")).read_text())
                stale = isinstance(record, dict) and {"fingerprint", "inputs"} <= set(record)
            except (OSError, ValueError):
                stale = False
        if stale and path.is_file():
            removed.append(path)
    for path in removed:
        path.unlink()
    return [path.name for path in removed]
