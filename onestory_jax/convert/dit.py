"""The Wan2.1 DiT's weight map: PyTorch checkpoints (diffusers or original Wan layout) -> our Flax tree.

Each Flax leaf has one entry: its path, its source name in the diffusers layout and in the original
Wan layout (per layer, relative to `blocks.{i}.`, for the stacked `blocks`), and its transform.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onestory_jax.config import DiTConfig, DiTRuntime
from onestory_jax.convert.mapping import Layout, ModelMap, ReadTensor, Source, TensorShapes
from onestory_jax.models.dit import init_fn

# Extra tensors some diffusers files carry that the model never uses.
IGNORED_DIFFUSERS_SUFFIXES = ("attn2.norm_added_q.weight",)

Entry = tuple[tuple[str, ...], str, str, str]  # (Flax path, diffusers name, original name, transform)


def _linear(path: tuple[str, ...], diff: str, orig: str) -> list[Entry]:
    return [
        (path + ("kernel",), diff + ".weight", orig + ".weight", "linear"),
        (path + ("bias",), diff + ".bias", orig + ".bias", "identity"),
    ]


def _norm(path: tuple[str, ...], diff: str, orig: str, bias: bool = False) -> list[Entry]:
    out = [(path + ("scale",), diff + ".weight", orig + ".weight", "identity")]
    if bias:
        out.append((path + ("bias",), diff + ".bias", orig + ".bias", "identity"))
    return out


def _global_entries(cfg: DiTConfig) -> list[Entry]:
    e = [
        (("patch_embedding", "kernel"), "patch_embedding.weight", "patch_embedding.weight", "conv3d"),
        (("patch_embedding", "bias"), "patch_embedding.bias", "patch_embedding.bias", "identity"),
        *_linear(("text_embedding", "linear_1"), "condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        *_linear(("text_embedding", "linear_2"), "condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        *_linear(("time_embedding", "linear_1"), "condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        *_linear(("time_embedding", "linear_2"), "condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        *_linear(("time_embedding", "projection"), "condition_embedder.time_proj", "time_projection.1"),
        (("head_modulation",), "scale_shift_table", "head.modulation", "leading_ones"),
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


def _block_entries(cfg: DiTConfig) -> list[Entry]:
    """Per-block entries with names relative to `blocks.{i}.`."""
    e = [(("modulation",), "scale_shift_table", "modulation", "leading_ones")]
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


def sources(cfg: DiTConfig, layout: Layout, shapes: TensorShapes | None = None, abstract: Any = None) -> list[Source]:
    """Every leaf of the Flax DiT param tree with its PyTorch source in `layout`."""
    pick = 1 if layout == "diffusers" else 2
    out = [Source(e[0], (e[pick],), e[3]) for e in _global_entries(cfg)]
    for e in _block_entries(cfg):
        out.append(Source(("blocks", *e[0]), tuple(f"blocks.{i}.{e[pick]}" for i in range(cfg.num_layers)), e[3], stacked=True))
    return out


def original_to_diffusers(cfg: DiTConfig) -> dict[str, str]:
    """Original Wan name -> diffusers name of every source tensor."""
    return {o: d for so, sd in zip(sources(cfg, "original"), sources(cfg, "diffusers")) for o, d in zip(so.names, sd.names)}


def is_ignored(name: str, layout: Layout) -> bool:
    return layout == "diffusers" and name.endswith(IGNORED_DIFFUSERS_SUFFIXES)


# The stored tree: what a checkpoint holds does not depend on how it will be run (`DiTRuntime`).
DIT = ModelMap(
    "Wan DiT", lambda cfg: init_fn(cfg, DiTRuntime()), sources, lambda cfg, layout, shapes: lambda name: is_ignored(name, layout)
)


def convert(cfg: DiTConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout, dtype: Any = np.float32) -> dict:
    """Build the Flax param tree tensor by tensor (strict; stacked layers filled in place)."""
    return DIT.convert(cfg, shapes, read, layout, dtype)
