"""The VAE stage of the embedded default (`train.stage: vae`): a small Wan-VAE on synthetic clips.

The released Wan-VAE is converted, never trained here; the demo's small VAE config needs weights,
so this stage trains it as a regularised autoencoder on clips of synthetic stories
(`onestory_jax.data.synthetic`): L = MSE + L1 of the reconstruction from latents with Gaussian
noise added (`train.vae_stage.latent_noise`, so the decoder tolerates imperfect generated latents) plus
`train.vae_stage.latent_penalty` * mean(mu^2), plus `train.vae_stage.still_consistency` * the still
drift (a still clip must keep its first frame's code in every latent frame) and
`train.vae_stage.keyframe_consistency` * the keyframe drift (latent frame k must be the image code of
frame 4k, that frame encoded alone: by the trained VAE, or with `keyframe_teacher` by the VAE it starts
from, held frozen). At the end it measures
the per-channel latent statistics (stored as `vae.latents_mean/std`, as Wan's are) and exports a model folder of the frozen parts:
`model/vae` (trained), `model/text_encoder` and `model/image_encoder` (random, fixed seed: frozen
features the DiT learns to read) and `model/tokenizer` (byte-level).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.checkpoint import save_model
from onestory_jax.config import Config
from onestory_jax.data import synthetic
from onestory_jax.errors import UserError
from onestory_jax.models import byte_tokenizer, image_encoder, text_encoder, vae
from onestory_jax.sharding import init_sharded
from onestory_jax.training.loop import Stage, pretrained_params, train
from onestory_jax.training.optim import trainable_mask

TEACHER = "keyframe_teacher"  # the params of the frozen VAE whose image codes the keyframe term targets


def _crop_corner(rng: np.random.Generator, masks: np.ndarray, crop: int, on_character: bool) -> tuple[int, int]:
    """Top-left (y, x) of a `crop` window of masks [T, H, W]: uniform, or (when `on_character` and a
    character is visible) centred near a random character pixel of the clip's middle frame."""
    size = masks.shape[1]
    ys, xs = np.nonzero(masks[len(masks) // 2])
    if not on_character or len(ys) == 0:
        return tuple(int(v) for v in rng.integers(0, size - crop + 1, 2))
    i = int(rng.integers(len(ys)))
    return tuple(int(np.clip(c - crop // 2, 0, size - crop)) for c in (ys[i], xs[i]))


def synthetic_clip(index: int, frames: int, crop: int, size: int = 64, character_crops: float = 0.0) -> np.ndarray:
    """Clip `index`: `frames` consecutive frames of a random shot of a random story rendered at
    `size`, cropped to `crop` pixels (centred on a character with probability `character_crops`,
    else anywhere): [T, crop, crop, 3] in [-1, 1]."""
    rng = np.random.default_rng(index)
    story = synthetic.make_story(int(rng.integers(2**31)))
    shot = int(rng.integers(len(story.shots)))
    video, masks = synthetic.render_shot(story, shot, frames=17, size=size)
    start = int(rng.integers(0, 17 - frames + 1)) if frames <= 17 else 0
    video, masks = video[start : start + frames], masks[start : start + frames]
    y, x = _crop_corner(rng, masks, crop, rng.random() < character_crops)
    return video[:, y : y + crop, x : x + crop].astype(np.float32) / 127.5 - 1.0


def clip_dataset(cfg: Config) -> grain.IterDataset:
    """Infinite, seeded, checkpointable batches {"video": [B, T, H, W, 3]} of synthetic clips."""
    tc = cfg.train
    ds = grain.MapDataset.range(2**31 - 1).shuffle(seed=tc.seed)
    vs = tc.vae_stage
    ds = ds.map(lambda i: synthetic_clip(int(i), vs.clip_frames, vs.clip_size, character_crops=vs.character_crops))
    ds = ds.batch(tc.batch_size, drop_remainder=True).map(lambda video: {"video": video})
    return ds.to_iter_dataset(grain.ReadOptions(prefetch_buffer_size=16))  # as data.pipeline's: not grain's 500


def vae_loss(
    params: Any, batch: dict[str, jax.Array], rng: jax.Array, warm: jax.Array, cfg: Config
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction (MSE + L1) from noised latents, plus the latent L2 penalty (`warm` unused)."""
    video = batch["video"]
    mu = vae.encode(cfg.vae, params["vae"], video)
    z = mu + cfg.train.vae_stage.latent_noise * jax.random.normal(rng, mu.shape)
    recon = vae.decode(cfg.vae, params["vae"], z)
    mse = jnp.mean((recon - video) ** 2)
    l1 = jnp.mean(jnp.abs(recon - video))
    penalty = jnp.mean(mu**2)
    loss = mse + l1 + cfg.train.vae_stage.latent_penalty * penalty
    metrics = {"mse": mse, "latent_rms": jnp.sqrt(penalty)}
    vs = cfg.train.vae_stage
    if vs.still_consistency:
        metrics["still_drift"] = still_drift(cfg, params["vae"], video)
        loss = loss + vs.still_consistency * metrics["still_drift"]
    if vs.keyframe_consistency:  # the image codes of the frozen teacher when there is one, else the VAE's own
        metrics["keyframe_drift"] = keyframe_drift(cfg, params.get(TEACHER, params["vae"]), video, mu)
        loss = loss + vs.keyframe_consistency * metrics["keyframe_drift"]
    return loss, {"loss": loss, **metrics}


def relative_error(codes: jax.Array, target: jax.Array) -> jax.Array:
    """Mean square of codes - target over the codes' mean square. Where the target is the same encoder's
    (the gradient flows through both), scale-invariant: an encoder cannot lower it by shrinking its latents
    under the stage's latent noise, which blurs the reconstruction."""
    return jnp.mean((codes - target) ** 2) / (jnp.mean(codes**2) + 1e-6)


def code_drift(codes: jax.Array) -> jax.Array:
    """Mean square of the later latent frames' difference from the first, over the codes' mean square:
    codes [B, t, h, w, z] (`relative_error` against the first frame, the first frame's zeros left out)."""
    t = codes.shape[1]
    return relative_error(codes, codes[:, :1]) * t / (t - 1)


def still_drift(cfg: Config, params: Any, video: jax.Array) -> jax.Array:
    """`code_drift` of a still clip's latents (`video`'s last frame held, [B, T, H, W, 3]): how far its later
    latent frames move from its first (the frame's image code)."""
    return code_drift(vae.encode(cfg.vae, params, jnp.broadcast_to(video[:, -1:], video.shape)))


def image_codes(cfg: Config, params: Any, frames: jax.Array) -> jax.Array:
    """frames [B, n, H, W, 3] -> [B, n, h, w, z]: each frame encoded alone (a one-frame clip)."""
    b, n = frames.shape[:2]
    codes = vae.encode(cfg.vae, params, frames.reshape(b * n, 1, *frames.shape[2:]))
    return codes.reshape(b, n, *codes.shape[2:])


def keyframe_drift(cfg: Config, image_params: Any, video: jax.Array, codes: jax.Array) -> jax.Array:
    """`relative_error` of a clip's latents `codes` [B, t, h, w, z] (of `video` [B, 1 + 4(t - 1), H, W, 3])
    against the image codes of its frames 0, 4, 8, ... by the VAE `image_params` (the trained one, or its
    frozen teacher): latent frame k should hold frame 4k, in the code a shot's first latent frame is in
    (the image code: the bisect's image-coded latents, docs/results.md)."""
    return relative_error(codes, image_codes(cfg, image_params, video[:, :: cfg.vae.temporal_factor]))


def latent_statistics(cfg: Config, params: Any, clips: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the raw latents of `clips` [N, T, H, W, 3]."""
    encode = jax.jit(lambda v: vae.encode(cfg.vae, params, v))
    mu = np.concatenate([np.asarray(encode(c[None])) for c in clips])
    flat = mu.reshape(-1, mu.shape[-1])
    return tuple(float(v) for v in flat.mean(0)), tuple(float(max(v, 1e-3)) for v in flat.std(0))


def export_frozen_parts(cfg: Config, params: dict[str, Any], out: Path) -> Path:
    """Write model/{vae, text_encoder, image_encoder, tokenizer}; the VAE config carries its statistics."""
    for part in ("vae", "text_encoder", "image_encoder"):
        if part in params:
            save_model(out / part, params[part], cfg, force=True)
    shutil.copytree(byte_tokenizer.OUT, out / "tokenizer", dirs_exist_ok=True)
    return out


def _pretrained_vae(folder: Path, cfg: Config, mesh: jax.sharding.Mesh) -> Any:
    """The VAE params of a model folder (train.init_from), sharded on `mesh` (latent statistics aside,
    its VAE must be this config's)."""
    unmeasured = lambda v: dataclasses.replace(v, latents_mean=(), latents_std=())
    return pretrained_params(
        folder,
        "vae",
        "vae",
        lambda source: unmeasured(source.vae) == unmeasured(cfg.vae),
        lambda source: vae.init_fn(cfg.vae),
        mesh,
    )


def _init(cfg: Config) -> Callable[[jax.Array], dict[str, Any]]:
    """rng -> boxed fresh params {"vae": ...}, and the keyframe teacher's tree beside it when there is one."""
    parts = ("vae", TEACHER) if cfg.train.vae_stage.keyframe_teacher else ("vae",)
    return lambda rng: {part: vae.init_fn(cfg.vae)(rng) for part in parts}


def _pretrained(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """train.init_from's VAE, the start of the trained one and, when the keyframe term has a teacher, a
    copy of it as the frozen teacher."""
    start = _pretrained_vae(Path(cfg.train.init_from), cfg, mesh)
    return {"vae": start, TEACHER: jax.tree.map(jnp.copy, start)} if cfg.train.vae_stage.keyframe_teacher else {"vae": start}


def with_frozen_teacher(cfg: Config) -> Config:
    """`cfg`, its keyframe teacher (if any) checked to start from train.init_from and never to train: with no
    train.trainable patterns, only vae/ trains."""
    tc = cfg.train
    if not tc.vae_stage.keyframe_teacher:
        return cfg
    if not tc.init_from:
        raise UserError("train.vae_stage.keyframe_teacher holds the VAE of train.init_from frozen: set train.init_from")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, trainable=tc.trainable or ("^vae/",)))
    mask = trainable_mask(jax.eval_shape(_init(cfg), jax.random.key(0)), cfg.train.trainable)
    if any(jax.tree.leaves(mask[TEACHER])):
        raise UserError(f"train.trainable {list(cfg.train.trainable)} matches the keyframe teacher ({TEACHER}/): match vae/ only")
    return cfg


def measured(cfg: Config, vae_params: Any) -> Config:
    """`cfg` with the VAE's latent statistics measured on 16 held-out 17-frame synthetic clips, whole
    64x64 frames (what prepare encodes), whatever the crops the stage trained on."""
    clips = np.stack([synthetic_clip(10**9 + i, 17, 64) for i in range(16)])
    mean, std = latent_statistics(cfg, vae_params, clips)
    return dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, latents_mean=mean, latents_std=std))


def _export(cfg: Config, params: dict[str, Any], workdir: Path, mesh: jax.sharding.Mesh) -> None:
    """Measure the latent statistics on held-out clips, then export the frozen parts' model folder."""
    cfg = measured(cfg, params["vae"])
    frozen = init_sharded(
        lambda rng: {
            "text_encoder": text_encoder.init_fn(cfg.text_encoder)(rng),
            "image_encoder": image_encoder.init_fn(cfg.image_encoder)(rng),
        },
        mesh,
        jax.random.key(cfg.train.seed + 1),
    )
    export_frozen_parts(cfg, {"vae": params["vae"], **frozen}, workdir / "model")


VAE_STAGE = Stage(
    _init,
    _pretrained,
    clip_dataset,
    vae_loss,
    lambda cfg, params: lambda shapes: (0, 0.0),
    _export,
)


def train_vae(cfg: Config, workdir: str | Path, progress: bool = True, stop_after: int | None = None) -> dict[str, float]:
    """Train the VAE with the one training loop (resuming from `workdir/checkpoints`); at the last
    step export the frozen parts' model folder `workdir/model`."""
    if jax.process_count() > 1:
        raise UserError("the vae stage runs on one process")
    vs = cfg.train.vae_stage
    if (vs.clip_frames - 1) % 4 or vs.clip_size % cfg.vae.spatial_factor:
        raise UserError(
            f"train.vae_stage.clip_frames must be 1 + 4k and train.vae_stage.clip_size a multiple of {cfg.vae.spatial_factor}"
        )
    return train(with_frozen_teacher(cfg), workdir, progress, stop_after, stage=VAE_STAGE)
