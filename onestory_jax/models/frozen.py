"""The frozen parts of a OneStory model (Wan-VAE, umT5, CLIP): their jitted encode/decode functions as
host callables (`Components`). A model folder keeps them (models/folder.py).

Sampling and data preparation (which encodes training data with the same parts) both use them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.config import Config, TextEncoderConfig, VAEConfig
from onestory_jax.models import image_encoder, lowvram, prompts, text_encoder, vae
from onestory_jax.models.embedding_cache import EmbeddingCache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Components:
    """The encoders and decoder a story needs, as host-callable functions."""

    encode_text: Callable[[list[str]], np.ndarray]  # prompts -> [N, Lt, text_dim]
    encode_video: Callable[[np.ndarray], np.ndarray]  # [T, H, W, 3] in [-1, 1] -> latents [t, h, w, 16]
    decode_latents: Callable[[np.ndarray], np.ndarray]  # latents [t, h, w, 16] -> [T, H, W, 3] in [-1, 1]
    encode_image: Callable[[np.ndarray], np.ndarray] | None  # [H, W, 3] in [-1, 1] -> CLIP tokens [Li, image_dim]


def image_tokens(cfg: Config, params: dict[str, Any], image: Array) -> Array:
    """CLIP tokens [Li, image_dim] of an image [H, W, 3] in [-1, 1] (traceable)."""
    pixels = image_encoder.preprocess(image, cfg.image_encoder)[None]
    return image_encoder.CLIPVisionTower(cfg.image_encoder).apply({"params": params["image_encoder"]}, pixels)[0]


# Jitted entry points: parameters are always arguments, never closed over (closed-over arrays are
# compiled in as constants: 11 GB of umT5 weights at 14B). One compiled function per config.


@functools.cache
def text_encoder_fn(cfg: TextEncoderConfig) -> Callable[[Any, Array, Array], Array]:
    """jit (params, ids [N, L], mask [N, L]) -> umT5 embeddings [N, L, D]."""
    t5 = text_encoder.UMT5Encoder(cfg)
    return jax.jit(lambda params, ids, mask: t5.apply({"params": params}, ids, mask))


@functools.cache
def vae_encode_fn(cfg: VAEConfig) -> Callable[[Any, Array], Array]:
    """jit (params, video [B, T, H, W, 3]) -> normalised latents [B, t, h, w, z]."""
    return jax.jit(functools.partial(vae.encode, cfg))


@functools.cache
def vae_decode_fn(cfg: VAEConfig) -> Callable[[Any, Array], Array]:
    """jit (params, latents [B, t, h, w, z]) -> video [B, T, H, W, 3] in [-1, 1]."""
    return jax.jit(functools.partial(vae.decode, cfg))


@functools.cache
def vae_decode_raw_fn(cfg: VAEConfig) -> Callable[[Any, Array], Array]:
    """jit (params, latents [B, t, h, w, z]) -> video [B, T, H, W, 3], unclamped (one tile of `vae.tiled_decode`)."""
    return jax.jit(functools.partial(vae.decode_raw, cfg))


def decode_video(cfg: VAEConfig, params: Any, latents: np.ndarray) -> np.ndarray:
    """Latents [B, t, h, w, z] -> video [B, T, H, W, 3] in [-1, 1] on the host: whole, or with `vae.tile` tile by
    tile (one jitted call each, so that one tile's decode is all the device holds at a time)."""
    if not cfg.tile:
        return np.asarray(vae_decode_fn(cfg)(params, jnp.asarray(latents)))
    raw = vae_decode_raw_fn(cfg)
    return vae.tiled_decode(cfg, np.asarray(latents), lambda tile: np.asarray(raw(params, jnp.asarray(tile))))


@functools.cache
def image_tokens_fn(cfg: Config) -> Callable[[dict[str, Any], Array], Array]:
    """jit (params, image [H, W, 3]) -> CLIP tokens [Li, image_dim]."""
    return jax.jit(functools.partial(image_tokens, cfg))


def on_host(fn: Callable[..., Array]) -> Callable[..., Array]:
    """`fn` called under the host CPU's mesh (`lowvram.host_mesh`), for params that live there."""

    def called(*args: Any) -> Array:
        with jax.set_mesh(lowvram.host_mesh()):
            return fn(*args)

    return called


def build_components(cfg: Config, params: dict[str, Any], tokenizer_dir: Path, cache: EmbeddingCache | None = None) -> Components:
    """Host-callable encode/decode functions over jitted JAX models; text embeddings cached if given."""
    tok = prompts.load_tokenizer(tokenizer_dir)
    t5_apply = functools.partial(text_encoder_fn(cfg.text_encoder), params["text_encoder"])
    if cfg.text_encoder.device == "cpu":  # its params are on the host CPU's mesh: it runs there, whatever mesh is active
        t5_apply = on_host(t5_apply)
    encode = vae_encode_fn(cfg.vae)

    def encode_text(texts: list[str]) -> np.ndarray:
        return prompts.encode_prompts(texts, tok, t5_apply, cfg.text_encoder.text_len, cache)

    encode_image = None
    if cfg.dit.has_image_branch:
        encode_image = lambda image: np.asarray(
            image_tokens_fn(cfg)({"image_encoder": params["image_encoder"]}, jnp.asarray(image))
        )
    return Components(
        encode_text=encode_text,
        encode_video=lambda video: np.asarray(encode(params["vae"], jnp.asarray(video)[None]))[0],
        decode_latents=lambda z: decode_video(cfg.vae, params["vae"], np.asarray(z)[None])[0],
        encode_image=encode_image,
    )
