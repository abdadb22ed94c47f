"""Conversion of the frozen components: Wan-VAE, umT5 text encoder, CLIP image encoder.

Sources, per component: the original Wan file (`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`,
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`; a torch pickle, memory-mapped) or the
diffusers/transformers folder (`vae/`, `text_encoder/`, `image_encoder/` with safetensors). The
written checkpoint's params are the component's own tree; its config is `--config` (default: the
published sizes), whose section for the component must fit the weights (strict key/shape check).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from onestory_jax.checkpoint import check_out_dir, save_model
from onestory_jax.config import Config, load_config
from onestory_jax.convert.image_encoder import convert_clip
from onestory_jax.convert.safetensors_io import open_dir
from onestory_jax.convert.text_encoder import convert_umt5
from onestory_jax.convert.vae import convert_vae
from onestory_jax.errors import UserError
from onestory_jax.models.layers import DTYPES


@dataclasses.dataclass(frozen=True)
class Frozen:
    section: str  # Config field
    original_file: str
    diffusers_dir: str
    convert: Callable[..., dict]


FROZEN = {
    "vae": Frozen("vae", "Wan2.1_VAE.pth", "vae", convert_vae),
    "umt5": Frozen("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth", "text_encoder", convert_umt5),
    "clip": Frozen("image_encoder", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "image_encoder", convert_clip),
}


@dataclasses.dataclass
class TorchFile:
    """A torch state-dict pickle, memory-mapped: cheap `shapes`, lazy `read`."""

    path: Path

    def __post_init__(self) -> None:
        try:
            import torch
        except ImportError:
            raise UserError("reading .pth files needs torch: pip install 'onestory-jax[convert]'") from None
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise UserError(f"cannot read '{self.path}' as a torch state dict: {str(e).splitlines()[0]}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        self._sd = {k: v for k, v in sd.items() if hasattr(v, "shape")}
        self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}

    def read(self, name: str) -> np.ndarray:
        t = self._sd[name]
        return t.float().numpy() if str(t.dtype) in ("torch.bfloat16", "torch.float16") else t.numpy()


def open_frozen_source(comp: Frozen, source: Path, layout: str) -> tuple[Any, str]:
    """(reader with .shapes/.read, layout) for a file or folder; a wrong path is a UserError."""
    if not source.exists():
        raise UserError(f"source '{source}' does not exist")
    candidates = []
    if source.is_file():
        candidates.append(("original", source))
    else:
        if (source / comp.original_file).is_file():
            candidates.append(("original", source / comp.original_file))
        for d in (source / comp.diffusers_dir, source):
            if d.is_dir() and any(d.glob("*.safetensors")):
                candidates.append(("diffusers", d))
                break
    if layout != "auto":
        candidates = [c for c in candidates if c[0] == layout]
    if not candidates:
        raise UserError(f"'{source}' holds no {comp.section} weights: expected {comp.original_file} (original) or "
                        f"{comp.diffusers_dir}/*.safetensors (diffusers)")
    kind, path = candidates[0]
    reader = TorchFile(path) if path.suffix in (".pth", ".pt", ".bin") else open_dir(path)
    return reader, kind


def convert_frozen(args: argparse.Namespace) -> int:
    """One of vae | umt5 | clip: strict, streamed, written atomically."""
    comp = FROZEN[args.component]
    out = check_out_dir(args.out, args.force)
    config: Config = load_config(args.config) if args.config else Config()
    section = getattr(config, comp.section)
    if args.verify:
        raise UserError(f"--verify is implemented for the DiT; the {comp.section} conversion is checked by the "
                        "parity tests (tests/test_vae.py, test_text_encoder.py, test_image_encoder.py)")
    reader, layout = open_frozen_source(comp, Path(args.source), args.layout)
    with tqdm(total=1, unit="component", desc=f"{args.component} ({layout})") as bar:
        params = comp.convert(section, reader.shapes, reader.read, layout)
        bar.update(1)
    dtype = DTYPES[args.dtype]
    params = jax.tree.map(lambda a: np.asarray(a, dtype), params)
    if hasattr(section, "param_dtype"):
        config = dataclasses.replace(config, **{comp.section: dataclasses.replace(section, param_dtype=args.dtype)})
    save_model(out, params, dataclasses.replace(config, name=f"{args.component}:{Path(args.source).name}"), force=args.force)
    leaves = jax.tree.leaves(params)
    print(f"wrote {out}: {args.component} ({layout}), {sum(a.size for a in leaves):,} {args.dtype} params")
    return 0
