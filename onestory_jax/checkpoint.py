"""Model checkpoints: an orbax (tensorstore) param tree under `params/` plus the `config.yaml` it needs.

Writes are atomic: everything goes into a hidden sibling folder that is renamed onto the target at
the end, so an interrupted or failed save leaves nothing that looks like a checkpoint. Restores go
straight into the shardings of a mesh (any mesh: the arrays are stored unsharded).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from onestory_jax.config import Config
from onestory_jax.config_files import from_dict, to_dict
from onestory_jax.errors import UserError
from onestory_jax.io import require_free_space, require_writable
from onestory_jax.sharding import abstract_params

PARAMS, CONFIG = "params", "config.yaml"

# Orbax saves a replicated array "replica-parallel" by default (not on GPUs): each replica writes one slice of
# it, which takes a sliced copy and a compiled slice program per (shape, device). That pays for large arrays on
# many hosts; for small slices it costs more than it saves (a tiny train.py run on 8 CPU devices: 32 s instead
# of 49 s cold, 15-17 s instead of 21-23 s warm; docs/performance.md). Smaller slices: one replica writes.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, saving replica-parallel only slices of at least `MIN_REPLICA_SLICE_BYTES`."""
    scalars = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        *((t, scalars) for t in (int, float, np.number)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
    """`pytree_handler`'s restore of `abstract` (ShapeDtypeStructs with shardings)."""
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty `out_dir` unless `force` and it holds a checkpoint and nothing
    else (what `save_model` writes: `config.yaml`, `params/`), or one whose parent cannot be written;
    returns it as an absolute Path."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        raise UserError(f"output '{out}' exists and is not empty (pass --force to replace it)")
    others = [name for name in held if name not in (CONFIG, PARAMS)]
    if others:  # --force replaces a checkpoint, never a model folder or the user's files
        shown = ", ".join(others[:5]) + (f", ... ({len(others)} in all)" if len(others) > 5 else "")
        raise UserError(
            f"output '{out}' holds more than a checkpoint ({shown}): --force replaces only a folder "
            f"holding {CONFIG} and {PARAMS}/; pick another --out"
        )
    require_writable(out.parent, "the output's parent folder")
    return out


def save_model(out_dir: str | Path, params: Any, config: Config, force: bool = False) -> Path:
    """Write `params` (numpy or jax arrays) and `config` to `out_dir` atomically; returns the folder.

    Multi-process: every process calls it (the orbax save is collective); process 0 alone writes
    the config and moves the folders, after a barrier that follows the save.
    """
    out = check_out_dir(out_dir, force)
    require_free_space(out.parent, sum(a.nbytes for a in jax.tree.leaves(params)), f"checkpoint '{out}'")
    lead = jax.process_index() == 0
    tag = _shared_pid()
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    barrier = _barrier_names("save_model")
    try:
        if lead:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / CONFIG).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        _sync(next(barrier))
        with ocp.Checkpointer(pytree_handler()) as ckptr:
            ckptr.save(tmp / PARAMS, args=ocp.args.PyTreeSave(params))
        _sync(next(barrier))
        if lead:
            if out.is_dir() and any(out.iterdir()):  # --force: move the old one aside, drop it once replaced
                out.rename(old)
            tmp.replace(out)
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not out.exists():
                old.rename(out)
        raise
    if lead:
        shutil.rmtree(old, ignore_errors=True)
    _sync(next(barrier))  # nobody returns before the folder is in place
    return out


_barrier_counter = itertools.count()


def _barrier_names(prefix: str) -> Iterator[str]:
    """Unique barrier names for one call (every process makes the same calls in the same order)."""
    call = next(_barrier_counter)
    return (f"onestory_{prefix}_{call}_{i}" for i in itertools.count())


def _sync(name: str) -> None:
    """Wait for all processes (nothing to do with one)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


def _shared_pid() -> int:
    """Process 0's pid, known to every process (names the temporary folders of a save)."""
    if jax.process_count() == 1:
        return os.getpid()
    return int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))


def _require_checkpoint(ckpt_dir: str | Path) -> Path:
    path = Path(ckpt_dir).absolute()  # orbax reads absolute paths only
    for part in (CONFIG, PARAMS):
        if not (path / part).exists():
            raise UserError(f"'{path}' is not a checkpoint: '{part}' is missing")
    return path


def load_config_from_checkpoint(ckpt_dir: str | Path) -> Config:
    """The `Config` saved with a checkpoint."""
    path = _require_checkpoint(ckpt_dir) / CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read '{path}': {_first_line(e)}") from None
    try:
        return from_dict(Config, data or {}).validate()
    except UserError as e:
        raise UserError(f"'{path}': {e}") from None


def check_stored_tree(path: Path, abstract: Any) -> None:
    """Compare an orbax item's stored tree with `abstract`; one `UserError` names every mismatch."""
    _check_tree(path, _stored_tree(path), abstract)


def _stored_tree(path: Path) -> Any:
    """The stored tree (array metadata) of an orbax item."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        try:
            metadata = ckptr.metadata(path).item_metadata
        except (OSError, ValueError) as e:
            raise UserError(f"checkpoint '{path}' is unreadable: {_first_line(e)}") from None
    if metadata is None:  # orbax logs why and returns nothing
        raise UserError(f"checkpoint '{path}' is corrupt or incomplete: its array metadata cannot be read")
    return metadata.tree


def stored_keys(ckpt_dir: str | Path) -> set[str]:
    """The top-level keys of a checkpoint's stored param tree (e.g. {"dit", "memory"})."""
    return set(_stored_tree(_require_checkpoint(ckpt_dir) / PARAMS))


def restore_params(ckpt_dir: str | Path, abstract: Any) -> Any:
    """Restore the param tree into `abstract` (ShapeDtypeStructs with shardings); dtypes are cast."""
    path = _require_checkpoint(ckpt_dir) / PARAMS
    quiet_failed_reads()
    check_stored_tree(path, abstract)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        try:
            params = ckptr.restore(path, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # tensorstore reports a truncated or damaged data file as a bare Exception
            raise unreadable_checkpoint(path, e) from None
    bad = non_finite_leaves(params)
    if bad:
        raise UserError(
            f"checkpoint '{path}' holds NaN or Inf in {len(bad)} arrays ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): it is corrupt or was saved from a diverged run"
        )
    return params


def unreadable_checkpoint(path: Path, e: Exception) -> UserError:
    """The one-line error for a checkpoint whose arrays could not be read."""
    reason = _first_line(e).split(". See full TensorStore details")[0]
    return UserError(f"checkpoint '{path}' could not be restored (corrupt or truncated?): {reason}")


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths ('a/b/c') of the floating-point leaves of `tree` that hold a NaN or Inf."""
    flat = [(k, v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0] if jnp.issubdtype(v.dtype, jnp.inexact)]
    if not flat:
        return []
    finite = np.asarray(_finite_per_leaf([v for _, v in flat]))  # one reduction on device, one transfer
    return [_key(k) for (k, _), ok in zip(flat, finite) if not ok]


@jax.jit
def _finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def load_params(ckpt_dir: str | Path, mesh: Mesh, boxed_init: Callable[..., Any]) -> Any:
    """Restore a checkpoint's params sharded on `mesh` (any mesh).

    `boxed_init` (rng -> boxed params, e.g. `models.dit.init_fn(cfg.dit, cfg.dit_runtime)`) defines the tree and its
    shardings: checkpoint I/O knows no model.
    """
    return restore_params(ckpt_dir, abstract_params(boxed_init, mesh, jax.random.key(0)))


def _check_tree(path: Path, stored: Any, abstract: Any) -> None:
    """One `UserError` listing every missing, unexpected or mis-shaped leaf."""
    have = {_key(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {_key(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k} {have[k]} != expected {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise UserError(f"checkpoint '{path}' does not match the config: {shown}")


def _key(path: tuple) -> str:
    """'a/b/0/c' for a key path, whether it holds dict keys, attributes or indices (stored trees are dicts)."""
    return "/".join(re.findall(r"[A-Za-z0-9_]+", jax.tree_util.keystr(path)))


@functools.cache
def quiet_failed_reads() -> None:
    """Drop the noise orbax makes when a read fails, so that our one-line error stands alone.

    Orbax abandons the other tensorstore reads, whose callbacks then hit its closed event loop
    ("Event loop is closed" as unraisable, "Task exception was never retrieved" from asyncio, both
    with tracebacks, possibly at exit), and it logs a warning before returning no metadata.
    """
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda r: not ((m := r.getMessage()).startswith("Task exception was never retrieved") and "tensorstore" in m)
    )
    # orbax's notes on a checkpoint being read back (resume), not problems: "Failed to get item metadata",
    # "Metadata file does not exist" (a checkpoint written without the optional metadata file)
    logging.getLogger("absl").addFilter(
        lambda r: not r.getMessage().startswith(("Failed to get item metadata", "Metadata file does not exist"))
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
