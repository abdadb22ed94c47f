"""The VAE stage of the embedded default (`train.stage: vae`): a small Wan-VAE on synthetic clips.

The released Wan-VAE is converted, never trained here; the demo's small VAE config needs weights,
so this stage trains it as a regularised autoencoder on clips of synthetic stories
(`onestory_jax.data.synthetic`): L = MSE + L1 of the reconstruction from latents with Gaussian
noise added (`train.vae_stage.latent_noise`, so the decoder tolerates imperfect generated latents) plus
`train.vae_stage.latent_penalty` * mean(mu^2). At the end it measures the per-channel latent statistics
(stored as `vae.latents_mean/std`, as Wan's are) and exports a model folder of the frozen parts:
`model/vae` (trained), `model/text_encoder` and `model/image_encoder` (random, fixed seed: frozen
features the DiT learns to read) and `model/tokenizer` (byte-level).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from onestory_jax.checkpoint import non_finite_leaves, save_model
from onestory_jax.config import Config
from onestory_jax.data import synthetic
from onestory_jax.errors import UserError
from onestory_jax.models import byte_tokenizer, image_encoder, text_encoder, vae
from onestory_jax.sharding import activate, init_sharded, make_mesh
from onestory_jax.training.optim import make_optimizer

def synthetic_clip(index: int, frames: int, crop: int, size: int = 64) -> np.ndarray:
    """Clip `index`: `frames` consecutive frames of a random shot of a random story rendered at
    `size`, randomly cropped to `crop` pixels: [T, crop, crop, 3] in [-1, 1]."""
    rng = np.random.default_rng(index)
    story = synthetic.make_story(int(rng.integers(2**31)))
    shot = int(rng.integers(len(story.shots)))
    video, _ = synthetic.render_shot(story, shot, frames=17, size=size)
    start = int(rng.integers(0, 17 - frames + 1)) if frames <= 17 else 0
    y, x = rng.integers(0, size - crop + 1, 2)
    return video[start:start + frames, y:y + crop, x:x + crop].astype(np.float32) / 127.5 - 1.0


def clip_dataset(tc: Any, batch_size: int, seed: int) -> grain.IterDataset:
    """Infinite, seeded, checkpointable batches of synthetic clips."""
    ds = grain.MapDataset.range(2**31 - 1).shuffle(seed=seed)
    ds = ds.map(lambda i: synthetic_clip(int(i), tc.vae_stage.clip_frames, tc.vae_stage.clip_size))
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def vae_loss(params: Any, video: jax.Array, rng: jax.Array, cfg: Config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction (MSE + L1) from noised latents, plus the latent L2 penalty."""
    mu = vae.encode(cfg.vae, params, video)
    z = mu + cfg.train.vae_stage.latent_noise * jax.random.normal(rng, mu.shape)
    recon = vae.decode(cfg.vae, params, z)
    mse = jnp.mean((recon - video) ** 2)
    l1 = jnp.mean(jnp.abs(recon - video))
    penalty = jnp.mean(mu**2)
    loss = mse + l1 + cfg.train.vae_stage.latent_penalty * penalty
    return loss, {"loss": loss, "mse": mse, "latent_rms": jnp.sqrt(penalty)}


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


def train_vae(cfg: Config, workdir: str | Path, progress: bool = True, stop_after: int | None = None) -> dict[str, float]:
    """Train the VAE (resuming from `workdir/checkpoints`), then export the frozen parts' model folder."""
    tc, workdir = cfg.train, Path(workdir)
    if jax.process_count() > 1:
        raise UserError("the vae stage runs on one process")
    if (tc.vae_stage.clip_frames - 1) % 4 or tc.vae_stage.clip_size % cfg.vae.spatial_factor:
        raise UserError(f"train.vae_stage.clip_frames must be 1 + 4k and train.vae_stage.clip_size a multiple of {cfg.vae.spatial_factor}")
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        params = init_sharded(lambda rng: {"vae": vae.init_fn(cfg.vae)(rng)}, mesh, jax.random.key(tc.seed))["vae"]
        tx = make_optimizer(tc, params)
        state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        data = iter(clip_dataset(tc, tc.batch_size, tc.seed))
        options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, enable_async_checkpointing=True)
        metrics: dict[str, float] = {}
        with ocp.CheckpointManager(workdir / "checkpoints", options=options, item_names=("state", "data")) as manager:
            if manager.latest_step() is not None:
                restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(data)))
                state = restored["state"]

            @jax.jit
            def step_fn(state: dict[str, Any], video: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
                rng = jax.random.fold_in(jax.random.key(tc.seed), state["step"])
                grads, m = jax.grad(vae_loss, has_aux=True)(state["params"], video, rng, cfg)
                updates, opt = tx.update(grads, state["opt"], state["params"])
                return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}, m

            start = int(state["step"])
            end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
            with tqdm(total=tc.steps, initial=start, desc="vae", unit="step", disable=not progress) as bar:
                for step in range(start, end):
                    state, m = step_fn(state, jnp.asarray(next(data)))
                    if (step + 1) % tc.log_every == 0 or step + 1 == end:
                        metrics = {k: float(v) for k, v in m.items()}
                        if not np.isfinite(metrics["loss"]):
                            raise UserError(f"non-finite VAE loss at step {step + 1}; the last good checkpoint is kept")
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", mse=f"{metrics['mse']:.4f}",
                                        z_rms=f"{metrics['latent_rms']:.2f}")
                    bar.update(1)
                    if (step + 1) % tc.checkpoint_every == 0 or step + 1 == end:
                        if bad := non_finite_leaves(state):  # never save (or export) a diverged state
                            raise UserError(f"non-finite VAE state after step {step + 1} ({len(bad)} arrays, e.g. "
                                            f"{bad[0]}); the last good checkpoint is kept")
                        manager.save(step + 1, args=ocp.args.Composite(
                            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data)))
        if int(state["step"]) == tc.steps:
            clips = np.stack([synthetic_clip(10**9 + i, 17, tc.vae_stage.clip_size) for i in range(16)])  # held-out clips
            mean, std = latent_statistics(cfg, state["params"], clips)
            cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, latents_mean=mean, latents_std=std))
            frozen = init_sharded(lambda rng: {"text_encoder": text_encoder.init_fn(cfg.text_encoder)(rng),
                                               "image_encoder": image_encoder.init_fn(cfg.image_encoder)(rng)},
                                  mesh, jax.random.key(tc.seed + 1))
            export_frozen_parts(cfg, {"vae": state["params"], **frozen}, workdir / "model")
    return metrics
