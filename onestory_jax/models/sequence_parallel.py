"""Attention under `shard_map`: Ulysses sequence parallelism and per-device kernels in a mesh.

Ulysses (DeepSpeed-Ulysses): q, k, v arrive sharded along the sequence on the `sequence` mesh axis;
an all-to-all makes every device hold the whole sequence for N / sequence of the heads, any inner
attention runs there (keys complete, so key lengths keep working), and a second all-to-all returns
the output to sequence sharding. Batch and heads stay on the mesh axes the logical rules give
`act_batch` and `act_heads`. `per_device` runs a kernel GSPMD cannot partition (Pallas splash) on
each device's batch and heads, keys gathered along the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
SEQUENCE = "sequence"  # the mesh axis Ulysses splits
# fn(q, k, v, kv_mask, kv_lengths) -> out, all [B, L, N, H] but kv_mask [B, Lk] and kv_lengths [B]
InnerAttention = Callable[[Array, Array, Array, Array | None, Array | None], Array]


def auto_mesh() -> jax.sharding.AbstractMesh | None:
    """The active mesh when it spans devices and none of its axes is already manual, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def sequence_shards() -> int:
    """Devices on the `sequence` axis of the active (not manual) mesh; 1 without one."""
    mesh = auto_mesh()
    return dict(mesh.shape).get(SEQUENCE, 1) if mesh is not None else 1


def _mesh_axes(logical: str, size: int, mesh: jax.sharding.AbstractMesh) -> tuple[str, ...] | None:
    """Mesh axes the logical rules give `logical`, or None when they would not divide `size`."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.shape)
    return axes if axes and size % _devices(axes, mesh) == 0 else None


def _devices(entry: str | tuple[str, ...] | None, mesh: jax.sharding.AbstractMesh) -> int:
    """Devices a PartitionSpec entry splits a dimension over."""
    return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))


def _specs(q: Array, mesh: jax.sharding.AbstractMesh, ulysses: bool) -> tuple[P, P, P, P]:
    """Partition specs of (q, k/v, kv_mask, kv_lengths) for `shard_map`."""
    batch = _mesh_axes("act_batch", q.shape[0], mesh)
    heads = _mesh_axes("act_heads", q.shape[2], mesh)
    split = ulysses or q.shape[1] % dict(mesh.shape).get(SEQUENCE, 1) == 0  # queries along `sequence`
    q_spec = P(batch, SEQUENCE if split and SEQUENCE in mesh.shape else None, heads, None)
    kv_spec = q_spec if ulysses else P(batch, None, heads, None)
    return q_spec, kv_spec, P(batch, None), P(batch)


def per_device(
    fn: InnerAttention, q: Array, k: Array, v: Array, kv_mask: Array | None = None, kv_lengths: Array | None = None
) -> Array:
    """Run `fn` on each device's (batch, heads, query) block in `shard_map`; plain call outside a mesh."""
    mesh = auto_mesh()
    if mesh is None:
        return fn(q, k, v, kv_mask, kv_lengths)
    q_spec, kv_spec, mask_spec, len_spec = _specs(q, mesh, ulysses=False)
    return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, len_spec), out_specs=q_spec, check_vma=False)(
        q, k, v, kv_mask, kv_lengths
    )


def check_heads(heads: int, sequence: int, tensor: int = 1) -> None:
    """Ulysses gives each sequence device heads / (sequence x tensor) heads: they must divide."""
    if heads % (sequence * tensor):
        on = f"sequence axis {sequence}" + (f" x tensor axis {tensor}" if tensor > 1 else "")
        raise ValueError(
            f"Ulysses sequence parallelism: {heads} attention heads are not divisible by the {on} "
            f"(= {sequence * tensor}); change the mesh or set dit_runtime.sequence_parallel=gspmd"
        )


def ulysses(
    fn: InnerAttention, q: Array, k: Array, v: Array, kv_mask: Array | None = None, kv_lengths: Array | None = None
) -> Array:
    """Self-attention [B, L, N, H] with the sequence split over the `sequence` axis (all-to-all to heads).

    L is padded to a multiple of the axis (padded keys hidden by key length). Outside a mesh with
    sequence > 1 this is `fn` itself.
    """
    mesh, s = auto_mesh(), sequence_shards()
    if s == 1:
        return fn(q, k, v, kv_mask, kv_lengths)
    q_spec, kv_spec, mask_spec, len_spec = _specs(q, mesh, ulysses=True)
    check_heads(q.shape[2], s, _devices(q_spec[2], mesh))
    b, length = q.shape[:2]
    pad = -length % s
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        kv_mask = None if kv_mask is None else jnp.pad(kv_mask, ((0, 0), (0, pad)))
        kv_lengths = jnp.full((b,), length, jnp.int32) if kv_lengths is None else kv_lengths

    def body(q: Array, k: Array, v: Array, kv_mask: Array | None, kv_lengths: Array | None) -> Array:
        to_heads = lambda x: jax.lax.all_to_all(x, SEQUENCE, split_axis=2, concat_axis=1, tiled=True)
        out = fn(to_heads(q), to_heads(k), to_heads(v), kv_mask, kv_lengths)
        return jax.lax.all_to_all(out, SEQUENCE, split_axis=1, concat_axis=2, tiled=True)

    out = jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, mask_spec, len_spec), out_specs=q_spec, check_vma=False)(
        q, k, v, kv_mask, kv_lengths
    )
    return out[:, :length]
