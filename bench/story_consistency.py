"""Memory strategies on held-out six-shot synthetic stories: the results table of docs/results.md.

    python bench/story_consistency.py --model models/demo [--stories 32] [--out bench/results/consistency]

Every configuration renders the same stories (seeds 1,000,000 + i: never seen in training, whose
stories have seeds < 1,000,000) with sample.py's pipeline into OUT/runs/CONFIG/story_NN (re-runs
resume), evaluates them with onestory_jax.eval (weight-free features unless --dinov2), writes
OUT/CONFIG.json, and finally docs/results.md with means and 95% confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.data import synthetic
from onestory_jax.eval import evaluate_story, load_features, summary
from onestory_jax.eval.loading import load_run
from onestory_jax.eval.recall import recall_metrics

HELD_OUT_SEED = 1_000_000
# name -> (memory settings of the story, model overrides, what it stands for)
CONFIGS: dict[str, tuple[dict[str, Any], list[str], str]] = {
    "none": ({"strategy": "none"}, [], "no memory frames; later shots still see shot 1's CLIP tokens (not text only)"),
    "last_frame": ({"strategy": "last_frame"}, [], "last frame of the previous shot (Table 2a baseline)"),
    "recent": ({"strategy": "recent"}, [], "most recent K frames, adaptive patchifiers"),
    "uniform": ({"strategy": "uniform"}, [], "K frames uniform over all earlier shots, adaptive patchifiers (AC only)"),
    "fs_only": ({"strategy": "onestory"}, ["memory.frames_per_patchifier=[4,0]"],
                "Frame Selection top-K, one fine patchifier (FS only)"),
    "onestory": ({"strategy": "onestory", "budget": 1}, [], "Frame Selection + Adaptive Conditioner, budget 1 (AC+FS)"),
    "onestory_b2": ({"strategy": "onestory", "budget": 2}, [], "OneStory, budget 2 latent frames"),
    "onestory_b3": ({"strategy": "onestory", "budget": 3}, [], "OneStory, budget 3 latent frames"),
}
METRICS = ("character", "character_recall", "environment", "subject", "background", "dynamic_degree",
           "attribute_character_colour", "attribute_scene")


def held_out_stories(n: int, shots: int, kinds: tuple[str, ...] = synthetic.KINDS) -> list[synthetic.SyntheticStory]:
    """n stories of `shots` shots cycling through `kinds` (default: the three patterns)."""
    return [synthetic.make_story(HELD_OUT_SEED + i, shots, kinds[i % len(kinds)]) for i in range(n)]


# docs/results.md keeps bench/memory_ablation.py's section between these lines when rewritten here.
SECTION_BEGIN, SECTION_END = "<!-- memory-ablation: begin (bench/memory_ablation.py) -->", "<!-- memory-ablation: end -->"


def marked_section(path: Path) -> str:
    """The marked section of a report (markers included), or ''."""
    text = path.read_text() if path.is_file() else ""
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    return text[start:end + len(SECTION_END)] + "\n" if 0 <= start < end else ""


def write_section(path: Path, body: list[str]) -> None:
    """Put `body` in the report's marked section (replaced, or appended)."""
    text = path.read_text() if path.is_file() else ""
    old = marked_section(path)
    new = "\n".join([SECTION_BEGIN, *body, SECTION_END]) + "\n"
    path.write_text(text.replace(old, new) if old else text + "\n" + new)


def score_run(run: Path, truth: synthetic.SyntheticStory, features: Any) -> dict[str, Any]:
    """The headline and recall-shot metrics of one rendered story folder against its ground truth."""
    result = evaluate_story(load_run(run), truth, features)
    manifest = json.loads((run / "manifest.json").read_text())
    return {"kind": truth.kind, **summary(result), **recall_metrics(truth, result, manifest)}


def run_config(name: str, model: Path, stories: list[synthetic.SyntheticStory], out: Path, steps: int, frames: int,
               features: Any, memory: dict[str, Any], overrides: list[str]) -> list[dict]:
    """Render (or resume) and evaluate every story under one configuration (story `memory`
    settings, model `overrides`); per-story summaries with the recall-shot metrics."""
    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.story import parse_story
    from onestory_jax.sharding import activate

    cfg, params, comps, mesh = load_for_sampling(model, None, overrides, 0)
    rows = []
    for i, truth in enumerate(stories):
        spec = synthetic.story_file(truth, frames, steps=steps, seed=i, guidance=cfg.sampler.guidance, fps=8)
        story = parse_story({**spec, "memory": memory}, f"story {i}")
        run = out / "runs" / name / f"story_{i:02d}"
        if not (run / "manifest.json").is_file():
            with activate(mesh):
                render_story(cfg, params, comps, story, run, progress=False, mesh=mesh)
        row = {"story": i, **score_run(run, truth, features)}
        rows.append(row)
        print(f"{name} story {i}: character {row['character']}", flush=True)
    return rows


def mean_ci(values: list[float | None]) -> tuple[float, float, int]:
    """Mean, 95% CI half-width (normal approximation), count of the available values."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return float(v.mean()), float(half), len(v)


def cell(values: list[float | None], signed: bool = False) -> str:
    """'mean ± half-width' of the available values for a table cell ('n/a' when there are none)."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "n/a"
    return (f"{mean:+.3f}" if signed else f"{mean:.3f}") + (f" ± {half:.3f}" if n > 1 else "")


def table(results: dict[str, list[dict]], metrics: tuple[str, ...], kind: str | None = None) -> list[str]:
    head = "| config | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for name, rows in results.items():
        rows = [r for r in rows if kind is None or r["kind"] == kind]
        cells = [cell([r.get(m) for r in rows]) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def paired_differences(results: dict[str, list[dict]], base: str, metrics: tuple[str, ...], kind: str | None) -> list[str]:
    """Per-story differences config - `base` on the same `kind` stories (None: all): mean ± 95% CI (paired)."""
    lines = [f"| config - {base} | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    ref = {r["story"]: r for r in results[base] if kind is None or r["kind"] == kind}
    for name, rows in results.items():
        if name == base:
            continue
        cells = [cell([r[m] - ref[r["story"]][m] for r in rows if r["story"] in ref
                       and r.get(m) is not None and ref[r["story"]].get(m) is not None], signed=True) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: dict[str, list[dict]], truth_rows: list[dict], path: Path, n: int, shots: int, feature: str) -> None:
    """docs/results.md: the overall and insert-and-recall tables, with what each config is."""
    lines = ["# Results: memory strategies on held-out synthetic stories", "",
             f"{n} held-out {shots}-shot synthetic stories (one third each main_subject, insert_recall, composition), "
             f"rendered by the embedded default model (`models/demo`) through `sample.py`'s pipeline and scored by "
             f"`onestory_jax.eval` with the `{feature}` feature on the mp4 outputs. Mean ± 95% confidence "
             "interval (1.96 standard errors over stories). Reproduce: `python bench/story_consistency.py "
             "--model models/demo` (per-story numbers in `bench/results/consistency/`).", "",
             "| config | what |", "|---|---|"]
    lines += [f"| {k} | {CONFIGS[k][2]} |" for k in results]
    lines += ["", "## All stories", ""] + table(results, METRICS)
    lines += ["", "## Insert-and-recall stories", "",
              "`character_recall`: the first character's similarity between shots separated by the inserted one.", ""]
    lines += table(results, ("character", "character_recall", "environment", "attribute_character_colour"), "insert_recall")
    if "last_frame" in results:
        lines += ["", "Paired differences against last_frame on the same insert-and-recall stories "
                  "(a difference whose interval excludes 0 is significant at 95%):", ""]
        lines += paired_differences(results, "last_frame", ("character", "character_recall"), "insert_recall")
    lines += ["", "## Upper bound: the ground-truth renders", "",
              "The same metrics on the stories' own ground-truth frames (no mp4 round trip).", ""]
    lines += table({"ground truth": truth_rows}, METRICS)
    kept = marked_section(path)
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/demo"))
    ap.add_argument("--stories", type=int, default=32)
    ap.add_argument("--shots", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per shot")
    ap.add_argument("--frames", type=int, default=9, help="frames per shot (the demo model trains on 9)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--dinov2", type=Path, help="local DINOv2 folder for the features (default: weight-free)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/consistency"))
    ap.add_argument("--report", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args()
    if args.frames < 1 or (args.frames - 1) % 4:
        sys.exit(f"error: --frames must be 4k+1 (e.g. 9, 17), got {args.frames}")
    features = load_features(args.dinov2)
    stories = held_out_stories(args.stories, args.shots)
    args.out.mkdir(parents=True, exist_ok=True)
    truth_rows = []
    for i, story in enumerate(stories):
        frames, masks = zip(*synthetic.render_synthetic(story, args.frames))
        truth_rows.append({"story": i, "kind": story.kind, **summary(evaluate_story(list(frames), story, features, list(masks)))})
    results = {}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"error: unknown config '{name}' (one of {', '.join(CONFIGS)})")
        file = args.out / f"{name}.json"
        results[name] = json.loads(file.read_text()) if file.is_file() else run_config(
            name, args.model, stories, args.out, args.steps, args.frames, features, *CONFIGS[name][:2])
        file.write_text(json.dumps(results[name], indent=1))
        write_report(results, truth_rows, args.report, len(stories), args.shots, features.name)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
