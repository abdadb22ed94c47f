"""The training loop: sharded state, grain data, async orbax checkpoints (state + data position).

Re-running with the same workdir resumes from the latest checkpoint at the exact data position.
A NaN/inf loss stops the run without saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from tqdm import tqdm

from onestory_jax.checkpoint import check_stored_tree, quiet_failed_reads, save_model
from onestory_jax.config import Config, to_dict
from onestory_jax.data.pipeline import make_dataset
from onestory_jax.errors import UserError
from onestory_jax.models.onestory import boxed_init_fn, memory_params_from_dit
from onestory_jax.sharding import activate, batch_sharding, init_sharded, make_mesh
from onestory_jax.training.optim import learning_rate_schedule, make_optimizer
from onestory_jax.training.step import TrainState, init_state, make_train_step


def _global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local batch rows -> one global array per key, split over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def _manager(workdir: Path, cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options, item_names=("state", "data"))


def _restore(manager: ocp.CheckpointManager, state: TrainState, data_iter: Any) -> TrainState:
    step = manager.latest_step()
    quiet_failed_reads()  # a failed read must end in our one error line, not orbax's leftover tracebacks
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    check_stored_tree(Path(manager.directory) / str(step) / "state", abstract)  # names mismatches before any read
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint at step {step} does not fit this config: {str(e).splitlines()[0]}") from None
    return restored["state"]


def train(cfg: Config, workdir: str | Path, progress: bool = True, stop_after: int | None = None) -> dict[str, float]:
    """Train to `cfg.train.steps` (resuming if `workdir` has checkpoints); returns the last metrics.

    stop_after: end this run after that many steps, with a checkpoint (time-sliced jobs).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if tc.batch_size % jax.process_count():
        raise UserError(f"train.batch_size={tc.batch_size} is not divisible by {jax.process_count()} processes")
    mesh = make_mesh(cfg.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % shards:
        raise UserError(f"train.batch_size={tc.batch_size} is not divisible by data x fsdp = {shards} batch shards")
    if jax.process_index() == 0:
        (workdir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    data_iter = iter(make_dataset(cfg, tc.batch_size // jax.process_count(), jax.process_index(), jax.process_count()))
    with activate(mesh):
        params = init_sharded(boxed_init_fn(cfg), mesh, jax.random.key(tc.seed))
        params["memory"] = memory_params_from_dit(cfg, params["dit"], jax.random.key(tc.seed + 1))
        tx = make_optimizer(tc, params)
        state = init_state(params, tx, tc.seed, ema=tc.ema_decay > 0)
        manager = _manager(workdir, cfg)
        if manager.latest_step() is not None:
            state = _restore(manager, state, data_iter)
        # Pinned shardings: the state keeps one layout across steps and restarts, so a resumed run
        # executes the very same program as an uninterrupted one (bitwise-equal results on CPU).
        state_shardings = jax.tree.map(lambda a: a.sharding, state)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step_fn = None
        lr = learning_rate_schedule(tc)
        start = int(state.step)
        end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
        metrics: dict[str, float] = {}
        log = (workdir / "metrics.csv").open("a", newline="")
        writer = csv.writer(log)
        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not progress)
        t_last, tokens = time.perf_counter(), 0
        try:
            for step in range(start, end):
                batch = next(data_iter)
                tokens += int(np.prod(batch["target"].shape[:2])) * (batch["target"].shape[2] // 2) * (batch["target"].shape[3] // 2)
                global_batch = _global_batch(batch, mesh)
                if step_fn is None:
                    batch_shardings = jax.tree.map(lambda a: a.sharding, global_batch)
                    step_fn = jax.jit(make_train_step(cfg, tx), donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
                                      out_shardings=(state_shardings, replicated))
                state, m = step_fn(state, global_batch)
                if (step + 1) % tc.log_every == 0 or step + 1 == end:
                    metrics = {k: float(v) for k, v in m.items()}
                    if not all(math.isfinite(v) for v in metrics.values()):
                        raise UserError(f"non-finite loss at step {step + 1} ({metrics}); stopped without saving: the "
                                        f"last good checkpoint is step {manager.latest_step()} in {workdir / 'checkpoints'}")
                    dt = time.perf_counter() - t_last
                    rate = tc.log_every / dt if dt > 0 else float("nan")
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", l_sel=f"{metrics['l_sel']:.4f}",
                                    gnorm=f"{metrics['grad_norm']:.3f}", lr=f"{float(lr(step)):.2e}",
                                    tok_s=f"{tokens / dt:.0f}" if dt > 0 else "-", step_s=f"{rate:.2f}")
                    if jax.process_index() == 0:
                        writer.writerow([step + 1, time.time(), *(f"{metrics[k]:.6g}" for k in sorted(metrics))])
                        log.flush()
                    t_last, tokens = time.perf_counter(), 0
                bar.update(1)
                if (step + 1) % tc.checkpoint_every == 0 or step + 1 == end:
                    manager.save(step + 1, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)))
        finally:
            bar.close()
            log.close()
            manager.wait_until_finished()
            manager.close()
        if int(state.step) == tc.steps and jax.process_count() == 1:
            export = state.ema if state.ema is not None else state.params
            save_model(workdir / "model" / "onestory", export, cfg, force=True)
    return metrics
