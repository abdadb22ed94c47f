"""Streamed safetensors reading: headers parsed here, data memory-mapped, one tensor at a time.

A file is 8 bytes (little-endian u64 header length N), N bytes of JSON
(`name -> {dtype, shape, data_offsets: [begin, end]}` plus optional `__metadata__`), then the data;
offsets count from the end of the header. `read(name)` returns a read-only view of the mapped
file, so no tensor is copied until the caller converts it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from onestory_jax.errors import UserError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit


class SafetensorsFile:
    """One `.safetensors` file: header validated on open, tensors mapped lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries, self._data_start, self.metadata = _parse_header(self.path)
        self.shapes: dict[str, tuple[int, ...]] = {name: e[1] for name, e in self._entries.items()}
        self._map: np.memmap | None = None

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only array backed by the mapped file."""
        dtype, shape, begin, end = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[self._data_start + begin : self._data_start + end].view(dtype).reshape(shape)


def _parse_header(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int, dict[str, str]]:
    """(name -> (dtype, shape, begin, end), the byte offset where data starts, the `__metadata__` strings); strict."""

    def bad(why: str) -> UserError:
        return UserError(f"'{path}' is not a valid safetensors file: {why}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise bad(f"header length {n} exceeds the file size {size} (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a map of strings")
    data_size = size - 8 - n
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor '{name}' has a malformed entry {info!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or min(shape, default=0) < 0:
            raise bad(f"tensor '{name}' has offsets {[begin, end]} inconsistent with {info['dtype']}{list(shape)}")
        if end > data_size:
            raise bad(f"tensor '{name}' ends at byte {end} but the data holds {data_size} bytes (truncated?)")
        entries[name] = (dtype, shape, begin, end)
    return entries, 8 + n, metadata


class SafetensorsReader:
    """Several safetensors files seen as one state dict: cheap `shapes`, lazy `read`."""

    def __init__(self, files: Iterable[SafetensorsFile]):
        self._owner: dict[str, SafetensorsFile] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for name, shape in f.shapes.items():
                if name in self._owner:
                    raise UserError(f"tensor '{name}' is in both '{self._owner[name].path}' and '{f.path}'")
                self._owner[name], self.shapes[name] = f, shape

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)

    def path_of(self, name: str) -> Path | None:
        """The file holding `name` (None when no file does)."""
        owner = self._owner.get(name)
        return owner.path if owner else None


def open_index(index: Path) -> SafetensorsReader:
    """Shards listed by a `*.safetensors.index.json` (`weight_map: name -> file`)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"'{index}' is not a safetensors index (JSON with a 'weight_map')") from None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise UserError(f"'{index}' lists shard(s) that do not exist: {', '.join(missing)}")
    reader = SafetensorsReader(SafetensorsFile(index.parent / f) for f in files)
    absent = sorted(k for k, f in weight_map.items() if reader.path_of(k) != index.parent / f)
    if absent:
        raise UserError(f"'{index}' maps {len(absent)} tensor(s) to shards that do not hold them, e.g. '{absent[0]}'")
    return reader


def open_dir(directory: Path) -> SafetensorsReader:
    """All weights of a model folder: via its one index file if present, else every `*.safetensors`."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise UserError(f"'{directory}' holds several safetensors indexes: {', '.join(p.name for p in indexes)}")
    if indexes:
        return open_index(indexes[0])
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors files in '{directory}'")
    return SafetensorsReader(SafetensorsFile(p) for p in files)
