"""Checks of data preparation's inputs, and of an --out that a re-run resumes: one line each.

A re-run skips the videos already written, so it must ask for what they were prepared with: the
settings in --out's manifest.json (frames, size, embedders) and each kept record's latent shape
are compared, and a mismatch is refused rather than mixing record shapes in one dataset.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from onestory_jax.config import VAEConfig
from onestory_jax.data.records import read_records
from onestory_jax.errors import UserError


def check_numbers(frames: int, size: tuple[int, int], synthetic: int | None) -> None:
    """--frames 4k+1 (>= 1), a positive --size, --synthetic >= 1 when given."""
    if frames < 1 or (frames - 1) % 4:
        raise UserError(f"--frames must be 4k+1 (e.g. 17, 81), got {frames}")
    if min(size) < 1:
        raise UserError(f"--size must be positive, got {size[0]}x{size[1]}")
    if synthetic is not None and synthetic < 1:
        raise UserError(f"--synthetic must be >= 1, got {synthetic}")


def captions_value(value: Any) -> list[str]:
    """A captions row's value: a list of non-empty strings."""
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise ValueError(f"captions must be a list of non-empty strings, got {value!r}")
    return value


def shots_value(value: Any) -> list[tuple[int, int]]:
    """A boundaries row's value: a list of [start, end) frame pairs of integers."""
    pair = lambda s: isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
    if not isinstance(value, list) or not all(pair(s) for s in value):
        raise ValueError(f"shots must be a list of [start, end] frame pairs of integers, got {value!r}")
    return [tuple(s) for s in value]


def check_unique_ids(files: list[Path]) -> None:
    """Refuse videos whose names share a stem: they would share one record (`a.mp4`, `a.mov`)."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_stem[f.stem].append(f.name)
    clash = next((names for names in by_stem.values() if len(names) > 1), None)
    if clash:
        raise UserError(f"videos {' and '.join(clash)} would both become records/{Path(clash[0]).stem}.arrayrecord: rename one")


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse a re-run into `out` whose settings differ from those in its manifest.json."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return
    try:
        before = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{manifest}': {e}") from None
    changed = [k for k, v in settings.items() if k in before and before[k] != v]
    if changed:
        shown = ", ".join(f"{k} {before[k]} -> {settings[k]}" for k in changed)
        raise UserError(
            f"--out '{out}' was prepared with other settings ({shown}): its records would mix; "
            "use another --out, or the same settings to resume"
        )


def check_existing_record(path: Path, frames: int, size: tuple[int, int], vae: VAEConfig) -> None:
    """A record a re-run keeps must be readable and of this run's latent shape (frames, size)."""
    expected = ((frames - 1) // vae.temporal_factor + 1, size[1] // vae.spatial_factor, size[0] // vae.spatial_factor)
    for video in read_records(path):
        got = tuple(video["latents"].shape[1:4])
        if got != expected:
            raise UserError(
                f"'{path}' holds latents of {got[0]} frames of {got[1]}x{got[2]} but this run makes "
                f"{expected[0]} of {expected[1]}x{expected[2]} (other --frames or --size): use another --out, "
                "or delete the record to re-prepare it"
            )
