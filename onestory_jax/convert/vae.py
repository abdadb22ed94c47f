"""Convert a PyTorch Wan2.1 VAE state dict (diffusers `AutoencoderKLWan` or original `Wan2.1_VAE.pth`)
into our Flax param tree.

Source names are derived from each Flax path. Our tree mirrors the diffusers module tree
(`down_blocks_3/conv1/kernel` <-> `down_blocks.3.conv1.weight`); the original names follow the table
in the reference (residual.{0,2,3,6}, middle.{0,1,2}, head.{0,2}, flat decoder `upsamples`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np

from onestory_jax.config import VAEConfig
from onestory_jax.convert.encoder_keys import check_keys as strict_check
from onestory_jax.errors import UserError
from onestory_jax.models.vae import init_fn

Layout = Literal["diffusers", "original"]
Transform = Literal["conv3d", "conv2d", "dense1x1", "gamma3d", "gamma2d", "identity"]
TensorShapes = Mapping[str, tuple[int, ...]]
ReadTensor = Callable[[str], np.ndarray]

# Residual-block parts: our name -> original `residual.N` / `shortcut` name.
_RESIDUAL_ORIGINAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                      "conv2": "residual.6", "conv_shortcut": "shortcut"}
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


def transform_of(path: tuple[str, ...], ndim: int) -> Transform:
    """How the PyTorch tensor maps onto the Flax leaf at `path` (of rank `ndim`)."""
    if path[-1] == "bias":
        return "identity"
    if path[-1] == "scale":
        return "gamma2d" if "attentions_0" in path else "gamma3d"
    if path[-2] in ("to_qkv", "proj"):
        return "dense1x1"
    return "conv3d" if ndim == 5 else "conv2d"


def torch_shape(shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    """The PyTorch shape that maps onto a Flax leaf of `shape`."""
    if transform == "conv3d":
        t, h, w, i, o = shape
        return (o, i, t, h, w)
    if transform == "conv2d":
        h, w, i, o = shape
        return (o, i, h, w)
    if transform == "dense1x1":
        i, o = shape
        return (o, i, 1, 1)
    if transform == "gamma3d":
        return (*shape, 1, 1, 1)
    if transform == "gamma2d":
        return (*shape, 1, 1)
    return tuple(shape)


def to_flax(t: np.ndarray, transform: Transform) -> np.ndarray:
    """PyTorch tensor -> Flax layout."""
    if transform == "conv3d":
        return t.transpose(2, 3, 4, 1, 0)
    if transform == "conv2d":
        return t.transpose(2, 3, 1, 0)
    if transform == "dense1x1":
        return t[:, :, 0, 0].T
    if transform in ("gamma3d", "gamma2d"):
        return t.reshape(t.shape[0])
    return t


def abstract_tree(cfg: VAEConfig) -> Any:
    """Shapes of our param tree for this config (no allocation)."""
    return nn.meta.unbox(jax.eval_shape(init_fn(cfg), jax.random.key(0)))


def _leaves(cfg: VAEConfig, layout: Layout) -> list[tuple[tuple[str, ...], str, Transform, tuple[int, ...]]]:
    """(Flax path, source name, transform, Flax shape) for every leaf."""
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree(cfg))[0]:
        path = tuple(k.key for k in kp)
        name = diffusers_name(path) if layout == "diffusers" else original_name(path, cfg)
        out.append((path, name, transform_of(path, leaf.ndim), tuple(leaf.shape)))
    return out


def expected_shapes(cfg: VAEConfig, layout: Layout) -> dict[str, tuple[int, ...]]:
    """PyTorch name -> shape of every source tensor for this config (no allocation)."""
    return {name: torch_shape(shape, tf) for _, name, tf, shape in _leaves(cfg, layout)}


def check_keys(shapes: TensorShapes, expected: Mapping[str, tuple[int, ...]], layout: Layout) -> None:
    """Strict check: every missing, unexpected or mis-shaped key is listed in one `UserError`."""
    strict_check(shapes, expected, lambda name: False, f"{layout} Wan VAE config")


def convert_vae(cfg: VAEConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout) -> dict:
    """Build our fp32 Flax param tree from a PyTorch VAE state dict (strict)."""
    if layout not in ("diffusers", "original"):
        raise UserError(f"unknown VAE checkpoint layout '{layout}' (diffusers or original)")
    leaves = _leaves(cfg, layout)
    check_keys(shapes, expected_shapes(cfg, layout), layout)
    params: dict = {}
    for path, name, tf, _ in leaves:
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.ascontiguousarray(to_flax(np.asarray(read(name), np.float32), tf))
    return params
