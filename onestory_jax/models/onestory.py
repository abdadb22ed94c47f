"""The OneStory model: its parameter tree {"dit": Wan DiT, "memory": selector + conditioner}, and
its one forward pass, shared by the training loss and the sampler:

    scores = memory_scores(...)        # Frame Selection reads the caption, then the memory
    context = memory_context(...)      # top-K by a ranking (the scores, or a baseline's), patchified
    v = velocity(..., context)         # the DiT on [noise tokens; context tokens]

Training ranks by the scores (or, in the decoupled warm-up, randomly); sampling by the scores
or a baseline strategy's. Everything else is the same code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onestory_jax.config import Config
from onestory_jax.models import image_encoder, text_encoder, vae
from onestory_jax.models.dit import ContextTokens, WanDiT
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.memory import OneStoryMemory, conditioner_from_patch_embedding, num_selected, select_top_k

Array = jax.Array


def memory_module(cfg: Config) -> OneStoryMemory:
    """The selector + conditioner module of this config (holds no params)."""
    return OneStoryMemory(cfg.memory, cfg.dit.dim, cfg.dit.head_dim, cfg.dit.rope_theta, cfg.dit.dtype)


def memory_init_fn(cfg: Config):
    """rng -> boxed params of the memory modules (random; see `memory_params_from_dit`)."""
    module = memory_module(cfg)
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


def memory_params_from_pretrained(cfg: Config, source: Config, memory: Any, dit_params: Any, rng: Array) -> Any:
    """Memory modules for a fine-tune of a model that has them (the shared base of the memory
    ablation): its selector when the selector's settings match, and every patchifier derived from its
    finest one by the average-pool rule, so each variant's context tokens start as the base's DiT
    learned to read them. Parts that cannot be carried over start as `memory_params_from_dit`'s."""
    params = memory_params_from_dit(cfg, dit_params, rng)
    selector_fields = ("num_queries", "selector_heads", "selector_stride", "latent_channels")
    if all(getattr(cfg.memory, f) == getattr(source.memory, f) for f in selector_fields):
        params["selector"] = memory["selector"]
    finest, base = source.memory.patchifier_kernels[0], memory["conditioner"]["patchifier_0"]
    if all(k % f == 0 for kernel in cfg.memory.patchifier_kernels for k, f in zip(kernel[1:], finest[1:])):
        params["conditioner"] = conditioner_from_patch_embedding(base["kernel"], base["bias"], cfg.memory)
    return params


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


def component_init_fns(cfg: Config) -> dict[str, Any]:
    """rng -> boxed params, per component of a full OneStory model."""
    fns = {
        "dit": dit_init_fn(cfg.dit),
        "memory": memory_init_fn(cfg),
        "vae": vae.init_fn(cfg.vae),
        "text_encoder": text_encoder.init_fn(cfg.text_encoder),
    }
    if cfg.dit.has_image_branch:
        fns["image_encoder"] = image_encoder.init_fn(cfg.image_encoder)
    return fns


def full_init_fn(cfg: Config):
    fns = component_init_fns(cfg)

    def fn(rng: jax.Array) -> dict[str, Any]:
        keys = jax.random.split(rng, len(fns))
        return {name: f(k) for (name, f), k in zip(sorted(fns.items()), keys)}

    return fn


def memory_scores(params: dict[str, Any], cfg: Config, caption: Array, memory: Array, valid: Array) -> Array:
    """Frame Selection: caption [B, Lt, text_dim], memory [B, F, h, w, C], valid [B, F] -> scores [B, F]."""
    return memory_module(cfg).apply({"params": params["memory"]}, caption, memory, valid, method="score")


def memory_context(
    params: dict[str, Any],
    cfg: Config,
    memory: Array,
    ranking: Array,
    candidates: Array,
    k: int | None = None,
    keep: Array | None = None,
) -> tuple[ContextTokens, Array, Array, Array]:
    """Top frames of memory [B, F, h, w, C] by ranking [B, F] among candidates [B, F], patchified
    by the Adaptive Conditioner (best = finest).

    k: use at most k frames (default: the conditioner's capacity); keep [B, 1]: samples whose
    context survives (context dropout). Returns (context, indices [B, K], their ranking [B, K],
    selected [B, K]: slot really used; the used slots are a prefix).
    """
    capacity = num_selected(cfg.memory, memory.shape[2:4])
    indices, top, selected = select_top_k(ranking, candidates, capacity)
    if k is not None:
        selected = selected & (jnp.arange(capacity) < k)
    if keep is not None:
        selected = selected & keep
    context = memory_module(cfg).apply({"params": params["memory"]}, memory, indices, selected, method="condition")
    return context, indices, top, selected


def velocity(
    params: dict[str, Any],
    cfg: Config,
    x_t: Array,
    timestep: Array,
    text: Array,
    image: Array | None,
    cond: Array | None,
    context: ContextTokens | None,
) -> Array:
    """The DiT's velocity for noisy latents x_t [B, T, h, w, C] at model timesteps [B].

    text [B, Lt, text_dim]; image [B, Li, image_dim] CLIP tokens and cond [B, T, h, w, 4 + C] the
    I2V mask + image latents (None for T2V); context: memory tokens appended to the sequence.
    """
    x_in = x_t if cond is None else jnp.concatenate([x_t, cond], axis=-1)
    return WanDiT(cfg.dit).apply({"params": params["dit"]}, x_in, timestep, text, image, context=context)
