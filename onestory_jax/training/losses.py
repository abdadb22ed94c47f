"""OneStory's training objective: rectified flow on the target shot + lambda * L_sel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from onestory_jax.config import Config
from onestory_jax.diffusion.guidance import null_text
from onestory_jax.diffusion.schedule import add_noise, sample_training_sigmas, velocity_target
from onestory_jax.models.dit import ContextTokens
from onestory_jax.models.memory import baseline_candidates, num_selected
from onestory_jax.models.onestory import memory_context, memory_scores, velocity
from onestory_jax.training.optim import trainable_mask

Array = jax.Array

# A training batch (leading dim B):
#   target [B, T, h, w, 16]   latents of the shot to generate (x0)
#   memory [B, F, h, w, 16]   latents of the earlier shots; memory_valid [B, F]
#   labels [B, F]             frame-relevance pseudo-labels (real: similarity; inserted -1; augmented 0)
#   text [B, Lt, text_dim]    caption embedding of the target shot
#   memory_text [B, F, text_dim]  pooled caption of each memory frame's shot (memory.selector_reads_captions)
#   image [B, Li, image_dim], cond [B, T, h, w, 20]   I2V only
#   loss_weight [B, T, h, w]  optional weight of each latent cell in L_shot
Batch = dict[str, Array]


def selection_loss(scores: Array, labels: Array, valid: Array) -> Array:
    """L_sel = MSE between frame scores and pseudo-labels over valid memory frames."""
    err = jnp.where(valid, (scores - labels) ** 2, 0.0)
    return err.sum() / jnp.maximum(valid.sum(), 1)


DEGRADE_NOISE = 0.3  # std of the noise on a degraded frame, in units of the (normalised) latents


def degrade_frames(memory: Array, share: float, rng: Array) -> Array:
    """memory [B, F, h, w, C] with each frame, at probability `share`, blurred (3x3 box, edges replicated)
    and noised (std DEGRADE_NOISE): what a selector reading a small model's generated frames faces."""
    if share == 0.0:
        return memory
    r_pick, r_noise = jax.random.split(rng)
    h, w = memory.shape[2:4]
    padded = jnp.pad(memory, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    noisy = blurred + DEGRADE_NOISE * jax.random.normal(r_noise, memory.shape, memory.dtype)
    pick = jax.random.bernoulli(r_pick, share, memory.shape[:2])[:, :, None, None, None]
    return jnp.where(pick, noisy, memory)


def scored_selection_loss(params: dict, batch: Batch, cfg: Config, degrade: Array | None = None) -> tuple[Array, Array]:
    """Frame Selection's scores of the batch's memory [B, F] and their L_sel. degrade: an rng key to show the
    selector `train.selector_degrade` of the frames degraded (training; None: as they are)."""
    memory = batch["memory"] if degrade is None else degrade_frames(batch["memory"], cfg.train.selector_degrade, degrade)
    scores = memory_scores(params, cfg, batch["text"], memory, batch["memory_valid"], batch.get("memory_text"))
    return scores, selection_loss(scores, batch["labels"], batch["memory_valid"])


def training_ranking(scores: Array, batch: Batch, warm: Array, rng: Array, cfg: Config) -> tuple[Array, Array]:
    """(ranking [B, F], candidates [B, F]) of the conditioning frames: the selector's scores or,
    during the decoupled warm-up (`warm`), random among all valid frames (never only the other
    shot's: on a recall example that would show the DiT the wrong character). `random` ranks at
    random always; another baseline memory.train_strategy (the paper's ablation trains each variant
    with its own scheme, section 5.3) ranks by its own rule, without warm-up."""
    valid, strategy = batch["memory_valid"], cfg.memory.train_strategy
    if strategy not in ("onestory", "random"):
        k = num_selected(cfg.memory, batch["memory"].shape[2:4])
        return jax.vmap(lambda v: baseline_candidates(strategy, v, k))(valid)
    at_random = warm | (strategy == "random")
    return jnp.where(at_random, jax.random.uniform(rng, scores.shape), scores), valid


def select_and_condition(
    params: dict, batch: Batch, warm: Array, rng: Array, keep: Array, cfg: Config, degrade: Array | None = None
) -> tuple[Array, ContextTokens]:
    """Score the memory, pick the conditioning frames (`training_ranking`), patchify them:
    -> (L_sel, context tokens). keep [B, 1]: samples whose context survives context dropout; degrade: the
    rng key of the selector's degraded view (`scored_selection_loss`; the context is always the intact frames).
    """
    scores, l_sel = scored_selection_loss(params, batch, cfg, degrade)
    ranking, candidates = training_ranking(scores, batch, warm, rng, cfg)
    context, *_ = memory_context(params, cfg, batch["memory"], ranking, candidates, keep=keep)
    return l_sel, context


def shot_loss(params: dict, batch: Batch, context: ContextTokens, text: Array, sigma: Array, noise: Array, cfg: Config) -> Array:
    """Rectified-flow MSE on the target shot's noise tokens at per-sample sigmas [B]; weighted per latent
    cell by batch["loss_weight"] [B, T, h, w] when given (e.g. the characters' cells up-weighted)."""
    x0 = batch["target"]
    v = velocity(params, cfg, add_noise(x0, noise, sigma), sigma * 1000.0, text, batch.get("image"), batch.get("cond"), context)
    err = (v.astype(jnp.float32) - velocity_target(x0, noise)) ** 2
    if "loss_weight" not in batch:
        return jnp.mean(err)
    weight = batch["loss_weight"][..., None].astype(jnp.float32)
    return jnp.sum(weight * err) / (jnp.maximum(jnp.sum(weight), 1e-6) * err.shape[-1])


def only_the_selector_trains(params: dict, cfg: Config) -> bool:
    """train.trainable leaves only Frame Selection's params training. Top-K is hard, so L_shot then reaches no
    trainable param, and a step needs L_sel alone (no DiT pass): the selector stage of docs/demo.md."""
    mask = trainable_mask(params, cfg.train.trainable)
    rest = {**mask, "memory": {k: v for k, v in mask["memory"].items() if k != "selector"}}
    return bool(cfg.train.trainable) and not any(jax.tree.leaves(rest))


def loss_fn(params: dict, batch: Batch, rng: Array, warm: Array, cfg: Config) -> tuple[Array, dict[str, Array]]:
    """Total loss and metrics. `warm` (bool scalar): decoupled-conditioning warm-up is on."""
    tc = cfg.train
    r_sel, r_sigma, r_noise, r_text, r_ctx = jax.random.split(rng, 5)
    b = batch["target"].shape[0]
    if only_the_selector_trains(params, cfg):
        _, l_sel = scored_selection_loss(params, batch, cfg, jax.random.fold_in(r_sel, 1))
        return tc.selection_weight * l_sel, {"loss": tc.selection_weight * l_sel, "l_sel": l_sel}
    keep_ctx = jax.random.uniform(r_ctx, (b, 1)) >= tc.context_dropout
    l_sel, context = select_and_condition(params, batch, warm, r_sel, keep_ctx, cfg, jax.random.fold_in(r_sel, 1))
    keep_text = jax.random.uniform(r_text, (b, 1, 1)) >= tc.text_dropout
    text = jnp.where(keep_text, batch["text"], null_text(batch["text"].shape[1:], batch["text"].dtype))
    noise = jax.random.normal(r_noise, batch["target"].shape, batch["target"].dtype)
    sigma = sample_training_sigmas(r_sigma, (b,), tc.timestep_shift)
    l_shot = shot_loss(params, batch, context, text, sigma, noise, cfg)
    loss = l_shot + tc.selection_weight * l_sel
    return loss, {"loss": loss, "l_shot": l_shot, "l_sel": l_sel}


def loss_at_sigmas(params: dict, batch: Batch, sigmas: Array, rng: Array, cfg: Config, keep_context: bool = True) -> Array:
    """L_shot at each fixed sigma [S] -> [S] (validation): the trained scheme's context (with
    keep_context=False, all of it masked), no dropout, one noise draw from `rng` shared by all sigmas."""
    b = batch["target"].shape[0]
    keep = jnp.full((b, 1), keep_context)
    _, context = select_and_condition(params, batch, jnp.array(False), rng, keep, cfg)
    noise = jax.random.normal(rng, batch["target"].shape, batch["target"].dtype)
    one = lambda s: shot_loss(params, batch, context, batch["text"], jnp.full((b,), s), noise, cfg)
    return jax.lax.map(one, sigmas)
