"""Classifier-free guidance on velocities, with the [cond, uncond] pair run as one batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def null_text(shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """The null caption embedding [..., Lt, text_dim]: all zeros.

    The one unconditional text of this project: training's text dropout replaces a caption with it,
    and sampling's unconditional CFG branch uses it unless the story sets a negative prompt (Wan's
    own recipe for its released weights encodes one).
    """
    return jnp.zeros(shape, dtype)


def cfg_combine(v_cond: Array, v_uncond: Array, scale: float | Array) -> Array:
    """v = v_uncond + scale * (v_cond - v_uncond). Shapes [B, ...]."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_pair(
    fn: Callable[[Array, Array, Any], Array],
    x: Array,
    t: Array,
    cond: Any,
    uncond: Any,
    scale: float | Array,
    sharding: jax.sharding.Sharding | None = None,
) -> Array:
    """Guided velocity from one call of `fn(x2, t, context2)` on the batched pair.

    x [B, ...]; cond / uncond: pytrees of arrays with leading batch B (e.g. text embeddings),
    identical structure. The batch is [cond rows; uncond rows] (2B), concatenated on axis 0, so
    the pair can be split across the `data` mesh axis: pass `sharding` (e.g.
    NamedSharding(mesh, P("data"))) to constrain the concatenated inputs and the output.
    Returns the combined velocity [B, ...].
    """
    b = x.shape[0]
    x2 = jnp.concatenate([x, x], axis=0)  # [2B, ...]
    ctx2 = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    if sharding is not None:
        x2, ctx2 = jax.lax.with_sharding_constraint((x2, ctx2), sharding)
    v2 = fn(x2, t, ctx2)  # [2B, ...]
    if sharding is not None:
        v2 = jax.lax.with_sharding_constraint(v2, sharding)
    return cfg_combine(v2[:b], v2[b:], scale)


def guided_velocity_fn(
    fn: Callable[[Array, Array, Any], Array],
    cond: Any,
    uncond: Any,
    scale: float,
    sharding: jax.sharding.Sharding | None = None,
) -> Callable[[Array, Array], Array]:
    """A `velocity_fn(x, t)` for `loop.sample`. A static `scale == 1` skips the unconditional pass."""
    if isinstance(scale, (int, float)) and scale == 1.0:
        return lambda x, t: fn(x, t, cond)
    return lambda x, t: cfg_pair(fn, x, t, cond, uncond, scale, sharding)
