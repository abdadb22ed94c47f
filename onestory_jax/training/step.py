"""The train state and the jitted, donated train step: the training loop runs them (`loop.py: initial_state`),
the AOT memory analysis compiles them on ShapeDtypeStructs (`aot.py`), the benchmark times them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from onestory_jax.config import Config
from onestory_jax.training.losses import Batch, loss_fn
from onestory_jax.training.optim import make_optimizer, trainable_mask

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar
    params: Any  # fp32 master weights: {"dit": ..., "memory": ...}
    opt_state: Any
    ema: Any  # EMA of params, or None
    rng: Array  # raw uint32 [2] key (serialisable by orbax)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    """The state at step 0 around `params` (unsharded; the loop's: `make_state`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema else None,
        rng=jax.random.PRNGKey(seed),
    )


def make_state(cfg: Config, params: Any, mesh: Mesh) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """(state at step 0, its shardings, the optimizer of `cfg.train`) around sharded `params`: arrays, or
    ShapeDtypeStructs carrying shardings, which give the state as ShapeDtypeStructs (nothing allocated).

    Params and EMA keep the params' shardings, each optimizer moment its param's (optax's
    tree_map_params), and the scalars (step, counts, rng) are replicated on `mesh`.
    """
    tx = make_optimizer(cfg.train, params)
    build = lambda p: init_state(p, tx, cfg.train.seed, ema=cfg.train.ema_decay > 0)  # noqa: E731
    shapes = jax.eval_shape(build, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = jax.tree.map(lambda p: p.sharding, params)
    masked = lambda a: isinstance(a, optax.MaskedNode)  # noqa: E731  (a frozen param's slot in a masked state)
    shardings = TrainState(
        step=replicated,
        params=params_sh,
        opt_state=optax.tree_map_params(
            tx,
            lambda a, s: a if masked(a) else s,
            shapes.opt_state,
            params_sh,
            transform_non_params=lambda _: replicated,
            is_leaf=masked,
        ),
        ema=None if shapes.ema is None else params_sh,
        rng=replicated,
    )
    if all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params)):
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
        return state, shardings, tx
    # Everything but the params is made on the mesh in its sharding; the params are taken over as they are.
    rest = jax.jit(lambda p: build(p).replace(params=None), out_shardings=shardings.replace(params=None))(params)
    return rest.replace(params=params), shardings, tx


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


def jit_train_step(
    cfg: Config, tx: optax.GradientTransformation, shardings: TrainState, batch_shardings: Any, objective: LossFn = loss_fn
) -> jax.stages.Wrapped:
    """`make_train_step` jitted as the training loop runs it: state -> state donated and laid out as
    `shardings` in and out (one layout across steps and restarts, so that a resumed run executes the very
    program of an uninterrupted one), the batch in `batch_shardings`, the metrics replicated. Call it on
    arrays, or `.lower` it on ShapeDtypeStructs (the AOT memory analysis)."""
    replicated = NamedSharding(shardings.step.mesh, PartitionSpec())
    return jax.jit(
        make_train_step(cfg, tx, objective),
        donate_argnums=0,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, replicated),
    )
