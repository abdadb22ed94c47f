"""The one training loop, for every stage (OneStory here, the demo VAE in vae_stage.py): sharded
state, grain data, async orbax checkpoints (state + data position).

Re-running with the same workdir resumes from the latest checkpoint at the exact data position.
A NaN/inf loss or state stops the run without saving: every step to be saved (or exported) is
checked first, so the latest checkpoint is always a finite one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml

from onestory_jax.checkpoint import (
    check_stored_tree,
    load_params,
    non_finite_leaves,
    pytree_handler,
    quiet_failed_reads,
    restore_args,
    save_model,
    unreadable_checkpoint,
)
from onestory_jax.config import DIT_ADAPTER_FIELDS, Config, DiTConfig, MeshConfig
from onestory_jax.config_files import load_config, to_dict
from onestory_jax.data.pipeline import make_dataset
from onestory_jax.errors import UserError
from onestory_jax.io import require_free_space
from onestory_jax.models import folder as model_folder
from onestory_jax.models import lora, onestory
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.models.flops import noise_tokens, train_step_flops
from onestory_jax.models.folder import check_folder, copy_parts, read_onestory, required_parts
from onestory_jax.sharding import abstract_params, activate, batch_sharding, init_sharded, make_mesh
from onestory_jax.training.losses import loss_at_sigmas, loss_fn
from onestory_jax.training.metrics import TrainMonitor
from onestory_jax.training.optim import trainable_mask
from onestory_jax.training.step import LossFn, TrainState, jit_train_step, make_state

VAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # validation timestep buckets (sigma at each bucket's centre)
VAL_SEED_OFFSET = 7919  # the validation iterator and noise use train.seed + this


def _host_dataset(cfg: Config) -> grain.IterDataset:
    """This process's share of the global batch."""
    return make_dataset(cfg, cfg.train.batch_size // jax.process_count(), jax.process_index(), jax.process_count())


def global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local batch rows -> one global array per key, split over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def _check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    if batch_size % jax.process_count():
        raise UserError(f"train.batch_size={batch_size} is not divisible by {jax.process_count()} processes")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise UserError(f"train.batch_size={batch_size} is not divisible by data x fsdp = {shards} batch shards")


def _manager(workdir: Path, cfg: Config) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a run killed mid-save leaves a '<step>.orbax-checkpoint-tmp-*' folder;
    # orbax never lists it as a step, and this removes it when the next run starts.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.train.keep_checkpoints, enable_async_checkpointing=True, cleanup_tmp_directories=True
    )
    handlers = {"state": pytree_handler(), "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(workdir / "checkpoints", options=options, item_handlers=handlers)


def _restore(manager: ocp.CheckpointManager, state: TrainState, data_iter: Any) -> TrainState:
    step = manager.latest_step()
    quiet_failed_reads()  # a failed read must end in our one error line, not orbax's leftover tracebacks
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    check_stored_tree(Path(manager.directory) / str(step) / "state", abstract)  # names mismatches before any read
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=restore_args(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint at step {step} does not fit this config: {str(e).splitlines()[0]}") from None
    except Exception as e:  # tensorstore reports a truncated or damaged data file as a bare Exception
        raise unreadable_checkpoint(Path(manager.directory) / str(step), e) from None
    return restored["state"]


def pretrained_params(
    folder: Path,
    part: str,
    section: str,
    same: Callable[[Config], bool],
    boxed_init: Callable[[Config], Callable[..., Any]],
    mesh: jax.sharding.Mesh,
) -> Any:
    """The params of a model folder's `part` checkpoint (train.init_from), sharded on `mesh`; refused
    unless its config passes `same` (it describes the model of this config's `section`).
    `boxed_init(source config)` defines the stored tree."""
    ckpt = folder / part
    if not (ckpt / "config.yaml").is_file():
        raise UserError(f"train.init_from: '{folder}' is not a model folder with {part}/config.yaml")
    source = load_config(str(ckpt / "config.yaml"))
    if not same(source):
        raise UserError(f"train.init_from: the {section} of '{folder}' differs from this config's {section} section")
    return load_params(ckpt, mesh, boxed_init(source))


FROM_SCRATCH_LIMIT = 10**9  # DiT parameters above which a run without train.init_from must say train.from_scratch


def _check_init(cfg: Config) -> None:
    """Refuse a Wan-sized DiT from random init unless asked: OneStory is a fine-tune of Wan2.1-I2V."""
    tc = cfg.train
    if tc.init_from or tc.from_scratch:
        return
    n = sum(a.size for a in jax.tree.leaves(jax.eval_shape(dit_init_fn(cfg.dit, cfg.dit_runtime), jax.random.key(0))))
    if n >= FROM_SCRATCH_LIMIT:
        raise UserError(
            f"train.init_from is empty: this {n / 1e9:.1f}B-parameter DiT would train from random init; convert "
            "Wan2.1-I2V with `python -m onestory_jax.convert --component all --source W --out M` and set "
            "train.init_from=M (docs/training.md), or set train.from_scratch=true"
        )


def _adapt_lora(dit: Any, source: DiTConfig, target: Config, mesh: jax.sharding.Mesh, rng: jax.Array) -> Any:
    """A pretrained DiT's params for this config's LoRA: a source LoRA of other settings is folded into
    the kernels; a fresh LoRA (B = 0) is added where this config asks for one and the DiT has none."""
    adapter = lambda c: tuple(getattr(c, f) for f in DIT_ADAPTER_FIELDS)
    if source.lora_rank and adapter(source) != adapter(target.dit):
        dit, _ = lora.merge(dit, source)
    if target.dit.lora_rank and not lora.has_lora(dit):
        dit = lora.with_fresh_lora(dit, target.dit, target.dit_runtime, mesh, rng)
    return dit


def _pretrained_onestory(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The params of train.init_from (a model folder): its DiT, with this config's LoRA, and its memory
    modules carried over as `onestory.memory_params` says (started from the DiT when it has none)."""
    rng = jax.random.key(cfg.train.seed + 1)
    folder = Path(cfg.train.init_from)
    try:
        check_folder(folder)
        source, params = read_onestory(folder, cfg, mesh)
    except UserError as e:
        raise UserError(f"train.init_from: {e}") from None
    stored = params.pop("memory", None)
    dit = _adapt_lora(params["dit"], source.dit, cfg, mesh, jax.random.fold_in(rng, 1))
    return {"dit": dit, "memory": onestory.memory_params(cfg, dit, rng, None if stored is None else (source, stored))}


def _export_params(state: TrainState) -> Any:
    """The weights train.py exports (and validates): the EMA if enabled, else the params."""
    return state.ema if state.ema is not None else state.params


class Validator:
    """L_shot at the fixed sigmas `VAL_SIGMAS` on `train.val_batches` batches drawn once at the start
    from an iterator with its own seed (the same records, other shuffle and augmentations), with
    fixed noise and no dropout: successive evaluations differ only by the weights."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        seed = cfg.train.seed + VAL_SEED_OFFSET
        data = iter(_host_dataset(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))))
        self.batches = [global_batch(next(data), mesh) for _ in range(cfg.train.val_batches)]
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def losses(params: Any, batch: dict[str, jax.Array], index: jax.Array) -> jax.Array:
            """[2, sigmas]: with the memory context, and with it masked (same noise)."""
            rng = jax.random.fold_in(jax.random.key(seed), index)
            sigmas = jnp.asarray(VAL_SIGMAS, jnp.float32)
            return jnp.stack([loss_at_sigmas(params, batch, sigmas, rng, cfg, keep) for keep in (True, False)])

        self._losses = jax.jit(losses, out_shardings=replicated)

    def __call__(self, params: Any) -> tuple[dict[float, float], dict[float, float]]:
        """Mean loss per sigma bucket over the held-out batches: (with context, context masked)."""
        per_batch = [np.asarray(self._losses(params, b, np.int32(i))) for i, b in enumerate(self.batches)]
        with_context, no_context = np.mean(per_batch, axis=0).tolist()
        return dict(zip(VAL_SIGMAS, with_context)), dict(zip(VAL_SIGMAS, no_context))


def _due(step: int, every: int, end: int) -> bool:
    """Whether 1-based `step` is on the interval `every` (0 = never) or the last step `end`."""
    return every > 0 and (step % every == 0 or step == end)


def _check_finite(step: int, metrics: dict[str, float], state: TrainState | None, manager: ocp.CheckpointManager) -> None:
    """Stop with one line if the step's metrics, or the state (when given), hold a NaN or Inf."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    what = f"loss at step {step} ({', '.join(f'{k} {metrics[k]}' for k in bad)})" if bad else ""
    if not bad and state is not None and (leaves := non_finite_leaves(state)):
        what = f"state after step {step} ({len(leaves)} arrays, e.g. {leaves[0]})"
    if what:
        last = manager.latest_step()
        raise UserError(
            f"non-finite {what}; stopped without saving it: "
            + (
                f"the last good checkpoint is step {last} in {manager.directory}"
                if last is not None
                else "no checkpoint was saved"
            )
        )


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a training stage gives the one loop, `train`; the rest (mesh, resume at the exact data
    position, NaN checks, async checkpoints, logging, validation) is shared."""

    init: Callable[[Config], Callable[[jax.Array], Any]]  # rng -> boxed fresh params: their values and layout
    pretrained: Callable[[Config, jax.sharding.Mesh], Any]  # the params of train.init_from (laid out as `init`'s)
    dataset: Callable[[Config], grain.IterDataset]  # this host's batches {name: array}
    objective: LossFn
    cost: Callable[
        [Config, Any], Callable[[dict[str, tuple[int, ...]]], tuple[int, float]]
    ]  # params -> (shapes -> (tokens, FLOPs))
    export: Callable[[Config, Any, Path, jax.sharding.Mesh], None]  # final weights -> workdir/model
    validates: bool = False  # `train.val_every` applies (the Validator reads OneStory batches)
    check: Callable[[Config], None] = lambda cfg: None  # refuses a config before any data or weights are read


def _onestory_cost(cfg: Config, params: Any) -> Callable[[dict[str, tuple[int, ...]]], tuple[int, float]]:
    dit_trains = any(jax.tree.leaves(trainable_mask(params, cfg.train.trainable)["dit"]))
    return lambda shapes: (
        shapes["target"][0] * noise_tokens(cfg.dit, shapes["target"]),
        train_step_flops(cfg, shapes, dit_trains),
    )


def data_manifest(cfg: Config) -> dict[str, Any]:
    """The manifest.json beside train.data's records (data.prepare writes it), or {} when there is none."""
    try:
        manifest = json.loads((Path(cfg.train.data).parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def frozen_source(manifest: dict[str, Any], cfg: Config) -> Path | None:
    """The model folder whose frozen parts encoded the records (the manifest's `model`), if it has them."""
    folder = Path(str(manifest.get("model", "")))
    parts = [p for p in required_parts(cfg) if p != model_folder.ONESTORY]
    return folder if manifest.get("model") and all((folder / p).is_dir() for p in parts) else None


def trained_size(manifest: dict[str, Any], cfg: Config) -> Config:
    """`cfg` whose sampler's default shot size is the records' (a story without settings renders at it)."""
    try:
        (width, height), frames = manifest["size"], int(manifest["frames"])
    except (KeyError, TypeError, ValueError):
        return cfg
    return dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, width=int(width), height=int(height), frames=frames))


def _export_onestory(cfg: Config, params: Any, workdir: Path, mesh: jax.sharding.Mesh) -> None:
    """workdir/model: the trained onestory/ (its sampler's default shot size: the records') and the frozen
    parts the records were prepared with, so that `sample.py --checkpoint workdir/model` works as is."""
    out, manifest = workdir / "model", data_manifest(cfg)
    cfg = trained_size(manifest, cfg)
    if cfg.dit.lora_rank and cfg.train.merge_lora:
        dit, dit_cfg = lora.merge(params["dit"], cfg.dit)
        params, cfg = {**params, "dit": dit}, dataclasses.replace(cfg, dit=dit_cfg)
    # The training mesh is this run's: the model samples on whatever devices its user has.
    save_model(out / model_folder.ONESTORY, params, dataclasses.replace(cfg, mesh=MeshConfig()), force=True)
    if jax.process_index() == 0 and (source := frozen_source(manifest, cfg)) is not None:
        copy_parts(source, out, [p for p in required_parts(cfg) if p != model_folder.ONESTORY])


ONESTORY = Stage(
    onestory.init_fn,
    _pretrained_onestory,
    _host_dataset,
    loss_fn,
    _onestory_cost,
    _export_onestory,
    validates=True,
    check=_check_init,
)


def initial_state(
    cfg: Config, mesh: jax.sharding.Mesh, stage: Stage = ONESTORY, abstract: bool = False
) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """(state at step 0, its shardings, optimizer) of `stage` on `mesh`, as `train` starts: the params of
    train.init_from, else `stage.init`'s from key train.seed, both laid out as `stage.init` lays them out.
    abstract: the same state as ShapeDtypeStructs, nothing read or allocated (the AOT memory analysis).
    Runs inside `activate(mesh)`."""
    init, rng = stage.init(cfg), jax.random.key(cfg.train.seed)
    if abstract:
        params = abstract_params(init, mesh, rng)
    elif cfg.train.init_from:
        layout = jax.tree.map(lambda a: a.sharding, abstract_params(init, mesh, rng))
        params = jax.device_put(stage.pretrained(cfg, mesh), layout)
    else:
        params = init_sharded(init, mesh, rng)
    return make_state(cfg, params, mesh)


def train(
    cfg: Config, workdir: str | Path, progress: bool = True, stop_after: int | None = None, stage: Stage = ONESTORY
) -> dict[str, float]:
    """Train `stage` (default: OneStory) to `cfg.train.steps`, resuming if `workdir` has checkpoints;
    returns the last metrics. At the last step the stage exports its model into workdir/model.

    stop_after: end this run after that many steps, with a checkpoint (time-sliced jobs).
    """
    stage.check(cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    mesh = make_mesh(cfg.mesh)
    _check_batch_size(tc.batch_size, mesh)
    lead = jax.process_index() == 0
    data_iter = iter(stage.dataset(cfg))
    with activate(mesh):
        state, shardings, tx = initial_state(cfg, mesh, stage)
        manager = _manager(workdir, cfg)
        if manager.latest_step() is not None:
            state = _restore(manager, state, data_iter)
        if lead:  # the workdir's config.yaml describes its checkpoints: written once this config fits them
            require_free_space(workdir, sum(a.nbytes for a in jax.tree.leaves(state)), "a checkpoint of the train state")
            (workdir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        start = int(state.step)
        end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
        cost = stage.cost(cfg, state.params)
        monitor = TrainMonitor(cfg, workdir, start, progress=progress and lead, write=lead)
        validator = Validator(cfg, mesh) if stage.validates and tc.val_every > 0 else None
        step_fn, metrics = None, {}
        try:
            for step in range(start, end):
                batch = global_batch(next(data_iter), mesh)
                if step_fn is None:  # the batch's shardings are known once one is read
                    step_fn = jit_train_step(cfg, tx, shardings, jax.tree.map(lambda a: a.sharding, batch), stage.objective)
                state, m = step_fn(state, batch)
                monitor.count(*cost({k: v.shape for k, v in batch.items()}))
                log, save = _due(step + 1, tc.log_every, end), _due(step + 1, tc.checkpoint_every, end)
                kept = save or step + 1 == tc.steps  # saved, or exported as the model
                if log or kept:  # nothing non-finite is logged as fine, saved or exported
                    values = {k: float(v) for k, v in m.items()}
                    _check_finite(step + 1, values, state if kept else None, manager)
                    if log:
                        metrics = values
                        monitor.log(step + 1, metrics)
                if validator is not None and _due(step + 1, tc.val_every, tc.steps):
                    with monitor.paused():
                        monitor.log_validation(step + 1, *validator(_export_params(state)))
                if save:
                    manager.save(
                        step + 1,
                        args=ocp.args.Composite(
                            state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data_iter)
                        ),
                    )
        finally:
            monitor.close()
            manager.wait_until_finished()
            manager.close()
        if int(state.step) == tc.steps:
            stage.export(cfg, _export_params(state), workdir, mesh)
    return metrics
