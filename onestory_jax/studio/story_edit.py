"""The studio's story editing, without any UI: a story mapping (the story-file format of the README,
as `yaml.safe_load` gives it) to and from the shot table, memory pins and exclusions, references.

The table has one row per shot: caption, seed (blank = settings.seed + index), continue (no cut), pin
and exclude. Pin and exclude are comma-separated memory items, as in the story file's
`shots[i].memory`: a reference name (`alice`), a shot number (`1`: all its frames) or
`shot:latent_frame` (`2:0`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from onestory_jax.errors import UserError
from onestory_jax.io import load_yaml
from onestory_jax.sampling.story import from_scene_script

COLUMNS = ("caption", "seed", "continue", "pin", "exclude")
MemoryItem = int | str  # a shot number (1-based), "shot:latent_frame", or a reference name
MEMORY_KINDS = ("pin", "exclude")
SETTINGS_FIELDS = ("steps", "seed", "guidance")  # the settings the studio shows as fields (the rest: YAML)
_FRAME_ITEM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_NAME = re.compile(r"[^a-z0-9_-]+")


def empty_story() -> dict[str, Any]:
    """A story with no shots yet (the model's size, frames and sampler)."""
    return {"settings": {}, "memory": {"strategy": "onestory", "budget": 1}, "shots": []}


def read_story_text(text: str, name: str) -> dict[str, Any]:
    """A story mapping from a file's text (YAML or JSON, ours or a scene script); `name` for errors and
    to tell JSON (.json) from YAML."""
    try:
        data = json.loads(text) if name.endswith(".json") else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{name}: not valid {'JSON' if name.endswith('.json') else 'YAML'}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and "scenes" in data and "shots" not in data:
        data = from_scene_script(data, name)
    if not isinstance(data, dict) or "shots" not in data:
        raise UserError(f"{name}: not a story: expected `shots:` (README) or `scenes:` (a scene script)")
    return data


def _map_paths(data: dict[str, Any], fn: Any) -> dict[str, Any]:
    """A copy of `data` with `fn` applied to every file path it names (start image/video, references, LoRAs)."""
    data = copy.deepcopy(data)
    for key in ("start_image", "start_video"):
        if isinstance(data.get(key), str):
            data[key] = fn(data[key])
    for ref in data.get("references") or []:
        if isinstance(ref, dict) and isinstance(ref.get("path"), str):
            ref["path"] = fn(ref["path"])
    loras = (data.get("settings") or {}).get("lora") or []
    for i, item in enumerate(loras):
        if isinstance(item, str):
            loras[i] = fn(item)
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            item["path"] = fn(item["path"])
    return data


def absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """`data` with its relative file paths resolved against `base` (the folder of the file it came from)."""
    return _map_paths(data, lambda p: str(Path(p) if Path(p).is_absolute() else (Path(base) / p).resolve()))


def relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """`data` with the file paths under `base` relative to it (the story is saved in `base`)."""
    base = Path(base).resolve()

    def rel(p: str) -> str:
        path = Path(p)
        if path.is_absolute() and path.resolve().is_relative_to(base):
            return str(path.resolve().relative_to(base))
        return p

    return _map_paths(data, rel)


def parse_memory_items(text: str) -> list[MemoryItem]:
    """`"alice, 1, 2:0"` -> `["alice", 1, "2:0"]`; blanks are dropped. A bad item is a UserError."""
    items: list[MemoryItem] = []
    for raw in str(text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        if item.isdigit():
            if int(item) < 1:
                raise UserError(f"memory item '{item}': shot numbers start at 1")
            items.append(int(item))
        elif m := _FRAME_ITEM.match(item):
            if int(m[1]) < 1:
                raise UserError(f"memory item '{item}': shot numbers start at 1")
            items.append(f"{int(m[1])}:{int(m[2])}")
        elif ":" in item or not re.fullmatch(r"[A-Za-z0-9_.-]+", item):
            raise UserError(f"memory item '{item}': expected a reference name, a shot number or shot:frame (e.g. 2:0)")
        else:
            items.append(item)
    return items


def format_memory_items(items: list[MemoryItem] | None) -> str:
    """The table cell of a memory list: `["alice", 1, "2:0"]` -> `"alice, 1, 2:0"`."""
    return ", ".join(str(i) for i in items or [])


def _seed_cell(value: Any) -> int | None:
    """A table seed cell as a seed: blank/None/NaN -> None; whole numbers (also 7.0, "7") -> int."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"seed {value!r}: expected a whole number (or blank)") from None
    if not number.is_integer() or number < 0:
        raise UserError(f"seed {value!r}: expected a whole number >= 0 (or blank)")
    return int(number)


def _bool_cell(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "x")
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def story_rows(data: dict[str, Any]) -> list[list[Any]]:
    """The shot table of a story: one row [caption, seed, continue, pin, exclude] per shot."""
    rows = []
    for shot in data.get("shots") or []:
        shot = {"caption": shot} if isinstance(shot, str) else shot
        memory = shot.get("memory") or {}
        rows.append(
            [
                shot.get("caption", ""),
                "" if shot.get("seed") is None else shot["seed"],
                bool(shot.get("continue")),
                format_memory_items(memory.get("pin")),
                format_memory_items(memory.get("exclude")),
            ]
        )
    return rows


def apply_rows(data: dict[str, Any], rows: list[list[Any]]) -> dict[str, Any]:
    """`data` with its shots replaced by the table's rows (rows without a caption are dropped)."""
    shots = []
    for row in rows or []:
        row = list(row) + [None] * (len(COLUMNS) - len(row))
        caption = "" if row[0] is None else str(row[0]).strip()
        if not caption:
            continue
        shot: dict[str, Any] = {"caption": caption}
        if (seed := _seed_cell(row[1])) is not None:
            shot["seed"] = seed
        if _bool_cell(row[2]):
            shot["continue"] = True
        memory = {kind: parse_memory_items(cell) for kind, cell in zip(MEMORY_KINDS, row[3:5])}
        if memory := {k: v for k, v in memory.items() if v}:
            shot["memory"] = memory
        shots.append(shot)
    return {**copy.deepcopy(data), "shots": shots}


def add_shot(data: dict[str, Any], caption: str) -> dict[str, Any]:
    """`data` with a shot of `caption` appended (a blank caption is a UserError)."""
    if not str(caption or "").strip():
        raise UserError("type a caption for the new shot")
    data = copy.deepcopy(data)
    data["shots"] = [*(data.get("shots") or []), {"caption": caption.strip()}]
    return data


def apply_settings(
    data: dict[str, Any], steps: Any, seed: Any, guidance: Any, strategy: str | None, budget: Any
) -> dict[str, Any]:
    """`data` with the fields the studio shows: settings.steps/seed/guidance (blank = the model's) and
    memory.strategy/budget."""
    data = copy.deepcopy(data)
    settings = dict(data.get("settings") or {})
    for key, value in (("steps", steps), ("seed", seed), ("guidance", guidance)):
        blank = value is None or value == "" or (isinstance(value, float) and math.isnan(value))
        if blank or (key == "steps" and value == 0):  # 0 steps: a blank box as the page may send it
            settings.pop(key, None)
        else:
            settings[key] = float(value) if key == "guidance" else int(value)
    data["settings"] = settings
    memory = dict(data.get("memory") or {})
    if strategy:
        memory["strategy"] = strategy
    if budget not in (None, ""):
        memory["budget"] = int(budget)
    data["memory"] = memory
    return data


def edit_memory(data: dict[str, Any], shot: int, item: MemoryItem, kind: str) -> dict[str, Any]:
    """`data` with `item` pinned (kind "pin") or excluded (kind "exclude") in shot `shot`'s memory
    (1-based), and removed from the other list; "clear" removes it from both."""
    if kind not in (*MEMORY_KINDS, "clear"):
        raise ValueError(f"kind {kind!r}")
    shots = data.get("shots") or []
    if not 1 <= shot <= len(shots):
        raise UserError(f"shot {shot}: the story has shots 1..{len(shots)}")
    data = copy.deepcopy(data)
    entry = data["shots"][shot - 1]
    entry = {"caption": entry} if isinstance(entry, str) else entry
    memory = {k: [i for i in (entry.get("memory") or {}).get(k) or [] if i != item] for k in MEMORY_KINDS}
    if kind != "clear":
        memory[kind].append(item)
    memory = {k: v for k, v in memory.items() if v}
    entry.pop("memory", None)
    if memory:
        entry["memory"] = memory
    data["shots"][shot - 1] = entry
    return data


def clear_memory(data: dict[str, Any], shot: int) -> dict[str, Any]:
    """`data` without any pin or exclusion in shot `shot` (1-based)."""
    data = copy.deepcopy(data)
    entry = data["shots"][shot - 1]
    if isinstance(entry, dict):
        entry.pop("memory", None)
    return data


def reference_name(filename: str, taken: set[str]) -> str:
    """A reference name from an image's file name (`Alice Smith.png` -> `alice_smith`), not in `taken`."""
    base = _NAME.sub("_", Path(filename).stem.lower()).strip("_") or "ref"
    if base.isdigit():  # a name must not read as a shot number
        base = f"ref{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


def references(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, path) of each reference, the default names ref1, ref2, ... filled in."""
    out = []
    for i, ref in enumerate(data.get("references") or [], 1):
        ref = {"path": ref} if isinstance(ref, str) else ref
        out.append((str(ref.get("name") or f"ref{i}"), str(ref.get("path", ""))))
    return out


def add_reference(data: dict[str, Any], path: str, name: str | None = None) -> tuple[dict[str, Any], str]:
    """(`data` with the image at `path` added to `references:`, the reference's name). A blank `name`
    is made from the file name; a name already taken is a UserError."""
    taken = {n for n, _ in references(data)}
    if name and name.strip():
        name = name.strip()
        if name in taken:
            raise UserError(f"a reference named '{name}' exists already")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.isdigit():
            raise UserError(f"reference name '{name}': use letters, digits, _ . - (not only digits)")
    else:
        name = reference_name(path, taken)
    data = copy.deepcopy(data)
    data["references"] = [*(data.get("references") or []), {"path": path, "name": name}]
    return data, name


def remove_reference(data: dict[str, Any], name: str) -> dict[str, Any]:
    """`data` without the reference `name` (nor its pins and exclusions)."""
    data = copy.deepcopy(data)
    data["references"] = [r for (n, _), r in zip(references(data), data.get("references") or []) if n != name]
    if not data["references"]:
        data.pop("references")
    for i in range(len(data.get("shots") or [])):
        data = edit_memory(data, i + 1, name, "clear")
    return data


def story_yaml(data: dict[str, Any]) -> str:
    """The story file's text: settings, memory, references, start image/video, then shots."""
    order = ("settings", "memory", "references", "start_image", "start_video", "shots")
    ordered = {k: data[k] for k in order if data.get(k) not in (None, {}, [])}
    ordered |= {k: v for k, v in data.items() if k not in order}
    ordered.setdefault("shots", [])
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120)
