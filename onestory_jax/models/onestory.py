"""The OneStory model's parameter tree: {"dit": Wan DiT, "memory": selector + conditioner}."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onestory_jax.config import Config
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.memory import OneStoryMemory, conditioner_from_patch_embedding

Array = jax.Array


def memory_init_fn(cfg: Config):
    """rng -> boxed params of the memory modules (random; see `memory_params_from_dit`)."""
    module = OneStoryMemory(cfg.memory, cfg.dit.dim, cfg.dit.head_dim, cfg.dit.rope_theta)
    c = cfg.memory.latent_channels
    caption = jnp.zeros((1, 4, cfg.dit.text_dim))
    memory = jnp.zeros((1, 2, 16, 16, c))  # shapes of params do not depend on the memory size

    def fn(rng: Array) -> Any:
        return module.init(rng, caption, memory, jnp.ones((1, 2), bool))["params"]

    return fn


def memory_params_from_dit(cfg: Config, dit_params: Any, rng: Array) -> Any:
    """Memory modules for a DiT without them: random selector, patchifiers from its patch embedding."""
    params = nn.meta.unbox(jax.jit(memory_init_fn(cfg))(rng))
    pe = dit_params["patch_embedding"]
    return {**params, "conditioner": conditioner_from_patch_embedding(pe["kernel"], pe["bias"], cfg.memory)}


def boxed_init_fn(cfg: Config):
    """rng -> boxed (logically partitioned) OneStory params, for shardings and abstract shapes."""
    dit_fn, mem_fn = dit_init_fn(cfg.dit), memory_init_fn(cfg)

    def fn(rng: Array) -> dict[str, Any]:
        r_dit, r_mem = jax.random.split(rng)
        return {"dit": dit_fn(r_dit), "memory": mem_fn(r_mem)}

    return fn


def init_params(cfg: Config, rng: Array) -> dict[str, Any]:
    """Fresh OneStory params (unsharded; for sharded creation see `sharding.init_sharded`)."""
    r_dit, r_mem = jax.random.split(rng)
    dit = nn.meta.unbox(jax.jit(dit_init_fn(cfg.dit))(r_dit))
    return {"dit": dit, "memory": memory_params_from_dit(cfg, dit, r_mem)}
