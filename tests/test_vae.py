"""The Flax Wan VAE against diffusers' AutoencoderKLWan with the same random weights (fp32)."""

import functools
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from torch_refs import state_dict_numpy

from onestory_jax.config import VAEConfig
from onestory_jax.convert.mapping import abstract_tree, expected_shapes
from onestory_jax.convert.vae import VAE, convert_vae
from onestory_jax.errors import UserError
from onestory_jax.models.vae import decode, encode

HEIGHT, WIDTH = 16, 24  # non-square; latent grid 2 x 3
TINY = {  # diffusers' own test config, and the 4-level / 2-block layout the official key map assumes
    "diffusers_test": VAEConfig(base_dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1),
    "wan_layout": VAEConfig(base_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
}


def diffusers_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKLWan:
    """A random AutoencoderKLWan; gammas and biases perturbed so that every weight matters."""
    torch.manual_seed(seed)
    model = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if name.endswith("gamma") else 0.05))
    return model


@pytest.fixture(scope="module", params=sorted(TINY))
def reference(request):
    cfg = TINY[request.param]
    model = diffusers_vae(cfg)
    return cfg, model, state_dict_numpy(model)


@functools.cache
def _jitted(cfg: VAEConfig):
    return jax.jit(functools.partial(encode, cfg)), jax.jit(functools.partial(decode, cfg))


def _stats(cfg: VAEConfig):
    return np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)


def _check_encode(cfg, model, params, frames: int) -> float:
    video = np.random.default_rng(frames).uniform(-1, 1, (2, frames, HEIGHT, WIDTH, 3)).astype(np.float32)
    with torch.no_grad():
        mu = model.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mode()
    mean, std = _stats(cfg)
    ref = (mu.permute(0, 2, 3, 4, 1).numpy() - mean) / std
    ours = np.asarray(_jitted(cfg)[0](params, video))
    assert ours.shape == ref.shape == (2, 1 + (frames - 1) // 4, HEIGHT // 8, WIDTH // 8, cfg.z_dim)
    return float(np.abs(ours - ref).max() / ref.std())


def _check_decode(cfg, model, params, frames: int) -> float:
    t = 1 + (frames - 1) // 4
    latents = np.random.default_rng(frames).standard_normal((2, t, HEIGHT // 8, WIDTH // 8, cfg.z_dim)).astype(np.float32)
    mean, std = _stats(cfg)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents * std + mean).permute(0, 4, 1, 2, 3)).sample
    ref = ref.permute(0, 2, 3, 4, 1).numpy()
    ours = np.asarray(_jitted(cfg)[1](params, latents))
    assert ours.shape == ref.shape == (2, frames, HEIGHT, WIDTH, 3)
    assert np.mean(np.abs(ref) == 1.0) < 0.5, "reference output mostly clamped: the test would be weak"
    return float(np.abs(ours - ref).max() / ref.std())


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_vae_matches_diffusers(reference, frames):
    cfg, model, sd = reference
    params = convert_vae(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    enc = _check_encode(cfg, model, params, frames)
    dec = _check_decode(cfg, model, params, frames)
    assert enc < 1e-4 and dec < 1e-4, f"{frames} frames: encode {enc:.2e}, decode {dec:.2e} (max err / output std)"


# ---------------------------------------------------------------------------------------------
# Original `Wan2.1_VAE.pth` names. OFFICIAL_RENAME reproduces the published original -> diffusers
# converter (diffusers scripts/convert_wan_to_diffusers.py, `convert_vae`); `to_original` is its
# inverse, checked below by a round trip, and synthesises original-layout state dicts.

_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.bias": "conv1.bias",
    "residual.2.weight": "conv1.weight",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.bias": "conv2.bias",
    "residual.6.weight": "conv2.weight",
}
_FIXED = {
    **{
        f"{m}.middle.{2 * i}.{a}": f"{m}.mid_block.resnets.{i}.{b}"
        for m in ("encoder", "decoder")
        for i in (0, 1)
        for a, b in _RESIDUAL.items()
    },
    **{
        f"{m}.middle.1.{p}": f"{m}.mid_block.attentions.0.{p}"
        for m in ("encoder", "decoder")
        for p in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
    },
    **{
        f"{m}.head.{a}": f"{m}.{b}"
        for m in ("encoder", "decoder")
        for a, b in (("0.gamma", "norm_out.gamma"), ("2.bias", "conv_out.bias"), ("2.weight", "conv_out.weight"))
    },
    "conv1.weight": "quant_conv.weight",
    "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
    **{f"{m}.conv1.{p}": f"{m}.conv_in.{p}" for m in ("encoder", "decoder") for p in ("weight", "bias")},
}
_UP_RESNETS = {0: 0, 1: 0, 2: 0, 4: 1, 5: 1, 6: 1, 8: 2, 9: 2, 10: 2, 12: 3, 13: 3, 14: 3}
_UP_SAMPLERS = {3: 0, 7: 1, 11: 2}


def official_rename(key: str) -> str:
    """Original -> diffusers, as the official converter does it (hard-coded 4 levels x 3 resnets)."""
    if key in _FIXED:
        return _FIXED[key]
    if key.startswith("encoder.downsamples."):
        key = key.replace("encoder.downsamples.", "encoder.down_blocks.")
        for a, b in [*_RESIDUAL.items(), ("shortcut.bias", "conv_shortcut.bias"), ("shortcut.weight", "conv_shortcut.weight")]:
            if f".{a}" in key:
                return key.replace(f".{a}", f".{b}")
        return key
    if key.startswith("decoder.upsamples."):
        idx = int(key.split(".")[2])
        if "residual" in key and idx in _UP_RESNETS:
            level = _UP_RESNETS[idx]
            suffix = next(b for a, b in _RESIDUAL.items() if f".{a}" in key)
            return f"decoder.up_blocks.{level}.resnets.{idx - 4 * level}.{suffix}"
        if ".shortcut." in key and idx == 4:
            return key.replace(".shortcut.", ".resnets.0.conv_shortcut.").replace("decoder.upsamples.4", "decoder.up_blocks.1")
        if (".resample." in key or ".time_conv." in key) and idx in _UP_SAMPLERS:
            return key.replace(f"decoder.upsamples.{idx}", f"decoder.up_blocks.{_UP_SAMPLERS[idx]}.upsamplers.0")
    return key


def to_original(key: str) -> str:
    """Diffusers -> original: the inverse of `official_rename`."""
    inverse_fixed = {v: k for k, v in _FIXED.items()}
    if key in inverse_fixed:
        return inverse_fixed[key]
    inverse_residual = {b: a for a, b in _RESIDUAL.items()} | {
        "conv_shortcut.bias": "shortcut.bias",
        "conv_shortcut.weight": "shortcut.weight",
    }
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.downsamples.{m[1]}.{inverse_residual.get(m[2], m[2])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.+)", key)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{inverse_residual[m[3]]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.+)", key)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(key)


def test_vae_original_layout():
    cfg = TINY["wan_layout"]
    model = diffusers_vae(cfg, seed=1)
    sd = state_dict_numpy(model)
    original = {to_original(k): v for k, v in sd.items()}
    assert len(original) == len(sd) and all(official_rename(k) in sd for k in original)
    assert {official_rename(k) for k in original} == set(sd)
    params = convert_vae(cfg, {k: v.shape for k, v in original.items()}, original.__getitem__, "original")
    enc = _check_encode(cfg, model, params, 5)
    dec = _check_decode(cfg, model, params, 5)
    assert enc < 1e-4 and dec < 1e-4, f"encode {enc:.2e}, decode {dec:.2e} (max err / output std)"


def test_vae_convert_is_strict():
    cfg = TINY["diffusers_test"]
    sd = state_dict_numpy(diffusers_vae(cfg))
    shapes = {k: v.shape for k, v in sd.items()}
    del shapes["decoder.conv_out.bias"]
    shapes["encoder.extra.weight"] = (1,)
    shapes["quant_conv.weight"] = (1, 2, 3)
    with pytest.raises(
        UserError,
        match=r"1 missing: decoder\.conv_out\.bias; 1 unexpected: encoder\.extra\.weight; "
        r"1 mis-shaped: quant_conv\.weight",
    ):
        convert_vae(cfg, shapes, sd.__getitem__, "diffusers")


def test_vae_rejects_bad_inputs():
    cfg = TINY["diffusers_test"]
    params = abstract_tree(VAE.init_fn(cfg))
    with pytest.raises(UserError, match=r"4 frames .* 4k\+1 .* nearest are 1 and 5"):
        encode(cfg, params, jax.ShapeDtypeStruct((1, 4, HEIGHT, WIDTH, 3), np.float32))
    with pytest.raises(UserError, match="latent channels"):
        decode(cfg, params, jax.ShapeDtypeStruct((1, 2, 2, 3, 4), np.float32))
    with pytest.raises(UserError, match="latents_mean has 16 values"):
        VAEConfig(z_dim=4).validate()
    with pytest.raises(UserError, match="temperal_downsample needs 3"):
        VAEConfig(temperal_downsample=(True,)).validate()


def test_full_size_key_map_matches_the_published_vae():
    """Names and shapes of diffusers' AutoencoderKLWan at its defaults (= Wan2.1's VAE), on the meta device."""
    import torch
    from diffusers import AutoencoderKLWan

    from onestory_jax.config import VAEConfig

    with torch.device("meta"):
        ref = AutoencoderKLWan()
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    _, abstract = VAE.check(VAEConfig(), shapes, "diffusers")
    original = expected_shapes(VAE.sources(VAEConfig(), "original", shapes, abstract), abstract)
    assert len(shapes) == len(original) == 194  # the original file's tensor count
