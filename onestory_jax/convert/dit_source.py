"""Find a Wan2.1 DiT checkpoint folder, detect its layout and read its architecture from config.json.

diffusers: a pipeline folder with `transformer/`, or the transformer folder itself
(`_class_name: WanTransformer3DModel`). original: the Wan release folder (`_class_name: WanModel`,
or no class name but the WanModel fields `dim`, `num_heads`, `in_dim`, `model_type`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from onestory_jax.config import DiTConfig
from onestory_jax.config_files import from_dict
from onestory_jax.convert.mapping import Layout
from onestory_jax.convert.safetensors_io import SafetensorsReader, open_dir
from onestory_jax.convert.source_config import read_json, require, unsupported
from onestory_jax.errors import UserError

CLASS_NAMES: dict[str, Layout] = {"WanTransformer3DModel": "diffusers", "WanModel": "original"}
ORIGINAL_MARKERS = ("dim", "num_heads", "in_dim", "model_type")
# The published Wan2.1 I2V models take CLIP ViT-H/14 penultimate features of this width.
ORIGINAL_IMAGE_DIM = 1280


@dataclasses.dataclass(frozen=True)
class DiTSource:
    """A checkpoint folder: its layout, our config for it, the raw config.json and its tensors."""

    root: Path
    layout: Layout
    config: DiTConfig
    raw_config: dict[str, Any]
    tensors: SafetensorsReader


def open_dit_source(directory: str | Path, layout: Literal["auto", "diffusers", "original"] = "auto") -> DiTSource:
    """Resolve `directory`, check the layout and the architecture, open the weights (lazily)."""
    root = _model_root(Path(directory))
    config_path = root / "config.json"
    raw = read_json(config_path)
    detected = detect_layout(raw, config_path)
    if layout not in ("auto", detected):
        raise UserError(f"--layout {layout} given, but '{root}' holds a {detected}-layout checkpoint")
    parse = dit_config_from_diffusers if detected == "diffusers" else dit_config_from_original
    try:
        cfg = parse(raw)
        cfg.validate()
    except UserError as e:
        raise UserError(f"'{config_path}': {e}") from None
    return DiTSource(root, detected, cfg, raw, open_dir(root))


def _model_root(directory: Path) -> Path:
    if not directory.is_dir():
        raise UserError(f"source '{directory}' is not a directory")
    if (directory / "transformer" / "config.json").is_file():
        return directory / "transformer"
    if not (directory / "config.json").is_file():
        raise UserError(f"'{directory}' has no config.json (nor transformer/config.json): not a Wan2.1 DiT checkpoint")
    return directory


def detect_layout(raw: dict[str, Any], path: Path) -> Layout:
    """The checkpoint layout a config.json describes; other architectures are a `UserError`."""
    name = raw.get("_class_name")
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    if name is None and all(k in raw for k in ORIGINAL_MARKERS):
        return "original"
    what = f"a {name}" if name else "no known model class"
    raise UserError(f"'{path}' describes {what}, not a Wan2.1 DiT (WanTransformer3DModel or WanModel)")


def dit_config_from_diffusers(raw: dict[str, Any]) -> DiTConfig:
    """DiTConfig from a diffusers `WanTransformer3DModel` config.json."""
    require(
        raw,
        (
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
            "out_channels",
            "text_dim",
            "freq_dim",
            "ffn_dim",
            "num_layers",
            "eps",
        ),
        "diffusers Wan2.1 DiT",
    )
    unsupported(raw, {"qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "pos_embed_seq_len": None})
    dim = raw["num_attention_heads"] * raw["attention_head_dim"]
    image_dim, added_kv = raw.get("image_dim"), raw.get("added_kv_proj_dim")
    if (image_dim is None) != (added_kv is None) or added_kv not in (None, dim):
        raise UserError(
            f"image_dim={image_dim} with added_kv_proj_dim={added_kv} is not a Wan2.1 model "
            f"(I2V has both, added_kv_proj_dim = heads x head dim = {dim}; T2V has neither)"
        )
    return from_dict(
        DiTConfig,
        {
            "model_type": "t2v" if image_dim is None else "i2v",
            "in_dim": raw["in_channels"],
            "out_dim": raw["out_channels"] if raw["out_channels"] is not None else raw["in_channels"],
            "dim": dim,
            "ffn_dim": raw["ffn_dim"],
            "num_heads": raw["num_attention_heads"],
            "num_layers": raw["num_layers"],
            "patch_size": raw.get("patch_size", [1, 2, 2]),
            "freq_dim": raw["freq_dim"],
            "text_dim": raw["text_dim"],
            "image_dim": image_dim,
            "eps": raw["eps"],
        },
    )


def diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """Keyword arguments of a diffusers `WanTransformer3DModel` with `cfg`'s architecture (inverse of
    `dit_config_from_diffusers`), for reference models in parity tests and benchmarks."""
    return {
        "patch_size": tuple(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "rope_max_seq_len": 1024,
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.dim if cfg.has_image_branch else None,
    }


def dit_config_from_original(raw: dict[str, Any]) -> DiTConfig:
    """DiTConfig from an original Wan `WanModel` config.json."""
    require(
        raw,
        ("dim", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len", "eps"),
        "original Wan2.1 DiT",
    )
    if raw["model_type"] not in ("t2v", "i2v"):
        raise UserError(f"model_type={raw['model_type']!r} is not supported (Wan2.1 t2v or i2v)")
    unsupported(raw, {"window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True})
    return from_dict(
        DiTConfig,
        {
            "model_type": raw["model_type"],
            "in_dim": raw["in_dim"],
            "out_dim": raw["out_dim"],
            "dim": raw["dim"],
            "ffn_dim": raw["ffn_dim"],
            "num_heads": raw["num_heads"],
            "num_layers": raw["num_layers"],
            "patch_size": raw.get("patch_size", [1, 2, 2]),
            "freq_dim": raw["freq_dim"],
            "text_dim": raw.get("text_dim", 4096),
            "text_len": raw["text_len"],
            "image_dim": ORIGINAL_IMAGE_DIM if raw["model_type"] == "i2v" else None,
            "eps": raw["eps"],
        },
    )
