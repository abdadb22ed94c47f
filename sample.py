"""Render a multi-shot story: `python sample.py --help`, or the installed `onestory-sample`.

The command lives in onestory_jax/cli/sample.py (the console script's module); this file keeps the
checkout's `python sample.py ...` working.
"""

from onestory_jax.cli.sample import main, run, run_loras, story_files  # noqa: F401  (tests load this file's main)

if __name__ == "__main__":
    run()
