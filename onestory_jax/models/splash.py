"""Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) for one device.

The kernel takes one sample's [N, L, H] and a static block-sparse mask (here full attention); hidden
keys (past `kv_lengths`, `kv_mask` False, block padding) are given their own kv segment id, so the
segment-id test (`q id == kv id`, all queries id 0) removes them. Off TPU the kernel runs in Pallas
interpret mode (slow; for tests). Under a mesh, `layers.attention` calls this per device in
`shard_map` (a Pallas kernel is not partitioned by GSPMD).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental.pallas.ops.tpu import splash_attention as sa

Array = jax.Array

SPLASH_BLOCK = 512  # query and key block of the kernel (forward and backward); 128 is the minimum
LANES = 128  # sequences are padded to a multiple of this, then of the block


def splash_blocks(length: int) -> tuple[int, int]:
    """(block, padded length) for a sequence: blocks of SPLASH_BLOCK, or one block of <= 512 tokens."""
    block = min(SPLASH_BLOCK, -(-length // LANES) * LANES)
    return block, -(-length // block) * block


def kv_segment_ids(padded: int, length: int, kv_lengths: Array | None, kv_mask: Array | None, batch: int) -> Array:
    """[B, padded] int32 kv segment ids: 0 = attended key, 1 = hidden (masked, past the length, padding)."""
    pos = jnp.arange(padded)
    valid = jnp.broadcast_to(pos < length, (batch, padded))
    if kv_lengths is not None:
        valid &= pos[None] < kv_lengths[:, None]
    if kv_mask is not None:
        valid &= jnp.pad(kv_mask.astype(bool), ((0, 0), (0, padded - length)))
    return jnp.where(valid, 0, 1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, lq: int, lk: int, bq: int, bkv: int, interpret: bool) -> sa.SplashAttentionKernel:
    """The splash kernel for full attention over padded [heads, lq] x [heads, lk] (mask processed once)."""
    blocks = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk))] * heads)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(
    q: Array, k: Array, v: Array, kv_mask: Array | None = None, kv_lengths: Array | None = None, scale: float | None = None
) -> Array:
    """Splash attention on one device: [B, Lq, N, H] x [B, Lk, N, H] -> [B, Lq, N, H] (`layers.attention`)."""
    b, lq, n, h = q.shape
    lk = k.shape[1]
    (bq, lq_pad), (bkv, lk_pad) = splash_blocks(lq), splash_blocks(lk)
    scale = h**-0.5 if scale is None else scale
    pad = lambda x, to: jnp.pad(rearrange(x, "b l n h -> b n l h"), ((0, 0), (0, 0), (0, to - x.shape[1]), (0, 0)))
    qp, kp, vp = pad(q * jnp.asarray(scale, q.dtype), lq_pad), pad(k, lk_pad), pad(v, lk_pad)
    segments = sa.SegmentIds(jnp.zeros((b, lq_pad), jnp.int32), kv_segment_ids(lk_pad, lk, kv_lengths, kv_mask, b))
    kernel = _kernel(n, lq_pad, lk_pad, bq, bkv, jax.default_backend() != "tpu")
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(qp, kp, vp, segments)
    return rearrange(out[:, :, :lq], "b n l h -> b l n h")
