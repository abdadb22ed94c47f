"""Independent PyTorch references (diffusers) with random weights, shared by the parity tests. torch and
diffusers are imported when a reference is built, not with this module (diffusers is 10 s of a test worker's
collection; the multidevice pass, tests/conftest.py, imports neither)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from diffusers import WanTransformer3DModel

from onestory_jax.config import DiTConfig
from onestory_jax.convert.dit_source import diffusers_config

TINY_HEADS, TINY_HEAD_DIM = 2, 12


def tiny_dit_config(model_type: str = "i2v", layers: int = 2) -> DiTConfig:
    i2v = model_type == "i2v"
    return DiTConfig(
        model_type=model_type,
        in_dim=36 if i2v else 16,
        out_dim=16,
        dim=TINY_HEADS * TINY_HEAD_DIM,
        ffn_dim=32,
        num_heads=TINY_HEADS,
        num_layers=layers,
        text_dim=32,
        image_dim=4 if i2v else None,
    )


def diffusers_dit(cfg: DiTConfig, seed: int = 0) -> WanTransformer3DModel:
    """A random diffusers WanTransformer3DModel with the same architecture as `cfg`."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**diffusers_config(cfg)).eval()
    # Default init leaves norms at 1/0 and the tables small; perturb everything so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.02))
    return model


def random_dit_inputs(cfg: DiTConfig, latent: tuple[int, int, int], batch: int = 2, seed: int = 0):
    """Channels-last latents [B, F, H, W, in_dim], 512 text tokens and (I2V) 257 CLIP tokens."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *latent, cfg.in_dim)).astype(np.float32)
    text = rng.standard_normal((batch, 512, cfg.text_dim)).astype(np.float32)
    image = rng.standard_normal((batch, 257, cfg.image_dim)).astype(np.float32) if cfg.has_image_branch else None
    return x, text, image


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# The official original->diffusers rename (scripts/convert_wan_to_diffusers.py), reproduced as the
# published table of ordered str.replace pairs; tests invert it to synthesise original-layout files.
OFFICIAL_RENAME = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("attn2.to_k_img", "attn2.add_k_proj"),
    ("attn2.to_v_img", "attn2.add_v_proj"),
    ("attn2.norm_k_img", "attn2.norm_added_k"),
]


def rename_original_to_diffusers(key: str) -> str:
    for old, new in OFFICIAL_RENAME:
        key = key.replace(old, new)
    return key


def to_original_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Invert the official rename by searching each diffusers key's original preimage."""
    out = {}
    for key, value in sd.items():
        cand = _invert(key)
        assert rename_original_to_diffusers(cand) == key, (key, cand)
        out[cand] = value
    return out


def _invert(key: str) -> str:
    # Apply the pairs backwards, in reverse order; the norm2/norm3 swap is its own inverse. The
    # head's table is the one top-level `scale_shift_table` (blocks' tables sit under `blocks.N.`).
    if key == "scale_shift_table":
        return "head.modulation"
    for old, new in reversed(OFFICIAL_RENAME):
        key = key.replace(new, old)
    return key


def run_diffusers_dit(model, x_cl: np.ndarray, t: np.ndarray, text: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """Run diffusers on channels-last input [B, F, H, W, C]; returns channels-last output."""
    import torch

    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(np.ascontiguousarray(x_cl.transpose(0, 4, 1, 2, 3))),
            timestep=torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(text),
            encoder_hidden_states_image=None if image is None else torch.from_numpy(image),
            return_dict=False,
        )[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)
