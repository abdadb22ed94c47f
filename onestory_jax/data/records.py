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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    n = 0
    try:
        for video in videos:
            writer.write(encode_record(video))
            n += 1
        writer.close()
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def synthetic_videos(n: int, shots: int, frames: int, hw: tuple[int, int], text_dim: int, image_tokens: tuple[int, int],
                     seed: int = 0, embed_dim: int = 8) -> list[dict[str, np.ndarray]]:
    """Random but structured videos for tests: each shot has a colour; embeddings follow it."""
    rng = np.random.default_rng(seed)
    out = []
    for v in range(n):
        colours = rng.standard_normal((shots, 1, 1, 1, 16)).astype(np.float32)
        latents = colours + 0.1 * rng.standard_normal((shots, frames, *hw, 16)).astype(np.float32)
        lengths = rng.integers(3, 9, shots)
        text = np.zeros((shots, int(lengths.max()), text_dim), np.float32)
        for s, n_tok in enumerate(lengths):
            text[s, :n_tok] = rng.standard_normal((n_tok, text_dim))
        emb = np.repeat(colours[:, :, 0, 0, :embed_dim], frames, axis=1)  # [S, T, E]
        out.append({
            "latents": latents, "text": text, "text_lengths": lengths.astype(np.int32),
            "frame_embeddings": emb + 0.05 * rng.standard_normal(emb.shape).astype(np.float32),
            "augmented_first": latents[0, :, :, ::-1],  # a horizontal flip
            "image_tokens": rng.standard_normal(image_tokens).astype(np.float32),
            "id": np.bytes_(f"synthetic-{v:04d}"),
        })
    return out
