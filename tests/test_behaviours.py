"""Behaviours each checked against an independent expectation (a closed form or a value computed by hand):
the parameter EMA, the LR schedule, the decoupled warm-up's switch to the selector's top-K, `base:` inheritance
of config files, the negative prompt as CFG's unconditional branch, and T2V stories at memory budgets 1-3."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onestory_jax.config_files import CONFIG_DIR, load_config
from onestory_jax.errors import UserError
from onestory_jax.models.frozen import build_components
from onestory_jax.models.memory import select_top_k
from onestory_jax.sampling import outputs
from onestory_jax.sampling.components import BYTE_TOKENIZER, random_params
from onestory_jax.sampling.pipeline import render_story
from onestory_jax.sampling.story import MemorySettings, Settings, Shot, Story
from onestory_jax.sharding import activate, make_mesh
from onestory_jax.training.losses import training_ranking
from onestory_jax.training.optim import learning_rate_schedule, make_optimizer
from onestory_jax.training.step import init_state, make_train_step

TRAIN_TINY = str(CONFIG_DIR / "train" / "tiny.yaml")


def train_cfg(*overrides: str):
    return load_config(TRAIN_TINY, ["train.trainable=[]", *overrides])


# --- 1. EMA of the parameters -------------------------------------------------------------------------------


def test_ema_after_n_steps_is_the_closed_form():
    """SGD at lr 1 on 0.5 |w - c|^2 jumps w to c at the first step and keeps it there; the EMA starts at w0,
    so after n steps ema_n = c + d^n (w0 - c) (ema_k = d ema_{k-1} + (1 - d) c, unrolled)."""
    d, n = 0.9, 5
    cfg = train_cfg(f"train.ema_decay={d}", "train.decoupled_warmup=0.0")
    w0, c = np.array([1.0, -2.0, 4.0]), np.array([3.0, 0.5, -1.0])
    params = {"dit": {"w": jnp.asarray(w0, jnp.float32)}}
    objective = lambda p, batch, rng, warm, cfg: (0.5 * jnp.sum((p["dit"]["w"] - c) ** 2), {})
    tx = optax.sgd(1.0)
    state = init_state(params, tx, seed=0, ema=True)
    step = jax.jit(make_train_step(cfg, tx, objective))
    for _ in range(n):
        state, _ = step(state, {})
    np.testing.assert_allclose(np.asarray(state.params["dit"]["w"]), c, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.ema["dit"]["w"]), c + d**n * (w0 - c), rtol=1e-6, atol=1e-6)
    assert init_state(params, tx, seed=0, ema=False).ema is None  # the loop passes ema=False for train.ema_decay 0


# --- 2. The learning-rate schedule ----------------------------------------------------------------------------


def expected_lr(t: int, peak: float, warmup: int, steps: int) -> float:
    """Linear from 0 to the peak over `warmup` steps, then a half cosine down to 10% of it at `steps`."""
    if t < warmup:
        return peak * t / warmup
    end, frac = 0.1 * peak, min(t - warmup, steps - warmup) / (steps - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def test_lr_schedule_warms_up_linearly_then_cosine_to_a_tenth():
    peak, warmup, steps = 2e-3, 10, 100
    sched = learning_rate_schedule(
        train_cfg(f"train.learning_rate={peak}", f"train.lr_warmup_steps={warmup}", f"train.steps={steps}").train
    )
    hand = {0: 0.0, 5: peak / 2, 10: peak, 55: 0.55 * peak, 100: 0.1 * peak, 500: 0.1 * peak}  # 55: mid-decay
    for t, value in hand.items():
        assert float(sched(t)) == pytest.approx(value, rel=1e-5, abs=1e-12), t
        assert expected_lr(t, peak, warmup, steps) == pytest.approx(value, rel=1e-12, abs=1e-15)
    for t in (1, 3, 9, 11, 30, 77, 99):
        assert float(sched(t)) == pytest.approx(expected_lr(t, peak, warmup, steps), rel=1e-5), t
    # a run shorter than its warm-up reaches the peak at its last step
    short = learning_rate_schedule(train_cfg(f"train.learning_rate={peak}", "train.lr_warmup_steps=50", "train.steps=4").train)
    assert [float(short(t)) for t in range(4)] == pytest.approx([0.0, peak / 3, 2 * peak / 3, peak], rel=1e-5)


def test_optimizer_steps_by_the_schedule():
    """Adam under a constant gradient g moves each weight by lr(t) * g / (|g| + eps) at step t (its bias-corrected
    moments are g and g^2): the weight deltas are the schedule."""
    peak, warmup, steps = 1e-2, 4, 12
    tc = train_cfg(
        f"train.learning_rate={peak}", f"train.lr_warmup_steps={warmup}", f"train.steps={steps}", "train.weight_decay=0.0"
    ).train
    params = {"dit": {"w": jnp.zeros(3)}}
    tx = make_optimizer(tc, params)
    opt_state, grads, deltas = tx.init(params), {"dit": {"w": jnp.full(3, 0.5)}}, []
    for _ in range(steps):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        deltas.append(-float(updates["dit"]["w"][0]))
    g = 0.5
    expected = [expected_lr(t, peak, warmup, steps) * g / (g + 1e-8) for t in range(steps)]
    # rtol: optax's bias correction 1 - 0.999^t in fp32 is off by 1.3e-5 relative at t = 1 (0.999 is not an fp32)
    np.testing.assert_allclose(deltas, expected, rtol=3e-5, atol=1e-12)


# --- 3. The decoupled warm-up switching off -------------------------------------------------------------------


def test_decoupled_warmup_is_random_frames_then_the_selectors_top_k():
    """With decoupled_warmup 0.3 of 10 steps, steps 0-2 draw the conditioning frame at random among the valid
    ones and steps 3+ take the selector's best. 64 rows: the best frame (3) of 3 valid (1-3) is picked by each
    row with probability 1/3 at random, so a random step picks every valid frame and never the invalid one."""
    cfg = train_cfg("train.steps=10", "train.decoupled_warmup=0.3")
    rows = 64
    scores = jnp.tile(jnp.asarray([[5.0, 0.0, 1.0, 2.0]]), (rows, 1))  # frame 0 scores best but is not valid
    valid = jnp.tile(jnp.asarray([[False, True, True, True]]), (rows, 1))
    batch = {"memory_valid": valid, "memory": jnp.zeros((rows, 4, 4, 4, 16))}

    def objective(p, batch, rng, warm, cfg):
        ranking, candidates = training_ranking(scores, batch, warm, rng, cfg)
        top, _, ok = select_top_k(ranking, candidates, 1)
        return jnp.sum(p["dit"]["w"] ** 2), {"top": top[:, 0], "ok": ok[:, 0]}

    tx = optax.sgd(0.0)
    state = init_state({"dit": {"w": jnp.ones(2)}}, tx, seed=0, ema=False)
    step = jax.jit(make_train_step(cfg, tx, objective))
    for t in range(6):
        state, m = step(state, batch)
        top = np.asarray(m["top"])
        assert np.asarray(m["ok"]).all()
        if t < 3:
            assert float(m["warmup"]) == 1.0, t
            assert set(top.tolist()) == {1, 2, 3}, (t, top)
        else:
            assert float(m["warmup"]) == 0.0, t
            assert (top == 3).all(), (t, top)


# --- 4. `base:` inheritance of config files -------------------------------------------------------------------


def test_base_inheritance_chain_overrides_and_inherits(tmp_path):
    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text("base: tiny\nname: parent\ndit:\n  num_layers: 1\ntrain:\n  steps: 7\n  learning_rate: 2.0e-3\n")
    child.write_text(f"base: {parent}\nname: child\ntrain:\n  steps: 9\n")
    tiny, p, c = load_config("tiny"), load_config(str(parent)), load_config(str(child))
    assert (p.name, p.dit.num_layers, p.train.steps, p.train.learning_rate) == ("parent", 1, 7, 2e-3)
    assert (c.name, c.dit.num_layers, c.train.steps, c.train.learning_rate) == ("child", 1, 9, 2e-3)
    # the rest comes from tiny through both links, section by section (train.batch_size: the dataclass default)
    assert c.dit.dim == tiny.dit.dim == 24 and c.memory == tiny.memory and c.vae == tiny.vae
    assert c.train.batch_size == tiny.train.batch_size
    assert load_config(str(child), ["train.steps=11"]).train.steps == 11  # command-line overrides come last


def test_base_cycles_and_missing_bases_are_one_error(tmp_path):
    a, b, selfish = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "self.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\ntrain:\n  steps: 3\n")
    selfish.write_text(f"base: {selfish}\n")
    for path in (a, b, selfish):
        with pytest.raises(UserError, match="inherits from itself"):
            load_config(str(path))
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"base: {tmp_path / 'nowhere.yaml'}\n")
    with pytest.raises(UserError, match="nowhere.yaml' does not exist"):
        load_config(str(missing))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("base: no-such-preset\n")
    with pytest.raises(UserError, match="unknown config preset 'no-such-preset'"):
        load_config(str(unknown))


# --- 5. and 6. Stories on the tiny T2V model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2v():
    """The tiny preset as T2V with random weights, as `load_for_sampling(None, "tiny", ...)` makes it, on one
    device (its programs compile in half the time of the suite's 8-device mesh)."""
    cfg = load_config("tiny", ["dit.model_type=t2v", "dit.in_dim=16", "mesh.fsdp=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    with activate(mesh):
        params = random_params(cfg, mesh, seed=0)
    return cfg, params, build_components(cfg, params, BYTE_TOKENIZER), mesh


def render(
    t2v, out: Path, captions: tuple[str, ...] = ("a red square", "the red square, later"), budget: int | None = None, **settings
):
    """Render at 32x32x5 (4x4x2 latents) with 2 Euler steps -> (manifest, latents [S, 2, 4, 4, 16])."""
    cfg, params, comps, mesh = t2v
    story = Story(
        settings=Settings(width=32, height=32, frames=5, steps=2, solver="euler", **settings),
        memory=MemorySettings(strategy="onestory", budget=budget),
        shots=tuple(Shot(c) for c in captions),
    )
    with activate(mesh):
        manifest = render_story(cfg, params, comps, story, out, progress=False, mesh=mesh)
    return manifest, np.stack([np.load(out / outputs.shot_name(i, ".npy")) for i in range(len(captions))])


def test_t2v_story_renders(t2v, tmp_path):
    manifest, latents = render(t2v, tmp_path, guidance=3.0)
    assert latents.shape == (2, 2, 4, 4, 16) and np.isfinite(latents).all()
    assert [len(s["memory"]) for s in manifest["shots"]] == [0, 2]  # shot 2 sees both latent frames of shot 1
    assert manifest["latent_shape"] == [2, 4, 4, 16] and (tmp_path / "story.mp4").is_file()


def test_negative_prompt_is_the_unconditional_branch(t2v, tmp_path):
    """CFG: v = v_neg + g (v_pos - v_neg). g = 3: a negative prompt other than the null text changes the shots;
    g = 1 (v = v_pos): it cannot; g = 0 (v = v_neg): shot 1 (no memory) is the shot whose caption is the
    negative prompt, rendered at g = 1."""
    _, null3 = render(t2v, tmp_path / "null3", guidance=3.0)
    _, blur3 = render(t2v, tmp_path / "blur3", guidance=3.0, negative_prompt="blurry")
    assert np.abs(blur3 - null3).max() > 1e-2
    _, null1 = render(t2v, tmp_path / "null1", guidance=1.0)
    _, blur1 = render(t2v, tmp_path / "blur1", guidance=1.0, negative_prompt="blurry")
    np.testing.assert_array_equal(blur1, null1)
    assert np.abs(null1 - null3).max() > 1e-2  # guidance matters at all
    _, blur0 = render(t2v, tmp_path / "blur0", guidance=0.0, negative_prompt="blurry")
    _, captioned = render(t2v, tmp_path / "captioned", captions=("blurry", "the red square, later"), guidance=1.0)
    np.testing.assert_allclose(blur0[0], captioned[0], atol=1e-4)
    assert np.abs(blur0[0] - null1[0]).max() > 1e-2


# The memory budget at 32 px: a 4x4 latent has 2x2 = 4 noise tokens per latent frame, and each patchifier
# (1,4,4), (1,8,8), (1,16,16) makes ceil(4/k)^2 = 1 token of a frame. Budget b starts from b x (2, 6, 5) frames
# and drops the coarsest until they make at most 4b tokens: b=1 -> (2, 2, 0), b=2 -> (4, 4, 0), b=3 -> (6, 6, 0).
KERNELS = ([1, 4, 4], [1, 8, 8], [1, 16, 16])
BUDGET_FRAMES = {1: (2, 2, 0), 2: (4, 4, 0), 3: (6, 6, 0)}


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_memory_budget_sets_the_frames_and_their_patchifiers(t2v, tmp_path, budget):
    """Four shots of 2 latent frames: shot N has 2 (N - 1) memory frames, of which it takes min(2 (N - 1), K),
    the best-ranked with the finest patchifier; every frame one token, so at most 4b tokens."""
    manifest, _ = render(
        t2v, tmp_path, captions=("a red square", "a blue circle", "the square", "the circle"), budget=budget, guidance=1.0
    )
    assert manifest["config"]["memory"]["budget"] == budget
    by_rank = [k for k, n in zip(KERNELS, BUDGET_FRAMES[budget]) for _ in range(n)]
    for n, shot in enumerate(manifest["shots"], 1):
        memory = shot["memory"]
        assert [m["patchifier"] for m in memory] == by_rank[: 2 * (n - 1)], (n, memory)
        frames = {(m["shot"], m["frame"]) for m in memory}
        assert len(frames) == len(memory) and all(s < n and f in (0, 1) for s, f in frames)
        assert len(memory) <= 4 * budget
