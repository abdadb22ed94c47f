"""sample.py end to end with random tiny weights: outputs, resume, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from train_runs import cli, run_main

STORY = {
    "settings": {"width": 32, "height": 48, "frames": 5, "fps": 4, "steps": 2, "seed": 1},
    "shots": [{"caption": "A red square."}, {"caption": "The same square, in a desert."}, {"caption": "It returns."}],
}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    d = tmp_path_factory.mktemp("story")
    (d / "story.yaml").write_text(yaml.safe_dump(STORY))
    # in this process: the module's later in-process runs reuse its programs (random params, the story's)
    assert run_main("sample", ["--config", "tiny", "--story", d / "story.yaml", "--out", d / "out", "--no-progress"]) == 0
    return d


def test_every_output_is_written_with_the_right_shape(rendered):
    import av
    from PIL import Image

    out = rendered / "out"
    for i in (1, 2, 3):
        lat = np.load(out / f"shot_{i:02d}.npy")
        assert lat.shape == (2, 6, 4, 16)  # 5 frames -> 2 latent frames, 48x32 / 8
        with av.open(str(out / f"shot_{i:02d}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (48, 32, 3)
    with av.open(str(out / "story.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 15
    assert Image.open(out / "contact_sheet.png").size[0] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["shot"] for s in manifest["shots"]] == [1, 2, 3]
    assert manifest["shots"][0]["memory"] == []  # nothing to remember yet
    assert {m["shot"] for m in manifest["shots"][2]["memory"]} == {1, 2}
    assert not list(out.glob(".*"))  # no temp files left behind


def test_resume_skips_finished_shots_and_same_seed_same_latents(rendered, capsys):
    out = rendered / "out"
    before = [np.load(out / f"shot_{i:02d}.npy") for i in (1, 2, 3)]
    for f in out.glob("shot_03.*"):
        f.unlink()
    code, err = cli("sample", ["--config", "tiny", "--story", rendered / "story.yaml", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["resumed"] for s in manifest["shots"]] == [True, True, False]
    after = [np.load(out / f"shot_{i:02d}.npy") for i in (1, 2, 3)]
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["--config", "nosuchpreset"], "unknown config preset"),
        (["--config", "tiny", "dit.num_layers=two"], "dit.num_layers"),
    ],
)
def test_bad_input_is_one_clear_line(rendered, args, message, capsys):
    code, err = cli("sample", [*args, "--story", rendered / "story.yaml", "--out", rendered / "bad"], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_unreadable_start_image(rendered, capsys):
    (rendered / "broken.png").write_bytes(b"not a png")
    story = {**STORY, "start_image": "broken.png"}
    (rendered / "img.yaml").write_text(yaml.safe_dump(story))
    code, err = cli("sample", ["--config", "tiny", "--story", rendered / "img.yaml", "--out", rendered / "img"], capsys)
    assert code == 2 and "broken.png" in err and "Traceback" not in err, err


def test_start_video_resumes_every_shot(rendered, capsys):
    """Shot 1 from a start_video had no shot_01.npy, so every re-run re-denoised every later shot."""
    (rendered / "vid.yaml").write_text(yaml.safe_dump({**STORY, "start_video": "out/shot_01.mp4"}))
    args = ["--config", "tiny", "--story", rendered / "vid.yaml", "--out", rendered / "vid", "--no-progress"]
    for resumed in ([True, False, False], [True, True, True]):  # shot 1 is the video's latents
        code, err = cli("sample", args, capsys)  # in this process: the second run compiles nothing again
        assert code == 0, err
        manifest = json.loads((rendered / "vid" / "manifest.json").read_text())
        assert [s["resumed"] for s in manifest["shots"]] == resumed
    assert [s["generated_because"] for s in manifest["shots"]] == [None] * 3 and (rendered / "vid" / "shot_01.npy").is_file()


@pytest.mark.multidevice
def test_story_sharded_over_sequence_and_cfg_pair_equals_the_plain_run(rendered, tmp_path, capsys):
    """8 host devices as data 2 (the CFG pair split) x sequence 2 (Ulysses) x fsdp 2 = the fsdp-only run."""
    story, out = rendered / "story.yaml", tmp_path / "out"
    sharding = ["mesh.data=2", "mesh.sequence=2", "mesh.fsdp=2"]
    code, err = cli("sample", ["--config", "tiny", "--story", story, "--out", out, "--no-progress", *sharding], capsys)
    assert code == 0, err
    for i in (1, 2, 3):  # fp32 reduction order differs, amplified x5 by guidance and over shots: 2e-5 of the scale
        ref = np.load(rendered / "out" / f"shot_0{i}.npy")
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"shot_0{i}.npy"), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_redo_rerolls_the_shot_and_the_reroll_stays(rendered, tmp_path, capsys):
    import shutil

    from train_runs import cli_output

    out = tmp_path / "out"
    shutil.copytree(rendered / "out", out)
    before = np.load(out / "shot_03.npy")
    args = ["--config", "tiny", "--story", rendered / "story.yaml", "--out", out, "--no-progress"]
    code, stdout, err = cli_output("sample", [*args, "--redo", "3"], capsys)
    assert code == 0 and "re-rolling shot 3 with seed" in stdout, err
    shot3 = json.loads((out / "manifest.json").read_text())["shots"][2]
    assert shot3["seed"] != 3 and not np.allclose(np.load(out / "shot_03.npy"), before)  # story seed 1 + 2 = 3
    rerolled = np.load(out / "shot_03.npy")
    code, _, err = cli_output("sample", args, capsys)  # a plain re-run keeps the re-roll
    assert code == 0, err
    assert [s["resumed"] for s in json.loads((out / "manifest.json").read_text())["shots"]] == [True] * 3
    code, stdout, err = cli_output("sample", [*args, "--redo", "3", "--same-seed"], capsys)  # repeats the re-rolled shot
    assert code == 0 and "re-rolling" not in stdout, err
    np.testing.assert_allclose(np.load(out / "shot_03.npy"), rerolled, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["shots"][2]["seed"] == shot3["seed"]


def test_several_stories_in_one_run(rendered, tmp_path, capsys):
    from train_runs import cli_output

    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**STORY, "shots": STORY["shots"][:2]}))
    code, stdout, err = cli_output(
        "sample",
        [
            "--config",
            "tiny",
            "--story",
            tmp_path / "a.yaml",
            "--story",
            tmp_path / "b.yaml",
            "--out",
            tmp_path / "out",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.count("plan: 2 shots of 32x48") == 2
    assert all(len(json.loads((tmp_path / "out" / n / "manifest.json").read_text())["shots"]) == 2 for n in "ab")


def test_seed_is_refused_with_a_checkpoint(rendered):
    """sample.py as a script, in its own process (the other refusals run its main in this one)."""
    r = run("--checkpoint", "models/demo", "--seed", "3", "--story", str(rendered / "story.yaml"), "--out", str(rendered / "x"))
    assert r.returncode == 2 and "--seed seeds the random weights of --config" in r.stderr and r.stderr.count("\n") == 1


def test_contact_sheet_rows_are_labelled(tmp_path):
    """Each row carries its shot number in the white left margin (dark text pixels in that row only)."""
    from PIL import Image

    from onestory_jax.sampling.outputs import LABEL_MARGIN, contact_sheet

    contact_sheet(tmp_path / "c.png", [np.full((5, 32, 32, 3), 200, np.uint8) for _ in range(3)])
    margin = np.asarray(Image.open(tmp_path / "c.png"))[:, :LABEL_MARGIN].min(-1)
    rows = np.array_split(margin, 3)
    assert all((r < 100).any() for r in rows), "a row without its label"
    assert (margin[:2] > 250).all()  # white around the labels
