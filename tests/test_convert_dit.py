"""The DiT conversion command: safetensors folders in both layouts -> orbax checkpoint, against diffusers."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file
from torch_refs import diffusers_dit, run_diffusers_dit, state_dict_numpy, to_original_layout

from onestory_jax.checkpoint import load_config_from_checkpoint, load_params, save_model
from onestory_jax.config import Config, DiTRuntime, MeshConfig
from onestory_jax.config_files import load_config
from onestory_jax.convert.__main__ import main
from onestory_jax.convert.dit import DIT, convert
from onestory_jax.convert.dit_source import dit_config_from_diffusers, dit_config_from_original
from onestory_jax.convert.safetensors_io import SafetensorsFile
from onestory_jax.errors import UserError, run_cli
from onestory_jax.models.dit import WanDiT, init_fn
from onestory_jax.sharding import make_mesh

# Orbax, after failing to read a corrupt checkpoint, lets tensorstore callbacks hit its closed event
# loop ("Event loop is closed", reported as unraisable in whichever test runs next): harmless noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = Path(__file__).resolve().parent.parent
TINY = load_config("tiny")  # the tiny DiT with encoder configs that fit it


def _save_pretrained(cfg, seed, path):
    model = diffusers_dit(cfg, seed=seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def diffusers_source(tmp_path_factory):
    """A tiny I2V model written by diffusers' own `save_pretrained` (one safetensors file)."""
    path = tmp_path_factory.mktemp("src") / "tiny-diffusers"
    return TINY.dit, _save_pretrained(TINY.dit, 1, path), path, ["--config", "tiny"]


@pytest.fixture(scope="module")
def diffusers_t2v_source(tmp_path_factory):
    cfg = dataclasses.replace(TINY.dit, model_type="t2v", in_dim=16, image_dim=None)
    path = tmp_path_factory.mktemp("src") / "tiny-diffusers-t2v"
    return cfg, _save_pretrained(cfg, 2, path), path, ["--config", "tiny"]


@pytest.fixture(scope="module")
def original_source(tmp_path_factory):
    """A narrow I2V model in the original Wan layout: two shards, an index and the published config.json format.

    Text and image widths are the published ones (4096, 1280), so the default config fits it.
    """
    cfg = dataclasses.replace(TINY.dit, text_dim=4096, image_dim=1280)
    model = diffusers_dit(cfg, seed=3)
    sd = to_original_layout(state_dict_numpy(model))
    path = tmp_path_factory.mktemp("src") / "tiny-original"
    path.mkdir()
    names, weight_map = sorted(sd), {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "_diffusers_version": "0.30.0",
                "model_type": "i2v",
                "dim": cfg.dim,
                "eps": 1e-6,
                "ffn_dim": cfg.ffn_dim,
                "freq_dim": cfg.freq_dim,
                "in_dim": cfg.in_dim,
                "num_heads": cfg.num_heads,
                "num_layers": cfg.num_layers,
                "out_dim": cfg.out_dim,
                "text_len": 512,
            }
        )
    )
    return cfg, model, path, []


def _one_device_mesh():
    return make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("which", ["diffusers_source", "original_source"])
def test_convert_and_verify_matches_diffusers(which, request, tmp_path, capsys):
    cfg, model, src, args = request.getfixturevalue(which)
    out = tmp_path / "ckpt"
    assert main(["--component", "dit", "--source", str(src), "--out", str(out), *args, "--verify"]) == 0
    assert "OK" in capsys.readouterr().out

    config = load_config_from_checkpoint(out)
    assert config.name == src.name and config.dit == cfg
    params = load_params(out, _one_device_mesh(), init_fn(config.dit, config.dit_runtime))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 4, 6, cfg.in_dim)).astype(np.float32)
    text = rng.standard_normal((1, 512, cfg.text_dim)).astype(np.float32)
    image = rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32) if cfg.has_image_branch else None
    t = np.array([500], np.int64)
    ref = run_diffusers_dit(model, x, t, text, image)
    ours = np.asarray(WanDiT(cfg, DiTRuntime()).apply({"params": params}, x, t, text, image))
    assert np.abs(ours - ref).max() / ref.std() < 1e-4


def test_restore_on_one_device_equals_conversion(diffusers_source, tmp_path):
    cfg, model = diffusers_source[:2]
    sd = state_dict_numpy(model)
    converted = convert(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    save_model(tmp_path / "ckpt", converted, TINY)
    restored = load_params(tmp_path / "ckpt", _one_device_mesh(), init_fn(TINY.dit, TINY.dit_runtime))
    assert jax.tree.structure(restored) == jax.tree.structure(converted)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(converted)):
        assert len(a.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a), b)


def test_bfloat16_storage_verifies(diffusers_t2v_source, tmp_path, capsys):
    out = tmp_path / "ckpt"
    argv = [
        "--component",
        "dit",
        "--source",
        str(diffusers_t2v_source[2]),
        "--out",
        str(out),
        "--config",
        "tiny",
        "--dtype",
        "bfloat16",
    ]
    assert main([*argv, "--verify"]) == 0
    assert "OK" in capsys.readouterr().out
    config = load_config_from_checkpoint(out)
    assert config.dit_runtime.param_dtype == "bfloat16"
    params = load_params(out, _one_device_mesh(), init_fn(config.dit, config.dit_runtime))
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    return exc.value.code, capsys.readouterr().err


def _bad_sources(diffusers_source, root: Path) -> dict[str, Path]:
    src = diffusers_source[2]
    other = root / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    truncated = Path(shutil.copytree(src, root / "truncated"))
    weights = truncated / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    mismatched = Path(shutil.copytree(src, root / "mismatched"))
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    from safetensors.numpy import load_file, save_file

    broken = {}
    for case, spoil in (
        ("nan weights", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(a.dtype)),
        ("integer weights", lambda a: a.astype(np.int32)),
    ):
        folder = Path(shutil.copytree(src, root / case.replace(" ", "-")))
        tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
        name = sorted(tensors)[0]
        save_file({**tensors, name: spoil(tensors[name])}, folder / "diffusion_pytorch_model.safetensors")
        broken[case] = folder
    return {
        "wrong dir": root / "nowhere",
        "another architecture": other,
        "truncated": truncated,
        "config not matching weights": mismatched,
        **broken,
    }


def test_bad_inputs_fail_with_one_line(diffusers_source, tmp_path, capsys):
    expected = {
        "wrong dir": "is not a directory",
        "another architecture": "UNet2DConditionModel",
        "truncated": "truncated",
        "config not matching weights": "missing: blocks.2.",
        "nan weights": "holds NaN or Inf",
        "integer weights": "holds int32 values",
    }
    for case, src in _bad_sources(diffusers_source, tmp_path).items():
        out = tmp_path / "out" / case.replace(" ", "-")
        code, err = _run_cli(["--component", "dit", "--source", str(src), "--out", str(out), "--config", "tiny"], capsys)
        assert code == 2, case
        err = err.split("\r")[-1]  # after the progress bar of a source whose keys were right
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (case, err)
        assert expected[case] in err, (case, err)
        assert not out.exists() and not (tmp_path / "out").exists(), case


def test_module_entry_point_reports_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "onestory_jax.convert", "--source", str(tmp_path / "nowhere"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_out_dir_is_not_overwritten_without_force(diffusers_source, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["--component", "dit", "--source", str(diffusers_source[2]), "--out", str(out), "--config", "tiny"]
    code, err = _run_cli(argv, capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, err = _run_cli([*argv, "--force"], capsys)  # --force replaces a checkpoint, not the user's files
    assert code == 2 and "holds more than a checkpoint (keep.txt)" in err and err.count("\n") == 1, err
    (out / "keep.txt").unlink()
    assert main([*argv, "--force"]) == 0
    assert main([*argv, "--force"]) == 0  # a checkpoint it wrote is replaced
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "params"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old copies left


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError):  # an object() leaf has no shape
        save_model(tmp_path / "ckpt", {"a": object()}, Config())
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_checkpoint_is_a_user_error(diffusers_source, tmp_path):
    cfg = diffusers_source[0]
    with pytest.raises(UserError, match="is not a checkpoint"):
        load_config_from_checkpoint(tmp_path)
    sd = state_dict_numpy(diffusers_source[1])
    save_model(tmp_path / "ckpt", convert(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers"), TINY)
    deeper = dataclasses.replace(TINY, dit=dataclasses.replace(cfg, num_layers=3))
    with pytest.raises(UserError, match=r"\(2, .*!= expected \(3, "):
        load_params(tmp_path / "ckpt", _one_device_mesh(), init_fn(deeper.dit, deeper.dit_runtime))
    shutil.rmtree(tmp_path / "ckpt" / "params" / "d")
    with pytest.raises(UserError, match="corrupt or incomplete"):
        load_params(tmp_path / "ckpt", _one_device_mesh(), init_fn(TINY.dit, TINY.dit_runtime))


def test_reader_dtypes_match_torch(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "empty": torch.zeros(0, 3),
    }
    save_torch_file(tensors, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert f.shapes == {k: tuple(v.shape) for k, v in tensors.items()}
    for name, t in tensors.items():
        np.testing.assert_array_equal(f.read(name).astype(np.float64), t.double().numpy())
    assert f.read("bf16").dtype == ml_dtypes.bfloat16


# Published configs: Wan-AI/Wan2.1-*-Diffusers transformer/config.json and the original release config.json.
FULL_SIZE = {
    "wan2.1-i2v-14b-480p": (
        dict(
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=36,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=1280,
            added_kv_proj_dim=5120,
            rope_max_seq_len=1024,
            patch_size=[1, 2, 2],
        ),
        dict(
            _class_name="WanModel",
            dim=5120,
            eps=1e-6,
            ffn_dim=13824,
            freq_dim=256,
            in_dim=36,
            model_type="i2v",
            num_heads=40,
            num_layers=40,
            out_dim=16,
            text_len=512,
        ),
    ),
    "wan2.1-t2v-1.3b": (
        dict(
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=None,
            added_kv_proj_dim=None,
            rope_max_seq_len=1024,
            patch_size=[1, 2, 2],
        ),
        dict(
            _class_name="WanModel",
            dim=1536,
            eps=1e-6,
            ffn_dim=8960,
            freq_dim=256,
            in_dim=16,
            model_type="t2v",
            num_heads=12,
            num_layers=30,
            out_dim=16,
            text_len=512,
        ),
    ),
}


@pytest.mark.parametrize("preset", sorted(FULL_SIZE))
def test_full_size_key_map(preset):
    diffusers_config, original_config = FULL_SIZE[preset]
    cfg = load_config(preset).dit  # the architecture alone: the preset's runtime settings are dit_runtime's
    assert dit_config_from_diffusers(diffusers_config) == cfg
    assert dit_config_from_original(original_config) == cfg
    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    DIT.check(cfg, shapes, "diffusers")
    DIT.check(cfg, to_original_layout(shapes), "original")


def test_a_pth_holding_no_state_dict_is_one_line(tmp_path):
    """A .pth of a list (the probe's case) was a traceback."""
    from onestory_jax.convert.frozen_components import TorchFile

    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        TorchFile(tmp_path / "list.pth")
