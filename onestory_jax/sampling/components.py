"""Load everything a story needs: config, sharded params and the encoder/decoder functions.

Sources: a OneStory checkpoint (one param tree holding dit, memory, vae, text_encoder and
image_encoder), a converted Wan2.1 DiT checkpoint (the memory modules are initialised per
docs/design.md, with a warning), or a config preset with random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import checkpoint
from onestory_jax.config import Config, TextEncoderConfig, VAEConfig, apply_overrides, from_dict, load_config, to_dict
from onestory_jax.errors import UserError
from onestory_jax.models import byte_tokenizer, image_encoder, text_encoder, vae
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.embedding_cache import EmbeddingCache, encoder_identity
from onestory_jax.models.onestory import memory_init_fn, memory_params_from_dit
from onestory_jax.sampling.generate import image_tokens
from onestory_jax.sampling.pipeline import Components
from onestory_jax.sharding import activate, init_sharded, make_mesh

Array = jax.Array

BYTE_TOKENIZER = byte_tokenizer.OUT  # for random-weight models: any text, no download


def component_init_fns(cfg: Config) -> dict[str, Any]:
    """rng -> boxed params, per component of a full OneStory model."""
    fns = {"dit": dit_init_fn(cfg.dit), "memory": memory_init_fn(cfg), "vae": vae.init_fn(cfg.vae),
           "text_encoder": text_encoder.init_fn(cfg.text_encoder)}
    if cfg.dit.has_image_branch:
        fns["image_encoder"] = image_encoder.init_fn(cfg.image_encoder)
    return fns


def full_init_fn(cfg: Config):
    fns = component_init_fns(cfg)

    def fn(rng: jax.Array) -> dict[str, Any]:
        keys = jax.random.split(rng, len(fns))
        return {name: f(k) for (name, f), k in zip(sorted(fns.items()), keys)}

    return fn


def random_params(cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """Random params created directly in their shardings; patchifiers from the patch embedding."""
    params = init_sharded(full_init_fn(cfg), mesh, jax.random.key(seed))
    return {**params, "memory": memory_params_from_dit(cfg, params["dit"], jax.random.key(seed + 1))}


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides)).validate() if overrides else cfg


FROZEN_PARTS = ("vae", "text_encoder", "image_encoder")  # converted checkpoints in a model folder


def is_model_folder(path: Path) -> bool:
    """A folder with onestory/ (trained DiT + memory, from train.py) or dit/ (converted), plus frozen parts."""
    return (path / "onestory").is_dir() or (path / "dit").is_dir()


def model_folder_config(folder: Path) -> Config:
    """Config of a model folder: the onestory/ (or dit/, or a frozen part's) checkpoint's, with each
    frozen part's own section."""
    base = next((folder / p for p in ("onestory", "dit", *FROZEN_PARTS) if (folder / p).is_dir()), None)
    if base is None:
        raise UserError(f"'{folder}' is not a model folder: it has none of onestory/, dit/, {'/, '.join(FROZEN_PARTS)}/")
    cfg = checkpoint.load_config_from_checkpoint(base)
    sections = {part: getattr(checkpoint.load_config_from_checkpoint(folder / part), part)
                for part in FROZEN_PARTS if (folder / part).is_dir()}
    return dataclasses.replace(cfg, **sections).validate()


def load_model_folder(folder: Path, cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """Params of a model folder; parts it lacks are initialised (memory from the DiT), with a warning."""
    fns = component_init_fns(cfg)
    if (folder / "onestory").is_dir():
        params = checkpoint.load_params(folder / "onestory", mesh, cfg,
                                        lambda rng: {"dit": fns["dit"](rng), "memory": fns["memory"](rng)})
    else:
        params = {"dit": checkpoint.load_params(folder / "dit", mesh, cfg, fns["dit"])}
        params["memory"] = memory_params_from_dit(cfg, params["dit"], jax.random.key(seed + 1))
        warnings.warn(f"'{folder}' has no OneStory modules: the Frame Selector is random and the patchifiers are "
                      "initialised from the DiT's patch embedding (docs/design.md)", stacklevel=2)
    frozen = [p for p in FROZEN_PARTS if p in fns]
    missing = [p for p in frozen if not (folder / p).is_dir()]
    if missing:
        warnings.warn(f"'{folder}' lacks {', '.join(missing)}/: using RANDOM weights for them "
                      "(convert them into the folder, see docs/conversion.md)", stacklevel=2)
        params.update({p: v for p, v in random_params(cfg, mesh, seed).items() if p in missing})
    params.update(load_frozen_parts(folder, cfg, mesh, [p for p in frozen if p not in missing]))
    return params


def load_frozen_parts(folder: Path, cfg: Config, mesh: jax.sharding.Mesh, parts: list[str]) -> dict[str, Any]:
    """The converted or trained frozen parts (vae, text_encoder, image_encoder) of a model folder."""
    fns = component_init_fns(cfg)
    return {p: checkpoint.load_params(folder / p, mesh, cfg, fns[p]) for p in parts}


def load_checkpoint_params(ckpt: Path, cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """A OneStory checkpoint's params, or a converted DiT's plus freshly initialised other parts."""
    try:
        return checkpoint.load_params(ckpt, mesh, cfg, full_init_fn(cfg))
    except UserError as full_error:
        try:
            dit = checkpoint.load_params(ckpt, mesh, cfg, dit_init_fn(cfg.dit))
        except UserError:
            raise full_error from None
    warnings.warn(
        f"'{ckpt}' holds a Wan2.1 DiT without OneStory modules: the Frame Selector is random and the "
        "patchifiers are initialised from the patch embedding; VAE and encoders are random too until "
        "their converted weights are merged (see docs/conversion.md)", stacklevel=2)
    rest = random_params(cfg, mesh, seed)
    return {**rest, "dit": dit, "memory": memory_params_from_dit(cfg, dit, jax.random.key(seed + 1))}


def text_cache(cfg: Config, encoder_weights: Path, tokenizer_dir: Path) -> EmbeddingCache:
    """Prompt embeddings on disk ($ONESTORY_CACHE or ~/.cache/onestory_jax), keyed by prompt, encoder
    and tokenizer (its files by content)."""
    root = Path(os.environ.get("ONESTORY_CACHE", Path.home() / ".cache" / "onestory_jax")) / "text_embeddings"
    tok = hashlib.sha256()
    for f in sorted(p for p in Path(tokenizer_dir).rglob("*") if p.is_file()):
        tok.update(f.name.encode() + f.read_bytes())
    return EmbeddingCache(root, encoder_identity(cfg.text_encoder, encoder_weights) + tok.hexdigest()[:16])


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
def image_tokens_fn(cfg: Config) -> Callable[[dict[str, Any], Array], Array]:
    """jit (params, image [H, W, 3]) -> CLIP tokens [Li, image_dim]."""
    return jax.jit(functools.partial(image_tokens, cfg))


def build_components(cfg: Config, params: dict[str, Any], tokenizer_dir: Path, cache: EmbeddingCache | None = None) -> Components:
    """Host-callable encode/decode functions over jitted JAX models; text embeddings cached if given."""
    tok = text_encoder.load_tokenizer(tokenizer_dir)
    t5_apply = functools.partial(text_encoder_fn(cfg.text_encoder), params["text_encoder"])
    encode, decode = vae_encode_fn(cfg.vae), vae_decode_fn(cfg.vae)

    def encode_text(prompts: list[str]) -> np.ndarray:
        return text_encoder.encode_prompts(prompts, tok, t5_apply, cfg.text_encoder.text_len, cache)

    encode_image = None
    if cfg.dit.has_image_branch:
        encode_image = lambda image: np.asarray(image_tokens_fn(cfg)({"image_encoder": params["image_encoder"]}, jnp.asarray(image)))
    return Components(
        encode_text=encode_text,
        encode_video=lambda video: np.asarray(encode(params["vae"], jnp.asarray(video)[None]))[0],
        decode_latents=lambda z: np.asarray(decode(params["vae"], jnp.asarray(z)[None]))[0],
        encode_image=encode_image,
    )


def load_for_sampling(
    ckpt: Path | None, config_name: str | None, overrides: list[str], seed: int, tokenizer: Path | None = None,
    check: Callable[[Config], None] | None = None,
) -> tuple[Config, dict[str, Any], Components, jax.sharding.Mesh]:
    """(config, params on the mesh, components, mesh) from a checkpoint or a preset; `check` sees the
    config before any weights are built or read."""
    if ckpt is not None:
        if not Path(ckpt).is_dir():
            raise UserError(f"checkpoint directory '{ckpt}' does not exist")
        folder = is_model_folder(Path(ckpt))
        trained_text = folder and (Path(ckpt) / "text_encoder").is_dir()
        if tokenizer is None and trained_text and not (Path(ckpt) / "tokenizer").is_dir():
            raise UserError(f"model folder '{ckpt}' has a text encoder but no tokenizer/: copy the tokenizer there "
                            "or pass --tokenizer DIR (another tokenizer would silently mis-encode every caption)")
        base = model_folder_config(Path(ckpt)) if folder else checkpoint.load_config_from_checkpoint(ckpt)
        cfg = _with_overrides(base, overrides)
    else:
        cfg = load_config(config_name, overrides)
    if check is not None:
        check(cfg)
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        if ckpt is not None and folder:
            params = load_model_folder(Path(ckpt), cfg, mesh, seed)
        elif ckpt is not None:
            params = load_checkpoint_params(Path(ckpt), cfg, mesh, seed)
        else:
            print(f"note: config '{cfg.name}' with RANDOM weights (seed {seed}): frames will look like noise; "
                  "use --checkpoint for a trained model")
            params = random_params(cfg, mesh, seed)
    if tokenizer is None:  # a checkpoint ships its tokenizer; random models use the byte tokenizer
        tokenizer = Path(ckpt) / "tokenizer" if ckpt is not None and (Path(ckpt) / "tokenizer").is_dir() else BYTE_TOKENIZER
    cache = None  # random weights change with every seed: nothing worth caching
    if ckpt is not None:
        cache = text_cache(cfg, Path(ckpt) / ("text_encoder" if folder else "") / checkpoint.PARAMS, tokenizer)
        if folder and not (Path(ckpt) / "text_encoder").is_dir():
            cache = None  # a random text encoder: nothing worth caching
    return cfg, params, build_components(cfg, params, tokenizer, cache), mesh
