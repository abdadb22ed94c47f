"""Render a multi-shot story (`python sample.py ...` in a checkout, `onestory-sample ...` when installed).

    python sample.py --checkpoint DIR --story FILE --out DIR [key=value ...]
    python sample.py --config tiny --story configs/stories/demo.yaml --out out/demo   # random weights
    onestory-sample --checkpoint demo --story demo --out out/demo   # the shipped demo model and story

--checkpoint takes a model folder: a trained OneStory or a converted Wan2.1 release (its OneStory
modules are then initialised as docs/design.md describes, with a note). --config builds a model from a
preset with random weights. `--checkpoint demo` and `--story demo` name the embedded default model
(models/demo) and its story (configs/stories/demo.yaml), shipped with the package, when no such path
exists; a --story NAME is any configs/stories/NAME.yaml. key=value pairs override the model config
(e.g. dit_runtime.attention=cudnn).
The story file format is in the README. Every shot is saved as soon as it is denoised. Re-running
into the same --out resumes: shots whose inputs (caption, seed, settings, memory, model, earlier
shots) are unchanged are kept, and from the first edited shot on everything is regenerated.
--lora FILE[:SCALE] merges a community Wan2.1 LoRA into the DiT (repeatable; docs/sampling.md).
--redo K re-rolls shot K (a new seed, recorded; it stays until the shot is edited) and regenerates
every later shot; --redo K --same-seed repeats shot K. A story's missing size, frames and fps are the
model's (the size it was trained at). Before loading, the plan is printed with estimates of memory
and time. Compiled programs are cached on disk ($ONESTORY_CACHE/jax, default ~/.cache/onestory_jax/jax).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from onestory_jax.errors import UserError, run_cli

if TYPE_CHECKING:
    from onestory_jax.sampling.story import LoraFile, Story

STORY_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_story(path: Path) -> Path:
    """A --story argument as a path: itself if it exists, else a shipped story's name (`demo`:
    configs/stories/demo.yaml, in the checkout or the installed package), else itself (reported missing later)."""
    from onestory_jax.config_files import CONFIG_DIR

    shipped = CONFIG_DIR / "stories" / f"{path}.yaml"
    return shipped if not path.exists() and len(path.parts) == 1 and not path.suffix and shipped.is_file() else path


def checkpoint_path(path: Path) -> Path:
    """A --checkpoint argument as a path: `demo`, when no such folder exists, is the shipped embedded default
    (models/demo in the checkout, or its copy in the installed package)."""
    from onestory_jax.config_files import DEMO_MODEL

    return DEMO_MODEL if path == Path("demo") and not path.exists() else path


def story_files(paths: list[Path]) -> list[Path]:
    """Story files of --story arguments: files as given, folders as their sorted .yaml/.yml/.json files,
    shipped stories by name (`shipped_story`)."""
    files: list[Path] = []
    for path in map(shipped_story, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in STORY_SUFFIXES)
            if not found:
                raise UserError(f"--story folder '{path}' holds no story files ({', '.join(STORY_SUFFIXES)})")
            files += found
        else:
            files.append(path)
    stems = [f.stem for f in files]
    if len(files) > 1 and len(set(stems)) < len(stems):
        raise UserError(f"two stories named '{next(s for s in stems if stems.count(s) > 1)}': each renders into --out/NAME")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        type=Path,
        help="model folder (docs/model-folder.md): a trained OneStory, e.g. "
        "WORKDIR/model, or a converted Wan2.1 release; `demo`: the shipped embedded default model",
    )
    src.add_argument("--config", help="model preset or YAML (random weights), e.g. tiny")
    ap.add_argument(
        "--story",
        type=Path,
        required=True,
        action="append",
        help="story file (.yaml/.yml/.json, ours or ST-Bench's) or a shipped story's name (demo); repeat it, "
        "or give a folder, for several stories in one run (one model load), each into --out/NAME",
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory (resumes if it has shots)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's tokenizer/)")
    ap.add_argument("--seed", type=int, help="seed of the random weights of --config (a story's seeds are in the story)")
    ap.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a Wan2.1 LoRA (diffusers, kohya or original/ComfyUI keys) merged into the DiT at load, times SCALE "
        "(default 1); repeatable, and added to the story's settings.lora (docs/sampling.md)",
    )
    ap.add_argument(
        "--redo", type=int, metavar="K", help="re-roll shot K (1-based) with a new seed, and regenerate every shot after it"
    )
    ap.add_argument("--same-seed", action="store_true", help="with --redo: regenerate shot K with the seed it had")
    ap.add_argument(
        "--allow-random",
        action="store_true",
        help="RANDOM weights for parts the model folder lacks (tests and benchmarks; without it such a folder is refused)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value model config overrides")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may follow options
    if args.checkpoint is not None:
        args.checkpoint = checkpoint_path(args.checkpoint)
    if args.seed is not None and args.checkpoint is not None:
        raise UserError(
            "--seed seeds the random weights of --config; a checkpoint's stories take their seeds from the "
            "story file (settings.seed, shots[i].seed), and --redo K re-rolls shot K"
        )
    if args.same_seed and args.redo is None:
        raise UserError("--same-seed goes with --redo K")

    from onestory_jax.sampling.session import enable_compilation_cache  # heavy imports after arg parsing

    enable_compilation_cache()
    from onestory_jax.config_files import to_dict
    from onestory_jax.convert.lora_formats import apply_loras, read_loras
    from onestory_jax.locking import folder_lock
    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.feasibility import check_story_fits, plan
    from onestory_jax.sampling.resume import check_not_foreign, model_identity
    from onestory_jax.sampling.session import SamplingModel, render_into
    from onestory_jax.sampling.story import SEED_LIMIT, load_story, lora_from_arg
    from onestory_jax.sharding import activate

    files = story_files(args.story)
    stories = [load_story(f) for f in files]
    outs = [args.out] if len(files) == 1 else [args.out / f.stem for f in files]
    loras = run_loras([lora_from_arg(a) for a in args.lora], stories)
    for story, file in zip(stories, files):
        if args.redo is not None and not 1 <= args.redo <= len(story.shots):
            raise UserError(f"--redo {args.redo}: {file.name} has shots 1..{len(story.shots)}")
        if story.start_image is not None:  # fail fast, before any model is built
            from onestory_jax.data.video import load_image

            load_image(story.start_image)

    lora_deltas = {}

    def check(cfg) -> None:
        for story in stories:
            check_story_fits(story, cfg)
            print(plan(story, cfg), flush=True)
        if loras:  # a LoRA that does not fit the model is refused before any weight is loaded
            lora_deltas.update(read_loras(loras, cfg.dit, cfg.dit_runtime))

    with contextlib.ExitStack() as locks:
        for out in outs:  # one run per --out; also checks it is a writable folder
            locks.enter_context(folder_lock(out, "--out"))
            check_not_foreign(out)
        cfg, params, comps, mesh = load_for_sampling(
            args.checkpoint,
            args.config,
            args.overrides,
            args.seed or 0,
            args.tokenizer,
            check=check,
            allow_random=args.allow_random,
        )
        if loras:  # merged before anything is compiled
            print(f"merging {len(loras)} LoRA(s) into the DiT: {', '.join(f'{p} x{s:g}' for p, s in loras)}", flush=True)
            with activate(mesh):
                params = {**params, "dit": apply_loras(params["dit"], lora_deltas)}
        model = SamplingModel(
            cfg, params, comps, mesh, model_identity(args.checkpoint, to_dict(cfg), args.seed or 0, args.tokenizer, loras)
        )
        for story, out in zip(stories, outs):
            seed = None
            if args.redo is not None and not args.same_seed:
                seed = secrets.randbelow(SEED_LIMIT)
                print(f"re-rolling shot {args.redo} with seed {seed} (--same-seed would have kept its seed)")
            # the locks are held above; re-rolls made earlier in `out` stay until their shot is edited
            manifest = render_into(model, story, out, args.redo, seed, progress=not args.no_progress, lock=False)
            kept = sum(sh["resumed"] for sh in manifest["shots"])
            if kept:
                print(f"kept {kept} unchanged shot(s) from an earlier run; regenerated the rest (manifest.json says why)")
            print(f"wrote {len(manifest['shots'])} shots to {out}/ (story.mp4, contact_sheet.png, manifest.json)")
    return 0


def run_loras(cli: list[LoraFile], stories: list[Story]) -> tuple[LoraFile, ...]:
    """The LoRAs of a run: --lora's, then the stories' settings.lora (the same in every story: the model is
    loaded once)."""
    in_stories = {story.settings.lora for story in stories}
    if len(in_stories) > 1:
        raise UserError(
            "the stories of one run have different settings.lora (LoRAs are merged into the one model the "
            "run loads): render them in separate runs"
        )
    return (*cli, *in_stories.pop())


def run() -> None:
    """The `onestory-sample` console script."""
    run_cli(main)


if __name__ == "__main__":
    run()
