"""Table 2(a) by the paper's protocol (issue 12): one model per memory scheme, each rendered with the
scheme it was trained with, on the same held-out stories; the section of docs/results.md.

    python bench/memory_ablation.py --variant none=runs/memory-none/model --variant ... \\
        [--frozen models/demo] [--stories 24] [--out bench/results/memory_ablation]

Each --variant NAME=FOLDER is a train.py export (FOLDER/onestory); the frozen parts (VAE, text and
image encoders, tokenizer) come from --frozen. The sampling strategy is the model's own
memory.train_strategy. Held-out stories alternate insert-and-recall with the other two patterns
(half of them have recall shots). Paired 95% intervals against last_frame and ac_only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from story_consistency import cell, held_out_stories, paired_differences, run_config, score_run, table, write_section

from onestory_jax.data import synthetic
from onestory_jax.eval import evaluate_story, load_features, summary
from onestory_jax.eval.recall import recall_metrics, recall_shots

FROZEN = ("vae", "text_encoder", "image_encoder", "tokenizer")
KINDS = ("insert_recall", "main_subject", "insert_recall", "composition")
METRICS = ("character", "character_recall", "recall_colour", "named_colour", "selection_accuracy", "selection_on_truth",
           "attribute_character_colour", "environment")
CEILING = ("named_colour", "recall_colour", "attribute_character_colour")
PAIRED = ("character", "character_recall", "recall_colour", "recall_l_shot")  # the last: lower is better


def model_folder(name: str, export: Path, frozen: Path, out: Path) -> tuple[Path, str]:
    """A sampling model folder (links to the export's onestory/ and the frozen parts) and its strategy."""
    config = export / "onestory" / "config.yaml"
    if not config.is_file():
        sys.exit(f"error: --variant {name}: '{export}' holds no onestory/config.yaml (a train.py export)")
    folder = out / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    for part, target in [("onestory", export / "onestory"), *((p, frozen / p) for p in FROZEN)]:
        link = folder / part
        if not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    return folder, yaml.safe_load(config.read_text())["memory"]["train_strategy"]


def selection_on_truth(folder: Path, strategy: str, stories: list[synthetic.SyntheticStory], frames: int) -> list[float | None]:
    """Per story: selection accuracy on its recall shots when the memory holds the ground-truth shots
    (VAE latents of the renders), i.e. the frame choice alone, whatever the DiT draws."""
    import jax

    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.generate import context_for_shot, generation_spec
    from onestory_jax.sampling.memory_bank import empty_bank, write_shot
    from onestory_jax.sharding import activate

    cfg, params, comps, mesh = load_for_sampling(folder, None, [], 0)
    choose = jax.jit(lambda p, bank, caption, spec: context_for_shot(p, cfg, bank, caption, spec)[1:], static_argnums=3)
    out = []
    with activate(mesh):
        for story in stories:
            latents = [comps.encode_video(v.astype(np.float32) / 127.5 - 1.0) for v, _ in synthetic.render_synthetic(story, frames)]
            spec = generation_spec(cfg, strategy, None, latents[0].shape[1:3], 1, 3.0, "euler", 1.0)
            hits = []
            for j, c in recall_shots(story):
                bank = empty_bank(len(story.shots), *latents[0].shape)
                for i in range(j):
                    bank = write_shot(bank, i, latents[i])
                indices, _, selected = choose(params, bank, comps.encode_text([story.shots[j].caption])[0], spec)
                shots = {int(i) // latents[0].shape[0] for i, ok in zip(np.asarray(indices), np.asarray(selected)) if ok}
                hits.append(any(c in story.shots[i].characters for i in shots))
            out.append(float(np.mean(hits)) if hits else None)
    return out


def recall_loss(folder: Path, stories: list[synthetic.SyntheticStory], frames: int) -> list[tuple[float, float] | None]:
    """Per story: L_shot of its recall shots (mean over sigmas 0.3, 0.5, 0.7, fixed noise) with the
    memory of a training example built from the ground truth (the recalled character's first shot,
    then the shot before the recall) under the model's own frame choice, and with that context
    masked: does the context carry the recalled character?"""
    import jax
    import jax.numpy as jnp

    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sharding import activate
    from onestory_jax.training.losses import loss_at_sigmas

    cfg, params, comps, mesh = load_for_sampling(folder, None, [], 0)
    sigmas = jnp.asarray([0.3, 0.5, 0.7], jnp.float32)
    loss = jax.jit(lambda p, batch, keep: loss_at_sigmas(p, batch, sigmas, jax.random.key(0), cfg, keep).mean(),
                   static_argnums=2)
    out = []
    with activate(mesh):
        for story in stories:
            latents = [comps.encode_video(v.astype(np.float32) / 127.5 - 1.0) for v, _ in synthetic.render_synthetic(story, frames)]
            t = latents[0].shape[0]
            pairs = []
            for j, c in recall_shots(story):
                first = next(i for i, s in enumerate(story.shots) if c in s.characters)
                memory = np.concatenate([latents[first], latents[j - 1]])[None]
                batch = {"target": latents[j][None], "memory": memory, "memory_valid": np.ones((1, 2 * t), bool),
                         "labels": np.zeros((1, 2 * t), np.float32), "real_prior": np.ones((1, 2 * t), bool),
                         "text": comps.encode_text([story.shots[j].caption]),
                         "image": np.zeros((1, cfg.image_encoder.num_tokens, cfg.dit.image_dim), np.float32),
                         "cond": np.zeros((*latents[j][None].shape[:-1], 4 + latents[j].shape[-1]), np.float32)}
                pairs.append((float(loss(params, batch, True)), float(loss(params, batch, False))))
            out.append(tuple(np.mean(pairs, axis=0).tolist()) if pairs else None)
    return out


def colour_ceiling(frozen: Path, stories: list[synthetic.SyntheticStory], frames: int, features: Any) -> dict[str, list[dict]]:
    """Per-story colour metrics of the ground truth, segmented from colour as renders are, and of its
    VAE round trip (`frozen`'s VAE): what any DiT on this VAE could reach at best."""
    import jax.numpy as jnp

    from onestory_jax.data.video import to_uint8
    from onestory_jax.models.frozen import load_frozen_parts, model_folder_config, vae_decode_fn, vae_encode_fn
    from onestory_jax.sharding import activate, make_mesh

    cfg = model_folder_config(frozen)
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        params = load_frozen_parts(frozen, cfg, mesh, ["vae"])["vae"]
        encode, decode = vae_encode_fn(cfg.vae), vae_decode_fn(cfg.vae)
        round_trip = lambda v: np.asarray(decode(params, encode(params, jnp.asarray(v)[None] / 127.5 - 1.0)))[0]
        rows: dict[str, list[dict]] = {"ground truth": [], "VAE round trip": []}
        for i, story in enumerate(stories):
            truth = [v for v, _ in synthetic.render_synthetic(story, frames)]
            decoded = [to_uint8(round_trip(v)) for v in truth]
            for name, videos in (("ground truth", truth), ("VAE round trip", decoded)):
                result = evaluate_story(videos, story, features)
                metrics = recall_metrics(story, result, {"shots": [{"memory": []}] * len(story.shots)})
                rows[name].append({"story": i, "kind": story.kind, **summary(result), **metrics})
    return rows


def validation_gap(export: Path) -> tuple[int, float, float] | None:
    """(step, L_shot with context, with context masked) at the last validation of the run that
    exported `export` (its workdir's val.csv, mean over the sigma buckets), or None."""
    file = export.parent / "val.csv"
    if not file.is_file():
        return None
    rows = list(csv.DictReader(file.open()))
    if not rows or "loss_no_context" not in rows[0]:
        return None
    step = max(int(r["step"]) for r in rows)
    last = [r for r in rows if int(r["step"]) == step]
    return step, float(np.mean([float(r["loss"]) for r in last])), float(np.mean([float(r["loss_no_context"]) for r in last]))


def report(results: dict[str, list[dict]], strategies: dict[str, str], n: int, shots: int, feature: str,
           gaps: dict[str, tuple[int, float, float] | None], ceiling: dict[str, list[dict]]) -> list[str]:
    """The docs/results.md section: what each variant is, the tables, the paired differences."""
    lines = ["## Table 2(a) by the paper's protocol: one model per memory scheme (issue 12)", "",
             f"{n} held-out {shots}-shot stories (insert-and-recall alternating with main-subject and composition), "
             f"each variant rendered with its own scheme (`{feature}` features). `recall_colour`: the recalled "
             "character's colour is right on recall shots; `selection_accuracy`: the frames given to the DiT on a "
             "recall shot include one of the recalled character (generated memory); `selection_on_truth`: the same "
             "with the ground-truth shots as memory (the frame choice alone). Reproduce: `python bench/memory_ablation.py` "
             "(docs/demo.md, \"Memory ablation\").", "", "| variant | sampling strategy |", "|---|---|"]
    lines += [f"| {k} | {strategies[k]} |" for k in results]
    lines += ["", "Does the model use its memory? Validation L_shot (train.py's `val.csv`, mean over the five sigma "
              "buckets) with the variant's context and with all context masked, at the exported step:", "",
              "| variant | step | with context | context masked | difference |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {g[0]} | {g[1]:.4f} | {g[2]:.4f} | {g[1] - g[2]:+.4f} |" for k, g in gaps.items() if g is not None]
    lines += ["", "The same on the recall shots of the held-out stories, with a training example's memory made of the "
              "ground truth (the recalled character's first shot, then the shot before the recall), the variant's own "
              "frame choice, sigmas 0.3, 0.5, 0.7 (`recall_l_shot` - `recall_l_shot_masked`, paired over stories):", "",
              "| variant | with context | context masked | difference |", "|---|---|---|---|"]
    for k, rows in results.items():
        with_ctx, masked = ([r[m] for r in rows if r.get(m) is not None] for m in ("recall_l_shot", "recall_l_shot_masked"))
        diff = [r["recall_l_shot"] - r["recall_l_shot_masked"] for r in rows if r.get("recall_l_shot") is not None]
        lines.append(f"| {k} | {cell(with_ctx)} | {cell(masked)} | {cell(diff, signed=True)} |")
    lines += ["", "The colour ceiling: the same colour checks on the ground-truth frames (segmented from colour, as "
              "renders are) and on their round trip through the frozen VAE, no DiT. `named_colour`: characters whose "
              "colour the caption names (no memory needed) come out in that colour:", ""]
    lines += table({**ceiling, **results}, CEILING)
    for kind, title in ((None, "All stories"), ("insert_recall", "Insert-and-recall stories")):
        lines += ["", f"### {title}", ""] + table(results, METRICS, kind)
        for base in ("last_frame", "ac_only"):
            if base in results:
                lines += ["", f"Paired differences against {base} ({title.lower()}):", ""]
                lines += paired_differences(results, base, PAIRED, kind)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=FOLDER (a train.py export)")
    ap.add_argument("--frozen", type=Path, default=Path("models/demo"), help="model folder of the frozen parts")
    ap.add_argument("--stories", type=int, default=24)
    ap.add_argument("--shots", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per shot")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_ablation"))
    ap.add_argument("--report", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant if "=" in v)
    if len(variants) != len(args.variant):
        sys.exit("error: --variant takes NAME=FOLDER")
    features = load_features(None)
    stories = held_out_stories(args.stories, args.shots, KINDS)
    args.out.mkdir(parents=True, exist_ok=True)
    results, strategies, gaps = {}, {}, {}
    ceiling_file = args.out / "ceiling.json"
    if not ceiling_file.is_file():
        ceiling_file.write_text(json.dumps(colour_ceiling(args.frozen, stories, args.frames, features), indent=1))
    ceiling = json.loads(ceiling_file.read_text())
    for name, export in variants.items():
        folder, strategies[name] = model_folder(name, Path(export), args.frozen, args.out)
        gaps[name] = validation_gap(Path(export))
        file = args.out / f"{name}.json"
        if not file.is_file():
            rows = run_config(name, folder, stories, args.out, args.steps, args.frames, features, {"strategy": strategies[name]}, [])
            for row, value in zip(rows, selection_on_truth(folder, strategies[name], stories, args.frames)):
                row["selection_on_truth"] = value
            file.write_text(json.dumps(rows, indent=1))
        results[name] = json.loads(file.read_text())
        if any(m not in results[name][0] for m in METRICS):  # a metric added since: re-scored from the renders
            results[name] = [{**row, **score_run(args.out / "runs" / name / f"story_{row['story']:02d}", story, features)}
                             for row, story in zip(results[name], stories)]
            file.write_text(json.dumps(results[name], indent=1))
        if "recall_l_shot" not in results[name][0]:  # computed once, then stored with the rows
            for row, value in zip(results[name], recall_loss(folder, stories, args.frames)):
                row["recall_l_shot"], row["recall_l_shot_masked"] = value if value is not None else (None, None)
            file.write_text(json.dumps(results[name], indent=1))
        write_section(args.report, report(results, strategies, len(stories), args.shots, features.name, gaps, ceiling))
        print(name, "recall_colour", cell([r["recall_colour"] for r in results[name]]), flush=True)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
