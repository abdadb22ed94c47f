"""The fixed-capacity memory bank of generated latent frames.

The first R slots hold the story's reference images (one latent frame each, `references:`), then
slot R + s holds latent frame s % T of shot s // T (T latent frames per shot); shots are written in
order, so the valid slots always form a prefix. A shot's `memory: {pin, exclude}` become masks over
the slots (`control_masks`). Every frame-choosing strategy (the selector, or
`baseline_candidates`, defined in models/memory.py because training uses them too) yields a
ranking score and a candidate mask over slots; the top-K candidates, best first, feed the
Adaptive Conditioner.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.models.memory import caption_summary

Array = jax.Array


@flax.struct.dataclass
class MemoryBank:
    latents: Array  # [S, h, w, C] with S = max_shots * frames_per_shot
    valid: Array  # [S] bool

    @property
    def capacity(self) -> int:
        return self.latents.shape[0]


def empty_bank(
    max_shots: int, frames_per_shot: int, h: int, w: int, channels: int = 16, references: Array | None = None
) -> MemoryBank:
    """A bank of max_shots x frames_per_shot slots, after the reference frames [R, h, w, C] (valid)."""
    n = max_shots * frames_per_shot
    bank = MemoryBank(latents=jnp.zeros((n, h, w, channels), jnp.float32), valid=jnp.zeros((n,), bool))
    if references is None:
        return bank
    return MemoryBank(
        latents=jnp.concatenate([references.astype(jnp.float32), bank.latents]),
        valid=jnp.concatenate([jnp.ones((references.shape[0],), bool), bank.valid]),
    )


def write_shot(bank: MemoryBank, shot: Array, latents: Array, offset: int = 0) -> MemoryBank:
    """Store a shot's latents [T, h, w, C] in its slots, after `offset` reference slots (shot may be traced)."""
    t = latents.shape[0]
    start = offset + shot * t
    new_latents = jax.lax.dynamic_update_slice(bank.latents, latents.astype(bank.latents.dtype), (start, 0, 0, 0))
    new_valid = jax.lax.dynamic_update_slice(bank.valid, jnp.ones((t,), bool), (start,))
    return MemoryBank(latents=new_latents, valid=new_valid)


def slot_captions(text: Array, frames_per_shot: int, reference_slots: int = 0) -> Array:
    """Each slot's shot caption for a selector that reads captions: shot captions [S, Lt, D] ->
    [R + S x T, D] (`caption_summary`; the reference slots get zeros: no caption)."""
    per_shot = jnp.repeat(caption_summary(jnp.asarray(text, jnp.float32)), frames_per_shot, axis=0)
    return jnp.concatenate([jnp.zeros((reference_slots, per_shot.shape[-1]), jnp.float32), per_shot])


def item_slots(item: str, references: Sequence[str], frames_per_shot: int) -> list[int]:
    """Bank slots of a pin/exclude item: "N" (every latent frame of shot N, 1-based), "N:F" (its latent
    frame F) or a reference's name."""
    if item in references:
        return [list(references).index(item)]
    shot, _, frame = item.partition(":")
    first = len(references) + (int(shot) - 1) * frames_per_shot
    if not frame:
        return list(range(first, first + frames_per_shot))
    if not 0 <= int(frame) < frames_per_shot:
        raise UserError(f"memory item {item!r}: shot {shot} has latent frames 0..{frames_per_shot - 1}")
    return [first + int(frame)]


def control_masks(
    pins: Sequence[Sequence[str]], excludes: Sequence[Sequence[str]], references: Sequence[str], frames_per_shot: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pinned, excluded) bool [S, R + S x T]: per shot, the slots its memory must hold / must not hold."""
    n = len(pins)
    masks = np.zeros((2, n, len(references) + n * frames_per_shot), bool)
    for which, per_shot in enumerate((pins, excludes)):
        for i, items in enumerate(per_shot):
            for item in items:
                masks[which, i, item_slots(item, references, frames_per_shot)] = True
    return masks[0], masks[1]
