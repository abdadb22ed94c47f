"""Benchmark: the exact 14B CFG step on one GPU, lever by lever (issue 22, item 1).

    python bench/dit_step.py                      # on a GPU: kernels, the step's variants, a profile (~5 min)
    python bench/dit_step.py --config tiny --latent 3 8 8 --context 24 --layers 2   # the same code path on CPU

One process, random weights (bf16), the guided pair as one batch of 2, 1,544 memory tokens after the 32,760
noise tokens of an 81-frame 832x480 shot: exactly the DiT call sample.py makes at each denoising step.
1. Kernels at the step's own shapes: cuBLAS (through XLA) for each linear layer's matmul, and the self-attention
   kernels: cuDNN flash through `jax.nn.dot_product_attention` (with and without key lengths), Pallas Mosaic GPU's
   Hopper kernel, and torch's SDPA backends in a subprocess. Their TFLOP/s give the step's floor.
2. The step, timed per variant, each a lever on or off in the same process on the same inputs.
3. A profile of one step: GPU time by kernel class (matmul, attention, fused elementwise, copies).
`--lowvram` instead times the step with fp8 kernels in every block layer and the blocks in host memory (streamed per
layer), the DiT made on the host and placed as sample.py places it, and reports the process's peak device memory.
Writes bench/results/dit_step_<backend>[_lowvram].json (after each section) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.config import MeshConfig
from onestory_jax.config_files import load_config
from onestory_jax.models import dit as dit_module
from onestory_jax.models import layers, lowvram
from onestory_jax.models.dit import ContextTokens, WanDiT, init_fn
from onestory_jax.models.flops import dit_forward_flops, peak_flops
from onestory_jax.sharding import activate, make_mesh, unbox_plain

RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_CLASSES = (  # (class, pattern on a GPU kernel's name), first match wins
    ("attention", r"fmha|sdpa|flash|cudnn|attention"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|matmul|wgmma|_dot"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("fused elementwise/reduction", r"fusion|loop_|input_|reduce|convert"),
)


def timed(fn: Callable[[], Any], iters: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` (blocked until ready) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_kernel(fn: Callable[[], Any], calls: int = 10) -> float:
    """Seconds per call of a short kernel: `calls` dispatched back to back, then one wait (after a warm-up)."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / calls


def normal(key: int, shape: tuple[int, ...], dtype: Any = jnp.bfloat16, scale: float = 1.0) -> jax.Array:
    """Random (never zero) inputs, made on the device."""
    return (jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale).astype(dtype)


def onehot_modulation(table: jax.Array, e: jax.Array, is_context: jax.Array | None) -> list[jax.Array]:
    """The modulation as the DiT computed it before this lever: a one-hot sum over the groups per token, which XLA
    writes out as a [B, L, D] fp32 table per vector (same values: 1 x a + 0 x b)."""
    m = table[None, None].astype(jnp.float32) + e
    if is_context is None:
        return [m[:, 0, k][:, None, :] for k in range(m.shape[2])]
    onehot = jax.nn.one_hot(is_context.astype(jnp.int32), 2, dtype=jnp.float32)  # [L, 2]
    w = onehot[None, :, :, None]
    return [jnp.sum(w * m[:, None, :, k, :], axis=2) for k in range(m.shape[2])]


def mosaic_attention(config: Any) -> Callable[..., jax.Array]:
    """Self-attention through Pallas Mosaic GPU's Hopper flash kernel where it applies (no key lengths, sequence
    lengths multiples of its blocks), else the library's dispatcher."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    library = dit_module.attention

    def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str, kv_lengths: Any = None) -> jax.Array:
        fits = kv_lengths is None and q.shape[1] % (2 * config.block_q) == 0 and k.shape[1] % config.block_kv == 0
        return attention_mgpu.attention(q, k, v, config) if fits else library(q, k, v, implementation, kv_lengths=kv_lengths)

    return attention


@contextlib.contextmanager
def patched(**attrs: Any) -> Iterator[None]:
    """Attributes of models/dit.py (or, for upper-case names, models/layers.py) replaced while a variant traces."""
    module = lambda name: layers if name.isupper() else dit_module
    old = {name: getattr(module(name), name) for name in attrs}
    for name, value in attrs.items():
        setattr(module(name), name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module(name), name, value)


def matmul_rows(tokens: int, dim: int, ffn: int, iters: int) -> list[dict]:
    """TFLOP/s of each linear layer's matmul at the step's token count (bf16 in, bf16 out, as the DiT runs them)."""
    rows = []
    for name, k, n in (
        ("q/k/v/o [D, D]", dim, dim),
        ("q+k+v fused [D, 3D]", dim, 3 * dim),
        ("fc1 [D, F]", dim, ffn),
        ("fc2 [F, D]", ffn, dim),
    ):
        x, w = normal(1, (tokens, k)), normal(2, (k, n), scale=k**-0.5)
        fn = jax.jit(jnp.dot)
        s = timed_kernel(lambda fn=fn, x=x, w=w: fn(x, w), iters)
        rows.append({"kernel": f"matmul {name}", "shape": [tokens, k, n], "s": s, "tflops": 2 * tokens * k * n / s / 1e12})
    return rows


def attention_rows(batch: int, length: int, heads: int, head_dim: int, iters: int) -> list[dict]:
    """TFLOP/s of bf16 self-attention kernels at the step's shape [B, L, N, H]; errors against cuDNN's output."""
    q, k, v = (normal(i, (batch, length, heads, head_dim)) for i in (3, 4, 5))
    flops = 4 * batch * length * length * heads * head_dim
    full = jnp.full((batch,), length, jnp.int32)
    fns: dict[str, Callable[[], jax.Array]] = {
        "cudnn, no key lengths": lambda: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
        "cudnn, key lengths (all valid)": lambda: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn", key_value_seq_lengths=full
        ),
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        for bkv in (128, 256):
            config = attention_mgpu.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2)
            fns[f"pallas mosaic gpu, block_kv {bkv}"] = lambda c=config: attention_mgpu.attention(q, k, v, c)
    except ImportError as e:  # not in this jax
        print(f"pallas mosaic gpu attention: {e}")
    rows, ref = [], None
    for name, fn in fns.items():
        jitted = jax.jit(fn)
        try:
            out = jitted()
            s = timed_kernel(jitted, iters)
        except Exception as e:  # a kernel this GPU, jax or shape does not support: reported, not fatal
            rows.append({"kernel": f"attention {name}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        ref = out if ref is None else ref
        err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        rows.append(
            {
                "kernel": f"attention {name}",
                "shape": [batch, length, heads, head_dim],
                "s": s,
                "tflops": flops / s / 1e12,
                "rel_err_vs_cudnn": err,
            }
        )
    return rows


TORCH_ATTENTION = """
import json, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
b, l, n, h = map(int, sys.argv[1:5])
q, k, v = (torch.randn(b, n, l, h, device="cuda", dtype=torch.bfloat16) for _ in range(3))
rows = []
for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
    try:
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
            end.record()
            torch.cuda.synchronize()
        s = start.elapsed_time(end) / 5 / 1e3
        rows.append({"kernel": f"attention torch {torch.__version__} sdpa {name}", "shape": [b, l, n, h], "s": s,
                     "tflops": 4 * b * l * l * n * h / s / 1e12})
    except Exception as e:
        rows.append({"kernel": f"attention torch sdpa {name}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
print("ROWS" + json.dumps(rows))
"""


def torch_attention_rows(batch: int, length: int, heads: int, head_dim: int) -> list[dict]:
    """torch's SDPA backends (cuDNN, FlashAttention-2) at the same shape, in a subprocess run before JAX allocates."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", TORCH_ATTENTION, *map(str, (batch, length, heads, head_dim))],
            capture_output=True,
            text=True,
            timeout=240,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [{"kernel": "attention torch sdpa", "error": str(e)}]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS")), None)
    return json.loads(line[4:]) if line else [{"kernel": "attention torch sdpa", "error": proc.stderr[-500:]}]


def mosaic_beats_cudnn(rows: list[dict]) -> int | None:
    """The block_kv of the fastest Pallas Mosaic GPU attention row when it beat cuDNN's (no key lengths), else None."""
    rate = lambda prefix: max((r["tflops"] for r in rows if r["kernel"].startswith(prefix) and "tflops" in r), default=0.0)
    mosaic = [r for r in rows if r["kernel"].startswith("attention pallas mosaic") and "tflops" in r]
    best = max(mosaic, key=lambda r: r["tflops"], default=None)
    return int(best["kernel"].rsplit(" ", 1)[1]) if best and best["tflops"] > rate("attention cudnn, no key") else None


def step_inputs(cfg: Any, latent: tuple[int, int, int], n_ctx: int, text_len: int, image_len: int) -> dict[str, Any]:
    """The guided pair's DiT inputs (batch 2), random; the memory slots all filled (mask all True)."""
    b, d = 2, cfg.dit
    angles = normal(10, (b, n_ctx, d.head_dim // 2), jnp.float32, 3.0)
    ctx = ContextTokens(
        tokens=normal(11, (b, n_ctx, d.dim), jnp.float32),
        cos=jnp.cos(angles),
        sin=jnp.sin(angles),
        timestep=jnp.zeros((b,), jnp.float32),
        mask=jnp.ones((b, n_ctx), bool),
    )
    return {
        "x": normal(12, (b, *latent, d.in_dim), jnp.float32),
        "t": jnp.full((b,), 500.0, jnp.float32),
        "text": normal(13, (b, text_len, d.text_dim), jnp.float32),
        "image": normal(14, (b, image_len, d.image_dim), jnp.float32) if d.has_image_branch else None,
        "context": ctx,
    }


def kernel_class(name: str) -> str:
    """The class of a GPU kernel by its name (KERNEL_CLASSES), else `other`."""
    return next((c for c, pattern in KERNEL_CLASSES if re.search(pattern, name, re.I)), "other")


def profile_breakdown(fn: Callable[[], Any], out_dir: Path, device_pattern: str) -> dict:
    """Device time of one call of `fn`, per trace line (GPU streams, XLA ops), by kernel class and top names,
    from a perfetto trace of it; `device_pattern` matches the trace's process names of the device."""
    jax.block_until_ready(fn())
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        jax.block_until_ready(fn())
    trace_file = next(out_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(trace_file.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    meta = lambda kind: {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == kind
    }
    processes = {pid: name for (pid, _), name in meta("process_name").items() if re.search(device_pattern, name)}
    threads = meta("thread_name")
    lines: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in processes:
            line = f"{processes[e['pid']]} / {threads.get((e['pid'], e['tid']), e['tid'])}"
            lines[line][e["name"]] += e.get("dur", 0) / 1e6
    result = {}
    for line, by_name in lines.items():
        by_class: dict[str, float] = defaultdict(float)
        for name, s in by_name.items():
            by_class[kernel_class(name)] += s
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:40]
        result[line] = {
            "total_s": sum(by_name.values()),
            "by_class_s": dict(by_class),
            "top": [{"name": n, "s": s, "class": kernel_class(n)} for n, s in top],
        }
    return {"lines": result, "trace_file": str(trace_file)}


def print_profile(profile: dict) -> None:
    """Each trace line's time by class and its top names."""
    for line, rec in sorted(profile["lines"].items(), key=lambda kv: -kv[1]["total_s"]):
        print(f"profile line {line}: {rec['total_s']:.3f} s")
        for c, s in sorted(rec["by_class_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {c}: {s:.3f} s ({s / max(rec['total_s'], 1e-9):.0%})")
        for k in rec["top"][:12]:
            print(f"    {k['s']:.4f} s  [{k['class']}] {k['name'][:110]}")


def host_params(cfg: Any) -> Any:
    """The DiT's stored params on the host CPU, random-looking without a host RNG at 16 B values: one random
    vector repeated through each leaf (biases and norm scales as initialised). For timing and memory, not quality."""
    abstract = unbox_plain(jax.eval_shape(init_fn(cfg.dit, cfg.dit_runtime.plain()), jax.random.key(0)))
    base = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(jnp.bfloat16)

    def leaf(path: Any, a: jax.ShapeDtypeStruct) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if "kernel" in name or "modulation" in name:
            return np.resize(base.astype(a.dtype), a.shape)
        return np.full(a.shape, 1.0 if "scale" in name else 0.0, a.dtype)

    on_host = jax.sharding.NamedSharding(lowvram.host_mesh(), jax.sharding.PartitionSpec())
    return jax.device_put(jax.tree_util.tree_map_with_path(leaf, abstract), on_host)


MOSAIC_VARIANT = "pallas mosaic self-attention (no key lengths)"
PLAIN_WHEN_FULL = "cuDNN's plain kernel when all keys are valid"
DEFAULT_VARIANTS = ("before: one-hot modulation", "exact (this code)", "exact, no memory tokens", PLAIN_WHEN_FULL)


def step_rows(
    cfg: Any,
    params: Any,
    inputs: dict[str, Any],
    noise_tokens: int,
    variants: list[str],
    iters: int,
    mosaic_block_kv: int,
    programs: dict[str, Any],
) -> Iterator[dict]:
    """Seconds per guided-pair DiT call for each variant, in this process on the same params and inputs, one row
    at a time. Variants: before and after the modulation lever, without the memory tokens, without key lengths, and
    with Pallas Mosaic GPU's Hopper kernel for self-attention (block_kv `mosaic_block_kv`). Each variant's compiled
    program is kept in `programs`."""
    no_lengths = {**inputs, "context": inputs["context"].replace(mask=None)}
    one_empty = inputs["context"].mask.at[:, -1].set(False)
    table: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "before: one-hot modulation": ({"_modulation": onehot_modulation}, inputs),
        "exact (this code)": ({}, inputs),
        PLAIN_WHEN_FULL: ({"CUDNN_SKIP_FULL_LENGTHS": True}, inputs),
        f"{PLAIN_WHEN_FULL}, one memory slot empty": (
            {"CUDNN_SKIP_FULL_LENGTHS": True},
            {**inputs, "context": inputs["context"].replace(mask=one_empty)},
        ),
        "exact, no memory tokens": ({}, {**inputs, "context": None}),
        "exact, no key lengths": ({}, no_lengths),
    }
    with contextlib.suppress(ImportError):
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=mosaic_block_kv, max_concurrent_steps=2)
        table[MOSAIC_VARIANT] = ({"attention": mosaic_attention(config)}, no_lengths)
    model = WanDiT(cfg.dit, cfg.dit_runtime)
    for name in variants:
        patch, args = table[name]
        context = args["context"]
        row = {"variant": name, "tokens": noise_tokens + (0 if context is None else context.tokens.shape[1])}
        with patched(**patch):
            fn = jax.jit(lambda p, a: model.apply({"params": p}, **a))
            try:
                t0 = time.perf_counter()
                compiled = fn.lower(params, args).compile()
                row["compile_s"] = time.perf_counter() - t0
                programs[name] = compiled
                row["step_s"] = timed(lambda compiled=compiled, args=args: compiled(params, args), iters)
            except Exception as e:  # noqa: BLE001 - a variant this GPU or jax cannot run is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        yield row


def peak_device_gib() -> float | None:
    """The process's peak bytes in use on device 0, None where the backend keeps no statistics (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def lowvram_step(
    cfg: Any,
    args: Any,
    result: dict,
    latent: tuple[int, int, int],
    text_len: int,
    image_len: int,
    flops: float,
    save: Callable[[], None],
) -> None:
    """The step with the low-VRAM DiT switches: params made on the host, quantized and placed by `lowvram.place_dit`
    (fp8 kernels; blocks in pinned host memory), the step timed in the model's mesh; the peak device memory."""
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    t0 = time.perf_counter()
    params = lowvram.place_dit(host_params(cfg), cfg.dit, cfg.dit_runtime, mesh)
    result["place_s"] = time.perf_counter() - t0
    result["bytes_by_memory_kind_gib"] = {k: v / 2**30 for k, v in lowvram.bytes_by_memory_kind(params).items()}
    model = WanDiT(cfg.dit, cfg.dit_runtime)
    with activate(mesh):
        inputs = step_inputs(cfg, latent, args.context, text_len, image_len)
        fn = jax.jit(lambda p, a: model.apply({"params": p}, **a))
        t0 = time.perf_counter()
        compiled = fn.lower(params, inputs).compile()
        result["compile_s"] = time.perf_counter() - t0
        result["step_s"] = timed(lambda: compiled(params, inputs), args.iters)
    result["tflops"] = flops / result["step_s"] / 1e12
    result["peak_device_gib"] = peak_device_gib()
    save()
    print(
        f"low VRAM step: {result['step_s']:.3f} s, peak {result['peak_device_gib']} GiB,",
        f"params GiB by memory kind {result['bytes_by_memory_kind_gib']}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="wan2.1-i2v-14b-480p")
    ap.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), help="latent frames, height, width")
    ap.add_argument("--context", type=int, default=1544, help="memory tokens after the noise tokens")
    ap.add_argument("--layers", type=int, default=None, help="DiT layers (default: the config's)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="step variants to run (default: DEFAULT_VARIANTS, and Pallas Mosaic's when its kernel row beat cuDNN's)",
    )
    ap.add_argument("--kernels-from", type=Path, default=None, help="kernel rows of an earlier run (--skip steps --skip profile)")
    ap.add_argument("--skip", action="append", default=[], choices=["kernels", "torch", "steps", "profile"])
    ap.add_argument("--lowvram", action="store_true", help="fp8 kernels in all block layers + blocks in host memory")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trace-dir", type=Path, default=None, help="keep the profile's trace here")
    args = ap.parse_args()

    backend = jax.default_backend()
    overrides = ["dit_runtime.param_dtype=bfloat16", "dit_runtime.remat_policy=none"]
    overrides += ["dit_runtime.attention=cudnn"] if backend == "gpu" else ["dit_runtime.attention=auto"]
    overrides += [f"dit.num_layers={args.layers}"] if args.layers else []
    lowvram_switches = ["dit_runtime.weights_dtype=fp8", "dit_runtime.fp8_layers=all", "dit_runtime.offload=blocks"]
    overrides += lowvram_switches if args.lowvram else []
    cfg = load_config(args.config, overrides)
    d = cfg.dit
    pt, ph, pw = d.patch_size
    f, h, w = args.latent
    n_noise = (f // pt) * (h // ph) * (w // pw)
    length = n_noise + args.context
    text_len, image_len = d.text_len, 257 if d.has_image_branch else 0
    flops = 2 * dit_forward_flops(d, length, text_len, image_len)  # the pair
    peak = peak_flops(jax.devices()[0].device_kind)
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "config": args.config,
        "layers": d.num_layers,
        "tokens": {"noise": n_noise, "context": args.context, "text": text_len, "image": image_len, "batch": 2},
        "pair_tflop": flops / 1e12,
        "kernels": [],
        "overrides": overrides,
    }
    out = args.out or RESULTS / f"dit_step_{backend}{'_lowvram' if args.lowvram else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(result, indent=1) + "\n")
    if args.lowvram:
        lowvram_step(cfg, args, result, (f, h, w), text_len, image_len, flops, save)
        return
    what = f"{args.config} ({d.num_layers} layers), {n_noise} + {args.context} tokens x 2"
    print(f"{result['device']}, {what}: {flops / 1e12:.0f} TFLOP a step", flush=True)
    if backend == "gpu" and "torch" not in args.skip:
        result["kernels"] += torch_attention_rows(2, length, d.num_heads, d.head_dim)
    if args.kernels_from:
        result["kernels"] += json.loads(args.kernels_from.read_text())["kernels"]
    if "kernels" not in args.skip:
        result["kernels"] += matmul_rows(2 * length, d.dim, d.ffn_dim, 10)
        if backend == "gpu":
            result["kernels"] += attention_rows(2, length, d.num_heads, d.head_dim, 5)
        for row in result["kernels"]:
            print(
                f"  {row['kernel']}: " + (f"{row['tflops']:.0f} TFLOP/s" if "tflops" in row else row.get("error", "")), flush=True
            )
        save()

    if {"steps", "profile"} <= set(args.skip):
        return
    params = unbox_plain(jax.jit(init_fn(d, cfg.dit_runtime))(jax.random.key(0)))
    inputs = step_inputs(cfg, (f, h, w), args.context, text_len, image_len)
    result["steps"], programs = [], {}

    def run_steps(variants: list[str]) -> None:
        for row in step_rows(cfg, params, inputs, n_noise, variants, args.iters, mosaic_block_kv or 128, programs):
            if "step_s" in row:
                row_flops = 2 * dit_forward_flops(d, row["tokens"], text_len, image_len)
                row.update(tflops=row_flops / row["step_s"] / 1e12, mfu=row_flops / row["step_s"] / peak if peak else None)
                print(f"  {row['variant']}: {row['step_s']:.3f} s a step (compile {row['compile_s']:.1f} s)", flush=True)
            result["steps"].append(row)
            save()

    mosaic_block_kv = mosaic_beats_cudnn(result["kernels"])
    variants = args.variant or list(DEFAULT_VARIANTS)
    if "steps" not in args.skip:
        run_steps([v for v in variants if v != MOSAIC_VARIANT])
    if "profile" not in args.skip:
        model = WanDiT(d, cfg.dit_runtime)
        fn = programs.get("exact (this code)") or jax.jit(lambda p, a: model.apply({"params": p}, **a))
        trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="dit_step_trace_"))
        device_pattern = r"/device:GPU" if backend == "gpu" else r"/host:CPU"
        try:
            result["profile"] = profile_breakdown(lambda: fn(params, inputs), trace_dir, device_pattern)
            print_profile(result["profile"])
        except Exception as e:  # noqa: BLE001 - no profiler on this machine: the timings stand without it
            result["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        save()
    if "steps" not in args.skip and (MOSAIC_VARIANT in variants or mosaic_block_kv):
        run_steps([MOSAIC_VARIANT])  # last: a kernel that crashes the process loses no other row
    result["peak_device_gib"] = peak_device_gib()
    save()
    print("\n| variant | step s | TFLOP/s | MFU |\n|---|---|---|---|")
    for row in result.get("steps", []):
        if "step_s" in row:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
            print(f"| {row['variant']} | {row['step_s']:.3f} | {row['tflops']:.0f} | {mfu} |")
        else:
            print(f"| {row['variant']} | {row['error'][:80]} | | |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
