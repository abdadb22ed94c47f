"""The primary colour check of synthetic shots: hue on saturated pixels.

The world's scenes are low-saturation (S <= 0.15) and its characters saturated, one a shot, so the
character region is simply the saturated pixels, with no scene palette and no segmentation. Each
such pixel votes for the palette colour of nearest hue (`synthetic.COLOURS`, 60 degrees apart, so
a hue shift under 30 degrees still names the colour); the shot's colour is the majority, or None
when fewer than MIN_REGION of its pixels are saturated (no character drawn). Blur and blending with
grey lower saturation but keep hue, so this measures colour, not sharpness: the strict ray check
(`regions.dominant_colour`) stays as a secondary number.
"""

from __future__ import annotations

import numpy as np

from onestory_jax.data import synthetic

SATURATION = 0.35  # HSV saturation above which a pixel is character
MIN_VALUE = 60.0  # and its brightest channel at least this (dark pixels have no reliable hue)
MIN_REGION = 0.01  # share of the shot's pixels that must be saturated for a verdict


def hue_saturation_value(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV of RGB pixels [..., 3] in 0..255: hue in degrees [0, 360), saturation in [0, 1], value in 0..255."""
    p = np.asarray(pixels, np.float32)
    hi, lo = p.max(-1), p.min(-1)
    chroma = hi - lo
    r, g, b = p[..., 0], p[..., 1], p[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    return hue % 360.0, np.where(hi > 0, chroma / np.maximum(hi, 1e-6), 0.0), hi


PALETTE_HUES = {name: float(hue_saturation_value(np.asarray(rgb))[0]) for name, rgb in synthetic.COLOURS.items()}


def nearest_colour(hue: np.ndarray) -> np.ndarray:
    """Index into PALETTE_HUES of the nearest palette hue (circular distance) of hues [...] -> [...]."""
    centres = np.asarray(list(PALETTE_HUES.values()), np.float32)
    d = np.abs((hue[..., None] - centres + 180.0) % 360.0 - 180.0)
    return d.argmin(-1)


def shot_colour(frames: np.ndarray) -> str | None:
    """The colour of a one-character shot, frames uint8 [T, H, W, 3]: the majority nearest palette hue
    of its saturated pixels, or None when under MIN_REGION of the pixels are saturated."""
    hue, sat, value = hue_saturation_value(frames.reshape(-1, 3))
    on = (sat > SATURATION) & (value >= MIN_VALUE)
    if on.sum() < MIN_REGION * on.size:
        return None
    votes = np.bincount(nearest_colour(hue[on]), minlength=len(PALETTE_HUES))
    return list(PALETTE_HUES)[int(votes.argmax())]
