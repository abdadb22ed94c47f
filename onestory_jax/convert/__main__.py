"""`python -m onestory_jax.convert`: PyTorch checkpoint folder -> orbax checkpoint + config.yaml.

Components register a function `args -> exit status` in `COMPONENTS`; all share the flags below.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from onestory_jax.checkpoint import check_out_dir, save_model
from onestory_jax.config import Config
from onestory_jax.config_files import load_config
from onestory_jax.convert.dit import DIT
from onestory_jax.convert.dit_source import DiTSource, open_dit_source
from onestory_jax.convert.frozen_components import FROZEN, convert_frozen
from onestory_jax.convert.model_folder import convert_all
from onestory_jax.convert.source_config import written_config
from onestory_jax.errors import run_cli
from onestory_jax.models.layers import DTYPES


def dit_params(args: argparse.Namespace) -> tuple[Any, Config, DiTSource, Callable[[Path, DiTSource], int]]:
    """(converted DiT params, written config, source, verify) of the Wan2.1 DiT of `args.source`."""
    if args.verify:
        from onestory_jax.convert.dit_verify import require_torch

        require_torch()
    source = open_dit_source(args.source, args.layout)
    base = load_config(args.config) if args.config else Config()
    base = dataclasses.replace(base, dit_runtime=dataclasses.replace(base.dit_runtime.plain(), param_dtype=args.dtype))
    config = written_config(base, "dit", source.config, Path(args.source).resolve().name, args.config)
    params = DIT.convert(
        config.dit, source.tensors.shapes, source.tensors.read, source.layout, DTYPES[args.dtype], bar=f"dit ({source.layout})"
    )
    leaves = jax.tree.leaves(params)
    print(
        f"dit: {config.dit.model_type}, {sum(a.size for a in leaves):,} {args.dtype} params "
        f"({sum(a.nbytes for a in leaves) / 2**20:,.1f} MiB), from {source.root}"
    )
    return params, config, source, verify


def verify(ckpt: Path, source: DiTSource) -> int:
    """Compare the written DiT with the PyTorch reference; the exit status."""
    from onestory_jax.convert.dit_verify import verify_dit

    result = verify_dit(ckpt, source)
    print(result.summary())
    return 0 if result.ok else 1


def convert_dit(args: argparse.Namespace) -> int:
    """The Wan2.1 DiT alone (a bare DiT checkpoint): diffusers `transformer/` or an original Wan release folder."""
    out = check_out_dir(args.out, args.force)  # before any work
    params, config, source, _ = dit_params(args)
    save_model(out, params, config, force=args.force)
    print(f"wrote {out}")
    return verify(out, source) if args.verify else 0


COMPONENTS: dict[str, Callable[[argparse.Namespace], int]] = {
    "all": lambda args: convert_all(args, dit_params, convert_frozen),
    "dit": convert_dit,
    **{name: convert_frozen for name in FROZEN},
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m onestory_jax.convert", description=__doc__.splitlines()[0])
    p.add_argument(
        "--component",
        choices=sorted(COMPONENTS),
        default="all",
        help="all: a whole release into one model folder (docs/model-folder.md); else one component's checkpoint",
    )
    p.add_argument("--source", required=True, help="checkpoint folder (diffusers repo or original Wan release)")
    p.add_argument("--out", required=True, help="output folder (written atomically): the model folder with --component all")
    p.add_argument(
        "--config",
        help="preset or YAML for what the source cannot say: runtime settings (dtype, attention, "
        "text length) and the other components' sections of the written config.yaml; the architecture "
        "comes from the source's config.json (default: built-in defaults)",
    )
    p.add_argument("--layout", choices=("auto", "diffusers", "original"), default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored parameter dtype")
    p.add_argument(
        "--force", action="store_true", help="replace a checkpoint at --out (a folder of config.yaml and params/ only)"
    )
    p.add_argument("--verify", action="store_true", help="compare with the PyTorch reference (needs the convert extra)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return COMPONENTS[args.component](args)


if __name__ == "__main__":
    run_cli(main)
