"""train.py end to end: grain records, orbax checkpoints, exact resume, clear failures."""

import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from onestory_jax.config import load_config
from onestory_jax.data.pipeline import make_dataset
from onestory_jax.data.records import synthetic_videos, write_records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.arrayrecord"
    videos = synthetic_videos(6, 2, 2, (8, 8), 32, (4, 16)) + synthetic_videos(2, 3, 2, (8, 8), 32, (4, 16), seed=1)
    write_records(path, videos)
    return path


# 8 host devices (tests/conftest.py): batch over data, tokens over sequence, heads over tensor.
MESH = ("mesh.data=2", "mesh.fsdp=1", "mesh.sequence=2", "mesh.tensor=2")


def run_train(workdir, records, *extra):
    return subprocess.run([sys.executable, "train.py", "--config", "configs/train/tiny.yaml", "--workdir", str(workdir),
                           "--no-progress", f"train.data={records}", *MESH, *extra], capture_output=True, text=True)


def final_params(workdir):
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data")) as m:
        state = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return state["params"], m.latest_step()


def test_resume_reaches_the_same_params_bitwise(tmp_path, records):
    r = run_train(tmp_path / "straight", records)
    assert r.returncode == 0, r.stderr
    assert run_train(tmp_path / "split", records, "--stop-after", "3").returncode == 0
    r = run_train(tmp_path / "split", records)
    assert r.returncode == 0, r.stderr
    (a, step_a), (b, step_b) = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
    assert step_a == step_b == 6
    flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))
    assert (tmp_path / "straight" / "metrics.csv").read_text().count("\n") == 6


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


def test_missing_data_and_mismatched_checkpoint_are_clear(tmp_path, records):
    r = run_train(tmp_path / "w", tmp_path / "nope.arrayrecord")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert run_train(tmp_path / "w2", records, "--stop-after", "2").returncode == 0
    r = run_train(tmp_path / "w2", records, "dit.ffn_dim=48")
    assert r.returncode == 2 and "does not match the config" in r.stderr and "ffn/fc1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, records):
    r = run_train(tmp_path / "nan", records, "train.learning_rate=1e30", "train.lr_warmup_steps=0")
    assert r.returncode == 2 and "non-finite loss" in r.stderr and "Traceback" not in r.stderr, r.stderr
    saved = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert all(int(s) < 6 for s in saved)  # nothing saved from the diverged steps


def test_trained_model_renders_a_story(tmp_path, records):
    """train.py exports model/onestory; sample.py renders from it (frozen parts random, with a warning)."""
    assert run_train(tmp_path / "t", records, "--stop-after", "6").returncode == 0
    story = tmp_path / "s.yaml"
    story.write_text("settings: {width: 32, height: 32, frames: 5, steps: 2}\nshots: [A square., The same square.]\n")
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "t" / "model"), "--story", str(story),
                        "--out", str(tmp_path / "out"), "--no-progress", *MESH], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and (tmp_path / "out" / "story.mp4").is_file()
