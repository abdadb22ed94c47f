"""Convert a umT5 encoder checkpoint into our Flax tree (`models/text_encoder.py`).

Layouts: `diffusers` = transformers `UMT5EncoderModel` names (`shared.weight`,
`encoder.block.N.layer.0.SelfAttention.q.weight`, ...), as in Wan-AI/*-Diffusers `text_encoder/`;
`original` = Wan's `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`, ...).
"""

from __future__ import annotations

from typing import Any

from onestory_jax.config import TextEncoderConfig
from onestory_jax.convert.encoder_keys import (
    Layout,
    ReadTensor,
    Source,
    TensorShapes,
    abstract_tree,
    build_tree,
    check_keys,
    check_layout,
    expected_shapes,
    ignore_modules,
)
from onestory_jax.models.layers import DTYPES
from onestory_jax.models.text_encoder import init_fn

# The tied copy of `shared.weight` that some transformers files also carry.
TIED_EMBEDDING = "encoder.embed_tokens.weight"

# Per-layer leaves: (our path, transformers name, original name, transform).
_BLOCK = [
    *[(("attn", p, "kernel"), f"layer.0.SelfAttention.{p}.weight", f"attn.{p}.weight", "linear") for p in "qkvo"],
    (("attn", "relative_bias"), "layer.0.SelfAttention.relative_attention_bias.weight",
     "pos_embedding.embedding.weight", "identity"),
    (("norm1", "scale"), "layer.0.layer_norm.weight", "norm1.weight", "identity"),
    (("norm2", "scale"), "layer.1.layer_norm.weight", "norm2.weight", "identity"),
    (("ffn", "gate", "kernel"), "layer.1.DenseReluDense.wi_0.weight", "ffn.gate.0.weight", "linear"),
    (("ffn", "fc1", "kernel"), "layer.1.DenseReluDense.wi_1.weight", "ffn.fc1.weight", "linear"),
    (("ffn", "fc2", "kernel"), "layer.1.DenseReluDense.wo.weight", "ffn.fc2.weight", "linear"),
]


def sources(cfg: TextEncoderConfig, layout: Layout, shapes: TensorShapes) -> list[Source]:
    """Every leaf's PyTorch source; the diffusers embedding may come from either tied name."""
    original = layout == "original"
    embedding = "token_embedding.weight" if original else (
        TIED_EMBEDDING if "shared.weight" not in shapes and TIED_EMBEDDING in shapes else "shared.weight")
    out = [
        Source(("token_embedding", "embedding"), (embedding,), "identity"),
        Source(("norm", "scale"), ("norm.weight" if original else "encoder.final_layer_norm.weight",), "identity"),
    ]
    prefix = "blocks.{}." if original else "encoder.block.{}."
    for path, hf, orig, transform in _BLOCK:
        names = tuple(prefix.format(i) + (orig if original else hf) for i in range(cfg.num_layers))
        out.append(Source(("blocks", *path), names, transform, stacked=True))
    return out


def check_umt5_keys(cfg: TextEncoderConfig, shapes: TensorShapes, layout: Layout) -> tuple[list[Source], Any]:
    """Strict key/shape check; returns the sources to read and our abstract tree."""
    check_layout(layout)
    srcs, abstract = sources(cfg, layout, shapes), abstract_tree(init_fn(cfg))
    tied = layout == "diffusers" and "shared.weight" in shapes
    check_keys(shapes, expected_shapes(srcs, abstract), ignore_modules([TIED_EMBEDDING] if tied else []),
               f"{layout} umT5 encoder config")
    return srcs, abstract


def convert_umt5(cfg: TextEncoderConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout) -> dict:
    """Our umT5 param tree (in cfg.param_dtype) from a PyTorch state dict (strict)."""
    srcs, abstract = check_umt5_keys(cfg, shapes, layout)
    return build_tree(srcs, abstract, read, DTYPES[cfg.param_dtype])
