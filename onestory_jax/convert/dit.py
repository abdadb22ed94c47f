"""Convert a PyTorch Wan2.1 DiT state dict (diffusers or original layout) into our Flax param tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from onestory_jax.config import DiTConfig
from onestory_jax.convert.dit_keys import Layout, expected_source_shapes, is_ignored, key_specs, source_names, to_flax
from onestory_jax.convert.encoder_keys import check_keys as strict_check
from onestory_jax.models.dit import init_fn

# A source of tensors: name -> shape (cheap) and name -> array (read on demand).
TensorShapes = Mapping[str, tuple[int, ...]]
ReadTensor = Callable[[str], np.ndarray]


def abstract_tree(cfg: DiTConfig) -> Any:
    """Shapes of our param tree for this config (no allocation)."""
    import flax.linen as nn

    return nn.meta.unbox(jax.eval_shape(init_fn(cfg), jax.random.key(0)))


def check_keys(cfg: DiTConfig, shapes: TensorShapes, layout: Layout, abstract: Any | None = None) -> None:
    """Strict check: every missing, unexpected or mis-shaped key is listed in one `UserError`."""
    abstract = abstract if abstract is not None else abstract_tree(cfg)
    expected = dict(expected_source_shapes(cfg, abstract, layout))
    strict_check(shapes, expected, lambda name: is_ignored(name, layout), f"{layout} Wan DiT config")


def convert(
    cfg: DiTConfig,
    shapes: TensorShapes,
    read: ReadTensor,
    layout: Layout,
    dtype: Any = np.float32,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build the Flax param tree tensor by tensor (strict; stacked layers filled in place)."""
    abstract = abstract_tree(cfg)
    check_keys(cfg, shapes, layout, abstract)
    params: dict = {}
    for spec in key_specs(cfg):
        leaf = abstract
        for k in spec.path:
            leaf = leaf[k]
        names = source_names(spec, layout)
        if spec.stacked:
            value = np.empty(leaf.shape, dtype)
            for i, name in enumerate(names):
                value[i] = to_flax(np.asarray(read(name)), spec.transform)
        else:
            value = np.ascontiguousarray(to_flax(np.asarray(read(names[0])), spec.transform), dtype=dtype)
        node = params
        for k in spec.path[:-1]:
            node = node.setdefault(k, {})
        node[spec.path[-1]] = value
        if progress:
            progress("/".join(spec.path))
    return params
