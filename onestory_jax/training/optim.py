"""AdamW with warm-up, gradient clipping, regex freezing masks and optional EMA (all optax)."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from onestory_jax.config import TrainConfig


def param_path(path: tuple) -> str:
    """'/'-joined key path of a param leaf, e.g. 'dit/blocks/self_attn/q/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Any, patterns: tuple[str, ...]) -> Any:
    """Bool pytree: True where a param trains (matches any regex; all when there are none)."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not compiled or any(c.search(param_path(path)) for c in compiled), params
    )


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to 10% over the run."""
    warmup = min(cfg.lr_warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1), cfg.learning_rate * 0.1)


def make_optimizer(cfg: TrainConfig, params: Any) -> optax.GradientTransformation:
    """Clip -> AdamW on the trainable params; frozen params get zero updates (and no moments)."""
    adamw = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, weight_decay=cfg.weight_decay),
    )
    mask = trainable_mask(params, cfg.trainable)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)
