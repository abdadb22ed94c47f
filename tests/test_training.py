"""Training core: overfitting a batch, the selector learning pseudo-labels, freezing masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.config_files import load_config
from onestory_jax.models.onestory import init_params
from onestory_jax.training.losses import loss_fn
from onestory_jax.training.optim import make_optimizer, trainable_mask
from onestory_jax.training.step import init_state, make_train_step

T, H, W, F = 2, 8, 8, 4


def _memory(target, rng):
    """Memory frames for `target` [B, T, H, W, 16]: two resemble the target shot (labels 1), two are noise (-1)."""
    memory = rng.standard_normal((target.shape[0], F, H, W, 16)).astype(np.float32)
    memory[:, :2] = target[:, :2] + 0.1 * memory[:, :2]
    return memory


def _batch(cfg, rng, b=2):
    # Wan's DiT has no absolute position embedding, so a learnable target is one colour per shot.
    target = np.broadcast_to(rng.standard_normal((b, 1, 1, 1, 16)), (b, T, H, W, 16)).astype(np.float32)
    memory = _memory(target, rng)
    labels = np.array([[1.0, 1.0, -1.0, -1.0]] * b, np.float32)
    return {
        "target": target,
        "memory": memory,
        "memory_valid": np.ones((b, F), bool),
        "labels": labels,
        "text": rng.standard_normal((b, 8, cfg.dit.text_dim)).astype(np.float32),
        "image": rng.standard_normal((b, 4, cfg.dit.image_dim)).astype(np.float32),
        "cond": np.zeros((b, T, H, W, 20), np.float32),
    }


def _train(cfg, batch, steps, fresh_memory=None):
    """`steps` train steps on `batch`; with a generator `fresh_memory`, each step draws new memory frames."""
    params = init_params(cfg, jax.random.key(0))
    tx = make_optimizer(cfg.train, params)
    state = init_state(jax.tree.map(jnp.copy, params), tx, 0, ema=False)  # the step donates its state
    step = jax.jit(make_train_step(cfg, tx), donate_argnums=0)
    for _ in range(steps):
        memory = batch["memory"] if fresh_memory is None else _memory(batch["target"], fresh_memory)
        state, metrics = step(state, {**batch, "memory": memory})
    return params, state, metrics


def test_overfit_one_batch_and_learn_pseudo_labels():
    cfg = load_config(
        "tiny",
        [
            "train.steps=150",  # loss ratio 0.31, r 0.995 (300 steps: 0.27, 0.992; 5 s more)
            "train.learning_rate=1e-2",
            "train.lr_warmup_steps=10",
            "train.text_dropout=0.0",
            "train.context_dropout=0.0",
            "train.decoupled_warmup=0.1",
        ],
    )
    batch = _batch(cfg, np.random.default_rng(0))
    # Loss at 8 fixed (timestep, noise) draws, before and after training.
    eval_loss = jax.jit(
        lambda p: jnp.mean(
            jnp.stack([loss_fn(p, batch, jax.random.key(k), jnp.array(False), cfg)[1]["l_shot"] for k in range(8)])
        )
    )
    # Each step sees new memory frames (new noise), so the selector must learn which frames match the
    # caption's shot rather than memorise the frames it was trained on.
    params, state, metrics = _train(cfg, batch, cfg.train.steps, fresh_memory=np.random.default_rng(1))
    before, after = float(eval_loss(params)), float(eval_loss(state.params))
    assert after <= 0.5 * before, (before, after)
    # The selector regresses the pseudo-labels: its scores correlate with them on fresh memory (never trained on).
    from onestory_jax.models.memory import OneStoryMemory

    mem = OneStoryMemory(cfg.memory, cfg.dit.dim, cfg.dit.head_dim)
    fresh = _memory(batch["target"], np.random.default_rng(100))
    scores = mem.apply({"params": state.params["memory"]}, batch["text"], fresh, batch["memory_valid"], method="score")
    r = np.corrcoef(np.asarray(scores).ravel(), batch["labels"].ravel())[0, 1]
    assert r > 0.95, r
    assert np.isfinite(float(metrics["grad_norm"]))


def test_freezing_mask_keeps_frozen_params():
    cfg = load_config("tiny", ["train.steps=3", "train.trainable=['^memory/', 'blocks/ffn']"])
    params, state, _ = _train(cfg, _batch(cfg, np.random.default_rng(1)), 3)
    mask = trainable_mask(params, cfg.train.trainable)
    assert mask["memory"]["selector"]["queries"] and not mask["dit"]["head"]["kernel"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, state.params)
    assert not changed["dit"]["head"]["kernel"] and not changed["dit"]["blocks"]["self_attn"]["q"]["kernel"]
    assert changed["dit"]["blocks"]["ffn"]["fc1"]["kernel"] and changed["memory"]["selector"]["queries"]


def test_frozen_params_cost_no_weight_gradients():
    """Frozen params are cut from differentiation: the step has fewer matmuls than with all params
    training (no weight-gradient dots for the frozen DiT)."""

    def step_jaxpr(trainable: str) -> str:
        cfg = load_config("tiny", [f"train.trainable={trainable}"])
        params = init_params(cfg, jax.random.key(0))
        tx = make_optimizer(cfg.train, params)
        return str(
            jax.make_jaxpr(make_train_step(cfg, tx))(init_state(params, tx, 0, ema=False), _batch(cfg, np.random.default_rng(0)))
        )

    frozen, everything = step_jaxpr("['^memory/']").count("dot_general"), step_jaxpr("[]").count("dot_general")
    assert frozen < 0.8 * everything, (frozen, everything)


def test_a_selector_stage_step_is_l_sel_alone_without_the_dit():
    """train.trainable = the selector only: the loss is lambda x L_sel (the MSE of the scores against the labels,
    recomputed here) and the step runs no DiT (a fraction of the matmuls of a step whose DiT is frozen)."""
    from onestory_jax.models.onestory import memory_scores

    def step_and_loss(trainable: str) -> tuple[str, float, dict]:
        cfg = load_config("tiny", [f"train.trainable={trainable}"])
        params, batch = init_params(cfg, jax.random.key(0)), _batch(cfg, np.random.default_rng(2))
        loss, metrics = loss_fn(params, batch, jax.random.key(1), jnp.array(False), cfg)
        tx = make_optimizer(cfg.train, params)
        jaxpr = str(jax.make_jaxpr(make_train_step(cfg, tx))(init_state(params, tx, 0, ema=False), batch))
        scores = np.asarray(memory_scores(params, cfg, batch["text"], batch["memory"], batch["memory_valid"]))
        want = cfg.train.selection_weight * ((scores - batch["labels"]) ** 2).mean()
        return jaxpr, float(loss), {**metrics, "want": want}

    selector, loss, metrics = step_and_loss("['^memory/selector/']")
    assert np.isclose(loss, metrics["want"], rtol=1e-5) and "l_shot" not in metrics
    frozen_dit, _, with_dit = step_and_loss("['^memory/']")
    assert "l_shot" in with_dit
    assert selector.count("dot_general") < 0.5 * frozen_dit.count("dot_general")


def test_the_selectors_degraded_frames_are_blurred_and_noised():
    """train.selector_degrade: a picked frame is its 3x3 box blur (edges replicated, recomputed here with numpy's
    edge padding) plus noise of std DEGRADE_NOISE; the others are untouched; 0 changes nothing."""
    from onestory_jax.training.losses import DEGRADE_NOISE, degrade_frames

    memory = np.random.default_rng(0).standard_normal((4, 8, 6, 6, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(degrade_frames(jnp.asarray(memory), 0.0, jax.random.key(0))), memory)
    padded = np.pad(memory, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blur = np.mean([padded[:, :, i : i + 6, j : j + 6] for i in range(3) for j in range(3)], axis=0)
    out = np.asarray(degrade_frames(jnp.asarray(memory), 1.0, jax.random.key(0)))
    assert abs((out - blur).std() - DEGRADE_NOISE) < 0.02 and abs((out - blur).mean()) < 0.02
    half = np.asarray(degrade_frames(jnp.asarray(memory), 0.5, jax.random.key(1)))
    same = np.all(half == memory, axis=(2, 3, 4))  # [B, F]: frames left as they were
    assert 0.25 < same.mean() < 0.75


@pytest.mark.multidevice
def test_sharded_train_step_equals_unsharded():
    """Loss and gradients of the step on a (data, fsdp, tensor) mesh equal the single-device ones.

    (Parameters after an Adam step are not compared elementwise: Adam's normalisation turns the
    last-bit differences of near-zero gradients into full-size sign flips.)
    """
    import flax.linen as nn

    from onestory_jax.config import MeshConfig
    from onestory_jax.models.onestory import init_fn
    from onestory_jax.sharding import activate, batch_sharding, make_mesh, param_shardings

    cfg = load_config("tiny", ["train.steps=4"])
    batch = _batch(cfg, np.random.default_rng(2), b=4)
    params = init_params(cfg, jax.random.key(0))
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, jax.random.key(5), jnp.array(False), cfg), has_aux=True))
    ref_g, ref_m = grad_fn(params, batch)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, sequence=1, tensor=2))
    shardings = nn.meta.unbox(param_shardings(jax.eval_shape(init_fn(cfg), jax.random.key(0)), mesh))
    with activate(mesh):
        p = jax.device_put(params, shardings)
        b = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        g, m = grad_fn(p, b)
    # computed sharded (the state keeps these layouts through a step: jit_train_step's out_shardings, compiled
    # by the preset twins of test_preset_fit and run by the sharded train.py tests)
    assert not g["dit"]["blocks"]["self_attn"]["q"]["kernel"].sharding.is_fully_replicated
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref_g))
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5 * scale, rtol=0)


def test_cell_weighted_shot_loss():
    """L_shot with batch["loss_weight"] [B, T, h, w] is the weighted mean of the squared velocity error:
    uniform weights give the plain mean; a one-hot weight gives that cell's mean error."""
    from onestory_jax.diffusion.schedule import add_noise, velocity_target
    from onestory_jax.models.onestory import velocity
    from onestory_jax.training.losses import shot_loss

    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    batch = _batch(cfg, rng)
    params = init_params(cfg, jax.random.key(0))
    noise = jnp.asarray(rng.standard_normal(batch["target"].shape), jnp.float32)
    sigma = jnp.array([0.3, 0.8])
    plain = shot_loss(params, batch, None, batch["text"], sigma, noise, cfg)
    uniform = shot_loss(
        params, {**batch, "loss_weight": np.full((2, T, H, W), 3.0, np.float32)}, None, batch["text"], sigma, noise, cfg
    )
    np.testing.assert_allclose(uniform, plain, rtol=1e-5)
    one_hot = np.zeros((2, T, H, W), np.float32)
    one_hot[1, 0, 2, 3] = 1.0
    v = velocity(
        params, cfg, add_noise(batch["target"], noise, sigma), sigma * 1000.0, batch["text"], batch["image"], batch["cond"], None
    )
    cell = np.mean((np.asarray(v) - np.asarray(velocity_target(batch["target"], noise)))[1, 0, 2, 3] ** 2)
    np.testing.assert_allclose(
        shot_loss(params, {**batch, "loss_weight": one_hot}, None, batch["text"], sigma, noise, cfg), cell, rtol=1e-4
    )
