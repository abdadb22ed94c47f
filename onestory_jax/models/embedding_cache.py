"""On-disk cache of prompt embeddings: one `.npy` per (prompt, encoder identity), written atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.io import save_npy


def encoder_identity(cfg: Any, checkpoint: str | Path) -> str:
    """A short hash of the encoder config (a dataclass) and its checkpoint (path, size, mtime)."""
    path = Path(checkpoint).resolve()
    stat = path.stat() if path.exists() else None
    payload = {
        "config": dataclasses.asdict(cfg),
        "checkpoint": str(path),
        "size": stat.st_size if stat else None,
        "mtime_ns": stat.st_mtime_ns if stat else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class EmbeddingCache:
    """Maps a prompt to its embedding array under `root`, for one encoder identity."""

    def __init__(self, root: str | Path, identity: str) -> None:
        self.root = Path(root)
        self.identity = identity

    def path(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.identity}\0{prompt}".encode()).hexdigest()
        return self.root / f"{key}.npy"

    def get(self, prompt: str) -> np.ndarray | None:
        """The stored embedding, or None when absent or unreadable (a miss)."""
        try:
            return np.load(self.path(prompt))
        except (OSError, ValueError):
            return None

    def put(self, prompt: str, value: np.ndarray) -> None:
        """Store atomically (a temp file in the same directory, renamed over the target)."""
        save_npy(self.path(prompt), value)
