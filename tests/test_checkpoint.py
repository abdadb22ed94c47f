"""Checkpoints and configs a user may break: a damaged or non-finite checkpoint, `--force` onto a
folder that is not a checkpoint, non-finite numbers and bad regexes in a config: one clear line each."""

import os

import jax
import numpy as np
import pytest

from onestory_jax.checkpoint import check_out_dir, restore_params, save_model
from onestory_jax.config import Config
from onestory_jax.config_files import load_config
from onestory_jax.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax after a failed read


def saved(path, params):
    """`params` saved as a checkpoint at `path`, and the abstract tree that restores it on one device."""
    save_model(path, params, Config())
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), params)


def test_truncated_checkpoint_is_one_line_naming_it(tmp_path):
    abstract = saved(tmp_path / "ck", {"w": np.random.default_rng(0).random((64, 256), np.float32)})
    data = max((p for p in (tmp_path / "ck" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(
        UserError,
        match=rf"checkpoint '{tmp_path / 'ck' / 'params'}' could not be restored "
        r"\(corrupt or truncated\?\): Encountered error while reading",
    ) as e:
        restore_params(tmp_path / "ck", abstract)
    assert "\n" not in str(e.value)


def test_non_finite_checkpoint_is_refused(tmp_path):
    w = np.ones((4, 8), np.float32)
    w[1, 2] = np.nan
    abstract = saved(tmp_path / "ck", {"ok": np.ones(3, np.float32), "layer": {"w": w}})
    with pytest.raises(UserError, match=r"holds NaN or Inf in 1 arrays \(layer/w\)"):
        restore_params(tmp_path / "ck", abstract)


def test_force_replaces_only_a_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved(ckpt, {"w": np.ones(2, np.float32)})
    assert check_out_dir(ckpt, force=True) == ckpt
    model = tmp_path / "model"  # a model folder: --out $M instead of $M/dit
    for part in ("vae", "tokenizer"):
        (model / part).mkdir(parents=True)
    (model / "config.yaml").write_text("name: x\n")
    (model / "NOTES.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds more than a checkpoint \(NOTES.txt, tokenizer, vae\)") as e:
        check_out_dir(model, force=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.learning_rate=.nan", "config key 'train.learning_rate' must be finite, got nan"),
        ("sampler.guidance=inf", "config key 'sampler.guidance' must be finite, got 'inf'"),
        ('train.trainable=["^memory/", "(unclosed"]', r"train.trainable: '\(unclosed' is not a valid regex"),
    ],
)
def test_bad_config_numbers_and_regexes_name_the_value(override, message):
    with pytest.raises(UserError, match=message):
        load_config("configs/train/tiny.yaml", [override])


def test_junk_checkpoint_config_is_one_line(tmp_path):
    """A junk config.yaml printed a 6-line YAML excerpt."""
    from onestory_jax.checkpoint import load_config_from_checkpoint

    (tmp_path / "params").mkdir()
    (tmp_path / "config.yaml").write_text("dit: [unclosed\n  x: {\n")
    with pytest.raises(UserError, match=r"cannot read '.*config.yaml': while parsing") as e:
        load_config_from_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_a_preset_section_that_is_not_a_mapping_is_one_line(tmp_path):
    """The probe's `train: [1, 2]` preset (a TypeError traceback then)."""
    (tmp_path / "bad.yaml").write_text("base: tiny\ntrain: [1, 2]\n")
    with pytest.raises(UserError, match="config section 'train' must be a mapping"):
        load_config(str(tmp_path / "bad.yaml"))


def test_unwritable_output_or_a_full_disk_is_one_line_before_writing(tmp_path, monkeypatch):
    """convert --out under a file gave a NotADirectoryError traceback after the conversion; a full disk gave
    353 lines of orbax tracebacks. Both are refused before anything is written."""
    import shutil
    from types import SimpleNamespace

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"the output's parent folder '.*afile' exists and is not a folder"):
        check_out_dir(tmp_path / "afile" / "dit", force=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(UserError, match=rf"'{tmp_path}' has 100.0 B free but checkpoint '{tmp_path / 'ck'}' needs 1.0 KiB"):
        save_model(tmp_path / "ck", {"w": np.ones(256, np.float32)}, Config())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_configs_written_by_earlier_versions_still_load():
    """A retired key is ignored and a moved key lands in its new section (checkpoints keep old config.yaml)."""
    from onestory_jax.config_files import from_dict

    cfg = from_dict(Config, {"sampler": {"sigma_grid": "wan", "steps": 9}, "train": {"clip_size": 16, "steps": 3}})
    assert (cfg.sampler.steps, cfg.train.steps, cfg.train.vae_stage.clip_size) == (9, 3, 16)
    with pytest.raises(UserError, match="unknown config key 'train.clip_sizes'"):
        from_dict(Config, {"train": {"clip_sizes": 16}})


@pytest.mark.multidevice
def test_small_replicated_arrays_are_saved_whole_and_large_ones_replica_parallel(tmp_path):
    """On the 8 host devices, an array replicated on all of them and under MIN_REPLICA_SLICE_BYTES is written by
    one replica, with no program compiled (orbax's default slices it per replica: a slice program per device);
    a larger one is still split across replicas (compiles); both restore to their values."""
    from onestory_jax.checkpoint import MIN_REPLICA_SLICE_BYTES

    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)), jax.sharding.PartitionSpec())
    rows = MIN_REPLICA_SLICE_BYTES // 4 // 16  # [rows, 16] float32 is 1 MiB: each of 8 replicas' slices of `big`
    small = jax.device_put(np.arange(24 * 7, dtype=np.float32).reshape(24, 7), replicated)
    big = jax.device_put(np.ones((8 * rows, 16), np.float32), replicated)
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        save_model(tmp_path / "small", {"w": small}, Config())
        small_compiles = len(compiles)
        save_model(tmp_path / "big", {"w": big}, Config())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert small_compiles == 0
    assert len(compiles) > 0
    for name, a in (("small", small), ("big", big)):
        back = restore_params(tmp_path / name, {"w": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)})
        np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(a))
