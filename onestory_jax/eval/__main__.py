"""Evaluate generated or ground-truth multi-shot stories (metrics: docs/evaluation.md).

    python -m onestory_jax.eval --run out/story [--truth stories/s0] [--dinov2 DIR] [--out result.json]
    python -m onestory_jax.eval --stories stories/ [--segment] [--dinov2 DIR] [--out result.json]

--run scores one sample.py output directory (its shot_NN.mp4 files); with --truth (a
synthetic.save_synthetic folder) the character / environment / attribute metrics are computed too.
--stories scores every rendered ground-truth story in a folder with its own masks (the upper
bound); --segment segments them from colour instead, as generated videos are. Without --out the
JSON goes to stdout; with it, a short summary does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from onestory_jax.data.features import FeatureExtractor, load_features
from onestory_jax.errors import UserError, run_cli
from onestory_jax.eval import loading, metrics
from onestory_jax.eval.evaluate import evaluate_story
from onestory_jax.io import require_writable_file, save_json


def _evaluate(frames: list, truth: Any, features: FeatureExtractor, masks: list | None = None) -> dict[str, Any]:
    try:
        return evaluate_story(frames, truth, features, masks)
    except ValueError as e:
        raise UserError(str(e)) from None


def evaluate_run(run: Path, truth: Path | None, features: FeatureExtractor) -> dict[str, Any]:
    """The result of one sample.py run directory, against a ground-truth story when given."""
    story = loading.load_truth(truth) if truth is not None else None
    frames = loading.load_run(run)
    if story is not None and len(story.shots) != len(frames):
        raise UserError(f"run '{run}' has {len(frames)} shots but the ground truth '{truth}' has {len(story.shots)}")
    if story is not None:
        check_captions(run, [s.caption for s in story.shots], truth)
    return {"run": str(run), "truth": None if truth is None else str(truth), **_evaluate(frames, story, features)}


def check_captions(run: Path, truth_captions: list[str], truth: Path) -> None:
    """Refuse a run whose captions (its manifest's) are not the ground truth's: it was made from another story."""
    try:
        captions = [shot["caption"] for shot in json.loads((run / "manifest.json").read_text())["shots"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest (shot videos only): nothing to compare
    for i, (ours, theirs) in enumerate(zip(captions, truth_captions)):
        if ours != theirs:
            raise UserError(
                f"run '{run}' shot {i + 1} was rendered from {ours!r}, but the ground truth '{truth}' says "
                f"{theirs!r}: score a run of this story (its story.yaml)"
            )


def _mean_summary(results: list[dict[str, Any]]) -> dict[str, float | None]:
    keys = results[0]["summary"]
    return {k: metrics.mean_or_none([r["summary"][k] for r in results]) for k in keys}


def evaluate_stories(root: Path, features: FeatureExtractor, segment: bool = False) -> dict[str, Any]:
    """Every rendered ground-truth story under `root`, with the mean summary."""
    results = {}
    for folder in loading.story_folders(root):
        story, frames, masks = loading.load_rendered(folder)
        results[folder.name] = _evaluate(frames, story, features, None if segment else masks)
    return {
        "stories_dir": str(root),
        "feature": features.name,
        "stories": len(results),
        "mean": _mean_summary(list(results.values())),
        "per_story": results,
    }


def _print_summary(summary: dict[str, float | None], feature: str, out: Path) -> None:
    print(f"wrote {out} (feature: {feature})")
    for key, value in summary.items():
        print(f"  {key:28s} {'unavailable' if value is None else f'{value:.4f}'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m onestory_jax.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=Path, help="sample.py output directory (shot_NN.mp4, manifest.json)")
    what.add_argument("--stories", type=Path, help="folder of rendered synthetic.save_synthetic folders")
    ap.add_argument("--truth", type=Path, help="with --run: the ground-truth synthetic story folder (story.json)")
    ap.add_argument("--segment", action="store_true", help="with --stories: segment by colour, ignoring the masks")
    ap.add_argument("--dinov2", type=Path, help="local DINOv2 model folder (transformers); default: weight-free feature")
    ap.add_argument("--out", type=Path, help="write the JSON result here (default: stdout)")
    args = ap.parse_args(argv)
    if args.truth is not None and args.run is None:
        raise UserError("--truth goes with --run (--stories folders carry their own ground truth)")
    if args.segment and args.stories is None:
        raise UserError("--segment goes with --stories")

    if args.out is not None:  # before any model or video is loaded
        require_writable_file(args.out, "--out")
    features = load_features(args.dinov2)
    if args.run is not None:
        result = evaluate_run(args.run, args.truth, features)
        summary = result["summary"]
    else:
        result = evaluate_stories(args.stories, features, args.segment)
        summary = result["mean"]
    if args.out is None:
        print(json.dumps(result, indent=1))
    else:
        save_json(args.out, result)
        _print_summary(summary, features.name, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
