"""The umT5 text encoder Wan uses (encoder only), its tokenizer front-end, and cached prompt encoding.

umT5 differs from T5 v1.1 in one way that matters here: every layer owns its relative position
bias table. Attention is unscaled (T5 convention), norms are T5 RMSNorms (no mean subtraction), the
FFN is gated GELU (tanh). As in Wan, each prompt's output is zeroed past its tokens (EOS included)
and padded to `text_len` = 512.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from onestory_jax.config import TextEncoderConfig
from onestory_jax.models.layers import DTYPES, Dense, RMSNorm, attention, constrain, partitioned
from onestory_jax.sharding import HEADS, KV_HEADS, TOKENS

Array = jax.Array


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets [Lq, Lk] of the offsets key - query.

    Half the buckets hold the sign; within a half, offsets below num_buckets / 4 are exact and larger
    ones are log-spaced up to max_distance (logs in fp32, truncated, as the reference computes them).
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)
    )
    large = np.minimum(max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64), half - 1)
    return (rel > 0) * half + np.where(dist < max_exact, dist, large)


class SelfAttention(nn.Module):
    """Unscaled multi-head self-attention with this layer's own relative position bias."""

    cfg: TextEncoderConfig

    @nn.compact
    def __call__(self, x: Array, kv_mask: Array) -> Array:
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        b, length, _ = x.shape
        dense = lambda n, axes, name: Dense(n, axes, use_bias=False, dtype=dt, param_dtype=pdt, name=name)
        proj = lambda name: dense(cfg.inner_dim, ("embed", "heads"), name)
        split = lambda a: rearrange(a, "b l (n h) -> b l n h", n=cfg.num_heads)  # [B, L, N, d_kv]
        q = constrain(split(proj("q")(x)), HEADS)
        k = constrain(split(proj("k")(x)), KV_HEADS)
        v = constrain(split(proj("v")(x)), KV_HEADS)
        table = self.param(
            "relative_bias",
            partitioned(nn.initializers.normal(1.0), (None, None)),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            pdt,
        )
        buckets = relative_position_buckets(
            length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )  # static [L, L], a function of the offset k - q only: keep one bucket per offset
        by_offset = jnp.asarray(np.concatenate([buckets[-1, :-1], buckets[0]]), jnp.int32)  # offsets 1-L .. L-1
        offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None] + (length - 1)  # built in the program
        bias = jnp.take(table, jnp.take(by_offset, offsets), axis=0).transpose(2, 0, 1)[None]  # [1, N, Lq, Lk]
        out = attention(q, k, v, "xla", kv_mask, bias=bias, scale=1.0)
        return dense(cfg.d_model, ("heads", "embed"), "o")(rearrange(out, "b l n h -> b l (n h)"))


class GatedFeedForward(nn.Module):
    """fc2(gelu_tanh(gate(x)) * fc1(x))."""

    cfg: TextEncoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        dense = lambda n, axes, name: Dense(n, axes, use_bias=False, dtype=dt, param_dtype=pdt, name=name)
        gate = nn.gelu(dense(cfg.d_ff, ("embed", "mlp"), "gate")(x), approximate=True)
        h = constrain(gate * dense(cfg.d_ff, ("embed", "mlp"), "fc1")(x), ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.d_model, ("mlp", "embed"), "fc2")(h)


class Block(nn.Module):
    """Pre-norm umT5 encoder layer with fp32 residuals."""

    cfg: TextEncoderConfig

    @nn.compact
    def __call__(self, x: Array, kv_mask: Array) -> tuple[Array, None]:
        cfg, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        norm = lambda name: RMSNorm(cfg.eps, param_dtype=pdt, name=name)
        x = x + SelfAttention(cfg, name="attn")(norm("norm1")(x), kv_mask).astype(jnp.float32)
        x = x + GatedFeedForward(cfg, name="ffn")(norm("norm2")(x)).astype(jnp.float32)
        return constrain(x, TOKENS), None


class UMT5Encoder(nn.Module):
    """ids [B, L] (L <= text_len), mask [B, L] (True = token) -> [B, text_len, d_model] fp32.

    Rows where the mask is False, and the padding up to text_len, are zero.
    """

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, ids: Array, mask: Array) -> Array:
        cfg, pdt = self.config, DTYPES[self.config.param_dtype]
        length = ids.shape[1]
        if length > cfg.text_len:
            raise ValueError(f"{length} tokens exceed text_len={cfg.text_len}")
        mask = mask.astype(bool)
        x = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=partitioned(nn.initializers.normal(1.0), (None, "embed")),
            param_dtype=pdt,
            name="token_embedding",
        )(ids)
        x = constrain(x.astype(jnp.float32), TOKENS)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        x, _ = blocks(x, mask)
        x = RMSNorm(cfg.eps, param_dtype=pdt, name="norm")(x)
        x = jnp.where(mask[..., None], x, 0.0)
        return jnp.pad(x, ((0, 0), (0, cfg.text_len - length), (0, 0)))


def init_fn(cfg: TextEncoderConfig) -> Callable[[Array], Any]:
    """A function rng -> boxed params, for `sharding.init_sharded` / `abstract_params`."""
    model = UMT5Encoder(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)

    def fn(rng: Array) -> Any:
        return model.init(rng, ids, jnp.ones(ids.shape, bool))["params"]

    return fn
