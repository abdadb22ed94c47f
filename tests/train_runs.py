"""Helpers for tests that run train.py as a subprocess on the tiny preset (fixtures: conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from onestory_jax.data.records import write_records
from onestory_jax.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/train/tiny.yaml"
# 8 host devices (tests/conftest.py): batch over data, tokens over sequence, heads over tensor. The
# tiny DiT's 2 heads cannot split over sequence x tensor = 4 (Ulysses), so GSPMD sequence sharding.
MESH = ("mesh.data=2", "mesh.fsdp=1", "mesh.sequence=2", "mesh.tensor=2", "dit_runtime.sequence_parallel=gspmd")


def random_videos(
    n: int,
    shots: int,
    frames: int,
    hw: tuple[int, int],
    text_dim: int,
    image_tokens: tuple[int, int],
    seed: int = 0,
    embed_dim: int = 8,
) -> list[dict[str, np.ndarray]]:
    """Random but structured videos for tests: each shot has a colour; embeddings follow it."""
    rng = np.random.default_rng(seed)
    out = []
    for v in range(n):
        colours = rng.standard_normal((shots, 1, 1, 1, 16)).astype(np.float32)
        latents = colours + 0.1 * rng.standard_normal((shots, frames, *hw, 16)).astype(np.float32)
        lengths = rng.integers(3, 9, shots)
        text = np.zeros((shots, int(lengths.max()), text_dim), np.float32)
        for s, n_tok in enumerate(lengths):
            text[s, :n_tok] = rng.standard_normal((n_tok, text_dim))
        emb = np.repeat(colours[:, :, 0, 0, :embed_dim], frames, axis=1)  # [S, T, E]
        out.append(
            {
                "latents": latents,
                "text": text,
                "text_lengths": lengths.astype(np.int32),
                "frame_embeddings": emb + 0.05 * rng.standard_normal(emb.shape).astype(np.float32),
                "augmented_first": latents[0, :, :, ::-1],  # a horizontal flip
                "image_tokens": rng.standard_normal(image_tokens).astype(np.float32),
                "first_image": latents[0],
                "shot_keys": np.arange(shots, dtype=np.int32),
                "id": np.bytes_(f"synthetic-{v:04d}"),
            }
        )
    return out


def write_test_records(path: Path) -> Path:
    """Six two-shot and two three-shot synthetic videos (both example kinds, inflation included)."""
    videos = random_videos(6, 2, 2, (8, 8), 32, (4, 16)) + random_videos(2, 3, 2, (8, 8), 32, (4, 16), seed=1)
    write_records(path, videos)
    return path


def train_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment of a train.py subprocess: `devices` host CPU devices, the session's other XLA flags and its
    persistent compile cache (tests/conftest.py), every program cached: the runs of all workers compile the
    same programs, and a cached executable is the very same program (bitwise results hold)."""
    dropped = ("--xla_force_host_platform_device_count",)
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(dropped)]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        **extra,
    }


def train_cmd(workdir: Path, records: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        "--no-progress",
        f"train.data={records}",
        *MESH,
        *extra,
    ]


def cli(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run sample.py's or train.py's main in this process as its CLI does: (exit status, stderr)."""
    code, _, err = cli_output(script, argv, capsys)
    return code, err


def cli_output(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`cli` with stdout too: (exit status, stdout, stderr). In-process runs share compiled programs
    (the story program and random params are cached per spec), so a test's later runs do not compile again."""
    code = run_main(script, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_main(script: str, argv: list) -> int:
    """sample.py's or train.py's main run in this process as its CLI runs it: its exit status."""
    spec = importlib.util.spec_from_file_location(script, ROOT / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return exit_status(module.main, argv)


def exit_status(main, argv: list) -> int:
    """A CLI entry point `main` run in this process as `run_cli` runs it: its exit status."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(a) for a in argv])
    return exit_.value.code


def main_output(main, argv: list, capsys) -> tuple[int, str, str]:
    """`exit_status` with the output: (exit status, stdout, stderr)."""
    code = exit_status(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_train(workdir: Path, records: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, records, *extra), capture_output=True, text=True, cwd=ROOT, env=train_env())


def start_train(workdir: Path, records: Path, *extra: str, **env: str) -> subprocess.Popen:
    """train.py in the background (stderr to workdir.log, beside the workdir)."""
    log = workdir.with_suffix(".log").open("w")
    return subprocess.Popen(
        train_cmd(workdir, records, *extra), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=train_env(**env)
    )


def final_params(workdir: Path) -> tuple[dict, int]:
    """Flat params of the latest checkpoint (onto one device, whatever devices saved it), and its step."""
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data")) as m:
        step = m.latest_step()
    path = workdir / "checkpoints" / str(step) / "state"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), stored)
        state = ckptr.restore(path, target)
    return ocp.tree.to_flat_dict(state["params"]), step


def assert_same_params(a: Path, b: Path, atol: float = 0.0) -> None:
    """The latest checkpoints of two workdirs hold the same step and params (bitwise by default)."""
    (flat_a, step_a), (flat_b, step_b) = final_params(a), final_params(b)
    assert step_a == step_b, (step_a, step_b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        if atol:
            np.testing.assert_allclose(np.asarray(flat_a[k]), np.asarray(flat_b[k]), rtol=0, atol=atol, err_msg=str(k))
        else:
            np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))
