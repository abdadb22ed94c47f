"""Benchmark: the full OneStory train step (loss, gradients, AdamW), as train.py jits it.

    python bench/train_step.py --suite cpu   # tiny + mid-size on this CPU: tokens/s -> bench/results/train_step_cpu.json
    python bench/train_step.py --suite aot   # the shipped 14B presets, each on its target device count
                                             # (fake CPU devices): compile only, per-device memory and
                                             # fit with 10% headroom -> bench/results/train_step_aot.json
    python bench/train_step.py --suite aot --preset train/wan2.1-i2v-14b-480p-v5p   # one preset
    python bench/train_step.py --suite aot --matrix  # the exploration matrix of meshes x remat x attention
    python bench/train_step.py --suite aot --devices 8 --sequence 2 --remat full --attention chunked

`cpu` builds the state with the training loop's own builder (onestory_jax/training/loop.py
initial_state) and times the loop's own jitted step (onestory_jax/training/step.py jit_train_step:
pinned in/out shardings, donated state) on synthetic batches of the training shapes.

`aot` never allocates the model (onestory_jax/training/aot.py): the same state and batch as
ShapeDtypeStructs carrying their NamedShardings, and the same jitted step's `.lower(state, batch)
.compile().memory_analysis()` gives the per-device sizes. Each mesh size runs in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the device count is fixed at JAX start-up).
The figures are those of the XLA *CPU* compiler: an estimate of what the GPU/TPU compilers would
allocate, not a measurement on them. `--attention chunked` swaps the DiT's attention for a
query-chunked, rematerialised stand-in of a flash kernel (the library's `chunked_attention`); the
presets' `attention: auto` takes that path on CPU too (cuDNN on GPU, splash on TPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from onestory_jax.config import Config
from onestory_jax.config_files import load_config
from onestory_jax.io import save_json
from onestory_jax.models.flops import context_tokens, noise_tokens, train_step_flops
from onestory_jax.sharding import activate, make_mesh
from onestory_jax.training import aot
from onestory_jax.training.aot import CAPACITY_GIB, LATENT_480P, batch_shapes
from onestory_jax.training.loop import global_batch, initial_state
from onestory_jax.training.step import jit_train_step

RESULTS = Path(__file__).resolve().parent / "results"
PRESET_14B = "train/wan2.1-i2v-14b-480p"

# ---------------------------------------------------------------------------------------------
# shapes shared by both suites


def synthetic_batch(cfg: Config, batch: int, latent: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random host arrays of the training shapes (all memory frames valid)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (shape, dtype) in batch_shapes(cfg, batch, latent).items():
        out[key] = np.ones(shape, bool) if dtype == np.bool_ else rng.standard_normal(shape).astype(dtype)
    out["labels"] = np.clip(out["labels"], -1.0, 1.0)
    return out


def token_counts(cfg: Config, latent: tuple[int, int, int]) -> tuple[int, int]:
    """(noise tokens, context tokens) per sample."""
    t, h, w = latent
    return noise_tokens(cfg.dit, (1, t, h, w)), context_tokens(cfg.memory, (h, w))


def step_flops(cfg: Config, batch: int, latent: tuple[int, int, int]) -> float:
    """Model FLOPs of one train step (the training loop's MFU model, all DiT weights training)."""
    shapes = {k: shape for k, (shape, _) in batch_shapes(cfg, batch, latent).items()}
    return train_step_flops(cfg, shapes, dit_trains=True)


# ---------------------------------------------------------------------------------------------
# cpu suite: tokens/s of real steps


def time_case(name: str, cfg: Config, batch: int, latent: tuple[int, int, int], warmup: int, iters: int) -> dict:
    """Warm up, then time `iters` donated steps; tokens/s counts noise tokens as loop.py does."""
    mesh = make_mesh(cfg.mesh)
    host = synthetic_batch(cfg, batch, latent)
    with activate(mesh):
        state, shardings, tx = initial_state(cfg, mesh)
        gbatch = global_batch(host, mesh)
        step = jit_train_step(cfg, tx, shardings, jax.tree.map(lambda a: a.sharding, gbatch))
        t0 = time.perf_counter()
        state, metrics = step(state, gbatch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            state, metrics = step(state, gbatch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            state, metrics = step(state, gbatch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    noise, ctx = token_counts(cfg, latent)
    step_s = statistics.median(times)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    row = {
        "case": name,
        "dtype": cfg.dit_runtime.dtype,
        "remat": cfg.dit_runtime.remat_policy,
        "dim": cfg.dit.dim,
        "layers": cfg.dit.num_layers,
        "heads": cfg.dit.num_heads,
        "params_m": round(n_params / 1e6, 2),
        "batch": batch,
        "latent": list(latent),
        "noise_tokens": noise,
        "context_tokens": ctx,
        "step_s": step_s,
        "step_s_min": min(times),
        "tokens_per_s": batch * noise / step_s,
        "tokens_per_s_best": batch * noise / min(times),
        "all_tokens_per_s": batch * (noise + ctx) / step_s,
        "tflop_per_step": step_flops(cfg, batch, latent) / 1e12,
        "tflops": step_flops(cfg, batch, latent) / step_s / 1e12,
        "first_step_s": compile_s,
        "iters": iters,
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(row), flush=True)
    return row


def cpu_cases() -> list[tuple[str, Config, int, tuple[int, int, int]]]:
    """tiny preset, and a mid-size model of the 14B's family (dim 512, 8 layers, 8 heads) at ~3.8k tokens,
    with `dots_no_batch` remat (as recorded) and without remat."""
    tiny = load_config("train/tiny")
    mid = load_config(
        PRESET_14B,
        [
            "dit.dim=512",
            "dit.ffn_dim=1536",
            "dit.num_heads=8",
            "dit.num_layers=8",
            "dit.dtype=float32",
            "dit.attention=xla",
            "dit.remat_policy=dots_no_batch",
            "mesh.fsdp=-1",
            "train.batch_size=1",
        ],
    )
    mid_no_remat = dataclasses.replace(mid, dit_runtime=dataclasses.replace(mid.dit_runtime, remat_policy="none"))
    return [
        ("tiny", tiny, tiny.train.batch_size, (3, 16, 16)),
        ("mid-512d-8L", mid, 1, (4, 48, 64)),
        ("mid-512d-8L", mid_no_remat, 1, (4, 48, 64)),
    ]


def run_cpu(args: argparse.Namespace) -> None:
    rows = [time_case(n, c, b, lat, args.warmup, args.iters) for n, c, b, lat in cpu_cases()]
    # The 5-minute load average at the end: other processes on a shared machine slow the steps down.
    write_json(RESULTS / "train_step_cpu.json", {"meta": meta() | {"load_avg": os.getloadavg()[1]}, "rows": rows})


# ---------------------------------------------------------------------------------------------
# aot suite: compile-only memory of the 14B step


def aot_config(devices: int, sequence: int, tensor: int, remat: str, attention: str = "library") -> Config:
    """The 14B pod preset on `devices` devices: fsdp fills what sequence x tensor leave; one sample per
    batch shard (data x fsdp). attention `library`: the preset's; `chunked`: the library's chunked path."""
    chunked = ["dit.attention=chunked"] if attention == "chunked" else []
    # The recorded table was compiled with GSPMD sequence sharding; Ulysses needs heads (40) divisible
    # by the sequence axis, which 16 is not.
    return load_config(
        PRESET_14B,
        [
            f"mesh.sequence={sequence}",
            f"mesh.tensor={tensor}",
            "mesh.fsdp=-1",
            f"dit.remat_policy={remat}",
            f"train.batch_size={devices // (sequence * tensor)}",
            "dit.sequence_parallel=gspmd",
            *chunked,
        ],
    )


def analyse(cfg: Config) -> dict:
    """Compile the 14B step of `cfg` on all (fake) devices at 480p; per-device memory in GiB."""
    t0 = time.perf_counter()
    compiled, state, mesh = aot.compile_train_step(cfg, LATENT_480P)
    compile_s = time.perf_counter() - t0
    noise, ctx = token_counts(cfg, LATENT_480P)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "remat": cfg.dit_runtime.remat_policy,
        "batch": cfg.train.batch_size,
        "samples_per_device": cfg.train.batch_size / mesh.size,
        "noise_tokens": noise,
        "context_tokens": ctx,
        "params_b": round(n_params / 1e9, 3),
        "state_gib_per_device": round(aot.state_gib_per_device(state), 3),
        **{f"{k}_gib": round(v, 3) for k, v in aot.memory_gib(compiled).items()},
        "compile_s": round(compile_s, 1),
    }


def compile_case(devices: int, sequence: int, tensor: int, remat: str, attention: str) -> dict:
    """One case of the exploration matrix, and whether its peak fits each chip (no headroom asked)."""
    row = analyse(aot_config(devices, sequence, tensor, remat, attention))
    fits = {f"fits_{chip}": row["peak_gib"] <= CAPACITY_GIB[chip] for chip in ("h100_80gb", "tpu_v5p_95gb")}
    return row | {"attention": attention} | fits


def compile_preset(preset: str) -> dict:
    """A shipped preset exactly as written, on its target device count, and its fit with 10% headroom."""
    target = next(t for t in aot.PRESET_TARGETS if t.preset == preset)
    cfg = load_config(preset)
    row = analyse(cfg)
    free = aot.headroom(row["peak_gib"], target.chip)
    return {
        "preset": preset,
        "chip": target.chip,
        "capacity_gib": round(CAPACITY_GIB[target.chip], 2),
        **row,
        "attention": cfg.dit_runtime.attention,
        "sequence_parallel": cfg.dit_runtime.sequence_parallel,
        "param_dtype": cfg.dit_runtime.param_dtype,
        "trainable": list(cfg.train.trainable),
        "headroom": round(free, 4),
        "fits": free >= aot.HEADROOM,
        "fingerprint": aot.fingerprint(cfg),
    }


# (devices, sequence, tensor, remat, attention) of the table in docs/performance.md: the preset and
# full remat with both attentions on every mesh, then the layouts that make it fit.
AOT_MATRIX = [(d, 1, 1, r, a) for d in (8, 64, 256) for r in ("dots_no_batch", "full") for a in ("library", "chunked")] + [
    (8, 1, 1, "dots", "chunked"),
    (8, 2, 1, "full", "chunked"),
    (8, 1, 2, "full", "chunked"),
    (64, 8, 1, "full", "library"),
    (64, 8, 1, "dots_no_batch", "chunked"),
    (256, 4, 1, "full", "library"),
    (256, 4, 1, "full", "chunked"),
    (256, 4, 1, "dots_no_batch", "chunked"),
    (256, 8, 1, "dots_no_batch", "chunked"),
    (256, 16, 1, "full", "library"),
]
CASE_FIELDS = ("devices", "sequence", "tensor", "remat", "attention")
CASE_DEFAULTS = {
    "devices": [8, 64, 256],
    "sequence": [1],
    "tensor": [1],
    "remat": ["dots_no_batch"],
    "attention": ["library", "chunked"],
}


def aot_cases(args: argparse.Namespace) -> list[dict]:
    """The documented matrix, or (when any case option is given) the product of the options."""
    if all(getattr(args, f) is None for f in CASE_FIELDS):
        return [dict(zip(CASE_FIELDS, c)) for c in AOT_MATRIX]
    opts = {f: getattr(args, f) or CASE_DEFAULTS[f] for f in CASE_FIELDS}
    return [
        {"devices": d, "sequence": s, "tensor": t, "remat": r, "attention": a}
        for d in opts["devices"]
        for s in opts["sequence"]
        for t in opts["tensor"]
        for r in opts["remat"]
        for a in opts["attention"]
        if d % (s * t) == 0
    ]


def case_key(case: dict) -> str:
    tp = f"/tp{case['tensor']}" if case.get("tensor", 1) > 1 else ""
    return f"{case['devices']}dev/seq{case['sequence']}{tp}/{case['remat']}/{case['attention']}"


def run_isolated(devices: int, flag: str, payload: str) -> dict | str:
    """`--FLAG PAYLOAD` of this script in a process with `devices` fake CPU devices (fixed at JAX
    start-up): its JSON row, or the error line."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
    }
    proc = subprocess.run([sys.executable, __file__, flag, payload], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1])


def run_aot(args: argparse.Namespace) -> None:
    """The presets (default) or the exploration matrix, one subprocess each, merged into the results file."""
    out = RESULTS / "train_step_aot.json"
    data = json.loads(out.read_text()) if out.exists() else {"meta": meta(), "rows": {}}
    matrix = args.matrix or any(getattr(args, f) is not None for f in CASE_FIELDS)
    jobs = (
        [("rows", case_key(c), c["devices"], "--one-aot", json.dumps(c)) for c in aot_cases(args)]
        if matrix
        else [
            ("presets", t.preset, t.devices, "--one-preset", t.preset)
            for t in aot.PRESET_TARGETS
            if args.preset in (None, t.preset)
        ]
    )
    if not jobs:
        raise SystemExit(f"--preset {args.preset} is not one of {[t.preset for t in aot.PRESET_TARGETS]}")
    for table, key, devices, flag, payload in jobs:
        t0 = time.perf_counter()
        row = run_isolated(devices, flag, payload)
        if isinstance(row, str):
            print(f"{key}: failed ({row})", flush=True)
            row = (
                {**json.loads(payload), "error": row[:500]} if matrix else {"preset": key, "devices": devices, "error": row[:500]}
            )
        else:
            print(f"{key}: peak {row['peak_gib']:.1f} GiB/device ({time.perf_counter() - t0:.0f} s)", flush=True)
        data.setdefault(table, {})[key] = row
        data["meta"] = meta()
        write_json(out, data)


# ---------------------------------------------------------------------------------------------


def meta() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.machine(), "cpu_count": os.cpu_count()}


def write_json(path: Path, data: dict) -> None:
    """Atomic write, then re-render docs/performance.md."""
    save_json(path, data)
    print(f"wrote {path}", flush=True)
    import report  # bench/report.py, beside this script (its folder is sys.path[0])

    report.main()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu", "aot"], default="cpu")
    ap.add_argument("--warmup", type=int, default=2, help="cpu: untimed steps (the first compiles)")
    ap.add_argument("--iters", type=int, default=5, help="cpu: timed steps (median reported)")
    # aot case options: none given = the documented matrix (AOT_MATRIX); any given = their product
    ap.add_argument("--devices", type=ints, help="aot: mesh sizes, comma-separated (default 8,64,256)")
    ap.add_argument("--sequence", type=ints, help="aot: sequence-parallel sizes (default 1)")
    ap.add_argument("--tensor", type=ints, help="aot: tensor-parallel sizes (default 1)")
    ap.add_argument("--remat", type=lambda s: s.split(","), help="aot: remat policies (default dots_no_batch)")
    ap.add_argument(
        "--attention",
        type=lambda s: s.split(","),
        help="aot: library (the DiT as written) and/or chunked (flash stand-in); default both",
    )
    ap.add_argument("--preset", help="aot: only this shipped preset (default: all of training/aot.py PRESET_TARGETS)")
    ap.add_argument("--matrix", action="store_true", help="aot: the exploration matrix instead of the presets")
    ap.add_argument("--one-aot", help=argparse.SUPPRESS)
    ap.add_argument("--one-preset", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_aot:
        case = json.loads(args.one_aot)
        print(json.dumps(compile_case(*(case[f] for f in CASE_FIELDS))), flush=True)
    elif args.one_preset:
        print(json.dumps(compile_preset(args.one_preset)), flush=True)
    elif args.suite == "cpu":
        run_cpu(args)
    else:
        run_aot(args)


if __name__ == "__main__":
    main()
