"""Compile-only memory analysis of the train step, and the device targets of the shipped presets.

Nothing is allocated: the state is the training loop's own (`loop.py: initial_state`, abstract) and the
batch `ShapeDtypeStruct`s carrying their `NamedSharding`s; the step is the loop's jitted step
(`step.py: jit_train_step`: pinned layouts, donated state, replicated metrics), lowered and compiled, and
`compiled.memory_analysis()` gives per-device sizes. The peak estimate is arguments + temporaries +
outputs - aliased (the donated state aliases its output).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from onestory_jax.config import Config
from onestory_jax.sharding import activate, batch_sharding, make_mesh
from onestory_jax.training.loop import initial_state
from onestory_jax.training.step import TrainState, jit_train_step

GIB = 1 << 30
# Memory per device (GiB): H100 SXM 80 GB and H200 141 GB as nvidia-smi reports them, TPU v5p 95 GB.
CAPACITY_GIB = {"h100_80gb": 81559 / 1024, "h200_141gb": 143771 / 1024, "tpu_v5p_95gb": 95.0}
HEADROOM = 0.10  # a preset fits when its peak leaves at least this fraction of the device free
LATENT_480P = (21, 60, 104)  # 81 frames at 480x832
# Buffer assignment (what the analysis reports) is done before code generation: skipping LLVM's
# optimisations leaves the figures unchanged and halves the compile time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Target:
    """A shipped training preset and the devices it is made for (the mesh fills exactly `devices`)."""

    preset: str
    devices: int
    chip: str  # a key of CAPACITY_GIB


PRESET_TARGETS = (
    Target("train/wan2.1-i2v-14b-480p", 64, "h100_80gb"),
    Target("train/wan2.1-i2v-14b-480p-8gpu", 8, "h100_80gb"),
    Target("train/wan2.1-i2v-14b-480p-v5p", 256, "tpu_v5p_95gb"),
    Target("train/wan2.1-i2v-14b-480p-v5p-64", 64, "tpu_v5p_95gb"),
    Target("train/wan2.1-i2v-14b-480p-single-gpu", 1, "h200_141gb"),
)


def preset_problems(cfg: Config, devices: int) -> list[str]:
    """Why `cfg` cannot run as a preset on exactly `devices` devices (empty when it can)."""
    m, d = cfg.mesh, cfg.dit
    sizes = {"data": m.data, "fsdp": m.fsdp, "sequence": m.sequence, "tensor": m.tensor}
    problems = []
    if any(s < 1 for s in sizes.values()):
        problems.append(f"mesh {sizes} has a fill (-1) axis: a preset names its device count")
    elif math.prod(sizes.values()) != devices:
        problems.append(f"mesh {sizes} covers {math.prod(sizes.values())} devices, the target has {devices}")
    if m.data > 0 and m.fsdp > 0 and cfg.train.batch_size % (m.data * m.fsdp):
        problems.append(f"train.batch_size={cfg.train.batch_size} is not divisible by data x fsdp = {m.data * m.fsdp}")
    if cfg.dit_runtime.sequence_parallel == "ulysses" and m.sequence > 1 and d.num_heads % (m.sequence * max(m.tensor, 1)):
        problems.append(f"dit.num_heads={d.num_heads} is not divisible by sequence x tensor = {m.sequence * m.tensor}")
    if cfg.dit_runtime.attention == "xla":
        problems.append("dit_runtime.attention=xla builds the full [heads, L, L] logits")
    return problems


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings the step's memory depends on: a recorded analysis holds only while they are unchanged."""
    d, rt, t = cfg.dit, cfg.dit_runtime, cfg.train
    return {
        "dit": {  # one section, as recorded before dit_runtime had its own
            **{k: getattr(d, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers")},
            **{k: getattr(rt, k) for k in ("dtype", "param_dtype", "remat_policy", "attention", "sequence_parallel")},
            **({"lora_rank": d.lora_rank} if d.lora_rank else {}),
        },  # (analyses of presets without LoRA stay valid)
        "memory_budget": cfg.memory.budget,
        "mesh": dataclasses.asdict(cfg.mesh),
        "train": {"batch_size": t.batch_size, "trainable": list(t.trainable), "ema": t.ema_decay > 0},
    }


def batch_shapes(cfg: Config, batch: int, latent: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of every batch key, as data/pipeline.py three_shot_example builds them
    (memory = the two prior shots, 2T frames; I2V adds CLIP tokens and the 20 cond channels)."""
    t, h, w = latent
    c = cfg.memory.latent_channels
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "target": ((batch, t, h, w, c), np.float32),
        "memory": ((batch, 2 * t, h, w, c), np.float32),
        "memory_valid": ((batch, 2 * t), np.bool_),
        "labels": ((batch, 2 * t), np.float32),
        "text": ((batch, cfg.dit.text_len, cfg.dit.text_dim), np.float32),
    }
    if cfg.memory.selector_reads_captions:
        shapes["memory_text"] = ((batch, 2 * t, cfg.dit.text_dim), np.float32)
    if cfg.dit.has_image_branch:
        shapes["image"] = ((batch, cfg.image_encoder.num_tokens, cfg.dit.image_dim), np.float32)
        shapes["cond"] = ((batch, t, h, w, cfg.dit.in_dim - c), np.float32)
    return shapes


def compile_train_step(cfg: Config, latent: tuple[int, int, int], devices: int | None = None) -> tuple[Any, TrainState, Any]:
    """Lower and compile the step of `cfg` (batch `train.batch_size`) on the first `devices` devices.

    Returns (compiled, abstract state, mesh).
    """
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices] if devices else None)
    with activate(mesh):
        state, shardings, tx = initial_state(cfg, mesh, abstract=True)
        batch = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in batch_shapes(cfg, cfg.train.batch_size, latent).items()
        }
        step = jit_train_step(cfg, tx, shardings, jax.tree.map(lambda a: a.sharding, batch))
        return step.lower(state, batch).compile(COMPILER_OPTIONS), state, mesh


def memory_gib(compiled: Any) -> dict[str, float]:
    """Per-device sizes (GiB) from XLA's memory analysis, and the peak estimate."""
    m = compiled.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
    }
    peak = sizes["arguments"] + sizes["temporaries"] + sizes["outputs"] - sizes["aliased"]
    return {**{k: v / GIB for k, v in sizes.items()}, "peak": peak / GIB}


def state_gib_per_device(state: TrainState) -> float:
    """GiB of one device's shards of the (abstract) state."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state)) / GIB


def headroom(peak_gib: float, chip: str) -> float:
    """Fraction of the chip's memory the peak leaves free (negative: it does not fit)."""
    return 1.0 - peak_gib / CAPACITY_GIB[chip]
