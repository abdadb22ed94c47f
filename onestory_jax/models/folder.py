"""The model folder: the one on-disk format of a OneStory model (docs/model-folder.md).

    M/onestory/        config.yaml + params {"dit": Wan DiT, "memory": OneStory modules}; a converted
                       Wan2.1 release holds {"dit"} only, and its memory modules start as
                       `onestory.memory_params` makes them
    M/vae/             Wan-VAE             (config.yaml + params)
    M/text_encoder/    umT5 encoder        (config.yaml + params)
    M/image_encoder/   CLIP vision tower   (config.yaml + params; I2V models only)
    M/tokenizer/       the text encoder's tokenizer files

`convert --component all`, train.py's export and the vae stage write it; sample.py, train.init_from,
data.prepare and the benches read it. Reading is strict: an unknown sub-folder, or a missing part, is
refused with one line; random weights for missing parts only when asked (`allow_random`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax

from onestory_jax import checkpoint
from onestory_jax.config import Config, DiTConfig
from onestory_jax.errors import UserError
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.onestory import MODEL, components, init_fn, memory_params
from onestory_jax.sharding import activate, init_sharded

ONESTORY = "onestory"
FROZEN_PARTS = ("vae", "text_encoder", "image_encoder")
TOKENIZER = "tokenizer"
PARTS = (ONESTORY, *FROZEN_PARTS, TOKENIZER)
LEGACY_DIT = "dit"  # earlier versions converted the DiT to M/dit/ (a bare DiT tree); still read


def is_model_folder(path: Path) -> bool:
    """Whether `path` holds any part of a model folder (a bare checkpoint holds config.yaml + params/)."""
    return any((path / p).is_dir() for p in (*PARTS, LEGACY_DIT))


def check_folder(folder: Path) -> None:
    """Refuse a path that is not a model folder, or one holding a sub-folder that is not a part."""
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist")
    if (folder / checkpoint.CONFIG).is_file() and (folder / checkpoint.PARAMS).exists():
        raise UserError(
            f"'{folder}' is a single checkpoint, not a model folder (docs/model-folder.md): convert a Wan2.1 "
            "release with `python -m onestory_jax.convert --component all`, or use a run's WORKDIR/model"
        )
    unknown = sorted(
        d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in (*PARTS, LEGACY_DIT)
    )
    if unknown:
        raise UserError(
            f"model folder '{folder}' holds {', '.join(u + '/' for u in unknown)}, not a part of a model folder "
            f"(its parts: {', '.join(p + '/' for p in PARTS)}; docs/model-folder.md)"
        )
    if not is_model_folder(folder):
        raise UserError(f"'{folder}' is not a model folder: it has none of {', '.join(p + '/' for p in PARTS)}")


def dit_part(folder: Path) -> Path | None:
    """The folder's DiT checkpoint: onestory/, or the legacy dit/ of earlier conversions."""
    return next((folder / p for p in (ONESTORY, LEGACY_DIT) if (folder / p).is_dir()), None)


def required_parts(cfg: Config) -> list[str]:
    """The parts a model of this config needs (no image encoder for T2V)."""
    return [p for p in PARTS if p != "image_encoder" or cfg.dit.has_image_branch]


def missing_parts(folder: Path, cfg: Config) -> list[str]:
    return [p for p in required_parts(cfg) if not (dit_part(folder) if p == ONESTORY else (folder / p).is_dir())]


def folder_config(folder: Path) -> Config:
    """Config of a model folder: its DiT checkpoint's (else a frozen part's), with each frozen part's
    own section."""
    check_folder(folder)
    base = dit_part(folder) or next(folder / p for p in FROZEN_PARTS if (folder / p).is_dir())
    cfg = checkpoint.load_config_from_checkpoint(base)
    sections = {
        part: getattr(checkpoint.load_config_from_checkpoint(folder / part), part)
        for part in FROZEN_PARTS
        if (folder / part).is_dir()
    }
    return dataclasses.replace(cfg, **sections).validate()


def require_parts(folder: Path, cfg: Config, allow_random: bool) -> list[str]:
    """The parts of this config the folder lacks: refused with one line unless `allow_random`, when
    they are named in a warning (and later initialised at random)."""
    missing = missing_parts(folder, cfg)
    if missing and not allow_random:
        raise UserError(
            f"model folder '{folder}' lacks {', '.join(m + '/' for m in missing)} (docs/model-folder.md): convert "
            "them into it, or pass --allow-random to use RANDOM weights (tests and benchmarks only)"
        )
    if missing:
        warnings.warn(f"'{folder}' lacks {', '.join(m + '/' for m in missing)}: using RANDOM weights for them", stacklevel=2)
    return missing


def architecture_differences(ours: DiTConfig, theirs: DiTConfig) -> list[str]:
    """'field ours != theirs' for every architecture field where two DiT configs differ."""
    a, b = ours.architecture(), theirs.architecture()
    return [
        f"{f.name} {getattr(a, f.name)} != {getattr(b, f.name)}"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def read_onestory(folder: Path, cfg: Config, mesh: jax.sharding.Mesh) -> tuple[Config, dict[str, Any]]:
    """(stored config, {"dit": ..., and "memory" when stored}) of the folder's DiT checkpoint, sharded on
    `mesh` in this config's dtypes; refused unless its DiT has this config's architecture."""
    path = dit_part(folder)
    if path is None:
        raise UserError(f"model folder '{folder}' has no {ONESTORY}/ (the DiT and OneStory modules)")
    source = checkpoint.load_config_from_checkpoint(path)
    if diff := architecture_differences(cfg.dit, source.dit):
        raise UserError(
            f"the DiT of '{folder}' differs from this config's dit section: {'; '.join(diff)} (this config != the folder's)"
        )
    if path.name == LEGACY_DIT:  # a bare DiT tree
        return source, {"dit": checkpoint.load_params(path, mesh, dit_init_fn(source.dit, cfg.dit_runtime.plain()))}
    stored = dataclasses.replace(source, dit_runtime=cfg.dit_runtime.plain())  # the stored tree, in this config's param dtype
    return source, checkpoint.load_params(path, mesh, init_fn(stored, sorted(checkpoint.stored_keys(path) & set(MODEL))))


def load_model(
    folder: Path,
    cfg: Config,
    mesh: jax.sharding.Mesh,
    seed: int,
    allow_random: bool = False,
    meshes: dict[str, jax.sharding.Mesh] | None = None,
) -> dict[str, Any]:
    """Every param of a model folder, sharded on `mesh`: its DiT and memory modules (initialised from the
    DiT when it has none, with a note), and frozen parts. Missing parts: see `require_parts`. The DiT is the
    stored tree (`DiTRuntime.plain`: low-VRAM switches apply after loading). `meshes`: a part's own mesh
    instead of `mesh` ("dit" for the DiT and the memory modules, "text_encoder", ...), e.g. the host CPU's."""
    on = lambda part: (meshes or {}).get(part, mesh)  # noqa: E731
    cfg = dataclasses.replace(cfg, dit_runtime=cfg.dit_runtime.plain())
    missing = require_parts(folder, cfg, allow_random)
    parts = components(cfg)
    params = {}
    for p in [p for p in missing if p in parts]:  # random frozen parts, as `init_fn` makes them
        with activate(on(p)):  # each part is read or made under its own mesh (keys, checks and all)
            params.update(init_sharded(init_fn(cfg, [p]), on(p), jax.random.key(seed)))
    with activate(on("dit")):
        if ONESTORY in missing:
            params.update(init_sharded(init_fn(cfg), on("dit"), jax.random.key(seed)))
        else:
            params.update(read_onestory(folder, cfg, on("dit"))[1])
        if "memory" not in params:
            print(
                f"note: '{folder}' has no OneStory modules (a converted Wan2.1): the Frame Selector is random and "
                "the patchifiers start from the DiT's patch embedding (docs/design.md)"
            )
            params["memory"] = memory_params(cfg, params["dit"], jax.random.key(seed + 1))
    for part in [p for p in FROZEN_PARTS if p in parts and p not in missing]:
        with activate(on(part)):
            params.update(load_frozen_parts(folder, cfg, on(part), [part]))
    return params


def load_frozen_parts(folder: Path, cfg: Config, mesh: jax.sharding.Mesh, parts: list[str]) -> dict[str, Any]:
    """The frozen parts `parts` (of vae, text_encoder, image_encoder) of a model folder."""
    return {p: checkpoint.load_params(folder / p, mesh, lambda rng, p=p: init_fn(cfg, [p])(rng)[p]) for p in parts}


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (no copy of multi-GB weights on one filesystem), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_parts(source: Path, out: Path, parts: list[str]) -> None:
    """Copy `parts` of model folder `source` into `out` (files hard-linked where possible)."""
    for part in parts:
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(source / part, out / part, copy_function=_link_or_copy)
