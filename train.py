"""Train OneStory: `python train.py --config configs/train/NAME.yaml --workdir DIR [key=value ...]`.

The training loop (grain data, optax, orbax checkpoints, shot inflation, L_sel) is not built yet;
this entry point says so plainly instead of failing obscurely.
"""

from __future__ import annotations

import argparse

from onestory_jax.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.parse_args(argv)
    raise UserError("training is not implemented yet in this version of onestory-jax (see docs/design.md)")


if __name__ == "__main__":
    run_cli(main)
