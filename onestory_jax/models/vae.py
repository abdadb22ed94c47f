"""Wan2.1 causal 3D VAE (diffusers `AutoencoderKLWan`), channels-last [B, T, H, W, C].

Encode and decode run chunk by chunk over time, as the reference does: the encoder takes the first
frame, then chunks of 4 frames; the decoder takes one latent frame at a time. Every temporal conv
keeps the last frames of its input in the Flax collection `cache` (zeros = the causal zero padding)
and `jax.lax.scan` carries that collection from chunk to chunk, so memory is bounded by one chunk.
The first chunk runs separately: its shapes differ and the temporal resamplers treat it specially
(the 3D downsampler passes it through and caches it; the 3D upsampler passes it through as one
frame and keeps a zero cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.config import VAEConfig
from onestory_jax.errors import UserError
from onestory_jax.models.layers import DTYPES, Dense, attention, constrain, partitioned

Array = jax.Array
ENCODE_CHUNK = 4  # input frames per encoder chunk after the first frame
CONV_AXES = ("kernel_t", "kernel_h", "kernel_w", "in_features", "out_features")
VIDEO = ("act_batch", None, None, None, None)


def conv(
    mdl: nn.Module,
    x: Array,
    features: int,
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    dtype: Any,
) -> Array:
    """Channels-last conv over the last len(kernel) spatial axes of x; params `kernel`, `bias` on mdl.

    Leading axes beyond the batch are folded into it (a 2D kernel on [B, T, H, W, C] runs per frame).
    """
    n = len(kernel)
    w = mdl.param(
        "kernel", partitioned(nn.initializers.lecun_normal(), CONV_AXES[-n - 2 :]), (*kernel, x.shape[-1], features), jnp.float32
    )
    b = mdl.param("bias", partitioned(nn.initializers.zeros, ("out_features",)), (features,), jnp.float32)
    lead = x.shape[: -n - 1]
    spatial = "DHW"[-n:]
    y = jax.lax.conv_general_dilated(
        x.reshape(-1, *x.shape[-n - 1 :]).astype(dtype),
        w.astype(dtype),
        strides,
        padding,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )
    return (y + b.astype(dtype)).reshape(*lead, *y.shape[1:])


class CausalConv3d(nn.Module):
    """Conv3d, zero-padded in space (k//2) and causally in time through a carried frame cache."""

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, H, W, Ci] -> [B, T, H, W, Co]
        kt, kh, kw = self.kernel
        if kt > 1:
            cache = self.variable("cache", "frames", jnp.zeros, (x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.value, x], axis=1)
            cache.value = x[:, -(kt - 1) :]
        pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        return conv(self, x, self.features, self.kernel, (1, 1, 1), pad, self.dtype)


class ChannelRMSNorm(nn.Module):
    """`x / max(||x||_2, 1e-12) * sqrt(C) * scale` over channels, in fp32 (Wan `RMS_norm`, no bias)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        return (x32 / jnp.maximum(norm, 1e-12) * (c**0.5 * scale)).astype(x.dtype)


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt = self.dtype
        h = x if x.shape[-1] == self.features else CausalConv3d(self.features, (1, 1, 1), dt, name="conv_shortcut")(x)
        x = CausalConv3d(self.features, dtype=dt, name="conv1")(nn.silu(ChannelRMSNorm(name="norm1")(x)))
        x = CausalConv3d(self.features, dtype=dt, name="conv2")(nn.silu(ChannelRMSNorm(name="norm2")(x)))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (over its h*w positions), plus identity."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, H, W, C]
        b, t, hh, ww, c = x.shape
        axes = ("in_features", "out_features")
        h = ChannelRMSNorm(name="norm")(x)
        qkv = Dense(3 * c, axes, dtype=self.dtype, name="to_qkv")(h).reshape(b * t, hh * ww, 3, 1, c)
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B*T, L, 1, C]
        return x + Dense(c, axes, dtype=self.dtype, name="proj")(o.reshape(b, t, hh, ww, c))


class MidBlock(nn.Module):
    """ResidualBlock, AttentionBlock, ResidualBlock at constant width."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, dt = x.shape[-1], self.dtype
        x = ResidualBlock(c, dt, name="resnets_0")(x)
        x = AttentionBlock(dt, name="attentions_0")(x)
        return ResidualBlock(c, dt, name="resnets_1")(x)


class FrameConv(nn.Module):
    """3x3 Conv2d applied to every frame."""

    features: int
    stride: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return conv(self, x, self.features, (3, 3), (self.stride,) * 2, self.padding, self.dtype)


class TimeConv(nn.Module):
    """(3,1,1) conv over time without padding (the caller prepends the cached frames)."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return conv(self, x, self.features, (3, 1, 1), (self.stride, 1, 1), ((0, 0), (0, 0), (0, 0)), self.dtype)


class Resample(nn.Module):
    """Spatial x2 down/up-sampling per frame, with an optional temporal x2 step (`*3d` modes).

    downsample3d: spatial step, then a stride-2 (3,1,1) time conv over [last cached frame, chunk];
      the first chunk skips it (passes through and is cached).
    upsample3d: a causal (3,1,1) time conv to 2C channels, interleaved into 2x frames, then the
      spatial step; the first chunk skips it (one frame stays one frame, the cache stays zero).
    """

    mode: Literal["downsample2d", "downsample3d", "upsample2d", "upsample3d"]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, first: bool) -> Array:  # [B, T, H, W, C]
        b, c, dt = x.shape[0], x.shape[-1], self.dtype
        if self.mode == "upsample3d":
            cache = self.variable("cache", "frames", jnp.zeros, (b, 2, *x.shape[2:]), x.dtype)
            if not first:
                t = x.shape[1]
                x = jnp.concatenate([cache.value, x], axis=1)
                cache.value = x[:, -2:]
                y = TimeConv(2 * c, 1, dt, name="time_conv")(x)  # [B, T, H, W, 2C]: (even, odd) frames
                x = y.reshape(b, t, *x.shape[2:4], 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, *x.shape[2:])
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest x2
            x = FrameConv(c // 2, 1, ((1, 1), (1, 1)), dt, name="resample")(x)
        else:
            x = FrameConv(c, 2, ((0, 1), (0, 1)), dt, name="resample")(x)
        if self.mode == "downsample3d":
            cache = self.variable("cache", "frames", jnp.zeros, (b, 1, *x.shape[2:]), x.dtype)
            last = x[:, -1:]
            if not first:
                x = TimeConv(c, 2, dt, name="time_conv")(jnp.concatenate([cache.value, x], axis=1))
            cache.value = last
        return x


class Encoder(nn.Module):
    """[B, T, H, W, 3] -> [B, T', H/sf, W/sf, 2 z] (mean and log-variance before `quant_conv`)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array, first: bool) -> Array:
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        x = CausalConv3d(dims[0], dtype=dt, name="conv_in")(x)
        k = 0  # flat index, as diffusers `down_blocks` and original `downsamples`
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, dt, name=f"down_blocks_{k}")(x)
                k += 1
            if i < len(cfg.temperal_downsample):
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                x = Resample(mode, dt, name=f"down_blocks_{k}")(x, first)
                k += 1
        x = MidBlock(dt, name="mid_block")(x)
        x = nn.silu(ChannelRMSNorm(name="norm_out")(x))
        return CausalConv3d(2 * cfg.z_dim, dtype=dt, name="conv_out")(x)


class UpBlock(nn.Module):
    """`num_resnets` residual blocks, then an optional upsampler (to features // 2 channels)."""

    features: int
    num_resnets: int
    mode: Literal["upsample2d", "upsample3d"] | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, first: bool) -> Array:
        for j in range(self.num_resnets):
            x = ResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x)
        if self.mode is not None:
            x = Resample(self.mode, self.dtype, name="upsamplers_0")(x, first)
        return x


class Decoder(nn.Module):
    """[B, t, h, w, z] -> [B, T, h*sf, w*sf, 3] (unclamped)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array, first: bool) -> Array:
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        mults = cfg.dim_mult[::-1]
        upsample_t = cfg.temperal_downsample[::-1]
        x = CausalConv3d(cfg.base_dim * mults[0], dtype=dt, name="conv_in")(x)
        x = MidBlock(dt, name="mid_block")(x)
        for i, m in enumerate(mults):
            mode = None
            if i < len(upsample_t):
                mode = "upsample3d" if upsample_t[i] else "upsample2d"
            x = UpBlock(cfg.base_dim * m, cfg.num_res_blocks + 1, mode, dt, name=f"up_blocks_{i}")(x, first)
        x = nn.silu(ChannelRMSNorm(name="norm_out")(x))
        return CausalConv3d(3, dtype=dt, name="conv_out")(x)


class WanVAE(nn.Module):
    """Encoder + quant_conv, post_quant_conv + decoder; the chunk functions run one time chunk."""

    cfg: VAEConfig

    def setup(self) -> None:
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), dt)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), dt)
        self.decoder = Decoder(cfg)

    def encode_chunk(self, video: Array, first: bool) -> Array:
        """[B, 1 or 4, H, W, 3] -> raw latent mean [B, 1 or 4/tf, h, w, z] (fp32)."""
        h = self.quant_conv(self.encoder(constrain(video, VIDEO), first))
        return h[..., : self.cfg.z_dim].astype(jnp.float32)

    def decode_chunk(self, z: Array, first: bool) -> Array:
        """Raw latent [B, 1, h, w, z] -> video [B, 1 (first) or tf, H, W, 3] (fp32, unclamped)."""
        return self.decoder(self.post_quant_conv(constrain(z, VIDEO)), first).astype(jnp.float32)

    def __call__(self, video: Array, z: Array) -> tuple[Array, Array]:
        """Both paths on a non-first chunk: creates every parameter (for init)."""
        return self.encode_chunk(video, False), self.decode_chunk(z, False)


def init_fn(cfg: VAEConfig) -> Any:
    """A function rng -> boxed params (for `sharding.init_sharded` / `jax.eval_shape`)."""
    sf = cfg.spatial_factor
    video = jnp.zeros((1, ENCODE_CHUNK, sf, sf, 3), jnp.float32)
    z = jnp.zeros((1, 1, 1, 1, cfg.z_dim), jnp.float32)

    def fn(rng: Array) -> Any:
        return WanVAE(cfg).init(rng, video, z)["params"]

    return fn


def latent_stats(cfg: VAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of the latents; identity when the config gives none."""
    if not cfg.latents_mean:
        return np.zeros(cfg.z_dim, np.float32), np.ones(cfg.z_dim, np.float32)
    return np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)


def _chunks(cfg: VAEConfig, params: Any, fn: Any, x: Array, size: int) -> Array:
    """Run `fn` on x[:, :1] (first chunk), then scan it over chunks of `size` frames, carrying the cache.

    Returns the outputs concatenated over time.
    """
    model = WanVAE(cfg)
    first, variables = model.apply({"params": params}, x[:, :1], True, method=fn, mutable=["cache"])
    n = (x.shape[1] - 1) // size
    if n == 0:
        return first

    def step(cache: Any, i: Array) -> tuple[Any, Array]:
        chunk = jax.lax.dynamic_slice_in_dim(x, 1 + i * size, size, axis=1)
        out, new = model.apply({"params": params, **cache}, chunk, False, method=fn, mutable=["cache"])
        return new, out

    _, rest = jax.lax.scan(step, variables, jnp.arange(n))  # [n, B, t, ...]
    rest = jnp.moveaxis(rest, 0, 1).reshape(x.shape[0], -1, *rest.shape[3:])
    return jnp.concatenate([first, rest], axis=1)


def encode(cfg: VAEConfig, params: Any, video: Array) -> Array:
    """Video [B, 1+4k, H, W, 3] in [-1, 1] -> normalised latent mean [B, 1+4k/tf, H/sf, W/sf, z].

    Deterministic (the posterior mean), normalised as `(mu - mean) / std`.
    """
    _, t, h, w, c = video.shape
    sf = cfg.spatial_factor
    if (t - 1) % ENCODE_CHUNK:
        k = (t - 1) // ENCODE_CHUNK
        raise UserError(
            f"a video of {t} frames cannot be encoded: frame counts must be 4k+1 "
            f"(1, 5, 9, 13, ...); the nearest are {4 * k + 1} and {4 * k + 5}"
        )
    if c != 3 or h % sf or w % sf:
        raise UserError(f"VAE encode needs [B, 1+4k, H, W, 3] with H, W divisible by {sf}; got {tuple(video.shape)}")
    mu = _chunks(cfg, params, WanVAE.encode_chunk, video.astype(DTYPES[cfg.dtype]), ENCODE_CHUNK)
    mean, std = latent_stats(cfg)
    return (mu - mean) * (1.0 / std)


def decode_raw(cfg: VAEConfig, params: Any, latents: Array) -> Array:
    """Normalised latents [B, t, h, w, z] -> video [B, 1+tf(t-1), h*sf, w*sf, 3], unclamped."""
    if latents.shape[-1] != cfg.z_dim:
        raise UserError(f"VAE decode needs {cfg.z_dim} latent channels; got shape {tuple(latents.shape)}")
    mean, std = latent_stats(cfg)
    z = (latents.astype(jnp.float32) * std + mean).astype(DTYPES[cfg.dtype])
    return _chunks(cfg, params, WanVAE.decode_chunk, z, 1)


def decode(cfg: VAEConfig, params: Any, latents: Array) -> Array:
    """Normalised latents [B, t, h, w, z] -> video [B, 1+tf(t-1), h*sf, w*sf, 3] clamped to [-1, 1]."""
    return jnp.clip(decode_raw(cfg, params, latents), -1.0, 1.0)


def tiled_decode(cfg: VAEConfig, latents: np.ndarray, decode_tile: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`decode` in spatial tiles, as diffusers' `AutoencoderKLWan.tiled_decode`, from the host: latents
    [B, t, h, w, z] (normalised) -> video [B, T, h*sf, w*sf, 3] clamped to [-1, 1].

    Tiles of `cfg.tile` pixels (tile / sf latents) start every 3/4 tile; `decode_tile` (e.g. a jitted
    `decode_raw`: one tile on the device at a time) decodes each over all frames with its own causal
    cache. In row-major order each tile is blended into the (already blended) tile above and the one to
    its left over the overlap (`cfg.tile` - stride pixels) and its top-left stride x stride pixels kept.
    A frame no larger than one tile is decoded whole.
    """
    sf, tile = cfg.spatial_factor, cfg.tile // cfg.spatial_factor
    h, w = latents.shape[2:4]
    if h <= tile and w <= tile:
        return np.clip(decode_tile(latents), -1.0, 1.0)
    stride = tile * 3 // 4
    keep, overlap = stride * sf, cfg.tile - stride * sf
    rows = [
        [np.asarray(decode_tile(latents[:, :, i : i + tile, j : j + tile]), np.float32) for j in range(0, w, stride)]
        for i in range(0, h, stride)
    ]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i:
                row[j] = _blend(rows[i - 1][j], row[j], overlap, axis=2)
            if j:
                row[j] = _blend(row[j - 1], row[j], overlap, axis=3)
    video = np.concatenate([np.concatenate([t[:, :, :keep, :keep] for t in row], axis=3) for row in rows], axis=2)
    return np.clip(video[:, :, : h * sf, : w * sf], -1.0, 1.0)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """b [B, T, H, W, C] with its first `extent` rows (axis 2) or columns (axis 3) faded in from a's last ones:
    b[y] <- a[-extent + y] (1 - y / extent) + b[y] y / extent (diffusers' blend_v, blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    weight = (np.arange(extent, dtype=np.float32) / extent).reshape((-1,) + (1,) * (b.ndim - 1 - axis))
    a_tail = np.take(a, np.arange(a.shape[axis] - extent, a.shape[axis]), axis=axis)
    b_head = np.take(b, np.arange(extent), axis=axis)
    rest = np.take(b, np.arange(extent, b.shape[axis]), axis=axis)
    return np.concatenate([a_tail * (1 - weight) + b_head * weight, rest], axis=axis)
