"""Frame and region features, for the evaluator's similarity metrics and the pseudo-label embedders:
DINOv2 from local weights, or a weight-free fallback.

A `FeatureExtractor` maps frames uint8 [N, H, W, 3] and region masks bool [N, H, W] to L2-normalised
features [N, D]; a frame whose region is empty gets a zero row (cosine 0 with anything).
`crop=True` describes the region wherever it is (cross-shot identity: position must not matter);
`crop=False` keeps the frame's layout (intra-shot consistency, as VBench embeds whole frames).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from onestory_jax.errors import UserError

HISTOGRAM_NAME = "colour-histogram+HOG-lite"
COLOUR_BINS = 8  # per channel: a joint 8x8x8 RGB histogram
ORIENTATION_BINS = 8  # unsigned gradient orientation over [0, pi)
LAYOUT_GRID = 8  # occupancy grid of the region (crop=False only)
# Squared weights of the L2-normalised parts: cosine = sum_k w_k * cosine of part k (parts non-empty).
CROP_WEIGHTS = {"colour": 0.7, "gradient": 0.3}
LAYOUT_WEIGHTS = {"colour": 0.5, "gradient": 0.2, "layout": 0.3}
IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, frames: np.ndarray, masks: np.ndarray, crop: bool) -> np.ndarray:
        """frames uint8 [N, H, W, 3], masks bool [N, H, W] -> L2-normalised features [N, D]."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.maximum(n, 1e-12), 0.0)


def _soft_bins(x: np.ndarray, bins: int, circular: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Linear (soft) binning of x in bin units (centres at integers): two (index, weight) pairs."""
    lo = np.floor(x)
    frac = x - lo
    lo = lo.astype(np.int64)
    if circular:
        return [lo % bins, (lo + 1) % bins], [1 - frac, frac]
    return [np.clip(lo, 0, bins - 1), np.clip(lo + 1, 0, bins - 1)], [1 - frac, frac]


def colour_histogram(pixels: np.ndarray, bins: int = COLOUR_BINS) -> np.ndarray:
    """Trilinearly soft-binned joint RGB histogram of pixels uint8 [N, 3] -> [bins ** 3] (sums to 1)."""
    x = pixels.astype(np.float32) / 256.0 * bins - 0.5
    per_channel = [_soft_bins(x[:, ch], bins, circular=False) for ch in range(3)]
    hist = np.zeros(bins**3, np.float64)
    for corner in range(8):
        bits = [(corner >> ch) & 1 for ch in range(3)]
        idx = sum(per_channel[ch][0][b] * bins ** (2 - ch) for ch, b in enumerate(bits))
        weight = np.prod([per_channel[ch][1][b] for ch, b in enumerate(bits)], axis=0)
        hist += np.bincount(idx, weight, minlength=bins**3)
    return hist / max(hist.sum(), 1e-12)


def orientation_histogram(frame: np.ndarray, mask: np.ndarray, bins: int = ORIENTATION_BINS) -> np.ndarray:
    """Magnitude-weighted, soft-binned unsigned gradient orientations of the luminance inside mask -> [bins]."""
    grey = frame.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(grey)
    mag, ang = np.hypot(gx, gy)[mask], np.mod(np.arctan2(gy, gx), np.pi)[mask]
    idx, w = _soft_bins(ang / np.pi * bins - 0.5, bins, circular=True)
    return sum(np.bincount(i, wi * mag, minlength=bins) for i, wi in zip(idx, w))


def occupancy_grid(mask: np.ndarray, grid: int = LAYOUT_GRID) -> np.ndarray:
    """Fraction of each cell of a grid x grid partition of mask [H, W] covered by the region -> [grid ** 2]."""
    h, w = mask.shape
    ry, rx = (np.linspace(0, n, grid + 1).astype(int) for n in (h, w))
    sums = np.add.reduceat(np.add.reduceat(mask.astype(np.float32), ry[:-1], 0), rx[:-1], 1)
    return (sums / np.outer(np.diff(ry), np.diff(rx))).ravel()


class HistogramFeatures:
    """Weight-free region feature: colour histogram + gradient-orientation histogram (+ layout grid).

    Each part is L2-normalised and scaled by sqrt(weight), so the cosine of two features is the
    weighted sum of the parts' cosines: CROP_WEIGHTS for crop=True, LAYOUT_WEIGHTS for crop=False.
    """

    name = HISTOGRAM_NAME

    def __call__(self, frames: np.ndarray, masks: np.ndarray, crop: bool) -> np.ndarray:
        weights = CROP_WEIGHTS if crop else LAYOUT_WEIGHTS
        rows = []
        for frame, mask in zip(frames, masks):
            if not mask.any():
                size = COLOUR_BINS**3 + ORIENTATION_BINS + (0 if crop else LAYOUT_GRID**2)
                rows.append(np.zeros(size))
                continue
            parts = {"colour": colour_histogram(frame[mask]), "gradient": orientation_histogram(frame, mask)}
            if not crop:
                parts["layout"] = occupancy_grid(mask)
            rows.append(np.concatenate([np.sqrt(weights[k]) * l2_normalise(parts[k]) for k in weights]))
        return np.stack(rows).astype(np.float32)


class DinoV2Features:
    """DINOv2 CLS embeddings (the pooled, layer-normed CLS token) of masked frames, from a local folder.

    Pixels outside the region are set to the ImageNet mean colour. crop=True: the region's bounding
    box (10% margin), padded to a square; crop=False: the whole frame. Either is resized to 224x224.
    """

    def __init__(self, path: Path, batch: int = 32) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"--dinov2 '{path}' is not a local DINOv2 model folder (no config.json)")
        try:
            import torch
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        except ImportError:
            raise UserError("DINOv2 features need torch and transformers: pip install 'onestory-jax[test]'") from None
        except Exception as e:  # transformers raises OSError / ValueError / ... for bad folders
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load DINOv2 from '{path}': {first}") from None
        self.torch = torch
        self.batch = batch
        self.name = f"dinov2:{path.name}"

    def __call__(self, frames: np.ndarray, masks: np.ndarray, crop: bool) -> np.ndarray:
        images = np.stack([masked_image(f, m, crop) for f, m in zip(frames, masks)])
        out = []
        with self.torch.no_grad():
            for start in range(0, len(images), self.batch):
                x = self.torch.from_numpy(images[start : start + self.batch]).permute(0, 3, 1, 2)
                out.append(self.model(pixel_values=x).pooler_output.float().numpy())
        empty = ~masks.reshape(len(masks), -1).any(-1)
        return np.where(empty[:, None], 0.0, l2_normalise(np.concatenate(out))).astype(np.float32)


def masked_image(frame: np.ndarray, mask: np.ndarray, crop: bool, size: int = 224) -> np.ndarray:
    """ImageNet-normalised float [size, size, 3]: region pixels kept, the rest the mean colour."""
    from PIL import Image

    fill = np.round(IMAGENET_MEAN * 255).astype(np.uint8)
    img = np.where(mask[..., None], frame, fill)
    if crop and mask.any():
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * 0.55  # 10% margin, square
        top, left = int(np.floor(cy - half)), int(np.floor(cx - half))
        side = int(np.ceil(2 * half))
        canvas = np.broadcast_to(fill, (side, side, 3)).copy()
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + side, img.shape[0]), min(left + side, img.shape[1])
        canvas[y0 - top : y1 - top, x0 - left : x1 - left] = img[y0:y1, x0:x1]
        img = canvas
    resized = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return ((resized - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def load_features(dinov2: Path | None = None) -> FeatureExtractor:
    """DINOv2 from a local folder when given, else the weight-free histogram feature."""
    return DinoV2Features(dinov2) if dinov2 is not None else HistogramFeatures()
