"""Train state and the jitted, donated train step."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from onestory_jax.config import Config
from onestory_jax.training.losses import Batch, loss_fn

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar
    params: Any  # fp32 master weights: {"dit": ..., "memory": ...}
    opt_state: Any
    ema: Any  # EMA of params, or None
    rng: Array  # raw uint32 [2] key (serialisable by orbax)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None, rng=jax.random.PRNGKey(seed))


def make_train_step(cfg: Config, tx: optax.GradientTransformation):
    """state, batch -> (state, metrics). Jit it with `donate_argnums=0`."""
    warm_steps = int(round(cfg.train.decoupled_warmup * cfg.train.steps))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        rng, step_rng = jax.random.split(state.rng)
        warm = state.step < warm_steps
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, step_rng, warm, cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = cfg.train.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "warmup": warm.astype(jnp.float32)}
        return TrainState(state.step + 1, params, opt_state, ema, rng), metrics

    return train_step
