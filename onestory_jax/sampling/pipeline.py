"""Render a story in six parts: prepare (resume state, start image), encode, the compiled story
program (cached by its static spec), run, decode, write.

Re-running into the same directory resumes: saved shots whose fingerprint still matches are kept,
and the memory is rebuilt from their latents (`resume.py`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from onestory_jax.config import Config
from onestory_jax.config_files import to_dict
from onestory_jax.data.video import i2v_channels, image_clip, load_image, read_video, resize_frame
from onestory_jax.diffusion.guidance import null_text
from onestory_jax.errors import UserError
from onestory_jax.models.frozen import Components
from onestory_jax.models.memory import frames_per_patchifier
from onestory_jax.sampling import outputs, resume
from onestory_jax.sampling.generate import GenerationSpec, Listeners, ShotRecord, StoryInputs, generation_spec, story_program
from onestory_jax.sampling.memory_bank import control_masks, item_slots, slot_captions
from onestory_jax.sampling.story import Story, require_resolved, story_to_dict, with_sampler


def i2v_condition(
    encode_video: Callable[[np.ndarray], np.ndarray], image: np.ndarray | None, frames: int, latent_shape: tuple[int, ...]
) -> np.ndarray:
    """Wan2.1's I2V channels [T, h, w, 4 mask + C latent] for a start image [H, W, 3] (or None).

    As Wan's pipeline: the VAE encodes [image, zeros x (frames - 1)] and all T latent frames are used
    (`data.video.i2v_channels`). Without an image everything is zero (mask 0: nothing given).
    """
    if image is None:
        t, h, w, c = latent_shape
        return np.zeros((t, h, w, 4 + c), np.float32)
    return i2v_channels(encode_video(image_clip(image, frames)))


def _load_image(path: Path, width: int, height: int) -> np.ndarray:
    """Read an RGB image, centre-crop to the aspect, resize: [H, W, 3] in [-1, 1]."""
    image = load_image(path)
    if min(image.shape[:2]) < 16:
        raise UserError(f"start image '{path}' is too small ({image.shape[1]}x{image.shape[0]})")
    return resize_frame(image, width, height)


@dataclasses.dataclass
class PreparedStory:
    """A story checked against `--out`: what is kept from an earlier run, what conditions shot 1."""

    latent_shape: tuple[int, int, int, int]  # [T, h, w, C] of one shot
    shot_inputs: list[dict[str, Any]]  # per shot: what made it (resume.shot_inputs)
    fingerprints: list[str]  # per shot: hash of its inputs and of all earlier shots
    finished: list[np.ndarray]  # latents of the shots kept (a prefix of the story)
    reasons: list[str]  # per shot: why it is kept or generated
    image: np.ndarray | None  # start image [H, W, 3] in [-1, 1]
    image_tokens: np.ndarray | None  # [Li, image_dim] CLIP tokens shot 1 sees (I2V), else None


def latent_shape(cfg: Config, story: Story) -> tuple[int, int, int, int]:
    """[T, h, w, C] of one shot of `story` under the VAE of `cfg`."""
    s, f = story.settings, cfg.vae.spatial_factor
    return (story.latent_frames, s.height // f, s.width // f, cfg.vae.z_dim)


def prepare_story(
    cfg: Config, comps: Components, story: Story, out: Path, model_id: str = "", redo: int | None = None
) -> PreparedStory:
    """Which saved shots in `out` are kept (by fingerprint, or up to shot `redo`, 1-based), the start
    video encoded and saved as shot 1, and the start image with its CLIP tokens."""
    s, shape = require_resolved(story).settings, latent_shape(cfg, story)  # fingerprints cover the settings used
    shot_inputs, prints = resume.story_fingerprints(story, model_id)
    finished, reasons = resume.reusable_shots(out, story, model_id, shape, redo)
    image, image_tokens = None, None
    if story.start_video is not None and not finished:  # shot 1 is the start video: encoded and saved as a shot
        video = read_video(story.start_video)
        if len(video) < s.frames:
            raise UserError(f"start_video has {len(video)} frames; the story's shots have {s.frames} (4k+1)")
        clip = np.stack([resize_frame(f, s.width, s.height) for f in video[: s.frames]])
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
    return PreparedStory(shape, shot_inputs, prints, finished, reasons, image, image_tokens)


def encode_story(cfg: Config, comps: Components, story: Story, prepared: PreparedStory) -> StoryInputs:
    """The story program's inputs: caption and negative embeddings, each shot's seeded noise, the
    kept shots' latents and the I2V condition."""
    s, shape, n = require_resolved(story).settings, prepared.latent_shape, len(story.shots)
    embeddings = np.asarray(comps.encode_text([shot.caption for shot in story.shots]))
    negative = null_text(embeddings.shape[1:])
    if s.negative_prompt:  # Wan's recipe for its own weights; the default "" is the null text training drops to
        negative = np.asarray(comps.encode_text([s.negative_prompt]))[0]
    done = np.zeros((n,), bool)
    done_latents = np.zeros((n, *shape), np.float32)
    for i, lat in enumerate(prepared.finished):
        done[i], done_latents[i] = True, lat
    noise = np.stack([np.asarray(jax.random.normal(jax.random.key(story.shot_seed(i)), shape)) for i in range(n)])
    cond = None
    if cfg.dit.has_image_branch:
        cond = jnp.asarray(i2v_condition(comps.encode_video, prepared.image, s.frames, shape))
    references, pinned, excluded = None, None, None
    if story.references:  # each image one latent frame, as the VAE encodes a video's first frame
        references = np.concatenate([comps.encode_video(_load_image(r.path, s.width, s.height)[None]) for r in story.references])
    if any(shot.pin or shot.exclude for shot in story.shots):
        pinned, excluded = control_masks(
            [shot.pin for shot in story.shots],
            [shot.exclude for shot in story.shots],
            [r.name for r in story.references],
            shape[0],
        )
    return StoryInputs(
        text=jnp.asarray(embeddings),
        negative=jnp.asarray(negative),
        noise=jnp.asarray(noise),
        active=jnp.ones((n,), bool),
        done=jnp.asarray(done),
        done_latents=jnp.asarray(done_latents),
        cond=cond,
        image_tokens=None if prepared.image_tokens is None else jnp.asarray(prepared.image_tokens),
        has_start_image=jnp.asarray(story.start_image is not None),
        continues=jnp.asarray([shot.continues for shot in story.shots]) if any(s.continues for s in story.shots) else None,
        references=None if references is None else jnp.asarray(references),
        pinned=None if pinned is None else jnp.asarray(pinned),
        excluded=None if excluded is None else jnp.asarray(excluded),
        memory_text=slot_captions(embeddings, shape[0], len(story.references)) if cfg.memory.selector_reads_captions else None,
    )


def story_spec(cfg: Config, story: Story) -> tuple[Config, GenerationSpec]:
    """The config with the story's memory budget (the story's, else the model config's, which a command-line
    `memory.budget=N` sets), and the static spec of its compiled program."""
    s = require_resolved(story).settings
    if story.memory.budget is not None:
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, budget=story.memory.budget))
    hw = latent_shape(cfg, story)[1:3]
    return cfg, generation_spec(
        cfg, story.memory.strategy, story.memory.k, hw, s.steps, s.shift, s.solver, s.guidance, s.cache, s.memory_guidance
    )


def run_story(
    cfg: Config,
    params: dict,
    spec: GenerationSpec,
    inputs: StoryInputs,
    on_shot_done: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ShotRecord, dict[str, Any]]:
    """Run the (cached) compiled story program; `on_shot_done(shot, latents)` sees each newly denoised
    shot as it finishes. On a mesh whose `data` axis has 2 devices, the CFG pair is split across them.

    Returns the host records [S, ...] and timings: generate_s, compile_s (until the first shot
    starts), dit_step_s (median denoising step), shot_s {shot: seconds} for the shots generated.
    """
    n, to_do = int(inputs.active.sum()), int((inputs.active & ~inputs.done).sum())
    steps = len(spec.timesteps)
    bar = tqdm(total=to_do * steps, desc="denoising", unit="step", disable=not progress or to_do == 0)
    shot_started: dict[int, float] = {}
    step_times: list[float] = []

    def on_shot(shot: int) -> None:
        shot_started[shot] = time.perf_counter()
        bar.set_postfix_str(f"shot {shot + 1}/{n}")

    def on_step(step: int) -> None:
        step_times.append(time.perf_counter())
        bar.update(1)

    pair = None
    if mesh is not None and mesh.shape["data"] == 2:
        pair = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    t0 = time.perf_counter()
    try:
        records = story_program(cfg, spec, pair)(params, inputs, Listeners(on_shot, on_step, on_shot_done))
    finally:
        bar.close()
    end = time.perf_counter()
    timings: dict[str, Any] = {"generate_s": end - t0}
    if shot_started:  # compile (and launch): until the program reports its first shot
        timings["compile_s"] = min(shot_started.values()) - t0
    intervals = np.diff(step_times)
    if len(intervals):  # one denoising step (the guided DiT pair), excluding shot boundaries
        timings["dit_step_s"] = float(np.median(intervals))
    timings["shot_s"] = {i: shot_started.get(i + 1, end) - t for i, t in shot_started.items()}
    return records, timings


def decode_shots(comps: Components, latents: np.ndarray, progress: bool = True) -> tuple[list[np.ndarray], list[float]]:
    """Decode each shot's latents [S, T, h, w, C] -> (uint8 videos [F, H, W, 3], seconds per shot)."""
    videos, seconds = [], []
    for lat in tqdm(latents, desc="decoding", unit="shot", disable=not progress):
        t0 = time.perf_counter()
        videos.append(outputs.to_uint8(comps.decode_latents(np.asarray(lat))))
        seconds.append(time.perf_counter() - t0)
    return videos, seconds


def write_story(
    out: Path,
    cfg: Config,
    story: Story,
    prepared: PreparedStory,
    records: ShotRecord,
    videos: list[np.ndarray],
    timings: dict[str, Any],
    started: float | None = None,
) -> dict[str, Any]:
    """Write shot_NN.mp4, story.mp4, contact_sheet.png and manifest.json (with each shot's memory:
    the frames it used, their scores and patchifiers); returns the manifest. `started`: the
    perf_counter() the render began at, for timings["total_s"]."""
    s, t_lat = story.settings, prepared.latent_shape[0]
    counts = frames_per_patchifier(cfg.memory, prepared.latent_shape[1:3])
    level_of_rank = np.repeat(np.arange(len(counts)), counts)
    shot_s, decode_s = timings.pop("shot_s", {}), timings.pop("decode_s", [None] * len(videos))
    unchanged = written_mp4s(out, prepared.fingerprints, s.fps)
    refs = [r.name for r in story.references]
    pinned = [{s for item in shot.pin for s in item_slots(item, refs, t_lat)} for shot in story.shots]
    manifest_shots = []
    for i, video in enumerate(videos):
        t0 = time.perf_counter()
        if i not in unchanged:
            outputs.write_mp4(out / outputs.shot_name(i, ".mp4"), video, s.fps)
        memory = [
            {
                **slot_source(int(slot), refs, t_lat),
                "score": float(score),
                "pinned": bool(slot in pinned[i]),
                "patchifier": list(cfg.memory.patchifier_kernels[level_of_rank[rank]]),
            }
            for rank, (slot, score, used) in enumerate(zip(records.indices[i], records.scores[i], records.selected[i]))
            if used
        ]
        manifest_shots.append(
            {
                "shot": i + 1,
                "caption": story.shots[i].caption,
                "seed": story.shot_seed(i),
                "continues": story.shots[i].continues,
                "resumed": i < len(prepared.finished),
                "generated_because": prepared.reasons[i],
                "fingerprint": prepared.fingerprints[i],
                "memory": memory,
                **(
                    {"memory_control": {"pin": list(story.shots[i].pin), "exclude": list(story.shots[i].exclude)}}
                    if story.shots[i].pin or story.shots[i].exclude
                    else {}
                ),
                "timings": {"denoise_s": shot_s.get(i), "decode_s": decode_s[i], "write_s": time.perf_counter() - t0},
            }
        )
    outputs.write_mp4(out / "story.mp4", np.concatenate(videos), s.fps)
    outputs.contact_sheet(out / "contact_sheet.png", videos)
    if started is not None:
        timings["total_s"] = time.perf_counter() - started
    manifest = {
        "config": to_dict(cfg),
        "story": story_to_dict(story),
        "shots": manifest_shots,
        "timings": timings,
        "latent_shape": list(prepared.latent_shape),
    }
    outputs.save_json(out / "manifest.json", manifest)
    outputs.remove_leftovers(out, len(videos))  # a killed run's temporaries, the shots of a longer earlier story
    return manifest


def written_mp4s(out: Path, fingerprints: list[str], fps: int) -> set[int]:
    """Shots whose mp4 the last complete run wrote from the same fingerprint at the same fps (kept as is)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest["story"]["settings"]["fps"] != fps:
            return set()
        return {
            i
            for i, shot in enumerate(manifest["shots"][: len(fingerprints)])
            if shot["fingerprint"] == fingerprints[i] and (out / outputs.shot_name(i, ".mp4")).is_file()
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return set()


def slot_source(slot: int, references: list[str], frames_per_shot: int) -> dict[str, Any]:
    """What a memory bank slot holds: {"reference": name}, or {"shot": N (1-based), "frame": latent frame}."""
    if slot < len(references):
        return {"reference": references[slot]}
    slot -= len(references)
    return {"shot": slot // frames_per_shot + 1, "frame": slot % frames_per_shot}


def render_story(
    cfg: Config,
    params: dict,
    comps: Components,
    story: Story,
    out: Path,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    model_id: str = "",
    redo: int | None = None,
) -> dict[str, Any]:
    """Generate (or resume) every shot of `story` into `out`; returns the manifest.

    The parts, each usable alone: prepare_story (resume state, start image/video), encode_story,
    story_spec (the compiled program is cached by it), run_story, decode_shots, write_story.
    Each shot is saved (latents + record, `resume.py`) as soon as it is denoised. Saved shots whose
    fingerprint matches (same inputs, same model `model_id`, same earlier shots) are kept; from the
    first mismatch (or shot `redo`, 1-based) on, shots are regenerated.
    """
    out.mkdir(parents=True, exist_ok=True)
    stage = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    t0 = time.perf_counter()
    story = story if story.resolved else with_sampler(story, cfg.sampler)  # resolved once for every part below
    stage(f"{out}: checking saved shots and the start image")
    prepared = prepare_story(cfg, comps, story, out, model_id, redo)
    t1 = time.perf_counter()
    stage(f"encoding {len(story.shots)} captions")
    inputs = encode_story(cfg, comps, story, prepared)
    t2 = time.perf_counter()
    run_cfg, spec = story_spec(cfg, story)  # the config with the story's memory budget
    stage("compiling the story program (read from the compilation cache after the first run at this size), then denoising")
    failed: list[UserError] = []  # raised once the program returns (an error inside a callback is a traceback)

    def on_shot_done(shot: int, latents: np.ndarray) -> None:
        """Save a shot the moment it is denoised; nothing of a non-finite or unsaveable shot or of those after it."""
        if failed:
            return
        if not np.isfinite(latents).all():
            failed.append(
                UserError(
                    f"shot {shot + 1} came out with non-finite values (NaN/Inf) and was not saved "
                    "(shots before it are). Check the model's weights and the story's numbers"
                )
            )
            return
        try:
            resume.save_shot(out, shot, latents, prepared.shot_inputs[shot], prepared.fingerprints[shot])
        except UserError as e:  # a full disk: the shots before it are kept
            failed.append(e)

    records, run_timings = run_story(run_cfg, params, spec, inputs, on_shot_done, progress, mesh)
    if failed:
        raise failed[0]
    videos, decode_s = decode_shots(comps, records.latents[: len(story.shots)], progress)
    timings = {"prepare_s": t1 - t0, "encode_text_s": t2 - t1, **run_timings, "decode_s": decode_s}
    return write_story(out, run_cfg, story, prepared, records, videos, timings, started=t0)
