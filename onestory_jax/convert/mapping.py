"""The one PyTorch -> Flax weight mapping every converter uses.

A model's converter lists a `Source` per Flax leaf (its PyTorch name, or one name per layer for a
stacked leaf, and a transform from `TRANSFORMS`) and bundles it with its init function in a
`ModelMap`. The map then checks a checkpoint strictly (every missing, unexpected or mis-shaped key
in one `UserError`) and builds the Flax tree tensor by tensor, stacked layers filled in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from onestory_jax.errors import UserError

# Floating-point types numpy does not count as np.floating (safetensors' BF16, F8_*).
ML_FLOATS = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))
Layout = Literal["diffusers", "original"]  # diffusers: the diffusers / transformers module names
Shape = tuple[int, ...]
TensorShapes = Mapping[str, Shape]
ReadTensor = Callable[[str], np.ndarray]


class Transform(NamedTuple):
    torch_shape: Callable[[Shape], Shape]  # Flax leaf shape (per layer) -> PyTorch shape
    to_flax: Callable[[np.ndarray, Shape], np.ndarray]  # PyTorch tensor, Flax shape -> Flax leaf (a view where possible)


def _reshape(t: np.ndarray, shape: Shape) -> np.ndarray:
    return t.reshape(shape)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda s: s, lambda t, s: t),
    "linear": Transform(lambda s: s[::-1], lambda t, s: t.T),  # [out, in] -> [in, out]
    "conv2d": Transform(lambda s: (s[3], s[2], s[0], s[1]), lambda t, s: t.transpose(2, 3, 1, 0)),  # [O, I, h, w] -> [h, w, I, O]
    "conv3d": Transform(
        lambda s: (s[4], s[3], *s[:3]), lambda t, s: t.transpose(2, 3, 4, 1, 0)
    ),  # [O, I, t, h, w] -> [t, h, w, I, O]
    "conv1x1": Transform(lambda s: (s[1], s[0], 1, 1), lambda t, s: t[:, :, 0, 0].T),  # a 1x1 Conv2d as Dense [I, O]
    # PyTorch keeps leading 1s up to rank 3: [1, 1, D] -> [D], [1, L, D] -> [L, D].
    "leading_ones": Transform(lambda s: (1,) * (3 - len(s)) + s, _reshape),
    "gamma2d": Transform(lambda s: (*s, 1, 1), _reshape),  # per-channel [C, 1, 1] -> [C]
    "gamma3d": Transform(lambda s: (*s, 1, 1, 1), _reshape),  # per-channel [C, 1, 1, 1] -> [C]
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Flax leaf comes from.

    names: one PyTorch name, or one per layer for a stacked leaf [layers, ...]. split (part, parts):
    the leaf is rows part/parts of a fused tensor (e.g. q, k, v of one `to_qkv`).
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    transform: str = "identity"
    stacked: bool = False
    split: tuple[int, int] | None = None

    def torch_shape(self, flax_shape: Shape) -> Shape:
        """The PyTorch shape behind one (per-layer) Flax leaf shape."""
        shape = TRANSFORMS[self.transform].torch_shape(tuple(flax_shape))
        return (shape[0] * self.split[1], *shape[1:]) if self.split else shape

    def to_flax(self, t: np.ndarray, flax_shape: Shape) -> np.ndarray:
        """PyTorch tensor -> the (per-layer) Flax leaf."""
        if self.split:
            part, parts = self.split
            n = t.shape[0] // parts
            t = t[part * n : (part + 1) * n]
        return TRANSFORMS[self.transform].to_flax(t, tuple(flax_shape))


def abstract_tree(init_fn: Callable[[jax.Array], Any]) -> Any:
    """Shapes of a model's param tree (no allocation)."""
    return nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0)))


def leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def expected_shapes(sources: Iterable[Source], abstract: Any) -> dict[str, Shape]:
    """PyTorch name -> shape for every tensor the sources read."""
    out = {}
    for src in sources:
        shape = tuple(leaf(abstract, src.path).shape)
        for name in src.names:
            out[name] = src.torch_shape(shape[1:] if src.stacked else shape)
    return out


def check_keys(shapes: TensorShapes, expected: Mapping[str, Shape], ignored: Callable[[str], bool], what: str) -> None:
    """Strict check: every missing, unexpected or mis-shaped key is listed in one `UserError`."""
    present = {k: tuple(v) for k, v in shapes.items() if not ignored(k)}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    misshaped = sorted(
        f"{k} {present[k]} != expected {expected[k]}" for k in set(expected) & set(present) if present[k] != expected[k]
    )
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    if parts:
        raise UserError(f"checkpoint does not match the {what}: " + "; ".join(parts))


def checked(name: str, tensor: Any) -> np.ndarray:
    """A source tensor as numpy, refused unless it holds finite floating-point weights (a NaN weight, or
    weights stored as integers, would convert silently into a broken model)."""
    array = np.asarray(tensor)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype in ML_FLOATS):
        raise UserError(
            f"source tensor '{name}' holds {array.dtype} values, not floating-point weights: a corrupt or mislabelled checkpoint"
        )
    if not np.isfinite(array).all():
        raise UserError(f"source tensor '{name}' holds NaN or Inf: the checkpoint is corrupt or from a diverged run")
    return array


def build_tree(
    sources: Iterable[Source], abstract: Any, read: ReadTensor, dtype: Any, progress: Callable[[Source], None] | None = None
) -> dict:
    """The Flax param tree in `dtype`, read tensor by tensor; `progress` is called after each leaf."""
    params: dict = {}
    for src in sources:
        shape = tuple(leaf(abstract, src.path).shape)
        value = np.empty(shape, dtype)
        if src.stacked:
            for i, name in enumerate(src.names):
                value[i] = src.to_flax(checked(name, read(name)), shape[1:])
        else:
            value[...] = src.to_flax(checked(src.names[0], read(src.names[0])), shape)
        node = params
        for k in src.path[:-1]:
            node = node.setdefault(k, {})
        node[src.path[-1]] = value
        if progress:
            progress(src)
    return params


def ignore_modules(modules: Iterable[str]) -> Callable[[str], bool]:
    """A predicate true for these names and everything under them (`name.` prefixes)."""
    modules = tuple(modules)
    return lambda key: any(key == m or key.startswith(m + ".") for m in modules)


def check_layout(layout: str) -> None:
    if layout not in ("diffusers", "original"):
        raise UserError(f"unknown checkpoint layout '{layout}' (diffusers or original)")


def _nothing_ignored(cfg: Any, layout: Layout, shapes: TensorShapes) -> Callable[[str], bool]:
    return lambda name: False


@dataclasses.dataclass(frozen=True)
class ModelMap:
    """How one model's PyTorch checkpoints map onto its Flax tree.

    what: the model in messages ("Wan VAE"); init_fn: config -> (rng -> boxed params);
    sources: (config, layout, present shapes, abstract tree) -> a Source per leaf;
    ignored: (config, layout, present shapes) -> predicate of names that are present but unused.
    """

    what: str
    init_fn: Callable[[Any], Callable[[jax.Array], Any]]
    sources: Callable[[Any, Layout, TensorShapes, Any], list[Source]]
    ignored: Callable[[Any, Layout, TensorShapes], Callable[[str], bool]] = _nothing_ignored

    def check(self, cfg: Any, shapes: TensorShapes, layout: Layout) -> tuple[list[Source], Any]:
        """Strict key/shape check; returns the sources to read and the abstract Flax tree."""
        check_layout(layout)
        abstract = abstract_tree(self.init_fn(cfg))
        srcs = self.sources(cfg, layout, shapes, abstract)
        check_keys(shapes, expected_shapes(srcs, abstract), self.ignored(cfg, layout, shapes), f"{layout} {self.what} config")
        return srcs, abstract

    def convert(
        self, cfg: Any, shapes: TensorShapes, read: ReadTensor, layout: Layout, dtype: Any, bar: str | None = None
    ) -> dict:
        """The Flax param tree in `dtype` from a PyTorch state dict (strict); with `bar`, a progress bar
        of that name counts the tensors (shown after the key check passes)."""
        srcs, abstract = self.check(cfg, shapes, layout)
        if bar is None:
            return build_tree(srcs, abstract, read, dtype)
        from tqdm import tqdm

        with tqdm(total=sum(len(s.names) for s in srcs), unit="tensor", desc=bar, leave=False) as progress:
            return build_tree(srcs, abstract, read, dtype, lambda src: progress.update(len(src.names)))
