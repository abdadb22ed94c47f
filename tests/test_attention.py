"""The attention dispatcher: key lengths (the memory bank's filled slots), the chunked path and the
Pallas splash kernel (interpret mode on CPU) against masked XLA attention (fp32, forward and
gradients); `auto` never builds full logits past its limit and picks splash on TPU."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_refs import tiny_dit_config

from onestory_jax.config import DiTRuntime
from onestory_jax.models import layers
from onestory_jax.models.dit import ContextTokens, WanDiT
from onestory_jax.models.splash import kv_segment_ids, splash_blocks

B, L, N, H = 2, 37, 3, 8


def _qkv(seed: int = 0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((B, L, N, H)), jnp.float32) for _ in range(3))


@pytest.fixture
def small_chunks(monkeypatch):
    """`chunked` in chunks of 8 queries: several chunks, the last one padded."""
    monkeypatch.setattr(layers, "CHUNK_QUERIES", 8)


def _attend(impl: str, q, k, v, lengths):
    """`impl` with key lengths, or ("reference") xla attention with the equivalent key mask."""
    if impl == "reference":
        return layers.attention(q, k, v, "xla", kv_mask=jnp.arange(L)[None] < lengths[:, None])
    return layers.attention(q, k, v, impl, kv_lengths=lengths)


@partial(jax.jit, static_argnums=0)
def _out_and_grads(impl: str, q, k, v, lengths):
    """Attention and the gradients of sum(sin(attention)) wrt q, k, v: one program per implementation for
    every key length (eagerly, each small op of the forward and backward would compile on its own)."""
    loss = lambda q, k, v: (lambda out: (jnp.sum(jnp.sin(out)), out))(_attend(impl, q, k, v, lengths))
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("lengths", [(L, L), (L, 20), (25, 1)], ids=["full bank", "partial", "empty bank"])
@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_key_lengths_match_masked_attention(impl, lengths, small_chunks):
    q, k, v = _qkv()
    lengths = jnp.asarray(lengths, jnp.int32)
    out, grads = _out_and_grads(impl, q, k, v, lengths)
    ref_out, ref = _out_and_grads("reference", q, k, v, lengths)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-6)  # grads reach ~40: fp32 summation order


def test_chunked_with_mask_and_bias_matches_xla(small_chunks):
    q, k, v = _qkv(1)
    mask = jnp.asarray(np.random.default_rng(2).random((B, L)) > 0.3)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, N, L, L)), jnp.float32)
    out = layers.attention(q, k, v, "chunked", kv_mask=mask, bias=bias)
    np.testing.assert_allclose(out, layers.attention(q, k, v, "xla", kv_mask=mask, bias=bias), atol=1e-5)
    chunked = jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, "chunked"))(q, k, v)
    assert f"length={-(-L // 8)}" in str(chunked)  # a scan over 5 chunks of 8 queries (the last one padded)


def test_splash_general_mask_matches_xla():
    q, k, v = _qkv(4)
    mask = jnp.asarray(np.random.default_rng(5).random((B, L)) > 0.3)
    out = layers.attention(q, k, v, "splash", kv_mask=mask, scale=0.2)
    np.testing.assert_allclose(out, layers.attention(q, k, v, "xla", kv_mask=mask, scale=0.2), atol=1e-5)


def test_splash_blocks_and_segment_ids():
    """Keys past the length, masked keys and block padding get kv segment 1 (queries are all segment 0)."""
    assert splash_blocks(37) == (128, 128)
    assert splash_blocks(34304) == (512, 34304)  # 14B 480p: 32,760 noise + 1,544 memory tokens
    assert splash_blocks(32760) == (512, 32768)
    mask = jnp.asarray([[True, False, True, True], [True] * 4])
    ids = kv_segment_ids(6, 4, jnp.asarray([3, 4], jnp.int32), mask, 2)
    np.testing.assert_array_equal(ids, [[0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])


def test_auto_never_builds_full_logits_past_the_limit():
    small = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float32)
    big = jax.ShapeDtypeStruct((2, 34304, 40, 128), jnp.float32)  # the 14B model's 480p self-attention
    assert layers.resolve_attention("auto", small, small) == "xla"
    assert layers.resolve_attention("auto", big, big) == "chunked"  # on this CPU: no fused kernel
    with pytest.raises(ValueError, match="kv_lengths"):
        layers.resolve_attention("cudnn", big, big, kv_mask=jnp.ones((2, 34304), bool))
    with pytest.raises(ValueError, match="bias"):
        layers.resolve_attention("splash", small, small, bias=jnp.zeros((1, 2, 64, 64)))


def test_auto_picks_splash_on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    big = jax.ShapeDtypeStruct((2, 34304, 40, 128), jnp.bfloat16)
    assert layers.resolve_attention("auto", big, big) == "splash"
    assert layers.resolve_attention("auto", big, big, bias=jnp.zeros(())) == "chunked"  # T5's bias: no splash


def test_dit_hides_empty_memory_slots_exactly():
    """Context tokens whose trailing slots are empty = the same context with those slots removed."""
    cfg = tiny_dit_config("t2v")
    model = WanDiT(cfg, DiTRuntime())
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 2, 4, 4, cfg.in_dim)), jnp.float32)
    t, text = jnp.asarray([300.0, 700.0]), jnp.asarray(r.standard_normal((2, 6, cfg.text_dim)), jnp.float32)
    n_ctx = 7
    tokens = jnp.asarray(r.standard_normal((2, n_ctx, cfg.dim)), jnp.float32)
    ang = jnp.asarray(r.uniform(-3, 3, (2, n_ctx, cfg.head_dim // 2)), jnp.float32)
    # One jitted init and apply: eagerly, each of their small ops compiles a program of its own (~360 here).
    params = jax.jit(model.init)(jax.random.key(0), x, t, text)["params"]
    apply = jax.jit(lambda x, t, text, ctx: model.apply({"params": params}, x, t, text, context=ctx))
    valid = [5, 0]  # sample 0: 5 filled slots; sample 1: an empty bank

    full = ContextTokens(
        tokens, jnp.cos(ang), jnp.sin(ang), jnp.zeros((2,)), jnp.arange(n_ctx)[None] < jnp.asarray(valid)[:, None]
    )
    out = apply(x, t, text, full)
    for i, n in enumerate(valid):
        rows = slice(i, i + 1)
        truncated = ContextTokens(tokens[rows, :n], jnp.cos(ang)[rows, :n], jnp.sin(ang)[rows, :n], jnp.zeros((1,)))
        ref = apply(x[rows], t[rows], text[rows], truncated if n else None)
        np.testing.assert_allclose(out[rows], ref, atol=1e-5)
