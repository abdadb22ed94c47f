"""Device mesh, the one logical-axis rules table, and sharded parameter creation.

Every parameter and every constrained activation names its dimensions with the logical axes below;
`LOGICAL_RULES` maps them to the mesh axes `data`, `fsdp`, `sequence`, `tensor`. Parameters are
created directly in their sharding from an abstract init (`jax.eval_shape`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from onestory_jax.config import MeshConfig
from onestory_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis -> mesh axes. Parameters (first block) and activations (second block) use distinct
# names so that a weight's `embed` can live on fsdp while an activation's batch also uses fsdp.
# Rules are tried in order and a rule applies only while its mesh axes are free in that array: a
# kernel [embed, mlp] gets (fsdp, tensor), a bias [layers, mlp] falls back to (fsdp x tensor).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("lora", None),  # a LoRA's rank axis: small, replicated
    ("embed", "fsdp"),
    ("heads", ("fsdp", "tensor")),
    ("heads", "tensor"),
    ("mlp", ("fsdp", "tensor")),
    ("mlp", "tensor"),
    ("modulation", None),
    ("norm", None),
    ("in_features", None),  # narrow input widths: text 4096, CLIP 1280, patch channels
    ("out_features", None),  # head output (pt*ph*pw*out_dim)
    ("kernel_t", None),
    ("kernel_h", None),
    ("kernel_w", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_kv_length", None),
    ("act_head_dim", None),
)

# Activation layouts the transformer models constrain with (logical names from the table above).
TOKENS = ("act_batch", "act_length", "act_embed")
HEADS = ("act_batch", "act_length", "act_heads", "act_head_dim")
KV_HEADS = ("act_batch", "act_kv_length", "act_heads", "act_head_dim")

# Parameters larger than this must not be replicated when fsdp > 1.
REPLICATION_LIMIT_BYTES = 1 << 20


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """Build the (data, fsdp, sequence, tensor) mesh; one axis may be -1 (fill)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [cfg.data, cfg.fsdp, cfg.sequence, cfg.tensor]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise UserError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if len(devices) % known:
            raise UserError(f"{len(devices)} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[fills[0]] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {len(devices)} present")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Enter the mesh and the logical rules (needed by `nn.with_logical_constraint`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, LOGICAL_RULES))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Inputs: batch over (data, fsdp), everything else replicated."""
    return logical_sharding(mesh, ("act_batch",) + (None,) * (ndim - 1))


def param_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """Map a boxed (LogicallyPartitioned) abstract param tree to NamedShardings."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def init_program(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Callable[..., Any]:
    """`init_fn` (returning boxed params) jitted to return the unboxed params straight in their shardings on
    `mesh`; `args` are its arguments or their `jax.ShapeDtypeStruct`s. Keep it to create params again without
    tracing the model anew."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = unbox_plain(param_shardings(abstract, mesh))
    return jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
    """Run `init_fn(*args)` (returning boxed params) jitted straight into its shardings.

    Returns the unboxed param tree; no full replica is ever built on one device.
    """
    program = init_program(init_fn, mesh, *args)
    with activate(mesh):
        return program(*args)


def unbox_plain(tree: Any) -> Any:
    """Strip logical-axis boxes without applying sharding constraints (safe inside a mesh context)."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def abstract_params(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
    """Shape/dtype/sharding of the params `init_fn` would create, without allocating them."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = unbox_plain(param_shardings(abstract, mesh))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox_plain(abstract), shardings)


def replicated_large_params(params: Any, mesh: Mesh, limit: int = REPLICATION_LIMIT_BYTES) -> list[str]:
    """Key paths of parameters bigger than `limit` bytes that are fully replicated."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        sharding = getattr(leaf, "sharding", None)
        if nbytes > limit and (sharding is None or sharding.is_fully_replicated):
            bad.append(jax.tree_util.keystr(path))
    return bad


def check_params_sharded(params: Any, mesh: Mesh) -> None:
    """Fail when fsdp > 1 and a large parameter was left replicated by accident."""
    if mesh.shape["fsdp"] <= 1:
        return
    bad = replicated_large_params(params, mesh)
    if bad:
        raise AssertionError(f"{len(bad)} parameter(s) > 1 MiB replicated on an fsdp mesh: {', '.join(bad)}")


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` for train.py --distributed.

    The coordinator, process count and process id come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID when set, else from a detected cluster (SLURM, Open MPI,
    TPU pods).
    """
    try:
        n, i = (int(v) if (v := os.environ.get(k)) else None for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    except ValueError:
        raise UserError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
    try:
        jax.distributed.initialize(num_processes=n, process_id=i)
    except (ValueError, TypeError) as e:
        raise UserError(
            f"--distributed: {str(e).strip().splitlines()[0]} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
            "and JAX_PROCESS_ID, or run under SLURM, Open MPI or on a TPU pod)"
        ) from None
