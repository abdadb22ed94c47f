"""onestory_jax.eval: metrics on synthetic stories whose right answer is known."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from onestory_jax.data import synthetic
from onestory_jax.data.video import write_mp4
from onestory_jax.errors import UserError, run_cli
from onestory_jax.eval import HistogramFeatures, evaluate_story, load_features, loading, metrics, regions
from onestory_jax.eval.__main__ import main
from onestory_jax.eval.recall import recall_shots
from onestory_jax.io import shot_name

FRAMES, SIZE = 9, 48
FEATURES = HistogramFeatures()


@cache
def recall_story() -> synthetic.SyntheticStory:
    """A 4-shot story whose first character returns in shot 4 (a forest in shots 1 and 3), every
    shot moving (so frame order matters)."""
    story = synthetic.make_story(3, n_shots=4)
    return dataclasses.replace(story, shots=tuple(dataclasses.replace(s, motion="slides") for s in story.shots))


@cache
def rendered() -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = synthetic.render_synthetic(recall_story(), FRAMES, SIZE)
    return [f for f, _ in pairs], [m for _, m in pairs]


@cache
def truth_result() -> dict:
    frames, masks = rendered()
    return evaluate_story(frames, recall_story(), FEATURES, masks)


def swapped_recall() -> list[np.ndarray]:
    """The story re-rendered with the recalled character in another colour from its return on."""
    story = recall_story()
    j, c = recall_shots(story)[0]
    colour = next(k for k in synthetic.COLOURS if k not in {ch.colour for ch in story.characters})
    other = dataclasses.replace(
        story, characters=tuple(dataclasses.replace(ch, colour=colour) if i == c else ch for i, ch in enumerate(story.characters))
    )
    return [f if i < j else synthetic.render_shot(other, i, FRAMES, SIZE)[0] for i, f in enumerate(rendered()[0])]


def test_ground_truth_scores_near_perfect():
    s = truth_result()["summary"]
    assert truth_result()["regions"] == "ground-truth masks"
    assert truth_result()["character_consistency"]["recall_pairs"] > 0
    assert s["character"] > 0.95 and s["character_recall"] > 0.95, s
    assert s["environment"] > 0.9 and s["background"] > 0.95, s
    assert s["attribute_character_colour"] == 1.0 and s["attribute_scene"] == 1.0


def test_segmentation_agrees_with_ground_truth():
    frames, masks = rendered()
    story = recall_story()
    ious = []
    for i, (f, m) in enumerate(zip(frames, masks)):
        seg = regions.segment_shot(f, story, i)
        for c in story.shots[i].characters:
            a, b = seg == c + 1, m == c + 1
            ious.append((a & b).sum() / (a | b).sum())
    assert min(ious) > 0.85, ious
    s = evaluate_story(frames, story, FEATURES)["summary"]
    assert s["character"] > 0.95 and s["character_recall"] > 0.95, s


def test_swapped_recall_character_scores_lower():
    r = evaluate_story(swapped_recall(), recall_story(), FEATURES)
    truth = truth_result()["summary"]
    assert r["summary"]["character_recall"] < truth["character_recall"] - 0.4, r["summary"]
    assert r["summary"]["attribute_character_colour"] < 1.0
    wrong = [c for shot in r["attribute_accuracy"]["per_shot"] for c in shot["characters"] if c["predicted"] != c["truth"]]
    assert wrong and all(c["character"] == recall_shots(recall_story())[0][1] for c in wrong)


def test_shuffled_frames_lower_intra_shot_consistency():
    frames, masks = rendered()
    rng = np.random.default_rng(0)
    order = [rng.permutation(len(f)) for f in frames]
    shuffled = evaluate_story(
        [f[o] for f, o in zip(frames, order)], recall_story(), FEATURES, [m[o] for m, o in zip(masks, order)]
    )
    truth = truth_result()["intra_shot"]
    assert shuffled["intra_shot"]["subject_consistency"] < truth["subject_consistency"] - 0.003  # slow motion: small
    # frames drawn from all shots: characters and scenes change within a "shot"
    pool = np.concatenate(frames)
    mixed = [pool[rng.permutation(len(pool))[:FRAMES]] for _ in frames]
    assert evaluate_story(mixed, None, FEATURES)["intra_shot"]["avg"] < truth["frame_consistency"] - 0.1


def test_static_video_has_zero_dynamic_degree():
    frames = rendered()[0]
    static = evaluate_story([np.repeat(f[:1], len(f), 0) for f in frames], recall_story(), FEATURES)
    assert static["dynamic_degree"]["score"] == 0.0
    assert static["intra_shot"]["subject_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert truth_result()["dynamic_degree"]["score"] > 0.003


def test_semantic_alignment_unavailable_and_noise_scores_zero():
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, f.shape, dtype=np.uint8) for f in rendered()[0]]
    r = evaluate_story(noise, recall_story(), FEATURES)
    for result in (r, truth_result()):
        assert result["semantic_alignment"]["status"] == "unavailable"
        assert result["semantic_alignment"]["score"] is None and result["summary"]["semantic_alignment"] is None
    assert r["summary"]["character"] == 0.0 and r["character_consistency"]["absent"] == r["character_consistency"]["pairs"]
    assert r["summary"]["attribute_character_colour"] == 0.0 and r["summary"]["attribute_scene"] == 0.0


def test_pairs_and_recall_flags():
    assert [s.characters for s in recall_story().shots] == [(0,), (1,), (2,), (0,)]
    assert sorted(metrics.character_pairs(recall_story())) == [(0, 0, 3, True)]
    cast = [(0,), (0,), (1,), (0,)]  # a character kept across a cut, then recalled
    story = dataclasses.replace(
        recall_story(), shots=tuple(dataclasses.replace(s, characters=c) for s, c in zip(recall_story().shots, cast))
    )
    assert sorted(metrics.character_pairs(story)) == [(0, 0, 1, False), (0, 0, 3, True), (0, 1, 3, True)]
    assert metrics.vbench_consistency(np.eye(3)[[0, 0, 0]]) == 1.0
    assert metrics.vbench_consistency(np.eye(3)) == 0.0


def test_unknown_inputs_are_value_errors():
    frames = rendered()[0]
    with pytest.raises(ValueError, match="ground truth has 4"):
        evaluate_story(frames[:3], recall_story(), FEATURES)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_story([f.astype(np.float32) for f in frames], None, FEATURES)


def _write_run(folder: Path, frames: list[np.ndarray]) -> Path:
    for i, f in enumerate(frames):
        write_mp4(folder / shot_name(i, ".mp4"), f, 8)
    (folder / "manifest.json").write_text(json.dumps({"shots": [{"shot": i + 1} for i in range(len(frames))]}))
    return folder


def test_cli_run_with_truth(tmp_path, capsys):
    frames, masks = rendered()
    synthetic.save_synthetic(tmp_path / "truth", recall_story())
    run = _write_run(tmp_path / "run", frames)
    assert main(["--run", str(run), "--truth", str(tmp_path / "truth"), "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["feature"] == "colour-histogram+HOG-lite" and r["regions"] == "scene-colour segmentation"
    assert r["summary"]["character"] > 0.8 and r["summary"]["attribute_scene"] == 1.0, r["summary"]  # through H.264
    assert "character_recall" in capsys.readouterr().out
    assert main(["--run", str(run)]) == 0  # no ground truth: JSON on stdout, identity metrics unavailable
    r = json.loads(capsys.readouterr().out)
    assert r["character_consistency"]["status"] == "unavailable" and r["intra_shot"]["frame_consistency"] > 0.9


def test_cli_stories(tmp_path):
    for seed in (0, 1):
        story = synthetic.make_story(seed, n_shots=3)
        synthetic.save_synthetic(tmp_path / "stories" / f"s{seed}", story, synthetic.render_synthetic(story, FRAMES, SIZE))
    assert main(["--stories", str(tmp_path / "stories"), "--out", str(tmp_path / "s.json")]) == 0
    r = json.loads((tmp_path / "s.json").read_text())
    assert r["stories"] == 2 and r["mean"]["character"] > 0.95 and set(r["per_story"]) == {"s0", "s1"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "onestory_jax.eval", "--run", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: run directory '{tmp_path / 'missing'}' does not exist or is not a directory"
    ]
    (tmp_path / "afile").write_text("x")
    for argv, message in [
        (["--run", str(tmp_path), "--dinov2", str(tmp_path / "nowhere")], ""),
        (["--stories", str(tmp_path)], ""),
        # --out a folder or under a file: tracebacks once the run was scored; now refused first
        (["--run", str(tmp_path), "--out", str(tmp_path)], f"--out '{tmp_path}' is a folder"),
        (["--run", str(tmp_path), "--out", str(tmp_path / "afile" / "r.json")], "the folder of --out"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_cli(main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_gap_in_a_run_without_manifest_is_named(tmp_path):
    """shot_03.mp4 missing: shots 1, 2 and 4 were scored as a 3-shot story without a word."""
    from onestory_jax.eval.loading import load_run

    for i in (0, 1, 3):
        (tmp_path / shot_name(i, ".mp4")).write_bytes(b"")  # never read: the gap is found first
    with pytest.raises(UserError, match=r"lacks shot_03.mp4 \(it has shot_01.mp4, shot_02.mp4, shot_04.mp4\)"):
        load_run(tmp_path)


def test_dinov2_missing_folder():
    with pytest.raises(UserError, match="no config.json"):
        load_features(Path("/nonexistent/dinov2"))


@pytest.mark.slow
def test_dinov2_from_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    features = load_features(tmp_path / "dino")
    frames, masks = rendered()
    shots = recall_story().shots
    r = evaluate_story([frames[0], frames[3]], dataclasses.replace(recall_story(), shots=(shots[0], shots[3])), features)
    assert r["feature"] == "dinov2:dino" and r["character_consistency"]["pairs"] == 1
    f = features(frames[0][:2], masks[0][:2] > 0, crop=True)
    assert f.shape == (2, 32) and np.allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-5)


def test_a_truth_story_from_the_command_line_and_a_run_of_another_story(tmp_path, capsys):
    """`python -m onestory_jax.data.synthetic` writes the truth and the story sample.py renders; a run whose
    captions are not the truth's is refused (it was scored silently)."""
    from onestory_jax.sampling.story import load_story

    assert synthetic.main(["--seed", "5", "--stories", "2", "--shots", "3", "--out", str(tmp_path / "t")]) == 0
    truth = loading.load_truth(tmp_path / "t" / "s5")
    assert [s.caption for s in load_story(tmp_path / "t" / "s5" / "story.yaml").shots] == [s.caption for s in truth.shots]
    assert (tmp_path / "t" / "s6" / "story.json").is_file()
    frames, _ = rendered()
    run = _write_run(tmp_path / "run", frames)
    shots = [{"shot": i + 1, "caption": "A green diamond rests in the ocean shore."} for i in range(len(frames))]
    (run / "manifest.json").write_text(json.dumps({"shots": shots}))
    synthetic.save_synthetic(tmp_path / "truth", recall_story())
    with pytest.raises(UserError, match="shot 1 was rendered from 'A green diamond"):
        main(["--run", str(run), "--truth", str(tmp_path / "truth")])


def test_mean_ci_is_the_t_interval():
    """[1..5]: mean 3, sd 1.5811, t(0.975, 4) = 2.7764 (tables) -> half-width 1.9632; one value: no interval."""
    mean, half, n = metrics.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, n) == (3.0, 5) and half == pytest.approx(1.9632, abs=1e-4)
    assert metrics.mean_ci([0.5])[0] == 0.5 and np.isnan(metrics.mean_ci([0.5])[1])
