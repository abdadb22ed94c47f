"""The OneStory model: its parameter tree {"dit": Wan DiT, "memory": selector + conditioner}, and
its one forward pass, shared by the training loss and the sampler:

    scores = memory_scores(...)        # Frame Selection reads the caption, then the memory
    context = memory_context(...)      # top-K by a ranking (the scores, or a baseline's), patchified
    v = velocity(..., context)         # the DiT on [noise tokens; context tokens]

Training ranks by the scores (or, in the decoupled warm-up, randomly); sampling by the scores
or a baseline strategy's. Everything else is the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onestory_jax.config import Config
from onestory_jax.models import image_encoder, text_encoder, vae
from onestory_jax.models.dit import ContextTokens, WanDiT
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.memory import OneStoryMemory, conditioner_from_patch_embedding, num_selected, select_top_k
from onestory_jax.sharding import unbox_plain

Array = jax.Array


# Every param part of a full OneStory model, in the order of their init keys (`init_fn`).
PARTS = ("dit", "memory", "vae", "text_encoder", "image_encoder")
MODEL = ("dit", "memory")  # the trained params: a model folder's onestory/ part; the other parts are frozen


def components(cfg: Config) -> tuple[str, ...]:
    """The param parts a full model of `cfg` has: `PARTS`, less the image encoder for T2V."""
    return tuple(p for p in PARTS if p != "image_encoder" or cfg.dit.has_image_branch)


def memory_module(cfg: Config) -> OneStoryMemory:
    """The selector + conditioner module of this config (holds no params)."""
    return OneStoryMemory(cfg.memory, cfg.dit.dim, cfg.dit.head_dim, cfg.dit.rope_theta, cfg.dit_runtime.dtype)


def _memory_init_fn(cfg: Config) -> Callable[[Array], Any]:
    """rng -> boxed params of the memory modules, all random (`_with_patchifiers` then seeds the conditioner)."""
    module = memory_module(cfg)
    caption = jnp.zeros((1, 4, cfg.dit.text_dim))
    memory = jnp.zeros((1, 2, 16, 16, cfg.memory.latent_channels))  # shapes of params do not depend on the memory size
    memory_text = jnp.zeros((1, 2, cfg.dit.text_dim))  # each frame's shot caption (read with selector_reads_captions)

    def fn(rng: Array) -> Any:
        return module.init(rng, caption, memory, jnp.ones((1, 2), bool), memory_text)["params"]

    return fn


def _with_patchifiers(cfg: Config, memory: Any, patch_embedding: Any) -> Any:
    """`memory` (boxed or plain params) with every patchifier derived from `patch_embedding` ({kernel
    [1, ph, pw, C_in, D], bias [D]}: the DiT's, or a finest patchifier) by the average-pool rule
    (`memory.conditioner_from_patch_embedding`); each keeps its box and dtype."""
    pe = unbox_plain(patch_embedding)
    derived = conditioner_from_patch_embedding(pe["kernel"], pe["bias"], cfg.memory)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def put(old: Any, new: Array) -> Any:
        return old.replace_boxed(new.astype(old.value.dtype)) if is_box(old) else new.astype(old.dtype)

    return {**memory, "conditioner": jax.tree.map(put, memory["conditioner"], derived, is_leaf=is_box)}


def init_fn(cfg: Config, parts: Sequence[str] = MODEL) -> Callable[[Array], dict[str, Any]]:
    """rng -> boxed (logically partitioned) params {part: tree} of `parts` (names of `PARTS`; default the
    trained model): the one init of OneStory params, for `sharding.init_sharded` (sharded arrays),
    `sharding.abstract_params` (shapes and shardings, nothing allocated) and checkpoint templates.

    A part's key depends only on rng and its name, so a part is the same whichever parts are made with it.
    The memory modules' selector is random and their patchifiers start from the DiT's patch embedding
    (docs/design.md), as `memory_params` makes them for a given DiT.
    """
    if unknown := sorted(set(parts) - set(PARTS)):
        raise ValueError(f"unknown OneStory params {unknown}; the parts are {PARTS}")
    inits = {
        "dit": lambda: dit_init_fn(cfg.dit, cfg.dit_runtime),
        "memory": lambda: _memory_init_fn(cfg),
        "vae": lambda: vae.init_fn(cfg.vae),
        "text_encoder": lambda: text_encoder.init_fn(cfg.text_encoder),
        "image_encoder": lambda: image_encoder.init_fn(cfg.image_encoder),
    }
    made = {p: inits[p]() for p in {*parts, *(("dit",) if "memory" in parts else ())}}  # memory reads the DiT's

    def fn(rng: Array) -> dict[str, Any]:
        keys = dict(zip(PARTS, jax.random.split(rng, len(PARTS))))
        out = {p: f(keys[p]) for p, f in made.items()}
        if "memory" in out:
            out["memory"] = _with_patchifiers(cfg, out["memory"], out["dit"]["patch_embedding"])
        return {p: out[p] for p in parts}

    return fn


def init_params(cfg: Config, rng: Array) -> dict[str, Any]:
    """Fresh OneStory params {"dit", "memory"} of `init_fn`, unsharded (sharded: `sharding.init_sharded(init_fn(cfg), ...)`)."""
    return _init_program(cfg)(rng)


@functools.cache
def _init_program(cfg: Config) -> Callable[[Array], dict[str, Any]]:
    """`init_params`' program for `cfg`, traced once per process."""
    return jax.jit(lambda rng: nn.meta.unbox(init_fn(cfg)(rng)))


def memory_params(cfg: Config, dit: Any, rng: Array, pretrained: tuple[Config, Any] | None = None) -> Any:
    """Memory modules for the DiT params `dit` (a converted Wan2.1's, a fine-tune's): a random selector and
    patchifiers from its patch embedding, as `init_fn` makes them for its own DiT.

    pretrained: (source config, its memory params), the shared base of a fine-tune (the memory ablation):
    its selector when the selector's settings match (a caption-reading selector takes an image-only one's
    params and starts its zero-initialised phi_C), and every patchifier derived from its finest one, so
    that each variant's context tokens start as the base's DiT learned to read them.
    """
    params = _with_patchifiers(cfg, nn.meta.unbox(jax.jit(_memory_init_fn(cfg))(rng)), dit["patch_embedding"])
    if pretrained is None:
        return params
    source, stored = pretrained
    selector_fields = (
        "num_queries",
        "selector_heads",
        "selector_stride",
        "selector_pooling",
        "selector_token_mlp",
        "latent_channels",
    )
    if all(getattr(cfg.memory, f) == getattr(source.memory, f) for f in selector_fields):
        params["selector"] = {k: stored["selector"].get(k, v) for k, v in params["selector"].items()}  # fresh phi_C stays
    finest = source.memory.patchifier_kernels[0]
    if all(k % f == 0 for kernel in cfg.memory.patchifier_kernels for k, f in zip(kernel[1:], finest[1:])):
        params = _with_patchifiers(cfg, params, stored["conditioner"]["patchifier_0"])
    return params


def memory_scores(
    params: dict[str, Any], cfg: Config, caption: Array, memory: Array, valid: Array, memory_text: Array | None = None
) -> Array:
    """Frame Selection: caption [B, Lt, text_dim], memory [B, F, h, w, C], valid [B, F] -> scores [B, F].

    memory_text [B, F, text_dim]: each frame's shot caption (`memory.caption_summary`), read when
    memory.selector_reads_captions."""
    return memory_module(cfg).apply({"params": params["memory"]}, caption, memory, valid, memory_text, method="score")


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
    return WanDiT(cfg.dit, cfg.dit_runtime).apply({"params": params["dit"]}, x_in, timestep, text, image, context=context)
