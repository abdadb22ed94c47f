"""Test set-up: 8 forced host CPU devices (for sharding tests), fp32, the tests dir on sys.path."""

import os
import sys
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the CLI subprocesses the tests start:
# the tiny model's init and programs compile once, not once per sample.py / train.py run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="onestory-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

# fp32 parity tests mean fp32: no TF32 matmuls when the suite runs on a GPU.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def records(tmp_path_factory):
    """Prepared training records for train.py tests (tests/train_runs.py)."""
    from train_runs import write_test_records

    return write_test_records(tmp_path_factory.mktemp("data") / "train.arrayrecord")


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, records):
    """Workdir of one uninterrupted tiny train.py run (6 steps): the reference of the resume tests."""
    from train_runs import run_train

    workdir = tmp_path_factory.mktemp("straight") / "w"
    r = run_train(workdir, records)
    assert r.returncode == 0, r.stderr
    return workdir
