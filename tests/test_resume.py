"""Resume keyed by content (sampling/resume.py) and shots saved as they finish (sample.py, SIGKILL)."""

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_runs import cli

from onestory_jax.sampling import resume
from onestory_jax.sampling.story import MemorySettings, Settings, Shot, Story

SHAPE = (2, 3, 4, 16)


def _story(**changes) -> Story:
    shots = tuple(Shot(c) for c in ("A red square.", "It rests in a desert.", "It returns."))
    story = Story(settings=Settings(width=32, height=24, frames=5), memory=MemorySettings(), shots=shots)
    return dataclasses.replace(story, **changes)


def _save_all(out: Path, story: Story, model: str = "m") -> list[np.ndarray]:
    inputs, prints = resume.story_fingerprints(story, model)
    lats = [np.full(SHAPE, i, np.float32) for i in range(len(story.shots))]
    for i, lat in enumerate(lats):
        resume.save_shot(out, i, lat, inputs[i], prints[i])
    return lats


def test_unchanged_story_keeps_every_shot(tmp_path):
    lats = _save_all(tmp_path, _story())
    kept, reasons = resume.reusable_shots(tmp_path, _story(), "m", SHAPE)
    assert reasons == [None, None, None]
    for a, b in zip(kept, lats):
        np.testing.assert_array_equal(a, b)


def test_an_edit_regenerates_from_the_first_changed_shot(tmp_path):
    _save_all(tmp_path, _story())
    edited = _story(shots=(Shot("A red square."), Shot("It rests in a jungle."), Shot("It returns.")))
    kept, reasons = resume.reusable_shots(tmp_path, edited, "m", SHAPE)
    assert len(kept) == 1 and reasons[0] is None
    assert reasons[1] == "changed: caption" and reasons[2] == "an earlier shot is regenerated"


def test_settings_seed_and_model_changes_are_seen(tmp_path):
    _save_all(tmp_path, _story())
    _, reasons = resume.reusable_shots(tmp_path, _story(settings=Settings(width=32, height=24, frames=5, steps=7)), "m", SHAPE)
    assert reasons[0] == "changed: settings"
    shots = (Shot("A red square."), Shot("It rests in a desert.", seed=9), Shot("It returns."))
    _, reasons = resume.reusable_shots(tmp_path, _story(shots=shots), "m", SHAPE)
    assert reasons[:2] == [None, "changed: seed"]
    _, reasons = resume.reusable_shots(tmp_path, _story(), "another model", SHAPE)
    assert reasons[0] == "changed: model"


def test_redo_and_damaged_or_partial_shots_are_regenerated(tmp_path):
    _save_all(tmp_path, _story())
    _, reasons = resume.reusable_shots(tmp_path, _story(), "m", SHAPE, redo=3)
    assert reasons == [None, None, "--redo 3"]
    np.save(tmp_path / "shot_02.npy", np.full(SHAPE, np.nan, np.float32))
    _, reasons = resume.reusable_shots(tmp_path, _story(), "m", SHAPE)
    assert reasons == [None, "saved latents hold non-finite values", "an earlier shot is regenerated"]
    (tmp_path / "shot_01.json").unlink()  # latents without their record: a crash between the two writes
    _, reasons = resume.reusable_shots(tmp_path, _story(), "m", SHAPE)
    assert reasons[0] == "not generated yet"


STORY = {
    "settings": {"width": 32, "height": 48, "frames": 5, "steps": 4, "seed": 3},
    "shots": [{"caption": f"Shot {i}: a red square."} for i in range(1, 4)],
}

# sample.py, SIGKILLed by itself the moment shot 2 is on disk: inside the running story program
# (the save is its ordered host callback), before shot 3 is denoised.
KILLED_AFTER_SHOT_2 = """
import os, runpy, signal, sys
from onestory_jax.sampling import resume
save = resume.save_shot
def save_then_die(out, shot, *args):
    save(out, shot, *args)
    if shot == 1:
        os.kill(os.getpid(), signal.SIGKILL)
resume.save_shot = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path("sample.py", run_name="__main__")
"""


def _killed_sample(story: Path, out: Path) -> subprocess.CompletedProcess:
    argv = ["--config", "tiny", "--story", str(story), "--out", str(out), "--no-progress"]
    return subprocess.run([sys.executable, "-c", KILLED_AFTER_SHOT_2, "sample.py", *argv], capture_output=True, text=True)


def test_sigkill_keeps_finished_shots_and_the_rerun_is_bitwise_equal(tmp_path, capsys):
    """Killed while shot 3 of 3 is to be denoised: shots 1-2 are on disk; the re-run equals an uninterrupted run.
    The uninterrupted run and the re-run run in this process (the killed one loads their programs from the
    suite's compile cache)."""
    story = tmp_path / "story.yaml"
    story.write_text(yaml.safe_dump(STORY))

    def sample_here(out: Path) -> None:
        code, err = cli("sample", ["--config", "tiny", "--story", story, "--out", out, "--no-progress"], capsys)
        assert code == 0, err

    sample_here(tmp_path / "ref")
    killed = _killed_sample(story, tmp_path / "out")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("shot_*")) == [
        "shot_01.json",
        "shot_01.npy",
        "shot_02.json",
        "shot_02.npy",
    ]
    sample_here(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["resumed"] for s in manifest["shots"]] == [True, True, False]
    for i in (1, 2, 3):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"shot_0{i}.npy"), np.load(tmp_path / "ref" / f"shot_0{i}.npy"))


def test_full_disk_while_saving_a_shot_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC mid-write (the probe's full tmpfs): one line naming the file, no partial or temp file, no record."""
    import errno

    import onestory_jax.io
    from onestory_jax.errors import UserError

    def half_then_full(f, array):
        f.write(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onestory_jax.io.np, "save", half_then_full)
    inputs, prints = resume.story_fingerprints(_story(), "m")
    with pytest.raises(UserError, match=rf"cannot write '{tmp_path / 'shot_01.npy'}': No space left on device") as e:
        resume.save_shot(tmp_path, 0, np.zeros(SHAPE, np.float32), inputs[0], prints[0])
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot write .*afile/shot_01.npy': a part of its path is a file, not a folder"):
        resume.save_shot(tmp_path / "afile", 0, np.zeros(SHAPE, np.float32), inputs[0], prints[0])


def test_a_fresh_run_says_not_generated_and_fps_keeps_shots(tmp_path):
    _, reasons = resume.reusable_shots(tmp_path, _story(), "m", SHAPE)
    assert reasons == ["not generated yet"] * 3
    _save_all(tmp_path, _story())
    faster = _story(settings=dataclasses.replace(_story().settings, fps=30))
    assert resume.reusable_shots(tmp_path, faster, "m", SHAPE)[1] == [None, None, None]  # only the mp4s change


def test_the_tokenizer_is_part_of_the_model(tmp_path):
    for name, text in (("a", "one"), ("b", "two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(text)
    ids = {resume.model_identity(None, {}, 0, tokenizer) for tokenizer in (None, tmp_path / "a", tmp_path / "b")}
    assert len(ids) == 3


@pytest.mark.parametrize("name", ["story.mp4", "contact_sheet.png", "shot_01.mp4", "shot_02.json"])
def test_files_sample_py_did_not_write_are_not_overwritten(tmp_path, name):
    (tmp_path / name).write_text("mine")
    with pytest.raises(resume.UserError, match=f"holds {name}, which sample.py did not write"):
        resume.check_not_foreign(tmp_path)
    _save_all(tmp_path / "run", _story())  # an interrupted run's shots, with their records, are ours
    resume.check_not_foreign(tmp_path / "run")


def test_yaml_aliases_are_refused_in_one_short_line(tmp_path):
    from onestory_jax.errors import UserError
    from onestory_jax.sampling.story import load_story

    bomb = (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    )
    (tmp_path / "s.yaml").write_text(bomb + "shots: *c\n")
    with pytest.raises(UserError, match="aliases") as e:
        load_story(tmp_path / "s.yaml")
    assert len(str(e.value)) < 200
    (tmp_path / "t.yaml").write_text(
        "shots: [{caption: a, seed: " + "[1, 2, 3, 4, 5, 6, 7, 8] " * 0 + "'" + "9" * 10000 + "'}]\n"
    )
    with pytest.raises(UserError) as e:
        load_story(tmp_path / "t.yaml")
    assert len(str(e.value)) < 200


def test_a_record_that_is_not_a_mapping_regenerates_its_shot(tmp_path):
    """A list-valued shot_NN.json (in a folder with our manifest) was a traceback."""
    _save_all(tmp_path, _story())
    (tmp_path / "shot_02.json").write_text("[1, 2]")
    kept, reasons = resume.reusable_shots(tmp_path, _story(), "m", SHAPE)
    assert len(kept) == 1 and reasons[1] == "its record is not a shot record"
