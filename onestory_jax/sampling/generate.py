"""Next-shot generation: one jitted `lax.scan` over shots, carrying the fixed-capacity memory bank.

Each step of the scan builds the memory context for the shot (OneStory selection or a baseline),
runs the denoising loop (itself a `lax.scan`) with classifier-free guidance, and writes the new
latents into the bank. Shots already on disk (resume) are passed in and skipped with `lax.cond`,
so one compiled program serves every story length up to `max_shots` and every resume point.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from onestory_jax.config import Config
from onestory_jax.data.video import i2v_channels, image_clip
from onestory_jax.diffusion.guidance import guidance_weights, guided_velocity_fn
from onestory_jax.diffusion.loop import sample as denoise
from onestory_jax.diffusion.schedule import make_schedule
from onestory_jax.models import vae
from onestory_jax.models.dit import ContextTokens
from onestory_jax.models.frozen import image_tokens
from onestory_jax.models.memory import baseline_candidates, num_selected
from onestory_jax.models.onestory import memory_context, memory_scores, velocity
from onestory_jax.sampling.memory_bank import MemoryBank, empty_bank, write_shot

Array = jax.Array


@flax.struct.dataclass
class StoryInputs:
    """Per-shot inputs, padded to max_shots S. Shapes: T latent frames of h x w."""

    text: Array  # [S, Lt, text_dim] caption embeddings
    negative: Array  # [Lt, text_dim] negative-prompt embedding
    noise: Array  # [S, T, h, w, C] initial noise of each shot
    active: Array  # [S] bool: shot exists in this story (stories shorter than S are padded)
    done: Array  # [S] bool: shot already generated (resume); its latents are in `done_latents`
    done_latents: Array  # [S, T, h, w, C]
    cond: Array | None  # [T, h, w, 20] I2V mask + image latent of shot 1 (zeros: none), or None for T2V
    image_tokens: Array | None  # [Li, image_dim] CLIP tokens of the start image (I2V), or None
    has_start_image: Array | None = None  # bool scalar (I2V): False = use shot 1's first frame
    continues: Array | None = None  # [S] bool (I2V): the shot starts from the previous shot's last frame
    references: Array | None = None  # [R, h, w, C] the story's reference images: memory before shot 1
    pinned: Array | None = None  # [S, R + S x T] bool: slots always in shot i's memory (`memory.pin`)
    excluded: Array | None = None  # [S, R + S x T] bool: slots never in it (`memory.exclude`)
    memory_text: Array | None = None  # [R + S x T, text_dim] each slot's shot caption (memory.selector_reads_captions)

    @property
    def reference_slots(self) -> int:
        """R: the bank slots before shot 1's."""
        return 0 if self.references is None else self.references.shape[0]


@flax.struct.dataclass
class ShotRecord:
    """What the scan reports per shot (for the manifest)."""

    latents: Array  # [T, h, w, C]
    indices: Array  # [K] chosen memory slots, best first
    scores: Array  # [K] their ranking scores
    selected: Array  # [K] bool: slot really used


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """Static settings of a generation program (everything that shapes the compiled scan)."""

    strategy: str
    k: int  # frames used, <= the conditioner's capacity
    sigmas: tuple[float, ...]  # [N+1]
    timesteps: tuple[float, ...]  # [N] model timesteps
    solver: str
    guidance: float
    cache: float = 0.0  # step caching threshold (0 = off)
    memory_guidance: float = 1.0  # guidance on the memory's context tokens (1 = off; guidance.guidance_weights)


PIN_BOOST = 1.0e4  # added to a pinned slot's ranking score: pinned frames rank first (best first among them)


def context_for_shot(
    params: dict,
    cfg: Config,
    bank: MemoryBank,
    caption: Array,
    spec: GenerationSpec,
    pinned: Array | None = None,
    excluded: Array | None = None,
    memory_text: Array | None = None,
) -> tuple[ContextTokens, Array, Array, Array]:
    """Choose memory frames for the next shot and patchify them: (context, indices, scores, selected).

    pinned / excluded [S] bool: slots the user put in / kept out of this shot's memory. Excluded
    slots are never candidates; pinned ones always are, ranked first (among them by their score).
    memory_text [S, text_dim]: each slot's shot caption (`memory_bank.slot_captions`), for a selector
    that reads captions.
    """
    latents = bank.latents[None]
    valid = bank.valid if excluded is None else bank.valid & ~excluded
    if spec.strategy == "onestory":
        text = None if memory_text is None else memory_text[None]
        scores, candidates = memory_scores(params, cfg, caption[None], latents, valid[None], text), valid[None]
    else:
        s, c = baseline_candidates(spec.strategy, valid, spec.k)
        scores, candidates = s[None], c[None]
    boost = jnp.zeros(bank.valid.shape, scores.dtype)
    if pinned is not None:
        pin = pinned & bank.valid
        boost = jnp.where(pin, PIN_BOOST, 0.0).astype(scores.dtype)
        scores, candidates = scores + boost[None], candidates | pin[None]
    context, indices, top, selected = memory_context(params, cfg, latents, scores, candidates, k=spec.k)
    return context, indices[0], top[0] - boost[indices[0]], selected[0]


def without_memory(context: ContextTokens) -> ContextTokens:
    """The context with every token hidden from attention (what training's context dropout shows)."""
    return context.replace(mask=jnp.zeros(context.tokens.shape[:2], bool))


def next_shot(
    params: dict,
    cfg: Config,
    spec: GenerationSpec,
    bank: MemoryBank,
    inputs: StoryInputs,
    shot: Array,
    on_step: Callable[[Array], None] | None = None,
    image_tokens: Array | None = None,
    pair_sharding: jax.sharding.Sharding | None = None,
    cond: Array | None = None,
) -> tuple[MemoryBank, ShotRecord]:
    """Generate shot `shot` (traced index) from the bank; returns the updated bank and its record.

    image_tokens [Li, image_dim]: the CLIP tokens conditioning this shot (I2V), else None.
    pair_sharding: where the [cond; uncond] CFG pair lives, e.g. split over the `data` mesh axis.
    cond [T, h, w, 4 + C]: this shot's I2V channels (default: shot 1 gets the start image's, later shots
    mask 0).
    """
    caption = inputs.text[shot]
    control = [None if m is None else m[shot] for m in (inputs.pinned, inputs.excluded)]
    context, indices, scores, selected = context_for_shot(params, cfg, bank, caption, spec, *control, inputs.memory_text)

    image = None if image_tokens is None else image_tokens[None]
    if cond is None and inputs.cond is not None:
        cond = jnp.where(shot == 0, inputs.cond, jnp.zeros_like(inputs.cond))
    cond = None if cond is None else cond[None]

    def dit_fn(x: Array, t: Array, conditioning: tuple[Array, ContextTokens, Any, Any]) -> Array:
        text, ctx, img, y = conditioning  # batch N*B: the guidance branches, stacked
        return velocity(params, cfg, x, jnp.full(x.shape[:1], t), text, img, y, ctx)

    # Branches [full, no text, no memory] (those whose scale is not 1): the image tokens and I2V channels are
    # shared; the no-memory branch hides every context token, as training's context dropout does.
    memory_scale = spec.memory_guidance if context is not None else 1.0
    weights = guidance_weights(spec.guidance, memory_scale)
    branches = [(caption[None], context, image, cond)]
    branches += [(inputs.negative[None], context, image, cond)] if spec.guidance != 1.0 else []
    branches += [(caption[None], without_memory(context), image, cond)] if memory_scale != 1.0 else []
    sharding = pair_sharding if len(branches) == 2 else None  # a pair splits over data = 2; three branches do not
    guided = guided_velocity_fn(dit_fn, branches, weights, sharding)

    def generate() -> Array:
        x_t = inputs.noise[shot][None]
        return denoise(
            guided, x_t, np.asarray(spec.sigmas), spec.solver, np.asarray(spec.timesteps), on_step=on_step, cache=spec.cache
        )[0]

    skip = lambda: jnp.where(inputs.done[shot], inputs.done_latents[shot], 0.0)
    latents = jax.lax.cond(inputs.active[shot] & ~inputs.done[shot], generate, skip)
    written = write_shot(bank, shot, latents, inputs.reference_slots)
    bank = jax.tree.map(lambda new, old: jnp.where(inputs.active[shot], new, old), written, bank)
    return bank, ShotRecord(latents, indices, scores, selected)


def generate_story(
    params: dict,
    cfg: Config,
    spec: GenerationSpec,
    inputs: StoryInputs,
    on_shot: Callable[[Array], None] | None = None,
    on_step: Callable[[Array], None] | None = None,
    pair_sharding: jax.sharding.Sharding | None = None,
    on_shot_done: Callable[[Array, Array, Array], None] | None = None,
) -> ShotRecord:
    """All shots as one `lax.scan` over the S = max_shots slots; returns stacked ShotRecords [S, ...].

    on_shot(shot) / on_step(step): host callbacks (progress bars) when a shot / a denoising step starts.
    on_shot_done(shot, new, latents): ordered host callback after each shot (new: it was generated now).
    I2V without a start image: shots after the first see the CLIP tokens of shot 1's decoded first frame,
    or none at all when memory.later_shots_see_first_image is off.
    """
    max_shots, t, h, w, c = inputs.noise.shape
    bank = empty_bank(max_shots, t, h, w, c, inputs.references)
    tokens = inputs.image_tokens
    follows = inputs.continues is not None and inputs.cond is not None  # shots continuing their previous one
    carried = (inputs.cond, tokens) if follows else None  # the next shot's I2V channels and CLIP tokens

    def body(carry: tuple[MemoryBank, Any, Any], shot: Array) -> tuple[tuple[MemoryBank, Any, Any], ShotRecord]:
        bank, tokens, carried = carry
        if on_shot is not None:
            jax.debug.callback(on_shot, shot)
        cond, shot_tokens = carried if follows else (None, tokens)
        bank, record = next_shot(params, cfg, spec, bank, inputs, shot, on_step, shot_tokens, pair_sharding, cond)
        if on_shot_done is not None:  # hand a newly generated shot to the host now (e.g. to save it)
            new = inputs.active[shot] & ~inputs.done[shot]
            # Ordered, except beside host-memory params (dit_runtime.offload): JAX 0.10.2 cannot lower ordered effects in a
            # program with non-default memory kinds (its result memory kinds miss the effect tokens).
            io_callback(on_shot_done, None, shot, new, record.latents, ordered=cfg.dit_runtime.offload == "none")
        if cfg.dit.has_image_branch and not cfg.memory.later_shots_see_first_image:
            tokens = jnp.zeros_like(tokens)  # memory is the later shots' only visual input (as in training)
        elif cfg.dit.has_image_branch:  # without a start image, later shots see CLIP of shot 1's first frame
            from_shot1 = (shot == 0) & ~inputs.has_start_image
            tokens = jax.lax.cond(from_shot1, lambda: latent_to_image_tokens(cfg, params, record.latents[0]), lambda: tokens)
        if follows:  # the next shot: from this one's last frame if it continues it, else as any later shot
            nxt = jnp.minimum(shot + 1, max_shots - 1)
            carried = jax.lax.cond(
                inputs.continues[nxt] & (shot + 1 < max_shots),
                lambda: continuation(cfg, params, record.latents),
                lambda: (jnp.zeros_like(inputs.cond), tokens),
            )
        return (bank, tokens, carried), record

    _, records = jax.lax.scan(body, (bank, tokens, carried), jnp.arange(max_shots))
    return records


def continuation(cfg: Config, params: dict[str, Any], latents: Array) -> tuple[Array, Array]:
    """(I2V channels [T, h, w, 4 + C], CLIP tokens) of a shot that starts from the last decoded frame of
    the shot with `latents` [T, h, w, C], as Wan's I2V conditions on a start image (traceable)."""
    video = vae.decode(cfg.vae, params["vae"], latents[None])[0]  # [F, H, W, 3]
    last = jnp.clip(video[-1], -1.0, 1.0)
    clip = vae.encode(cfg.vae, params["vae"], image_clip(last, video.shape[0])[None])[0]
    return i2v_channels(clip), image_tokens(cfg, params, last)


@dataclasses.dataclass
class Listeners:
    """Host callbacks of one run of a story program (progress bars, saving each shot as it finishes)."""

    on_shot: Callable[[int], None] | None = None  # a shot starts
    on_step: Callable[[int], None] | None = None  # a denoising step starts
    on_shot_done: Callable[[int, np.ndarray], None] | None = None  # a newly generated shot's latents


class StoryProgram:
    """The jitted story program `(params, inputs) -> ShotRecord [S, ...]` of one static spec, and the
    listeners of its current run. Its callbacks are this object's methods, never a per-run closure,
    so one compiled program serves every run; runs of one program take turns (a lock)."""

    def __init__(self, cfg: Config, spec: GenerationSpec, pair_sharding: jax.sharding.Sharding | None = None):
        self._listeners = Listeners()
        self._lock = threading.Lock()
        self.jitted = jax.jit(
            lambda params, inputs: generate_story(
                params, cfg, spec, inputs, self._on_shot, self._on_step, pair_sharding, self._on_shot_done
            )
        )

    def trace(self, params: dict, inputs: StoryInputs) -> Any:
        """The traced program (its jaxpr, for tests and analysis)."""
        return self.jitted.trace(params, inputs)

    def __call__(self, params: dict, inputs: StoryInputs, listeners: Listeners | None = None) -> ShotRecord:
        """Run it to the end (host records), reporting to `listeners`."""
        with self._lock:
            self._listeners = listeners or Listeners()
            try:
                return jax.device_get(self.jitted(params, inputs))
            finally:
                self._listeners = Listeners()

    def _on_shot_done(self, shot: Any, new: Any, latents: Any) -> None:
        if self._listeners.on_shot_done is not None and bool(new):
            self._listeners.on_shot_done(int(shot), np.asarray(latents))

    def _on_shot(self, shot: Any) -> None:
        if self._listeners.on_shot is not None:
            self._listeners.on_shot(int(shot))

    def _on_step(self, step: Any) -> None:
        if self._listeners.on_step is not None:
            self._listeners.on_step(int(step))


@functools.cache
def story_program(cfg: Config, spec: GenerationSpec, pair_sharding: jax.sharding.Sharding | None = None) -> StoryProgram:
    """The story program of a static spec, compiled once (parameters are arguments: nothing is compiled in)."""
    return StoryProgram(cfg, spec, pair_sharding)


def latent_to_image_tokens(cfg: Config, params: dict[str, Any], z: Array) -> Array:
    """CLIP tokens of the decoded image of one latent frame z [h, w, 16] (traceable, used in the scan)."""
    return image_tokens(cfg, params, vae.decode(cfg.vae, params["vae"], z[None, None])[0, 0])


def generation_spec(
    cfg: Config,
    strategy: str,
    k: int | None,
    latent_hw: tuple[int, int],
    steps: int,
    shift: float,
    solver: str,
    guidance: float,
    cache: float = 0.0,
    memory_guidance: float = 1.0,
) -> GenerationSpec:
    """The static spec of a story program: memory strategy and K, the solver's sigma grid, guidance (on text
    and on memory), step caching."""
    sched = make_schedule("wan" if solver == "unipc" else "euler", steps, shift)
    return GenerationSpec(
        strategy=strategy,
        k=selection_k(cfg, strategy, latent_hw, k),
        sigmas=tuple(sched.sigmas.tolist()),
        timesteps=tuple(sched.timesteps.tolist()),
        solver=solver,
        guidance=guidance,
        cache=cache,
        memory_guidance=memory_guidance,
    )


def abstract_story_inputs(cfg: Config, shots: int, latent_shape: tuple[int, int, int, int]) -> StoryInputs:
    """ShapeDtypeStructs of a story's inputs (for tracing and compiling without data)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    t, h, w, c = latent_shape
    i2v = cfg.dit.has_image_branch
    return StoryInputs(
        text=f32(shots, cfg.dit.text_len, cfg.dit.text_dim),
        negative=f32(cfg.dit.text_len, cfg.dit.text_dim),
        noise=f32(shots, *latent_shape),
        active=jax.ShapeDtypeStruct((shots,), bool),
        done=jax.ShapeDtypeStruct((shots,), bool),
        done_latents=f32(shots, *latent_shape),
        cond=f32(t, h, w, 4 + c) if i2v else None,
        image_tokens=f32(cfg.image_encoder.num_tokens, cfg.dit.image_dim) if i2v else None,
        has_start_image=jax.ShapeDtypeStruct((), bool) if i2v else None,
        memory_text=f32(shots * t, cfg.dit.text_dim) if cfg.memory.selector_reads_captions else None,
    )


def selection_k(cfg: Config, strategy: str, latent_hw: tuple[int, int], k: int | None) -> int:
    """K for a strategy: the conditioner's capacity at this size (or the user's smaller k)."""
    cap = num_selected(cfg.memory, latent_hw)
    return cap if k is None else min(k, cap)
