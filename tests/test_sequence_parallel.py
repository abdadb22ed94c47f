"""Ulysses sequence parallelism on 8 forced host devices equals unsharded attention (fp32, forward and
gradients), with and without key lengths (context tokens), for attention alone and the DiT."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_refs import tiny_dit_config

from onestory_jax.config import DiTRuntime, MeshConfig
from onestory_jax.config_files import load_config
from onestory_jax.errors import UserError
from onestory_jax.models import layers
from onestory_jax.models.dit import ContextTokens, WanDiT
from onestory_jax.sharding import activate, make_mesh

pytestmark = pytest.mark.multidevice  # meshes over the 8 host devices (tests/conftest.py)
B, L, N, H = 2, 37, 4, 8  # L = 37 is not a multiple of the sequence axis: the padded path
MESHES = {
    "data2_seq4": MeshConfig(data=2, fsdp=1, sequence=4, tensor=1),
    "fsdp2_seq2_tensor2": MeshConfig(data=1, fsdp=2, sequence=2, tensor=2),
}


def _qkv(seed: int = 0) -> tuple[jax.Array, ...]:
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((B, L, N, H)), jnp.float32) for _ in range(3))


def _loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))


@pytest.mark.parametrize("lengths", [None, (L, 20)], ids=["no context", "key lengths"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ulysses_attention_matches_unsharded(mesh_name, lengths):
    q, k, v = _qkv()
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    plain = lambda q, k, v: layers.attention(q, k, v, "xla", kv_lengths=lengths)
    ref, ref_grads = plain(q, k, v), jax.grad(_loss(plain), argnums=(0, 1, 2))(q, k, v)
    ulysses = lambda q, k, v: layers.ulysses_attention(q, k, v, "xla", kv_lengths=lengths)
    with activate(make_mesh(MESHES[mesh_name])):
        fwd = jax.jit(ulysses).lower(q, k, v).compile()
        assert "all-to-all" in fwd.as_text()
        out, grads = fwd(q, k, v), jax.jit(jax.grad(_loss(ulysses), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_ulysses_runs_any_inner_attention(impl, monkeypatch):
    """The inner attention sees whole sequences on N / sequence heads: chunked, and splash per device."""
    monkeypatch.setattr(layers, "CHUNK_QUERIES", 8)
    q, k, v = _qkv(1)
    lengths = jnp.asarray([30, 11], jnp.int32)
    ref = layers.attention(q, k, v, "xla", kv_lengths=lengths)
    with activate(make_mesh(MESHES["data2_seq4"])):
        out = jax.jit(lambda q, k, v: layers.ulysses_attention(q, k, v, impl, kv_lengths=lengths))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_splash_in_a_mesh_runs_per_device():
    """GSPMD cannot partition a Pallas kernel: splash runs in shard_map on each device's batch, queries
    and heads, keys gathered."""
    q, k, v = (a[:, :36] for a in _qkv(2))
    lengths = jnp.asarray([36, 9], jnp.int32)
    ref = layers.attention(q, k, v, "xla", kv_lengths=lengths)
    with activate(make_mesh(MESHES["fsdp2_seq2_tensor2"])):
        out = jax.jit(lambda q, k, v: layers.attention(q, k, v, "splash", kv_lengths=lengths))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_heads_not_divisible_by_the_sequence_axis_is_a_clear_error():
    q = jnp.zeros((B, 16, 2, H))
    with activate(make_mesh(MESHES["data2_seq4"])), pytest.raises(ValueError, match="2 attention heads .* sequence axis 4"):
        jax.jit(lambda q: layers.ulysses_attention(q, q, q))(q)
    with pytest.raises(UserError, match="num_heads=2 .* mesh.sequence=4"):  # tiny: 2 heads
        load_config("tiny", ["mesh.fsdp=1", "mesh.sequence=4"])


@pytest.fixture(scope="module")
def dit_setup():
    cfg = dataclasses.replace(tiny_dit_config("t2v", layers=1), num_heads=4, dim=48)  # 4 heads of 12: splittable over 4
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((B, 2, 4, 4, cfg.in_dim)), jnp.float32)  # 2*2*2 = 8 noise tokens
    t, text = jnp.asarray([300.0, 700.0]), jnp.asarray(r.standard_normal((B, 6, cfg.text_dim)), jnp.float32)
    n_ctx = 5  # 13 tokens with context: padded to 16 for the all-to-all
    ang = jnp.asarray(r.uniform(-3, 3, (B, n_ctx, cfg.head_dim // 2)), jnp.float32)
    ctx = ContextTokens(
        jnp.asarray(r.standard_normal((B, n_ctx, cfg.dim)), jnp.float32),
        jnp.cos(ang),
        jnp.sin(ang),
        jnp.zeros((B,)),
        jnp.arange(n_ctx)[None] < jnp.asarray([3, 0])[:, None],
    )
    params = nn.meta.unbox(jax.jit(WanDiT(cfg, DiTRuntime()).init)(jax.random.key(0), x, t, text)["params"])
    return cfg, params, (x, t, text), ctx


@pytest.mark.parametrize("with_context", [False, True], ids=["no context", "context"])
def test_dit_with_ulysses_matches_unsharded(dit_setup, with_context):
    cfg, params, (x, t, text), ctx = dit_setup
    ctx = ctx if with_context else None

    def loss(params, cfg):
        out = WanDiT(cfg, DiTRuntime()).apply({"params": params}, x, t, text, context=ctx)  # ulysses
        return jnp.sum(out**2), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, ref), ref_grads = step(params, cfg)
    with activate(make_mesh(MESHES["data2_seq4"])):
        sharded = step.lower(params, cfg).compile()
        assert "all-to-all" in sharded.as_text()
        (_, out), grads = sharded(params)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5 * max(1.0, float(jnp.abs(r).max())))
