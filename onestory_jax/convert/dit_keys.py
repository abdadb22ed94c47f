"""Key and shape map between PyTorch Wan2.1 DiT checkpoints and our Flax param tree.

Each Flax leaf has one `KeySpec`: its path, its source tensor names in the diffusers layout and in
the original Wan layout (one name per layer for the stacked `blocks`), and the transform that
turns a PyTorch tensor into the Flax layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal

import numpy as np

from onestory_jax.config import DiTConfig

Transform = Literal["linear", "conv3d", "squeeze0", "identity"]
Layout = Literal["diffusers", "original"]

# Extra tensors some diffusers files carry that the model never uses.
IGNORED_DIFFUSERS_SUFFIXES = ("attn2.norm_added_q.weight",)


@dataclasses.dataclass(frozen=True)
class KeySpec:
    path: tuple[str, ...]  # Flax param path
    diffusers: tuple[str, ...]  # source names, one per layer when stacked
    original: tuple[str, ...]
    transform: Transform
    stacked: bool


def to_flax(t: np.ndarray, transform: Transform) -> np.ndarray:
    """PyTorch tensor -> Flax layout (a view where possible)."""
    if transform == "linear":
        return t.T
    if transform == "conv3d":
        return t.transpose(2, 3, 4, 1, 0)
    if transform == "squeeze0":
        return t[0]
    return t


def torch_shape(flax_shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    """The PyTorch shape that `to_flax` maps onto `flax_shape` (per layer, for stacked leaves)."""
    if transform == "linear":
        return tuple(reversed(flax_shape))
    if transform == "conv3d":
        t, h, w, i, o = flax_shape
        return (o, i, t, h, w)
    if transform == "squeeze0":
        return (1, *flax_shape)
    return tuple(flax_shape)


def _linear(path: tuple[str, ...], diff: str, orig: str) -> list[tuple]:
    return [
        (path + ("kernel",), diff + ".weight", orig + ".weight", "linear"),
        (path + ("bias",), diff + ".bias", orig + ".bias", "identity"),
    ]


def _norm(path: tuple[str, ...], diff: str, orig: str, bias: bool = False) -> list[tuple]:
    out = [(path + ("scale",), diff + ".weight", orig + ".weight", "identity")]
    if bias:
        out.append((path + ("bias",), diff + ".bias", orig + ".bias", "identity"))
    return out


def _global_entries(cfg: DiTConfig) -> list[tuple]:
    e = [
        (("patch_embedding", "kernel"), "patch_embedding.weight", "patch_embedding.weight", "conv3d"),
        (("patch_embedding", "bias"), "patch_embedding.bias", "patch_embedding.bias", "identity"),
        *_linear(("text_embedding", "linear_1"), "condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        *_linear(("text_embedding", "linear_2"), "condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        *_linear(("time_embedding", "linear_1"), "condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        *_linear(("time_embedding", "linear_2"), "condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        *_linear(("time_embedding", "projection"), "condition_embedder.time_proj", "time_projection.1"),
        (("head_modulation",), "scale_shift_table", "head.modulation", "squeeze0"),
        *_linear(("head",), "proj_out", "head.head"),
    ]
    if cfg.has_image_branch:
        ie = "condition_embedder.image_embedder"
        e += [
            *_norm(("image_embedding", "norm1"), f"{ie}.norm1", "img_emb.proj.0", bias=True),
            *_linear(("image_embedding", "linear_1"), f"{ie}.ff.net.0.proj", "img_emb.proj.1"),
            *_linear(("image_embedding", "linear_2"), f"{ie}.ff.net.2", "img_emb.proj.3"),
            *_norm(("image_embedding", "norm2"), f"{ie}.norm2", "img_emb.proj.4", bias=True),
        ]
    return e


def _block_entries(cfg: DiTConfig) -> list[tuple]:
    """Per-block entries with names relative to `blocks.{i}.`."""
    e = [(("modulation",), "scale_shift_table", "modulation", "squeeze0")]
    for ours, diff, orig in (("q", "to_q", "q"), ("k", "to_k", "k"), ("v", "to_v", "v"), ("o", "to_out.0", "o")):
        e += _linear(("self_attn", ours), f"attn1.{diff}", f"self_attn.{orig}")
        e += _linear(("cross_attn", ours), f"attn2.{diff}", f"cross_attn.{orig}")
    for n in ("norm_q", "norm_k"):
        e += _norm(("self_attn", n), f"attn1.{n}", f"self_attn.{n}")
        e += _norm(("cross_attn", n), f"attn2.{n}", f"cross_attn.{n}")
    e += _norm(("norm_cross",), "norm2", "norm3", bias=True)  # the name swap between layouts
    if cfg.has_image_branch:
        e += _linear(("cross_attn", "k_img"), "attn2.add_k_proj", "cross_attn.k_img")
        e += _linear(("cross_attn", "v_img"), "attn2.add_v_proj", "cross_attn.v_img")
        e += _norm(("cross_attn", "norm_k_img"), "attn2.norm_added_k", "cross_attn.norm_k_img")
    e += _linear(("ffn", "fc1"), "ffn.net.0.proj", "ffn.0")
    e += _linear(("ffn", "fc2"), "ffn.net.2", "ffn.2")
    return e


def key_specs(cfg: DiTConfig) -> list[KeySpec]:
    """All leaves of the Flax DiT param tree with their PyTorch sources."""
    specs = [KeySpec(p, (d,), (o,), t, False) for p, d, o, t in _global_entries(cfg)]
    n = range(cfg.num_layers)
    for p, d, o, t in _block_entries(cfg):
        specs.append(KeySpec(("blocks",) + p, tuple(f"blocks.{i}.{d}" for i in n), tuple(f"blocks.{i}.{o}" for i in n), t, True))
    return specs


def source_names(spec: KeySpec, layout: Layout) -> tuple[str, ...]:
    return spec.diffusers if layout == "diffusers" else spec.original


def expected_source_shapes(cfg: DiTConfig, abstract: dict, layout: Layout) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(torch key, torch shape) for every source tensor, given the abstract Flax tree."""
    for spec in key_specs(cfg):
        leaf = abstract
        for k in spec.path:
            leaf = leaf[k]
        shape = tuple(leaf.shape[1:] if spec.stacked else leaf.shape)
        for name in source_names(spec, layout):
            yield name, torch_shape(shape, spec.transform)


def is_ignored(name: str, layout: Layout) -> bool:
    return layout == "diffusers" and name.endswith(IGNORED_DIFFUSERS_SUFFIXES)
