"""From a Wan2.1 release folder to a trained OneStory, end to end at tiny size on the CPU: a random
diffusers Wan I2V release (transformer, VAE, umT5, CLIP, tokenizer) converted with --component all,
sampled as converted, records prepared with it, train.py started from it, and the export sampled."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from unittest import mock

import jax
import numpy as np
import pytest
import yaml
from torch_refs import diffusers_dit, tiny_dit_config
from train_runs import cli, cli_output, main_output, train_env

from onestory_jax.config_files import CONFIG_DIR, load_config

STORY = {"settings": {"width": 32, "height": 32, "frames": 5, "steps": 2}, "shots": ["A cat.", "The same cat."]}


def run(argv, tmp_path, **env):
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "ONESTORY_CACHE": str(tmp_path / "cache"), **env},
    )


def sample(folder, tmp_path, capsys, *extra):
    """sample.py on the module's story in this process: a result like run's."""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(STORY))
    argv = ["--checkpoint", folder, "--story", tmp_path / "s.yaml", "--out", tmp_path / "out", "--no-progress", *extra]
    with mock.patch.dict(os.environ, {"ONESTORY_CACHE": str(tmp_path / "cache")}):
        code, out_text, err = cli_output("sample", argv, capsys)
    return subprocess.CompletedProcess([], code, out_text, err)


def sample_here(folder, tmp_path, capsys):
    """sample.py in this process (compiled programs are shared between a test's renders): a result like run's."""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(STORY))
    with mock.patch.dict(os.environ, {"ONESTORY_CACHE": str(tmp_path / "cache")}), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*RANDOM weights")  # a missing part fails the run
        code, out_text, err = cli_output(
            "sample", ["--checkpoint", folder, "--story", tmp_path / "s.yaml", "--out", tmp_path / "out", "--no-progress"], capsys
        )
    return subprocess.CompletedProcess([], code, out_text, err)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random Wan2.1-I2V release in the diffusers layout."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    src = tmp_path_factory.mktemp("Wan2.1-I2V-tiny-480P-Diffusers")
    dit = diffusers_dit(dataclasses.replace(tiny_dit_config("i2v"), image_dim=16))
    dit.save_pretrained(src / "transformer")
    AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).save_pretrained(src / "vae")
    UMT5EncoderModel(
        UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
    ).save_pretrained(src / "text_encoder")
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            hidden_act="gelu",
        )
    ).save_pretrained(src / "image_encoder")
    shutil.copytree(CONFIG_DIR / "tokenizers" / "bytes", src / "tokenizer")
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0})
    )
    return src


@pytest.fixture(scope="module")
def model_folder(release, tmp_path_factory):
    """The release converted with --component all and --verify, in this process (the release's torch
    modules are imported already: a subprocess spent half its time importing them again)."""
    from onestory_jax.convert.__main__ import main

    folder = tmp_path_factory.mktemp("converted") / "wan"
    argv = ["--component", "all", "--source", str(release), "--out", str(folder), "--config", "tiny", "--verify"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    assert out.getvalue().count("OK") == 4, out.getvalue()  # the DiT and the three frozen parts, each against its reference
    return folder


def test_convert_all_writes_one_model_folder_with_wans_recipe(model_folder):
    from onestory_jax.checkpoint import stored_keys
    from onestory_jax.models.folder import folder_config

    assert sorted(p.name for p in model_folder.iterdir()) == ["image_encoder", "onestory", "text_encoder", "tokenizer", "vae"]
    assert stored_keys(model_folder / "onestory") == {"dit"}  # no OneStory modules yet
    sampler = folder_config(model_folder).sampler
    assert (sampler.steps, sampler.shift, sampler.guidance) == (40, 3.0, 5.0)
    assert sampler.negative_prompt.startswith("镜头晃动，色调艳丽")  # Wan's I2V negative prompt, not the training null


def test_story_from_converted_release(model_folder, tmp_path, capsys):
    r = sample_here(model_folder, tmp_path, capsys)
    assert r.returncode == 0, r.stderr
    assert "no OneStory modules" in r.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["dit"]["num_layers"] == 2 and len(manifest["shots"]) == 2
    assert len(list((tmp_path / "cache" / "text_embeddings").glob("*.npy"))) == 3  # 2 captions + Wan's negative prompt


@pytest.mark.parametrize("case", ["misnamed", "missing"])
def test_incomplete_folder_is_refused_unless_random_is_asked(model_folder, tmp_path, case, capsys):
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    if case == "misnamed":
        (folder / "text_encoder").rename(folder / "umt5")
    else:
        shutil.rmtree(folder / "image_encoder")
    r = sample(folder, tmp_path, capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("holds umt5/" if case == "misnamed" else "lacks image_encoder/") in r.stderr
    if case == "missing":
        with pytest.warns(UserWarning, match="lacks image_encoder/: using RANDOM weights"):
            r = sample(folder, tmp_path, capsys, "--allow-random")
        assert r.returncode == 0, r.stderr


def test_train_from_the_converted_release_and_sample_the_export(model_folder, tmp_path, capsys):
    from onestory_jax.checkpoint import load_params
    from onestory_jax.data import synthetic
    from onestory_jax.data.video import write_mp4
    from onestory_jax.models.folder import folder_config
    from onestory_jax.models.onestory import init_fn
    from onestory_jax.sharding import make_mesh

    videos, captions = tmp_path / "videos", []
    videos.mkdir()
    for i in range(3):  # three 3-shot videos, cut by PySceneDetect (no --boundaries)
        story = synthetic.make_story(i, 3)
        write_mp4(videos / f"v{i}.mp4", np.concatenate([v for v, _ in synthetic.render_synthetic(story, 9, 32)]), 8)
        captions.append({"video": f"v{i}.mp4", "captions": [s.caption for s in story.shots]})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    argv = [
        sys.executable,
        "-m",
        "onestory_jax.data.prepare",
        "--model",
        str(model_folder),
        "--out",
        str(tmp_path / "data"),
        "--videos",
        str(videos),
        "--captions",
        str(tmp_path / "captions.jsonl"),
        "--frames",
        "5",
        "--size",
        "32x32",
        "--no-progress",
    ]
    shards = [
        subprocess.Popen([*argv, "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # two processes at once on one --out
    for p in shards:
        _, err = p.communicate()
        assert p.returncode == 0, err
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [v["id"] for v in manifest["videos"]] == ["v0", "v1", "v2"]  # the union of both shards
    # The DiT frozen but for a LoRA beside the memory modules (the single-GPU recipe): the export folds
    # the LoRA into the DiT, and every other DiT weight must be the converted one, bit for bit.
    workdir = tmp_path / "run"
    r = run(
        [
            "train.py",
            "--config",
            "configs/train/tiny.yaml",
            "--workdir",
            str(workdir),
            "--no-progress",
            f"train.data={tmp_path / 'data' / 'records'}",
            f"train.init_from={model_folder}",
            "train.steps=2",  # one update: lr 0 at step 0 (warm-up)
            "dit.lora_rank=2",
            'train.trainable=["^memory/", "/lora_[ab]$"]',
            "mesh.data=2",
            "mesh.fsdp=1",
        ],
        tmp_path,
        **train_env(devices=2),
    )
    assert r.returncode == 0, r.stderr
    export = workdir / "model"
    assert sorted(p.name for p in export.iterdir()) == ["image_encoder", "onestory", "text_encoder", "tokenizer", "vae"]
    assert folder_config(export).dit.lora_rank == 0  # merged: a plain DiT
    cfg = load_config("tiny")
    mesh = make_mesh(cfg.mesh)
    tuned = load_params(export / "onestory", mesh, init_fn(cfg))["dit"]  # DiT and memory modules
    converted = load_params(model_folder / "onestory", mesh, init_fn(cfg, ["dit"]))["dit"]
    merged_into = set(load_config("tiny", ["dit.lora_rank=2"]).dit.lora_targets)

    def unchanged_unless_merged(path, a, b):
        keys = [k.key for k in path]
        if not (keys[0] == "blocks" and keys[-2] in merged_into and keys[-1] == "kernel"):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(unchanged_unless_merged, tuned, converted)
    assert not np.array_equal(tuned["blocks"]["ffn"]["fc1"]["kernel"], converted["blocks"]["ffn"]["fc1"]["kernel"])
    r = sample_here(export, tmp_path, capsys)  # the export samples as is: no missing part, no --allow-random
    assert r.returncode == 0 and "RANDOM" not in r.stderr + r.stdout, r.stderr
    assert "no OneStory modules" not in r.stdout


def test_a_wan_sized_run_needs_init_from(tmp_path, capsys):
    argv = ["--config", "configs/train/wan2.1-i2v-14b-480p.yaml", "--workdir", tmp_path / "w"]
    code, err = cli("train", argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "train.init_from is empty" in err, err
    assert "from_scratch" in err


def test_frozen_component_bad_source(tmp_path, capsys):
    from onestory_jax.convert.__main__ import main

    code, _, err = main_output(main, ["--component", "vae", "--source", tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no vae weights" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_model_folder_without_tokenizer_is_one_line(model_folder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    shutil.rmtree(folder / "tokenizer")
    r = sample(folder, tmp_path, capsys)
    assert r.returncode == 2 and "no tokenizer/" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_embedding_cache_is_keyed_by_the_tokenizer(model_folder, tmp_path):
    from onestory_jax.config_files import load_config
    from onestory_jax.sampling.components import text_cache

    cfg, weights = load_config("tiny"), model_folder / "text_encoder" / "params"
    other = tmp_path / "tok"
    shutil.copytree(model_folder / "tokenizer", other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"a"', '"b"', 1) + " ")
    assert text_cache(cfg, weights, model_folder / "tokenizer").identity != text_cache(cfg, weights, other).identity
    assert (
        text_cache(cfg, weights, model_folder / "tokenizer").identity
        == text_cache(cfg, weights, model_folder / "tokenizer").identity
    )
