"""The Flax CLIP vision tower against transformers' CLIPVisionModel hidden_states[-2] (random
weights, fp32), its converters (transformers and original Wan names), and image preprocessing."""

import dataclasses
import re

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from torch_refs import state_dict_numpy
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from onestory_jax.config import ImageEncoderConfig
from onestory_jax.convert.image_encoder import CLIP, convert_clip
from onestory_jax.data.video import load_image
from onestory_jax.errors import UserError
from onestory_jax.models.image_encoder import CLIP_MEAN, CLIP_STD, CLIPVisionTower, preprocess

TINY = ImageEncoderConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=128, num_layers=3, num_heads=4)

# wan_reference.md section 5: transformers module -> original Wan module (written from the table).
# transformers >= 5 saves CLIPVisionModel without the `vision_model.` prefix (WithProjection keeps it).
VM = r"(?:vision_model\.)?"
HF_TO_ORIGINAL = [
    (VM + r"embeddings\.patch_embedding\.weight", "visual.patch_embedding.weight"),
    (VM + r"pre_layrnorm\.(weight|bias)", r"visual.pre_norm.\1"),
    (VM + r"post_layernorm\.(weight|bias)", r"visual.post_norm.\1"),
    (VM + r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"visual.transformer.\1.norm\2.\3"),
    (VM + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"visual.transformer.\1.attn.proj.\2"),
    (VM + r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"visual.transformer.\1.mlp.0.\2"),
    (VM + r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"visual.transformer.\1.mlp.2.\2"),
]
QKV = VM + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)"


def hf_config(cfg: ImageEncoderConfig, projection_dim: int = 512) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=cfg.activation,
        projection_dim=projection_dim,
    )


def to_original(tensors: dict, cat=np.concatenate, lead=lambda a, n: a.reshape((1,) * n + a.shape)) -> dict:
    """Wan's CLIP names from transformers names: q/k/v rows fused into `to_qkv`, embeddings given leading
    1s. Values are arrays, or shapes with shape versions of `cat` and `lead`."""
    out, qkv = {}, {}
    for name, value in tensors.items():
        short = name.removeprefix("vision_model.")
        if m := re.fullmatch(QKV, name):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif short == "embeddings.class_embedding":
            out["visual.cls_embedding"] = lead(value, 2)
        elif short == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = lead(value, 1)
        elif short not in ("embeddings.position_ids", "visual_projection.weight"):  # head: unused_original
            renamed = [re.sub(f"^{p}$", r, name) for p, r in HF_TO_ORIGINAL if re.fullmatch(p, name)]
            assert len(renamed) == 1, name
            out[renamed[0]] = value
    for (layer, kind), parts in qkv.items():
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = cat([parts["q"], parts["k"], parts["v"]])
    return out


def unused_original(width: int, projection: int) -> dict:
    """Shapes of the parts of Wan's CLIP file the image tower does not use."""
    return {"visual.head": (width, projection), "textual.token_embedding.weight": (5, 3), "log_scale": ()}


def _shape_cat(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return (sum(s[0] for s in shapes), *shapes[0][1:])


@pytest.fixture(scope="module")
def reference():
    """A random CLIPVisionModel (norm weights perturbed), its state dict, pixels and hidden_states[-2]."""
    torch.manual_seed(0)
    model = CLIPVisionModel(hf_config(TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    pixels = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    return state_dict_numpy(model), pixels, out.hidden_states[-2].numpy()


def _error(params, pixels, ref) -> float:
    out = np.asarray(jax.jit(CLIPVisionTower(TINY).apply)({"params": params}, pixels))
    assert out.shape == ref.shape == (2, TINY.num_tokens, TINY.hidden_size)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_matches_transformers_penultimate_layer(reference):
    sd, pixels, ref = reference
    params = convert_clip(TINY, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    assert params["blocks"]["fc1"]["kernel"].shape[0] == TINY.num_layers - 1  # the last block is not kept
    assert _error(params, pixels, ref) < 1e-4


def test_quick_gelu_tower_matches_transformers():
    """transformers' CLIP default activation (x * sigmoid(1.702 x)), read from its config.json by convert."""
    quick = dataclasses.replace(TINY, activation="quick_gelu")
    torch.manual_seed(1)
    model = CLIPVisionModel(hf_config(quick)).eval()
    pixels = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = (
            model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states[-2].numpy()
        )
    sd = state_dict_numpy(model)
    params = convert_clip(quick, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    out = np.asarray(jax.jit(CLIPVisionTower(quick).apply)({"params": params}, pixels))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4
    exact = np.asarray(jax.jit(CLIPVisionTower(TINY).apply)({"params": params}, pixels))
    assert np.abs(exact - ref).max() / np.abs(ref).max() > 1e-3  # the activation matters: the test can fail


def test_original_layout_matches_transformers(reference):
    sd, pixels, ref = reference
    orig = to_original(sd) | {k: np.ones(s, np.float32) for k, s in unused_original(TINY.hidden_size, 16).items()}
    params = convert_clip(TINY, {k: v.shape for k, v in orig.items()}, orig.__getitem__, "original")
    assert _error(params, pixels, ref) < 1e-4


def test_strict_conversion_lists_every_problem(reference):
    sd = reference[0]
    shapes = {k: v.shape for k, v in sd.items()}
    del shapes["encoder.layers.0.self_attn.k_proj.bias"]
    shapes["encoder.layers.0.adapter.weight"] = (2,)
    shapes["embeddings.position_embedding.weight"] = (4, 32)
    with pytest.raises(
        UserError, match=r"1 missing: .*k_proj\.bias; 1 unexpected: .*adapter\.weight; 1 mis-shaped: .*position_embedding"
    ):
        convert_clip(TINY, shapes, sd.__getitem__, "diffusers")


def test_full_size_key_map():
    """ViT-H/14 names and shapes (meta tensors) map onto our abstract tree (its sharding: tests/test_sharding.py)."""
    cfg = ImageEncoderConfig()
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(hf_config(cfg, projection_dim=1024))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    CLIP.check(cfg, shapes, "diffusers")
    orig = to_original(shapes, cat=_shape_cat, lead=lambda s, n: (1,) * n + s) | unused_original(1280, 1024)
    CLIP.check(cfg, orig, "original")


# ---------------------------------------------------------------------------------------------
# image input


def _save(tmp_path, array: np.ndarray, name: str = "img.png", mode: str | None = None):
    img = Image.fromarray(array)
    path = tmp_path / name
    (img.convert(mode) if mode else img).save(path)
    return path


def test_preprocess_matches_clip_image_processor(tmp_path):
    """Short side to 224 and centre crop, as CLIPImageProcessor (PIL, uint8) does, up to rounding."""
    y, x = np.mgrid[0:300, 0:450]
    smooth = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0), np.full(x.shape, 90)], -1)
    image = load_image(_save(tmp_path, smooth.astype(np.uint8)))
    assert image.shape == (300, 450, 3) and image.dtype == np.uint8
    ours = np.asarray(preprocess(image, ImageEncoderConfig()))
    ref = CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )(Image.fromarray(image), return_tensors="np")
    ref = ref["pixel_values"][0].transpose(1, 2, 0)
    assert ours.shape == ref.shape == (224, 224, 3)
    assert np.abs(ours - ref).max() < 0.015  # about one uint8 step after normalisation
    np.testing.assert_allclose(preprocess(image.astype(np.float32) / 127.5 - 1, ImageEncoderConfig()), ours, atol=1e-5)


def test_load_image_bad_inputs(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(UserError, match="cannot read image"):
        load_image(tmp_path / "missing.png")
    cmyk = _save(tmp_path, np.zeros((40, 40, 3), np.uint8), "cmyk.jpg", "CMYK")
    with pytest.raises(UserError, match=r"is not RGB \(mode CMYK"):
        load_image(cmyk)
    gray = load_image(_save(tmp_path, np.full((40, 50), 7, np.uint8), "gray.png"))
    assert gray.shape == (40, 50, 3)


def test_preprocess_bad_inputs():
    with pytest.raises(UserError, match=r"too small \(300x20\)"):
        preprocess(np.zeros((20, 300, 3), np.uint8), TINY)
    with pytest.raises(UserError, match="must be RGB"):
        preprocess(np.zeros((64, 64, 4), np.uint8), TINY)
