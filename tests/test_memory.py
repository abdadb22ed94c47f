"""Frame Selection and the Adaptive Conditioner: shapes, masking, assignment, budget, init, gradients."""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_refs import diffusers_dit, random_dit_inputs, run_diffusers_dit, state_dict_numpy, tiny_dit_config

from onestory_jax.config import DiTRuntime, MemoryConfig
from onestory_jax.convert.dit import convert
from onestory_jax.models.dit import ContextTokens, WanDiT
from onestory_jax.models.memory import (
    OneStoryMemory,
    caption_summary,
    conditioner_from_patch_embedding,
    frames_per_patchifier,
    num_selected,
    select_top_k,
    tokens_per_frame,
)

CFG = MemoryConfig(num_queries=4, selector_heads=2)
DIM, HEAD_DIM, TEXT_DIM = 24, 12, 32
B, F, H, W, C = 2, 10, 8, 12, 16


def _memory_inputs(seed=0):
    rng = np.random.default_rng(seed)
    memory = rng.standard_normal((B, F, H, W, C)).astype(np.float32)
    caption = rng.standard_normal((B, 7, TEXT_DIM)).astype(np.float32)
    valid = np.zeros((B, F), bool)
    valid[0, :8] = True
    valid[1, :3] = True  # fewer valid frames than K
    return caption, memory, valid


# Inits and applies run as one jitted program per module and input shapes: eagerly, each of their small ops
# compiles a program of its own (~230 in this file).
@partial(jax.jit, static_argnums=0)
def _init(mod: nn.Module, key: jax.Array, *inputs) -> dict:
    """`mod`'s unboxed params."""
    return nn.meta.unbox(mod.init(key, *inputs)["params"])


@partial(jax.jit, static_argnums=0, static_argnames=("method", "capture_intermediates"))
def _apply(mod: nn.Module, params: dict, *inputs, **kwargs):
    """`mod.apply` on `params` (`kwargs`: the module's and apply's keyword arguments)."""
    return mod.apply({"params": params}, *inputs, **kwargs)


@pytest.fixture(scope="module")
def module_and_params():
    mod = OneStoryMemory(CFG, DIM, HEAD_DIM)
    return mod, _init(mod, jax.random.key(0), *_memory_inputs())


def test_shapes_and_budget(module_and_params):
    mod, params = module_and_params
    caption, memory, valid = _memory_inputs()
    scores, idx, sel_valid, ctx = _apply(mod, params, caption, memory, valid)
    k = num_selected(CFG, (H, W))
    counts = frames_per_patchifier(CFG, (H, W))
    n_ctx = sum(c * tokens_per_frame(kern, (H, W)) for c, kern in zip(counts, CFG.patchifier_kernels))
    assert scores.shape == (B, F) and idx.shape == sel_valid.shape == (B, k)
    assert ctx.tokens.shape == (B, n_ctx, DIM) and ctx.cos.shape == (B, n_ctx, HEAD_DIM // 2) and ctx.mask.shape == (B, n_ctx)
    assert n_ctx <= (H // 2) * (W // 2)


@pytest.mark.parametrize("budget", [1, 2, 3])
@pytest.mark.parametrize("latent_hw", [(60, 104), (8, 8), (8, 12)])
def test_token_budget_is_honoured(budget, latent_hw):
    cfg = dataclasses.replace(CFG, budget=budget)
    counts = frames_per_patchifier(cfg, latent_hw)
    n_ctx = sum(c * tokens_per_frame(k, latent_hw) for c, k in zip(counts, cfg.patchifier_kernels))
    one_frame = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    assert n_ctx <= budget * one_frame
    if latent_hw == (60, 104):  # the documented 480x832 allocation: [2, 6, 5] x budget, 1,544 tokens per unit
        assert counts == tuple(budget * n for n in (2, 6, 5))
        assert budget * 1544 == n_ctx


def test_masked_frames_are_never_chosen_and_do_not_matter(module_and_params):
    mod, params = module_and_params
    caption, memory, valid = _memory_inputs()
    scores, idx, sel_valid, _ = _apply(mod, params, caption, memory, valid)
    idx, sel_valid = np.asarray(idx), np.asarray(sel_valid)
    for b in range(B):
        assert valid[b][idx[b][sel_valid[b]]].all()
        assert sel_valid[b].sum() == min(valid[b].sum(), idx.shape[1])
    # Changing what sits in invalid slots changes no valid score.
    other = memory.copy()
    other[~valid] = 100.0
    scores2 = _apply(mod, params, caption, other, valid)[0]
    np.testing.assert_allclose(np.asarray(scores2)[valid], np.asarray(scores)[valid], rtol=1e-5, atol=1e-5)


def test_select_top_k_orders_by_score_over_valid_only():
    scores = jnp.array([[0.1, 5.0, 0.3, 9.0, 0.2]])
    valid = jnp.array([[True, True, True, False, True]])
    idx, top, ok = select_top_k(scores, valid, 3)
    assert idx.tolist() == [[1, 2, 4]] and ok.all()
    idx, _, ok = select_top_k(scores, jnp.array([[False, True, False, False, False]]), 3)
    assert idx[0, 0] == 1 and ok.tolist() == [[True, False, False]]


def test_rank_to_patchifier_assignment(module_and_params):
    """A frame's tokens appear in the segment of the patchifier its rank maps to, nowhere else."""
    mod, params = module_and_params
    counts = frames_per_patchifier(CFG, (H, W))
    k = sum(counts)
    seg = np.cumsum([0] + [c * tokens_per_frame(kern, (H, W)) for c, kern in zip(counts, CFG.patchifier_kernels)])
    memory = np.zeros((1, F, H, W, C), np.float32)
    indices = np.arange(k)[None]
    base = _apply(mod, params, memory, indices, np.ones((1, k), bool), method="condition").tokens
    for rank in range(k):
        m = memory.copy()
        m[0, rank] = 1.0
        tok = _apply(mod, params, m, indices, np.ones((1, k), bool), method="condition").tokens
        changed = np.nonzero(np.abs(np.asarray(tok - base)).sum(-1)[0] > 1e-6)[0]
        level = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
        assert changed.min() >= seg[level] and changed.max() < seg[level + 1], (rank, level)


def test_coarse_patchifier_at_init_is_avgpool_then_base_patchifier():
    rng = np.random.default_rng(0)
    base_k = rng.standard_normal((1, 2, 2, 36, DIM)).astype(np.float32)
    base_b = rng.standard_normal((DIM,)).astype(np.float32)
    params = conditioner_from_patch_embedding(base_k, base_b, CFG)
    x = rng.standard_normal((1, 3, 16, 32, C)).astype(np.float32)
    from onestory_jax.models.memory import patchify_conv

    for level, kernel in enumerate(CFG.patchifier_kernels):
        r = kernel[1] // 2
        ours = patchify_conv(DIM, kernel, "p").apply({"params": params[f"patchifier_{level}"]}, x)
        # Reference in NumPy: r x r average pool, then the base (1,2,2) patch embedding on the 16 latent channels.
        pooled = x.reshape(1, 3, 16 // r, r, 32 // r, r, C).mean(axis=(3, 5))
        patches = pooled.reshape(1, 3, 16 // r // 2, 2, 32 // r // 2, 2, C)
        ref = np.einsum("bthiwjc,ijcd->bthwd", patches, base_k[0, :, :, :C]) + base_b
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)


def test_gradients_reach_selector_patchifiers_and_dit():
    cfg = tiny_dit_config("t2v")
    dit, mem = WanDiT(cfg, DiTRuntime()), OneStoryMemory(CFG, cfg.dim, cfg.head_dim)
    caption, memory, valid = _memory_inputs()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, 1, H, W, cfg.in_dim)).astype(np.float32)
    text = rng.standard_normal((B, 16, cfg.text_dim)).astype(np.float32)
    labels = rng.standard_normal((B, F)).astype(np.float32)
    t = np.array([300.0, 700.0], np.float32)
    # jitted throughout: run eagerly, every op of the init and the gradients compiles on its own
    mem_params = _init(mem, jax.random.key(1), caption, memory, valid)  # the fixture's program (equal module)
    dit_params = _init(dit, jax.random.key(2), x, t, text)

    def losses(params):
        scores, _, _, ctx = mem.apply({"params": params["mem"]}, caption, memory, valid)
        l_sel = jnp.sum(jnp.where(valid, (scores - labels) ** 2, 0)) / valid.sum()
        v = dit.apply({"params": params["dit"]}, x, t, text, context=ctx)
        return l_sel, jnp.mean((v - x[..., :16]) ** 2)

    params = {"mem": mem_params, "dit": dit_params}
    g_sel = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
    g_diff = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
    norm = lambda tree: float(sum(np.abs(np.asarray(a)).sum() for a in jax.tree.leaves(tree)))
    assert norm(g_sel["mem"]["selector"]) > 0
    assert norm(g_sel["mem"]["conditioner"]) == 0 and norm(g_sel["dit"]) == 0
    assert norm(g_diff["mem"]["conditioner"]) > 0 and norm(g_diff["dit"]["blocks"]) > 0
    assert norm(g_diff["mem"]["selector"]) == 0  # top-K is hard: the selector learns from L_sel only


def test_dit_with_empty_or_masked_context_matches_diffusers():
    cfg = tiny_dit_config("i2v")
    model = diffusers_dit(cfg)
    sd = state_dict_numpy(model)
    params = convert(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    x, text, image = random_dit_inputs(cfg, (3, 4, 6))
    rng = np.random.default_rng(0)
    t = np.array([500, 250], np.int64)
    ref = run_diffusers_dit(model, x, t, text, image)
    hd2 = cfg.head_dim // 2
    for n_ctx in (0, 5):
        ctx = ContextTokens(
            tokens=jnp.asarray(rng.standard_normal((2, n_ctx, cfg.dim)), jnp.float32),
            cos=jnp.ones((2, n_ctx, hd2)),
            sin=jnp.zeros((2, n_ctx, hd2)),
            timestep=jnp.zeros((2,)),
            mask=jnp.zeros((2, n_ctx), bool),
        )
        out = np.asarray(_apply(WanDiT(cfg, DiTRuntime()), params, x, t, text, image, context=ctx))
        assert out.shape == ref.shape  # context tokens are sliced off before the head
        assert np.abs(out - ref).max() / ref.std() < 1e-4


def _layer_norm(x, scale, bias):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(
    "pooling,token_mlp,captions", [("mean", False, False), ("max", False, False), ("max", True, False), ("max", True, True)]
)
def test_selector_scores_follow_the_pooling_formula(pooling, token_mlp, captions):
    """S = mean_m (pool_tokens(M1) W_P + b_P) . Q''_m / sqrt(D), M1 = phi_V (+ LN -> fc1 -> GELU -> fc2 residual)
    (+ each frame's caption x W_C + b_C on all its tokens), recomputed in numpy from phi_V's output and Q''."""
    cfg = dataclasses.replace(CFG, selector_pooling=pooling, selector_token_mlp=token_mlp, selector_reads_captions=captions)
    mod, inputs = OneStoryMemory(cfg, DIM, HEAD_DIM), _memory_inputs(3)
    memory_text = np.random.default_rng(4).standard_normal((B, F, TEXT_DIM)).astype(np.float32)
    inputs = (*inputs, memory_text if captions else None)
    params = _init(mod, jax.random.key(1), *inputs)
    if captions:  # phi_C starts at zero (the image-only selector); a trained one is not
        assert not np.any(params["selector"]["phi_c"]["kernel"])
        rng = np.random.default_rng(5)
        params["selector"]["phi_c"] = {
            k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params["selector"]["phi_c"].items()
        }
    scores, state = _apply(mod, params, *inputs, method="score", capture_intermediates=True)
    inter, sel = state["intermediates"]["selector"], params["selector"]
    m1 = np.asarray(inter["phi_v"]["__call__"][0], np.float64)  # [B, F, h', w', D]
    assert ("phi_v_mlp" in sel) == token_mlp
    if token_mlp:
        mlp = sel["phi_v_mlp"]
        h = _layer_norm(m1, np.asarray(mlp["norm"]["scale"]), np.asarray(mlp["norm"]["bias"]))
        h = _gelu_tanh(h @ np.asarray(mlp["fc1"]["kernel"]) + np.asarray(mlp["fc1"]["bias"]))
        m1 = m1 + h @ np.asarray(mlp["fc2"]["kernel"]) + np.asarray(mlp["fc2"]["bias"])
    if captions:
        phi_c = sel["phi_c"]
        m1 = m1 + (memory_text @ np.asarray(phi_c["kernel"]) + np.asarray(phi_c["bias"]))[:, :, None, None, :]
    q = np.asarray(inter["memory_attn"]["__call__"][0], np.float64)  # Q'' [B, m, D]
    pooled = m1.max(axis=(2, 3)) if pooling == "max" else m1.mean(axis=(2, 3))
    frame = pooled @ np.asarray(sel["phi_p"]["kernel"]) + np.asarray(sel["phi_p"]["bias"])
    want = np.einsum("bfd,bmd->bfm", frame, q).mean(-1) / np.sqrt(DIM)
    np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4, atol=1e-5)


def test_caption_summary_is_the_mean_of_the_unpadded_tokens():
    rng = np.random.default_rng(0)
    text = np.zeros((2, 6, 4), np.float32)
    text[0, :3], text[1, :5] = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    want = np.stack([text[0, :3].mean(0), text[1, :5].mean(0)])
    np.testing.assert_allclose(caption_summary(text), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(caption_summary(jnp.asarray(text))), want, rtol=1e-6)
    assert not np.any(caption_summary(np.zeros((6, 4), np.float32)))  # no caption: zeros, not NaN


def test_a_caption_reading_selector_needs_the_captions():
    cfg = dataclasses.replace(CFG, selector_reads_captions=True)
    mod = OneStoryMemory(cfg, DIM, HEAD_DIM)
    with pytest.raises(ValueError, match="memory_text"):
        _init(mod, jax.random.key(0), *_memory_inputs())  # raised while tracing: nothing compiles


def test_context_tokens_take_their_own_group_modulation():
    """Per token, the modulation vectors are the table plus the token's group's time embedding: the noise tokens'
    (group 0) before the context tokens' (group 1), exactly; one group broadcasts over the tokens."""
    from onestory_jax.models.dit import _modulation

    r = np.random.default_rng(0)
    table = r.standard_normal((6, 8)).astype(np.float32)
    e = r.standard_normal((2, 2, 6, 8)).astype(np.float32)
    is_context = np.arange(5) >= 3  # 3 noise tokens, then 2 context tokens
    vectors = _modulation(jnp.asarray(table), jnp.asarray(e), jnp.asarray(is_context))
    for k, vec in enumerate(vectors):
        expected = table[k] + e[:, is_context.astype(int), k]  # [B, L, D]
        np.testing.assert_array_equal(np.asarray(vec), expected)
    alone = _modulation(jnp.asarray(table), jnp.asarray(e[:, :1]), None)
    np.testing.assert_array_equal(np.asarray(alone[2]), (table[2] + e[:, 0, 2])[:, None])
