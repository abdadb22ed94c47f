"""Whether a story fits the model and the machine: checked by sample.py before any weights load.

Sizes: width and height must be multiples of the VAE's spatial factor times the DiT's patch (16 for
Wan2.1), and an I2V model encodes the story's first frame with CLIP (for the later shots, or the
start image), so then its short side needs `MIN_IMAGE_SIDE` pixels.

Memory: `estimate_bytes` is a lower bound of what one story needs at once (weights not counted):
  latents     every shot's noise, finished latents and (I2V) condition: S x T x h x w x (2C + 4 + C) fp32
  activations one DiT forward of the CFG pair: 2 x N x (dim + ffn_dim) in the compute dtype, for
              N = T x (h / patch) x (w / patch) tokens of one shot (memory tokens not counted)
  attention   the CFG pair's logits for all heads: N x N (attention=xla), 256 x N (chunked, auto), 0 (flash)
  vae decode  the decoder's full-resolution stage on one 4-frame chunk: 2 x 4 x H x W x base_dim fp32 (H, W at
              most `vae.tile` each with tiled decoding)
A story whose bound exceeds the memory of all devices together cannot fit whatever the mesh: it is
refused with the estimate.
"""

from __future__ import annotations

import os

import jax

from onestory_jax.config import Config
from onestory_jax.errors import UserError
from onestory_jax.models.flops import context_tokens, dit_forward_flops, noise_tokens, peak_flops
from onestory_jax.models.image_encoder import MIN_IMAGE_SIDE
from onestory_jax.sampling.story import Story, with_sampler

CHUNK = 256  # query block of chunked attention (models/layers.py)
GIB = 2**30


def check_story_fits(story: Story, cfg: Config, available: int | None = None) -> None:
    """Raise a `UserError` if the story's sizes (its own, or the model's defaults) do not suit the model,
    or cannot fit in memory (`available` bytes; default: all devices together)."""
    story = with_sampler(story, cfg.sampler)
    if not cfg.dit.has_image_branch and (n := next((i for i, s in enumerate(story.shots) if s.continues), None)) is not None:
        raise UserError(
            f"shot {n + 1} continues the previous shot (no cut): that needs an image-to-video model, and this "
            "one is text-to-video"
        )
    check_sizes(story, cfg)
    check_memory(story, cfg, device_memory() if available is None else available)


def check_sizes(story: Story, cfg: Config) -> None:
    """Width and height divisible into whole patches; the CLIP minimum for an I2V model."""
    s = story.settings
    step = cfg.vae.spatial_factor * max(cfg.dit.patch_size[1:])
    uses_clip = cfg.dit.has_image_branch and (len(story.shots) > 1 or story.start_image is not None)
    for name in ("width", "height"):
        value = getattr(s, name)
        if value % step:
            raise UserError(
                f"settings.{name}: {value} is not a multiple of {step} (this model's VAE factor "
                f"{cfg.vae.spatial_factor} x patch {max(cfg.dit.patch_size[1:])})"
            )
        if uses_clip and value < MIN_IMAGE_SIDE:
            raise UserError(
                f"settings.{name}: {value} is below {MIN_IMAGE_SIDE} px: this I2V model encodes the story's "
                "first frame with CLIP (for the later shots, or the start image)"
            )


def estimate_bytes(story: Story, cfg: Config) -> dict[str, int]:
    """The lower bound of the module docstring, per part."""
    s, d = story.settings, cfg.dit
    t, h, w = story.latent_frames, s.height // cfg.vae.spatial_factor, s.width // cfg.vae.spatial_factor
    z = cfg.vae.z_dim
    channels = 2 * z + (4 + z if d.has_image_branch else 0)
    tokens = t * (h // d.patch_size[1]) * (w // d.patch_size[2])
    compute = 2 if cfg.dit_runtime.dtype == "bfloat16" else 4
    queries = {"xla": tokens, "chunked": min(CHUNK, tokens), "auto": min(CHUNK, tokens)}.get(cfg.dit_runtime.attention, 0)
    tile = lambda side: min(side, cfg.vae.tile) if cfg.vae.tile else side  # noqa: E731
    return {
        "latents": len(story.shots) * t * h * w * channels * 4,
        "activations": 2 * tokens * (d.dim + d.ffn_dim) * compute,
        "attention": 2 * d.num_heads * queries * tokens * 4,
        "vae decode": 2 * 4 * tile(s.height) * tile(s.width) * cfg.vae.base_dim * 4,
    }


def check_memory(story: Story, cfg: Config, available: int) -> None:
    """Refuse a story whose lower-bound estimate exceeds `available` bytes, naming the parts."""
    parts = estimate_bytes(story, cfg)
    need = sum(parts.values())
    if need > available:
        s = story.settings
        shown = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
        raise UserError(
            f"a {s.width}x{s.height} story of {len(story.shots)} shots of {s.frames} frames needs at least "
            f"{need / GIB:.1f} GiB ({shown}; weights not counted) but the devices have {available / GIB:.1f} "
            "GiB in all: lower the width, height or frames"
        )


PLANNED_MFU = 0.6  # the 14B H200 benchmark (docs/performance.md) runs its CFG step at about 66% of peak


def plan(story: Story, cfg: Config) -> str:
    """One line: what will be rendered, with estimates of memory (the lower bound above) and of the
    denoising time (FLOPs at PLANNED_MFU of this device's peak; none where the peak is unknown)."""
    story = with_sampler(story, cfg.sampler)
    s = story.settings
    need = sum(estimate_bytes(story, cfg).values())
    h, w = s.height // cfg.vae.spatial_factor, s.width // cfg.vae.spatial_factor
    tokens = noise_tokens(cfg.dit, (1, story.latent_frames, h, w)) + context_tokens(cfg.memory, (h, w))
    image = cfg.image_encoder.num_tokens if cfg.dit.has_image_branch else 0
    passes = (1 + (s.guidance != 1.0) + (s.memory_guidance != 1.0)) * s.steps * len(story.shots)
    flops = passes * dit_forward_flops(cfg.dit, tokens, cfg.dit.text_len, image)
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    time = (
        f"~{flops / (PLANNED_MFU * peak * jax.device_count()):.0f} s of denoising at {PLANNED_MFU:.0%} of the {kind}'s peak"
        if peak
        else f"no time estimate on {kind} (peak FLOP/s unknown)"
    )
    return (
        f"plan: {len(story.shots)} shots of {s.width}x{s.height}, {s.frames} frames, {s.steps} steps, guidance "
        f"{s.guidance:g}; estimates: >= {_size(need)} besides the weights, {time}"
    )


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def device_memory() -> int:
    """Bytes of memory of all devices together (host RAM for CPU devices)."""
    total = 0
    for device in jax.devices():
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:  # CPU: the devices share the host's memory
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        total += stats["bytes_limit"]
    return total
