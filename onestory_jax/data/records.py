"""Prepared training records: one ArrayRecord file of videos, each a dict of NumPy arrays.

A video record (S shots of T latent frames of h x w):
  latents            [S, T, h, w, 16]  VAE latents of every shot
  text               [S, L, D_text]    caption embeddings (valid rows only; L = longest caption)
  text_lengths       [S]               valid rows per caption
  frame_embeddings   [S, T, E]         pseudo-label embedder features per latent frame
  augmented_first    [T, h, w, 16]     latents of an augmented copy of shot 1 (flip/crop/colour)
  image_tokens       [Li, D_image]     CLIP tokens of shot 1's first frame (I2V)
  first_image        [T, h, w, 16]     latents of shot 1's first frame as Wan's I2V encodes it (data.video.image_clip)
  shot_keys          [S]               who each shot shows (synthetic stories: the character; -1: unknown)
  id                 []                the video's name (bytes)
  character_cells    [S, T, h, w]      optional: the share of each latent cell the characters cover
                                       (synthetic stories; train.character_loss_weight weighs L_shot by it)
"""

from __future__ import annotations

import bisect
import io
import itertools
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from onestory_jax.config import Config
from onestory_jax.errors import UserError
from onestory_jax.io import atomic_path

RECORD_KEYS = (
    "latents",
    "text",
    "text_lengths",
    "frame_embeddings",
    "augmented_first",
    "image_tokens",
    "first_image",
    "shot_keys",
    "id",
)
OPTIONAL_KEYS = ("character_cells",)


def encode_record(video: dict[str, np.ndarray]) -> bytes:
    """Serialise one video record (np.savez, uncompressed)."""
    missing = [k for k in RECORD_KEYS if k not in video]
    if missing:
        raise ValueError(f"video record lacks {', '.join(missing)}")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(video[k]) for k in (*RECORD_KEYS, *OPTIONAL_KEYS) if k in video})
    return buf.getvalue()


# np.load parses .npy headers with ast.literal_eval, which CPython < 3.12.1 does not make thread-safe
# (gh-106905: "SystemError: AST constructor recursion depth mismatch" when grain's threads decode
# records at once; a 1000-step demo run died of it at step 525).
_NPY_HEADER_LOCK = threading.Lock()


def decode_record(data: bytes, index: int | str | None = None) -> dict[str, np.ndarray]:
    """Parse a record; a corrupt one is a UserError naming it."""
    try:
        with _NPY_HEADER_LOCK, np.load(io.BytesIO(data)) as z:
            missing = [k for k in RECORD_KEYS if k not in z.files]
            video = {k: z[k] for k in (*RECORD_KEYS, *OPTIONAL_KEYS) if k in z.files}
    except Exception as e:  # zip/npy errors come in many types
        raise UserError(f"dataset record {index if index is not None else '?'} is corrupt: {e}") from None
    if missing:
        raise UserError(
            f"dataset record {index if index is not None else '?'} was prepared by an older version (it lacks "
            f"{', '.join(missing)}): prepare the data again with onestory_jax.data.prepare"
        )
    return video


def check_record_fits(video: dict[str, np.ndarray], cfg: Config, name: str) -> None:
    """Refuse a record prepared for another model (latent channels, text or image feature widths)."""
    widths = {
        "latents": (video["latents"].shape[-1], cfg.vae.z_dim, "vae.z_dim"),
        "text": (video["text"].shape[-1], cfg.dit.text_dim, "dit.text_dim"),
    }
    if cfg.dit.has_image_branch:
        widths["image_tokens"] = (video["image_tokens"].shape[-1], cfg.dit.image_dim, "dit.image_dim")
    for key, (got, want, field) in widths.items():
        if got != want:
            raise UserError(
                f"training data {name} was prepared for another model: its {key} have width {got}, this "
                f"config's {field} is {want} (prepare the data with this model's folder)"
            )


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


class RecordFiles:
    """Prepared record files read as one sequence of decoded videos. A file that cannot be opened,
    or a record that cannot be read or decoded, is a `UserError` naming the file (and the record)."""

    def __init__(self, files: Sequence[Path]):
        self.files = [Path(f) for f in files]
        self._sources = [_open_records(f) for f in self.files]
        self._starts = [0, *itertools.accumulate(len(s) for s in self._sources)]

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, record number in that file) of record `index` of the sequence."""
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        k, j = self.locate(index)
        path = self.files[k]
        try:
            data = self._sources[k][j]
        except Exception as e:  # riegeli reports a damaged chunk as a bare RuntimeError
            raise UserError(f"record {j} of '{path}' cannot be read (corrupt or truncated?): {_reason(e)}") from None
        return decode_record(data, f"{j} of '{path}'")


def read_records(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Every video of one record file (a damaged file is one `UserError` naming it)."""
    files = RecordFiles([Path(path)])
    return [files[i] for i in range(len(files))]


def _open_records(path: Path):  # -> grain's ArrayRecordDataSource
    import grain

    try:
        return grain.sources.ArrayRecordDataSource([str(path)])
    except Exception as e:  # a truncated or foreign file: RuntimeError, often without a message
        raise UserError(f"'{path}' is not a readable ArrayRecord file (corrupt or truncated?): {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
