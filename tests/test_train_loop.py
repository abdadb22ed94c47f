"""train.py end to end: grain records, orbax checkpoints, exact resume, clear failures."""

import shutil

import numpy as np
import pytest
from train_runs import TINY, assert_same_params, cli, run_train

from onestory_jax.config_files import load_config
from onestory_jax.data.pipeline import make_dataset
from onestory_jax.errors import UserError


def test_resume_reaches_the_same_params_bitwise(tmp_path, records, straight_run):
    """The straight run without its last checkpoint resumes from the one before (params, optimizer, data
    position) and ends where it ended. (Stopping early and resuming from that stop: test_prepare's VAE stage.)"""
    split = shutil.copytree(straight_run, tmp_path / "split")
    steps = sorted(int(p.name) for p in (split / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(split / "checkpoints" / str(steps[-1]))
    r = run_train(split, records)
    assert r.returncode == 0, r.stderr
    resumed = steps[-2]  # --no-progress: one line per log, from the step after the checkpoint
    assert f"step {resumed + 1}/6: loss " in r.stdout and f"step {resumed}/6" not in r.stdout, r.stdout
    assert "step 6/6: loss " in r.stdout and "steps/s" in r.stdout, r.stdout
    assert "Metadata file does not exist" not in r.stderr, r.stderr  # no absl noise on resume
    assert_same_params(straight_run, split)
    for workdir in (straight_run, split):  # the resumed run logs its redone steps once
        lines = (workdir / "metrics.csv").read_text().splitlines()
        assert lines[0].startswith("step,time,") and [int(r.split(",")[0]) for r in lines[1:]] == [1, 2, 3, 4, 5, 6]


def test_data_pipeline_labels_and_exact_position(records):
    cfg = load_config("configs/train/tiny.yaml", [f"train.data={records}"])
    it = iter(make_dataset(cfg, 2))
    batches = [next(it) for _ in range(8)]
    labels = np.concatenate([b["labels"] for b in batches])
    real = labels[(labels != -1) & (labels != 0)]
    assert (labels == -1).any() and (labels == 0).any() and real.size and (np.abs(real) <= 1).all()
    it = iter(make_dataset(cfg, 2))
    next(it)
    state = it.get_state()
    again = iter(make_dataset(cfg, 2))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["target"], batches[1]["target"])


def test_missing_data_and_mismatched_checkpoint_are_clear(tmp_path, records, straight_run, capsys):
    """Run in this process: the errors come before any training step."""
    argv = ["--config", TINY, "--workdir", tmp_path / "w", "--no-progress", f"train.data={tmp_path / 'nope.arrayrecord'}"]
    code, err = cli("train", argv, capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err, err
    workdir = shutil.copytree(straight_run, tmp_path / "w2")
    argv = ["--config", TINY, "--workdir", workdir, "--no-progress", f"train.data={records}", "dit.ffn_dim=48"]
    code, err = cli("train", argv, capsys)
    assert code == 2 and "does not match the config" in err and "ffn/fc1" in err, err
    assert "Traceback" not in err, err
    assert "ffn_dim: 32" in (workdir / "config.yaml").read_text()  # still describes its checkpoints


def test_bad_stop_after_and_a_disk_without_room_are_refused(tmp_path, records, capsys, monkeypatch):
    """--stop-after 0 trained nothing and said "had already trained all 6 steps"; a disk that cannot hold one
    checkpoint gave 1661 lines of orbax tracebacks at the first save."""
    from types import SimpleNamespace

    from onestory_jax.training import loop

    code, err = cli("train", ["--config", TINY, "--workdir", str(tmp_path / "w"), "--stop-after", "0"], capsys)
    assert code == 2 and err == "error: --stop-after must be >= 1, got 0\n"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(UserError, match=r"'.*w' has 1000.0 B free but a checkpoint of the train state needs \d+\.\d MiB"):
        loop.train(load_config(TINY, [f"train.data={records}"]), tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "config.yaml").exists()


def test_non_finite_state_is_never_saved(tmp_path, records):
    """Checkpoint steps that are not logging steps are checked too (a NaN state was saved at step 2)."""
    w = tmp_path / "nan"
    r = run_train(
        w, records, "train.learning_rate=1e30", "train.lr_warmup_steps=0", "train.log_every=3", "train.checkpoint_every=2"
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error: non-finite loss at step 2" in r.stderr and "no checkpoint was saved" in r.stderr, r.stderr
    assert not [p for p in (w / "checkpoints").iterdir() if p.name[0].isdigit()]  # not even a partial save


def test_state_to_be_saved_is_checked_even_if_its_loss_is_finite():
    """A step's loss comes from the params before its update: the updated state is checked too."""
    from types import SimpleNamespace

    from onestory_jax.training.loop import _check_finite

    manager = SimpleNamespace(latest_step=lambda: 4, directory="w/checkpoints")
    state = {"params": {"a": np.ones(2, np.float32), "b": np.array([1.0, np.inf], np.float32)}, "step": np.int32(5)}
    _check_finite(5, {"loss": 0.5}, None, manager)  # a logging step only: the state is not looked at
    with pytest.raises(
        UserError,
        match=r"non-finite state after step 5 \(1 arrays, e.g. params/b\); stopped "
        r"without saving it: the last good checkpoint is step 4 in w/checkpoints",
    ):
        _check_finite(5, {"loss": 0.5}, state, manager)


def test_trained_model_renders_a_story(tmp_path, straight_run, capsys):
    """train.py exports model/onestory (records without a manifest name no frozen parts to copy): sample.py
    refuses the incomplete folder, and renders from it with --allow-random (frozen parts random, warned)."""
    story = tmp_path / "s.yaml"
    story.write_text("settings: {width: 32, height: 32, frames: 5, steps: 2}\nshots: [A square., The same square.]\n")
    argv = ["--checkpoint", straight_run / "model", "--story", story, "--out", tmp_path / "out", "--no-progress"]
    code, err = cli("sample", argv, capsys)
    assert code == 2 and "lacks vae/, text_encoder/, image_encoder/, tokenizer/" in err, err
    with pytest.warns(UserWarning, match="lacks vae/, text_encoder/, image_encoder/, tokenizer/: using RANDOM weights"):
        code, err = cli("sample", [*argv, "--allow-random"], capsys)
    assert code == 0 and (tmp_path / "out" / "story.mp4").is_file(), err
