"""Shared layers: partitioned Dense, fp32 norms, the attention dispatcher, 3D RoPE, timestep sinusoid."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
AxisNames = tuple[str | None, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def partitioned(init: Any, axes: AxisNames) -> Any:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def constrain(x: Array, axes: AxisNames) -> Array:
    """Constrain an activation's sharding by logical names (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """Linear layer `y = x W + b` with logical axes (in_axis, out_axis) on W."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.xavier_uniform(), self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


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


def attention(
    q: Array,
    k: Array,
    v: Array,
    implementation: Literal["xla", "cudnn", "auto"] = "xla",
    kv_mask: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Softmax attention, [B, Lq, N, H] x [B, Lk, N, H] -> [B, Lq, N, H], scale 1/sqrt(H) by default.

    `xla` is the portable reference, `cudnn` the fused flash kernel on NVIDIA GPUs (bf16/fp16),
    `auto` lets JAX choose. kv_mask [B, Lk] (True = attend) hides keys, e.g. empty memory slots.
    bias [B or 1, N, Lq, Lk] is added to the logits (T5 relative positions); scale overrides 1/sqrt(H).
    """
    impl = None if implementation == "auto" else implementation
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    bias = None if bias is None else bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)


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
    parts = [positions[..., a : a + 1] * xp.asarray(w, dtype=positions.dtype) for a, w in enumerate(rope_frequencies(head_dim, theta))]
    return xp.concatenate(parts, axis=-1)


def rope_tables(positions: Array | np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[Array, Array]:
    """(cos, sin) tables [..., head_dim // 2] in fp32 for (t, h, w) positions [..., 3]."""
    ang = rope_angles(positions, head_dim, theta)
    xp = np if isinstance(ang, np.ndarray) else jnp
    return jnp.asarray(xp.cos(ang), jnp.float32), jnp.asarray(xp.sin(ang), jnp.float32)


def grid_positions(frames: int, height: int, width: int, frame_offset: int = 0) -> np.ndarray:
    """Integer (f, h, w) positions [frames*height*width, 3] in row-major token order."""
    f, h, w = np.meshgrid(
        np.arange(frames) + frame_offset, np.arange(height), np.arange(width), indexing="ij"
    )
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
