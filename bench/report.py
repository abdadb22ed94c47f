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
        "| case | dtype | layers | tokens | TFLOP/fwd | JAX s | diffusers s | JAX / torch time | JAX TFLOP/s | MFU (JAX) | MFU (torch) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        mfu = lambda k: f"{r[k]:.1%}" if r.get(k) is not None else "-"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['layers']} | {r['tokens']:,} | {r['tflop']:.3g} | {r['jax_s']:.4g} | "
            f"{r['torch_s']:.4g} | **{r['jax_over_torch']:.2f}x** | {r['jax_tflops']:.3g} | {mfu('jax_mfu')} | {mfu('torch_mfu')} |"
        )
    return "\n".join(lines)


def vae_memory_table(data: dict) -> str:
    lines = ["| backend | dtype | function | input | peak GiB | temporaries GiB | run s |", "|---|---|---|---|---|---|---|"]
    for key, r in sorted(data.items()):
        if "backend" not in r:  # run-only notes (e.g. the capped-pool decode) are described in the prose
            continue
        run = r.get("run_seconds")
        lines.append(f"| {r['backend']} | {r['dtype']} | {key.split('/', 2)[2]} | {r['input_shape']} | "
                     f"**{r['peak_gib']:.2f}** | {r['temporaries_gib']:.2f} | {run if run is not None else '-'} |")
    return "\n".join(lines)


def generic_table(data: dict) -> str:
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else [data]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


RENDERERS = {"dit_forward_cpu": dit_forward_table, "dit_forward_gpu": dit_forward_table, "vae_memory": vae_memory_table}


def main() -> None:
    text = DOC.read_text()
    for path in sorted(RESULTS.glob("*.json")):
        name = path.stem
        pattern = re.compile(rf"(<!-- table:{name} -->).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(text):
            continue
        table = RENDERERS.get(name, generic_table)(json.loads(path.read_text()))
        text = pattern.sub(lambda m: m.group(1) + "\n" + table + "\n" + m.group(2), text)
    DOC.write_text(text)
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
