"""Regenerate the measured tables of docs/performance.md from bench/results/*.json.

    python bench/report.py

The prose of docs/performance.md is kept; each table lives between `<!-- table:NAME -->` and
`<!-- /table:NAME -->` markers and is rewritten from the results file of the same name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"


def dit_forward_table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"JAX {meta['jax']} on {meta['backend']} ({meta['cpu_count']} CPU cores); median of timed runs after warm-up.",
        "",
        "| case | dtype | layers | tokens | TFLOP/fwd | JAX s | diffusers s | JAX / torch time | JAX TFLOP/s | MFU "
        "(JAX) | MFU (torch) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        mfu = lambda k, r=r: f"{r[k]:.1%}" if r.get(k) is not None else "-"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['layers']} | {r['tokens']:,} | {r['tflop']:.3g} | {r['jax_s']:.4g} | "
            f"{r['torch_s']:.4g} | **{r['jax_over_torch']:.2f}x** | {r['jax_tflops']:.3g} | {mfu('jax_mfu')} | "
            f"{mfu('torch_mfu')} |"
        )
    return "\n".join(lines)


def vae_memory_table(data: dict) -> str:
    lines = ["| backend | dtype | function | input | peak GiB | temporaries GiB | run s |", "|---|---|---|---|---|---|---|"]
    for key, r in sorted(data.items()):
        if "backend" not in r:  # run-only notes (e.g. the capped-pool decode) are described in the prose
            continue
        run = r.get("run_seconds")
        lines.append(
            f"| {r['backend']} | {r['dtype']} | {key.split('/', 2)[2]} | {r['input_shape']} | "
            f"**{r['peak_gib']:.2f}** | {r['temporaries_gib']:.2f} | {run if run is not None else '-'} |"
        )
    return "\n".join(lines)


def train_step_cpu_table(data: dict) -> str:
    meta = data["meta"]
    load = f"; load average {meta['load_avg']:.1f} during the run" if meta.get("load_avg") is not None else ""
    lines = [
        f"JAX {meta['jax']} on {meta['backend']} ({meta['cpu_count']} CPU cores{load}); median of timed steps after warm-up.",
        "",
        "| case | dtype | remat | dim x layers | params | batch x latent | tokens/sample (noise + context) | step s | "
        "tokens/s | tokens/s (best step) | all tokens/s | TFLOP/step | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['remat']} | {r['dim']} x {r['layers']} | {r['params_m']:.3g} M | "
            f"{r['batch']} x {r['latent']} | {r['noise_tokens']:,} + {r['context_tokens']:,} | {r['step_s']:.3g} | "
            f"**{r['tokens_per_s']:,.0f}** | {r.get('tokens_per_s_best', float('nan')):,.0f} | {r['all_tokens_per_s']:,.0f} | "
            f"{r['tflop_per_step']:.3g} | {r['tflops']:.3g} |"
        )
    return "\n".join(lines)


def _mesh(m: dict) -> str:
    return " x ".join(str(m[k]) for k in ("data", "fsdp", "sequence", "tensor"))


def train_step_aot_table(data: dict) -> str:
    lines = [
        "| devices | mesh (data x fsdp x seq x tensor) | batch | remat | attention | state GiB | args GiB | temp GiB | "
        "out GiB | aliased GiB | **peak GiB** | H100 80 GB | v5p 95 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        data["rows"].values(),
        key=lambda r: (
            r["devices"],
            r.get("sequence", r.get("mesh", {}).get("sequence", 1)),
            r.get("tensor", r.get("mesh", {}).get("tensor", 1)),
            r["remat"],
            r["attention"],
        ),
    )
    yes = lambda ok: "fits" if ok else "no"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['devices']} | seq {r['sequence']}, tensor {r.get('tensor', 1)} | - | {r['remat']} | "
                f"{r['attention']} | failed: {r['error'][:80]} | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['devices']} | {_mesh(r['mesh'])} | {r['batch']} | {r['remat']} | {r['attention']} | "
            f"{r['state_gib_per_device']:.1f} | "
            f"{r['arguments_gib']:.1f} | {r['temporaries_gib']:.1f} | {r['outputs_gib']:.1f} | {r['aliased_gib']:.1f} | "
            f"**{r['peak_gib']:.1f}** | {yes(r['fits_h100_80gb'])} | {yes(r['fits_tpu_v5p_95gb'])} |"
        )
    return "\n".join(lines)


def train_step_presets_table(data: dict) -> str:
    lines = [
        "| preset | devices | mesh (data x fsdp x seq x tensor) | batch | remat | trainable | state GiB | temp GiB | "
        "**peak GiB / device** | device | capacity GiB | headroom | fits (>= 10% free) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(data.get("presets", {}).items(), key=lambda kv: -kv[1]["devices"]):
        if "error" in r:
            lines.append(f"| {name} | {r['devices']} | failed: {r['error'][:80]} | | | | | | | | | | |")
            continue
        trainable = ", ".join(f"`{t}`" for t in r["trainable"]) or "all"
        lines.append(
            f"| `{name.removeprefix('train/')}` | {r['devices']} | {_mesh(r['mesh'])} | {r['batch']} | {r['remat']} | "
            f"{trainable} | "
            f"{r['state_gib_per_device']:.1f} | {r['temporaries_gib']:.1f} | **{r['peak_gib']:.1f}** | {r['chip']} | "
            f"{r['capacity_gib']:.1f} | {r['headroom']:.0%} | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def sample_story_multi_table(data: dict) -> str:
    one, many = data["rows"]
    ratio = lambda k: f"{many[k]:.2f}x" if many.get(k) is not None else "-"  # noqa: E731
    lines = [
        f"JAX {data['jax']} on {data['device']} ({data['cpu_count']} CPU cores shared by all forced devices); "
        f"`{data['suite']}` story, latent {data['latent']}, {one['steps']} steps x {one['shots']} shots.",
        "",
        "| run | compile s | DiT step s | denoise s | story s |",
        "|---|---|---|---|---|",
    ]
    for r in (one, many):
        lines.append(
            f"| {r['name']} | {r['compile_s']:.2f} | {r['dit_step_s']:.4f} | {r['denoise_s']:.3f} | {r['story_s']:.2f} |"
        )
    lines.append(
        f"| **ratio** (multi / 1 device) | {ratio('compile_s_ratio')} | {ratio('dit_step_s_ratio')} | "
        f"{ratio('denoise_s_ratio')} | {ratio('story_s_ratio')} |"
    )
    lines += [
        "",
        f"Largest latent difference, multi-device vs 1 device: {many['max_latent_diff_rel']:.1e} of the latents' scale.",
    ]
    return "\n".join(lines)


CARD_24GB_GIB = 24564 / 1024  # an RTX 4090's 24 GB as nvidia-smi reports it


def sample_memory_aot_table(data: dict) -> str:
    """The low-VRAM variants of the 14B story program: compile-only CPU analysis and the GPU estimate."""
    lines = [
        f"Compile-only analysis on {data['meta']['cpu']['device']} (XLA's CPU compiler, JAX {data['meta']['cpu']['jax']}); "
        f"`{data['meta']['preset']}`, latents {data['meta']['latent']}, {data['meta']['shots']} shots, {data['meta']['steps']} "
        "steps; GiB.",
        "",
        "| variant | resident on device | params in host memory | CPU analysis: device peak, 40 layers | CPU "
        "per-layer weight copy "
        "| CPU activations | **GPU estimate** | 24 GB card (10% free) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, e in sorted(data.get("estimates", {}).items(), key=lambda kv: -kv[1]["resident_gib"]):
        backend, variant = key.split("/", 1)
        row = data["rows"][f"{backend}/{variant}/40"]
        gpu = e.get("gpu_estimate_gib")
        fits = "-" if gpu is None else "yes" if gpu <= 0.9 * CARD_24GB_GIB else "no"
        lines.append(
            f"| {variant} | {e['resident_gib']:.1f} | {e['host_gib']:.1f} | {row['device_peak_gib']:.1f} | "
            f"{e['per_layer_temporaries_gib']:.2f} | {e['activations_gib']:.1f} | "
            f"**{'-' if gpu is None else f'{gpu:.1f}'}** | {fits} |"
        )
    return "\n".join(lines)


def dit_step_table(data: dict) -> str:
    """bench/dit_step.py: the step's variants, then the profile of one step by kernel class and its top kernels."""
    exact = next((r["step_s"] for r in data["steps"] if r["variant"] == "exact (this code)" and "step_s" in r), None)
    noise = data["tokens"]["noise"]
    lines = [
        f"JAX {data['jax']} on one {data['device']}; {data['config']} ({data['layers']} layers), random bf16 weights, the guided "
        "pair as one batch of 2; median of timed steps after a warm-up.",
        "",
        "| variant | tokens a sample | step s | / exact | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["steps"]:
        tokens = noise + r.get("context_tokens", 0)
        if "step_s" not in r:
            lines.append(f"| {r['variant']} | {tokens:,} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['step_s'] / exact:.3f}" if exact else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(f"| {r['variant']} | {tokens:,} | **{r['step_s']:.3f}** | {ratio} | {r['tflops']:.0f} | {mfu} |")
    prof = data.get("profile", {}).get("lines")
    if prof:
        line, rec = max(prof.items(), key=lambda kv: kv[1]["total_s"])
        lines += ["", f"One step's kernels (`exact`, trace line `{line}`): {rec['total_s']:.3f} s.", ""]
        lines += ["| kernel class | GPU s | share |", "|---|---|---|"]
        for c, t in sorted(rec["by_class_s"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {c} | {t:.3f} | {t / rec['total_s']:.1%} |")
        lines += ["", "| kernel (top 6) | class | calls by duration | GPU s |", "|---|---|---|---|"]
        for k in rec["top"][:6]:
            split = ", ".join(f"{m['calls']} x ~{m['s'] / m['calls'] * 1e3:.1f} ms" for m in k["by_magnitude"].values())
            lines.append(f"| `{k['name'][:70]}` | {k['class']} | {split} | {k['s']:.3f} |")
    return "\n".join(lines)


def dit_step_kernels_table(data: dict) -> str:
    """bench/dit_step.py's kernel rows: each kernel alone at the step's shapes."""
    lines = ["| kernel | shape | TFLOP/s |", "|---|---|---|"]
    for r in data["kernels"]:
        rate = f"**{r['tflops']:.0f}**" if "tflops" in r else f"failed: {r['error'][:90]}"
        lines.append(f"| {r['kernel']} | {r.get('shape', '')} | {rate} |")
    return "\n".join(lines)


def dit_step_lowvram_table(data: dict) -> str:
    """bench/dit_step.py --lowvram: the step with the DiT's low-VRAM switches, its params by memory kind, the peak."""
    kinds = data["bytes_by_memory_kind_gib"]
    peak = f"**{data['peak_device_gib']:.2f}**" if data.get("peak_device_gib") is not None else "-"
    return "\n".join(
        [
            "| switches | step s | DiT params on device GiB | in host memory GiB | peak device GiB (process) |",
            "|---|---|---|---|---|",
            f"| {', '.join(o.split('.', 1)[1] for o in data['switches'])} | **{data['step_s']:.3f}** | "
            f"{kinds.get('device', 0):.2f} | {kinds.get('pinned_host', 0):.2f} | {peak} |",
        ]
    )


def generic_table(data: dict) -> str:
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else [data]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


RENDERERS = {
    "dit_forward_cpu": dit_forward_table,
    "dit_forward_gpu": dit_forward_table,
    "vae_memory": vae_memory_table,
    "train_step_cpu": train_step_cpu_table,
    "train_step_aot": train_step_aot_table,
    "train_step_aot_presets": train_step_presets_table,
    "sample_story_multi": sample_story_multi_table,
    "sample_memory_aot": sample_memory_aot_table,
    "dit_step_gpu": dit_step_table,
    "dit_step_gpu_kernels": dit_step_kernels_table,
    "dit_step_gpu_lowvram": dit_step_lowvram_table,
}
# Tables drawn from another table's results file: table name -> results file stem.
SOURCES = {"train_step_aot_presets": "train_step_aot"}


def main() -> None:
    text = DOC.read_text()
    for name in re.findall(r"<!-- table:(\w+) -->", text):
        path = RESULTS / f"{SOURCES.get(name, name)}.json"
        if not path.exists():
            continue
        pattern = re.compile(rf"(<!-- table:{name} -->).*?(<!-- /table:{name} -->)", re.S)
        table = RENDERERS.get(name, generic_table)(json.loads(path.read_text()))
        text = pattern.sub(lambda m, table=table: m.group(1) + "\n" + table + "\n" + m.group(2), text)
    DOC.write_text(text)
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
