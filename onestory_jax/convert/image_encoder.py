"""Convert a CLIP vision checkpoint into our Flax tree (`models/image_encoder.py`).

Layouts: `diffusers` = transformers `CLIPVisionModel(WithProjection)` names (`vision_model.*`), as in
Wan-AI/*-Diffusers `image_encoder/` (transformers >= 5 saves a plain `CLIPVisionModel` without the
`vision_model.` prefix; both are accepted); `original` = Wan's
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (`visual.*`; fused `to_qkv` split into
q/k/v). Parts Wan does not use are accepted and skipped: the last block, the post-norm and the
projection, and in the original file the text tower (`textual.*`) and `log_scale`.
"""

from __future__ import annotations

from typing import Any

from onestory_jax.config import ImageEncoderConfig
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
from onestory_jax.models.image_encoder import init_fn
from onestory_jax.models.layers import DTYPES

_LINEAR = (("kernel", "weight", "linear"), ("bias", "bias", "identity"))
_NORM = (("scale", "weight", "identity"), ("bias", "bias", "identity"))

# Top-level leaves: (our path, transformers name, original name, transform: transformers, original).
_TOP = [
    (("patch_embedding", "kernel"), "embeddings.patch_embedding.weight", "visual.patch_embedding.weight", "conv2d", "conv2d"),
    (("class_embedding",), "embeddings.class_embedding", "visual.cls_embedding", "identity", "rank3"),
    (("position_embedding",), "embeddings.position_embedding.weight", "visual.pos_embedding", "identity", "rank3"),
    *[(("pre_norm", ours), f"pre_layrnorm.{t}", f"visual.pre_norm.{t}", tf, tf) for ours, t, tf in _NORM],
]

# Per-layer leaves: (our path, transformers name, original name, transform); q/k/v are added apart.
_MODULES = [
    (("attn", "o"), "self_attn.out_proj", "attn.proj", _LINEAR),
    (("fc1",), "mlp.fc1", "mlp.0", _LINEAR),
    (("fc2",), "mlp.fc2", "mlp.2", _LINEAR),
    (("norm1",), "layer_norm1", "norm1", _NORM),
    (("norm2",), "layer_norm2", "norm2", _NORM),
]
_BLOCK = [((*path, ours), f"{hf}.{t}", f"{orig}.{t}", tf) for path, hf, orig, leaves in _MODULES for ours, t, tf in leaves]


def hf_prefix(shapes: TensorShapes) -> str:
    """`vision_model.` unless the file is a prefix-less transformers >= 5 `CLIPVisionModel`."""
    return "vision_model." if any(k.startswith("vision_model.") for k in shapes) else ""


def sources(cfg: ImageEncoderConfig, layout: Layout, shapes: TensorShapes) -> list[Source]:
    """Every leaf's PyTorch source (blocks 0 .. num_layers - 2)."""
    original, vm = layout == "original", hf_prefix(shapes)
    out = [Source(path, (orig if original else vm + hf,), tf_orig if original else tf_hf)
           for path, hf, orig, tf_hf, tf_orig in _TOP]
    prefix = "visual.transformer." if original else f"{vm}encoder.layers."
    per_layer = lambda name: tuple(f"{prefix}{i}.{name}" for i in range(cfg.num_layers - 1))
    for path, hf, orig, tf in _BLOCK:
        out.append(Source(("blocks", *path), per_layer(orig if original else hf), tf, stacked=True))
    for j, p in enumerate("qkv"):  # the original fuses q, k, v row-wise in `to_qkv`
        for ours, t, tf in _LINEAR:
            name = f"attn.to_qkv.{t}" if original else f"self_attn.{p}_proj.{t}"
            out.append(Source(("blocks", "attn", p, ours), per_layer(name), tf, stacked=True, split=(j, 3) if original else None))
    return out


def _unused(cfg: ImageEncoderConfig, layout: Layout, shapes: TensorShapes) -> list[str]:
    last = cfg.num_layers - 1
    if layout == "original":
        return [f"visual.transformer.{last}", "visual.post_norm", "visual.head", "textual", "log_scale"]
    vm = hf_prefix(shapes)
    return [f"{vm}encoder.layers.{last}", f"{vm}post_layernorm", "visual_projection", f"{vm}embeddings.position_ids"]


def check_clip_keys(cfg: ImageEncoderConfig, shapes: TensorShapes, layout: Layout) -> tuple[list[Source], Any]:
    """Strict key/shape check; returns the sources to read and our abstract tree."""
    check_layout(layout)
    srcs, abstract = sources(cfg, layout, shapes), abstract_tree(init_fn(cfg))
    check_keys(shapes, expected_shapes(srcs, abstract), ignore_modules(_unused(cfg, layout, shapes)),
               f"{layout} CLIP vision config")
    return srcs, abstract


def convert_clip(cfg: ImageEncoderConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout) -> dict:
    """Our CLIP vision param tree (in cfg.param_dtype) from a PyTorch state dict (strict)."""
    srcs, abstract = check_clip_keys(cfg, shapes, layout)
    return build_tree(srcs, abstract, read, DTYPES[cfg.param_dtype])
