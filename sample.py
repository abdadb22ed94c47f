"""Render a multi-shot story.

    python sample.py --checkpoint DIR --story FILE --out DIR [key=value ...]
    python sample.py --config tiny --story configs/stories/demo.yaml --out out/demo   # random weights

--checkpoint takes a trained OneStory checkpoint or a converted Wan2.1 one (its OneStory modules
are then initialised as docs/design.md describes, with a warning). --config builds a model from a
preset with random weights. key=value pairs override the model config (e.g. dit.attention=cudnn).
The story file format is in the README. Re-running into the same --out resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onestory_jax.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="OneStory or converted Wan2.1 checkpoint directory")
    src.add_argument("--config", help="model preset or YAML (random weights), e.g. tiny")
    ap.add_argument("--story", type=Path, required=True, help="story file (.yaml/.yml/.json)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (resumes if it has shots)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's tokenizer/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of random weights with --config")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value model config overrides")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may follow options

    from onestory_jax.locking import folder_lock
    from onestory_jax.sampling.components import load_for_sampling  # heavy imports after arg parsing
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.story import load_story
    from onestory_jax.sharding import activate

    story = load_story(args.story)
    if story.start_image is not None:  # fail fast, before any model is built
        from onestory_jax.models.image_encoder import load_image

        load_image(story.start_image)
    with folder_lock(args.out, "--out"):  # one run per --out; also checks it is a writable folder
        cfg, params, comps, mesh = load_for_sampling(args.checkpoint, args.config, args.overrides, args.seed, args.tokenizer)
        with activate(mesh):
            manifest = render_story(cfg, params, comps, story, args.out, progress=not args.no_progress, mesh=mesh)
    print(f"wrote {len(manifest['shots'])} shots to {args.out}/ (story.mp4, contact_sheet.png, manifest.json)")
    return 0


if __name__ == "__main__":
    run_cli(main)
