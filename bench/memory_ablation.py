"""Table 2(a) by the paper's protocol: one model per memory scheme, each rendered with the scheme it
was trained with, on the same held-out stories; the section of docs/results.md.

    python bench/memory_ablation.py [--variants models/ablation] [--frozen models/demo]
        [--first-seed 1000000] [--stories 30] [--out bench/results/memory_ablation]

Variants: the paper's five (none, last_frame, ac_only, fs_only, onestory) and onestory_captions (its
selector also reads the memory's captions). Each is a folder VARIANTS/NAME/onestory (a train.py export,
or the shipped ones); the frozen parts (VAE, text and image encoders, tokenizer) come from --frozen. Stories are 8-shot stories of
the synthetic world from seeds FIRST_SEED .. FIRST_SEED + STORIES - 1 (training uses seeds < 10^6),
so `--first-seed` checks the result on stories no one trained or tuned on. Per variant and story:

  recall_colour       recall shots in the recalled character's colour (hue check; primary)
  named_colour        first appearances in their named colour
  selection_on_truth  recall shots whose chosen frames, from the ground truth's latents, show the character
  recall_l_shot       teacher-forced L_shot on recall shots (ground-truth memory: the character's latest
                      earlier shot, then the previous shot) with the variant's context, minus with it masked
  oracle_recall       (fs_only's model) recall shots sampled with the true frame in context

Paired 95% intervals (t, over stories) against last_frame and ac_only; the summary prints last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from memory_gates import HELD_OUT_SEED, held_out, oracle_sampler, oracle_shot, shot_noise

from onestory_jax.data import synthetic
from onestory_jax.eval import evaluate_story, load_features
from onestory_jax.eval.hue import shot_colour
from onestory_jax.eval.loading import load_run
from onestory_jax.eval.metrics import mean_ci
from onestory_jax.eval.recall import recall_metrics, recall_shots
from onestory_jax.sampling.resume import model_identity

# The paper's five, then onestory with a selector that also reads the memory shots' captions (beyond the paper)
VARIANTS = ("none", "last_frame", "ac_only", "fs_only", "onestory", "onestory_captions")
FROZEN = ("vae", "text_encoder", "image_encoder", "tokenizer")
METRICS = (
    "recall_colour",
    "named_colour",
    "selection_on_truth",
    "selection_accuracy",
    "recall_l_shot_gain",
    "recall_colour_strict",
    "named_colour_strict",
)
PAIRED = ("recall_colour", "selection_on_truth", "recall_l_shot_gain")
SECTION_BEGIN, SECTION_END = "<!-- memory-ablation:begin -->", "<!-- memory-ablation:end -->"


def model_folder(name: str, variants: Path, frozen: Path, out: Path) -> tuple[Path, str]:
    """A sampling model folder (links to the variant's onestory/ and the frozen parts) and its strategy."""
    export = variants / name
    config = export / "onestory" / "config.yaml"
    if not config.is_file():
        sys.exit(f"error: variant {name}: '{export}' holds no onestory/config.yaml (a train.py export)")
    folder = out / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    for part, target in [("onestory", export / "onestory"), *((p, frozen / p) for p in FROZEN)]:
        link = folder / part
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    return folder, yaml.safe_load(config.read_text())["memory"]["train_strategy"]


def render_and_score(
    name: str,
    folder: Path,
    strategy: str,
    stories: list[synthetic.SyntheticStory],
    runs: Path,
    steps: int,
    frames: int,
    features: Any,
    model: str,
    overrides: list[str],
) -> list[dict[str, Any]]:
    """Render (or resume) every story with sample.py's pipeline under the variant's own scheme; its metrics."""
    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.story import parse_story
    from onestory_jax.sharding import activate

    cfg, params, comps, mesh = load_for_sampling(folder, None, overrides, 0)
    rows = []
    for i, truth in enumerate(stories):
        spec = synthetic.story_file(truth, frames, steps=steps, seed=i, guidance=cfg.sampler.guidance, fps=8)
        run = runs / name / f"story_{i:02d}"
        with activate(mesh):  # sample.py's resume: shots of these weights and settings are kept, others redrawn
            render_story(
                cfg,
                params,
                comps,
                parse_story({**spec, "memory": {"strategy": strategy}}, f"story {i}"),
                run,
                progress=False,
                mesh=mesh,
                model_id=model,
            )
        rendered = load_run(run)
        manifest = json.loads((run / "manifest.json").read_text())
        rows.append({"story": i, **recall_metrics(truth, rendered, evaluate_story(rendered, truth, features), manifest)})
    return rows


def teacher_forced(
    folder: Path,
    strategy: str,
    stories: list[synthetic.SyntheticStory],
    first_seed: int,
    frames: int,
    steps: int,
    oracle: bool,
    overrides: list[str],
) -> list[dict[str, Any]]:
    """Per story, with the ground truth's latents as memory: selection_on_truth, recall_l_shot_gain and
    (when `oracle`) oracle_recall, the true frame in context."""
    import jax
    import jax.numpy as jnp

    from onestory_jax.data.video import to_uint8
    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.generate import context_for_shot, generation_spec
    from onestory_jax.sampling.memory_bank import empty_bank, slot_captions, write_shot
    from onestory_jax.sharding import activate
    from onestory_jax.training.losses import loss_at_sigmas

    cfg, params, comps, mesh = load_for_sampling(folder, None, overrides, 0)
    choose = jax.jit(
        lambda p, bank, caption, spec, text: context_for_shot(p, cfg, bank, caption, spec, memory_text=text)[1:],
        static_argnums=3,
    )
    sigmas = jnp.asarray([0.3, 0.5, 0.7], jnp.float32)
    loss = jax.jit(lambda p, batch, keep: loss_at_sigmas(p, batch, sigmas, jax.random.key(0), cfg, keep).mean(), static_argnums=2)
    rows = []
    with activate(mesh):
        sample = oracle_sampler(params, cfg, steps) if oracle else None
        for i, story in enumerate(stories):
            latents = [
                comps.encode_video(v.astype(np.float32) / 127.5 - 1.0) for v, _ in synthetic.render_synthetic(story, frames)
            ]
            captions = comps.encode_text([s.caption for s in story.shots])
            t = latents[0].shape[0]
            memory_text = slot_captions(captions, t) if cfg.memory.selector_reads_captions else None
            spec = generation_spec(
                cfg, strategy, None, latents[0].shape[1:3], steps, cfg.sampler.shift, cfg.sampler.solver, cfg.sampler.guidance
            )
            hits, gains, oracle_hits = [], [], []
            for j, c in recall_shots(story):
                bank = empty_bank(len(story.shots), *latents[0].shape)
                for s in range(j):
                    bank = write_shot(bank, s, latents[s])
                indices, _, selected = choose(params, bank, captions[j], spec, memory_text)
                shots = {int(k) // t for k, ok in zip(np.asarray(indices), np.asarray(selected)) if ok}
                hits.append(any(c in story.shots[s].characters for s in shots))
                shown = [oracle_shot(story, j, c), j - 1]  # the memory shots, older first
                memory = np.concatenate([latents[s] for s in shown])[None]
                batch = {
                    "target": latents[j][None],
                    "memory": memory,
                    "memory_valid": np.ones((1, 2 * t), bool),
                    "labels": np.zeros((1, 2 * t), np.float32),
                    "text": captions[j][None],
                    "image": np.zeros((1, cfg.image_encoder.num_tokens, cfg.dit.image_dim), np.float32),
                    "cond": np.zeros((*latents[j][None].shape[:-1], 4 + latents[j].shape[-1]), np.float32),
                }
                if memory_text is not None:
                    batch["memory_text"] = np.concatenate([memory_text[s * t : (s + 1) * t] for s in shown])[None]
                gains.append(float(loss(params, batch, True)) - float(loss(params, batch, False)))
                if oracle:
                    out = sample(
                        [latents[oracle_shot(story, j, c)]], captions[j], shot_noise(first_seed + i, j, latents[j].shape)
                    )
                    colour = story.characters[c].colour
                    oracle_hits.append(shot_colour(to_uint8(comps.decode_latents(out))) == colour)
            mean = lambda v: float(np.mean(v)) if v else None
            rows.append(
                {
                    "story": i,
                    "selection_on_truth": mean(hits),
                    "recall_l_shot_gain": mean(gains),
                    **({"oracle_recall": mean(oracle_hits)} if oracle else {}),
                }
            )
    return rows


def cell(values: list[float | None], signed: bool = False) -> str:
    mean, half, n = mean_ci([v for v in values if v is not None])
    if n == 0:
        return "n/a"
    return (f"{mean:+.3f}" if signed else f"{mean:.3f}") + (f" ± {half:.3f}" if n > 1 else "")


def paired(results: dict[str, list[dict]], base: str, metric: str, name: str) -> list[float]:
    """Per-story differences name - base of one metric (stories where both have it)."""
    ref = {r["story"]: r.get(metric) for r in results[base]}
    return [r[metric] - ref[r["story"]] for r in results[name] if r.get(metric) is not None and ref.get(r["story"]) is not None]


def report(results: dict[str, list[dict]], strategies: dict[str, str], args: argparse.Namespace, recall_n: int) -> list[str]:
    """The docs/results.md section."""
    lines = [
        f"#### Seeds {args.first_seed}..{args.first_seed + args.stories - 1}",
        "",
        f"{args.stories} held-out 8-shot stories ({recall_n} recall shots), {args.steps} sampler steps, each variant "
        "rendered with its own scheme: " + ", ".join(f"{k} = `{v}`" for k, v in strategies.items()) + ". "
        f"Reproduce: `python bench/memory_ablation.py --first-seed {args.first_seed} --stories {args.stories}"
        + "".join(f" --set {o}" for o in args.set)
        + "`.",
        "",
        "| variant | " + " | ".join(METRICS) + " |",
        "|" + "---|" * (len(METRICS) + 1),
    ]
    lines += [f"| {k} | " + " | ".join(cell([r.get(m) for r in rows]) for m in METRICS) + " |" for k, rows in results.items()]
    if "oracle_recall" in results.get("fs_only", [{}])[0]:
        lines += [
            "",
            f"Oracle (fs_only's model, the true frame in context): recall_colour "
            f"{cell([r['oracle_recall'] for r in results['fs_only']])}.",
        ]
    for base in ("last_frame", "ac_only"):
        if base in results:
            lines += [
                "",
                f"Paired differences against {base} (mean ± 95% t-interval over stories):",
                "",
                f"| variant - {base} | " + " | ".join(PAIRED) + " |",
                "|" + "---|" * (len(PAIRED) + 1),
            ]
            lines += [
                f"| {k} | " + " | ".join(cell(paired(results, base, m, k), signed=True) for m in PAIRED) + " |"
                for k in results
                if k != base
            ]
    return lines


def write_section(path: Path, body: list[str], tag: str) -> None:
    """Put `body` in the report's section for `tag` (replaced, or appended)."""
    begin, end = SECTION_BEGIN.replace("begin", f"begin {tag}"), SECTION_END.replace("end", f"end {tag}")
    text = path.read_text() if path.is_file() else ""
    start, stop = text.find(begin), text.find(end)
    new = "\n".join([begin, *body, end])
    path.write_text(
        text[:start] + new + text[stop + len(end) :] if 0 <= start < stop else text.rstrip("\n") + "\n\n" + new + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=Path, default=Path("models/ablation"), help="folder of NAME/onestory exports")
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--frozen", type=Path, default=Path("models/demo"), help="model folder of the frozen parts")
    ap.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--stories", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per shot")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_ablation"))
    ap.add_argument("--report", type=Path, default=Path("docs/results.md"))
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of every variant's config: sampler.memory_guidance=3"
    )
    args = ap.parse_args()
    names = args.only.split(",")
    if any(n not in VARIANTS for n in names):
        sys.exit(f"error: --only takes a subset of {', '.join(VARIANTS)}")
    features = load_features(None)
    stories = held_out(args.first_seed, args.stories)
    out = args.out / f"seeds_{args.first_seed}_{args.stories}"
    out.mkdir(parents=True, exist_ok=True)
    results, strategies = {}, {}
    for name in names:
        folder, strategies[name] = model_folder(name, args.variants, args.frozen, args.out)
        settings = {"steps": args.steps, "frames": args.frames, "overrides": args.set}
        model = ":".join(model_identity((folder / part).resolve(), settings, 0) for part in ("onestory", *FROZEN))
        file = out / f"{name}.json"
        saved = json.loads(file.read_text()) if file.is_file() else {}
        if not isinstance(saved, dict) or saved.get("model") != model:  # results of other weights are never reused
            rows = render_and_score(
                name, folder, strategies[name], stories, out / "runs", args.steps, args.frames, features, model, args.set
            )
            forced = teacher_forced(
                folder, strategies[name], stories, args.first_seed, args.frames, args.steps, name == "fs_only", args.set
            )
            saved = {"model": model, "rows": [{**a, **b} for a, b in zip(rows, forced)]}
            file.write_text(json.dumps(saved, indent=1))
        results[name] = saved["rows"]
        print(f"{name}: recall_colour {cell([r['recall_colour'] for r in results[name]])}", flush=True)
    recall_n = sum(len(recall_shots(s)) for s in stories)
    lines = report(results, strategies, args, recall_n)
    write_section(args.report, lines, f"seeds {args.first_seed} {args.stories}")
    print(f"wrote {args.report}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
