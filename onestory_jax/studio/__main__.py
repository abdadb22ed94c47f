"""OneStory studio: write or open a story, render it with live per-shot progress, inspect and steer each
shot's memory (pin, exclude, regenerate, re-roll), download the videos (docs/studio.md).

    python -m onestory_jax.studio --checkpoint models/demo [--out out/studio] [--port 7860]

The model is loaded once. The story is saved as OUT/story.yaml and rendered into OUT exactly as
`python sample.py --checkpoint M --story OUT/story.yaml --out OUT` would (same files, same resume), so
either can continue the other's work. Needs the `studio` extra: pip install -e '.[studio,video]'.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from onestory_jax.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m onestory_jax.studio", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="model folder (docs/model-folder.md), e.g. models/demo")
    src.add_argument("--config", help="model preset or YAML with RANDOM weights (tests), e.g. tiny")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("out/studio"),
        help="run folder: story.yaml, references/, the "
        "shots and manifest.json (default out/studio; an earlier session's story and results are reopened)",
    )
    ap.add_argument("--story", type=Path, help="story file to open at start (default: OUT/story.yaml if there)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's tokenizer/)")
    ap.add_argument("--allow-random", action="store_true", help="RANDOM weights for parts the model folder lacks")
    ap.add_argument("overrides", nargs="*", help="key=value model config overrides")
    args = ap.parse_intermixed_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the studio needs Gradio: pip install -e '.[studio,video]'") from None

    from onestory_jax.sampling.resume import check_not_foreign
    from onestory_jax.studio import story_edit

    args.out.mkdir(parents=True, exist_ok=True)
    check_not_foreign(args.out)  # before loading: a folder of someone else's files is refused at once
    story_file = args.story or (args.out / "story.yaml")
    initial = story_edit.empty_story()
    if args.story is not None or story_file.is_file():
        if not story_file.is_file():
            raise UserError(f"story file '{story_file}' does not exist")
        initial = story_edit.absolute_paths(
            story_edit.read_story_text(story_file.read_text(), story_file.name), story_file.parent
        )

    from onestory_jax.sampling.session import open_model
    from onestory_jax.studio.app import build, launch
    from onestory_jax.studio.engine import Studio

    model = open_model(args.checkpoint, args.config, args.overrides, 0, args.tokenizer, args.allow_random)
    studio = Studio(model, args.out)
    if args.story is not None:  # the opened story becomes the studio's (OUT/story.yaml)
        studio.write_story(initial)
    print(f"studio: run folder {args.out}, story file {studio.story_file}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop by `kill` cleans up too (the previews)
    launch(build(studio, initial), studio, args.host, args.port)
    return 0


if __name__ == "__main__":
    run_cli(main)
