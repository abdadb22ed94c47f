"""The Wan2.1 DiT (T2V and I2V) in Flax Linen, open to extra context tokens.

Layout is channels-last: latents [B, F, H, W, C]. Tokens are (f, h, w) row-major. The sequence can
be extended with already-embedded context tokens (OneStory's memory), which carry their own RoPE
tables and their own timestep: modulation is computed per *group* (group 0 = noise tokens at t,
group 1 = context tokens, typically at t = 0) and context tokens are sliced off before the head.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from onestory_jax.config import FP8_LAYERS, DiTConfig, DiTRuntime
from onestory_jax.models.layers import (
    DTYPES,
    Dense,
    LayerNorm,
    RMSNorm,
    apply_rope,
    attention,
    constrain,
    grid_positions,
    on_device,
    partitioned,
    remat_policy,
    rope_tables,
    timestep_sinusoid,
    ulysses_attention,
)
from onestory_jax.models.sequence_parallel import sequence_shards
from onestory_jax.sharding import HEADS, KV_HEADS, TOKENS

Array = jax.Array
ATTN_OUT = ("act_batch", "act_length", "act_heads")  # before the output projection


@flax.struct.dataclass
class ContextTokens:
    """Embedded tokens appended after the noise tokens in self-attention.

    tokens: [B, Lc, D]; cos, sin: RoPE tables [B, Lc, head_dim // 2]; timestep: [B] (0 = clean);
    mask: [B, Lc] (False = empty slot, hidden from attention) or None. Valid tokens come first (the
    mask is a prefix: the conditioner emits frames in rank order, filled slots first), so attention
    hides the empty ones by key length, which cuDNN flash attention supports.
    """

    tokens: Array
    cos: Array
    sin: Array
    timestep: Array
    mask: Array | None = None


def _modulation(table: Array, e: Array, is_context: Array | None) -> list[Array]:
    """Per-token modulation vectors.

    table [K, D] + e [B, G, K, D] -> K arrays, each [B, 1, D] (one group: the noise tokens) or [B, L, D]: group 1's
    vector where is_context [L] (the context tokens), else group 0's. A select of two broadcasts, which XLA fuses
    into the norms that read it: no [B, L, D] table is written per vector (docs/performance.md, "The exact step").
    """
    m = table[None, None].astype(jnp.float32) + e  # [B, G, K, D]
    if is_context is None:
        return [m[:, 0, k][:, None, :] for k in range(m.shape[2])]
    where = is_context[None, :, None]  # [1, L, 1]
    return [jnp.where(where, m[:, 1, k][:, None, :], m[:, 0, k][:, None, :]) for k in range(m.shape[2])]


def block_dense(cfg: DiTConfig, rt: DiTRuntime, features: int, axes: tuple[str, str], name: str) -> Dense:
    """A block's linear layer `name`, with the config's LoRA when `name` is one of its targets, and its kernel
    in fp8 when `dit_runtime.weights_dtype=fp8` names it (`dit_runtime.fp8_layers`)."""
    rank = cfg.lora_rank if name in cfg.lora_targets else 0
    fp8 = rt.weights_dtype == "fp8" and name in FP8_LAYERS[rt.fp8_layers]
    return Dense(
        features,
        axes,
        dtype=DTYPES[rt.dtype],
        param_dtype=DTYPES[rt.param_dtype],
        lora_rank=rank,
        lora_alpha=cfg.lora_alpha,
        fp8=fp8,
        name=name,
    )


class SelfAttention(nn.Module):
    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, kv_lengths: Array | None) -> Array:
        cfg, rt, pdt = self.cfg, self.rt, DTYPES[self.rt.param_dtype]
        proj = lambda name: block_dense(cfg, rt, cfg.dim, ("embed", "heads"), name)
        q = RMSNorm(cfg.eps, "heads", pdt, name="norm_q")(proj("q")(x))
        k = RMSNorm(cfg.eps, "heads", pdt, name="norm_k")(proj("k")(x))
        v = proj("v")(x)
        split = lambda a: rearrange(a, "b l (n h) -> b l n h", n=cfg.num_heads)
        ulysses = rt.sequence_parallel == "ulysses" and sequence_shards() > 1
        kv_axes = HEADS if ulysses else KV_HEADS  # Ulysses: keys stay sequence-sharded until its all-to-all
        q = constrain(apply_rope(split(q), cos, sin), HEADS)
        k = constrain(apply_rope(split(k), cos, sin), kv_axes)
        v = constrain(split(v), kv_axes)
        out = (ulysses_attention if ulysses else attention)(q, k, v, rt.attention, kv_lengths=kv_lengths)
        out = constrain(rearrange(out, "b l n h -> b l (n h)"), ATTN_OUT)
        return block_dense(cfg, rt, cfg.dim, ("heads", "embed"), "o")(out)


class CrossAttention(nn.Module):
    """Attention to text tokens and (I2V) CLIP image tokens, sharing one normalised query."""

    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(self, x: Array, text: Array, image: Array | None) -> Array:
        cfg, rt, pdt = self.cfg, self.rt, DTYPES[self.rt.param_dtype]
        proj = lambda name: block_dense(cfg, rt, cfg.dim, ("embed", "heads"), name)
        norm = lambda name: RMSNorm(cfg.eps, "heads", pdt, name=name)
        split = lambda a: rearrange(a, "b l (n h) -> b l n h", n=cfg.num_heads)
        q = constrain(split(norm("norm_q")(proj("q")(x))), HEADS)
        k = split(norm("norm_k")(proj("k")(text)))
        out = attention(q, k, split(proj("v")(text)), rt.attention)
        if cfg.has_image_branch:
            k_img = split(norm("norm_k_img")(proj("k_img")(image)))
            out = out + attention(q, k_img, split(proj("v_img")(image)), rt.attention)
        out = constrain(rearrange(out, "b l n h -> b l (n h)"), ATTN_OUT)
        return block_dense(cfg, rt, cfg.dim, ("heads", "embed"), "o")(out)


class FeedForward(nn.Module):
    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, rt = self.cfg, self.rt
        h = block_dense(cfg, rt, cfg.ffn_dim, ("embed", "mlp"), "fc1")(x)
        h = constrain(nn.gelu(h, approximate=True), ("act_batch", "act_length", "act_mlp"))
        return block_dense(cfg, rt, cfg.dim, ("mlp", "embed"), "fc2")(h)


class Block(nn.Module):
    """One Wan block: modulated self-attention, cross-attention, modulated FFN (fp32 residuals)."""

    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(
        self,
        x: Array,
        e0: Array,
        is_context: Array | None,
        cos: Array,
        sin: Array,
        kv_lengths: Array | None,
        text: Array,
        image: Array | None,
    ) -> tuple[Array, None]:
        cfg, rt, dt, pdt = self.cfg, self.rt, DTYPES[self.rt.dtype], DTYPES[self.rt.param_dtype]
        table = self.param(
            "modulation",
            partitioned(lambda k, s, d: jax.random.normal(k, s, d) / math.sqrt(cfg.dim), ("modulation", "embed")),
            (6, cfg.dim),
            pdt,
        )
        shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(table, e0, is_context)
        norm = LayerNorm(cfg.eps, affine=False)  # parameter-free, shared
        h = norm(x) * (1 + scale1) + shift1
        x = x + SelfAttention(cfg, rt, name="self_attn")(h.astype(dt), cos, sin, kv_lengths).astype(jnp.float32) * gate1
        c = LayerNorm(cfg.eps, affine=True, param_dtype=pdt, name="norm_cross")(x)
        x = x + CrossAttention(cfg, rt, name="cross_attn")(c.astype(dt), text, image).astype(jnp.float32)
        f = norm(x) * (1 + scale2) + shift2
        x = x + FeedForward(cfg, rt, name="ffn")(f.astype(dt)).astype(jnp.float32) * gate2
        return constrain(x, TOKENS), None


class TimeEmbedding(nn.Module):
    """t -> (temb [..., D] for the head, e0 [..., 6, D] for the blocks), all fp32."""

    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(self, t: Array) -> tuple[Array, Array]:
        cfg, pdt = self.cfg, DTYPES[self.rt.param_dtype]
        s = timestep_sinusoid(t, cfg.freq_dim)
        temb = Dense(cfg.dim, ("in_features", "embed"), param_dtype=pdt, name="linear_1")(s)
        temb = Dense(cfg.dim, ("embed", "mlp"), param_dtype=pdt, name="linear_2")(nn.silu(temb))
        e0 = Dense(6 * cfg.dim, ("embed", "mlp"), param_dtype=pdt, name="projection")(nn.silu(temb))
        return temb, e0.reshape(*e0.shape[:-1], 6, cfg.dim)


class TextEmbedding(nn.Module):
    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(self, text: Array) -> Array:
        cfg, dt, pdt = self.cfg, DTYPES[self.rt.dtype], DTYPES[self.rt.param_dtype]
        h = Dense(cfg.dim, ("in_features", "embed"), dtype=dt, param_dtype=pdt, name="linear_1")(text)
        return Dense(cfg.dim, ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="linear_2")(nn.gelu(h, approximate=True))


class ImageEmbedding(nn.Module):
    """CLIP tokens -> D: LayerNorm, Linear, GELU (erf), Linear, LayerNorm (eps 1e-5)."""

    cfg: DiTConfig
    rt: DiTRuntime

    @nn.compact
    def __call__(self, image: Array) -> Array:
        cfg, dt, pdt = self.cfg, DTYPES[self.rt.dtype], DTYPES[self.rt.param_dtype]
        h = LayerNorm(1e-5, affine=True, param_dtype=pdt, name="norm1")(image)
        h = Dense(image.shape[-1], ("in_features", "embed"), dtype=dt, param_dtype=pdt, name="linear_1")(h)
        h = Dense(cfg.dim, ("in_features", "embed"), dtype=dt, param_dtype=pdt, name="linear_2")(nn.gelu(h, approximate=False))
        return LayerNorm(1e-5, affine=True, param_dtype=pdt, name="norm2")(h).astype(dt)


class WanDiT(nn.Module):
    """Wan2.1 DiT: velocity prediction for channels-last latents.

    x [B, F, H, W, in_dim], t [B] (0..1000), text [B, Lt, text_dim], image [B, Li, image_dim]
    (I2V only), context: optional extra tokens -> [B, F, H, W, out_dim]. `config` is the architecture,
    `runtime` how it computes (dtypes, attention kernel, remat, sequence parallelism) and stores its weights.
    """

    config: DiTConfig
    runtime: DiTRuntime

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        text: Array,
        image: Array | None = None,
        context: ContextTokens | None = None,
    ) -> Array:
        cfg, rt = self.config, self.runtime
        dt, pdt = DTYPES[rt.dtype], DTYPES[rt.param_dtype]
        if cfg.has_image_branch and image is None:
            raise ValueError("an I2V DiT needs CLIP image tokens (image=...)")
        b = x.shape[0]
        pt, ph, pw = cfg.patch_size
        tokens = self.patch_embed(x.astype(dt))  # [B, F', H', W', D]
        grid = tokens.shape[1:4]
        tokens = constrain(rearrange(tokens, "b f h w d -> b (f h w) d").astype(jnp.float32), TOKENS)
        n_noise = tokens.shape[1]
        cos, sin = rope_tables(grid_positions(*grid), cfg.head_dim, cfg.rope_theta)

        time_embedding = TimeEmbedding(cfg, rt, name="time_embedding")
        temb, e0 = time_embedding(t)  # [B, D], [B, 6, D]
        e0, is_context, kv_lengths = e0[:, None], None, None
        if context is not None:
            _, e0_ctx = time_embedding(context.timestep)
            e0 = jnp.concatenate([e0, e0_ctx[:, None]], axis=1)  # [B, 2, 6, D]
            n_ctx = context.tokens.shape[1]
            is_context = jnp.asarray(np.arange(n_noise + n_ctx) >= n_noise)  # [L]: group 1
            tokens = constrain(jnp.concatenate([tokens, context.tokens.astype(jnp.float32)], axis=1), TOKENS)
            cos, sin = (
                jnp.concatenate([jnp.broadcast_to(a, (b, *a.shape)), c], axis=1)
                for a, c in ((cos, context.cos), (sin, context.sin))
            )
            if context.mask is not None:  # keys: the noise tokens, then the valid (prefix) context tokens
                kv_lengths = n_noise + context.mask.sum(axis=1, dtype=jnp.int32)

        context_axes = ("act_batch", None, "act_embed")
        text_emb = constrain(TextEmbedding(cfg, rt, name="text_embedding")(text), context_axes)
        image_emb = (
            constrain(ImageEmbedding(cfg, rt, name="image_embedding")(image), context_axes) if cfg.has_image_branch else None
        )

        block = Block
        if rt.offload == "blocks":  # each layer's params, sliced from the host-resident stack, moved to the device
            block = nn.map_variables(Block, "params", trans_in_fn=on_device, init=True)
        policy = remat_policy(rt.remat_policy)
        if rt.remat_policy != "none":
            block = nn.remat(block, policy=policy, prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 7,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, rt, name="blocks")
        h, _ = blocks(tokens, e0, is_context, cos, sin, kv_lengths, text_emb, image_emb)
        h = h[:, :n_noise]

        # Head: modulated by the time embedding (pre-SiLU), fp32.
        table = self.param(
            "head_modulation",
            partitioned(lambda k, s, d: jax.random.normal(k, s, d) / math.sqrt(cfg.dim), ("modulation", "embed")),
            (2, cfg.dim),
            pdt,
        )
        shift, scale = (table[None].astype(jnp.float32) + temb[:, None]).transpose(1, 0, 2)[:, :, None]
        h = LayerNorm(cfg.eps, affine=False)(h) * (1 + scale) + shift
        out = Dense(pt * ph * pw * cfg.out_dim, ("embed", "out_features"), param_dtype=pdt, name="head")(h)
        return unpatchify(out, grid, cfg.patch_size, cfg.out_dim)

    def patch_embed(self, x: Array) -> Array:
        """Conv3d with kernel = stride = patch size: [B, F, H, W, C] -> [B, F', H', W', D]."""
        cfg, rt = self.config, self.runtime
        return nn.Conv(
            cfg.dim,
            kernel_size=cfg.patch_size,
            strides=cfg.patch_size,
            padding="VALID",
            dtype=DTYPES[rt.dtype],
            param_dtype=DTYPES[rt.param_dtype],
            kernel_init=partitioned(
                nn.initializers.xavier_uniform(), ("kernel_t", "kernel_h", "kernel_w", "in_features", "embed")
            ),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(x)


def unpatchify(tokens: Array, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> Array:
    """[B, F'*H'*W', pt*ph*pw*C] (c fastest) -> [B, F'*pt, H'*ph, W'*pw, C]."""
    (f, h, w), (pt, ph, pw) = grid, patch
    return rearrange(tokens, "b (f h w) (pt ph pw c) -> b (f pt) (h ph) (w pw) c", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw, c=channels)


def init_inputs(
    cfg: DiTConfig,
    batch: int = 1,
    latent_shape: tuple[int, int, int] = (1, 4, 4),
    text_len: int | None = None,
    image_len: int = 257,
) -> dict[str, Any]:
    """Zero-valued example inputs of the right shapes (for init and shape inference)."""
    f, h, w = latent_shape
    inputs: dict[str, Any] = {
        "x": jnp.zeros((batch, f, h, w, cfg.in_dim), jnp.float32),
        "t": jnp.zeros((batch,), jnp.float32),
        "text": jnp.zeros((batch, text_len or cfg.text_len, cfg.text_dim), jnp.float32),
        "image": jnp.zeros((batch, image_len, cfg.image_dim), jnp.float32) if cfg.has_image_branch else None,
    }
    return inputs


def init_fn(cfg: DiTConfig, runtime: DiTRuntime) -> Any:
    """A function rng -> boxed params (of `runtime`'s param dtype and storage), for `sharding.init_sharded` /
    `abstract_params`."""
    model = WanDiT(cfg, runtime)
    example = init_inputs(cfg, text_len=8, image_len=4)

    def fn(rng: Array) -> Any:
        return model.init(rng, **example)["params"]

    return fn
