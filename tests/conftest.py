"""Test set-up: forced host CPU devices (8, or ONESTORY_TEST_DEVICES), unoptimised CPU code, fp32, the tests dir
on sys.path; tests marked `multidevice` are skipped on fewer than 8 devices."""

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Most tests run on any number of devices; those marked `multidevice` need 8 (meshes over data, fsdp, sequence
# and tensor). Every program of an 8-device mesh is partitioned and runs as 8 programs on the same 2 cores, so
# `make test` runs the unmarked tests on one device (their test time 2,825 -> 2,156 s here) and then the
# marked ones on 8.
DEVICES = int(os.environ.get("ONESTORY_TEST_DEVICES", "8"))
MULTIDEVICE = 8
MULTIDEVICE_ONLY = "multidevice"  # the marker expression of make test's second pass
# The suite compiles far more than it computes (tiny models, a few steps): LLVM's optimisation of the CPU
# programs (up to 7x the compile time) costs more than it saves, so it is off for the suite and its subprocesses.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the test run, shared by both xdist workers and the CLI subprocesses
# they start: the tiny model's init and programs compile once, not once per worker and sample.py / train.py
# run. A size cap turns on JAX's file lock around each entry, so no process reads another's half-written one.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set by xdist in each worker before this file is imported
_CACHE = os.path.join(tempfile.gettempdir(), f"onestory-jax-cache-{_RUN or os.getpid()}")
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

# fp32 parity tests mean fp32: no TF32 matmuls when the suite runs on a GPU.
jax.config.update("jax_default_matmul_precision", "highest")


# The files with the longest test time (seconds in one `make test` here), longest first. `make test` hands files
# to its two workers in collection order (--dist loadfile --no-loadscope-reorder): started first, the long ones
# leave the short ones to fill the end, not a worker idle beside the last long file.
LONGEST_FIRST = (
    "test_multiprocess.py",  # 90
    "test_wan_to_onestory.py",  # 90
    "test_preset_fit.py",  # 90, multidevice
    "test_prepare.py",  # 80 + 40
    "test_training.py",  # 78 + 61
    "test_sample.py",  # 25 + 95
    "test_train_loop.py",  # 90
    "test_vae_init_and_crops.py",  # 110
    "test_train_resilience.py",  # 70
    "test_low_vram.py",  # 95
    "test_studio.py",  # 56
    "test_lora.py",  # 48
)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A run of the `multidevice` tests alone (`make test`'s second pass) does not import the test files that
    have none: each worker imported every file's torch, diffusers and gradio (collection on 2 workers 38-44 s -> 24-36 s).
    The files it imports import neither torch nor transformers (one process's collection 17.7 -> 5.5 s)."""
    test_file = collection_path.suffix == ".py" and collection_path.name.startswith("test_")
    if config.option.markexpr == MULTIDEVICE_ONLY and test_file:
        return "multidevice" not in collection_path.read_text()
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files as LONGEST_FIRST, then the rest as collected; skip the `multidevice` tests when this run
    has fewer than 8 devices (ONESTORY_TEST_DEVICES)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
    if jax.device_count() >= MULTIDEVICE:
        return
    skip = pytest.mark.skip(reason=f"needs {MULTIDEVICE} devices, this run has {jax.device_count()} (ONESTORY_TEST_DEVICES)")
    for item in items:
        if "multidevice" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def made_once(tmp_path_factory, worker_id: str, name: str) -> Iterator[tuple[Path, bool]]:
    """(folder, ready) for a session-wide artefact made by the first pytest-xdist worker that asks for
    it and reused by the others (one worker's tmp root is shared by all); under the lock."""
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.done"
        yield root / name, done.exists()
        done.touch()


@pytest.fixture(scope="session")
def records(tmp_path_factory, worker_id):
    """Prepared training records for train.py tests (tests/train_runs.py)."""
    from train_runs import write_test_records

    with made_once(tmp_path_factory, worker_id, "data") as (folder, ready):
        path = folder / "train.arrayrecord"
        if not ready:
            folder.mkdir(exist_ok=True)
            write_test_records(path)
    return path


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, worker_id, records):
    """Workdir of one uninterrupted tiny train.py run (6 steps): the reference of the resume tests."""
    from train_runs import run_train

    with made_once(tmp_path_factory, worker_id, "straight") as (workdir, ready):
        if not ready:
            r = run_train(workdir, records)
            assert r.returncode == 0, r.stderr
    return workdir
