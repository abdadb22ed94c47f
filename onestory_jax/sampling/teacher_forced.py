"""One shot sampled from a memory the caller chooses (teacher forcing): the memory ablation's oracle.

The caller gives the earlier shots' latents (e.g. the ground truth's) and a frame strategy; the shot
is generated as a story's later shot would be (`generate.next_shot`: its context, classifier-free
guidance, no I2V image), so "the true frame in context" and "a wrong frame in context" can be
compared on the same noise. One compiled program serves every call of a given memory capacity.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.config import Config
from onestory_jax.diffusion.guidance import null_text
from onestory_jax.sampling.generate import GenerationSpec, StoryInputs, next_shot
from onestory_jax.sampling.memory_bank import empty_bank, write_shot

ShotSampler = Callable[[list[np.ndarray], np.ndarray, np.ndarray], np.ndarray]


def shot_sampler(params: dict, cfg: Config, spec: GenerationSpec, max_memory_shots: int) -> ShotSampler:
    """sample(memory: up to max_memory_shots latents [T, h, w, C], caption embedding [Lt, D],
    noise [T, h, w, C]) -> the shot's latents [T, h, w, C], chosen by `spec.strategy` from that memory."""
    i2v = cfg.dit.has_image_branch

    @jax.jit
    def run(bank_latents: jax.Array, bank_valid: jax.Array, caption: jax.Array, noise: jax.Array) -> jax.Array:
        t = noise.shape[0]
        bank = empty_bank(max_memory_shots, t, *noise.shape[1:]).replace(latents=bank_latents, valid=bank_valid)
        zeros = jnp.zeros((2, *noise.shape), jnp.float32)
        image = jnp.zeros((cfg.image_encoder.num_tokens, cfg.dit.image_dim), jnp.float32) if i2v else None
        inputs = StoryInputs(
            text=jnp.stack([caption, caption]),
            negative=null_text(caption.shape, caption.dtype),
            noise=zeros.at[1].set(noise),
            active=jnp.ones((2,), bool),
            done=jnp.zeros((2,), bool),
            done_latents=zeros,
            cond=jnp.zeros((*noise.shape[:-1], 4 + noise.shape[-1]), jnp.float32) if i2v else None,
            image_tokens=image,
        )
        _, record = next_shot(params, cfg, spec, bank, inputs, jnp.int32(1), image_tokens=image)
        return record.latents

    def sample(memory: list[np.ndarray], caption: np.ndarray, noise: np.ndarray) -> np.ndarray:
        if len(memory) > max_memory_shots:
            raise ValueError(f"{len(memory)} memory shots, the sampler holds {max_memory_shots}")
        bank = empty_bank(max_memory_shots, *noise.shape)
        for i, shot in enumerate(memory):
            bank = write_shot(bank, i, jnp.asarray(shot))
        return np.asarray(run(bank.latents, bank.valid, jnp.asarray(caption), jnp.asarray(noise)))

    return sample
