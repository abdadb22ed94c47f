"""Train state and the jitted, donated train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from onestory_jax.config import Config
from onestory_jax.training.losses import Batch, loss_fn
from onestory_jax.training.optim import trainable_mask

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar
    params: Any  # fp32 master weights: {"dit": ..., "memory": ...}
    opt_state: Any
    ema: Any  # EMA of params, or None
    rng: Array  # raw uint32 [2] key (serialisable by orbax)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema else None,
        rng=jax.random.PRNGKey(seed),
    )


def stop_frozen_gradients(params: Any, patterns: tuple[str, ...]) -> Any:
    """`params` with `lax.stop_gradient` on every param `patterns` freeze (see `optim.trainable_mask`).

    Differentiating through it computes no weight gradient of a frozen param (its gradient is a
    constant zero), so a frozen DiT costs no gradient memory or backward weight matmuls.
    """
    return jax.tree.map(lambda p, train: p if train else jax.lax.stop_gradient(p), params, trainable_mask(params, patterns))


# (params, batch, rng, warm, cfg) -> (loss, metrics); warm: the decoupled warm-up is on (bool scalar)
LossFn = Callable[[Any, Batch, Array, Array, Config], tuple[Array, dict[str, Array]]]


def make_train_step(cfg: Config, tx: optax.GradientTransformation, objective: LossFn = loss_fn):
    """state, batch -> (state, metrics) for `objective` (default: OneStory's). Jit it with `donate_argnums=0`."""
    warm_steps = int(round(cfg.train.decoupled_warmup * cfg.train.steps))

    def loss(params: Any, batch: Batch, rng: Array, warm: Array) -> tuple[Array, dict[str, Array]]:
        return objective(stop_frozen_gradients(params, cfg.train.trainable), batch, rng, warm, cfg)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        rng, step_rng = jax.random.split(state.rng)
        warm = state.step < warm_steps
        grads, metrics = jax.grad(loss, has_aux=True)(state.params, batch, step_rng, warm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = cfg.train.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "warmup": warm.astype(jnp.float32)}
        return TrainState(state.step + 1, params, opt_state, ema, rng), metrics

    return train_step
