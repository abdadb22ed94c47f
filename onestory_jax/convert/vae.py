"""Convert a PyTorch Wan2.1 VAE state dict (diffusers `AutoencoderKLWan` or original `Wan2.1_VAE.pth`)
into our Flax param tree.

Source names are derived from each Flax path. Our tree mirrors the diffusers module tree
(`down_blocks_3/conv1/kernel` <-> `down_blocks.3.conv1.weight`); the original names follow the table
in the reference (residual.{0,2,3,6}, middle.{0,1,2}, head.{0,2}, flat decoder `upsamples`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from onestory_jax.config import VAEConfig
from onestory_jax.convert.mapping import Layout, ModelMap, ReadTensor, Source, TensorShapes
from onestory_jax.convert.source_config import SourceSchema
from onestory_jax.models.vae import init_fn

# diffusers `AutoencoderKLWan` config.json: our VAEConfig's architecture fields carry its names and
# defaults; the Wan2.2 options must be off.
_ARCHITECTURE = (
    "base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temperal_downsample",
    "dropout",
    "latents_mean",
    "latents_std",
)
CONFIG_JSON = SourceSchema(
    "Wan2.1 VAE (AutoencoderKLWan)",
    {"_class_name": ("AutoencoderKLWan",)},
    {f: (f, getattr(VAEConfig(), f)) for f in _ARCHITECTURE},
    fixed={"is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None, "decoder_base_dim": None},
)

# Residual-block parts: our name -> original `residual.N` / `shortcut` name.
_RESIDUAL_ORIGINAL = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_TOP_ORIGINAL = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_HEAD_ORIGINAL = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "gamma"}


def _index(part: str) -> tuple[str, int] | None:
    """`down_blocks_3` -> ('down_blocks', 3)."""
    m = re.fullmatch(r"(.+)_(\d+)", part)
    return (m.group(1), int(m.group(2))) if m else None


def diffusers_name(path: tuple[str, ...]) -> str:
    """Flax path -> diffusers name (`resample` is the Conv2d at index 1 of the torch Sequential)."""
    parts = []
    for p in path[:-1]:
        idx = _index(p)
        parts.append(f"{idx[0]}.{idx[1]}" if idx else "resample.1" if p == "resample" else p)
    return ".".join(parts + [_LEAF[path[-1]]])


def original_name(path: tuple[str, ...], cfg: VAEConfig) -> str:
    """Flax path -> original Wan name."""
    leaf = _LEAF[path[-1]]
    top, rest = path[0], list(path[1:-1])
    if top in _TOP_ORIGINAL:
        return f"{_TOP_ORIGINAL[top]}.{leaf}"
    head = rest[0]
    if head in _HEAD_ORIGINAL:
        prefix = f"{top}.{_HEAD_ORIGINAL[head]}"
        tail: list[str] = []
    elif head == "mid_block":
        kind, i = _index(rest[1])
        prefix = f"{top}.middle.{1 if kind == 'attentions' else 2 * i}"
        tail = rest[2:]
    elif head.startswith("down_blocks"):
        prefix = f"{top}.downsamples.{_index(head)[1]}"
        tail = rest[1:]
    else:  # up_blocks_i/{resnets_j, upsamplers_0}: flat index over (n+1 resnets, upsampler) per level
        level, (kind, j) = _index(head)[1], _index(rest[1])
        stride = cfg.num_res_blocks + 2
        prefix = f"{top}.upsamples.{level * stride + (j if kind == 'resnets' else cfg.num_res_blocks + 1)}"
        tail = rest[2:]
    tail = [_RESIDUAL_ORIGINAL.get(p, "resample.1" if p == "resample" else p) for p in tail]
    return ".".join([prefix, *tail, leaf])


def transform_of(path: tuple[str, ...], ndim: int) -> str:
    """How the PyTorch tensor maps onto the Flax leaf at `path` (of rank `ndim`)."""
    if path[-1] == "bias":
        return "identity"
    if path[-1] == "scale":
        return "gamma2d" if "attentions_0" in path else "gamma3d"
    if path[-2] in ("to_qkv", "proj"):
        return "conv1x1"
    return "conv3d" if ndim == 5 else "conv2d"


def sources(cfg: VAEConfig, layout: Layout, shapes: TensorShapes, abstract: Any) -> list[Source]:
    """Every leaf's PyTorch source, its name derived from its Flax path."""
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(k.key for k in kp)
        name = diffusers_name(path) if layout == "diffusers" else original_name(path, cfg)
        out.append(Source(path, (name,), transform_of(path, leaf.ndim)))
    return out


VAE = ModelMap("Wan VAE", init_fn, sources)


def convert_vae(cfg: VAEConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout) -> dict:
    """Build our fp32 Flax param tree from a PyTorch VAE state dict (strict)."""
    return VAE.convert(cfg, shapes, read, layout, np.float32)
