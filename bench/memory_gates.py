"""The sanity gates of the memory ablation (toyworld-spec §2.5), in order, on held-out stories:

  1. ground truth: the hue check names every shot's colour (1.00);
  2. VAE round trip: the frozen VAE keeps it (>= 0.95);
  3. named colour: first appearances sampled from their caption alone, no memory (>= 0.90);
  4. oracle recall: recall shots sampled with the true frame in context (the recalled character's
     latest earlier shot, its last latent frame) >= 0.80, and with a wrong one (the previous shot's
     last frame, another character) <= 0.25, on the same noise.

    python bench/memory_gates.py --model runs/demo/model [--first-seed 1000000] [--stories 30] [--set KEY=VALUE ...]

The memory of gate 4 is the ground truth's latents (teacher forcing: `sampling.teacher_forced`).
Prints one line per gate and writes the numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onestory_jax.data import synthetic
from onestory_jax.data.video import to_uint8
from onestory_jax.eval.hue import shot_colour
from onestory_jax.eval.metrics import mean_ci
from onestory_jax.eval.recall import named_shots, recall_shots
from onestory_jax.sampling.components import load_for_sampling
from onestory_jax.sampling.generate import generation_spec
from onestory_jax.sampling.teacher_forced import shot_sampler
from onestory_jax.sharding import activate

HELD_OUT_SEED = 1_000_000
GATES = {"ground_truth": 1.0, "vae_round_trip": 0.95, "named_colour": 0.90, "oracle_recall": 0.80}
WRONG_FRAME_LIMIT = 0.25


def held_out(first_seed: int, n: int, shots: int = 8) -> list[synthetic.SyntheticStory]:
    """n stories of `shots` shots, seeds first_seed .. first_seed + n - 1 (training uses seeds < 10^6)."""
    return [synthetic.make_story(first_seed + i, shots) for i in range(n)]


def shot_noise(story_seed: int, shot: int, shape: tuple[int, ...]) -> np.ndarray:
    """The seeded initial noise of one shot (shared by every condition: paired comparisons)."""
    return np.asarray(jax.random.normal(jax.random.key(story_seed * 64 + shot), shape))


def oracle_shot(story: synthetic.SyntheticStory, j: int, c: int) -> int:
    """The latest shot before j that shows character c."""
    return max(i for i in range(j) if c in story.shots[i].characters)


def oracle_sampler(params: dict, cfg: Any, steps: int, size: int = 64) -> Any:
    """One compiled teacher-forced sampler (`sampling.teacher_forced`) whose context is the last latent
    frame of the one memory shot it is given, at the world's `size` and the model's sampler settings."""
    hw = (size // cfg.vae.spatial_factor,) * 2
    s = cfg.sampler
    spec = generation_spec(cfg, "last_frame", 1, hw, steps, s.shift, s.solver, s.guidance, memory_guidance=s.memory_guidance)
    return shot_sampler(params, cfg, spec, max_memory_shots=1)


def gates(model: Path, first_seed: int, n: int, steps: int, frames: int, overrides: list[str]) -> dict[str, Any]:
    """Every gate's per-shot hits, for `n` held-out stories from `first_seed` (`overrides`: of the model's config)."""
    cfg, params, comps, mesh = load_for_sampling(model, None, overrides, 0)
    hits: dict[str, list[bool]] = {k: [] for k in (*GATES, "wrong_frame_recall")}
    with activate(mesh):
        sample = oracle_sampler(params, cfg, steps)
        for i, story in enumerate(held_out(first_seed, n)):
            truth = [v for v, _ in synthetic.render_synthetic(story, frames)]
            latents = [comps.encode_video(v.astype(np.float32) / 127.5 - 1.0) for v in truth]
            captions = comps.encode_text([s.caption for s in story.shots])
            decode = lambda lat: to_uint8(comps.decode_latents(lat))
            colour = lambda j, story=story: story.characters[story.shots[j].characters[0]].colour
            for j, v in enumerate(truth):
                hits["ground_truth"].append(shot_colour(v) == colour(j))
                hits["vae_round_trip"].append(shot_colour(decode(latents[j])) == colour(j))
            for j, _ in named_shots(story):
                out = sample([], captions[j], shot_noise(first_seed + i, j, latents[j].shape))
                hits["named_colour"].append(shot_colour(decode(out)) == colour(j))
            for j, c in recall_shots(story):
                noise = shot_noise(first_seed + i, j, latents[j].shape)
                right = sample([latents[oracle_shot(story, j, c)]], captions[j], noise)
                wrong = sample([latents[j - 1]], captions[j], noise)
                hits["oracle_recall"].append(shot_colour(decode(right)) == colour(j))
                hits["wrong_frame_recall"].append(shot_colour(decode(wrong)) == colour(j))
            print(f"story {i + 1}/{n}: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in hits.items() if v), flush=True)
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder (onestory/ and the frozen parts)")
    ap.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--stories", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per shot")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_gates/gates.json"))
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the model's config: sampler.memory_guidance=3"
    )
    args = ap.parse_args()
    hits = gates(args.model, args.first_seed, args.stories, args.steps, args.frames, args.set)
    rates = {k: float(np.mean(v)) for k, v in hits.items()}
    paired = np.asarray(hits["oracle_recall"], float) - np.asarray(hits["wrong_frame_recall"], float)
    _, half, _ = mean_ci(paired)
    result = {
        "model": str(args.model),
        "first_seed": args.first_seed,
        "stories": args.stories,
        "steps": args.steps,
        "overrides": args.set,
        "rates": rates,
        "counts": {k: len(v) for k, v in hits.items()},
        "oracle_minus_wrong": [float(paired.mean()), float(half)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, target in GATES.items():
        print(
            f"gate {name}: {rates[name]:.3f} (n={len(hits[name])}, target >= {target:.2f}) "
            f"{'PASS' if rates[name] >= target else 'FAIL'}"
        )
    ok = rates["wrong_frame_recall"] <= WRONG_FRAME_LIMIT
    print(
        f"gate wrong_frame_recall: {rates['wrong_frame_recall']:.3f} (target <= {WRONG_FRAME_LIMIT:.2f}) "
        f"{'PASS' if ok else 'FAIL'}; "
        f"oracle - wrong {paired.mean():+.3f} ± {half:.3f}"
    )


if __name__ == "__main__":
    main()
