"""The fixed-capacity memory bank of generated latent frames, and the frame-choosing strategies.

Slot s holds latent frame s % T of shot s // T (T latent frames per shot); shots are written in
order, so the valid slots always form a prefix. Every strategy yields a ranking score and a
candidate mask over slots; the top-K candidates, best first, feed the Adaptive Conditioner.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class MemoryBank:
    latents: Array  # [S, h, w, C] with S = max_shots * frames_per_shot
    valid: Array  # [S] bool

    @property
    def capacity(self) -> int:
        return self.latents.shape[0]


def empty_bank(max_shots: int, frames_per_shot: int, h: int, w: int, channels: int = 16) -> MemoryBank:
    n = max_shots * frames_per_shot
    return MemoryBank(latents=jnp.zeros((n, h, w, channels), jnp.float32), valid=jnp.zeros((n,), bool))


def write_shot(bank: MemoryBank, shot: Array, latents: Array) -> MemoryBank:
    """Store a shot's latents [T, h, w, C] in its slots (shot may be traced)."""
    t = latents.shape[0]
    start = shot * t
    new_latents = jax.lax.dynamic_update_slice(bank.latents, latents.astype(bank.latents.dtype), (start, 0, 0, 0))
    new_valid = jax.lax.dynamic_update_slice(bank.valid, jnp.ones((t,), bool), (start,))
    return MemoryBank(latents=new_latents, valid=new_valid)


def baseline_candidates(strategy: str, valid: Array, k: int) -> tuple[Array, Array]:
    """(ranking score [S], candidate mask [S]) of a baseline strategy (not onestory).

    recent: the k latest frames, latest first (FramePack-style recency).
    last_frame: only the latest frame.
    uniform: k frames spread evenly over the whole memory, latest first.
    none: nothing.
    """
    slots = jnp.arange(valid.shape[0])
    recency = slots.astype(jnp.float32)  # later slot = more recent = ranked higher
    n = valid.sum()
    if strategy == "recent":
        return recency, valid
    if strategy == "last_frame":
        return recency, valid & (slots == n - 1)
    if strategy == "uniform":
        targets = jnp.round(jnp.linspace(0.0, 1.0, k) * (n - 1).astype(jnp.float32)).astype(slots.dtype)
        chosen = jnp.any(slots[:, None] == targets[None, :], axis=1)
        return recency, valid & chosen
    if strategy == "none":
        return recency, jnp.zeros_like(valid)
    raise ValueError(f"unknown baseline strategy {strategy!r}")
