"""Video frames in and out of the model's format: reading and writing mp4, centre crop + resize to
[-1, 1] and back to uint8, frame sampling, and a frame-difference shot detector for videos given
without shot boundaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.io import atomic_path

IMAGE_MODES = ("RGB", "RGBA", "L", "P")  # PIL modes converted to RGB (alpha dropped); others refused


def read_video(path: Path) -> np.ndarray:
    """Read all frames of a video as uint8 [T, H, W, 3]; unreadable files are a UserError."""
    try:
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except ImportError:
        raise UserError("reading video needs PyAV: pip install 'onestory-jax[video]'") from None
    except Exception as e:  # av raises many error types for bad files
        raise UserError(f"cannot read video '{path}': {e}") from None
    if not frames:
        raise UserError(f"video '{path}' has no frames")
    return np.stack(frames)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 (yuv420p), atomically."""
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


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] float frames [..., 3] -> uint8, rounded to nearest (the inverse of `resize_frame`'s scaling)."""
    return np.clip((np.asarray(video, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def resize_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] -> centre-cropped, resized float [height, width, 3] in [-1, 1]."""
    from PIL import Image

    img = Image.fromarray(frame)
    scale = max(width / img.width, height / img.height)
    img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), np.float32) / 127.5 - 1.0


def sample_frames(shot: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly over a shot [T, ...] (repeating frames of shots that are shorter)."""
    return shot[np.round(np.linspace(0, len(shot) - 1, count)).astype(int)]


def detect_shots(path: Path, frames: int, min_length: int = 8) -> list[tuple[int, int]]:
    """Shot boundaries [(start, end), ...] (end exclusive) of a video file of `frames` frames, by
    PySceneDetect's content detector (HSV change between frames; shots of at least `min_length`
    frames), read through PyAV. A video without cuts is one shot."""
    import logging

    try:
        from scenedetect import ContentDetector, detect
    except ImportError:
        raise UserError("shot detection needs PySceneDetect: pip install 'onestory-jax[video]' (or give --boundaries)") from None
    logging.getLogger("pyscenedetect").setLevel(logging.WARNING)
    scenes = detect(str(path), ContentDetector(min_scene_len=min_length), backend="pyav", show_progress=False)
    return [(start.frame_num, min(end.frame_num, frames)) for start, end in scenes] or [(0, frames)]


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3]; unreadable or non-RGB files are a UserError."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in IMAGE_MODES:
                raise UserError(f"image '{path}' is not RGB (mode {img.mode}; expected one of {', '.join(IMAGE_MODES)})")
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image '{path}': {e}") from None


def _xp(x: Any) -> Any:
    """numpy for host arrays, jax.numpy for device arrays and tracers (the same code runs in a jitted scan)."""
    return jnp if isinstance(x, jax.Array) else np


def image_clip(image: Any, frames: int) -> Any:
    """What Wan's I2V encodes for a start image [H, W, 3] in [-1, 1]: the image, then frames - 1 zero frames."""
    xp = _xp(image)
    return xp.concatenate([image[None], xp.zeros((frames - 1, *image.shape), image.dtype)])


def i2v_channels(image_latents: Any) -> Any:
    """Wan2.1's I2V channels [T, h, w, 4 mask + C] from the latents of `image_clip` [T, h, w, C]: the 4
    mask channels (one per pixel frame of a latent frame) are 1 on latent frame 0 only."""
    xp = _xp(image_latents)
    t, h, w, _ = image_latents.shape
    mask = xp.concatenate([xp.ones((1, h, w, 4), xp.float32), xp.zeros((t - 1, h, w, 4), xp.float32)])
    return xp.concatenate([mask, image_latents.astype(xp.float32)], axis=-1)
