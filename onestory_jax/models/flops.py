"""The DiT's FLOP model (matmuls only) and model FLOPs utilisation, for training logs and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping

from onestory_jax.config import Config, DiTConfig, MemoryConfig
from onestory_jax.models.memory import frames_per_patchifier, tokens_per_frame

# Dense bf16 peak FLOP/s per device, matched in order as a substring of `jax.Device.device_kind`
# (TPU v5e reports "TPU v5 lite", v5p "TPU v5p" or "TPU v5"; v6e "TPU v6 lite").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind; None when unknown (CPU included)."""
    return next((v for k, v in PEAK_BF16_FLOPS if k.lower() in device_kind.lower()), None)


def dit_forward_flops(cfg: DiTConfig, tokens: int, text_tokens: int, image_tokens: int = 0) -> float:
    """Matmul FLOPs of one DiT forward (2 per multiply-add; norms and elementwise ignored).

    tokens: every token in the residual stream (noise tokens plus any context tokens).
    """
    d, f, n, lt = cfg.dim, cfg.ffn_dim, tokens, text_tokens + image_tokens
    self_attn = 2 * n * 4 * d * d + 2 * 2 * n * n * d
    cross = 2 * n * 2 * d * d + 2 * lt * 2 * d * d + 2 * 2 * n * lt * d
    ffn = 2 * n * 2 * d * f
    return cfg.num_layers * (self_attn + cross + ffn)


def context_tokens(cfg: MemoryConfig, latent_hw: tuple[int, int]) -> int:
    """Context tokens the Adaptive Conditioner makes from the selected frames at this latent size."""
    counts = frames_per_patchifier(cfg, latent_hw)
    return sum(c * tokens_per_frame(k, latent_hw) for k, c in zip(cfg.patchifier_kernels, counts))


def noise_tokens(cfg: DiTConfig, target_shape: tuple[int, ...]) -> int:
    """Noise tokens of one sample from a target latent [B, T, h, w, C] (per sample)."""
    t, h, w = target_shape[1:4]
    pt, ph, pw = cfg.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def train_step_flops(cfg: Config, shapes: Mapping[str, tuple[int, ...]], dit_trains: bool) -> float:
    """Model FLOPs of one train step on a batch of these shapes (global batch).

    Forward + activation gradients (2x forward) + weight gradients when DiT weights train (1x) +
    the recomputed forward under full remat (1x). The selector and patchifiers are ignored (< 1%).
    """
    b, _, h, w = shapes["target"][:4]
    tokens = noise_tokens(cfg.dit, shapes["target"]) + context_tokens(cfg.memory, (h, w))
    image = shapes["image"][1] if "image" in shapes else 0
    passes = 2 + int(dit_trains) + int(cfg.dit_runtime.remat_policy == "full")
    return b * passes * dit_forward_flops(cfg.dit, tokens, shapes["text"][1], image)


def mfu(flops_per_step: float, steps_per_s: float, device_kind: str, num_devices: int) -> float | None:
    """Model FLOPs utilisation against the dense bf16 peak; None on unknown devices."""
    peak = peak_flops(device_kind)
    return flops_per_step * steps_per_s / (peak * num_devices) if peak else None
