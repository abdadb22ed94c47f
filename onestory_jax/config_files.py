"""Reading configs: YAML presets with `base:` inheritance, `key=value` overrides, and the typed conversion
between nested dicts and the dataclasses of `config.py` (the schema).

Overrides use dotted paths (`dit.num_layers=4`, `mesh.fsdp=-1`); values are parsed as YAML and type-checked
against the dataclass annotations, so an unknown key or a wrongly typed value names the key. Key paths of
earlier versions still read, in presets, overrides and checkpoints' config.yaml alike: `MOVED_KEYS` at their
new path (`dit.attention` is `dit_runtime.attention`), `RETIRED_KEYS` ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from onestory_jax.config import Config, DiTRuntime
from onestory_jax.errors import UserError, shown
from onestory_jax.io import load_yaml

# The shipped files, laid out as in the checkout: configs/ (presets, training configs, stories, the byte tokenizer)
# and models/demo (the embedded default). An installed wheel holds them in onestory_jax/shipped/ (setup.py copies
# them there); a checkout, or an editable install, reads the checkout's own.
_PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = _PACKAGE_DIR / "shipped" if (_PACKAGE_DIR / "shipped").is_dir() else _PACKAGE_DIR.parent
CONFIG_DIR = SHIPPED_DIR / "configs"
DEMO_MODEL = SHIPPED_DIR / "models" / "demo"

# Key paths of earlier versions (presets, overrides, checkpoints' config.yaml), so that those still load:
# retired ones are ignored, moved ones read at their new path. The DiT's runtime settings moved from `dit`
# (its architecture) to their own section `dit_runtime`.
RETIRED_KEYS = frozenset({"sampler.sigma_grid"})
MOVED_KEYS = {
    **{f"train.{k}": f"train.vae_stage.{k}" for k in ("clip_frames", "clip_size", "latent_noise", "latent_penalty")},
    **{f"dit.{f.name}": f"dit_runtime.{f.name}" for f in dataclasses.fields(DiTRuntime)},
}


def upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A root config dict (a copy) with `RETIRED_KEYS` dropped and `MOVED_KEYS` at their new paths. A key given
    at both its old and its new path, with different values, is refused."""
    data = _deep_copy(data)
    for old in RETIRED_KEYS:
        parent, leaf = _parent(data, old)
        if parent is not None:
            parent.pop(leaf, None)
    for old, new in MOVED_KEYS.items():
        parent, leaf = _parent(data, old)
        if parent is None or leaf not in parent:
            continue
        value = parent.pop(leaf)
        *sections, key = new.split(".")
        node = data
        for i, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise UserError(f"config section '{'.'.join(sections[: i + 1])}' must be a mapping")
        if key in node and node[key] != value:
            raise UserError(
                f"config key '{old}' (now '{new}') is given at both paths, as {shown(value)} and {shown(node[key])}: keep '{new}'"
            )
        node[key] = value
    return data


def _parent(data: dict[str, Any], path: str) -> tuple[dict[str, Any] | None, str]:
    """(the dict holding dotted `path`'s last key, or None when a section on the way is absent; that key)."""
    *sections, key = path.split(".")
    node: Any = data
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), key


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check `value` against annotation `tp`; return (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return False, value
        out = []
        for v, a in zip(value, args):
            ok, cv = _type_ok(v, a)
            if not ok:
                return False, value
            out.append(cv)
        return True, tuple(out)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise `UserError`. A root `Config`
    reads the key paths of earlier versions (`upgraded`)."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    if cls is Config and not prefix:
        data = upgraded(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' (valid: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise UserError(f"config key '{prefix}{key}' has value {shown(value)}, expected {_type_name(tp)}")
        values = coerced if isinstance(coerced, tuple) else (coerced,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"config key '{prefix}{key}' must be finite, got {shown(value)}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = Config) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict, checking keys against the dataclass tree. For a root `Config`,
    the dict and the keys are read as `upgraded` says (`dit.attention=cudnn` sets `dit_runtime.attention`)."""
    data = upgraded(data) if cls is Config else _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if cls is Config:
            key = MOVED_KEYS.get(key, key)
        parts = key.split(".")
        node_cls, node = cls, data
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(node_cls)
            if part not in hints:
                raise UserError(f"unknown config key '{key}'")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hints[part]):
                    raise UserError(f"config key '{key}' is a section; set one of its fields")
                node[part] = load_yaml(raw) if raw.strip() else ""
            else:
                if not dataclasses.is_dataclass(hints[part]):
                    raise UserError(f"config key '{'.'.join(parts[: i + 1])}' has no sub-keys")
                node_cls = hints[part]
                node = node.setdefault(part, {})
    return data


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def preset_path(name: str) -> Path:
    """Resolve a preset name (`tiny`) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"config file '{name}' does not exist")
        return p
    cand = CONFIG_DIR / f"{name}.yaml"
    if not cand.is_file():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"unknown config preset '{name}' (known: {', '.join(known)})")
    return cand


def load_config(name: str, overrides: list[str] | None = None) -> Config:
    """Load a preset by name or path and apply `key=value` overrides."""
    data = apply_overrides(_read_preset(name), overrides or [])
    return from_dict(Config, data).validate()


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's dict; a top-level `base: NAME` is read first and this file merged over it."""
    path = preset_path(name)
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must be a mapping")
    base = data.pop("base", None)
    data = upgraded(data)  # each file's own old paths, so that a file's keys override its base's at either path
    if base is None:
        return data
    if base in seen:
        raise UserError(f"config '{path}' inherits from itself through '{base}'")
    return _deep_merge(_read_preset(base, seen + (base,)), data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
