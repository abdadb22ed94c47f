"""One run per output folder: sample.py --out and train.py --workdir are locked; a stale lock from
a dead process is taken over; an --out that cannot be written, or a story that cannot fit, fails
before any model is built."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_runs import cli

from onestory_jax.errors import UserError
from onestory_jax.locking import LOCK_NAME, folder_lock

ROOT = Path(__file__).resolve().parents[1]
STORY = "settings: {width: 32, height: 32, frames: 5, steps: 2}\nshots: [A square., The same square.]\n"


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_second_holder_is_refused_and_the_lock_is_released(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "--out") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        lock.write_text(json.dumps({**holder, "pid": os.getppid()}))  # as if another live process held it
        with pytest.raises(UserError, match=rf"--out '{out}' is in use by pid {os.getppid()} on .* since "):
            with folder_lock(out, "--out"):
                pass
        lock.write_text(json.dumps(holder))
    assert list(out.iterdir()) == [] and out.is_dir()
    with folder_lock(tmp_path / "new", "--out"):  # a folder made for the lock and left empty goes again
        pass
    assert not (tmp_path / "new").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": "then"}))
    with folder_lock(tmp_path, "--workdir") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "no longer running: taking over" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    other_host = {"pid": dead_pid(), "host": "elsewhere.example", "since": "then"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other_host))
    with pytest.raises(UserError, match="in use by pid .* on elsewhere.example"):  # cannot tell it is dead
        with folder_lock(tmp_path, "--workdir"):
            pass


def test_cli_refuses_a_locked_or_unwritable_folder_before_any_model(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(STORY)
    (tmp_path / "afile").write_text("x")
    sample = ["--config", "tiny", "--story", str(tmp_path / "s.yaml"), "--no-progress"]
    for out, message in [(tmp_path / "afile", "exists and is not a folder"), (tmp_path / "afile" / "sub", "cannot be created")]:
        code, err = cli("sample", [*sample, "--out", str(out)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "now"}))
    code, err = cli("sample", [*sample, "--out", str(busy)], capsys)
    assert code == 2 and f"--out '{busy}' is in use by pid {os.getppid()}" in err and err.count("\n") == 1, err
    code, err = cli(
        "train", ["--config", str(ROOT / "configs/train/tiny.yaml"), "--workdir", str(busy), f"train.data={tmp_path}"], capsys
    )
    assert code == 2 and f"--workdir '{busy}' is in use" in err and err.count("\n") == 1, err
    assert [p.name for p in busy.iterdir()] == [LOCK_NAME]  # nothing written, the holder's lock kept


def test_cli_refuses_a_story_that_cannot_fit_or_a_foreign_out_before_any_model(tmp_path, capsys, monkeypatch):
    from onestory_jax.sampling import components

    def no_model(*args):
        raise AssertionError("a model was built")

    monkeypatch.setattr(components, "random_params", no_model)
    (tmp_path / "s.yaml").write_text(
        STORY.replace("width: 32, height: 32, frames: 5", "width: 16384, height: 16384, frames: 4097")
    )
    code, err = cli("sample", ["--config", "tiny", "--story", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "a 16384x16384 story of 2 shots of 4097 frames needs at least" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    (tmp_path / "mine").mkdir()  # the user's own manifest.json was overwritten
    (tmp_path / "mine" / "manifest.json").write_text('{"notes": "mine"}')
    (tmp_path / "s.yaml").write_text(STORY)
    code, err = cli("sample", ["--config", "tiny", "--story", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "mine")], capsys)
    assert code == 2 and "holds a manifest.json that sample.py did not write" in err and err.count("\n") == 1, err
    assert (tmp_path / "mine" / "manifest.json").read_text() == '{"notes": "mine"}'


def test_a_full_disk_while_locking_leaves_no_lock(tmp_path, monkeypatch):
    """Probe M5: the lock is written whole (a private file, then a hard link), so a failed write leaves
    nothing that would block later runs."""
    import errno

    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match="not writable: No space left on device"):
        with folder_lock(tmp_path, "--out"):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", real)
    with folder_lock(tmp_path, "--out"):  # the next run takes it
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
