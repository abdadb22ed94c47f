"""Training metrics: throughput, MFU (by the FLOP model of models/flops.py), and CSV logs that survive restarts."""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from onestory_jax.config import Config
from onestory_jax.io import atomic_path
from onestory_jax.models.flops import mfu
from onestory_jax.training.optim import learning_rate_schedule


class CsvLog:
    """A CSV file with a header row, appended to as training goes.

    On open, rows past `resume_step` (first column) are dropped: a run that resumes from an earlier
    checkpoint redoes those steps. Only the writer (process 0) touches the file.
    """

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.header: list[str] | None = None
        self._file: Any = None
        if enabled and path.is_file():
            self._keep_rows_until(resume_step)

    def _keep_rows_until(self, step: int) -> None:
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][:1] != ["step"]:  # no header (an older format): keep it aside, start afresh
            self.path.replace(self.path.with_name(self.path.name + ".old"))
            return
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        self.header = rows[0]

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (keys: the header's columns; the first row sets the header)."""
        if not self.enabled:
            return
        if self._file is None:
            self._file = self.path.open("a", newline="")
            if self.header is None:
                self.header = list(row)
                csv.writer(self._file).writerow(self.header)
        csv.DictWriter(self._file, self.header, extrasaction="ignore", restval="").writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


BAR_METRICS = {"loss": "loss", "l_sel": "l_sel", "mse": "mse", "grad_norm": "gnorm"}  # metric -> its bar label


class TrainMonitor:
    """The progress bar (loss, L_sel, grad norm, lr, steps/s, tokens/s, MFU, validation loss),
    `metrics.csv` (one row per logged step) and `val.csv` (step, bucket, loss, loss_no_context).
    Without the bar (`progress=False`, e.g. train.py --no-progress), the writing host prints one line
    per logged step instead."""

    def __init__(self, cfg: Config, workdir: Path, start: int, progress: bool = True, write: bool = True):
        self.cfg = cfg
        self.lr = learning_rate_schedule(cfg.train)
        self.device_kind, self.num_devices = jax.devices()[0].device_kind, jax.device_count()
        self.metrics_csv = CsvLog(workdir / "metrics.csv", start, write)
        self.val_csv = CsvLog(workdir / "val.csv", start, write)
        self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", disable=not progress)
        self.postfix: dict[str, str] = {}
        self.print_lines = write and not progress
        self._reset()

    def _reset(self) -> None:
        self._t0, self._steps, self._tokens, self._flops = time.perf_counter(), 0, 0, 0.0

    def count(self, tokens: int, flops: float) -> None:
        """One step done: the tokens it processed and its FLOPs (0: unknown, no MFU)."""
        self._steps += 1
        self._tokens += tokens
        self._flops += flops
        self.bar.update(1)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count towards steps/s, tokens/s and MFU."""
        t = time.perf_counter()
        yield
        self._t0 += time.perf_counter() - t

    def rates(self) -> dict[str, float | None]:
        """Steps/s, noise tokens/s and MFU since the last log (wall clock, all processes together)."""
        dt = time.perf_counter() - self._t0
        if dt <= 0 or not self._steps:
            return {"steps_per_s": None, "tokens_per_s": None, "mfu": None}
        steps_per_s = self._steps / dt
        return {
            "steps_per_s": steps_per_s,
            "tokens_per_s": self._tokens / dt,
            "mfu": mfu(self._flops / self._steps, steps_per_s, self.device_kind, self.num_devices) if self._flops else None,
        }

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write a metrics row for 1-based `step` and refresh the bar."""
        lr, rates = float(self.lr(step - 1)), self.rates()
        # 9 significant digits: float32 values round-trip exactly (runs compare bitwise-close).
        row = {
            "step": step,
            "time": f"{time.time():.3f}",
            **{k: f"{metrics[k]:.9g}" for k in sorted(metrics)},
            "lr": f"{lr:.6g}",
            **{k: "" if v is None else f"{v:.4g}" for k, v in rates.items()},
        }
        self.metrics_csv.write(row)
        shown = {name: f"{metrics[key]:.4f}" for key, name in BAR_METRICS.items() if key in metrics}
        self.postfix.update(
            shown,
            lr=f"{lr:.2e}",
            **{"steps/s": _fmt(rates["steps_per_s"], ".2f")},
            tok_s=_fmt(rates["tokens_per_s"], ".0f"),
            mfu=_fmt(rates["mfu"], ".1%"),
        )
        self._show(step)
        self._reset()

    def log_validation(self, step: int, losses: Mapping[float, float], no_context: Mapping[float, float]) -> None:
        """Write one val.csv row per sigma bucket: L_shot with the memory context and with it masked
        (does the model use its memory?); the bar shows their means."""
        for sigma, loss in losses.items():
            self.val_csv.write(
                {"step": step, "bucket": f"{sigma:g}", "loss": f"{loss:.9g}", "loss_no_context": f"{no_context[sigma]:.9g}"}
            )
        self.postfix["val"] = f"{sum(losses.values()) / len(losses):.4f}"
        self.postfix["val_noctx"] = f"{sum(no_context.values()) / len(no_context):.4f}"
        self._show(step)

    def _show(self, step: int) -> None:
        self.bar.set_postfix(self.postfix, refresh=True)
        if self.print_lines:
            print(f"step {step}/{self.cfg.train.steps}: " + ", ".join(f"{k} {v}" for k, v in self.postfix.items()), flush=True)

    def close(self) -> None:
        self.bar.close()
        self.metrics_csv.close()
        self.val_csv.close()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
