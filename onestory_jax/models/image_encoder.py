"""The CLIP vision tower Wan I2V conditions on (ViT-H/14), and its image preprocessing.

Features are the hidden states after all but the last block (no post-norm, no projection): the
equivalent of HF `CLIPVisionModel(...).hidden_states[-2]`, [B, 257, 1280] at 224 px. The last
block is therefore not part of the param tree.

Preprocessing follows diffusers' `CLIPImageProcessor`: bicubic resize of the short side to 224
(antialiased when shrinking), centre crop to 224 x 224, OpenAI CLIP mean/std. The original Wan code
squashes the whole image to 224 x 224 instead; the two agree for square inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from onestory_jax.config import ImageEncoderConfig
from onestory_jax.errors import UserError
from onestory_jax.models.layers import DTYPES, Dense, LayerNorm, attention, constrain, partitioned
from onestory_jax.sharding import HEADS, KV_HEADS, TOKENS

Array = jax.Array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_IMAGE_SIDE = 32  # px on the short side; smaller images carry too little to upsample to 224


class SelfAttention(nn.Module):
    cfg: ImageEncoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        b, length, d = x.shape
        proj = lambda name, axes: Dense(d, axes, dtype=dt, param_dtype=pdt, name=name)
        split = lambda a: rearrange(a, "b l (n h) -> b l n h", n=cfg.num_heads)
        q = constrain(split(proj("q", ("embed", "heads"))(x)), HEADS)
        k = constrain(split(proj("k", ("embed", "heads"))(x)), KV_HEADS)
        v = constrain(split(proj("v", ("embed", "heads"))(x)), KV_HEADS)
        return proj("o", ("heads", "embed"))(rearrange(attention(q, k, v), "b l n h -> b l (n h)"))


class Block(nn.Module):
    """Pre-norm CLIP encoder layer: attention and a GELU MLP (exact, or CLIP's quick GELU), fp32 residuals."""

    cfg: ImageEncoderConfig

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, None]:
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        norm = lambda name: LayerNorm(cfg.eps, affine=True, param_dtype=pdt, name=name)
        x = x + SelfAttention(cfg, name="attn")(norm("norm1")(x)).astype(jnp.float32)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="fc1")(norm("norm2")(x))
        h = nn.gelu(h, approximate=False) if cfg.activation == "gelu" else h * jax.nn.sigmoid(1.702 * h)  # quick GELU
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        x = x + Dense(cfg.hidden_size, ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="fc2")(h).astype(jnp.float32)
        return constrain(x, TOKENS), None


class CLIPVisionTower(nn.Module):
    """pixels [B, S, S, 3] (CLIP-normalised) -> penultimate-block tokens [B, (S/p)^2 + 1, D] fp32."""

    config: ImageEncoderConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg, dt, pdt = self.config, DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        b, size, d = pixels.shape[0], cfg.image_size, cfg.hidden_size
        if pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"CLIP pixels must be [B, {size}, {size}, 3], got {pixels.shape}")
        x = nn.Conv(
            d,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dt,
            param_dtype=pdt,
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("kernel_h", "kernel_w", "in_features", "embed")),
            name="patch_embedding",
        )(pixels.astype(dt))
        x = rearrange(x, "b h w d -> b (h w) d").astype(jnp.float32)  # [B, (S/p)^2, D]
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embedding", partitioned(init, ("embed",)), (d,), pdt)
        pos = self.param("position_embedding", partitioned(init, (None, "embed")), (cfg.num_tokens, d), pdt)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (b, 1, d)), x], axis=1) + pos.astype(jnp.float32)
        x = constrain(LayerNorm(cfg.eps, affine=True, param_dtype=pdt, name="pre_norm")(x), TOKENS)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=cfg.num_layers - 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        x, _ = blocks(x)
        return x


def init_fn(cfg: ImageEncoderConfig) -> Callable[[Array], Any]:
    """A function rng -> boxed params, for `sharding.init_sharded` / `abstract_params`."""
    model = CLIPVisionTower(cfg)
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)

    def fn(rng: Array) -> Any:
        return model.init(rng, pixels)["params"]

    return fn


def preprocess(image: np.ndarray | Array, cfg: ImageEncoderConfig) -> Array:
    """[..., H, W, 3], uint8 or float in [-1, 1] -> CLIP pixels [..., S, S, 3] fp32.

    Resize (bicubic) so the short side is S = cfg.image_size, centre crop S x S, normalise.
    """
    if image.ndim < 3 or image.shape[-1] != 3:
        raise UserError(f"the image must be RGB [H, W, 3], got shape {tuple(image.shape)}")
    h, w = image.shape[-3:-1]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise UserError(f"the image is too small ({w}x{h}); the short side needs >= {MIN_IMAGE_SIDE} px")
    x = jnp.asarray(image, jnp.float32)
    x = x / 255.0 if image.dtype == np.uint8 else x * 0.5 + 0.5  # -> [0, 1]
    size = cfg.image_size
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = jax.image.resize(x, (*x.shape[:-3], nh, nw, 3), "bicubic", antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size, :]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
