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
from onestory_jax.convert.mapping import Layout, ModelMap, ReadTensor, Source, TensorShapes, ignore_modules
from onestory_jax.convert.source_config import SourceSchema
from onestory_jax.models.image_encoder import init_fn
from onestory_jax.models.layers import DTYPES

# transformers `CLIPVisionConfig` (config.json of `image_encoder/`, or a CLIPConfig's vision_config):
# our field -> (its key, its default); Wan's tower uses exact GELU on RGB, transformers' default is quick GELU.
CONFIG_JSON = SourceSchema(
    "CLIP vision tower (CLIPVisionConfig)",
    {"model_type": ("clip_vision_model",)},
    {
        "image_size": ("image_size", 224),
        "patch_size": ("patch_size", 32),
        "hidden_size": ("hidden_size", 768),
        "intermediate_size": ("intermediate_size", 3072),
        "num_layers": ("num_hidden_layers", 12),
        "num_heads": ("num_attention_heads", 12),
        "eps": ("layer_norm_eps", 1e-5),
        "activation": ("hidden_act", "quick_gelu"),
    },
    fixed={"num_channels": 3},
    nested="vision_config",
)

_LINEAR = (("kernel", "weight", "linear"), ("bias", "bias", "identity"))
_NORM = (("scale", "weight", "identity"), ("bias", "bias", "identity"))

# Top-level leaves: (our path, transformers name, original name, transform: transformers, original).
_TOP = [
    (("patch_embedding", "kernel"), "embeddings.patch_embedding.weight", "visual.patch_embedding.weight", "conv2d", "conv2d"),
    (("class_embedding",), "embeddings.class_embedding", "visual.cls_embedding", "identity", "leading_ones"),
    (("position_embedding",), "embeddings.position_embedding.weight", "visual.pos_embedding", "identity", "leading_ones"),
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


def sources(cfg: ImageEncoderConfig, layout: Layout, shapes: TensorShapes, abstract: Any = None) -> list[Source]:
    """Every leaf's PyTorch source (blocks 0 .. num_layers - 2)."""
    original, vm = layout == "original", hf_prefix(shapes)
    out = [
        Source(path, (orig if original else vm + hf,), tf_orig if original else tf_hf) for path, hf, orig, tf_hf, tf_orig in _TOP
    ]
    prefix = "visual.transformer." if original else f"{vm}encoder.layers."
    per_layer = lambda name: tuple(f"{prefix}{i}.{name}" for i in range(cfg.num_layers - 1))
    for path, hf, orig, tf in _BLOCK:
        out.append(Source(("blocks", *path), per_layer(orig if original else hf), tf, stacked=True))
    for j, p in enumerate("qkv"):  # the original fuses q, k, v row-wise in `to_qkv`
        for ours, t, tf in _LINEAR:
            name = f"attn.to_qkv.{t}" if original else f"self_attn.{p}_proj.{t}"
            out.append(Source(("blocks", "attn", p, ours), per_layer(name), tf, stacked=True, split=(j, 3) if original else None))
    return out


def _unused(cfg: ImageEncoderConfig, layout: Layout, shapes: TensorShapes):
    last = cfg.num_layers - 1
    if layout == "original":
        return ignore_modules([f"visual.transformer.{last}", "visual.post_norm", "visual.head", "textual", "log_scale"])
    vm = hf_prefix(shapes)
    return ignore_modules(
        [f"{vm}encoder.layers.{last}", f"{vm}post_layernorm", "visual_projection", f"{vm}embeddings.position_ids"]
    )


CLIP = ModelMap("CLIP vision", init_fn, sources, _unused)


def convert_clip(cfg: ImageEncoderConfig, shapes: TensorShapes, read: ReadTensor, layout: Layout) -> dict:
    """Our CLIP vision param tree (in cfg.param_dtype) from a PyTorch state dict (strict)."""
    return CLIP.convert(cfg, shapes, read, layout, DTYPES[cfg.param_dtype])
