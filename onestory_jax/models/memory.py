"""OneStory's memory: Frame Selection (relevance scorer) and the Adaptive Conditioner (patchifiers).

The memory is a fixed-capacity buffer of VAE latent frames [B, F, h, w, C] with a validity mask
[B, F]. The selector scores every frame against the caption; the top-K valid frames, in rank
order, are patchified by patchifiers of decreasing resolution (most relevant = finest) into
context tokens that the DiT appends after its noise tokens.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.config import MemoryConfig
from onestory_jax.models.dit import ContextTokens
from onestory_jax.models.layers import DTYPES, Dense, LayerNorm, attention, constrain, partitioned, rope_tables

Array = jax.Array


def edge_pad(x: Array, multiple: tuple[int, int]) -> Array:
    """Replicate-pad [B, N, h, w, C] at the end of h and w to multiples of `multiple`."""
    ph = -x.shape[2] % multiple[0]
    pw = -x.shape[3] % multiple[1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


def patchify_conv(features: int, kernel: tuple[int, int, int], name: str, dtype: Any = jnp.float32) -> nn.Conv:
    """Conv3d with kernel = stride over [B, N, h, w, C] latent frames (computed in `dtype`, fp32 params)."""
    return nn.Conv(
        features,
        kernel_size=kernel,
        strides=kernel,
        padding="VALID",
        dtype=dtype,
        kernel_init=partitioned(nn.initializers.xavier_uniform(), ("kernel_t", "kernel_h", "kernel_w", "in_features", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class QueryAttention(nn.Module):
    """Pre-LN multi-head cross-attention with a residual: queries [B, m, D] attend to keys [B, L, Dk]."""

    dim: int
    heads: int
    dtype: Any = jnp.float32  # matmul compute dtype; the norm and the residual stay fp32

    @nn.compact
    def __call__(self, q: Array, kv: Array, kv_mask: Array | None = None) -> Array:
        heads = ("act_batch", None, "act_heads", "act_head_dim")
        split = lambda a: constrain(a.reshape(*a.shape[:2], self.heads, self.dim // self.heads), heads)
        h = LayerNorm(1e-6, affine=True, name="norm")(q)
        qq = split(Dense(self.dim, ("embed", "heads"), dtype=self.dtype, name="q")(h))
        # No key bias: it adds one constant to each query's logits, which softmax cancels (zero gradient).
        k = split(Dense(self.dim, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="k")(kv))
        v = split(Dense(self.dim, ("embed", "heads"), dtype=self.dtype, name="v")(kv))
        # Always XLA, whatever dit_runtime.attention says: m queries (16) make logits of m x keys, small at any
        # size, and the valid memory frames need not be a prefix (no kv_lengths for a flash kernel).
        out = attention(qq, k, v, "xla", kv_mask).reshape(*q.shape[:2], self.dim)
        out = constrain(out, ("act_batch", None, "act_heads"))
        o = Dense(self.dim, ("heads", "embed"), dtype=self.dtype, name="o")(out).astype(jnp.float32)
        return constrain(q + o, ("act_batch", None, "act_embed"))


class TokenMLP(nn.Module):
    """Pre-LN residual MLP (D -> 2D -> D, GELU) on each token [..., D]: phi_V's tokens become nonlinear
    features, so a frame's pooled embedding can say what a region holds, not only its mean colour."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = LayerNorm(1e-6, affine=True, name="norm")(x)
        h = nn.gelu(Dense(2 * self.dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h), approximate=True)
        return x + Dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h).astype(jnp.float32)


def caption_summary(text: Any) -> Any:
    """A caption's pooled embedding: the mean of its tokens [..., Lt, D] that are not zero padding -> [..., D].

    numpy or jax arrays alike (the data pipeline and the sampler both call it); an all-zero caption gives zeros.
    """
    used = (abs(text).sum(axis=-1) > 0).sum(axis=-1)[..., None]  # [..., 1]
    return text.sum(axis=-2) / used.clip(1, None)


class FrameSelector(nn.Module):
    """Relevance score per memory frame: S = mean_m phi_P(M1) Q''^T (unnormalised).

    phi_P pools a frame's tokens (memory.selector_pooling: mean, or max for small subjects) and projects.
    caption [B, Lt, text_dim], memory [B, F, h, w, C], valid [B, F] -> scores [B, F]. With
    memory.selector_reads_captions, memory_text [B, F, text_dim] (`caption_summary` of each frame's shot;
    zeros where none is known) is projected by phi_C (zero-initialised: the selector starts as the
    image-only one) and added to every token of its frame.
    """

    cfg: MemoryConfig
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, caption: Array, memory: Array, valid: Array, memory_text: Array | None = None) -> Array:
        cfg, b = self.cfg, memory.shape[0]
        queries = self.param("queries", partitioned(nn.initializers.normal(1.0), ("norm", "embed")), (cfg.num_queries, self.dim))
        seq = ("act_batch", None, "act_embed")  # explicit: GSPMD mis-partitions these when left to infer
        q = constrain(jnp.broadcast_to(queries[None], (b, *queries.shape)), seq)
        text = constrain(Dense(self.dim, ("in_features", "embed"), dtype=self.dtype, name="phi_t")(caption), seq)
        q = QueryAttention(self.dim, cfg.selector_heads, self.dtype, name="text_attn")(q, text)  # Q'
        s = cfg.selector_stride
        m1 = patchify_conv(self.dim, (1, s, s), "phi_v", self.dtype)(edge_pad(memory, (s, s)))  # [B, F, h', w', D]
        if cfg.selector_token_mlp:
            m1 = TokenMLP(self.dim, self.dtype, name="phi_v_mlp")(m1)
        if cfg.selector_reads_captions:
            if memory_text is None:
                raise ValueError("memory.selector_reads_captions: the selector needs memory_text, each frame's shot caption")
            phi_c = Dense(self.dim, ("in_features", "embed"), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="phi_c")
            m1 = m1 + phi_c(memory_text)[:, :, None, None, :].astype(m1.dtype)
        tokens_per_frame = m1.shape[2] * m1.shape[3]
        kv_mask = jnp.repeat(valid, tokens_per_frame, axis=1)  # [B, F*h'*w']
        q = QueryAttention(self.dim, cfg.selector_heads, self.dtype, name="memory_attn")(
            q, m1.reshape(b, -1, self.dim), kv_mask
        )  # Q''
        pooled = m1.max(axis=(2, 3)) if cfg.selector_pooling == "max" else m1.mean(axis=(2, 3))  # [B, F, D]
        frame_emb = Dense(self.dim, ("embed", "mlp"), dtype=self.dtype, name="phi_p")(pooled)  # [B, F, D]
        scores = jnp.einsum("bfd,bmd->bfm", frame_emb.astype(jnp.float32), q) / math.sqrt(self.dim)
        return scores.mean(axis=-1)


def select_top_k(scores: Array, valid: Array, k: int) -> tuple[Array, Array, Array]:
    """Top-k over valid frames only: (indices [B, k], scores [B, k], selected-valid [B, k]).

    Invalid slots are never chosen ahead of a valid one; with fewer than k valid frames the
    remaining picks are marked invalid (also when the memory has fewer than k slots). No gradient
    flows through the selection.
    """
    scores = jax.lax.stop_gradient(scores)
    masked = jnp.where(valid, scores, -jnp.inf)
    n = masked.shape[1]
    if k > n:
        masked = jnp.pad(masked, ((0, 0), (0, k - n)), constant_values=-jnp.inf)
    top, idx = jax.lax.top_k(masked, k)
    ok = jnp.isfinite(top)
    return jnp.minimum(idx, n - 1), jnp.where(ok, top, 0.0), ok


def baseline_candidates(strategy: str, valid: Array, k: int) -> tuple[Array, Array]:
    """(ranking score [S], candidate mask [S]) of a baseline strategy (not onestory).

    recent: the k latest frames, latest first (FramePack-style recency).
    last_frame: only the latest frame.
    uniform: k frames spread evenly over the whole memory, latest first.
    none: nothing.
    """
    slots = jnp.arange(valid.shape[0])
    recency = slots.astype(jnp.float32)  # later slot = more recent = ranked higher
    rank = jnp.cumsum(valid) - 1  # among the valid slots (a prefix, unless some are excluded)
    n = valid.sum()
    if strategy == "recent":
        return recency, valid
    if strategy == "last_frame":
        return recency, valid & (rank == n - 1)
    if strategy == "uniform":
        targets = jnp.round(jnp.linspace(0.0, 1.0, k) * (n - 1).astype(jnp.float32)).astype(rank.dtype)
        chosen = jnp.any(rank[:, None] == targets[None, :], axis=1)
        return recency, valid & chosen
    if strategy == "none":
        return recency, jnp.zeros_like(valid)
    raise ValueError(f"unknown baseline strategy {strategy!r}")


def frames_per_patchifier(cfg: MemoryConfig, latent_hw: tuple[int, int], patch_hw: tuple[int, int] = (2, 2)) -> tuple[int, ...]:
    """Frames assigned to each patchifier so the context fits `budget` latent-frame equivalents.

    Starts from budget x frames_per_patchifier and drops frames from the coarsest non-empty
    patchifier while the token count exceeds budget x (tokens of one noise latent frame).
    """
    limit = cfg.budget * (latent_hw[0] // patch_hw[0]) * (latent_hw[1] // patch_hw[1])
    per_frame = [tokens_per_frame(k, latent_hw) for k in cfg.patchifier_kernels]
    counts = [cfg.budget * n for n in cfg.frames_per_patchifier]
    while sum(c * t for c, t in zip(counts, per_frame)) > limit:
        level = max(i for i, c in enumerate(counts) if c > 0)
        counts[level] -= 1
    return tuple(counts)


def tokens_per_frame(kernel: tuple[int, int, int], latent_hw: tuple[int, int]) -> int:
    """Tokens one latent frame gives under a (1, kh, kw) patchifier after edge padding."""
    return math.ceil(latent_hw[0] / kernel[1]) * math.ceil(latent_hw[1] / kernel[2])


def pooled_grid_positions(
    kernel: tuple[int, int, int], latent_hw: tuple[int, int], patch_hw: tuple[int, int] = (2, 2)
) -> np.ndarray:
    """(h, w) positions [tokens, 2] of a coarse patchifier's tokens on the fine RoPE grid.

    Each token covers (kh/ph) x (kw/pw) fine-grid cells; its position is their mean, with the
    grid edge-replicated where the latent was padded (FramePack style).
    """
    axes = []
    for size, k, p in zip(latent_hw, kernel[1:], patch_hw):
        fine, factor = size // p, k // p
        n = math.ceil(size / k)
        idx = np.minimum(np.arange(n * factor), fine - 1).reshape(n, factor)
        axes.append(idx.mean(axis=1))
    hh, ww = np.meshgrid(*axes, indexing="ij")
    return np.stack([hh.ravel(), ww.ravel()], axis=-1)


def memory_time_positions(frame_order: Array, selected_valid: Array) -> Array:
    """Temporal RoPE index per selected frame: valid frames get -n..-1 in their original order.

    frame_order [B, K]: a key that sorts frames by time (e.g. their memory slot index).
    """
    key = jnp.where(selected_valid, frame_order, jnp.iinfo(jnp.int32).max)
    rank_in_time = jnp.argsort(jnp.argsort(key, axis=1), axis=1)  # 0 = earliest valid
    n_valid = selected_valid.sum(axis=1, keepdims=True)
    return jnp.where(selected_valid, rank_in_time - n_valid, 0)


class AdaptiveConditioner(nn.Module):
    """Patchify rank-ordered frames [B, K, h, w, C] into context tokens [B, Nc, D].

    Frames 0..c0-1 (most relevant) go to the finest patchifier, the next c1 to the next, etc.
    """

    cfg: MemoryConfig
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, frames: Array, frame_time: Array, frame_valid: Array, head_dim: int, rope_theta: float = 10000.0
    ) -> tuple[Array, Array, Array, Array]:
        """-> tokens [B, Nc, D], cos, sin [B, Nc, head_dim/2], mask [B, Nc]."""
        hw = frames.shape[2:4]
        counts = frames_per_patchifier(self.cfg, hw)
        tokens, times, masks, spatial = [], [], [], []
        start = 0
        for level, (kernel, count) in enumerate(zip(self.cfg.patchifier_kernels, counts)):
            sl = slice(start, start + count)
            # Called even when count == 0, so every patchifier has parameters at every size.
            out = patchify_conv(self.dim, kernel, f"patchifier_{level}", self.dtype)(edge_pad(frames[:, sl], kernel[1:]))
            if count == 0:
                continue
            n = out.shape[2] * out.shape[3]
            tokens.append(out.reshape(out.shape[0], -1, self.dim))
            times.append(jnp.repeat(frame_time[:, sl], n, axis=1))
            masks.append(jnp.repeat(frame_valid[:, sl], n, axis=1))
            spatial.append(np.tile(pooled_grid_positions(kernel, hw), (count, 1)))
            start += count
        t = jnp.concatenate(times, axis=1).astype(jnp.float32)  # [B, Nc]
        hw_pos = jnp.asarray(np.concatenate(spatial, axis=0), jnp.float32)  # [Nc, 2]
        pos = jnp.concatenate([t[..., None], jnp.broadcast_to(hw_pos, (*t.shape, 2))], axis=-1)
        cos, sin = rope_tables(pos, head_dim, rope_theta)
        return jnp.concatenate(tokens, axis=1), cos, sin, jnp.concatenate(masks, axis=1)


def num_selected(cfg: MemoryConfig, latent_hw: tuple[int, int]) -> int:
    """K: how many frames the conditioner takes at this latent size."""
    return sum(frames_per_patchifier(cfg, latent_hw))


class OneStoryMemory(nn.Module):
    """Selector + conditioner: memory bank -> (scores, selection, ContextTokens for the DiT)."""

    cfg: MemoryConfig
    dim: int
    head_dim: int
    rope_theta: float = 10000.0
    dtype: str = "float32"  # compute dtype (the DiT's); params and norms stay fp32

    def setup(self) -> None:
        self.selector = FrameSelector(self.cfg, self.dim, DTYPES[self.dtype])
        self.conditioner = AdaptiveConditioner(self.cfg, self.dim, DTYPES[self.dtype])

    def score(self, caption: Array, memory: Array, valid: Array, memory_text: Array | None = None) -> Array:
        return self.selector(caption, memory, valid, memory_text)

    def condition(self, memory: Array, indices: Array, selected_valid: Array) -> ContextTokens:
        """Context tokens for the frames `indices` [B, K] (rank order) of memory [B, F, h, w, C]."""
        frames = jnp.take_along_axis(memory, indices[:, :, None, None, None], axis=1)
        frame_time = memory_time_positions(indices, selected_valid)
        tokens, cos, sin, mask = self.conditioner(frames, frame_time, selected_valid, self.head_dim, self.rope_theta)
        return ContextTokens(tokens=tokens, cos=cos, sin=sin, timestep=jnp.zeros(memory.shape[:1], jnp.float32), mask=mask)

    def __call__(
        self, caption: Array, memory: Array, valid: Array, memory_text: Array | None = None
    ) -> tuple[Array, Array, Array, ContextTokens]:
        """Score, select top-K, patchify: -> (scores [B, F], indices [B, K], selected-valid, context)."""
        scores = self.score(caption, memory, valid, memory_text)
        k = num_selected(self.cfg, memory.shape[2:4])
        indices, _, selected_valid = select_top_k(scores, valid, k)
        return scores, indices, selected_valid, self.condition(memory, indices, selected_valid)


def conditioner_from_patch_embedding(patch_kernel: Array, patch_bias: Array, cfg: MemoryConfig) -> dict[str, Any]:
    """FramePack-style init: each coarse patchifier = average-pool, then the base patch embedding.

    patch_kernel [1, ph, pw, in_dim, D]; only its first `latent_channels` input channels (the
    noise latent) are used. Kernel (1, kh, kw) repeats every base weight (kh/ph) x (kw/pw) times
    and divides by that area.
    """
    base = patch_kernel[..., : cfg.latent_channels, :]
    ph, pw = base.shape[1:3]
    out = {}
    for level, kernel in enumerate(cfg.patchifier_kernels):
        rh, rw = kernel[1] // ph, kernel[2] // pw
        k = jnp.repeat(jnp.repeat(base, rh, axis=1), rw, axis=2) / (rh * rw)
        out[f"patchifier_{level}"] = {"kernel": k, "bias": jnp.array(patch_bias)}  # own buffer
    return out
