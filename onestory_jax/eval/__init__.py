"""Evaluation of multi-shot stories: the paper's metric families on frames (docs/evaluation.md).

from onestory_jax.eval import evaluate_story, load_features
result = evaluate_story(frames_per_shot, truth_story, load_features())
"""

from onestory_jax.data.features import DinoV2Features, FeatureExtractor, HistogramFeatures, load_features
from onestory_jax.eval.evaluate import evaluate_story, summary

__all__ = ["evaluate_story", "summary", "load_features", "FeatureExtractor", "HistogramFeatures", "DinoV2Features"]
