"""Benchmark: exactly what `sample.py` runs, stage by stage, at any preset with random weights.

    python bench/sample_story.py --suite cpu                 # tiny preset, 3 shots (CI-sized)
    python bench/sample_story.py --suite gpu [--steps 40]    # 14B I2V at 480p, 81 frames, 3 shots, CFG 5,
                                                             # UniPC, onestory memory; + diffusers' DiT pair
    python bench/sample_story.py --suite cpu --devices 4     # the story on 1 and on 4 forced host devices
                                                             # (CFG pair over data 2, Ulysses sequence 2)
Stages: build/init, text encoding, compile, DiT seconds per step (the guided pair), VAE decode, writing
outputs, peak device memory. With fewer than 40 steps the 40-step story time is also extrapolated
(measured total + the missing steps x the measured step). `--diffusers` times diffusers'
WanTransformer3DModel (same DiT config, bf16, two batch-1 forwards a step, as its pipeline) in a
second process. Results: bench/results/sample_story_<suite>.json (and a markdown table on stdout).
`--devices N` runs the suite's story twice, each in its own process with N or 1 forced host devices
(XLA_FLAGS; CPU): sample.py's multi-device layout (`mesh.data=2` splits the guided pair,
`mesh.sequence=N/2` shards the tokens, Ulysses inside attention) against one device, with the time
ratios and how far the latents differ -> bench/results/sample_story_multi.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BF16 = [
    "dit.param_dtype=bfloat16",
    "text_encoder.dtype=bfloat16",
    "text_encoder.param_dtype=bfloat16",
    "image_encoder.dtype=bfloat16",
    "image_encoder.param_dtype=bfloat16",
    "vae.dtype=bfloat16",
]
SUITES = {
    "cpu": {"config": "tiny", "overrides": [], "width": 32, "height": 48, "frames": 5, "steps": 4},
    "gpu": {
        "config": "wan2.1-i2v-14b-480p",
        "overrides": ["dit.attention=cudnn", *BF16],
        "width": 832,
        "height": 480,
        "frames": 81,
        "steps": 40,
    },
}
CAPTIONS = [
    "A red-haired woman in a green coat walks through a snowy market at dawn.",
    "A close-up of a street vendor handing her a steaming cup of tea.",
    "The red-haired woman in the green coat smiles and walks on into the falling snow.",
]


def peak_device_gib() -> float | None:
    """Peak bytes in use on device 0 (GPU/TPU), None where the backend keeps no statistics (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def run_story(suite: dict, steps: int, out: Path, overrides: tuple[str, ...] = ()) -> dict:
    """Load (random weights) and render a 3-shot story through sample.py's own functions."""
    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.story import MemorySettings, Settings, Shot, Story
    from onestory_jax.sharding import activate

    t0 = time.perf_counter()
    cfg, params, comps, mesh = load_for_sampling(None, suite["config"], [*suite["overrides"], *overrides], seed=0)
    import jax

    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    story = Story(
        settings=Settings(
            width=suite["width"], height=suite["height"], frames=suite["frames"], steps=steps, guidance=5.0, solver="unipc"
        ),
        memory=MemorySettings(strategy="onestory"),
        shots=tuple(Shot(c) for c in CAPTIONS),
    )
    with activate(mesh):
        manifest = render_story(cfg, params, comps, story, out, progress=False, mesh=mesh)
    t = manifest["timings"]
    shots = manifest["shots"]
    row = {
        "build_init_s": build_s,
        "encode_text_s": t["encode_text_s"],
        "compile_s": t.get("compile_s"),
        "dit_step_s": t.get("dit_step_s"),
        "denoise_s": sum(s["timings"]["denoise_s"] or 0 for s in shots),
        "vae_decode_s": sum(s["timings"]["decode_s"] for s in shots),
        "write_s": sum(s["timings"]["write_s"] for s in shots),
        "story_s": t["total_s"],
        "steps": steps,
        "shots": len(shots),
        "peak_device_gib": peak_device_gib(),
    }
    if steps < 40 and row["dit_step_s"]:
        row["story_40_steps_s"] = t["total_s"] + len(shots) * (40 - steps) * row["dit_step_s"]
    return row


def diffusers_pair_step(config: str, overrides: list[str], latent: tuple[int, int, int], iters: int) -> dict:
    """diffusers' WanTransformer3DModel, random bf16 weights: seconds a step for its two batch-1 forwards."""
    import torch
    from diffusers import WanTransformer3DModel

    from onestory_jax.config_files import load_config
    from onestory_jax.convert.dit_source import diffusers_config

    cfg = load_config(config, overrides).dit
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with dev:
        model = WanTransformer3DModel(**diffusers_config(cfg)).eval()
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, cfg.in_dim, *latent, device=dev, dtype=dtype, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype, generator=g)
    image = torch.randn(1, 257, cfg.image_dim, device=dev, dtype=dtype, generator=g) if cfg.has_image_branch else None
    t = torch.tensor([500.0], device=dev)

    def step() -> None:
        with torch.no_grad():
            for _ in range(2):  # cond and uncond, as WanImageToVideoPipeline runs them
                model(x, t, text, encoder_hidden_states_image=image, return_dict=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"diffusers_pair_step_s": statistics.median(times), "diffusers_peak_gib": peak}


def multi_device_rows(suite_name: str, steps: int, devices: int) -> list[dict]:
    """The story on 1 device and on `devices` (data 2 x sequence devices/2), each in a process with that
    many forced host devices; the second row carries its time ratios to the first and the latent difference."""
    import numpy as np

    layouts = {
        1: ("mesh.data=1", "mesh.fsdp=1", "mesh.sequence=1"),
        devices: ("mesh.data=2", "mesh.fsdp=1", f"mesh.sequence={devices // 2}"),
    }
    rows, outs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n, mesh in layouts.items():
            out = Path(tmp) / f"{n}dev"
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--suite",
                    suite_name,
                    "--steps",
                    str(steps),
                    "--one-story",
                    str(out),
                    *(f"--override={o}" for o in mesh),
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                raise SystemExit(f"{n}-device story failed:\n{r.stderr[-3000:]}")
            rows.append(
                {
                    "name": f"{n} device{'s' if n > 1 else ''} ({' '.join(o.removeprefix('mesh.') for o in mesh)})",
                    **json.loads(r.stdout.strip().splitlines()[-1]),
                }
            )
            outs.append(sorted(out.glob("shot_*.npy")))
        ref = [np.load(f) for f in outs[0]]
        scale = max(float(np.abs(a).max()) for a in ref)
        diff = max(float(np.abs(np.load(f) - a).max()) for f, a in zip(outs[1], ref))
    for key in ("compile_s", "dit_step_s", "denoise_s", "story_s"):
        rows[1][f"{key}_ratio"] = rows[1][key] / rows[0][key] if rows[0].get(key) and rows[1].get(key) else None
    rows[1]["max_latent_diff_rel"] = diff / scale
    return rows


def latent_of(suite: dict, cfg_name: str) -> tuple[int, int, int]:
    from onestory_jax.config_files import load_config

    vae = load_config(cfg_name).vae
    return (suite["frames"] - 1) // 4 + 1, suite["height"] // vae.spatial_factor, suite["width"] // vae.spatial_factor


def table(rows: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "name"]
    fmt = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + r["name"] + " | " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--steps", type=int, help="denoising steps a shot (default: the suite's)")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers' DiT pair (second process)")
    ap.add_argument("--diffusers-iters", type=int, default=2)
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/sample_story_<suite>.json)")
    ap.add_argument("--devices", type=int, help="cpu: the story on 1 vs this many forced host devices (even, >= 2)")
    ap.add_argument("--diffusers-only", action="store_true", help=argparse.SUPPRESS)  # the second process
    ap.add_argument("--one-story", type=Path, help=argparse.SUPPRESS)  # a multi-device run: its output folder
    ap.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    suite = SUITES[args.suite]
    latent = latent_of(suite, suite["config"])
    if args.diffusers_only:
        print(json.dumps(diffusers_pair_step(suite["config"], suite["overrides"], latent, args.diffusers_iters)))
        return
    steps = args.steps or suite["steps"]
    if args.one_story:
        print(json.dumps(run_story(suite, steps, args.one_story, tuple(args.override))))
        return
    import jax

    meta = {
        "suite": args.suite,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "host": platform.node(),
        "latent": latent,
    }
    if args.devices:
        rows = multi_device_rows(args.suite, steps, args.devices)
        write_results(RESULTS / "sample_story_multi.json", {**meta, "cpu_count": os.cpu_count(), "rows": rows})
        return
    with tempfile.TemporaryDirectory() as tmp:
        row = {"name": f"onestory-jax {suite['config']}", **run_story(suite, steps, Path(tmp) / "story")}
    if args.diffusers:  # in a fresh process: JAX keeps its device memory pool until exit
        r = subprocess.run(
            [sys.executable, __file__, "--suite", args.suite, "--diffusers-only", "--diffusers-iters", str(args.diffusers_iters)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"diffusers run failed:\n{r.stderr[-3000:]}")
        row.update(json.loads(r.stdout.strip().splitlines()[-1]))
        if row["dit_step_s"]:
            row["speedup_vs_diffusers"] = row["diffusers_pair_step_s"] / row["dit_step_s"]
    write_results(args.out or RESULTS / f"sample_story_{args.suite}.json", {**meta, "rows": [row]})


def write_results(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result["rows"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
