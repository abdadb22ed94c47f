"""`python -m onestory_jax.convert`: PyTorch checkpoint folder -> orbax checkpoint + config.yaml.

Components register a function `args -> exit status` in `COMPONENTS`; all share the flags below.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax

from onestory_jax.checkpoint import check_out_dir, save_model
from onestory_jax.config import Config, load_config
from onestory_jax.convert.dit import DIT
from onestory_jax.convert.dit_source import open_dit_source
from onestory_jax.convert.frozen_components import FROZEN, convert_frozen
from onestory_jax.convert.source_config import written_config
from onestory_jax.errors import run_cli
from onestory_jax.models.layers import DTYPES

# DiT settings that are not architecture: they come from --config, not from the source.
RUNTIME_FIELDS = ("dtype", "remat_policy", "attention")


def convert_dit(args: argparse.Namespace) -> int:
    """The Wan2.1 DiT: diffusers `transformer/` or an original Wan release folder."""
    out = check_out_dir(args.out, args.force)  # before any work
    if args.verify:
        from onestory_jax.convert.dit_verify import require_torch

        require_torch()
    source = open_dit_source(args.source, args.layout)
    base = load_config(args.config) if args.config else Config()
    dit = dataclasses.replace(source.config, param_dtype=args.dtype, **{k: getattr(base.dit, k) for k in RUNTIME_FIELDS})
    config = written_config(base, "dit", dit, Path(args.source).resolve().name, args.config)
    cfg = config.dit
    params = DIT.convert(cfg, source.tensors.shapes, source.tensors.read, source.layout, DTYPES[args.dtype],
                         bar=f"dit ({source.layout})")
    save_model(out, params, config, force=args.force)
    leaves = jax.tree.leaves(params)
    print(f"wrote {out}: {cfg.model_type} DiT, {sum(a.size for a in leaves):,} {args.dtype} params "
          f"({sum(a.nbytes for a in leaves) / 2**20:,.1f} MiB), from {source.root}")
    if not args.verify:
        return 0
    from onestory_jax.convert.dit_verify import verify_dit

    result = verify_dit(out, source)
    print(result.summary())
    return 0 if result.ok else 1


COMPONENTS: dict[str, Callable[[argparse.Namespace], int]] = {
    "dit": convert_dit, **{name: convert_frozen for name in FROZEN}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m onestory_jax.convert", description=__doc__.splitlines()[0])
    p.add_argument("--component", choices=sorted(COMPONENTS), default="dit")
    p.add_argument("--source", required=True, help="checkpoint folder (diffusers repo or original Wan release)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--config", help="preset or YAML for what the source cannot say: runtime settings (dtype, attention, "
                   "text length) and the other components' sections of the written config.yaml; the architecture "
                   "comes from the source's config.json (default: built-in defaults)")
    p.add_argument("--layout", choices=("auto", "diffusers", "original"), default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored parameter dtype")
    p.add_argument("--force", action="store_true", help="replace a checkpoint at --out (a folder of config.yaml and params/ only)")
    p.add_argument("--verify", action="store_true", help="compare with the PyTorch reference (needs the convert extra)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return COMPONENTS[args.component](args)


if __name__ == "__main__":
    run_cli(main)
