"""Frame embedders for the frame-relevance pseudo-labels (run at data-preparation time).

`--embedder pixel` (weight-free: colour + gradient histograms of the whole frame),
`dinov2:PATH` and `clip:PATH` (transformers models from local folders, never downloaded). With
several embedders, each one's features are L2-normalised and concatenated, scaled by
1/sqrt(n): the cosine of two such vectors is then the mean of the embedders' cosines, as the
paper averages DINOv2 and CLIP similarities.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from onestory_jax.data.features import IMAGENET_MEAN, IMAGENET_STD, DinoV2Features, HistogramFeatures, l2_normalise, masked_image
from onestory_jax.errors import UserError

Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 frames [N, H, W, 3] -> features [N, E]
# uint8 frames [N, H, W, 3], character masks bool [N, H, W] -> features [N, E]
RegionEmbedder = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _whole_frames(features: Callable[[np.ndarray, np.ndarray, bool], np.ndarray]) -> Embedder:
    return lambda frames: features(frames, np.ones(frames.shape[:3], bool), True)


def clip_embedder(path: Path) -> Embedder:
    """CLIP image embeddings (transformers CLIPVisionModelWithProjection) from a local folder."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"embedder clip:'{path}' is not a local CLIP model folder (no config.json)")
    try:
        import torch
        from transformers import CLIPVisionModelWithProjection

        from onestory_jax.models.image_encoder import CLIP_MEAN, CLIP_STD

        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
    except ImportError:
        raise UserError("the clip embedder needs torch and transformers: pip install 'onestory-jax[convert]'") from None
    except Exception as e:  # transformers raises many types for bad folders
        raise UserError(
            f"cannot load CLIP from '{path}': {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None
    size = model.config.image_size

    def embed(frames: np.ndarray) -> np.ndarray:
        images = np.stack([masked_image(f, np.ones(f.shape[:2], bool), False, size) for f in frames])
        images = ((images * IMAGENET_STD + IMAGENET_MEAN) - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)).image_embeds
        return out.float().numpy()

    return embed


def load_embedder(spec: str) -> tuple[str, Embedder]:
    """(name, embedder) from 'pixel', 'dinov2:PATH' or 'clip:PATH'."""
    kind, _, path = spec.partition(":")
    if kind == "pixel" and not path:
        return "pixel", _whole_frames(HistogramFeatures())
    if kind == "dinov2" and path:
        return f"dinov2:{Path(path).name}", _whole_frames(DinoV2Features(Path(path)))
    if kind == "clip" and path:
        return f"clip:{Path(path).name}", clip_embedder(Path(path))
    raise UserError(f"unknown embedder '{spec}': use pixel, dinov2:PATH or clip:PATH")


def with_character_regions(frames_embedder: Embedder, weight: float) -> RegionEmbedder:
    """Character-aware features: the characters' pixels (colour + gradient histograms over the
    masks) with squared weight `weight`, the whole-frame features with 1 - weight. Both parts are
    L2-normalised, so the cosine of two features is weight x (character cosine) + (1 - weight) x
    (frame cosine); a frame without a character has a zero character part."""
    if not 0.0 < weight < 1.0:
        raise UserError(f"the character weight must be in (0, 1), got {weight}")
    regions = HistogramFeatures()

    def embed(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
        parts = [np.sqrt(weight) * regions(frames, masks, True), np.sqrt(1.0 - weight) * l2_normalise(frames_embedder(frames))]
        return np.concatenate(parts, axis=-1).astype(np.float32)

    return embed


def combined(embedders: list[Embedder]) -> Embedder:
    """Concatenate L2-normalised features / sqrt(n): cosine = mean of the embedders' cosines."""
    scale = 1.0 / np.sqrt(len(embedders))
    return lambda frames: np.concatenate([l2_normalise(e(frames)) * scale for e in embedders], axis=-1).astype(np.float32)
