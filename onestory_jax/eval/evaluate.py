"""Score one story's frames: the paper's metric families (docs/evaluation.md defines each).

Inter-shot: character and environment consistency over the shot pairs the ground truth names.
Intra-shot: VBench-style subject / background consistency. Dynamic degree. Semantic alignment
(unavailable: no video-text model) and, in its place for synthetic stories, attribute accuracy.
Shots are numbered from 1 in the output, as sample.py names its files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onestory_jax.data import synthetic
from onestory_jax.data.features import FeatureExtractor
from onestory_jax.eval import metrics, regions

INTRA_FRAMES = 32  # frames per shot (evenly spaced) for intra-shot consistency and segmentation
PAIR_FRAMES = 8  # of those, frames per shot compared all-pairs across shots
MIN_REGION = 0.001  # a region under this fraction of the frame (and under 4 px) counts as absent
MAX_SEGMENTED = 0.5  # segmented character pixels above this fraction of a frame: segmentation failed
UNSEGMENTED = 255  # mask label of frames without usable regions: neither character nor background
SEMANTIC_REASON = "needs a video-text model (ViCLIP in the paper); none is available here"
NO_TRUTH = "needs the ground-truth synthetic story (--truth)"


def unavailable(reason: str) -> dict[str, Any]:
    return {"status": "unavailable", "score": None, "reason": reason}


def _check(
    frames_per_shot: list[np.ndarray], truth: synthetic.SyntheticStory | None, truth_masks: list[np.ndarray] | None
) -> None:
    """ValueError naming the first shot whose frames or masks do not fit."""
    if not frames_per_shot:
        raise ValueError("no shots to evaluate")
    for i, f in enumerate(frames_per_shot):
        if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or len(f) == 0:
            raise ValueError(f"shot {i + 1}: frames must be uint8 [T, H, W, 3], got {f.dtype} {f.shape}")
        if truth_masks is not None and truth_masks[i].shape != f.shape[:-1]:
            raise ValueError(f"shot {i + 1}: masks {truth_masks[i].shape} do not match frames {f.shape}")
    if truth is not None and len(truth.shots) != len(frames_per_shot):
        raise ValueError(f"{len(frames_per_shot)} shots of frames but the ground truth has {len(truth.shots)}")
    if truth_masks is not None and (truth is None or len(truth_masks) != len(frames_per_shot)):
        raise ValueError("truth_masks need the ground-truth story and one mask array per shot")


def _region(masks: np.ndarray, labels: list[int], present: bool = True) -> np.ndarray:
    """bool [T, H, W]: pixels whose mask label is (or, present=False, is not) in labels; small regions dropped."""
    r = np.isin(masks, labels) if present else ~np.isin(masks, [*labels, UNSEGMENTED])
    area = r.reshape(len(r), -1).sum(-1)
    keep = (area >= 4) & (area >= MIN_REGION * r[0].size)
    return r & keep[:, None, None]


def _segment(frames: np.ndarray, truth: synthetic.SyntheticStory, index: int) -> np.ndarray:
    """Segmented masks; a frame that is mostly "character" (not the scene at all) gets no regions (255)."""
    masks = regions.segment_shot(frames, truth, index)
    failed = (masks > 0).reshape(len(masks), -1).mean(-1) > MAX_SEGMENTED
    masks[failed] = UNSEGMENTED
    return masks


def _pair_scores(pairs: list[tuple[Any, int, int]], feats: dict[tuple[Any, int], np.ndarray], key: str) -> tuple[list[dict], int]:
    """Per-pair similarities (an absent region scores 0) and the number of pairs with an absent region."""
    rows, missing = [], 0
    for label, i, j in pairs:
        sim = metrics.cross_similarity(feats[label, i], feats[label, j])
        missing += sim is None
        rows.append({key: label, "shots": [i + 1, j + 1], "similarity": 0.0 if sim is None else sim, "absent": sim is None})
    return rows, missing


def _inter_shot(
    frames: list[np.ndarray], masks: list[np.ndarray], truth: synthetic.SyntheticStory, features: FeatureExtractor
) -> tuple[dict, dict, list[dict]]:
    """Character and environment consistency, and the per-shot attribute checks."""
    char_feats, scene_feats, attributes = {}, {}, []
    for s, (f, m) in enumerate(zip(frames, masks)):
        sub = metrics.sample_indices(len(f), PAIR_FRAMES)
        f, m = f[sub], m[sub]
        shot = truth.shots[s]
        chars = []
        for c in shot.characters:
            region = _region(m, [c + 1])
            char_feats[c, s] = features(f, region, crop=True)
            chars.append({"character": c, "truth": truth.characters[c].colour, "predicted": regions.dominant_colour(f[region])})
        scene_feats[shot.scene, s] = features(f, _region(m, [0]), crop=True)
        scene = {"truth": shot.scene, "predicted": regions.dominant_scene(f.reshape(-1, 3))}
        attributes.append({"shot": s + 1, "characters": chars, "scene": scene})

    pairs = list(metrics.character_pairs(truth))
    rows, missing = _pair_scores([(c, i, j) for c, i, j, _ in pairs], char_feats, "character")
    for r, (*_, is_recall) in zip(rows, pairs):
        r["recall"] = is_recall
    recall = [r for r in rows if r["recall"]]
    character = {
        "status": "ok",
        "score": metrics.mean_or_none([r["similarity"] for r in rows]),
        "pairs": len(rows),
        "recall_score": metrics.mean_or_none([r["similarity"] for r in recall]),
        "recall_pairs": len(recall),
        "absent": missing,
        "per_pair": rows,
    }
    rows, missing = _pair_scores(list(metrics.scene_pairs(truth)), scene_feats, "scene")
    environment = {
        "status": "ok",
        "score": metrics.mean_or_none([r["similarity"] for r in rows]),
        "pairs": len(rows),
        "absent": missing,
        "per_pair": rows,
    }
    return character, environment, attributes


def _attribute_accuracy(per_shot: list[dict]) -> dict[str, Any]:
    chars = [c["predicted"] == c["truth"] for shot in per_shot for c in shot["characters"]]
    scenes = [shot["scene"]["predicted"] == shot["scene"]["truth"] for shot in per_shot]
    return {"status": "ok", "character_colour": float(np.mean(chars)), "scene": float(np.mean(scenes)), "per_shot": per_shot}


def _intra_shot(frames: list[np.ndarray], masks: list[np.ndarray] | None, features: FeatureExtractor) -> dict[str, Any]:
    """VBench-style consistency per shot: subject (all characters), background, whole frame."""
    per_shot = []
    for s, f in enumerate(frames):
        whole = np.ones(f.shape[:-1], bool)
        row: dict[str, Any] = {"shot": s + 1, "frame": metrics.vbench_consistency(features(f, whole, crop=False))}
        if masks is not None:
            row["subject"] = metrics.vbench_consistency(features(f, _region(masks[s], [0], present=False), crop=False))
            row["background"] = metrics.vbench_consistency(features(f, _region(masks[s], [0]), crop=False))
        per_shot.append(row)
    out: dict[str, Any] = {"status": "ok"}
    for key, name in (
        ("subject", "subject_consistency"),
        ("background", "background_consistency"),
        ("frame", "frame_consistency"),
    ):
        out[name] = metrics.mean_or_none([r.get(key) for r in per_shot])
    both = [out["subject_consistency"], out["background_consistency"]]
    out["avg"] = metrics.mean_or_none(both) if None not in both else out["frame_consistency"]
    out["per_shot"] = per_shot
    return out


def summary(result: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of a result, flat (None where unavailable)."""
    attr = result["attribute_accuracy"]
    return {
        "character": result["character_consistency"]["score"],
        "character_recall": result["character_consistency"].get("recall_score"),
        "environment": result["environment_consistency"]["score"],
        "inter_shot_avg": result["inter_shot_avg"],
        "subject": result["intra_shot"]["subject_consistency"],
        "background": result["intra_shot"]["background_consistency"],
        "intra_shot_avg": result["intra_shot"]["avg"],
        "dynamic_degree": result["dynamic_degree"]["score"],
        "semantic_alignment": result["semantic_alignment"]["score"],
        "attribute_character_colour": attr.get("character_colour"),
        "attribute_scene": attr.get("scene"),
    }


def evaluate_story(
    frames_per_shot: list[np.ndarray],
    truth: synthetic.SyntheticStory | None,
    features: FeatureExtractor,
    truth_masks: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every metric of one story: frames uint8 [T, H, W, 3] per shot, its ground truth (or None), and,
    for ground-truth renders, identity masks uint8 [T, H, W] per shot (else regions are segmented).

    Returns a JSON-ready dict; `result["summary"]` holds the headline numbers.
    """
    _check(frames_per_shot, truth, truth_masks)
    picks = [metrics.sample_indices(len(f), INTRA_FRAMES) for f in frames_per_shot]
    frames = [f[p] for f, p in zip(frames_per_shot, picks)]
    if truth_masks is not None:
        masks, how = [np.asarray(m)[p] for m, p in zip(truth_masks, picks)], "ground-truth masks"
    elif truth is not None:
        masks, how = [_segment(f, truth, s) for s, f in enumerate(frames)], "scene-colour segmentation"
    else:
        masks, how = None, "whole frames (no ground truth)"

    result: dict[str, Any] = {
        "feature": features.name,
        "regions": how,
        "shots": len(frames),
        "frames_per_shot": {"intra_shot": INTRA_FRAMES, "cross_shot": PAIR_FRAMES},
    }
    if truth is not None and masks is not None:
        character, environment, attributes = _inter_shot(frames, masks, truth, features)
        result["character_consistency"], result["environment_consistency"] = character, environment
        result["inter_shot_avg"] = metrics.mean_or_none([character["score"], environment["score"]])
        result["attribute_accuracy"] = _attribute_accuracy(attributes)
    else:
        result["character_consistency"] = result["environment_consistency"] = unavailable(NO_TRUTH)
        result["inter_shot_avg"] = None
        result["attribute_accuracy"] = unavailable(NO_TRUTH)
    result["intra_shot"] = _intra_shot(frames, masks, features)
    motion = [metrics.mean_abs_change(f) for f in frames_per_shot]
    result["dynamic_degree"] = {
        "status": "ok",
        "score": float(np.mean(motion)),
        "per_shot": motion,
        "definition": "mean |frame[t+1] - frame[t]| / 255 over pixels, channels, t",
    }
    result["semantic_alignment"] = unavailable(SEMANTIC_REASON)
    result["summary"] = summary(result)
    return result
