"""Convert a umT5 encoder checkpoint into our Flax tree (`models/text_encoder.py`).

Layouts: `diffusers` = transformers `UMT5EncoderModel` names (`shared.weight`,
`encoder.block.N.layer.0.SelfAttention.q.weight`, ...), as in Wan-AI/*-Diffusers `text_encoder/`;
`original` = Wan's `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`, ...).
"""

from __future__ import annotations

from typing import Any

from onestory_jax.config import TextEncoderConfig
from onestory_jax.convert.mapping import Layout, ModelMap, ReadTensor, Source, TensorShapes, ignore_modules
from onestory_jax.convert.source_config import SourceSchema
from onestory_jax.models.layers import DTYPES
from onestory_jax.models.text_encoder import init_fn

# transformers `UMT5Config` (config.json of `text_encoder/`): our field -> (its key, its default).
CONFIG_JSON = SourceSchema(
    "umT5 encoder (UMT5Config)",
    {"model_type": ("umt5",)},
    {
        "vocab_size": ("vocab_size", 250112),
        "d_model": ("d_model", 512),
        "d_kv": ("d_kv", 64),
        "d_ff": ("d_ff", 1024),
        "num_layers": ("num_layers", 8),
        "num_heads": ("num_heads", 6),
        "relative_attention_num_buckets": ("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": ("relative_attention_max_distance", 128),
        "eps": ("layer_norm_epsilon", 1e-6),
    },
    fixed={"feed_forward_proj": "gated-gelu"},
)

# The tied copy of `shared.weight` that some transformers files also carry.
TIED_EMBEDDING = "encoder.embed_tokens.weight"

# Per-layer leaves: (our path, transformers name, original name, transform).
_BLOCK = [
    *[(("attn", p, "kernel"), f"layer.0.SelfAttention.{p}.weight", f"attn.{p}.weight", "linear") for p in "qkvo"],
    (
        ("attn", "relative_bias"),
        "layer.0.SelfAttention.relative_attention_bias.weight",
        "pos_embedding.embedding.weight",
        "identity",
    ),
    (("norm1", "scale"), "layer.0.layer_norm.weight", "norm1.weight", "identity"),
    (("norm2", "scale"), "layer.1.layer_norm.weight", "norm2.weight", "identity"),
    (("ffn", "gate", "kernel"), "layer.1.DenseReluDense.wi_0.weight", "ffn.gate.0.weight", "linear"),
    (("ffn", "fc1", "kernel"), "layer.1.DenseReluDense.wi_1.weight", "ffn.fc1.weight", "linear"),
    (("ffn", "fc2", "kernel"), "layer.1.DenseReluDense.wo.weight", "ffn.fc2.weight", "linear"),
]


def sources(cfg: TextEncoderConfig, layout: Layout, shapes: TensorShapes, abstract: Any = None) -> list[Source]:
    """Every leaf's PyTorch source; the diffusers embedding may come from either tied name."""
    original = layout == "original"
    embedding = (
        "token_embedding.weight"
        if original
        else (TIED_EMBEDDING if "shared.weight" not in shapes and TIED_EMBEDDING in shapes else "shared.weight")
    )
    out = [
        Source(("token_embedding", "embedding"), (embedding,)),
        Source(("norm", "scale"), ("norm.weight" if original else "encoder.final_layer_norm.weight",)),
    ]
    prefix = "blocks.{}." if original else "encoder.block.{}."
    for path, hf, orig, transform in _BLOCK:
        names = tuple(prefix.format(i) + (orig if original else hf) for i in range(cfg.num_layers))
        out.append(Source(("blocks", *path), names, transform, stacked=True))
    return out


def _unused(cfg: TextEncoderConfig, layout: Layout, shapes: TensorShapes):
    tied = layout == "diffusers" and "shared.weight" in shapes
    return ignore_modules([TIED_EMBEDDING] if tied else [])


UMT5 = ModelMap("umT5 encoder", init_fn, sources, _unused)


def convert_umt5(cfg: TextEncoderConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout) -> dict:
    """Our umT5 param tree (in cfg.param_dtype) from a PyTorch state dict (strict)."""
    return UMT5.convert(cfg, shapes, read, layout, DTYPES[cfg.param_dtype])
