"""Train OneStory: `python train.py --help`, or the installed `onestory-train`.

The command lives in onestory_jax/cli/train.py (the console script's module); this file keeps the
checkout's `python train.py ...` working.
"""

from onestory_jax.cli.train import main, run  # noqa: F401  (tests load this file's main)

if __name__ == "__main__":
    run()
