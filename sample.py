"""Render a multi-shot story.

    python sample.py --checkpoint DIR --story FILE --out DIR [key=value ...]
    python sample.py --config tiny --story configs/stories/demo.yaml --out out/demo   # random weights

--checkpoint takes a trained OneStory checkpoint or a converted Wan2.1 one (its OneStory modules
are then initialised as docs/design.md describes, with a warning). --config builds a model from a
preset with random weights. key=value pairs override the model config (e.g. dit.attention=cudnn).
The story file format is in the README. Every shot is saved as soon as it is denoised. Re-running
into the same --out resumes: shots whose inputs (caption, seed, settings, memory, model, earlier
shots) are unchanged are kept, and from the first edited shot on everything is regenerated.
--redo K regenerates shot K and every later shot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onestory_jax.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="model folder (docs/model-folder.md): a trained OneStory, e.g. "
                     "WORKDIR/model, or a converted Wan2.1 release")
    src.add_argument("--config", help="model preset or YAML (random weights), e.g. tiny")
    ap.add_argument("--story", type=Path, required=True, help="story file (.yaml/.yml/.json)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (resumes if it has shots)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's tokenizer/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of random weights with --config")
    ap.add_argument("--redo", type=int, metavar="K", help="regenerate shot K (1-based) and every shot after it")
    ap.add_argument("--allow-random", action="store_true", help="RANDOM weights for parts the model folder lacks "
                    "(tests and benchmarks; without it such a folder is refused)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value model config overrides")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may follow options

    from onestory_jax.locking import folder_lock
    from onestory_jax.sampling.components import load_for_sampling  # heavy imports after arg parsing
    from onestory_jax.config import to_dict
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.feasibility import check_story_fits
    from onestory_jax.sampling.resume import check_not_foreign, model_identity
    from onestory_jax.sampling.story import load_story
    from onestory_jax.sharding import activate

    story = load_story(args.story)
    if args.redo is not None and not 1 <= args.redo <= len(story.shots):
        raise UserError(f"--redo {args.redo}: the story has shots 1..{len(story.shots)}")
    if story.start_image is not None:  # fail fast, before any model is built
        from onestory_jax.data.video import load_image

        load_image(story.start_image)
    with folder_lock(args.out, "--out"):  # one run per --out; also checks it is a writable folder
        check_not_foreign(args.out)
        cfg, params, comps, mesh = load_for_sampling(args.checkpoint, args.config, args.overrides, args.seed, args.tokenizer,
                                                     check=lambda cfg: check_story_fits(story, cfg), allow_random=args.allow_random)
        model_id = model_identity(args.checkpoint, to_dict(cfg), args.seed)
        with activate(mesh):
            manifest = render_story(cfg, params, comps, story, args.out, progress=not args.no_progress, mesh=mesh,
                                    model_id=model_id, redo=args.redo)
    kept = sum(sh["resumed"] for sh in manifest["shots"])
    if kept:
        print(f"kept {kept} unchanged shot(s) from an earlier run; regenerated the rest (manifest.json says why)")
    print(f"wrote {len(manifest['shots'])} shots to {args.out}/ (story.mp4, contact_sheet.png, manifest.json)")
    return 0


if __name__ == "__main__":
    run_cli(main)
