"""The shipped 14B training presets fit their devices (onestory_jax/training/aot.py PRESET_TARGETS).

Three checks per preset: its fields are consistent with its device count; the compile-only analysis
recorded in bench/results/train_step_aot.json is of exactly its memory-relevant settings and leaves
>= 10% of the device free (an edit to the preset fails here until `python bench/train_step.py
--suite aot` is rerun and still fits); and a tiny model with its mesh axes, remat, attention,
sequence parallelism, param dtype and trainable set compiles on forced host devices (as many as its
mesh: 8, or 1 for the single-GPU preset) through the same analysis functions.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from onestory_jax.config import Config, MeshConfig
from onestory_jax.config_files import load_config
from onestory_jax.training import aot

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "train_step_aot.json"
TARGETS = {t.preset.removeprefix("train/"): t for t in aot.PRESET_TARGETS}


@pytest.mark.parametrize("name", list(TARGETS))
def test_preset_fields_fit_its_devices(name):
    target = TARGETS[name]
    assert target.chip in aot.CAPACITY_GIB
    assert aot.preset_problems(load_config(target.preset), target.devices) == []


def test_preset_problems_are_found():
    cfg = load_config(TARGETS["wan2.1-i2v-14b-480p-v5p"].preset)
    bad = dataclasses.replace(
        cfg,
        mesh=MeshConfig(data=1, fsdp=-1, sequence=16, tensor=1),
        dit_runtime=dataclasses.replace(cfg.dit_runtime, attention="xla"),
    )
    problems = " ".join(aot.preset_problems(bad, 256))
    assert "fill (-1)" in problems and "not divisible by sequence x tensor = 16" in problems and "full" in problems
    assert "covers 256 devices, the target has 64" in " ".join(aot.preset_problems(cfg, 64))
    odd_batch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=48))
    assert "not divisible by data x fsdp = 32" in " ".join(aot.preset_problems(odd_batch, 256))


@pytest.mark.parametrize("name", list(TARGETS))
def test_recorded_analysis_is_of_this_preset_and_fits(name):
    target = TARGETS[name]
    row = json.loads(RESULTS.read_text()).get("presets", {}).get(target.preset)
    rerun = f"rerun: python bench/train_step.py --suite aot --preset {target.preset}"
    assert row is not None and "error" not in row, f"no analysis of {target.preset}; {rerun}"
    fingerprint = json.loads(json.dumps(aot.fingerprint(load_config(target.preset))))
    assert row["fingerprint"] == fingerprint, f"{target.preset} changed since its analysis; {rerun}"
    assert (row["devices"], row["chip"]) == (target.devices, target.chip)
    assert aot.headroom(row["peak_gib"], target.chip) >= aot.HEADROOM, (row["peak_gib"], aot.CAPACITY_GIB[target.chip])


def tiny_twin(cfg: Config, devices: int = 8) -> Config:
    """The tiny model with the preset's sequence and tensor axes, fsdp and data cut to fit `devices`,
    its remat, attention, sequence parallelism, dtypes, trainable set and EMA; one sample per batch shard."""
    m = cfg.mesh
    split = m.sequence * m.tensor
    fsdp = min(m.fsdp, devices // split)
    data = min(m.data, devices // (split * fsdp))
    heads = 2 * split
    overrides = [
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.sequence={m.sequence}",
        f"mesh.tensor={m.tensor}",
        f"dit.num_heads={heads}",
        f"dit.dim={8 * heads}",
        f"dit_runtime.remat_policy={cfg.dit_runtime.remat_policy}",
        f"dit_runtime.attention={cfg.dit_runtime.attention}",
        f"dit_runtime.sequence_parallel={cfg.dit_runtime.sequence_parallel}",
        f"dit_runtime.dtype={cfg.dit_runtime.dtype}",
        f"dit_runtime.param_dtype={cfg.dit_runtime.param_dtype}",
        f"train.batch_size={data * fsdp}",
        f"train.trainable={json.dumps(list(cfg.train.trainable))}",
        f"train.ema_decay={cfg.train.ema_decay}",
    ]
    return load_config("tiny", overrides)


def twin_devices(cfg: Config) -> int:
    return cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.sequence * cfg.mesh.tensor


def distinct_twins() -> list:
    """The first preset of each distinct tiny twin (the v5p presets of 64 and 256 chips share one): compiling
    the same twin twice tests nothing more. Those on several devices are `multidevice`."""
    seen: dict[str, tuple[str, Config]] = {}
    for name, target in TARGETS.items():
        twin = tiny_twin(load_config(target.preset))
        seen.setdefault(repr(twin), (name, twin))
    return [pytest.param(name, marks=[pytest.mark.multidevice] * (twin_devices(twin) > 1)) for name, twin in seen.values()]


@pytest.mark.slow
@pytest.mark.parametrize("name", distinct_twins())
def test_tiny_twin_compiles_through_the_analysis(name):
    preset = load_config(TARGETS[name].preset)
    cfg = tiny_twin(preset)
    n = twin_devices(cfg)
    compiled, state, mesh = aot.compile_train_step(cfg, (2, 8, 8), devices=n)
    assert (mesh.shape["sequence"], mesh.shape["tensor"]) == (preset.mesh.sequence, preset.mesh.tensor)
    mem = aot.memory_gib(compiled)
    assert mem["peak"] == pytest.approx(mem["arguments"] + mem["temporaries"] + mem["outputs"] - mem["aliased"])
    # The donated state is reused for the new state: otherwise a 14B peak would count it twice.
    assert mem["aliased"] >= 0.99 * aot.state_gib_per_device(state) > 0
