"""Shared layers: partitioned Dense, fp32 norms, the attention dispatcher, 3D RoPE, timestep sinusoid."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from onestory_jax.models import sequence_parallel
from onestory_jax.models.splash import splash_attention

Array = jax.Array
AxisNames = tuple[str | None, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def partitioned(init: Any, axes: AxisNames) -> Any:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def constrain(x: Array, axes: AxisNames) -> Array:
    """Constrain an activation's sharding by logical names (a no-op outside a mesh or inside `shard_map`)."""
    if jax.sharding.get_abstract_mesh().manual_axes:
        return x
    return nn.with_logical_constraint(x, axes)


def dequantize(kernel: Array, scale: Array, dtype: Any) -> Array:
    """An fp8 kernel [..., in, out] times its per-output-channel scale [..., out], in `dtype` (the product in fp32,
    rounded once): the weight a quantized `Dense` multiplies by (`models/lowvram.py: quantize_fp8`)."""
    return (kernel.astype(jnp.float32) * scale[..., None, :].astype(jnp.float32)).astype(dtype)


class Dense(nn.Module):
    """Linear layer `y = x W + b` with logical axes (in_axis, out_axis) on W; with `lora_rank` r > 0, plus
    the LoRA term (lora_alpha / r) x A B, A [in, r] (Kaiming-uniform) and B [r, out] (zeros: the layer
    starts as its base). With `fp8`, W = kernel x scale: a `scale` [out] (fp32) beside the kernel, which
    holds float8_e4m3fn values once `models/lowvram.py: quantize_dit` has quantized it (initialised: ones)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 1.0
    fp8: bool = False
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            partitioned(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        if self.fp8:
            scale = self.param("scale", partitioned(nn.initializers.ones, self.axes[1:]), (self.features,), jnp.float32)
            # Tied to x by a barrier: XLA cannot hoist the (loop-invariant) dequantization out of the layer and step
            # loops, which would hold the whole stack dequantized; one layer's kernel, right before its matmul.
            kernel, scale, x = jax.lax.optimization_barrier((kernel, scale, x))
            kernel = dequantize(kernel, scale, self.dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.lora_rank:
            kaiming = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PEFT's A init
            a = self.param(
                "lora_a", partitioned(kaiming, (self.axes[0], "lora")), (x.shape[-1], self.lora_rank), self.param_dtype
            )
            b = self.param(
                "lora_b",
                partitioned(nn.initializers.zeros, ("lora", self.axes[1])),
                (self.lora_rank, self.features),
                self.param_dtype,
            )
            low = jnp.dot(x.astype(self.dtype), a.astype(self.dtype))
            y = y + jnp.dot(low, b.astype(self.dtype)) * (self.lora_alpha / self.lora_rank)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def on_device(tree: Any) -> Any:
    """Every array of `tree` moved to device memory (traced: a transfer from host memory where it lives there,
    as the blocks' params of `dit_runtime.offload=blocks`; lowered only for GPU and TPU, a no-op on the CPU backend)."""
    return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), tree)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in fp32, then cast back and scaled."""

    eps: float = 1e-6
    axis_name: str | None = "norm"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in fp32 (exact variance), optionally affine; returns fp32."""

    eps: float = 1e-6
    affine: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            d = x.shape[-1]
            scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (d,), self.param_dtype)
            bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y


AttentionImpl = Literal["xla", "cudnn", "splash", "chunked", "auto"]
# `auto` lets XLA build full [B, N, Lq, Lk] fp32 logits only up to this many bytes; above it, a flash
# kernel (cuDNN on GPU, splash on TPU) or the chunked path. 34k-token self-attention would need 175 GiB a sample.
XLA_LOGITS_LIMIT = 2 * 1024**3
CHUNK_QUERIES = 256  # queries per chunk of the `chunked` implementation (times the sequence shards)


def resolve_attention(
    implementation: AttentionImpl, q: Array, k: Array, kv_mask: Array | None = None, bias: Array | None = None
) -> str:
    """The concrete implementation `attention` runs: `auto` picks splash on a TPU (no bias), cuDNN flash
    on a GPU for bf16/fp16 inputs (no bias, no general mask), else XLA while its logits fit
    XLA_LOGITS_LIMIT, else `chunked`."""
    if implementation == "cudnn" and (kv_mask is not None or bias is not None):
        raise ValueError("cuDNN flash attention takes no general mask or bias: pass kv_lengths (valid keys first)")
    if implementation == "splash" and bias is not None:
        raise ValueError("splash attention takes no logit bias (use xla or chunked)")
    if implementation != "auto":
        return implementation
    if jax.default_backend() == "tpu" and bias is None:
        return "splash"
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and kv_mask is None and bias is None:
        return "cudnn"
    logits = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * 4
    return "xla" if logits <= XLA_LOGITS_LIMIT else "chunked"


def attention(
    q: Array,
    k: Array,
    v: Array,
    implementation: AttentionImpl = "xla",
    kv_mask: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    kv_lengths: Array | None = None,
) -> Array:
    """Softmax attention, [B, Lq, N, H] x [B, Lk, N, H] -> [B, Lq, N, H], scale 1/sqrt(H) by default.

    Implementations: `xla` (portable reference; builds [B, N, Lq, Lk] logits), `cudnn` (fused flash
    kernel on NVIDIA GPUs, bf16/fp16), `splash` (Pallas TPU flash kernel, `models/splash.py`; per
    device under `shard_map` in a mesh; Pallas interpret mode off TPU, for tests), `chunked` (queries
    in rematerialised chunks: one chunk's logits at a time, forward and backward; for backends without
    a fused kernel), `auto` (`resolve_attention`).
    kv_lengths [B] int32: only the first kv_lengths[b] keys are attended (valid keys form a prefix,
    e.g. noise tokens then the filled memory slots); every implementation, cuDNN flash included.
    kv_mask [B, Lk] (True = attend): a general key mask (xla / splash / chunked).
    bias [B or 1, N, Lq, Lk] is added to the logits (T5 relative positions); scale overrides 1/sqrt(H).
    """
    impl = resolve_attention(implementation, q, k, kv_mask, bias)
    if impl == "splash":
        return sequence_parallel.per_device(partial(splash_attention, scale=scale), q, k, v, kv_mask, kv_lengths)
    if impl == "chunked":
        return chunked_attention(q, k, v, kv_mask, bias, scale, kv_lengths)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    bias = None if bias is None else bias.astype(q.dtype)
    lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl, key_value_seq_lengths=lengths
    )


def ulysses_attention(
    q: Array,
    k: Array,
    v: Array,
    implementation: AttentionImpl = "xla",
    kv_lengths: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Self-attention with Ulysses sequence parallelism over the mesh's `sequence` axis
    (`models/sequence_parallel.py: ulysses`); inside, `attention` with `implementation` on whole
    sequences and N / sequence heads. Without a sequence axis > 1 it is `attention`."""
    inner = lambda q, k, v, mask, lengths: attention(q, k, v, implementation, mask, None, scale, lengths)
    return sequence_parallel.ulysses(inner, q, k, v, None, kv_lengths)


def chunked_attention(
    q: Array,
    k: Array,
    v: Array,
    kv_mask: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    kv_lengths: Array | None = None,
    block: int | None = None,
) -> Array:
    """XLA attention over query chunks, one rematerialised chunk at a time (`lax.map` + checkpoint).

    q [B, L, N, H] is viewed as [B, A, C, N, H] (position = a*C + c) and the map runs over c, so each
    chunk holds A = block x sequence-shards queries spread along L (it stays sharded like L). Only one
    chunk's [B, N, A, Lk] logits live at once: memory O(A Lk) instead of O(L Lk). `block` defaults to
    CHUNK_QUERIES, read at each call.
    """
    b, length, n, h = q.shape
    a = min((block or CHUNK_QUERIES) * sequence_parallel.sequence_shards(), length)
    chunks = -(-length // a)
    qp = jnp.pad(q, ((0, 0), (0, chunks * a - length), (0, 0), (0, 0)))
    qc = rearrange(qp, "b (a c) n h -> c b a n h", c=chunks)
    heads = ("act_batch", "act_length", "act_heads", "act_head_dim")
    bias_c = None
    if bias is not None:  # [B or 1, N, Lq, Lk] -> per chunk [C, B or 1, N, A, Lk]
        bp = jnp.pad(bias, ((0, 0), (0, 0), (0, chunks * a - length), (0, 0)))
        bias_c = rearrange(bp, "b n (a c) k -> c b n a k", c=chunks)

    @jax.checkpoint
    def one(chunk: tuple[Array, Array | None]) -> Array:
        qi, bi = chunk
        return constrain(attention(constrain(qi, heads), k, v, "xla", kv_mask, bi, scale, kv_lengths), heads)

    out = jax.lax.map(one, (qc, bias_c))
    return rearrange(out, "c b a n h -> b (a c) n h")[:, :length]


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding (Wan2.1): head dim split t/h/w, interleaved pairs.


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real sub-dimensions of the head dim given to the t, h and w axes."""
    d6 = head_dim // 6
    return head_dim - 4 * d6, 2 * d6, 2 * d6


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
    """Per-axis angular frequencies omega_j = theta^(-2j/D_a), float64."""
    return tuple(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in rope_axis_dims(head_dim))


def rope_angles(positions: Array | np.ndarray, head_dim: int, theta: float = 10000.0) -> Array | np.ndarray:
    """Angles [..., head_dim // 2] for (t, h, w) positions [..., 3] (positions may be fractional).

    NumPy positions give float64 NumPy angles (exact tables, as the reference builds them);
    traced positions give fp32 JAX angles.
    """
    xp = np if isinstance(positions, np.ndarray) else jnp
    positions = positions.astype(np.float64 if xp is np else jnp.float32)
    parts = [
        positions[..., a : a + 1] * xp.asarray(w, dtype=positions.dtype) for a, w in enumerate(rope_frequencies(head_dim, theta))
    ]
    return xp.concatenate(parts, axis=-1)


def rope_tables(positions: Array | np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[Array, Array]:
    """(cos, sin) tables [..., head_dim // 2] in fp32 for (t, h, w) positions [..., 3]."""
    ang = rope_angles(positions, head_dim, theta)
    xp = np if isinstance(ang, np.ndarray) else jnp
    return jnp.asarray(xp.cos(ang), jnp.float32), jnp.asarray(xp.sin(ang), jnp.float32)


def grid_positions(frames: int, height: int, width: int, frame_offset: int = 0) -> np.ndarray:
    """Integer (f, h, w) positions [frames*height*width, 3] in row-major token order."""
    f, h, w = np.meshgrid(np.arange(frames) + frame_offset, np.arange(height), np.arange(width), indexing="ij")
    return np.stack([f.ravel(), h.ravel(), w.ravel()], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate interleaved channel pairs: x [B, L, N, H], cos/sin [L, H/2] or [B, L, H/2]; in fp32."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c, s = cos[..., None, :], sin[..., None, :]  # broadcast over heads (and batch when 2-D)
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------


def timestep_sinusoid(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding [..., dim] of timesteps t [...] in fp32, cos first."""
    half = dim // 2
    freqs = jnp.asarray(np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half), jnp.float32)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def remat_policy(name: str) -> Any:
    """Named activation-checkpoint policy; None means no remat."""
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    return policies[name]
