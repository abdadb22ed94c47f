"""What the studio shows of a run folder, without any UI: each shot's memory frames (from
manifest.json) as thumbnails cut from the saved shot videos, and which shots a running render has
kept, finished or not reached yet (from the shot records it saves as each shot is denoised).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.io import shot_name
from onestory_jax.studio.story_edit import MemoryItem

THUMB_SIDE = 128  # thumbnails are enlarged (nearest) to at least this many pixels on their short side
KEPT, NEW, PENDING, DENOISING = "kept", "new", "pending", "denoising"


@dataclasses.dataclass(frozen=True)
class MemoryFrame:
    """One memory frame a shot used: an earlier shot's latent frame, or a reference image."""

    item: MemoryItem  # what a pin or exclusion of it writes: "shot:frame" or the reference's name
    score: float  # its ranking score (Frame Selection)
    patchifier: tuple[int, ...]  # the Adaptive Conditioner's kernel (t, h, w): finest for the best frames
    shot: int | None = None  # story shot, 1-based
    frame: int | None = None  # latent frame of that shot
    reference: str | None = None  # the reference's name
    pinned: bool = False  # the shot's memory.pin put it there

    @property
    def label(self) -> str:
        """`shot 2 · frame 1 · score 0.60 · 1x2x4` (the reference's name first for a reference; `· pinned`)."""
        where = f"ref {self.reference}" if self.reference is not None else f"shot {self.shot} · frame {self.frame}"
        return f"{where} · score {self.score:.2f} · {'x'.join(map(str, self.patchifier))}{' · pinned' if self.pinned else ''}"


def video_frame(latent_frame: int) -> int:
    """The video frame a latent frame ends on (Wan's causal VAE: latent frame 0 is video frame 0,
    latent frame f >= 1 covers video frames 4f-3 .. 4f)."""
    return 0 if latent_frame == 0 else 4 * latent_frame


def memory_frames(manifest: dict[str, Any], shot: int) -> list[MemoryFrame]:
    """The memory frames shot `shot` (1-based) used, best first, from a run's manifest.

    A manifest entry (`pipeline.write_story`) names a reference (`reference: NAME`) or an earlier story
    shot and latent frame (`shot`, `frame`), with `score`, `patchifier` and `pinned`."""
    shots = manifest.get("shots") or []
    if not 1 <= shot <= len(shots):
        return []
    frames = []
    for entry in shots[shot - 1].get("memory") or []:
        score, kernel = float(entry.get("score", 0.0)), tuple(int(k) for k in entry.get("patchifier") or ())
        pinned = bool(entry.get("pinned", False))
        if entry.get("reference") is not None:
            name = str(entry["reference"])
            frames.append(MemoryFrame(name, score, kernel, reference=name, pinned=pinned))
        else:
            s, f = int(entry["shot"]), int(entry["frame"])
            frames.append(MemoryFrame(f"{s}:{f}", score, kernel, shot=s, frame=f, pinned=pinned))
    return frames


def enlarge(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """A uint8 image [H, W, 3] enlarged by a whole factor (nearest) to at least `side` on its short side."""
    scale = max(1, -(-side // min(image.shape[:2])))
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1) if scale > 1 else image


@functools.lru_cache(maxsize=64)
def _video(path: str, mtime_ns: int) -> np.ndarray:
    from onestory_jax.data.video import read_video

    return read_video(Path(path))


def shot_video_frames(out: Path, shot: int) -> np.ndarray:
    """The saved video of shot `shot` (1-based) as uint8 [F, H, W, 3] (cached until the file changes)."""
    path = Path(out) / shot_name(shot - 1, ".mp4")
    return _video(str(path), path.stat().st_mtime_ns)


def thumbnail(out: Path, frame: MemoryFrame, reference_paths: dict[str, Path]) -> np.ndarray | None:
    """The picture of a memory frame, enlarged: the video frame its latent frame ends on, or the
    reference image; None when its file is missing."""
    try:
        if frame.reference is not None:
            from onestory_jax.data.video import load_image

            path = reference_paths.get(frame.reference)
            return None if path is None else enlarge(load_image(path))
        video = shot_video_frames(out, frame.shot)
        return enlarge(video[min(video_frame(frame.frame), len(video) - 1)])
    except (OSError, UserError, IndexError, TypeError):  # a missing or unreadable file: no thumbnail
        return None


def shot_states(out: Path, fingerprints: list[str], started: float, redo: int | None = None, running: bool = True) -> list[str]:
    """Per shot of a render that began at `started` (time.time()) into `out`: "kept" (its saved shot is
    reused), "new" (denoised by this render), "denoising" (the first shot not done while `running`) or
    "pending". `fingerprints`: the shots' expected fingerprints (resume.story_fingerprints); `redo`:
    the 1-based shot the render regenerates from."""
    states: list[str] = []
    for i, expected in enumerate(fingerprints):
        record = Path(out) / shot_name(i, ".json")
        try:
            saved, mtime = json.loads(record.read_text()), record.stat().st_mtime
        except (OSError, ValueError):
            saved, mtime = None, 0.0
        state = PENDING
        if isinstance(saved, dict) and saved.get("fingerprint") == expected:
            if mtime >= started:
                state = NEW
            elif (redo is None or i + 1 < redo) and all(s == KEPT for s in states):
                state = KEPT
        states.append(state)
    if running and PENDING in states:
        states[states.index(PENDING)] = DENOISING
    return states


def progress_text(states: list[str], seconds: float, running: bool) -> str:
    """One line of a render's progress: per shot kept / done / denoising / waiting, and the time."""
    words = {KEPT: "kept", NEW: "done", DENOISING: "denoising…", PENDING: "waiting"}
    shots = " · ".join(f"shot {i + 1} {words[s]}" for i, s in enumerate(states))
    to_do = [s for s in states if s != KEPT]
    done = sum(s == NEW for s in states)
    head = "Rendering" if running else "Rendered"
    if not to_do:
        return f"**{head}**: every shot is unchanged, all {len(states)} kept"
    return f"**{head}** ({done}/{len(to_do)} new shot(s), {seconds:.0f} s): {shots}"
