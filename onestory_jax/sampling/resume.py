"""Resume keyed by content: every saved shot records what made it, and only matching shots are reused.

A shot's record (`shot_NN.json` beside `shot_NN.npy`) holds its *inputs* (caption, seed, the story's
settings and memory settings, the start image or video's content hash, the model's identity) and a
fingerprint: the hash of those inputs and of the previous shot's fingerprint, since a shot's memory
holds every earlier shot. On a re-run, the leading shots whose fingerprints match are kept; from the
first mismatch on, every shot is regenerated, and the reason is reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.sampling import outputs
from onestory_jax.sampling.story import Story, reroll

NOT_GENERATED = "not generated yet"
SMALL_FILE = 1 << 20  # model files hashed by content up to this size (configs, orbax metadata and manifests)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(
    checkpoint: Path | None,
    config: dict[str, Any],
    seed: int,
    tokenizer: Path | None = None,
    loras: Sequence[tuple[Path, float]] = (),
) -> str:
    """A hash naming the model: its config, and the checkpoint's small files by content (orbax
    manifests change whenever the weights are rewritten) and large ones by name and size; or the seed
    of random weights. A tokenizer given apart from the checkpoint (--tokenizer) and the LoRAs merged
    into the DiT, each (file, scale), count by content."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path, scale in loras:
        h.update(f"lora {file_digest(Path(path))} x {float(scale)!r}".encode())
    for path in sorted(p for p in Path(tokenizer).rglob("*") if p.is_file()) if tokenizer is not None else ():
        h.update(f"tokenizer {path.relative_to(tokenizer)}:{file_digest(path)}".encode())
    if checkpoint is None:
        h.update(f"random weights, seed {seed}".encode())
        return h.hexdigest()
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(checkpoint)}:{size}:".encode())
        h.update((file_digest(path) if size <= SMALL_FILE else "").encode())
    return h.hexdigest()


def shot_inputs(story: Story, i: int, model_id: str) -> dict[str, Any]:
    """Everything shot i (0-based) depends on, besides the earlier shots."""
    start = {"start_image": story.start_image, "start_video": story.start_video}
    return {
        "caption": story.shots[i].caption,
        "seed": story.shot_seed(i),
        # fps only changes how the mp4s play: a new fps rewrites them, it does not regenerate shots; the
        # LoRAs are merged into the model, and count in `model_id` by content
        "settings": {k: v for k, v in dataclasses.asdict(story.settings).items() if k not in ("fps", "lora")},
        "memory": dataclasses.asdict(story.memory),
        **{k: (file_digest(p) if p is not None and p.is_file() else None) for k, p in start.items()},
        "model": model_id,
        **({"rerolled": True} if story.shots[i].rerolled else {}),
        **({"continues": True} if story.shots[i].continues else {}),
        # what memory holds (absent when unused, so that earlier runs' shots stay valid)
        **({"references": [[r.name, file_digest(r.path)] for r in story.references]} if story.references else {}),
        **({"memory_pin": list(story.shots[i].pin)} if story.shots[i].pin else {}),
        **({"memory_exclude": list(story.shots[i].exclude)} if story.shots[i].exclude else {}),
    }


def with_rerolls(out: Path, story: Story, model_id: str) -> Story:
    """The story (its sampler settings filled, `with_sampler`) with the seeds of shots re-rolled in `out`
    (`sample.py --redo`) whose other inputs are unchanged: a re-roll stays until the shot is edited or
    re-rolled again."""
    for i in range(len(story.shots)):
        try:
            saved = json.loads((out / outputs.shot_name(i, ".json")).read_text()).get("inputs", {})
        except (OSError, ValueError, AttributeError):
            continue
        if not saved.get("rerolled"):
            continue
        candidate = reroll(story, i, int(saved["seed"]))
        if json.loads(json.dumps(shot_inputs(candidate, i, model_id), default=str)) == saved:
            story = candidate
    return story


def fingerprint(inputs: dict[str, Any], previous: str) -> str:
    """Hash of a shot's inputs and of the previous shot's fingerprint ("" for the first shot)."""
    return hashlib.sha256((json.dumps(inputs, sort_keys=True, default=str) + previous).encode()).hexdigest()


def story_fingerprints(story: Story, model_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(inputs, fingerprint) of every shot, chained."""
    inputs, prints, prev = [], [], ""
    for i in range(len(story.shots)):
        inputs.append(shot_inputs(story, i, model_id))
        prev = fingerprint(inputs[-1], prev)
        prints.append(prev)
    return inputs, prints


def _changed(saved: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return "changed: " + ", ".join(keys) if keys else "an earlier shot changed"


def _ours(path: Path, keys: set[str]) -> bool:
    """Whether a JSON file is one sample.py wrote (an object with these keys)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and keys <= set(data)


def check_not_foreign(out: Path) -> None:
    """Refuse an --out holding files of the names sample.py writes that it did not write: a run would
    overwrite them. With its manifest.json, the folder is a run's; without, only shots saved with their
    records (an interrupted run) may be there."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        if not _ours(manifest, {"story", "shots"}):
            raise UserError(
                f"--out '{out}' holds a manifest.json that sample.py did not write: a run would overwrite it "
                "(and story.mp4, contact_sheet.png); pick another --out"
            )
        return
    foreign = [p.name for p in (out / "story.mp4", out / "contact_sheet.png") if p.exists()]
    for path in sorted(out.glob("shot_*")) if out.is_dir() else ():
        record = out / f"{path.name.split('.')[0]}.json"
        if not _ours(record, {"fingerprint", "inputs"}):
            foreign.append(path.name)
    if foreign:
        raise UserError(
            f"--out '{out}' holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which sample.py "
            "did not write (no manifest.json, no shot record): a run would overwrite it; pick another --out"
        )


def reusable_shots(
    out: Path, story: Story, model_id: str, latent_shape: tuple[int, ...], redo: int | None = None
) -> tuple[list[np.ndarray], list[str | None]]:
    """(latents of the leading shots that can be kept, per shot the reason it is (re)generated or None).

    `redo` (1-based): regenerate that shot and every later one whatever their records say.
    """
    inputs, prints = story_fingerprints(story, model_id)
    kept: list[np.ndarray] = []
    reasons: list[str | None] = []
    for i in range(len(story.shots)):
        reason = _check_saved(out, i, latent_shape, inputs[i], prints[i], redo)
        if reasons and reasons[-1] is not None and reason != NOT_GENERATED:
            reason = "an earlier shot is regenerated"
        if reason is None:
            kept.append(np.load(out / outputs.shot_name(i, ".npy")))
        reasons.append(reason)
    return kept, reasons


def _check_saved(
    out: Path, i: int, latent_shape: tuple[int, ...], inputs: dict[str, Any], print_: str, redo: int | None
) -> str | None:
    """None when shot i's saved files can be reused, else why not."""
    if redo is not None and i + 1 >= redo:
        return f"--redo {redo}"
    npy, record = out / outputs.shot_name(i, ".npy"), out / outputs.shot_name(i, ".json")
    if not npy.is_file() or not record.is_file():
        return NOT_GENERATED
    try:
        saved = json.loads(record.read_text())
        lat = np.load(npy)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot resume: '{npy}' or its record is unreadable ({e}); delete them to regenerate that shot"
        ) from None
    if not isinstance(saved, dict):  # a hand-edited record (a list, a number): regenerate the shot
        return "its record is not a shot record"
    if saved.get("fingerprint") != print_:
        return _changed(saved.get("inputs", {}), json.loads(json.dumps(inputs, default=str)))
    if lat.shape != tuple(latent_shape):
        return f"saved latents have shape {lat.shape}, this story needs {tuple(latent_shape)}"
    if not np.isfinite(lat).all():
        return "saved latents hold non-finite values"
    return None


def save_shot(out: Path, i: int, latents: np.ndarray, inputs: dict[str, Any], print_: str) -> None:
    """Write shot i's latents, then its record (each atomically): a crash leaves no record of a
    shot whose latents are not complete."""
    outputs.save_latents(out / outputs.shot_name(i, ".npy"), latents)
    outputs.save_json(out / outputs.shot_name(i, ".json"), {"fingerprint": print_, "inputs": inputs})
