"""Load everything a story needs: config, sharded params and the encoder/decoder functions.

Sources: a model folder (models/folder.py: a trained OneStory, or a converted Wan2.1 release whose
memory modules are initialised per docs/design.md), or a config preset with random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import checkpoint
from onestory_jax.config import Config
from onestory_jax.config_files import apply_overrides, from_dict, load_config, to_dict
from onestory_jax.errors import UserError
from onestory_jax.models import byte_tokenizer, lowvram
from onestory_jax.models.embedding_cache import EmbeddingCache, encoder_identity
from onestory_jax.models.folder import TOKENIZER, folder_config, load_model
from onestory_jax.models.frozen import Components, build_components
from onestory_jax.models.onestory import components, init_fn
from onestory_jax.sharding import abstract_params, activate, init_program, make_mesh

BYTE_TOKENIZER = byte_tokenizer.OUT  # for random-weight models: any text, no download


def part_meshes(cfg: Config) -> dict[str, jax.sharding.Mesh]:
    """The parts the low-VRAM switches keep off the model's mesh at first, on the host CPU's mesh: the DiT until
    `lowvram.place_dit` quantizes and places it, the text encoder for good (`text_encoder.device=cpu`)."""
    host = {"dit": lowvram.loads_via_host(cfg.dit_runtime), "text_encoder": cfg.text_encoder.device == "cpu"}
    return {part: lowvram.host_mesh() for part, on_host in host.items() if on_host}


@functools.cache
def _part_init(plain: Config, name: str, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], dict[str, Any]]:
    """The program seed -> {name: its params} of `onestory.init_fn(plain, every part)`, on `mesh`: traced once per
    process (a studio or a test run renders many stories). The key is made inside: a key made outside would
    carry the mesh of its context to another part's mesh."""
    return init_program(lambda seed: init_fn(plain, [name])(jax.random.key(seed)), mesh, jax.ShapeDtypeStruct((), jnp.int32))


def random_params(cfg: Config, mesh: jax.sharding.Mesh, seed: int) -> dict[str, Any]:
    """Random params created directly in their shardings, part by part (those of `part_meshes` on the host
    first), each as `onestory.init_fn(cfg, every part)` makes it from key `seed`, wherever it is made."""
    plain = dataclasses.replace(cfg, dit_runtime=cfg.dit_runtime.plain())
    meshes = part_meshes(cfg)
    params = {}
    for name in components(cfg):
        part_mesh = meshes.get(name, mesh)
        with activate(part_mesh):
            params.update(_part_init(plain, name, part_mesh)(np.int32(seed)))
    if "dit" in meshes:
        params["dit"] = lowvram.place_dit(params["dit"], cfg.dit, cfg.dit_runtime, mesh)
    return params


def onto_mesh(cfg: Config, params: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Loaded params with a DiT (and memory modules) read on the host put on `mesh`: the DiT by
    `lowvram.place_dit`, the memory modules in their logical shardings."""
    if not lowvram.loads_via_host(cfg.dit_runtime):
        return params
    plain = dataclasses.replace(cfg, dit_runtime=cfg.dit_runtime.plain())
    memory = jax.tree.map(lambda a: a.sharding, abstract_params(init_fn(plain, ["memory"]), mesh, jax.random.key(0))["memory"])
    dit = lowvram.place_dit(params["dit"], cfg.dit, cfg.dit_runtime, mesh)
    return {**params, "dit": dit, "memory": jax.device_put(params["memory"], memory)}


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
    ckpt: Path | None,
    config_name: str | None,
    overrides: list[str],
    seed: int,
    tokenizer: Path | None = None,
    check: Callable[[Config], None] | None = None,
    allow_random: bool = False,
) -> tuple[Config, dict[str, Any], Components, jax.sharding.Mesh]:
    """(config, params on the mesh, components, mesh) from a model folder or a preset; `check` sees the
    config before any weights are built or read. A folder missing parts is refused unless `allow_random`."""
    if ckpt is not None:
        base = folder_config(Path(ckpt))  # refuses what is not a model folder before anything else
        if tokenizer is None and (Path(ckpt) / "text_encoder").is_dir() and not (Path(ckpt) / TOKENIZER).is_dir():
            raise UserError(
                f"model folder '{ckpt}' has a text encoder but no tokenizer/: copy the tokenizer there "
                "or pass --tokenizer DIR (another tokenizer would silently mis-encode every caption)"
            )
        cfg = _with_overrides(base, overrides)
    else:
        cfg = load_config(config_name, overrides)
    if check is not None:
        check(cfg)
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        if ckpt is not None:
            print(f"loading the model folder {ckpt} onto {mesh.size} {jax.devices()[0].platform} device(s)", flush=True)
            params = onto_mesh(cfg, load_model(Path(ckpt), cfg, mesh, seed, allow_random, part_meshes(cfg)), mesh)
        else:
            print(
                f"note: config '{cfg.name}' with RANDOM weights (seed {seed}): frames will look like noise; "
                "use --checkpoint for a trained model"
            )
            params = random_params(cfg, mesh, seed)
    if tokenizer is None:  # a checkpoint ships its tokenizer; random models use the byte tokenizer
        tokenizer = Path(ckpt) / "tokenizer" if ckpt is not None and (Path(ckpt) / "tokenizer").is_dir() else BYTE_TOKENIZER
    cache = None  # random weights change with every seed: nothing worth caching
    if ckpt is not None and (Path(ckpt) / "text_encoder").is_dir():
        cache = text_cache(cfg, Path(ckpt) / "text_encoder" / checkpoint.PARAMS, tokenizer)
    comps = build_components(cfg, params, tokenizer, cache)
    if cfg.text_encoder.device == "cpu":  # held by the components only: the story program's params stay on the mesh
        params = {k: v for k, v in params.items() if k != "text_encoder"}
    return cfg, params, comps, mesh
