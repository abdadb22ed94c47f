"""Frozen dataclass configs, YAML presets and `key=value` command-line overrides.

A preset is a YAML file in `configs/` whose top-level keys are the fields of `Config`. Overrides use
dotted paths (`dit.num_layers=4`, `mesh.fsdp=-1`); values are parsed as YAML and type-checked
against the dataclass annotations, so an unknown key or a wrongly typed value names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from onestory_jax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The Wan2.1 DiT. Defaults are Wan2.1-I2V-14B."""

    model_type: Literal["t2v", "i2v"] = "i2v"
    in_dim: int = 36
    out_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int | None = 1280
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # Compute dtype of matmuls/attention; norms, modulation, time embedding and residuals stay fp32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Activation checkpointing per block: none | full | dots | dots_no_batch.
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Attention implementation: xla (reference), cudnn (flash on GPU), auto (let JAX pick).
    attention: Literal["xla", "cudnn", "auto"] = "xla"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_branch(self) -> bool:
        return self.model_type == "i2v"

    def validate(self) -> None:
        """Raise `UserError` for inconsistent settings."""
        if self.dim % self.num_heads:
            raise UserError(f"dit.dim={self.dim} is not divisible by dit.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise UserError(f"dit head dim {self.head_dim} must be even (3D RoPE works on pairs)")
        if self.model_type == "i2v" and not self.image_dim:
            raise UserError("dit.model_type=i2v needs dit.image_dim (the CLIP feature width)")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """OneStory memory: Frame Selection and the Adaptive Conditioner."""

    num_queries: int = 16  # m learnable selector queries
    selector_heads: int = 8
    selector_stride: int = 4  # phi_V: strided conv, spatial /stride on the latent
    latent_channels: int = 16
    # Patchifier kernels on the latent, finest first; frames are assigned to them by rank.
    patchifier_kernels: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 8, 8), (1, 16, 16))
    # Frames per patchifier for one latent-frame budget (multiplied by `budget`).
    frames_per_patchifier: tuple[int, ...] = (2, 6, 5)
    budget: int = 1  # latent-frame equivalents of context tokens: 1, 2 or 3

    def validate(self) -> None:
        if len(self.patchifier_kernels) != len(self.frames_per_patchifier):
            raise UserError("memory.patchifier_kernels and memory.frames_per_patchifier differ in length")
        if self.budget < 1:
            raise UserError(f"memory.budget must be >= 1, got {self.budget}")
        for k in self.patchifier_kernels:
            if k[0] != 1 or k[1] % 2 or k[2] % 2:
                raise UserError(f"memory patchifier kernel {k} must be (1, even, even)")


# --- VAE config (owned by the VAE work; keep edits inside this section) ---

# --- text / image encoder configs (owned by the encoder work; keep edits inside this section) ---

# --- sampler configs (owned by the diffusion work; keep edits inside this section) ---


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Denoising sampler. Defaults are Wan2.1 I2V-480P: UniPC, 40 steps, shift 3, CFG 5, Wan's grid."""

    solver: Literal["unipc", "euler"] = "unipc"
    steps: int = 40
    shift: float = 3.0
    guidance: float = 5.0  # classifier-free guidance scale on text (1.0: no unconditional pass)
    # "wan": Wan's FlowUniPC grid (linspace(0.999, 0)); "diffusers": diffusers UniPC flow grid.
    sigma_grid: Literal["diffusers", "wan"] = "wan"
    negative_prompt: str = ""

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise UserError(f"sampler.shift must be > 0, got {self.shift}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on one axis means 'all remaining devices'."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """The root config: model plus the device mesh."""

    name: str = "custom"
    dit: DiTConfig = DiTConfig()
    memory: MemoryConfig = MemoryConfig()
    mesh: MeshConfig = MeshConfig()

    def validate(self) -> Config:
        self.dit.validate()
        self.memory.validate()
        return self


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
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise `UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
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
            raise UserError(f"config key '{prefix}{key}' has value {value!r}, expected {_type_name(tp)}")
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
    """Apply `a.b=value` strings to a nested dict, checking keys against the dataclass tree."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node_cls, node = cls, data
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(node_cls)
            if part not in hints:
                raise UserError(f"unknown config key '{key}'")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hints[part]):
                    raise UserError(f"config key '{key}' is a section; set one of its fields")
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
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
    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data).validate()
