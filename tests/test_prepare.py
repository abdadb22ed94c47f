"""Data preparation (videos or synthetic stories -> records), the shot detector and the VAE stage."""

import io
import json
import os
import subprocess
import warnings

import numpy as np
import pytest
from train_runs import main_output, random_videos

from onestory_jax.config_files import load_config
from onestory_jax.data import synthetic
from onestory_jax.data.pipeline import make_dataset
from onestory_jax.data.prepare import augment, real_videos
from onestory_jax.data.prepare import main as prepare_main
from onestory_jax.data.records import decode_record, encode_record, write_records
from onestory_jax.data.video import detect_shots, write_mp4
from onestory_jax.errors import UserError
from onestory_jax.sampling.components import random_params
from onestory_jax.sharding import activate, make_mesh
from onestory_jax.training.vae_stage import export_frozen_parts, train_vae

SIZE = "32x32"


def story_video() -> tuple[np.ndarray, list[str]]:
    """Three shots of 9 frames at 32x32 in three scenes, cut together, and their captions."""
    story = synthetic.make_story(0, 3)
    shots = synthetic.render_synthetic(story, frames=9, size=32)
    return np.concatenate([v for v, _ in shots]), [s.caption for s in story.shots]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model folder of frozen parts (random weights), as the VAE stage exports it."""
    cfg = load_config("tiny")
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        params = random_params(cfg, mesh, 0)
    return export_frozen_parts(cfg, params, tmp_path_factory.mktemp("model") / "model")


def prepare(capsys, *args) -> subprocess.CompletedProcess:
    """`python -m onestory_jax.data.prepare` at the tests' size, run in this process (its programs compile once)."""
    code, out, err = main_output(prepare_main, ["--no-progress", "--size", SIZE, "--frames", "5", *args], capsys)
    return subprocess.CompletedProcess([], code, out, err)


def test_shot_detector_finds_the_cuts(tmp_path):
    video, _ = story_video()
    write_mp4(tmp_path / "v.mp4", video, 8)
    assert detect_shots(tmp_path / "v.mp4", len(video)) == [(0, 9), (9, 18), (18, 27)]
    write_mp4(tmp_path / "one.mp4", video[:9], 8)
    assert detect_shots(tmp_path / "one.mp4", 9) == [(0, 9)]  # no cut: one shot


def test_augment_mirrors_the_width_axis_and_keeps_channel_order():
    """The augmented first shot is a horizontal flip (plus crop and jitter), never a channel swap:
    colour is a character's identity in the synthetic world."""
    red, green, blue, yellow = ([1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1])
    clip = np.empty((2, 32, 32, 3), np.float32)
    clip[:, :16, :16], clip[:, :16, 16:], clip[:, 16:, :16], clip[:, 16:, 16:] = red, green, blue, yellow
    mirrored = {(0, 0): green, (0, 1): red, (1, 0): yellow, (1, 1): blue}  # (row, column) quadrant -> colour
    for seed in range(8):
        out = augment(clip, np.random.default_rng(seed))
        assert out.shape == clip.shape and np.abs(out).max() <= 1
        for (r, c), colour in mirrored.items():  # corners: inside their quadrant whatever the 80-100% crop
            corner = out[:, r * 28 : r * 28 + 4, c * 28 : c * 28 + 4]
            np.testing.assert_array_equal(np.sign(corner), np.broadcast_to(np.float32(colour), corner.shape))


def test_videos_become_records_and_a_rerun_resumes(tmp_path, model_folder, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    video, captions = story_video()
    write_mp4(videos / "clip.mp4", video, fps=8)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"video": "clip.mp4", "captions": captions}) + "\n")
    out = tmp_path / "prepared"
    args = ["--model", model_folder, "--out", out, "--videos", videos, "--captions", tmp_path / "captions.jsonl"]
    r = prepare(capsys, *args)
    assert r.returncode == 0, r.stderr
    record = out / "records" / "clip.arrayrecord"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["id"] for v in manifest["videos"]] == ["clip"] and manifest["embedders"] == ["pixel"]
    cfg = load_config("configs/train/tiny.yaml", [f"train.data={out / 'records'}", "train.insertion_prob=0"])
    batch = next(iter(make_dataset(cfg, 2)))
    assert batch["target"].shape == (2, 2, 4, 4, 16) and batch["memory"].shape == (2, 4, 4, 4, 16)
    assert np.isfinite(batch["labels"]).all()
    mtime = record.stat().st_mtime_ns
    assert prepare(capsys, *args).returncode == 0
    assert record.stat().st_mtime_ns == mtime  # skipped, not rewritten


def test_inserted_shot_never_comes_from_the_same_video(tmp_path):
    """Shot inflation's "shot from another video" (pseudo-label -1) is never the video itself."""
    videos = random_videos(2, 2, 2, (4, 4), 32, (4, 16))
    write_records(tmp_path / "two.arrayrecord", videos)
    cfg = load_config(
        "configs/train/tiny.yaml",
        [f"train.data={tmp_path / 'two.arrayrecord'}", "train.insertion_prob=1", "train.swap_order_prob=0"],
    )
    it = iter(make_dataset(cfg, 2))
    for _ in range(16):
        batch = next(it)
        for target, inserted in zip(batch["target"], batch["memory"][:, 2:]):
            own = next(v for v in videos if np.array_equal(v["latents"][1], target))
            other = next(v for v in videos if v is not own)
            assert any(np.array_equal(inserted, shot) for shot in other["latents"])
    write_records(tmp_path / "one.arrayrecord", videos[:1])
    cfg = load_config("configs/train/tiny.yaml", [f"train.data={tmp_path / 'one.arrayrecord'}", "train.insertion_prob=1"])
    with pytest.raises(UserError, match="only one video"):
        next(iter(make_dataset(cfg, 1)))


def test_training_data_warns_when_selection_would_keep_the_whole_memory(tmp_path):
    """The demo's data (make demo-model: 9-frame shots at 64x64) gives memories of 2 shots x 3 latent frames
    at 8x8; the shipped demo conditioner keeps K = 10 >= 6 frames there, so selection never drops one."""
    write_records(tmp_path / "demo.arrayrecord", random_videos(1, 2, 3, (8, 8), 64, (4, 32)))
    data = f"train.data={tmp_path / 'demo.arrayrecord'}"
    with pytest.warns(UserWarning, match="K=10 frames at 8x8 latents.*holds 6.*never drops a frame"):
        make_dataset(load_config("demo", [data]), 1)
    smaller = load_config("demo", [data, "memory.frames_per_patchifier=[1,4]"])  # K = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dataset(smaller, 1)


def test_records_of_an_older_version_are_refused_in_one_line():
    video = random_videos(1, 2, 2, (4, 4), 32, (4, 16))[0]
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in video.items() if k not in ("first_image", "shot_keys")})
    with pytest.raises(
        UserError, match="record 3 was prepared by an older version .*first_image, shot_keys.*prepare the data again"
    ):
        decode_record(buf.getvalue(), 3)
    assert decode_record(encode_record(video), 0)["shot_keys"].tolist() == [0, 1]


def test_bad_inputs_are_one_clear_line(tmp_path, model_folder, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    video, captions = story_video()
    write_mp4(videos / "clip.mp4", video, fps=8)
    (tmp_path / "c.jsonl").write_text(json.dumps({"video": "clip.mp4", "captions": captions[:1]}) + "\n")
    r = prepare(capsys, "--model", model_folder, "--out", tmp_path / "o", "--videos", videos, "--captions", tmp_path / "c.jsonl")
    assert r.returncode == 2 and "3 shots but 1 captions" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = prepare(capsys, "--model", tmp_path, "--out", tmp_path / "o", "--synthetic", "1")
    assert r.returncode == 2 and "not a part of a model folder" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_synthetic_stories_prepare(tmp_path, model_folder, capsys):
    r = prepare(capsys, "--model", model_folder, "--out", tmp_path / "syn", "--synthetic", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "syn" / "records").glob("*.arrayrecord"))) == 2
    # A re-run with other --frames/--size would mix record shapes: refused from the manifest, before any model...
    again = ["--model", str(model_folder), "--out", str(tmp_path / "syn"), "--synthetic", "3", "--seed", "1", "--no-progress"]
    with pytest.raises(UserError, match=r"was prepared with other settings \(frames 5 -> 9, size \[32, 32\] -> \[64, 64\]\)"):
        prepare_main([*again, "--frames", "9", "--size", "64x64"])
    # ...and from each kept record when the manifest is gone (a first run killed before writing it)
    (tmp_path / "syn" / "manifest.json").unlink()
    with pytest.raises(
        UserError,
        match=r"synthetic-000001.arrayrecord' holds latents of 2 frames of 4x4 but this run "
        r"makes 3 of 4x4 \(other --frames or --size\)",
    ):
        prepare_main([*again, "--frames", "9", "--size", "32x32"])
    record = tmp_path / "syn" / "records" / "synthetic-000002.arrayrecord"
    os.truncate(record, record.stat().st_size // 2)  # a damaged record is named, not a riegeli traceback
    with pytest.raises(UserError, match=rf"'{record}' is not a readable ArrayRecord file \(corrupt or truncated\?\)"):
        prepare_main([*again, "--frames", "5", "--size", "32x32"])


def test_video_names_sharing_a_stem_are_refused(tmp_path):
    """`a.mp4` and `a.mov` would both be records/a.arrayrecord: the second was silently dropped."""
    for name in ("a.mp4", "a.mov", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"video": n, "captions": ["x"]}) + "\n" for n in ("a.mp4", "a.mov", "b.mp4"))
    )
    with pytest.raises(UserError, match=r"videos a.mov and a.mp4 would both become records/a.arrayrecord: rename one"):
        list(real_videos(tmp_path, tmp_path / "c.jsonl", None))


@pytest.mark.parametrize(
    "args,rows,message",
    [
        (["--frames", "-3"], {}, r"--frames must be 4k\+1 \(e.g. 17, 81\), got -3"),
        (["--size", "0x0"], {}, r"--size must be positive, got 0x0"),
        (["--synthetic", "-5"], {}, r"--synthetic must be >= 1, got -5"),
        ([], {"captions": "one two three"}, r"c.jsonl:1: .*captions must be a list of non-empty strings, got 'one two three'"),
        ([], {"shots": "0-5"}, r"b.jsonl:1: .*shots must be a list of \[start, end\] frame pairs of integers, got '0-5'"),
        ([], {"shots": [[0.5, 5], [5, 9]]}, r"b.jsonl:1: .*got \[\[0.5, 5\], \[5, 9\]\]"),
        ([], {"shots": [[0], [5, 9]]}, r"b.jsonl:1: .*frame pairs of integers"),
    ],
)
def test_bad_arguments_and_jsonl_values_are_one_line_before_any_model(tmp_path, args, rows, message):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"")  # never read: the inputs are refused first
    (tmp_path / "c.jsonl").write_text(json.dumps({"video": "clip.mp4", "captions": rows.get("captions", ["a", "b"])}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"video": "clip.mp4", "shots": rows.get("shots", [[0, 5], [5, 9]])}) + "\n")
    source = ["--videos", str(videos), "--captions", str(tmp_path / "c.jsonl"), "--boundaries", str(tmp_path / "b.jsonl")]
    with pytest.raises(UserError, match=message) as e:
        prepare_main(
            [
                "--model",
                str(tmp_path / "no-model"),
                "--out",
                str(tmp_path / "o"),
                *(args if "--synthetic" in args else source + args),
            ]
        )
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.multidevice
def test_vae_stage_learns_and_exports_the_frozen_parts(tmp_path, monkeypatch):
    from onestory_jax.training import vae_stage

    # The export measures the latent statistics on 2 of its held-out clips, their first 5 frames (1 + 4k):
    # the same measurement on a 27th of the frames (16 clips of 17 were a third of the test's time).
    measure = vae_stage.latent_statistics
    monkeypatch.setattr(vae_stage, "latent_statistics", lambda cfg, params, clips: measure(cfg, params, clips[:2, :5]))
    cfg = load_config(
        "tiny",
        [
            "train.stage=vae",
            "train.steps=12",
            "train.batch_size=2",
            "train.vae_stage.clip_size=16",
            "mesh.fsdp=2",
            "mesh.sequence=-1",  # the batch of 2 splits over data x fsdp
            "train.learning_rate=3e-3",
            "train.lr_warmup_steps=1",
            "train.log_every=1",
            "train.checkpoint_every=12",
        ],
    )
    first = train_vae(cfg, tmp_path / "w", progress=False, stop_after=1)
    assert not (tmp_path / "w" / "model").exists()  # exported only when the run is complete
    last = train_vae(cfg, tmp_path / "w", progress=False)  # resumes from step 1
    assert last["mse"] < first["mse"]
    model = tmp_path / "w" / "model"
    assert all((model / p).is_dir() for p in ("vae", "text_encoder", "image_encoder", "tokenizer"))
    saved = (model / "vae" / "config.yaml").read_text()
    assert "latents_mean: []" not in saved  # measured statistics travel with the VAE


def test_embedders_average_their_cosines_and_clip_loads_locally(tmp_path):
    """combined(): cosine of the concatenation = mean of the embedders' cosines (the paper's DINOv2 +
    CLIP average); a clip:PATH embedder loads a local transformers folder and never downloads."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from onestory_jax.data.embedders import combined, load_embedder

    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=8,
        )
    ).save_pretrained(tmp_path / "clip")
    _, clip = load_embedder(f"clip:{tmp_path / 'clip'}")
    _, pixel = load_embedder("pixel")
    frames = np.stack([v[0] for v, _ in synthetic.render_synthetic(synthetic.make_story(1, 3), frames=1, size=32)])
    assert clip(frames).shape == (3, 8)

    def cos(e):
        f = e(frames)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        return f[0] @ f[1]

    np.testing.assert_allclose(cos(combined([clip, pixel])), (cos(clip) + cos(pixel)) / 2, rtol=1e-5)
    with pytest.raises(Exception, match="not a local CLIP model folder"):
        load_embedder(f"clip:{tmp_path / 'missing'}")


def test_damaged_or_foreign_records_are_one_line_naming_the_file(tmp_path):
    """The probe's truncated, bit-flipped, random and PNG record files (riegeli RuntimeError tracebacks before),
    and records prepared for another model (a flax shape traceback before)."""
    write_records(tmp_path / "good.arrayrecord", random_videos(3, 2, 2, (4, 4), 32, (4, 16)))
    data = (tmp_path / "good.arrayrecord").read_bytes()
    flipped = bytearray(data)
    flipped[1000:1400] = bytes(b ^ 0xFF for b in flipped[1000:1400])
    damaged = {
        "trunc": data[: len(data) // 2],
        "flip": bytes(flipped),
        "garbage": np.random.default_rng(0).bytes(5000),
        "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
    }
    for name, content in damaged.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "train.arrayrecord"
        path.write_bytes(content)
        cfg = load_config("configs/train/tiny.yaml", [f"train.data={tmp_path / name}"])
        with pytest.raises(
            UserError,
            match=rf"'{path}' (is not a readable ArrayRecord file|cannot be read) \(corrupt or "
            r"truncated\?\)",
        ) as e:
            next(iter(make_dataset(cfg, 1)))
        assert "\n" not in str(e.value), name
    write_records(tmp_path / "other.arrayrecord", random_videos(2, 2, 2, (4, 4), 64, (4, 16)))
    cfg = load_config("configs/train/tiny.yaml", [f"train.data={tmp_path / 'other.arrayrecord'}"])
    with pytest.raises(
        UserError,
        match=r"other.arrayrecord' was prepared for another model: its text have width 64, "
        r"this config's dit.text_dim is 32",
    ):
        make_dataset(cfg, 1)
