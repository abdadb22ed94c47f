"""Benchmark: the exact 14B CFG step on one GPU, lever by lever (issue 22, item 1).

    python bench/dit_step.py --skip steps --skip profile --out K.json   # kernels alone, own process (~1 min)
    python bench/dit_step.py --skip kernels --skip torch   # the step's variants + profile
    python bench/dit_step.py --lowvram                  # the step with fp8 kernels and blocks in host memory
    python bench/dit_step.py --config tiny --latent 3 8 8 --context 24   # the same code path on a CPU, in seconds
    PARTS=step bash bench/gpu_suite.sh                  # all three on a GPU (~8 min)

Random weights (bf16), the guided pair as one batch of 2, 1,544 memory tokens after the 32,760 noise tokens of an
81-frame 832x480 shot: the DiT call sample.py makes at each denoising step.
1. Kernels at the step's own shapes: each linear layer's matmul (XLA -> cuBLAS), and self-attention through cuDNN
   flash (`jax.nn.dot_product_attention`, with and without key lengths), Pallas Mosaic GPU's Hopper kernel, and
   torch's SDPA backends (a subprocess). Their TFLOP/s give the step's floor.
2. The step, timed per variant (VARIANTS: a lever on or off), in one process on the same params and inputs.
3. A profile of one step: GPU time per kernel (calls, durations by order of magnitude) and per kernel class.
`--lowvram` instead times the step with fp8 kernels in every block layer and the blocks in host memory (streamed per
layer), the DiT made on the host and placed as sample.py places it, and reports the process's peak device memory.
Writes bench/results/dit_step_<backend>[_lowvram].json after each section, and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from dit_forward import median_seconds
from sample_story import peak_device_gib

from onestory_jax.config import Config, MeshConfig
from onestory_jax.config_files import load_config
from onestory_jax.models import dit as dit_module
from onestory_jax.models import lowvram
from onestory_jax.models.dit import ContextTokens, WanDiT, init_fn
from onestory_jax.models.flops import dit_forward_flops, peak_flops
from onestory_jax.sharding import activate, make_mesh, unbox_plain

RESULTS = Path(__file__).resolve().parent / "results"
LOWVRAM_SWITCHES = ("dit_runtime.weights_dtype=fp8", "dit_runtime.fp8_layers=all", "dit_runtime.offload=blocks")
KERNEL_CLASSES = (  # (class, pattern on a GPU kernel's name), first match wins
    ("attention", r"fmha|sdpa|flash|attention"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|matmul|wgmma|_dot"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|nhwc|nchw"),
    ("fused elementwise/reduction", r"fusion|loop_|input_|reduce|convert"),
)
BEFORE_MODULATION = "before: one-hot modulation"
EXACT = "exact (this code)"
NO_MEMORY = "exact, no memory tokens"
NO_LENGTHS = "exact, no key lengths (cuDNN's plain kernel)"
VARIANTS = (BEFORE_MODULATION, EXACT, NO_MEMORY, NO_LENGTHS)


def normal(seed: int, shape: tuple[int, ...], dtype: Any = jnp.bfloat16, scale: float = 1.0) -> jax.Array:
    """Random (never zero) values made on the device."""
    return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale).astype(dtype)


def step_seconds(fn: Callable[[], Any], iters: int) -> float:
    """Median seconds of `fn()`, waited for, after one warm-up call."""
    return median_seconds(lambda: jax.block_until_ready(fn()), warmup=1, iters=iters)


def kernel_seconds(fn: Callable[..., Any], *args: jax.Array, calls: int = 10, warmup: int = 3) -> float:
    """Seconds per call of a short kernel: `calls` dispatched back to back and waited for once, after `warmup`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(calls)])
    return (time.perf_counter() - t0) / calls


def onehot_modulation(table: jax.Array, e: jax.Array, is_context: jax.Array | None) -> list[jax.Array]:
    """The modulation as models/dit.py computed it before the select: a one-hot sum over the groups per token, which
    XLA writes out as a [B, L, D] fp32 table per vector (same values: 1 x a + 0 x b)."""
    m = table[None, None].astype(jnp.float32) + e
    if is_context is None:
        return [m[:, 0, k][:, None, :] for k in range(m.shape[2])]
    w = jax.nn.one_hot(is_context.astype(jnp.int32), 2, dtype=jnp.float32)[None, :, :, None]  # [1, L, 2, 1]
    return [jnp.sum(w * m[:, None, :, k, :], axis=2) for k in range(m.shape[2])]


Patch = tuple[ModuleType, str, Any]


@contextlib.contextmanager
def patched(patches: tuple[Patch, ...]) -> Iterator[None]:
    """Module attributes replaced while a variant traces: (module, name, value) each."""
    old = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in old:
            setattr(module, name, value)


def matmul_rows(tokens: int, dim: int, ffn: int) -> list[dict]:
    """TFLOP/s of each linear layer's matmul alone at the step's token count (bf16 in, bf16 out, as the DiT runs them)."""
    rows = []
    dot = jax.jit(jnp.dot)
    for name, k, n in (
        ("q/k/v/o [D, D]", dim, dim),
        ("q+k+v fused [D, 3D]", dim, 3 * dim),
        ("fc1 [D, F]", dim, ffn),
        ("fc2 [F, D]", ffn, dim),
    ):
        s = kernel_seconds(dot, normal(1, (tokens, k)), normal(2, (k, n), scale=k**-0.5))
        rows.append({"kernel": f"matmul {name}", "shape": [tokens, k, n], "s": s, "tflops": 2 * tokens * k * n / s / 1e12})
    return rows


def attention_rows(batch: int, length: int, heads: int, head_dim: int) -> list[dict]:
    """TFLOP/s of bf16 self-attention kernels alone at the step's shape [B, L, N, H]; errors against cuDNN's output."""
    qkv = [normal(seed, (batch, length, heads, head_dim)) for seed in (3, 4, 5)]
    flops = 4 * batch * length * length * heads * head_dim
    full = jnp.full((batch,), length, jnp.int32)
    kernels: dict[str, Callable[..., jax.Array]] = {
        "cudnn, no key lengths": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
        "cudnn, key lengths (all valid)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn", key_value_seq_lengths=full
        ),
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        for block_kv in (128, 256):
            config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2)
            kernels[f"pallas mosaic gpu, block_kv {block_kv}"] = lambda q, k, v, c=config: attention_mgpu.attention(
                q * q.shape[-1] ** -0.5, k, v, c
            )
    except ImportError as e:  # not in this jax
        print(f"pallas mosaic gpu attention: {e}")
    rows, ref = [], None
    for name, kernel in kernels.items():
        jitted = jax.jit(kernel)
        try:
            out = jitted(*qkv)
            s = kernel_seconds(jitted, *qkv, calls=5)
        except Exception as e:  # noqa: BLE001 - a kernel this GPU, jax or shape does not support: reported, not fatal
            rows.append({"kernel": f"attention {name}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        ref = out if ref is None else ref
        err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        row = {"kernel": f"attention {name}", "shape": [batch, length, heads, head_dim], "s": s, "tflops": flops / s / 1e12}
        rows.append({**row, "rel_err_vs_cudnn": err})
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
            for _ in range(3):
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
    """torch's SDPA backends (cuDNN, FlashAttention-2) at the same shape, in a subprocess: JAX holds 75% of the GPU's
    memory by then, and torch needs about 1 GiB of it."""
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


def step_inputs(cfg: Config, latent: tuple[int, int, int], n_ctx: int, text_len: int, image_len: int) -> dict[str, Any]:
    """The guided pair's DiT inputs (batch 2), random; the memory slots all filled (mask all True)."""
    b, d = 2, cfg.dit
    angles = normal(10, (b, n_ctx, d.head_dim // 2), jnp.float32, 3.0)
    context = ContextTokens(
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
        "context": context,
    }


def kernel_class(name: str) -> str:
    """The class of a GPU kernel by its name (KERNEL_CLASSES), else `other`."""
    return next((c for c, pattern in KERNEL_CLASSES if re.search(pattern, name, re.I)), "other")


def trace_breakdown(trace_file: Path, device_pattern: str) -> dict:
    """Device time per trace line of a perfetto trace (processes whose names match `device_pattern`; on a GPU, its
    streams): per kernel class, and per kernel name its calls, seconds and calls by order of magnitude of duration
    (`1e-3`: 1-10 ms), which tells apart calls of one kernel at different shapes."""
    events = json.loads(gzip.decompress(trace_file.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = lambda kind: {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == kind
    }
    processes = {pid: name for (pid, _), name in names("process_name").items() if re.search(device_pattern, name)}
    threads = names("thread_name")
    calls: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in processes:
            line = f"{processes[e['pid']]} / {threads.get((e['pid'], e['tid']), e['tid'])}"
            calls[line][e["name"]].append(e.get("dur", 0) / 1e6)
    lines = {}
    for line, by_name in calls.items():
        by_class: dict[str, float] = defaultdict(float)
        for name, durations in by_name.items():
            by_class[kernel_class(name)] += sum(durations)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]
        lines[line] = {
            "total_s": sum(by_class.values()),
            "by_class_s": dict(by_class),
            "top": [
                {"name": n, "class": kernel_class(n), "s": sum(d), "calls": len(d), "by_magnitude": magnitudes(d)} for n, d in top
            ],
        }
    return {"lines": lines, "trace_file": trace_file.name}


def magnitudes(durations: list[float]) -> dict[str, dict[str, float]]:
    """Calls and seconds per decade of duration: {"1e-3": {"calls": n, "s": total}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for d in durations:
        bucket = out.setdefault(f"1e{math.floor(math.log10(max(d, 1e-9)))}", {"calls": 0, "s": 0.0})
        bucket["calls"] += 1
        bucket["s"] += d
    return out


def profile(fn: Callable[[], Any], trace_dir: Path, device_pattern: str) -> dict:
    """`trace_breakdown` of one call of `fn` (after a warm-up call), traced into `trace_dir`."""
    jax.block_until_ready(fn())
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        jax.block_until_ready(fn())
    return trace_breakdown(next(trace_dir.rglob("perfetto_trace.json.gz")), device_pattern)


def print_profile(breakdown: dict) -> None:
    """Each trace line's time by class and its top kernels."""
    for line, rec in sorted(breakdown["lines"].items(), key=lambda kv: -kv[1]["total_s"]):
        print(f"profile line {line}: {rec['total_s']:.3f} s")
        for c, s in sorted(rec["by_class_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {c}: {s:.3f} s ({s / max(rec['total_s'], 1e-9):.0%})")
        for k in rec["top"][:12]:
            print(f"    {k['s']:.4f} s in {k['calls']} calls [{k['class']}] {k['name'][:100]}")


def step_variants(inputs: dict[str, Any]) -> dict[str, tuple[tuple[Patch, ...], dict[str, Any]]]:
    """Each variant's module patches and inputs (VARIANTS)."""
    return {
        BEFORE_MODULATION: (((dit_module, "_modulation", onehot_modulation),), inputs),
        EXACT: ((), inputs),
        NO_MEMORY: ((), {**inputs, "context": None}),
        NO_LENGTHS: ((), {**inputs, "context": inputs["context"].replace(mask=None)}),
    }


def step_rows(
    cfg: Config, params: Any, inputs: dict[str, Any], names: list[str], iters: int, programs: dict[str, Any]
) -> Iterator[dict]:
    """Seconds per guided-pair DiT call for each named variant, in this process on the same params, one row at a
    time; each variant's compiled program is kept in `programs`."""
    variants = step_variants(inputs)
    model = WanDiT(cfg.dit, cfg.dit_runtime)
    for name in names:
        row: dict[str, Any] = {"variant": name}
        patches, args = variants[name]
        context = args["context"]
        row["context_tokens"] = 0 if context is None else context.tokens.shape[1]
        with patched(patches):
            try:
                t0 = time.perf_counter()
                compiled = jax.jit(lambda p, a: model.apply({"params": p}, **a)).lower(params, args).compile()
                row["compile_s"] = time.perf_counter() - t0
                programs[name] = compiled
                row["step_s"] = step_seconds(lambda compiled=compiled, args=args: compiled(params, args), iters)
            except Exception as e:  # noqa: BLE001 - a variant this GPU or jax cannot run is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        yield row


def host_params(cfg: Config) -> Any:
    """The DiT's stored params on the host CPU, random-looking without a host RNG at 16 B values: one random
    vector repeated through each kernel and modulation table (biases and norm scales as initialised)."""
    abstract = unbox_plain(jax.eval_shape(init_fn(cfg.dit, cfg.dit_runtime.plain()), jax.random.key(0)))
    base = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(jnp.bfloat16)

    def leaf(path: Any, a: jax.ShapeDtypeStruct) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if "kernel" in name or "modulation" in name:
            return np.resize(base.astype(a.dtype), a.shape)
        return np.full(a.shape, 1.0 if "scale" in name else 0.0, a.dtype)

    on_host = jax.sharding.NamedSharding(lowvram.host_mesh(), jax.sharding.PartitionSpec())
    return jax.device_put(jax.tree_util.tree_map_with_path(leaf, abstract), on_host)


def lowvram_step(cfg: Config, inputs: dict[str, Any], iters: int) -> dict[str, Any]:
    """The step with the low-VRAM DiT switches: params made on the host, quantized and placed by `lowvram.place_dit`
    (fp8 kernels; blocks in pinned host memory), timed in the model's mesh; the process's peak device memory."""
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    t0 = time.perf_counter()
    params = lowvram.place_dit(host_params(cfg), cfg.dit, cfg.dit_runtime, mesh)
    out: dict[str, Any] = {"place_s": time.perf_counter() - t0}
    out["bytes_by_memory_kind_gib"] = {k: v / 2**30 for k, v in lowvram.bytes_by_memory_kind(params).items()}
    model = WanDiT(cfg.dit, cfg.dit_runtime)
    with activate(mesh):
        t0 = time.perf_counter()
        compiled = jax.jit(lambda p, a: model.apply({"params": p}, **a)).lower(params, inputs).compile()
        out["compile_s"] = time.perf_counter() - t0
        out["step_s"] = step_seconds(lambda: compiled(params, inputs), iters)
    return {**out, "peak_device_gib": peak_device_gib()}


def print_steps(rows: list[dict]) -> None:
    """The step variants as a markdown table."""
    print("\n| variant | step s | TFLOP/s | MFU |\n|---|---|---|---|")
    for row in rows:
        if "step_s" in row:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
            print(f"| {row['variant']} | {row['step_s']:.3f} | {row['tflops']:.0f} | {mfu} |")
        else:
            print(f"| {row['variant']} | {row['error'][:80]} | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="wan2.1-i2v-14b-480p")
    ap.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), help="latent frames, height, width")
    ap.add_argument("--context", type=int, default=1544, help="memory tokens after the noise tokens")
    ap.add_argument("--layers", type=int, default=None, help="DiT layers (default: the config's)")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per variant, after one warm-up")
    ap.add_argument("--variant", action="append", default=[], choices=VARIANTS, help="step variants (default: all)")
    ap.add_argument("--skip", action="append", default=[], choices=["kernels", "torch", "steps", "profile"])
    ap.add_argument(
        "--lowvram", action="store_true", help="the step with fp8 kernels in all block layers + blocks in host memory"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trace-dir", type=Path, default=None, help="keep the profile's trace here")
    args = ap.parse_args()

    backend = jax.default_backend()
    overrides = ["dit_runtime.param_dtype=bfloat16", "dit_runtime.remat_policy=none"]
    overrides += ["dit_runtime.attention=cudnn"] if backend == "gpu" else ["dit_runtime.attention=auto"]
    overrides += [f"dit.num_layers={args.layers}"] if args.layers else []
    switches = list(LOWVRAM_SWITCHES) if args.lowvram else []
    cfg = load_config(args.config, overrides + switches)
    d = cfg.dit
    pt, ph, pw = d.patch_size
    f, h, w = args.latent
    n_noise = (f // pt) * (h // ph) * (w // pw)
    length = n_noise + args.context
    text_len, image_len = d.text_len, 257 if d.has_image_branch else 0
    pair_flops = lambda tokens: 2 * dit_forward_flops(d, tokens, text_len, image_len)
    peak = peak_flops(jax.devices()[0].device_kind)
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "config": args.config,
        "layers": d.num_layers,
        "tokens": {"noise": n_noise, "context": args.context, "text": text_len, "image": image_len, "batch": 2},
        "pair_tflop": pair_flops(length) / 1e12,
        "overrides": overrides,
        "switches": switches,
        "kernels": [],
    }
    out = args.out or RESULTS / f"dit_step_{backend}{'_lowvram' if args.lowvram else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(result, indent=1) + "\n")
    what = f"{args.config} ({d.num_layers} layers), {n_noise} + {args.context} tokens x 2"
    print(f"{result['device']}, {what}: {result['pair_tflop']:.0f} TFLOP a step", flush=True)
    if args.lowvram:
        result.update(lowvram_step(cfg, step_inputs(cfg, (f, h, w), args.context, text_len, image_len), args.iters))
        result["tflops"] = pair_flops(length) / result["step_s"] / 1e12
        save()
        print(f"low VRAM step: {result['step_s']:.3f} s, peak {result['peak_device_gib']} GiB")
        return

    if backend == "gpu" and "torch" not in args.skip:
        result["kernels"] += torch_attention_rows(2, length, d.num_heads, d.head_dim)
    if "kernels" not in args.skip:
        result["kernels"] += matmul_rows(2 * length, d.dim, d.ffn_dim)
        result["kernels"] += attention_rows(2, length, d.num_heads, d.head_dim) if backend == "gpu" else []
    for row in result["kernels"]:
        print(f"  {row['kernel']}: " + (f"{row['tflops']:.0f} TFLOP/s" if "tflops" in row else row.get("error", "")), flush=True)
    save()
    if {"steps", "profile"} <= set(args.skip):
        return

    params = unbox_plain(jax.jit(init_fn(d, cfg.dit_runtime))(jax.random.key(0)))
    inputs = step_inputs(cfg, (f, h, w), args.context, text_len, image_len)
    result["steps"], programs = [], {}

    def run_steps(names: list[str]) -> None:
        for row in step_rows(cfg, params, inputs, names, args.iters, programs):
            if "step_s" in row:
                flops = pair_flops(n_noise + row["context_tokens"])
                row.update(tflops=flops / row["step_s"] / 1e12, mfu=flops / row["step_s"] / peak if peak else None)
                print(f"  {row['variant']}: {row['step_s']:.3f} s a step (compile {row['compile_s']:.1f} s)", flush=True)
            result["steps"].append(row)
            save()

    if "steps" not in args.skip:
        run_steps(args.variant or list(VARIANTS))
    if "profile" not in args.skip:
        model = WanDiT(d, cfg.dit_runtime)
        fn = programs.get(EXACT) or jax.jit(lambda p, a: model.apply({"params": p}, **a))
        trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="dit_step_trace_"))
        try:
            result["profile"] = profile(
                lambda: fn(params, inputs), trace_dir, r"/device:GPU" if backend == "gpu" else r"/host:CPU"
            )
            print_profile(result["profile"])
        except Exception as e:  # noqa: BLE001 - no profiler on this machine: the timings stand without it
            result["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        save()
    result["peak_device_gib"] = peak_device_gib()
    save()
    print_steps(result["steps"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
