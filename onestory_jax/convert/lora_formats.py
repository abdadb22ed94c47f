"""Community Wan2.1 LoRAs, merged into the DiT's weights at load (`sample.py --lora`, a story's `settings.lora`).

Each key's prefix names its layout and its suffix what it holds; a file may mix formats:

    diffusers / PEFT   transformer.blocks.0.attn1.to_q.lora_A.weight, .lora_B.weight (.lora_B.bias); alpha
                       in `.alpha` keys or in the `lora_adapter_metadata` header diffusers writes
    kohya / musubi     lora_unet_blocks_0_self_attn_q.lora_down.weight, .lora_up.weight, .alpha
    original Wan       diffusion_model.blocks.0.self_attn.q.lora_down.weight, .lora_up.weight (or lora_A,
    (ComfyUI, lightx2v) lora_B), .alpha, and full-tensor deltas: `.diff` (a weight, norm scale or modulation
                       table) and `.diff_b` (a bias)

A module name resolves through the converter's own map (`convert/dit.py`) to one of our leaves (one
layer of a stacked `blocks` leaf). The merge, per LoRA file and user scale s (our kernels are [in, out],
PyTorch's Linear weight [out, in]):

    kernel += s * (alpha / rank) * (up @ down)^T      alpha absent: alpha = rank (diffusers / PEFT)
    bias   += s * (alpha / rank) * lora_B.bias        (PEFT scales lora_B's output, its bias included)
    leaf   += s * diff,  bias += s * diff_b

Anything that does not resolve, or does not fit its layer, is one `UserError` line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.config import DiTConfig, DiTRuntime
from onestory_jax.convert import dit
from onestory_jax.convert.mapping import Shape, Source, abstract_tree, checked, leaf
from onestory_jax.convert.safetensors_io import SafetensorsFile
from onestory_jax.errors import UserError
from onestory_jax.models.dit import init_fn as dit_init_fn

LeafPath = tuple[str, ...]

# key prefix -> the layout of the module names after it ("kohya": original names, "." written "_")
PREFIXES = {"transformer.": "diffusers", "diffusion_model.": "original", "lora_unet_": "kohya"}
# key suffix -> what the tensor is
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_down.weight": "down",  # [rank, in]
    ".lora_B.weight": "up",
    ".lora_up.weight": "up",  # [out, rank]
    ".alpha": "alpha",  # one number
    ".lora_B.bias": "up_bias",
    ".diff_b": "diff_b",  # [out]
    ".diff": "diff",  # the full tensor's shape
}
FORMATS_HINT = (
    "read: diffusers/PEFT `transformer.*.lora_A|lora_B.weight`, kohya `lora_unet_*.lora_down|lora_up.weight`, "
    "original Wan `diffusion_model.*` with `.diff`/`.diff_b`; docs/sampling.md"
)
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' safetensors header entry: the PEFT LoraConfig as JSON


class Target(NamedTuple):
    """One source tensor of the DiT: its converter entry and its layer in a stacked leaf (0 if unstacked)."""

    source: Source
    layer: int


@dataclasses.dataclass
class LeafDelta:
    """What the LoRAs add to one leaf, per layer (0 for an unstacked leaf), in our layout."""

    stacked: bool  # the leaf has a leading layers axis
    factors: dict[int, list[tuple[np.ndarray, np.ndarray]]] = dataclasses.field(default_factory=dict)  # [(a [in, r], b [r, out])]
    dense: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # the leaf's per-layer shape

    def add_factors(self, layer: int, a: np.ndarray, b: np.ndarray) -> None:
        """Add a @ b (a [in, r], b [r, out], any scale folded in) to `layer`."""
        self.factors.setdefault(layer, []).append((a, b))

    def add_dense(self, layer: int, delta: np.ndarray) -> None:
        """Add a full delta to `layer`."""
        self.dense[layer] = self.dense.get(layer, 0) + delta

    def arrays(self, shape: Shape) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(a [L, in, R], b [L, R, out], dense [L, ...]) for a leaf of `shape` [L, ...]: a layer's factors side by
        side along R (their products add), zeros elsewhere; None where nothing is added."""
        layers, per_layer = shape[0], shape[1:]
        a = b = dense = None
        if self.factors:
            rank = max(sum(f[0].shape[1] for f in fs) for fs in self.factors.values())
            a = np.zeros((layers, per_layer[0], rank), np.float32)
            b = np.zeros((layers, rank, per_layer[-1]), np.float32)
            for i, fs in self.factors.items():
                r = sum(f[0].shape[1] for f in fs)
                a[i, :, :r] = np.concatenate([f[0] for f in fs], axis=1)
                b[i, :r] = np.concatenate([f[1] for f in fs], axis=0)
        if self.dense:
            dense = np.zeros(shape, np.float32)
            for i, d in self.dense.items():
                dense[i] = d
        return a, b, dense


class Names(NamedTuple):
    """The DiT's source tensors: per layout, name -> Target; and kohya module names -> original ones."""

    targets: dict[str, dict[str, Target]]
    kohya: dict[str, str]


def names(cfg: DiTConfig) -> Names:
    """Every source tensor name of this DiT in both layouts (the converter's map), and the kohya spelling of
    each original module name ("." written "_")."""
    targets = {
        layout: {name: Target(src, i) for src in dit.sources(cfg, layout) for i, name in enumerate(src.names)}
        for layout in ("diffusers", "original")
    }
    return Names(targets, {_module(name).replace(".", "_"): _module(name) for name in targets["original"]})


def _module(tensor: str) -> str:
    """`blocks.0.self_attn.q.weight` -> `blocks.0.self_attn.q`; a bare parameter (`head.modulation`) is its own module."""
    return tensor.rsplit(".", 1)[0] if tensor.endswith((".weight", ".bias")) else tensor


def split_key(key: str, kohya: dict[str, str]) -> tuple[str, str, str] | None:
    """(layout, module, kind) of a LoRA key in one of the formats, None when it is in none; kohya modules
    come back as original names (via `kohya`, `Names.kohya`)."""
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
    if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
        return None
    layout, module = PREFIXES[prefix], key[len(prefix) : -len(suffix)]
    if layout == "kohya":
        layout, module = "original", kohya.get(module, module)
    return layout, module, SUFFIXES[suffix]


def tensor_name(module: str, kind: str, targets: dict[str, Target]) -> str:
    """The source tensor a key of this kind changes: the module's bias for diff_b and up_bias, else its weight
    (or the module itself, a bare parameter, for a diff)."""
    if kind in ("diff_b", "up_bias"):
        return f"{module}.bias"
    return module if kind == "diff" and f"{module}.weight" not in targets else f"{module}.weight"


def _metadata_alpha(meta: dict[str, str], where: str) -> Callable[[str], float | None]:
    """module -> alpha from diffusers' `lora_adapter_metadata` (lora_alpha, alpha_pattern; keys optionally
    prefixed `transformer.`); None where the file has none."""
    if ADAPTER_METADATA not in meta:
        return lambda module: None
    try:
        config = {k.removeprefix("transformer."): v for k, v in json.loads(meta[ADAPTER_METADATA]).items()}
    except (ValueError, AttributeError):
        raise UserError(f"{where}: its {ADAPTER_METADATA} header is not a JSON object") from None
    if config.get("use_dora") or config.get("use_rslora"):
        raise UserError(f"{where}: a DoRA / rsLoRA adapter (use_dora / use_rslora in its header): not supported")
    patterns = config.get("alpha_pattern") or {}

    def alpha(module: str) -> float | None:  # PEFT's rule: a pattern matches the module name or a dotted suffix of it
        found = [v for k, v in patterns.items() if re.fullmatch(rf"(.*\.)?({k})", module)]
        return float(found[0]) if found else config.get("lora_alpha")

    return alpha


def _group(keys: Iterable[str], known: Names) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """({(layout, module): {kind: key}}, keys that resolve to no tensor of this DiT)."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    unmatched = []
    for key in keys:
        parts = split_key(key, known.kohya)
        if parts is None or tensor_name(parts[1], parts[2], known.targets[parts[0]]) not in known.targets[parts[0]]:
            unmatched.append(key)
            continue
        groups.setdefault(parts[:2], {})[parts[2]] = key
    return groups, unmatched


def _shown(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class _File:
    """One LoRA file being read into `deltas`: its tensors, user scale and where its errors point."""

    def __init__(self, path: Path, scale: float, cfg: DiTConfig, known: Names, abstract: Any, deltas: dict[LeafPath, LeafDelta]):
        self.file, self.scale, self.cfg, self.known, self.abstract, self.deltas = (
            SafetensorsFile(path),
            scale,
            cfg,
            known,
            abstract,
            deltas,
        )
        self.where = f"LoRA '{path}'"
        self.alpha_of = _metadata_alpha(self.file.metadata, self.where)

    def tensor(self, key: str) -> np.ndarray:
        return checked(f"{self.where}: {key}", self.file.read(key)).astype(np.float32)

    def target(self, layout: str, module: str, kind: str) -> tuple[Target, Shape, LeafDelta]:
        """The tensor a key changes, its per-layer leaf shape (ours) and the delta collecting for its leaf."""
        targets = self.known.targets[layout]
        t = targets[tensor_name(module, kind, targets)]
        shape = leaf(self.abstract, t.source.path).shape
        delta = self.deltas.setdefault(t.source.path, LeafDelta(stacked=t.source.stacked))
        return t, shape[1:] if t.source.stacked else shape, delta

    def add_low_rank(self, layout: str, module: str, keys: dict[str, str]) -> None:
        """kernel += scale * (alpha / rank) * (up @ down)^T, and bias += the same factor * lora_B.bias; checked
        against the kernel's shape."""
        if missing := [k for k in ("down", "up") if k not in keys]:
            raise UserError(
                f"{self.where}: {module} has no lora_{missing[0]} weight (its keys: {', '.join(sorted(keys.values()))})"
            )
        t, shape, delta = self.target(layout, module, "down")
        if t.source.transform != "linear":
            raise UserError(f"{self.where}: {keys['down']}: LoRA on '{module}' (not a linear layer) is not supported")
        down, up = self.tensor(keys["down"]), self.tensor(keys["up"])  # [rank, in], [out, rank]
        rank, (in_dim, out_dim) = down.shape[0], shape
        if down.shape != (rank, in_dim) or up.shape != (out_dim, rank):
            raise UserError(
                f"{self.where}: {module}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not fit "
                f"its weight [out {out_dim}, in {in_dim}] (a LoRA for another Wan model?)"
            )
        factor = self.scale * self.alpha(keys.get("alpha"), module, rank) / rank
        delta.add_factors(t.layer, down.T, up.T * factor)  # [in, r], [r, out]
        if "up_bias" in keys:
            self.add_full(layout, module, "up_bias", keys["up_bias"], factor)

    def alpha(self, key: str | None, module: str, rank: int) -> float:
        """The module's alpha: its `.alpha` key, else the diffusers header's, else the rank."""
        if key is None:
            found = self.alpha_of(module)
            return float(rank if found is None else found)
        value = self.tensor(key)
        if value.size != 1:
            raise UserError(f"{self.where}: {key} holds {value.size} numbers, not one alpha")
        return float(value.reshape(()))

    def add_full(self, layout: str, module: str, kind: str, key: str, factor: float) -> None:
        """leaf += factor * the tensor `key` (PyTorch layout), checked against the leaf's shape."""
        t, shape, delta = self.target(layout, module, kind)
        value, torch_shape = self.tensor(key), t.source.torch_shape(shape)
        if value.shape != torch_shape:
            raise UserError(f"{self.where}: {key} is {list(value.shape)}, its tensor {list(torch_shape)}")
        delta.add_dense(t.layer, factor * t.source.to_flax(value, shape))

    def read(self) -> None:
        """Add every key of the file to `deltas`."""
        if not self.file.shapes:
            raise UserError(f"{self.where} holds no tensors")
        groups, unmatched = _group(self.file.shapes, self.known)
        if unmatched:
            raise UserError(
                f"{self.where}: {len(unmatched)} key(s) match no layer of this Wan2.1 {self.cfg.model_type.upper()} "
                f"DiT ({self.cfg.num_layers} blocks): {_shown(sorted(unmatched))} ({FORMATS_HINT})"
            )
        for (layout, module), keys in groups.items():
            if keys.keys() & {"down", "up", "alpha", "up_bias"}:
                self.add_low_rank(layout, module, keys)
            for kind in ("diff", "diff_b"):
                if kind in keys:
                    self.add_full(layout, module, kind, keys[kind], self.scale)


def read_loras(loras: Iterable[tuple[Path, float]], cfg: DiTConfig, rt: DiTRuntime) -> dict[LeafPath, LeafDelta]:
    """Leaf path -> what the LoRA files, each (path, user scale), add to a DiT of this config run with `rt`; every
    key is checked against the config's (abstract) param shapes, so a LoRA is refused before any weight is loaded."""
    switches = [
        f"dit_runtime.{f}={getattr(rt, f)}" for f in ("weights_dtype", "offload") if getattr(rt, f) != getattr(DiTRuntime, f)
    ]
    if switches:  # the merge adds to full-precision kernels on the device; these store them in fp8 or in host memory
        raise UserError(
            f"a LoRA cannot be merged into a DiT loaded with {' and '.join(switches)} (low VRAM): "
            "sample without these switches, or with a model folder the LoRA is already merged into"
        )
    deltas: dict[LeafPath, LeafDelta] = {}
    known, abstract = names(cfg), abstract_tree(dit_init_fn(cfg, rt.plain()))
    for path, scale in loras:
        _File(Path(path), float(scale), cfg, known, abstract, deltas).read()
    return deltas


def _layer_sum(x: jax.Array, a: jax.Array | None, b: jax.Array | None, dense: jax.Array | None) -> jax.Array:
    """x + a @ b + dense in fp32 (None: nothing), back in x's dtype."""
    y = x.astype(jnp.float32)
    if a is not None:
        y = y + a @ b
    if dense is not None:
        y = y + dense
    return y.astype(x.dtype)


def _merged(x: jax.Array, a: jax.Array | None, b: jax.Array | None, dense: jax.Array | None, stacked: bool) -> jax.Array:
    """x plus its delta: a [L, in, R], b [L, R, out], dense [L, ...], L = 1 for an unstacked leaf. A stacked
    leaf [L, ...] goes one layer at a time, in place as x is donated: the peak memory is one layer's delta."""
    pick = lambda v, i: None if v is None else v[i]
    if not stacked:
        return _layer_sum(x, pick(a, 0), pick(b, 0), pick(dense, 0))

    def body(i: jax.Array, y: jax.Array) -> jax.Array:
        return y.at[i].set(_layer_sum(y[i], pick(a, i), pick(b, i), pick(dense, i)))

    return jax.lax.fori_loop(0, x.shape[0], body, x)


def _set(tree: dict[str, Any], path: LeafPath, value: Any) -> dict[str, Any]:
    """A copy of the nested dict `tree` with `path` set to `value` (other branches shared)."""
    head, *rest = path
    return {**tree, head: _set(tree[head], tuple(rest), value) if rest else value}


def apply_loras(params: dict[str, Any], deltas: dict[LeafPath, LeafDelta]) -> dict[str, Any]:
    """The DiT `params` (jax Arrays, e.g. `params["dit"]` of a loaded model) with `read_loras`' deltas merged
    in. A changed leaf keeps its sharding and dtype, and its old buffer is donated (updated in place): use
    the returned tree, not `params`, afterwards."""
    for path, delta in deltas.items():
        x = leaf(params, path)
        merge = jax.jit(functools.partial(_merged, stacked=delta.stacked), donate_argnums=0, out_shardings=x.sharding)
        params = _set(params, path, merge(x, *delta.arrays(x.shape if delta.stacked else (1, *x.shape))))
    return params
