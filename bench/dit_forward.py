"""Benchmark: one DiT forward, JAX vs diffusers' WanTransformer3DModel, same weights, same process.

    python bench/dit_forward.py --suite cpu   # tiny + mid-size (1.3B-shaped, 2 layers, 4k tokens), fp32
    python bench/dit_forward.py --suite gpu   # 1.3B at 480p (32,760 tokens), bf16, cuDNN vs SDPA

Writes bench/results/dit_forward_<suite>.json. Figures are ratios measured side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from onestory_jax.config import DiTConfig, DiTRuntime
from onestory_jax.convert.dit import convert
from onestory_jax.convert.dit_source import diffusers_config
from onestory_jax.models.dit import WanDiT
from onestory_jax.models.flops import dit_forward_flops, peak_flops

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall seconds of `fn()` after `warmup` calls (`fn` waits for its own results)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str, cfg: DiTConfig, rt: DiTRuntime, latent: tuple[int, int, int], device: str, iters: int) -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    torch_dtype = torch.bfloat16 if rt.dtype == "bfloat16" else torch.float32
    tdev = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(0)
    with torch.device(tdev):  # random weights: the two models are timed, not compared
        ref = WanTransformer3DModel(**diffusers_config(cfg)).eval().to(torch_dtype)
    sd = {k: v.detach().float().cpu().numpy() for k, v in ref.state_dict().items()}
    params = convert(
        cfg,
        {k: v.shape for k, v in sd.items()},
        sd.__getitem__,
        "diffusers",
        dtype=np.float32 if rt.param_dtype == "float32" else jax.numpy.bfloat16,
    )
    del sd
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *latent, cfg.in_dim)).astype(np.float32)
    text = rng.standard_normal((1, 512, cfg.text_dim)).astype(np.float32)
    image = rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32) if cfg.has_image_branch else None
    t = np.array([500], np.int64)

    fwd = jax.jit(WanDiT(cfg, rt).apply)
    jx = [jax.device_put(a) if a is not None else None for a in (x, t, text, image)]
    jax_s = median_seconds(lambda: fwd({"params": params}, *jx).block_until_ready(), warmup=2, iters=iters)

    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).to(tdev, torch_dtype)
    tt = torch.from_numpy(t).to(tdev)
    ttext = torch.from_numpy(text).to(tdev, torch_dtype)
    timg = torch.from_numpy(image).to(tdev, torch_dtype) if image is not None else None

    def torch_fwd():
        with torch.no_grad():
            ref(hidden_states=tx, timestep=tt, encoder_hidden_states=ttext, encoder_hidden_states_image=timg, return_dict=False)
        if device == "gpu":
            torch.cuda.synchronize()

    torch_s = median_seconds(torch_fwd, warmup=2, iters=iters)

    pt, ph, pw = cfg.patch_size
    tokens = (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)
    flops = dit_forward_flops(cfg, tokens, 512, 257 if cfg.has_image_branch else 0)
    row = {
        "case": name,
        "dtype": rt.dtype,
        "layers": cfg.num_layers,
        "dim": cfg.dim,
        "tokens": tokens,
        "jax_s": jax_s,
        "torch_s": torch_s,
        "jax_over_torch": jax_s / torch_s,
        "tflop": flops / 1e12,
        "jax_tflops": flops / jax_s / 1e12,
        "torch_tflops": flops / torch_s / 1e12,
    }
    if device == "gpu":
        gpu = torch.cuda.get_device_name()
        peak = peak_flops(gpu)
        row.update(gpu=gpu, jax_mfu=flops / jax_s / peak if peak else None, torch_mfu=flops / torch_s / peak if peak else None)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    mid = DiTConfig(model_type="t2v", in_dim=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=2, image_dim=None)
    if args.suite == "cpu":
        tiny = DiTConfig(model_type="i2v", dim=24, ffn_dim=32, num_heads=2, num_layers=2, text_dim=32, image_dim=16)
        cases = [("tiny-i2v", tiny, DiTRuntime(), (3, 4, 6)), ("mid-1.3b-shaped-2L", mid, DiTRuntime(), (4, 64, 64))]
    else:
        full, bf16 = (
            dataclasses.replace(mid, num_layers=30),
            DiTRuntime(dtype="bfloat16", param_dtype="bfloat16", attention="cudnn"),
        )
        cases = [("t2v-1.3b-480p-bf16", full, bf16, (21, 60, 104))]
    rows = [run_case(n, c, rt, lat, args.suite, args.iters) for n, c, rt, lat in cases]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"dit_forward_{args.suite}.json"
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    import report  # bench/report.py, beside this script

    report.main()


if __name__ == "__main__":
    main()
