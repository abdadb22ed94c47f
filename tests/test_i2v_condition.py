"""Wan2.1's I2V condition (mask + VAE latents of [image, zeros...]) against diffusers'
`WanImageToVideoPipeline.prepare_latents` with the same tiny random AutoencoderKLWan; and the one
null text shared by training's text dropout and sampling's unconditional branch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from test_vae import diffusers_vae
from torch_refs import state_dict_numpy

from onestory_jax.config import VAEConfig
from onestory_jax.config_files import load_config
from onestory_jax.convert.vae import convert_vae
from onestory_jax.diffusion.guidance import null_text
from onestory_jax.models.vae import encode
from onestory_jax.sampling.pipeline import i2v_condition

FRAMES, HEIGHT, WIDTH = 9, 16, 24


def test_condition_matches_diffusers_prepare_latents():
    rng = np.random.default_rng(0)
    cfg = VAEConfig(
        base_dim=3,
        dim_mult=(1, 1, 1, 1),
        num_res_blocks=1,
        latents_mean=tuple(rng.normal(0, 0.3, 16).tolist()),
        latents_std=tuple(rng.uniform(0.5, 2, 16).tolist()),
    )
    model = diffusers_vae(cfg)
    sd = state_dict_numpy(model)
    params = convert_vae(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=model, scheduler=FlowMatchEulerDiscreteScheduler())
    image = rng.uniform(-1, 1, (HEIGHT, WIDTH, 3)).astype(np.float32)
    with torch.no_grad():
        _, ref = pipe.prepare_latents(
            torch.from_numpy(image).permute(2, 0, 1)[None], 1, 16, HEIGHT, WIDTH, FRAMES, torch.float32, torch.device("cpu")
        )
    ref = ref[0].permute(1, 2, 3, 0).numpy()  # [T, h, w, 4 + 16]
    run = jax.jit(functools.partial(encode, cfg))
    ours = i2v_condition(lambda v: np.asarray(run(params, jnp.asarray(v)[None]))[0], image, FRAMES, ref.shape[:3] + (16,))
    assert ours.shape == ref.shape == (3, 2, 3, 20)
    np.testing.assert_array_equal(ours[..., :4], ref[..., :4])
    np.testing.assert_allclose(ours[..., 4:], ref[..., 4:], atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert np.abs(ref[1:, ..., 4:] - ref[:1, ..., 4:]).max() > 1e-2  # later frames are not copies of frame 0


def test_one_null_text_for_training_and_sampling(monkeypatch):
    """Text dropout replaces captions by `null_text`; a story without a negative prompt guides against it."""
    from onestory_jax.training import losses

    seen = []
    real = losses.shot_loss
    monkeypatch.setattr(
        losses, "shot_loss", lambda params, batch, ctx, text, *a: seen.append(text) or real(params, batch, ctx, text, *a)
    )
    cfg = load_config("tiny", ["train.text_dropout=1.0"])
    from test_training import _batch  # the training tests' tiny batch

    from onestory_jax.models.onestory import init_params

    batch = _batch(cfg, np.random.default_rng(0))
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    # jitted (run eagerly, every op compiles on its own); the text L_shot saw is an output of the same trace
    text = jax.jit(lambda p: (losses.loss_fn(p, batch, jax.random.key(0), jnp.array(False), cfg), seen[-1])[1])(params)
    np.testing.assert_array_equal(text, null_text(batch["text"].shape))
    assert not np.any(null_text((4, 8)))
