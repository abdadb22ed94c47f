"""train.py --distributed with 2 processes x 1 CPU device on localhost (jax.distributed, gloo
collectives) trains like one process with 2 devices on the same mesh fed the same global batches.
Only the data axis crosses hosts, so the mesh is data=2: every collective between the processes is
there, and each process compiles a one-device program (alone here: 63 s, against 75 s on 2 x 4 devices).

Run as a script (`python tests/test_multiprocess.py WORKDIR RECORDS`), this file is that
single-process reference: train.py's loop with each global batch made of host 0's rows, then
host 1's, from the very per-host pipelines the two processes use.
"""

from __future__ import annotations

import csv
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from train_runs import MESH, ROOT, TINY, assert_same_params, cli, train_cmd, train_env

HOSTS = 2
PARAM_ATOL, LOSS_RTOL = 5e-6, 2e-6
EXTRA = ("train.val_every=6", "train.val_batches=1", "train.checkpoint_every=3")  # one validation, at the end
DATA_ONLY = ("mesh.data=2", "mesh.fsdp=1", "mesh.sequence=1", "mesh.tensor=1")  # overrides MESH: one device a host


def two_host_dataset(cfg, batch_size: int, process_index: int = 0, process_count: int = 1):
    """The global batches of a `HOSTS`-process run, in one process: host 0's rows, then host 1's..."""
    import grain

    from onestory_jax.data.pipeline import make_dataset

    hosts = [make_dataset(cfg, batch_size // HOSTS, i, HOSTS) for i in range(HOSTS)]
    merge = lambda b: {k: v.reshape(-1, *v.shape[2:]) for k, v in b.items()}
    return grain.IterDataset.mix(hosts).batch(HOSTS).map(merge)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    """Wait for every process (killing all on a timeout); their outputs, each must have succeeded."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """`cmd` with the suite's unoptimised CPU code (LLVM's optimisation cost the test a third of its time). Its
    reduction orders differ by up to 1.6e-6 in one parameter of 24576 (seen once; 6e-8 in three runs here),
    hence PARAM_ATOL: a wrong split or average of the batch moves parameters by ~1e-3 a step."""
    return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=train_env(**env))


def distributed_run(workdir: Path, records: Path) -> list[subprocess.Popen]:
    """train.py --distributed in `HOSTS` processes with one device each."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [
        start(
            train_cmd(workdir, records, "--distributed", *DATA_ONLY, *EXTRA),
            devices=1,
            JAX_COORDINATOR_ADDRESS=coordinator,
            JAX_NUM_PROCESSES=str(HOSTS),
            JAX_PROCESS_ID=str(i),
        )
        for i in range(HOSTS)
    ]


def reference_run(workdir: Path, records: Path) -> subprocess.Popen:
    """This file as a script: one process, `HOSTS` devices (see the module docstring)."""
    return start([sys.executable, __file__, str(workdir), str(records)], devices=HOSTS)


def column(path: Path, name: str) -> np.ndarray:
    with path.open(newline="") as f:
        return np.array([float(row[name]) for row in csv.DictReader(f)])


def test_two_processes_match_one(tmp_path, records):
    multi, single = tmp_path / "multi", tmp_path / "single"
    run_all([*distributed_run(multi, records), reference_run(single, records)])  # all at once: fewer idle cores
    for name in ("metrics.csv", "val.csv"):
        np.testing.assert_allclose(column(multi / name, "loss"), column(single / name, "loss"), rtol=LOSS_RTOL, err_msg=name)
    assert column(multi / "metrics.csv", "step").tolist() == [1, 2, 3, 4, 5, 6]
    assert column(multi / "val.csv", "bucket").tolist() == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert_same_params(multi, single, atol=PARAM_ATOL)
    assert (multi / "model" / "onestory" / "config.yaml").is_file()
    assert not list(multi.joinpath("model").glob(".*"))  # the export's temporary folders are gone


def test_distributed_without_a_coordinator_is_one_line(tmp_path, records, capsys, monkeypatch):
    env = {k: v for k, v in train_env().items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    r = subprocess.run(train_cmd(tmp_path / "w", records, "--distributed"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "JAX_COORDINATOR_ADDRESS" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # refused before jax.distributed.initialize (which a process that has run JAX cannot call): in this process
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    code, err = cli("train", train_cmd(tmp_path / "w", records, "--distributed")[2:], capsys)
    assert code == 2 and "must be integers" in err and "Traceback" not in err, err


def main(workdir: str, records: str) -> None:
    """The single-process reference run (see the module docstring)."""
    from onestory_jax.config_files import load_config
    from onestory_jax.training import loop

    loop.make_dataset = two_host_dataset
    loop.train(load_config(str(ROOT / TINY), [f"train.data={records}", *MESH, *DATA_ONLY, *EXTRA]), workdir, progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
