"""Training metrics: the DiT FLOP model, MFU, throughput, and CSV logs that survive restarts."""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from onestory_jax.config import Config, DiTConfig, MemoryConfig
from onestory_jax.io import atomic_path
from onestory_jax.models.memory import frames_per_patchifier, tokens_per_frame
from onestory_jax.training.optim import learning_rate_schedule

# Dense bf16 peak FLOP/s per device, matched in order as a substring of `jax.Device.device_kind`
# (TPU v5e reports "TPU v5 lite", v5p "TPU v5p" or "TPU v5"; v6e "TPU v6 lite").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind; None when unknown (CPU included)."""
    return next((v for k, v in PEAK_BF16_FLOPS if k.lower() in device_kind.lower()), None)


def dit_forward_flops(cfg: DiTConfig, tokens: int, text_tokens: int, image_tokens: int = 0) -> float:
    """Matmul FLOPs of one DiT forward (2 per multiply-add; norms and elementwise ignored).

    tokens: every token in the residual stream (noise tokens plus any context tokens).
    """
    d, f, n, lt = cfg.dim, cfg.ffn_dim, tokens, text_tokens + image_tokens
    self_attn = 2 * n * 4 * d * d + 2 * 2 * n * n * d
    cross = 2 * n * 2 * d * d + 2 * lt * 2 * d * d + 2 * 2 * n * lt * d
    ffn = 2 * n * 2 * d * f
    return cfg.num_layers * (self_attn + cross + ffn)


def context_tokens(cfg: MemoryConfig, latent_hw: tuple[int, int]) -> int:
    """Context tokens the Adaptive Conditioner makes from the selected frames at this latent size."""
    counts = frames_per_patchifier(cfg, latent_hw)
    return sum(c * tokens_per_frame(k, latent_hw) for k, c in zip(cfg.patchifier_kernels, counts))


def noise_tokens(cfg: DiTConfig, target_shape: tuple[int, ...]) -> int:
    """Noise tokens of one sample from a target latent [B, T, h, w, C] (per sample)."""
    t, h, w = target_shape[1:4]
    pt, ph, pw = cfg.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def train_step_flops(cfg: Config, shapes: Mapping[str, tuple[int, ...]], dit_trains: bool) -> float:
    """Model FLOPs of one train step on a batch of these shapes (global batch).

    Forward + activation gradients (2x forward) + weight gradients when DiT weights train (1x) +
    the recomputed forward under full remat (1x). The selector and patchifiers are ignored (< 1%).
    """
    b, _, h, w = shapes["target"][:4]
    tokens = noise_tokens(cfg.dit, shapes["target"]) + context_tokens(cfg.memory, (h, w))
    image = shapes["image"][1] if "image" in shapes else 0
    passes = 2 + int(dit_trains) + int(cfg.dit.remat_policy == "full")
    return b * passes * dit_forward_flops(cfg.dit, tokens, shapes["text"][1], image)


def mfu(flops_per_step: float, steps_per_s: float, device_kind: str, num_devices: int) -> float | None:
    """Model FLOPs utilisation against the dense bf16 peak; None on unknown devices."""
    peak = peak_flops(device_kind)
    return flops_per_step * steps_per_s / (peak * num_devices) if peak else None


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


class TrainMonitor:
    """The progress bar (loss, L_sel, grad norm, lr, steps/s, tokens/s, MFU, validation loss),
    `metrics.csv` (one row per logged step) and `val.csv` (step, bucket, loss, loss_no_context)."""

    def __init__(self, cfg: Config, workdir: Path, start: int, dit_trains: bool, progress: bool = True, write: bool = True):
        self.cfg, self.dit_trains = cfg, dit_trains
        self.lr = learning_rate_schedule(cfg.train)
        self.device_kind, self.num_devices = jax.devices()[0].device_kind, jax.device_count()
        self.metrics_csv = CsvLog(workdir / "metrics.csv", start, write)
        self.val_csv = CsvLog(workdir / "val.csv", start, write)
        self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", disable=not progress)
        self.postfix: dict[str, str] = {}
        self._reset()

    def _reset(self) -> None:
        self._t0, self._steps, self._tokens, self._flops = time.perf_counter(), 0, 0, 0.0

    def count(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """One step done on a global batch of these shapes."""
        self._steps += 1
        self._tokens += shapes["target"][0] * noise_tokens(self.cfg.dit, shapes["target"])
        self._flops += train_step_flops(self.cfg, shapes, self.dit_trains)
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
        return {"steps_per_s": steps_per_s, "tokens_per_s": self._tokens / dt,
                "mfu": mfu(self._flops / self._steps, steps_per_s, self.device_kind, self.num_devices)}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write a metrics row for 1-based `step` and refresh the bar."""
        lr, rates = float(self.lr(step - 1)), self.rates()
        # 9 significant digits: float32 values round-trip exactly (runs compare bitwise-close).
        row = {"step": step, "time": f"{time.time():.3f}", **{k: f"{metrics[k]:.9g}" for k in sorted(metrics)},
               "lr": f"{lr:.6g}", **{k: "" if v is None else f"{v:.4g}" for k, v in rates.items()}}
        self.metrics_csv.write(row)
        self.postfix.update(loss=f"{metrics['loss']:.4f}", l_sel=f"{metrics['l_sel']:.4f}", gnorm=f"{metrics['grad_norm']:.3f}",
                            lr=f"{lr:.2e}", step_s=_fmt(rates["steps_per_s"], ".2f"), tok_s=_fmt(rates["tokens_per_s"], ".0f"),
                            mfu=_fmt(rates["mfu"], ".1%"))
        self.bar.set_postfix(self.postfix, refresh=True)
        self._reset()

    def log_validation(self, step: int, losses: Mapping[float, float], no_context: Mapping[float, float]) -> None:
        """Write one val.csv row per sigma bucket: L_shot with the memory context and with it masked
        (does the model use its memory?); the bar shows their means."""
        for sigma, loss in losses.items():
            self.val_csv.write({"step": step, "bucket": f"{sigma:g}", "loss": f"{loss:.9g}",
                                "loss_no_context": f"{no_context[sigma]:.9g}"})
        self.postfix["val"] = f"{sum(losses.values()) / len(losses):.4f}"
        self.postfix["val_noctx"] = f"{sum(no_context.values()) / len(no_context):.4f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()
        self.metrics_csv.close()
        self.val_csv.close()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
