"""Next-shot generation: the scan over shots, determinism, resume inputs and baseline strategies."""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.config_files import load_config
from onestory_jax.diffusion.schedule import make_schedule
from onestory_jax.models.dit import WanDiT
from onestory_jax.models.memory import OneStoryMemory, baseline_candidates, conditioner_from_patch_embedding
from onestory_jax.sampling.generate import GenerationSpec, StoryInputs, context_for_shot, generate_story, next_shot
from onestory_jax.sampling.memory_bank import empty_bank

SHOTS, T, H, W = 3, 2, 8, 8


@pytest.fixture(scope="module")
def model():
    cfg = load_config("tiny", ["dit.model_type=t2v", "dit.in_dim=16"])
    dit, mem = WanDiT(cfg.dit, cfg.dit_runtime), OneStoryMemory(cfg.memory, cfg.dit.dim, cfg.dit.head_dim)
    x = jnp.zeros((1, T, H, W, 16))

    @jax.jit  # one program: eagerly, each small op of the inits compiles a program of its own (~220 here)
    def init(dit_key: jax.Array, mem_key: jax.Array) -> dict:
        dit_params = nn.meta.unbox(dit.init(dit_key, x, jnp.zeros((1,)), jnp.zeros((1, 8, cfg.dit.text_dim))))["params"]
        mem_params = nn.meta.unbox(
            mem.init(mem_key, jnp.zeros((1, 8, cfg.dit.text_dim)), jnp.zeros((1, 4, H, W, 16)), jnp.ones((1, 4), bool))
        )["params"]
        mem_params = {
            **mem_params,
            "conditioner": conditioner_from_patch_embedding(
                dit_params["patch_embedding"]["kernel"], dit_params["patch_embedding"]["bias"], cfg.memory
            ),
        }
        return {"dit": dit_params, "memory": mem_params}

    return cfg, init(jax.random.key(0), jax.random.key(1))


def _inputs(cfg, seed=0, n_active=SHOTS):
    rng = np.random.default_rng(seed)
    return StoryInputs(
        text=jnp.asarray(rng.standard_normal((SHOTS, 16, cfg.dit.text_dim)), jnp.float32),
        negative=jnp.zeros((16, cfg.dit.text_dim)),
        noise=jnp.asarray(rng.standard_normal((SHOTS, T, H, W, 16)), jnp.float32),
        active=jnp.arange(SHOTS) < n_active,
        done=jnp.zeros((SHOTS,), bool),
        done_latents=jnp.zeros((SHOTS, T, H, W, 16)),
        cond=None,
        image_tokens=None,
    )


def _spec(strategy="onestory", k=4):
    sched = make_schedule("wan", 3, 3.0)
    return GenerationSpec(strategy, k, tuple(sched.sigmas.tolist()), tuple(sched.timesteps.tolist()), "unipc", 5.0)


@partial(jax.jit, static_argnums=(1, 2))
def _generate(params: dict, cfg, spec: GenerationSpec, inputs: StoryInputs):
    """generate_story, one program per config and spec shared by the tests (a fresh jax.jit of an equal
    lambda in each test would compile the same program again)."""
    return generate_story(params, cfg, spec, inputs)


def test_scan_over_shots_equals_python_loop(model):
    cfg, params = model
    inputs, spec = _inputs(cfg), _spec()
    scanned = _generate(params, cfg, spec, inputs)
    bank = empty_bank(SHOTS, T, H, W)
    step = jax.jit(lambda p, b, i, s: next_shot(p, cfg, spec, b, i, s))
    for shot in range(SHOTS):
        bank, rec = step(params, bank, inputs, jnp.int32(shot))
        np.testing.assert_allclose(np.asarray(scanned.latents[shot]), np.asarray(rec.latents), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(scanned.indices[shot]), np.asarray(rec.indices))
    assert not np.asarray(scanned.selected[0]).any()  # shot 1 has no memory
    assert np.asarray(scanned.selected[2]).sum() == 4  # shot 3 sees 2 shots x 2 frames


def test_same_seed_same_latents_and_memory_matters(model):
    cfg, params = model
    run = lambda p, i, s: _generate(p, cfg, s, i)  # noqa: E731
    a = run(params, _inputs(cfg, 0), _spec())
    b = run(params, _inputs(cfg, 0), _spec())
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))
    none = run(params, _inputs(cfg, 0), _spec("none"))
    np.testing.assert_allclose(np.asarray(none.latents[0]), np.asarray(a.latents[0]), atol=1e-5)  # no memory yet
    assert np.abs(np.asarray(none.latents[2] - a.latents[2])).max() > 1e-3  # memory changes later shots


def test_memory_guidance_moves_away_from_the_memoryless_velocity(model):
    """Scale 0 without text CFG leaves only the branch whose context is hidden: the story of no memory. Scale 1
    is exactly off; scale 3 changes only the shots that have memory."""
    cfg, params = model
    run = lambda p, i, s: _generate(p, cfg, s, i)  # noqa: E731
    plain = lambda strategy: dataclasses.replace(_spec(strategy), guidance=1.0)  # noqa: E731
    none = run(params, _inputs(cfg, 0), plain("none"))
    hidden = run(params, _inputs(cfg, 0), dataclasses.replace(plain("onestory"), memory_guidance=0.0))
    np.testing.assert_allclose(np.asarray(hidden.latents), np.asarray(none.latents), atol=1e-5)
    base = run(params, _inputs(cfg, 0), _spec())
    off = run(params, _inputs(cfg, 0), dataclasses.replace(_spec(), memory_guidance=1.0))
    np.testing.assert_array_equal(np.asarray(off.latents), np.asarray(base.latents))
    guided = run(params, _inputs(cfg, 0), dataclasses.replace(_spec(), memory_guidance=3.0))
    np.testing.assert_allclose(np.asarray(guided.latents[0]), np.asarray(base.latents[0]), atol=1e-5)  # no memory yet
    assert np.abs(np.asarray(guided.latents[2] - base.latents[2])).max() > 1e-3


def test_inactive_and_done_shots(model):
    cfg, params = model
    inputs = _inputs(cfg, 0, n_active=2)
    given = jnp.full((SHOTS, T, H, W, 16), 0.5)
    inputs = dataclasses.replace(inputs, done=jnp.array([True, False, False]), done_latents=given)
    rec = _generate(params, cfg, _spec(), inputs)
    np.testing.assert_array_equal(np.asarray(rec.latents[0]), 0.5)  # resumed shot kept as given
    assert np.asarray(rec.selected[1]).sum() == 2  # shot 2 remembers the resumed shot 1
    np.testing.assert_array_equal(np.asarray(rec.latents[2]), 0.0)  # beyond the story: nothing


@pytest.mark.parametrize(
    "strategy,expected",
    [
        ("recent", [5, 4, 3]),
        ("last_frame", [5]),
        ("uniform", [5, 2, 0]),  # linspace(0, 5, 3) = 0, 2.5, 5; round half to even
        ("none", []),
    ],
)
def test_baseline_strategies_pick_the_expected_frames(strategy, expected):
    from onestory_jax.models.memory import select_top_k

    valid = jnp.arange(10) < 6  # six frames in memory
    scores, candidates = baseline_candidates(strategy, valid, 3)
    idx, _, ok = select_top_k(scores[None], candidates[None], 3)
    assert [int(i) for i, o in zip(idx[0], ok[0]) if o] == expected


def _bank(valid_slots: int, references=None):
    bank = empty_bank(SHOTS, T, H, W, references=references)
    rng = np.random.default_rng(3)
    return bank.replace(
        latents=jnp.asarray(rng.standard_normal(bank.latents.shape), jnp.float32), valid=jnp.arange(bank.capacity) < valid_slots
    )


# context_for_shot as one program per config, spec and mask arguments (eagerly, each small op compiles on its own).
_context = partial(jax.jit, static_argnums=(1, 4))(context_for_shot)


def _chosen(indices, selected) -> list[int]:
    return [int(i) for i, s in zip(indices, selected) if s]


def test_pinned_slots_rank_first_and_excluded_never_appear(model):
    """memory.pin / memory.exclude: the mask arguments of context_for_shot (onestory and a baseline)."""
    from onestory_jax.sampling.generate import PIN_BOOST

    cfg, params = model
    bank, caption = _bank(6), _inputs(cfg).text[2]
    pinned, excluded = jnp.arange(6) == 1, jnp.arange(6) >= 4  # pin shot 1's frame 1, exclude shot 3
    _, free_idx, free_scores, free_sel = _context(params, cfg, bank, caption, _spec(k=3))
    _, idx, scores, sel = _context(params, cfg, bank, caption, _spec(k=3), pinned, excluded)
    chosen = _chosen(idx, sel)
    assert chosen[0] == 1 and not {4, 5} & set(chosen), chosen
    assert float(scores[0]) < PIN_BOOST / 2  # the manifest shows the selector's own score, not the boost
    assert _chosen(free_idx, free_sel) != chosen  # the masks changed the choice
    _, idx, _, sel = _context(params, cfg, bank, caption, _spec("last_frame", 1), None, excluded)
    assert _chosen(idx, sel) == [3]  # the latest frame that is not excluded


def test_references_are_memory_before_shot_one(model):
    cfg, params = model
    refs = jnp.asarray(np.random.default_rng(5).standard_normal((1, H, W, 16)), jnp.float32)
    run = lambda p, i: _generate(p, cfg, _spec(), i)  # noqa: E731
    plain, with_ref = run(params, _inputs(cfg)), run(params, dataclasses.replace(_inputs(cfg), references=refs))
    assert _chosen(with_ref.indices[0], with_ref.selected[0]) == [0]  # shot 1 sees the reference
    assert sorted(_chosen(with_ref.indices[1], with_ref.selected[1])) == [0, 1, 2]  # the reference + shot 1's frames
    assert np.abs(np.asarray(plain.latents[0] - with_ref.latents[0])).max() > 1e-3


def test_a_caption_reading_selector_reads_each_slots_shot_caption(model):
    """memory.selector_reads_captions: the story program scores each bank slot with its own shot's caption
    (`slot_captions`: reference slots get none), and a selector that needs captions says so when given none."""
    from onestory_jax.models.memory import caption_summary
    from onestory_jax.models.onestory import memory_scores
    from onestory_jax.sampling.memory_bank import slot_captions, write_shot

    base_cfg, base = model
    cfg = dataclasses.replace(base_cfg, memory=dataclasses.replace(base_cfg.memory, selector_reads_captions=True))
    rng = np.random.default_rng(7)
    phi_c = {
        "kernel": jnp.asarray(rng.standard_normal((cfg.dit.text_dim, cfg.dit.dim)), jnp.float32),
        "bias": jnp.zeros(cfg.dit.dim),
    }
    params = {**base, "memory": {**base["memory"], "selector": {**base["memory"]["selector"], "phi_c": phi_c}}}
    inputs = _inputs(cfg)
    text = slot_captions(inputs.text, T)  # [S x T, D]
    np.testing.assert_allclose(
        np.asarray(text[T : 2 * T]), np.broadcast_to(np.asarray(inputs.text[1]).mean(0), (T, text.shape[1])), rtol=1e-5
    )
    assert not np.any(np.asarray(slot_captions(inputs.text, T, reference_slots=2)[:2]))
    records = _generate(params, cfg, _spec(k=3), inputs.replace(memory_text=text))
    bank = empty_bank(SHOTS, T, H, W)
    for s in range(2):
        bank = write_shot(bank, s, records.latents[s])
    scores = jax.jit(memory_scores, static_argnums=1)  # one program, not one per small op
    want = scores(params, cfg, inputs.text[2][None], bank.latents[None], bank.valid[None], text[None])[0]
    used = np.asarray(records.selected[2])
    got = np.asarray(records.scores[2])[used]
    np.testing.assert_allclose(got, np.asarray(want)[np.asarray(records.indices[2])[used]], rtol=1e-4, atol=1e-5)
    swapped = text.at[:T].set(text[T : 2 * T]).at[T : 2 * T].set(text[:T])  # shot 1 and shot 2 trade captions
    _, _, other, _ = _context(params, cfg, bank, inputs.text[2], _spec(k=3), memory_text=swapped)
    assert not np.allclose(np.asarray(other)[used], got)
    assert np.asarray(caption_summary(inputs.text)).shape == (SHOTS, cfg.dit.text_dim)
    with pytest.raises(ValueError, match="memory_text"):
        _context(params, cfg, bank, inputs.text[2], _spec(k=3))
