"""Render a story: encode captions, run the jitted scan over shots, decode, write every output.

Re-running into the same directory resumes: shots whose `shot_NN.npy` exists (with the right
shape) are not generated again, and the memory is rebuilt from their saved latents.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from onestory_jax.config import Config, to_dict
from onestory_jax.diffusion.guidance import null_text
from onestory_jax.data.video import read_video, resize_frame
from onestory_jax.errors import UserError
from onestory_jax.models.frozen import Components
from onestory_jax.models.image_encoder import load_image
from onestory_jax.models.memory import frames_per_patchifier
from onestory_jax.sampling import outputs, resume
from onestory_jax.sampling.generate import Progress, ShotRecord, StoryInputs, generation_spec, story_program
from onestory_jax.sampling.story import Story, story_to_dict


def i2v_condition(encode_video: Callable[[np.ndarray], np.ndarray], image: np.ndarray | None, frames: int,
                  latent_shape: tuple[int, ...]) -> np.ndarray:
    """Wan2.1's I2V channels [T, h, w, 4 mask + C latent] for a start image [H, W, 3] (or None).

    As Wan's pipeline: the VAE encodes [image, zeros x (frames - 1)] and all T latent frames are used;
    the 4 mask channels (one per pixel frame of a latent frame) are 1 on latent frame 0 only.
    Without an image everything is zero (mask 0: nothing given).
    """
    t, h, w, c = latent_shape
    cond = np.zeros((t, h, w, 4 + c), np.float32)
    if image is not None:
        clip = np.concatenate([image[None], np.zeros((frames - 1, *image.shape), image.dtype)])
        cond[0, :, :, :4] = 1.0
        cond[..., 4:] = encode_video(clip)
    return cond


def _load_image(path: Path, width: int, height: int) -> np.ndarray:
    """Read an RGB image, centre-crop to the aspect, resize: [H, W, 3] in [-1, 1]."""
    image = load_image(path)
    if min(image.shape[:2]) < 16:
        raise UserError(f"start image '{path}' is too small ({image.shape[1]}x{image.shape[0]})")
    return resize_frame(image, width, height)


def render_story(cfg: Config, params: dict, comps: Components, story: Story, out: Path, progress: bool = True,
                 mesh: jax.sharding.Mesh | None = None, model_id: str = "", redo: int | None = None) -> dict[str, Any]:
    """Generate (or resume) every shot of `story` into `out`; returns the manifest.

    Each shot is saved (latents + record, `resume.py`) as soon as it is denoised. Saved shots whose
    fingerprint matches (same inputs, same model `model_id`, same earlier shots) are kept; from the
    first mismatch (or shot `redo`, 1-based) on, shots are regenerated. On a mesh whose `data` axis has
    2 devices, the CFG pair is split across them.
    """
    s = story.settings
    t_lat, h, w = story.latent_frames, s.height // cfg.vae.spatial_factor, s.width // cfg.vae.spatial_factor
    latent_shape = (t_lat, h, w, cfg.vae.z_dim)
    n = len(story.shots)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    shot_inputs, prints = resume.story_fingerprints(story, model_id)
    finished, reasons = resume.reusable_shots(out, story, model_id, latent_shape, redo)
    image, image_tokens = None, None
    if story.start_video is not None and not finished:  # shot 1 is the start video: encoded and saved as a shot
        video = read_video(story.start_video)
        frames = s.frames
        if len(video) < frames:
            raise UserError(f"start_video has {len(video)} frames; the story's shots have {frames} (4k+1)")
        clip = np.stack([resize_frame(f, s.width, s.height) for f in video[:frames]])
        finished = [np.asarray(comps.encode_video(clip))]
        resume.save_shot(out, 0, finished[0], shot_inputs[0], prints[0])
        reasons[0] = "encoded from start_video"
    if story.start_image is not None:
        image = _load_image(story.start_image, s.width, s.height)
        if comps.encode_image is not None:
            image_tokens = np.asarray(comps.encode_image(image))
    if cfg.dit.has_image_branch and image_tokens is None:
        # No start image: shot 1 sees zero CLIP tokens, later shots those of shot 1's first frame (in the scan).
        image_tokens = np.zeros((cfg.image_encoder.num_tokens, cfg.dit.image_dim), np.float32)
    timings["prepare_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    embeddings = np.asarray(comps.encode_text([shot.caption for shot in story.shots]))
    negative = null_text(embeddings.shape[1:])
    if s.negative_prompt:  # Wan's recipe for its own weights; the default "" is the null text training drops to
        negative = np.asarray(comps.encode_text([s.negative_prompt]))[0]
    timings["encode_text_s"] = time.perf_counter() - t1

    done = np.zeros((n,), bool)
    done_latents = np.zeros((n, *latent_shape), np.float32)
    for i, lat in enumerate(finished):
        done[i], done_latents[i] = True, lat
    noise = np.stack([np.asarray(jax.random.normal(jax.random.key(story.shot_seed(i)), latent_shape)) for i in range(n)])
    inputs = StoryInputs(
        text=jnp.asarray(embeddings), negative=jnp.asarray(negative), noise=jnp.asarray(noise),
        active=jnp.ones((n,), bool), done=jnp.asarray(done), done_latents=jnp.asarray(done_latents),
        cond=jnp.asarray(i2v_condition(comps.encode_video, image, s.frames, latent_shape)) if cfg.dit.has_image_branch else None,
        image_tokens=None if image_tokens is None else jnp.asarray(image_tokens),
        has_start_image=jnp.asarray(story.start_image is not None),
    )
    mem_cfg = dataclasses.replace(cfg.memory, budget=story.memory.budget)
    cfg = dataclasses.replace(cfg, memory=mem_cfg)
    spec = generation_spec(cfg, story.memory.strategy, story.memory.k, (h, w), s.steps, s.shift, s.solver, s.guidance)

    to_do = n - len(finished)
    bar = tqdm(total=to_do * s.steps, desc="denoising", unit="step", disable=not progress or to_do == 0)
    shot_started: dict[int, float] = {}

    def on_shot(shot: int) -> None:
        shot_started[shot] = time.perf_counter()
        bar.set_postfix_str(f"shot {shot + 1}/{n}")

    t2 = time.perf_counter()
    pair = None
    if mesh is not None and mesh.shape["data"] == 2:
        pair = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    step_times: list[float] = []

    def on_step(step: int) -> None:
        step_times.append(time.perf_counter())
        bar.update(1)

    failed: list[UserError] = []  # raised once the program returns (an error inside a callback is a traceback)

    def on_shot_done(shot: int, latents: np.ndarray) -> None:
        """Save a shot the moment it is denoised; nothing of a non-finite or unsaveable shot or of those after it."""
        if failed:
            return
        if not np.isfinite(latents).all():
            failed.append(UserError(f"shot {shot + 1} came out with non-finite values (NaN/Inf) and was not saved "
                                    "(shots before it are). Check the model's weights and the story's numbers"))
            return
        try:
            resume.save_shot(out, shot, latents, shot_inputs[shot], prints[shot])
        except UserError as e:  # a full disk: the shots before it are kept
            failed.append(e)

    Progress.on_shot, Progress.on_step, Progress.on_shot_done = on_shot, on_step, on_shot_done
    try:
        records: ShotRecord = jax.device_get(story_program(cfg, spec, pair)(params, inputs))
    finally:
        Progress.on_shot = Progress.on_step = Progress.on_shot_done = None
        bar.close()
    if failed:
        raise failed[0]
    timings["generate_s"] = time.perf_counter() - t2
    if shot_started:  # compile (and launch): until the program reports its first shot
        timings["compile_s"] = min(shot_started.values()) - t2
    intervals = np.diff(step_times)
    if len(intervals):  # one denoising step (the guided DiT pair), excluding shot boundaries
        timings["dit_step_s"] = float(np.median(intervals))

    manifest_shots = []
    videos = []
    counts = frames_per_patchifier(mem_cfg, (h, w))
    level_of_rank = np.repeat(np.arange(len(counts)), counts)
    for i in tqdm(range(n), desc="decoding", unit="shot", disable=not progress):
        lat = np.asarray(records.latents[i])
        t3 = time.perf_counter()
        video = outputs.to_uint8(comps.decode_latents(lat))
        t4 = time.perf_counter()
        outputs.write_mp4(out / outputs.shot_name(i, ".mp4"), video, s.fps)
        videos.append(video)
        memory = [
            {"shot": int(slot) // t_lat + 1, "frame": int(slot) % t_lat, "score": float(score),
             "patchifier": list(mem_cfg.patchifier_kernels[level_of_rank[rank]])}
            for rank, (slot, score, used) in enumerate(zip(records.indices[i], records.scores[i], records.selected[i])) if used
        ]
        shot_time = None
        if i in shot_started:
            end = shot_started.get(i + 1, t2 + timings["generate_s"])
            shot_time = end - shot_started[i]
        manifest_shots.append({
            "shot": i + 1, "caption": story.shots[i].caption, "seed": story.shot_seed(i), "resumed": bool(done[i]),
            "generated_because": reasons[i], "fingerprint": prints[i],
            "memory": memory, "timings": {"denoise_s": shot_time, "decode_s": t4 - t3, "write_s": time.perf_counter() - t4},
        })
    outputs.write_mp4(out / "story.mp4", np.concatenate(videos), s.fps)
    outputs.contact_sheet(out / "contact_sheet.png", videos)
    timings["total_s"] = time.perf_counter() - t0
    manifest = {"config": to_dict(cfg), "story": story_to_dict(story), "shots": manifest_shots, "timings": timings,
                "latent_shape": list(latent_shape)}
    outputs.save_json(out / "manifest.json", manifest)
    return manifest
