"""Shared machinery of the encoder converters: a source spec per Flax leaf, the strict key check,
and building the Flax tree tensor by tensor (stacked layers filled in place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np

from onestory_jax.errors import UserError

Layout = Literal["diffusers", "original"]  # diffusers = the transformers names in Wan-AI/*-Diffusers repos
# linear: [out, in] -> [in, out]; conv2d: [O, I, h, w] -> [h, w, I, O];
# rank3: PyTorch keeps leading 1s up to rank 3 ([1, 1, D] -> [D], [1, L, D] -> [L, D]).
Transform = Literal["linear", "conv2d", "rank3", "identity"]
TensorShapes = Mapping[str, tuple[int, ...]]
ReadTensor = Callable[[str], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Flax leaf comes from.

    names: one PyTorch name, or one per layer for a stacked leaf [layers, ...]. split (part, parts):
    the leaf is rows part/parts of a fused tensor (e.g. q, k, v of one `to_qkv`).
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    transform: Transform
    stacked: bool = False
    split: tuple[int, int] | None = None


def check_layout(layout: str) -> None:
    if layout not in ("diffusers", "original"):
        raise UserError(f"unknown checkpoint layout '{layout}' (diffusers or original)")


def abstract_tree(init_fn: Callable[[jax.Array], Any]) -> Any:
    """Shapes of a model's param tree (no allocation)."""
    return nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0)))


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def torch_shape(src: Source, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape behind one (per-layer) Flax leaf shape."""
    if src.transform == "linear":
        shape = tuple(reversed(flax_shape))
    elif src.transform == "conv2d":
        h, w, i, o = flax_shape
        shape = (o, i, h, w)
    elif src.transform == "rank3":
        shape = (1,) * (3 - len(flax_shape)) + tuple(flax_shape)
    else:
        shape = tuple(flax_shape)
    if src.split:
        shape = (shape[0] * src.split[1], *shape[1:])
    return shape


def to_flax(t: np.ndarray, src: Source, flax_shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch tensor -> the (per-layer) Flax leaf."""
    if src.split:
        part, parts = src.split
        n = t.shape[0] // parts
        t = t[part * n : (part + 1) * n]
    if src.transform == "linear":
        return t.T
    if src.transform == "conv2d":
        return t.transpose(2, 3, 1, 0)
    if src.transform == "rank3":
        return t.reshape(flax_shape)
    return t


def expected_shapes(sources: Iterable[Source], abstract: Any) -> dict[str, tuple[int, ...]]:
    """PyTorch name -> shape for every tensor the sources read."""
    out = {}
    for src in sources:
        shape = tuple(_leaf(abstract, src.path).shape)
        for name in src.names:
            out[name] = torch_shape(src, shape[1:] if src.stacked else shape)
    return out


def check_keys(shapes: TensorShapes, expected: Mapping[str, tuple[int, ...]], ignored: Callable[[str], bool], what: str) -> None:
    """Strict check: every missing, unexpected or mis-shaped key is listed in one `UserError`."""
    present = {k: tuple(v) for k, v in shapes.items() if not ignored(k)}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    misshaped = sorted(f"{k} {present[k]} != expected {expected[k]}"
                       for k in set(expected) & set(present) if present[k] != expected[k])
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    if parts:
        raise UserError(f"checkpoint does not match the {what}: " + "; ".join(parts))


def build_tree(sources: Iterable[Source], abstract: Any, read: ReadTensor, dtype: Any) -> dict:
    """The Flax param tree in `dtype`, read tensor by tensor."""
    params: dict = {}
    for src in sources:
        shape = tuple(_leaf(abstract, src.path).shape)
        value = np.empty(shape, dtype)
        if src.stacked:
            for i, name in enumerate(src.names):
                value[i] = to_flax(np.asarray(read(name)), src, shape[1:])
        else:
            value[...] = to_flax(np.asarray(read(src.names[0])), src, shape)
        node = params
        for k in src.path[:-1]:
            node = node.setdefault(k, {})
        node[src.path[-1]] = value
    return params


def ignore_modules(modules: Iterable[str]) -> Callable[[str], bool]:
    """A predicate true for these names and everything under them (`name.` prefixes)."""
    modules = tuple(modules)
    return lambda key: any(key == m or key.startswith(m + ".") for m in modules)
