"""Classifier-free guidance on velocities (on text, and on the memory), every branch run in one batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def guidance_weights(text_scale: float, memory_scale: float = 1.0) -> tuple[float, ...]:
    """Weights of the branches [full, no text, no memory] whose sum is the guided velocity; a branch whose
    scale is 1 is left out (so text CFG alone is [full, no text]).

    v = v_full + (text_scale - 1)(v_full - v_no_text) + (memory_scale - 1)(v_full - v_no_memory):
    classifier-free guidance on text, plus guidance on the memory's context tokens with the caption kept:
    two scales for two conditions, as InstructPix2Pix (arXiv 2211.09800, eq. 3) guides on its image and text,
    here each term removing one condition from the full one.
    """
    weights = [text_scale + memory_scale - 1.0]
    weights += [1.0 - text_scale] if text_scale != 1.0 else []
    weights += [1.0 - memory_scale] if memory_scale != 1.0 else []
    return tuple(weights)


def cfg_batch(
    fn: Callable[[Array, Array, Any], Array],
    x: Array,
    t: Array,
    branches: Sequence[Any],
    weights: Sequence[float],
    sharding: jax.sharding.Sharding | None = None,
) -> Array:
    """sum_i weights[i] * fn(x, t, branches[i]) from one call of `fn` on the branches batched.

    x [B, ...]; branches: pytrees of arrays with leading batch B (e.g. text embeddings), identical
    structure, concatenated on axis 0 ([branch 0 rows; branch 1 rows; ...], N*B). `sharding` (e.g.
    NamedSharding(mesh, P("data"))) constrains the concatenated inputs and the output, so that a CFG
    pair can be split across the `data` mesh axis. Returns the combined velocity [B, ...].
    """
    b, n = x.shape[0], len(branches)
    xn = jnp.concatenate([x] * n, axis=0)  # [N*B, ...]
    ctxn = jax.tree.map(lambda *c: jnp.concatenate(c, axis=0), *branches)
    if sharding is not None:
        xn, ctxn = jax.lax.with_sharding_constraint((xn, ctxn), sharding)
    vn = fn(xn, t, ctxn)  # [N*B, ...]
    if sharding is not None:
        vn = jax.lax.with_sharding_constraint(vn, sharding)
    return sum(w * vn[i * b : (i + 1) * b] for i, w in enumerate(weights))


def guided_velocity_fn(
    fn: Callable[[Array, Array, Any], Array],
    branches: Sequence[Any],
    weights: Sequence[float],
    sharding: jax.sharding.Sharding | None = None,
) -> Callable[[Array, Array], Array]:
    """A `velocity_fn(x, t)` for `loop.sample`: `cfg_batch` of the branches (one branch: `fn` alone)."""
    if len(branches) == 1:
        return lambda x, t: fn(x, t, branches[0])
    return lambda x, t: cfg_batch(fn, x, t, branches, weights, sharding)
