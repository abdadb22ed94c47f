"""Metric arithmetic on features and frames: pair similarity, VBench-style consistency, motion.

Features are L2-normalised rows (zero rows for absent regions), so a dot product is a cosine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from onestory_jax.data import synthetic


def sample_indices(n: int, k: int) -> np.ndarray:
    """At most k evenly spaced indices into range(n), first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def cross_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean cosine over all pairs of rows of a [N, D] and b [M, D], ignoring zero rows; None if either has none."""
    a, b = a[np.any(a != 0, -1)], b[np.any(b != 0, -1)]
    if len(a) == 0 or len(b) == 0:
        return None
    return float(np.mean(a @ b.T))


def vbench_consistency(feats: np.ndarray) -> float | None:
    """VBench's temporal consistency of per-frame features [T, D]: the mean over frames t >= 1 of
    (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2, cosines clipped at 0. None for a single frame."""
    if len(feats) < 2:
        return None
    to_first = np.clip(feats[1:] @ feats[0], 0, None)
    to_prev = np.clip(np.sum(feats[1:] * feats[:-1], -1), 0, None)
    return float(np.mean((to_first + to_prev) / 2))


def mean_abs_change(frames: np.ndarray) -> float:
    """Dynamic degree of a shot: mean |frame_{t+1} - frame_t| over pixels, channels and t, in [0, 1]
    (divided by 255). 0 for a static shot or a single frame."""
    if len(frames) < 2:
        return 0.0
    diffs = [np.abs(frames[t + 1].astype(np.int16) - frames[t]).mean() for t in range(len(frames) - 1)]
    return float(np.mean(diffs) / 255.0)


def mean_ci(values: list[float] | np.ndarray) -> tuple[float, float, int]:
    """(mean, 95% t-interval half-width, n) of the values; the half-width is nan below two values."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan"), len(v)
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))), len(v)


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def character_pairs(story: synthetic.SyntheticStory) -> Iterator[tuple[int, int, int, bool]]:
    """(character, shot i, shot j, recall) for i < j both showing the character; recall when a shot
    between them does not show it (the character returns after an inserted shot)."""
    shots = story.shots
    for i, j in itertools.combinations(range(len(shots)), 2):
        for c in set(shots[i].characters) & set(shots[j].characters):
            yield c, i, j, any(c not in shots[k].characters for k in range(i + 1, j))


def scene_pairs(story: synthetic.SyntheticStory) -> Iterator[tuple[str, int, int]]:
    """(scene, shot i, shot j) for i < j filmed in the same scene."""
    for i, j in itertools.combinations(range(len(story.shots)), 2):
        if story.shots[i].scene == story.shots[j].scene:
            yield story.shots[i].scene, i, j
