"""Compiled memory of VAE decode (and encode) of one 81-frame 480x832 shot at the real Wan2.1 config.

    python bench/vae_memory.py [--dtype float32|bfloat16] [--encode] [--run]

By default nothing is allocated: params are abstract (jax.eval_shape) and the figures come from
`jax.jit(...).lower(...).compile().memory_analysis()` on the default backend. `--run` also runs
the function once on random weights and inputs (an accelerator is advised) and records its wall
time and the allocator's peak. Writes bench/results/vae_memory.json (entries keyed by
backend/dtype/function, merged into the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onestory_jax.config import VAEConfig
from onestory_jax.models.vae import decode, encode, init_fn

RESULTS = Path(__file__).resolve().parent / "results" / "vae_memory.json"
FRAMES, HEIGHT, WIDTH = 81, 480, 832
GIB = 1 << 30


def measure(cfg: VAEConfig, fn_name: str, run: bool) -> dict:
    """Lower and compile encode or decode on abstract inputs; return the memory analysis in GiB."""
    params = nn.meta.unbox(jax.eval_shape(init_fn(cfg), jax.random.key(0)))
    sf, tf = cfg.spatial_factor, cfg.temporal_factor
    if fn_name == "decode":
        fn, shape = decode, (1, 1 + (FRAMES - 1) // tf, HEIGHT // sf, WIDTH // sf, cfg.z_dim)
    else:
        fn, shape = encode, (1, FRAMES, HEIGHT, WIDTH, 3)
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(fn, cfg)).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    seconds = time.perf_counter() - t0
    measured = _run(cfg, compiled, shape) if run else {}
    m = compiled.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    peak = sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    return {
        "function": fn_name,
        "input_shape": list(shape),
        "dtype": cfg.dtype,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "peak_gib": round(peak / GIB, 3),
        **{f"{k}_gib": round(v / GIB, 3) for k, v in sizes.items()},
        "compile_seconds": round(seconds, 1),
        **measured,
    }


def _run(cfg: VAEConfig, compiled: Any, shape: tuple[int, ...]) -> dict:
    """Run once to warm up, then time two runs. The allocator's peak is that of the process: it
    includes compile-time autotuning scratch, so the peak before the first run is recorded too."""
    before = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    params = jax.jit(lambda k: nn.meta.unbox(init_fn(cfg)(k)))(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), shape, jnp.float32, -1.0, 1.0)
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    gib = lambda b: round(b / GIB, 3) if b else None  # noqa: E731
    return {"run_seconds": round(min(times), 3), "allocator_peak_before_run_gib": gib(before), "allocator_peak_gib": gib(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--encode", action="store_true", help="also measure encode of the 81-frame video")
    ap.add_argument("--run", action="store_true", help="also run it (random weights) for time and allocator peak")
    args = ap.parse_args()
    cfg = dataclasses.replace(VAEConfig(), dtype=args.dtype)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for fn_name in ("decode", "encode") if args.encode else ("decode",):
        r = measure(cfg, fn_name, args.run)
        print(json.dumps(r))
        results[f"{r['backend']}/{r['dtype']}/{fn_name}"] = r
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
