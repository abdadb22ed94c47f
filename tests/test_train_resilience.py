"""train.py killed with SIGKILL (after a checkpoint is committed, or while a save is in flight)
resumes and ends bitwise-equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import orbax.checkpoint as ocp
from train_runs import assert_same_params, run_train, start_train

from onestory_jax.training.metrics import CsvLog

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def committed_steps(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def partial_saves(workdir: Path) -> list[Path]:
    ckpts = workdir / "checkpoints"
    return [p for p in ckpts.iterdir() if TMP_SUFFIX in p.name] if ckpts.is_dir() else []


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 400) -> bool:
    """SIGKILL `proc` at a moment `condition()` holds: it is frozen (SIGSTOP) when the condition is
    seen, checked again, and killed if it still holds (else thawed). False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            os.kill(proc.pid, signal.SIGSTOP)
            if condition():
                proc.kill()
                proc.wait()
                return True
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return False


def logged_steps(workdir: Path, name: str = "metrics.csv") -> list[int]:
    return [int(line.split(",")[0]) for line in (workdir / name).read_text().splitlines()[1:]]


def finish_and_compare(workdir: Path, records: Path, reference: Path, *extra: str) -> None:
    """Re-run to the end; same params as the reference, each step logged once, no partial saves."""
    r = run_train(workdir, records, *extra)
    assert r.returncode == 0, r.stderr
    assert_same_params(reference, workdir)
    assert logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert not partial_saves(workdir)


def test_sigkill_while_a_save_is_in_flight_and_after_a_committed_checkpoint(tmp_path, records, straight_run):
    """Run 1 is killed while a save is in flight: its partial '<step>.orbax-checkpoint-tmp' folder is never
    taken for a step. Run 2 resumes from the last committed step, removes the partial save, and is killed
    after committing a newer checkpoint, no save in flight. Run 3 resumes from that one and ends as the
    uninterrupted run did."""
    w, every_step = tmp_path / "w", "train.checkpoint_every=1"
    assert kill_when(start_train(w, records, every_step), lambda: bool(partial_saves(w))), w.with_suffix(".log").read_text()
    partial = {int(p.name.split(".")[0]) for p in partial_saves(w)}
    with ocp.CheckpointManager(
        w / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True), item_names=("state", "data")
    ) as m:
        first = m.latest_step() or 0
    assert first < min(partial)

    def committed_later() -> bool:
        return bool(committed_steps(w)) and committed_steps(w)[-1] > first and not partial_saves(w)

    assert kill_when(start_train(w, records, every_step), committed_later), w.with_suffix(".log").read_text()
    assert first < committed_steps(w)[-1] < 6
    finish_and_compare(w, records, straight_run, every_step)


def test_csv_log_drops_redone_steps(tmp_path):
    """A resumed run logs the steps after its checkpoint again: earlier rows past it go."""
    path = tmp_path / "metrics.csv"
    log = CsvLog(path, 0)
    for step in range(1, 6):
        log.write({"step": step, "loss": step / 10})
    log.close()
    log = CsvLog(path, 3)
    log.write({"loss": 0.4, "step": 4})
    log.close()
    assert path.read_text().splitlines() == ["step,loss", "1,0.1", "2,0.2", "3,0.3", "4,0.4"]
    path.write_text("1,0.1\n")  # no header: an older format, kept aside
    log = CsvLog(path, 1)
    log.write({"step": 2, "loss": 0.2})
    log.close()
    assert path.read_text().splitlines()[0] == "step,loss" and (tmp_path / "metrics.csv.old").read_text() == "1,0.1\n"
