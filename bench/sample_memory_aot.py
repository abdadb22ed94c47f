"""Compile-only memory of the 14B story program under the low-VRAM switches: nothing allocated, no weights.

    python bench/sample_memory_aot.py                    # every variant at 2, 4 and 40 layers, each in its own process
    python bench/sample_memory_aot.py --layers 40        # the full DiT only (as bench/gpu_suite.sh on a GPU)
    python bench/sample_memory_aot.py --variant "fp8 all, umT5 on CPU"  # one variant, merged into the results

The story program is sample.py's (`sampling/generate.py: story_program`): Wan2.1-I2V-14B at 832x480, 81
frames a shot (21x60x104 latents, 32,760 noise + 1,544 memory tokens), 3 shots, 40 UniPC steps, CFG 5 (the
guided pair as one batch of 2), onestory memory, bf16 params (DiT, umT5, CLIP) and bf16 compute, compiled
on the default backend for one device from abstract params (`lowvram.abstract_dit`: fp8 dtypes, host memory
kinds) and abstract inputs. Per variant: `compiled.memory_analysis()` (peak = arguments + temporaries +
outputs - aliased, as `training/aot.py`), the bytes of the params by memory kind, and the VAE decode of one
shot (the next program sample.py runs) whole and in 256-px tiles.

On a CPU this is XLA's CPU compiler's analysis, not a GPU measurement: its temporaries differ from the GPU
compiler's, `attention: auto` compiles the chunked path (cuDNN flash on a GPU), and the CPU backend has no
separate host memory, so host-resident (`pinned_host`) arguments are counted in its arguments; the row's
`device_peak_gib` subtracts them. Compiles at 2, 4 and 40 layers split each variant's analysis into what grows
with the layers and what does not (`gpu_estimate`), and the H200's measured bf16 peak turns that into an estimate
for a GPU (`calibrate`). On a GPU the same script gives the GPU compiler's own analysis, host arguments apart.
The whole default run takes about 9 minutes on 2 shared cores (18 compiles). Writes
bench/results/sample_memory_aot.json (rows keyed by backend, variant, layers; estimates by backend, variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "sample_memory_aot.json"
PRESET = "wan2.1-i2v-14b-480p"
BF16 = [
    "dit.param_dtype=bfloat16",
    "text_encoder.dtype=bfloat16",
    "text_encoder.param_dtype=bfloat16",
    "image_encoder.dtype=bfloat16",
    "image_encoder.param_dtype=bfloat16",
    "vae.dtype=bfloat16",
]
FP8 = {"ffn": ["dit.weights_dtype=fp8", "dit.fp8_layers=ffn"], "all": ["dit.weights_dtype=fp8", "dit.fp8_layers=all"]}
OFFLOAD = ["dit.offload=blocks"]
VARIANTS = {  # name -> overrides; text_encoder.device=cpu takes umT5 out of the program's params (as sample.py does)
    "bf16": [],
    "bf16, umT5 on CPU": ["text_encoder.device=cpu"],
    "fp8 ffn, umT5 on CPU": [*FP8["ffn"], "text_encoder.device=cpu"],
    "fp8 all, umT5 on CPU": [*FP8["all"], "text_encoder.device=cpu"],
    "offload, umT5 on CPU": [*OFFLOAD, "text_encoder.device=cpu"],
    "fp8 all + offload, umT5 on CPU": [*FP8["all"], *OFFLOAD, "text_encoder.device=cpu"],
}
LATENT, SHOTS, STEPS = (21, 60, 104, 16), 3, 40
GIB = 1 << 30


def abstract_story_params(cfg) -> dict:
    """ShapeDtypeStructs of the params sample.py holds under `cfg`'s switches (`load_for_sampling`)."""
    import jax

    from onestory_jax.models import lowvram, onestory
    from onestory_jax.sharding import abstract_params, make_mesh

    mesh = make_mesh(cfg.mesh)
    skip = {"dit"} | ({"text_encoder"} if cfg.text_encoder.device == "cpu" else set())
    parts = [p for p in onestory.components(cfg) if p not in skip]
    plain = dataclasses.replace(cfg, dit_runtime=cfg.dit_runtime.plain())  # the stored tree, as random_params makes it
    params = abstract_params(onestory.init_fn(plain, parts), mesh, jax.random.key(0))
    params["dit"] = lowvram.abstract_dit(cfg.dit, cfg.dit_runtime, mesh)
    return params


def memory_row(compiled) -> dict:
    """GiB of XLA's memory analysis (device and host parts) and the peak estimate."""
    m = compiled.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "host_arguments": m.host_argument_size_in_bytes,
        "host_temporaries": m.host_temp_size_in_bytes,
    }
    peak = sizes["arguments"] + sizes["temporaries"] + sizes["outputs"] - sizes["aliased"]
    return {**{f"{k}_gib": v / GIB for k, v in sizes.items()}, "peak_gib": peak / GIB}


def measure(variant: str, layers: int) -> dict:
    """Compile the story program of one variant with `layers` DiT blocks; its analysis and the params it holds.

    device_peak_gib: the analysis' peak, less the host-resident params where the backend counts them as its
    arguments (CPU), plus the params held on the device that the program does not read (umT5: jit drops unused
    arguments, but sample.py holds them on the device unless text_encoder.device=cpu).
    """
    import jax

    from onestory_jax.config_files import load_config
    from onestory_jax.models import lowvram
    from onestory_jax.sampling.generate import abstract_story_inputs, generation_spec, story_program
    from onestory_jax.sharding import activate, make_mesh
    from onestory_jax.training.aot import COMPILER_OPTIONS

    cfg = load_config(PRESET, [*BF16, *VARIANTS[variant], f"dit.num_layers={layers}", "mesh.fsdp=1"])
    with activate(make_mesh(cfg.mesh)):
        params = abstract_story_params(cfg)
        spec = generation_spec(cfg, "onestory", None, LATENT[1:3], steps=STEPS, shift=3.0, solver="unipc", guidance=5.0)
        inputs = abstract_story_inputs(cfg, shots=SHOTS, latent_shape=LATENT)
        t0 = time.perf_counter()
        compiled = story_program(cfg, spec).trace(params, inputs).lower().compile(COMPILER_OPTIONS)
        compile_s = time.perf_counter() - t0
    held = {k: v / GIB for k, v in lowvram.bytes_by_memory_kind(params).items()}
    unused = lowvram.bytes_by_memory_kind(params.get("text_encoder", {})).get("device", 0) / GIB
    row = {
        "variant": variant,
        "overrides": VARIANTS[variant],
        "layers": layers,
        "compile_s": compile_s,
        **memory_row(compiled),
        "params_gib": held,
        "held_unused_gib": unused,
    }
    on_host = held.get(lowvram.HOST, 0.0) if jax.default_backend() == "cpu" else 0.0
    row["device_peak_gib"] = row["peak_gib"] - on_host + unused
    return row


def vae_decode_rows() -> dict:
    """Compile-only peak of one 81-frame shot's decode (bf16): whole, and the largest 256-px tile that
    `frozen.decode_video` decodes at a time with vae.tile=256."""
    import jax
    import jax.numpy as jnp

    from onestory_jax.config_files import load_config
    from onestory_jax.models import frozen, vae
    from onestory_jax.sharding import abstract_params, activate, make_mesh
    from onestory_jax.training.aot import COMPILER_OPTIONS

    cfg = load_config(PRESET, [*BF16, "vae.tile=256", "mesh.fsdp=1"])
    tile = cfg.vae.tile // cfg.vae.spatial_factor
    with activate(make_mesh(cfg.mesh)):
        params = abstract_params(vae.init_fn(cfg.vae), make_mesh(cfg.mesh), jax.random.key(0))
        shapes = {"whole": (1, *LATENT), "tile 256": (1, LATENT[0], tile, tile, LATENT[3])}
        fns = {"whole": frozen.vae_decode_fn(cfg.vae), "tile 256": frozen.vae_decode_raw_fn(cfg.vae)}
        return {
            name: memory_row(fns[name].trace(params, jax.ShapeDtypeStruct(shape, jnp.float32)).lower().compile(COMPILER_OPTIONS))
            | {"latent": list(shape)}
            for name, shape in shapes.items()
        }


def gpu_estimate(rows: list[dict]) -> dict:
    """Split the analysis into what scales with the layers and what does not, from rows at 2, 4 and 40 layers.

    arguments (exact: the params and inputs) and temporaries are each a + b x layers. The CPU compiler's
    temporaries grow per layer by a full copy of the stacked block weights (bf16 upcast to fp32, fp8 to fp16:
    its dots and converts need it, and it hoists the copy out of the loops), which the GPU compiler does not
    make (bf16 dots and fp8 converts are native there); their intercept a is the program's activations.
    """
    by = {r["layers"]: r for r in rows}
    lo, hi, full = by[2], by[4], by[40]
    per_layer = {k: (hi[k] - lo[k]) / 2 for k in ("arguments_gib", "temporaries_gib")}
    activations = lo["temporaries_gib"] - 2 * per_layer["temporaries_gib"]
    host = full["params_gib"].get("pinned_host", 0.0)
    resident = full["arguments_gib"] - (host if full["backend"] == "cpu" else full["host_arguments_gib"])
    return {
        "per_layer_arguments_gib": per_layer["arguments_gib"],
        "per_layer_temporaries_gib": per_layer["temporaries_gib"],
        "activations_gib": activations,
        "resident_gib": resident + full["held_unused_gib"] + full["outputs_gib"],
        "host_gib": host,
    }


def calibrate(estimates: dict) -> None:
    """Add `gpu_estimate_gib` = resident + the GPU's working memory to each estimate. The working memory: the
    H200 bf16 story's measured process peak (bench/results/sample_story_gpu.json; random init included, so an upper
    bound of the story program's) less the resident bytes of the bf16 variant, which is that story's configuration."""
    measured = RESULTS.parent / "sample_story_gpu.json"
    bf16 = next((e for k, e in estimates.items() if k.endswith("/bf16")), None)
    if not measured.exists() or bf16 is None:
        return
    peak = json.loads(measured.read_text())["rows"][0]["peak_device_gib"]
    for e in estimates.values():
        e["gpu_working_gib"] = peak - bf16["resident_gib"]
        e["gpu_estimate_gib"] = e["resident_gib"] + e["gpu_working_gib"]


def run_one(variant: str, layers: int) -> dict:
    """`measure` in a fresh process (its compile's memory is returned to the system)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, __file__, "--one", variant, str(layers)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"variant": variant, "layers": layers, "error": r.stderr.strip().splitlines()[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    ap.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[2, 4, 40],
        help="DiT blocks to compile (default 2 4 40: 2 and 4 split the analysis per layer, `gpu_estimate`)",
    )
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a child process: variant, layers
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    import jax

    backend = jax.default_backend()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault("meta", {})[backend] = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    data["meta"].update({"latent": LATENT, "shots": SHOTS, "steps": STEPS, "preset": PRESET})
    data.setdefault("vae_decode", {})[backend] = vae_decode_rows()
    rows = data.setdefault("rows", {})
    for variant in args.variant or list(VARIANTS):
        measured = [{**run_one(variant, n), "backend": backend} for n in args.layers]
        for row in measured:
            rows[f"{backend}/{variant}/{row['layers']}"] = row
            print(json.dumps(row), flush=True)
        if {2, 4, 40} <= {r["layers"] for r in measured} and not any("error" in r for r in measured):
            data.setdefault("estimates", {})[f"{backend}/{variant}"] = gpu_estimate(measured)
    calibrate(data.get("estimates", {}))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
