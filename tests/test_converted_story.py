"""A story from converted PyTorch weights: DiT + VAE + umT5 + CLIP in one model folder."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from torch_refs import diffusers_dit, tiny_dit_config

from onestory_jax.config import CONFIG_DIR


def convert(component, source, out):
    r = subprocess.run([sys.executable, "-m", "onestory_jax.convert", "--component", component, "--source", str(source),
                        "--out", str(out), "--config", "tiny", "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    src, folder = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("model")
    cfg = tiny_dit_config("i2v")
    dit = diffusers_dit(dataclasses.replace(cfg, image_dim=16))
    dit.save_pretrained(src / "transformer")
    AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(src / "vae")
    UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu")).save_pretrained(src / "text_encoder")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=28, patch_size=14, hidden_act="gelu")).save_pretrained(src / "image_encoder")
    for component, part in (("dit", "dit"), ("vae", "vae"), ("umt5", "text_encoder"), ("clip", "image_encoder")):
        convert(component, src, folder / part)
    shutil.copytree(CONFIG_DIR / "tokenizers" / "bytes", folder / "tokenizer")
    return folder


def test_story_from_converted_weights_warns_and_renders(model_folder, tmp_path):
    story = {"settings": {"width": 32, "height": 32, "frames": 5, "steps": 2}, "shots": ["A cat.", "The same cat."]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(story))
    env = {**os.environ, "ONESTORY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(model_folder), "--story", str(tmp_path / "s.yaml"),
                        "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "no OneStory modules" in r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["dit"]["num_layers"] == 2 and len(manifest["shots"]) == 2
    assert len(list((tmp_path / "cache" / "text_embeddings").glob("*.npy"))) == 2  # 2 captions; the default negative prompt "" is the null text (zeros), not encoded


def test_frozen_component_bad_source(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onestory_jax.convert", "--component", "vae", "--source", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "no vae weights" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_model_folder_without_tokenizer_is_one_line(model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    shutil.rmtree(folder / "tokenizer")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"shots": ["A cat."]}))
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(folder), "--story", str(tmp_path / "s.yaml"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "no tokenizer/" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_embedding_cache_is_keyed_by_the_tokenizer(model_folder, tmp_path):
    from onestory_jax.config import load_config
    from onestory_jax.sampling.components import text_cache

    cfg, weights = load_config("tiny"), model_folder / "text_encoder" / "params"
    other = tmp_path / "tok"
    shutil.copytree(model_folder / "tokenizer", other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"a"', '"b"', 1) + " ")
    assert text_cache(cfg, weights, model_folder / "tokenizer").identity != text_cache(cfg, weights, other).identity
    assert text_cache(cfg, weights, model_folder / "tokenizer").identity == text_cache(cfg, weights, model_folder / "tokenizer").identity
