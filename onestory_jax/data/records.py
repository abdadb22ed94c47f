"""Prepared training records: one ArrayRecord file of videos, each a dict of NumPy arrays.

A video record (S shots of T latent frames of h x w):
  latents            [S, T, h, w, 16]  VAE latents of every shot
  text               [S, L, D_text]    caption embeddings (valid rows only; L = longest caption)
  text_lengths       [S]               valid rows per caption
  frame_embeddings   [S, T, E]         pseudo-label embedder features per latent frame
  augmented_first    [T, h, w, 16]     latents of an augmented copy of shot 1 (flip/crop/colour)
  image_tokens       [Li, D_image]     CLIP tokens of shot 1's first frame (I2V)
  id                 []                the video's name (bytes)
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.io import atomic_path

RECORD_KEYS = ("latents", "text", "text_lengths", "frame_embeddings", "augmented_first", "image_tokens", "id")


def encode_record(video: dict[str, np.ndarray]) -> bytes:
    """Serialise one video record (np.savez, uncompressed)."""
    missing = [k for k in RECORD_KEYS if k not in video]
    if missing:
        raise ValueError(f"video record lacks {', '.join(missing)}")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(video[k]) for k in RECORD_KEYS})
    return buf.getvalue()


def decode_record(data: bytes, index: int | str | None = None) -> dict[str, np.ndarray]:
    """Parse a record; a corrupt one is a UserError naming it."""
    try:
        with np.load(io.BytesIO(data)) as z:
            video = {k: z[k] for k in RECORD_KEYS}
    except Exception as e:  # zip/npy errors come in many types
        raise UserError(f"dataset record {index if index is not None else '?'} is corrupt: {e}") from None
    return video


def write_records(path: str | Path, videos: Iterable[dict[str, np.ndarray]]) -> int:
    """Write videos to an ArrayRecord file atomically; returns how many were written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    n = 0
    with atomic_path(Path(path)) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for video in videos:
            writer.write(encode_record(video))
            n += 1
        writer.close()
    return n
