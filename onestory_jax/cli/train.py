"""Train OneStory (`python train.py ...` in a checkout, `onestory-train ...` when installed).

    python train.py --config configs/train/NAME.yaml --workdir DIR [key=value ...]
    onestory-train --config train/NAME --workdir DIR [key=value ...]   # a preset by name: configs/train/NAME.yaml

Presets: configs/train/tiny.yaml (tests), wan2.1-i2v-14b-480p.yaml (pods),
wan2.1-i2v-14b-480p-single-gpu.yaml (partial finetune); see docs/training.md. The data is a file of
prepared records (train.data=PATH). Re-running with the same --workdir resumes from its latest
checkpoint at the exact data position. --distributed runs jax.distributed.initialize() first
(multi-host: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment,
or a detected cluster: TPU pods, SLURM, Open MPI).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from onestory_jax.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config",
        required=True,
        help="training preset (a name under configs/, e.g. train/tiny) or YAML file, e.g. configs/train/tiny.yaml",
    )
    ap.add_argument("--workdir", required=True, help="checkpoints, metrics.csv and config.yaml go here")
    ap.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    ap.add_argument("--stop-after", type=int, help="end this run after N steps, with a checkpoint")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.data=data/train.arrayrecord")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may follow options
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")

    import jax

    from onestory_jax.config_files import load_config
    from onestory_jax.locking import folder_lock
    from onestory_jax.sharding import initialize_distributed
    from onestory_jax.training.loop import train

    if args.distributed:
        initialize_distributed()
    from onestory_jax.training.vae_stage import train_vae

    cfg = load_config(args.config, args.overrides)
    workdir = Path(args.workdir).absolute()  # orbax writes absolute paths only
    lead = jax.process_index() == 0  # one lock per workdir: process 0 holds it for all processes
    with folder_lock(workdir, "--workdir") if lead else contextlib.nullcontext():
        run = train_vae if cfg.train.stage == "vae" else train
        metrics = run(cfg, workdir, progress=not args.no_progress, stop_after=args.stop_after)
    if metrics:
        print("done: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    else:
        print(f"done: {workdir} had already trained all {cfg.train.steps} steps")
    return 0


def run() -> None:
    """The `onestory-train` console script."""
    run_cli(main)


if __name__ == "__main__":
    run()
