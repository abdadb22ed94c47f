"""Load everything a story needs: config, sharded params and the encoder/decoder functions.

Sources: a model folder (models/folder.py: a trained OneStory, or a converted Wan2.1 release whose
memory modules are initialised per docs/design.md), or a config preset with random weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax

from onestory_jax import checkpoint
from onestory_jax.config import Config, apply_overrides, from_dict, load_config, to_dict
from onestory_jax.errors import UserError
from onestory_jax.models import byte_tokenizer
from onestory_jax.models.embedding_cache import EmbeddingCache, encoder_identity
from onestory_jax.models.folder import TOKENIZER, folder_config, load_model
from onestory_jax.models.frozen import Components, build_components
from onestory_jax.models.onestory import full_init_fn, memory_params_from_dit
from onestory_jax.sharding import activate, init_sharded, make_mesh

Array = jax.Array

BYTE_TOKENIZER = byte_tokenizer.OUT  # for random-weight models: any text, no download


def random_params(cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """Random params created directly in their shardings; patchifiers from the patch embedding."""
    params = init_sharded(full_init_fn(cfg), mesh, jax.random.key(seed))
    return {**params, "memory": memory_params_from_dit(cfg, params["dit"], jax.random.key(seed + 1))}


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides)).validate() if overrides else cfg


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
    check: Callable[[Config], None] | None = None, allow_random: bool = False,
) -> tuple[Config, dict[str, Any], Components, jax.sharding.Mesh]:
    """(config, params on the mesh, components, mesh) from a model folder or a preset; `check` sees the
    config before any weights are built or read. A folder missing parts is refused unless `allow_random`."""
    if ckpt is not None:
        base = folder_config(Path(ckpt))  # refuses what is not a model folder before anything else
        if tokenizer is None and (Path(ckpt) / "text_encoder").is_dir() and not (Path(ckpt) / TOKENIZER).is_dir():
            raise UserError(f"model folder '{ckpt}' has a text encoder but no tokenizer/: copy the tokenizer there "
                            "or pass --tokenizer DIR (another tokenizer would silently mis-encode every caption)")
        cfg = _with_overrides(base, overrides)
    else:
        cfg = load_config(config_name, overrides)
    if check is not None:
        check(cfg)
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        if ckpt is not None:
            print(f"loading the model folder {ckpt} onto {mesh.size} {jax.devices()[0].platform} device(s)", flush=True)
            params = load_model(Path(ckpt), cfg, mesh, seed, allow_random)
        else:
            print(f"note: config '{cfg.name}' with RANDOM weights (seed {seed}): frames will look like noise; "
                  "use --checkpoint for a trained model")
            params = random_params(cfg, mesh, seed)
    if tokenizer is None:  # a checkpoint ships its tokenizer; random models use the byte tokenizer
        tokenizer = Path(ckpt) / "tokenizer" if ckpt is not None and (Path(ckpt) / "tokenizer").is_dir() else BYTE_TOKENIZER
    cache = None  # random weights change with every seed: nothing worth caching
    if ckpt is not None and (Path(ckpt) / "text_encoder").is_dir():
        cache = text_cache(cfg, Path(ckpt) / "text_encoder" / checkpoint.PARAMS, tokenizer)
    return cfg, params, build_components(cfg, params, tokenizer, cache), mesh
