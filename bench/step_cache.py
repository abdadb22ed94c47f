"""Step caching against exact sampling on the same seeds (settings.cache; diffusion/loop.py).

    python bench/step_cache.py [--model models/demo] [--stories 6] [--thresholds 0.05,0.1,0.2,0.4]

Renders held-out 8-shot stories of the synthetic world (seeds from memory_gates.HELD_OUT_SEED) with the
model's own sampler, exactly (cache 0) and at each threshold, in one process and one run, then reports
per threshold: denoising seconds (summed over shots, compilation excluded) and the speed-up against
exact, the PSNR of the decoded frames against the exact ones, and the named and recall colour checks
(eval/recall.py) -> bench/results/step_cache.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from memory_gates import HELD_OUT_SEED

from onestory_jax.data import synthetic
from onestory_jax.eval.loading import load_run
from onestory_jax.eval.recall import recall_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "step_cache.json"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) between uint8 videos."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--stories", type=int, default=6)
    ap.add_argument("--thresholds", default="0.05,0.1,0.2,0.4", type=lambda s: [float(v) for v in s.split(",")])
    args = ap.parse_args()

    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.story import parse_story
    from onestory_jax.sharding import activate

    cfg, params, comps, mesh = load_for_sampling(args.model, None, [], 0)
    s = cfg.sampler
    truths = [synthetic.make_story(HELD_OUT_SEED + i, 8) for i in range(args.stories)]
    rows: dict[float, dict[str, Any]] = {}
    exact_frames: list[list[np.ndarray]] = []
    with tempfile.TemporaryDirectory() as tmp, activate(mesh):
        for cache in [0.0, *args.thresholds]:
            seconds, psnrs, recall, named = 0.0, [], [], []
            for i, truth in enumerate(truths):
                spec = synthetic.story_file(truth, s.frames, s.width, steps=s.steps, seed=i, fps=s.fps, cache=cache)
                out = Path(tmp) / f"{cache}" / f"story_{i}"
                manifest = render_story(cfg, params, comps, parse_story(spec, f"story {i}"), out, progress=False, mesh=mesh)
                seconds += sum(shot["timings"]["denoise_s"] or 0.0 for shot in manifest["shots"])
                frames = load_run(out)
                if cache == 0.0:
                    exact_frames.append(frames)
                psnrs += [psnr(a, b) for a, b in zip(frames, exact_frames[i])]
                metrics = recall_metrics(truth, frames, None, manifest)
                recall.append(np.nan if metrics["recall_colour"] is None else metrics["recall_colour"])
                named.append(np.nan if metrics["named_colour"] is None else metrics["named_colour"])
            rows[cache] = {
                "denoise_s": round(seconds, 2),
                "psnr_db": round(float(np.mean(psnrs)), 2) if cache else None,
                "recall_colour": round(float(np.nanmean(recall)), 3),
                "named_colour": round(float(np.nanmean(named)), 3),
            }
            print(f"cache {cache}: {rows[cache]}", flush=True)
    exact = rows[0.0]["denoise_s"]
    for row in rows.values():
        row["speedup"] = round(exact / row["denoise_s"], 2)
    result = {
        "model": str(args.model),
        "stories": args.stories,
        "shots_per_story": 8,
        "steps": s.steps,
        "size": [s.width, s.height, s.frames],
        "rows": {str(k): v for k, v in rows.items()},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
