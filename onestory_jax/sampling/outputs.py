"""Story outputs, each written atomically (temp file in the same directory, then rename).

shot_NN.mp4, story.mp4, contact_sheet.png, shot_NN.npy (latents) and manifest.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.errors import UserError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def shot_name(i: int, suffix: str) -> str:
    return f"shot_{i + 1:02d}{suffix}"


def save_latents(path: Path, latents: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, latents)


def save_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] float frames [T, H, W, 3] -> uint8."""
    return np.clip((np.asarray(video, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 (yuv420p)."""
    try:
        import av
    except ImportError:
        raise UserError("writing mp4 needs PyAV: pip install 'onestory-jax[video]'") from None
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def contact_sheet(path: Path, shots: Sequence[np.ndarray], per_shot: int = 5, max_width: int = 2000) -> None:
    """One row per shot with `per_shot` evenly spaced frames; uint8 shots [T, H, W, 3].

    Small frames are enlarged (nearest) to at least 128 px high; the sheet is at most max_width wide.
    """
    from PIL import Image

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
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
