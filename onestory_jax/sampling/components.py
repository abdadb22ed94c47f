"""Load everything a story needs: config, sharded params and the encoder/decoder functions.

Sources: a OneStory checkpoint (one param tree holding dit, memory, vae, text_encoder and
image_encoder), a converted Wan2.1 DiT checkpoint (the memory modules are initialised per
docs/design.md, with a warning), or a config preset with random weights.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax

from onestory_jax import checkpoint
from onestory_jax.config import Config, apply_overrides, from_dict, load_config, to_dict
from onestory_jax.errors import UserError
from onestory_jax.models import byte_tokenizer
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.embedding_cache import EmbeddingCache, encoder_identity
from onestory_jax.models.frozen import (FROZEN_PARTS, Components, build_components, is_model_folder, load_frozen_parts,
                                        model_folder_config)
from onestory_jax.models.onestory import component_init_fns, full_init_fn, memory_params_from_dit
from onestory_jax.sharding import activate, init_sharded, make_mesh

Array = jax.Array

BYTE_TOKENIZER = byte_tokenizer.OUT  # for random-weight models: any text, no download


def random_params(cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """Random params created directly in their shardings; patchifiers from the patch embedding."""
    params = init_sharded(full_init_fn(cfg), mesh, jax.random.key(seed))
    return {**params, "memory": memory_params_from_dit(cfg, params["dit"], jax.random.key(seed + 1))}


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides)).validate() if overrides else cfg


def load_model_folder(folder: Path, cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """Params of a model folder; parts it lacks are initialised (memory from the DiT), with a warning."""
    fns = component_init_fns(cfg)
    if (folder / "onestory").is_dir():
        params = checkpoint.load_params(folder / "onestory", mesh,
                                        lambda rng: {"dit": fns["dit"](rng), "memory": fns["memory"](rng)})
    else:
        params = {"dit": checkpoint.load_params(folder / "dit", mesh, fns["dit"])}
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


def load_checkpoint_params(ckpt: Path, cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """A OneStory checkpoint's params, or a converted DiT's plus freshly initialised other parts."""
    try:
        return checkpoint.load_params(ckpt, mesh, full_init_fn(cfg))
    except UserError as full_error:
        try:
            dit = checkpoint.load_params(ckpt, mesh, dit_init_fn(cfg.dit))
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
