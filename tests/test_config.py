"""The config schema (config.py) and its reading (config_files.py): the DiT's architecture (`dit`) apart from
its runtime settings (`dit_runtime`), and the old `dit.<runtime field>` paths read at their new place."""

import dataclasses
from pathlib import Path

import jax
import pytest

from onestory_jax.checkpoint import load_config_from_checkpoint
from onestory_jax.config import Config, DiTConfig, DiTRuntime
from onestory_jax.config_files import MOVED_KEYS, apply_overrides, from_dict, load_config, to_dict
from onestory_jax.errors import UserError
from onestory_jax.models.dit import init_fn

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_FIELDS = [f.name for f in dataclasses.fields(DiTRuntime)]
# A value other than the default for every runtime field.
OTHER = {
    "dtype": "bfloat16",
    "param_dtype": "bfloat16",
    "remat_policy": "full",
    "attention": "chunked",
    "sequence_parallel": "gspmd",
    "weights_dtype": "fp8",
    "fp8_layers": "all",
    "offload": "blocks",
}


def test_architecture_and_runtime_are_apart():
    assert sorted(OTHER) == sorted(RUNTIME_FIELDS)
    assert not {f.name for f in dataclasses.fields(DiTConfig)} & set(RUNTIME_FIELDS)
    tiny = load_config("tiny")
    changed = load_config("tiny", [f"dit_runtime.{k}={v}" for k, v in OTHER.items()])
    assert changed.dit == tiny.dit  # a run's settings leave the architecture (what a checkpoint fixes) alone
    assert changed.dit_runtime == DiTRuntime(**OTHER)
    assert "dtype" not in to_dict(changed)["dit"] and to_dict(changed)["dit_runtime"]["attention"] == "chunked"


def test_runtime_settings_change_no_parameter_shape():
    """Compute dtype, storage dtype, remat, attention, sequence parallelism: the same parameter tree and shapes."""
    cfg = load_config("tiny").dit
    shapes = lambda rt: jax.tree.map(lambda a: a.shape, jax.eval_shape(init_fn(cfg, rt), jax.random.key(0)))  # noqa: E731
    other = DiTRuntime(**{k: OTHER[k] for k in ("dtype", "param_dtype", "remat_policy", "attention", "sequence_parallel")})
    assert shapes(other) == shapes(DiTRuntime())


@pytest.mark.parametrize("field", RUNTIME_FIELDS)
def test_an_old_dit_path_reads_into_dit_runtime(field):
    old, new = f"dit.{field}", f"dit_runtime.{field}"
    assert MOVED_KEYS[old] == new
    value = OTHER[field]
    assert load_config("tiny", [f"{old}={value}"]) == load_config("tiny", [f"{new}={value}"])
    assert getattr(load_config("tiny", [f"{old}={value}"]).dit_runtime, field) == value
    cfg = from_dict(Config, {"dit": {"dim": 48, "num_heads": 4, field: value}})  # a checkpoint's config.yaml of before
    assert cfg.dit.dim == 48 and getattr(cfg.dit_runtime, field) == value


def test_old_paths_in_preset_files_and_base_inheritance(tmp_path):
    """A file's own keys override its base's whichever path either uses."""
    old = tmp_path / "old.yaml"
    old.write_text("base: wan2.1-i2v-14b-480p\ndit:\n  attention: cudnn\n  num_layers: 2\n")
    cfg = load_config(str(old))
    assert cfg.dit.num_layers == 2
    assert (cfg.dit_runtime.attention, cfg.dit_runtime.dtype) == ("cudnn", "bfloat16")  # the base's dtype kept
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {old}\ndit_runtime:\n  attention: chunked\n")
    assert load_config(str(child)).dit_runtime.attention == "chunked"
    assert load_config(str(child), ["dit.attention=xla"]).dit_runtime.attention == "xla"


def test_a_key_at_both_paths_is_refused_unless_equal():
    with pytest.raises(UserError, match=r"'dit.attention' \(now 'dit_runtime.attention'\) is given at both paths"):
        from_dict(Config, {"dit": {"attention": "cudnn"}, "dit_runtime": {"attention": "xla"}})
    same = from_dict(Config, {"dit": {"attention": "cudnn"}, "dit_runtime": {"attention": "cudnn"}})
    assert same.dit_runtime.attention == "cudnn"
    with pytest.raises(UserError, match="unknown config key 'dit.atention'"):
        load_config("tiny", ["dit.atention=cudnn"])
    with pytest.raises(UserError, match="'dit_runtime' is a section"):
        apply_overrides({}, ["dit_runtime=cudnn"])


@pytest.mark.parametrize("folder", ["demo", "ablation/onestory", "ablation/none"])
def test_shipped_model_folders_written_before_the_split_load(folder):
    cfg = load_config_from_checkpoint(ROOT / "models" / folder / "onestory")  # (written with the runtime inside dit)
    assert cfg.dit_runtime == DiTRuntime() and cfg.dit.dim == load_config("demo").dit.dim
    assert from_dict(Config, to_dict(cfg)) == cfg  # and written back in the new layout
