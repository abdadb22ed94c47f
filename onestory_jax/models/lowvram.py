"""Low-VRAM sampling of the DiT: fp8 storage of its block kernels, and its blocks kept in host memory.

`dit_runtime.weights_dtype=fp8` stores the kernels of the block layers `dit_runtime.fp8_layers` names as float8_e4m3fn
with a per-output-channel fp32 `scale` beside each (`quantize_fp8`); the layer dequantizes its kernel
right before its matmul (`layers.dequantize`), inside the layer scan, so that (on a GPU) at most one
layer's kernels exist in the compute dtype. `dit_runtime.offload=blocks` places the stacked block params (`params["blocks"]`,
[layers, ...] each) in host memory (memory kind `pinned_host`); the layer scan moves each layer's slice
to the device as it reaches it (`layers.on_device`, `dit.py`).

A DiT with either switch is loaded through the host: read (or initialised) on the CPU backend in its
stored dtype, quantized there, then put on the mesh in its final memory kinds (`place_dit`), so the
full-precision DiT never sits on the accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from onestory_jax.config import FP8_LAYERS, DiTConfig, DiTRuntime, MeshConfig
from onestory_jax.models.dit import init_fn
from onestory_jax.sharding import abstract_params, make_mesh

Array = jax.Array
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448: e4m3 has 4 exponent bits, 3 mantissa bits, no infinities
HOST = "pinned_host"


def loads_via_host(rt: DiTRuntime) -> bool:
    """Whether a DiT run with `rt` is read or initialised on the host CPU first (`place_dit` puts it on the mesh)."""
    return rt.weights_dtype == "fp8" or rt.offload != "none"


@functools.cache
def host_mesh() -> Mesh:
    """A one-device mesh on the CPU backend: where `loads_via_host` DiTs and `text_encoder.device=cpu` live."""
    return make_mesh(MeshConfig(fsdp=1), jax.devices("cpu")[:1])


def quantize_fp8(kernel: Array) -> tuple[Array, Array]:
    """kernel [..., in, out] -> (float8_e4m3fn kernel [..., in, out], fp32 scale [..., out]).

    Per output channel o: scale = max_i |W[i, o]| / 448 (1 for an all-zero channel) and q = W / scale rounded
    to nearest e4m3, so the largest magnitude of each channel maps to e4m3's largest finite value. W ~= q x scale
    with a relative error of at most 2^-4 per element (3 mantissa bits; subnormals below 2^-6 x scale excepted).
    """
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2)  # [..., out]
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (w / scale[..., None, :]).astype(FP8), scale


def quantize_dit(params: dict[str, Any], rt: DiTRuntime) -> dict[str, Any]:
    """The DiT params (stored tree, `rt.plain()`) with the kernel of every block layer `rt.fp8_layers` names
    quantized and its `scale` added beside it; unchanged without `weights_dtype=fp8`. Traceable."""
    if rt.weights_dtype != "fp8":
        return params
    names = FP8_LAYERS[rt.fp8_layers]

    def visit(tree: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, sub in tree.items():
            if key in names and isinstance(sub, dict) and "kernel" in sub:
                kernel, scale = quantize_fp8(sub["kernel"])
                out[key] = {**sub, "kernel": kernel, "scale": scale}
            else:
                out[key] = visit(sub) if isinstance(sub, dict) else sub
        return out

    return {**params, "blocks": visit(params["blocks"])}


def dit_shardings(cfg: DiTConfig, rt: DiTRuntime, mesh: Mesh) -> Any:
    """The NamedShardings of the DiT params of `cfg` run with `rt` on `mesh` (scales included), the blocks' in
    `pinned_host` memory with `offload=blocks`."""
    boxed = init_fn(cfg, dataclasses.replace(rt, offload="none"))
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params(boxed, mesh, jax.random.key(0)))
    if rt.offload == "blocks":
        shardings["blocks"] = jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings["blocks"])
    return shardings


def place_dit(params: dict[str, Any], cfg: DiTConfig, rt: DiTRuntime, mesh: Mesh) -> dict[str, Any]:
    """The stored DiT params (on `host_mesh()`, or uncommitted) quantized on the host (`quantize_dit`), then put
    on `mesh` in the shardings and memory kinds of `dit_shardings`."""
    if rt.weights_dtype == "fp8":
        with jax.set_mesh(host_mesh()):
            params = jax.jit(quantize_dit, static_argnums=1)(params, rt)
    return jax.device_put(params, dit_shardings(cfg, rt, mesh))


def abstract_dit(cfg: DiTConfig, rt: DiTRuntime, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of the DiT params `place_dit` makes (dtypes, shardings, memory kinds), allocating nothing."""
    stored = abstract_params(init_fn(cfg, rt.plain()), mesh, jax.random.key(0))
    shapes = jax.eval_shape(functools.partial(quantize_dit, rt=rt), stored)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, dit_shardings(cfg, rt, mesh))


def bytes_by_memory_kind(tree: Any) -> dict[str, int]:
    """Bytes one device holds of a tree's arrays (or ShapeDtypeStructs), per memory kind of their shardings (no
    sharding: a whole array in device memory)."""
    out: dict[str, int] = {}
    for a in jax.tree.leaves(tree):
        kind = (a.sharding.memory_kind if a.sharding else None) or "device"
        shard = a.sharding.shard_shape(a.shape) if a.sharding else a.shape
        out[kind] = out.get(kind, 0) + jnp.dtype(a.dtype).itemsize * math.prod(shard)
    return out
