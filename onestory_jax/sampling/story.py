"""Story files (YAML or JSON): settings, memory strategy, optional start image/video, and shots.

Schema errors name the field and, for shots, the shot number (1-based), e.g.
`story.yaml: shots[3].caption: must be a non-empty string`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from onestory_jax.config import SamplerConfig
from onestory_jax.errors import UserError, shown
from onestory_jax.io import load_yaml

STRATEGIES = ("onestory", "last_frame", "uniform", "recent", "none")
SOLVERS = ("unipc", "euler")
SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1: jax.random.key keeps 32 bits, so 2**32 would repeat seed 0
MAX_STEPS = 1000  # the flow-matching grid has 1000 training timesteps; more steps repeat timesteps
LIMITS = {"width": 16384, "height": 16384, "frames": 4097, "fps": 1000}  # far beyond any model, below overflow


class LoraFile(NamedTuple):
    """A community LoRA merged into the DiT at load (`convert/lora_formats.py`): its file and user scale."""

    path: Path
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    # None takes the model's `sampler` config (`with_sampler`): its size is the one it was trained at.
    width: int | None = None
    height: int | None = None
    frames: int | None = None  # per shot, 4k + 1
    fps: int | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    solver: Literal["unipc", "euler"] | None = None
    negative_prompt: str | None = None
    cache: float | None = None  # step caching threshold (0 = off)
    memory_guidance: float | None = None  # guidance on the memory's context tokens (1 = off)
    lora: tuple[LoraFile, ...] = ()  # merged into the model: every story of one run has the same


SAMPLER_FIELDS = (
    "steps",
    "guidance",
    "shift",
    "solver",
    "negative_prompt",
    "cache",
    "memory_guidance",
    "width",
    "height",
    "frames",
    "fps",
)  # = config.SamplerConfig's


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    strategy: Literal["onestory", "last_frame", "uniform", "recent", "none"] = "onestory"
    budget: int | None = None  # latent-frame equivalents of context tokens; None: the model config's memory.budget
    k: int | None = None  # frames kept; default: what the budget allows


@dataclasses.dataclass(frozen=True)
class Shot:
    caption: str
    seed: int | None = None
    continues: bool = False  # no cut: starts from the previous shot's last frame (I2V), keeping its memory
    rerolled: bool = False  # its seed was drawn by `sample.py --redo` (not a story-file field)
    pin: tuple[
        str, ...
    ] = ()  # memory items always in this shot's memory: "N" (shot N), "N:F" (its latent frame F), a reference's name
    exclude: tuple[str, ...] = ()  # memory items never in it


@dataclasses.dataclass(frozen=True)
class Reference:
    """A user's image, VAE-encoded into one memory frame before shot 1."""

    name: str
    path: Path


@dataclasses.dataclass(frozen=True)
class Story:
    settings: Settings
    memory: MemorySettings
    shots: tuple[Shot, ...]
    start_image: Path | None = None
    start_video: Path | None = None
    references: tuple[Reference, ...] = ()
    resolved: bool = False  # its missing sampler settings were filled from the model's (`with_sampler`)

    @property
    def latent_frames(self) -> int:
        return (self.settings.frames - 1) // 4 + 1

    def shot_seed(self, i: int) -> int:
        """Seed of shot i (0-based): its own, else the story seed + i."""
        return self.shots[i].seed if self.shots[i].seed is not None else self.settings.seed + i


_INT, _FLOAT, _STR = (int,), (int, float), (str,)
_SETTING_TYPES = {
    "width": _INT,
    "height": _INT,
    "frames": _INT,
    "fps": _INT,
    "seed": _INT,
    "steps": _INT,
    "guidance": _FLOAT,
    "shift": _FLOAT,
    "solver": _STR,
    "negative_prompt": _STR,
    "cache": _FLOAT,
    "memory_guidance": _FLOAT,
}


def _check_keys(where: str, data: Any, allowed: set[str], sep: str = ".") -> dict:
    """`data` as a mapping of `allowed` keys; an unknown one is named as `where` + `sep` + key."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{where}{sep}{unknown[0]}: unknown field (valid: {', '.join(sorted(allowed))})")
    return data


def _typed(where: str, value: Any, types: tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise UserError(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {shown(value)}")
    if types is _FLOAT and not math.isfinite(value):  # NaN would pass every range check and poison the video
        raise UserError(f"{where}: must be a finite number, got {shown(value)}")
    return float(value) if types is _FLOAT else value


def _check_seed(where: str, seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{where}: {seed} is not in 0..{SEED_LIMIT - 1}")


def _file_items(src: str, field: str, data: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, mapping) per item of a list of `FILE` or `{path: FILE, KEY: ...}` (a bare FILE is {path: FILE})."""
    if not isinstance(data, list):
        raise UserError(f"{src}: {field}: must be a list of FILE or {{path: FILE, {key}: ...}}")
    items = [({"path": item} if isinstance(item, str) else item) for item in data]
    return [(f"{field}[{i}]", _check_keys(f"{src}: {field}[{i}]", item, {"path", key})) for i, item in enumerate(items, 1)]


def _loras(src: str, base: Path, data: Any) -> tuple[LoraFile, ...]:
    """settings.lora: a list of `FILE` or `{path: FILE, scale: S}` (paths relative to the story file)."""
    out = []
    for where, item in _file_items(src, "settings.lora", data, "scale"):
        scale = _typed(f"{src}: {where}.scale", item.get("scale", 1.0), _FLOAT)
        out.append(LoraFile(_path(src, base, f"{where}.path", item.get("path")), scale))
    return tuple(out)


def lora_from_arg(text: str) -> LoraFile:
    """`sample.py --lora FILE[:SCALE]`: a trailing `:number` is the scale (default 1.0)."""
    head, sep, tail = text.rpartition(":")
    try:
        path, scale = (head, float(tail)) if sep else (text, 1.0)
    except ValueError:
        path, scale = text, 1.0
    if not math.isfinite(scale):
        raise UserError(f"--lora {text}: the scale must be a finite number")
    if not Path(path).is_file():
        raise UserError(f"--lora {text}: file '{path}' does not exist")
    return LoraFile(Path(path), scale)


def _settings(src: str, data: Any, base: Path) -> Settings:
    data = _check_keys(f"{src}: settings", data or {}, {*_SETTING_TYPES, "lora"})
    kw = {k: _typed(f"{src}: settings.{k}", v, _SETTING_TYPES[k]) for k, v in data.items() if k != "lora"}
    s = Settings(**kw, lora=_loras(src, base, data.get("lora") or []))
    for name, most in LIMITS.items():  # sizes beyond any model (10**400 overflowed later as a traceback)
        v = getattr(s, name)
        if v is not None and v > most:
            raise UserError(f"{src}: settings.{name}: {shown(v)} is more than {most}")
    for name in ("width", "height"):
        v = getattr(s, name)
        if v is not None and (v <= 0 or v % 16):
            raise UserError(f"{src}: settings.{name}: {v} is not a positive multiple of 16")
    if s.frames is not None and (s.frames < 1 or (s.frames - 1) % 4):
        raise UserError(f"{src}: settings.frames: {s.frames} is not 4k+1 (valid: 1, 5, 9, ..., 77, 81, ...)")
    if s.steps is not None and not 1 <= s.steps <= MAX_STEPS:
        raise UserError(f"{src}: settings.steps: {s.steps} is not in 1..{MAX_STEPS}")
    _check_seed(f"{src}: settings.seed", s.seed)
    if s.shift is not None and s.shift <= 0:
        raise UserError(f"{src}: settings.shift: must be > 0")
    if s.cache is not None and s.cache < 0:
        raise UserError(f"{src}: settings.cache: must be >= 0 (0 = off)")
    if s.memory_guidance is not None and s.memory_guidance < 0:
        raise UserError(f"{src}: settings.memory_guidance: must be >= 0 (1 = off)")
    if s.solver is not None and s.solver not in SOLVERS:
        raise UserError(f"{src}: settings.solver: {shown(s.solver)} is not one of {', '.join(SOLVERS)}")
    if s.fps is not None and s.fps < 1:
        raise UserError(f"{src}: settings.fps: must be >= 1")
    return s


def _memory(src: str, data: Any) -> MemorySettings:
    data = _check_keys(f"{src}: memory", data or {}, {"strategy", "budget", "k"})
    m = MemorySettings(
        strategy=_typed(f"{src}: memory.strategy", data.get("strategy", "onestory"), _STR),
        budget=None if data.get("budget") is None else _typed(f"{src}: memory.budget", data["budget"], _INT),
        k=None if data.get("k") is None else _typed(f"{src}: memory.k", data["k"], _INT),
    )
    if m.strategy not in STRATEGIES:
        raise UserError(f"{src}: memory.strategy: {shown(m.strategy)} is not one of {', '.join(STRATEGIES)}")
    if m.budget not in (None, 1, 2, 3):
        raise UserError(f"{src}: memory.budget: {m.budget} is not 1, 2 or 3")
    if m.k is not None and m.k < 1:
        raise UserError(f"{src}: memory.k: must be >= 1")
    return m


def _shot(src: str, i: int, data: Any, references: set[str] = frozenset()) -> Shot:
    where = f"{src}: shots[{i}]"
    if isinstance(data, str):
        data = {"caption": data}
    data = _check_keys(where, data, {"caption", "seed", "continue", "memory"})
    caption = data.get("caption")
    if isinstance(caption, bool):  # YAML 1.1: `caption: yes` is True
        raise UserError(
            f"{where}.caption: must be a non-empty string, got {caption} (YAML reads yes/no/on/off as "
            "booleans: quote the caption)"
        )
    if not isinstance(caption, str) or not caption.strip():
        raise UserError(f"{where}.caption: must be a non-empty string")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. a JSON "\ud800"): no tokenizer or file can take it
        raise UserError(f"{where}.caption: is not valid Unicode text (it holds a lone surrogate)") from None
    seed = data.get("seed")
    if seed is not None:
        _check_seed(f"{where}.seed", _typed(f"{where}.seed", seed, _INT))
    continues = data.get("continue", False)
    if not isinstance(continues, bool):
        raise UserError(f"{where}.continue: expected true or false, got {shown(continues)}")
    if continues and i == 1:
        raise UserError(f"{where}.continue: the first shot has no shot to continue")
    pin, exclude = _shot_memory(where, i, data.get("memory"), references)
    return Shot(caption=caption.strip(), seed=seed, continues=continues, pin=pin, exclude=exclude)


_SHOT_ITEM = re.compile(r"(\d+)(?::(\d+))?")


def _memory_item(where: str, shot: int, item: Any, references: set[str]) -> str:
    """A pin/exclude item as written in the manifest: "N", "N:F" or a reference's name."""
    text = str(item).strip() if isinstance(item, (int, str)) and not isinstance(item, bool) else None
    if text is None or not text:
        raise UserError(f"{where}: {shown(item)} is not a shot number, SHOT:FRAME or a reference's name")
    m = _SHOT_ITEM.fullmatch(text)
    if m is None:
        if text not in references:
            known = ", ".join(sorted(references)) or "none: the story has no `references:`"
            raise UserError(f"{where}: {shown(item)} is not a shot number, SHOT:FRAME or a reference (references: {known})")
        return text
    if not 1 <= int(m[1]) < shot:
        sexagesimal = isinstance(item, int) and item >= 60  # YAML 1.1 reads an unquoted 2:0 as 2 x 60 + 0
        hint = (
            f' (an unquoted {item // 60}:{item % 60} reads as {item} in YAML: quote it, "{item // 60}:{item % 60}")'
            if sexagesimal
            else ""
        )
        raise UserError(
            f"{where}: {shown(item)}: shot {m[1]} is not an earlier shot (shot {shot}'s memory holds shots 1..{shot - 1}){hint}"
        )
    return text


def _shot_memory(where: str, shot: int, data: Any, references: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pin, exclude) of a shot's `memory: {pin: [...], exclude: [...]}`."""
    if data is None:
        return (), ()
    data = _check_keys(f"{where}.memory", data, {"pin", "exclude"})
    lists = []
    for key in ("pin", "exclude"):
        items = data.get(key) or []
        items = items if isinstance(items, list) else [items]
        lists.append(tuple(dict.fromkeys(_memory_item(f"{where}.memory.{key}", shot, x, references) for x in items)))
    both = set(lists[0]) & set(lists[1])
    if both:
        raise UserError(f"{where}.memory: {sorted(both)[0]} is both pinned and excluded")
    return lists[0], lists[1]


def _references(src: str, base: Path, data: Any) -> tuple[Reference, ...]:
    """`references:` a list of `FILE` or `{path: FILE, name: NAME}` (names default to ref1, ref2, ...)."""
    if data is None:
        return ()
    out: list[Reference] = []
    for where, item in _file_items(src, "references", data, "name"):
        name = _typed(f"{src}: {where}.name", item.get("name", f"ref{len(out) + 1}"), _STR).strip()
        if not name or _SHOT_ITEM.fullmatch(name):
            raise UserError(f"{src}: {where}.name: {shown(name)} must be a name, not empty or a shot number")
        if name in {r.name for r in out}:
            raise UserError(f"{src}: {where}.name: two references are named {name!r}")
        out.append(Reference(name, _path(src, base, f"{where}.path", item.get("path"))))
    return tuple(out)


def _path(src: str, base: Path, field: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UserError(f"{src}: {field}: must be a path")
    p = (base / value).expanduser() if not Path(value).is_absolute() else Path(value)
    if not p.is_file():
        raise UserError(f"{src}: {field}: file '{p}' does not exist")
    return p


def parse_story(data: Any, src: str = "story", base: Path = Path(".")) -> Story:
    """Validate a story mapping; relative paths resolve against `base`."""
    data = _check_keys(src, data, {"settings", "memory", "shots", "start_image", "start_video", "references"}, sep=": ")
    shots = data.get("shots")
    if not isinstance(shots, list) or not shots:
        raise UserError(f"{src}: shots: must be a non-empty list of {{caption, seed?}}")
    references = _references(src, base, data.get("references"))
    story = Story(
        settings=_settings(src, data.get("settings"), base),
        memory=_memory(src, data.get("memory")),
        shots=tuple(_shot(src, i + 1, s, {r.name for r in references}) for i, s in enumerate(shots)),
        start_image=_path(src, base, "start_image", data.get("start_image")),
        start_video=_path(src, base, "start_video", data.get("start_video")),
        references=references,
    )
    if story.start_image and story.start_video:
        raise UserError(f"{src}: give start_image or start_video, not both")
    for i in range(len(story.shots)):  # a shot without its own seed takes settings.seed + i
        _check_seed(f"{src}: shots[{i + 1}] seed (settings.seed + {i})", story.shot_seed(i))
    return story


def load_story(path: str | Path) -> Story:
    """Read and validate a story file (.yaml, .yml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"story file '{path}' does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path.name}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(e).splitlines()[0]}"
        ) from None
    if isinstance(data, dict) and "scenes" in data and "shots" not in data:
        data = from_scene_script(data, path.name)
    elif isinstance(data, dict) and "shots" not in data:
        raise UserError(
            f"{path.name}: not a story: expected `shots:` (our format, README) or `scenes:` (a scene script "
            "as StoryMem's ST-Bench ships them), found {', '.join(sorted(map(str, data))) or 'nothing'}"
        )
    return parse_story(data, path.name, path.parent)


def _flag(value: Any, where: str) -> bool:
    """A scene script's boolean: true/false, or the strings "True"/"False" those files use."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(f"{where}: expected True or False, got {shown(value)}")


def from_scene_script(data: dict[str, Any], src: str) -> dict[str, Any]:
    """Our story mapping from a scene script (StoryMem's ST-Bench format): `scenes` in order, each with
    `video_prompts` (one shot each) and `cut`, one flag per prompt or one for the scene's first prompt
    (its other prompts are cuts); a prompt with cut False continues the previous shot (`continue`).
    `story_name`, `story_overview`, `scene_num` and `first_frame_prompt` (an image prompt: there is no
    text-to-image model here) are not used."""
    scenes = data["scenes"]
    if not isinstance(scenes, list) or not scenes:
        raise UserError(f"{src}: scenes: must be a non-empty list")
    shots = []
    for n, scene in enumerate(scenes, 1):
        where = f"{src}: scenes[{n}]"
        if not isinstance(scene, dict):
            raise UserError(f"{where}: must be a mapping")
        prompts = scene.get("video_prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise UserError(f"{where}.video_prompts: must be a non-empty list of prompts")
        cuts = scene.get("cut", True)
        cuts = [_flag(c, f"{where}.cut") for c in cuts] if isinstance(cuts, list) else [_flag(cuts, f"{where}.cut")]
        if len(cuts) not in (1, len(prompts)):
            raise UserError(f"{where}.cut: {len(cuts)} flags for {len(prompts)} video_prompts")
        cuts = cuts + [True] * (len(prompts) - len(cuts))
        for prompt, cut in zip(prompts, cuts):
            shots.append({"caption": prompt, **({"continue": True} if not cut and shots else {})})
    return {"shots": shots}


def with_sampler(story: Story, sampler: SamplerConfig) -> Story:
    """The story with each sampler setting it leaves out taken from the model's `sampler` config."""
    filled = {f: getattr(sampler, f) for f in SAMPLER_FIELDS if getattr(story.settings, f) is None}
    return dataclasses.replace(story, settings=dataclasses.replace(story.settings, **filled), resolved=True)


def require_resolved(story: Story) -> Story:
    """The story, which must have been through `with_sampler` (the sampler settings are resolved once, at
    the top of a render)."""
    if not story.resolved:
        raise ValueError("story settings not resolved: pass with_sampler(story, cfg.sampler)")
    return story


def reroll(story: Story, i: int, seed: int) -> Story:
    """The story with shot i (0-based) re-rolled: its seed replaced by `seed`."""
    shots = list(story.shots)
    shots[i] = dataclasses.replace(shots[i], seed=seed, rerolled=True)
    return dataclasses.replace(story, shots=tuple(shots))


def story_to_dict(story: Story) -> dict[str, Any]:
    """JSON-ready dict (for the manifest)."""
    d = dataclasses.asdict(story)
    for k in ("start_image", "start_video"):
        d[k] = str(d[k]) if d[k] else None
    d["shots"] = list(d["shots"])
    d["references"] = [{"name": r.name, "path": str(r.path)} for r in story.references]
    return d
