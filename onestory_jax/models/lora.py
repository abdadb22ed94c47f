"""LoRA on the DiT's linear layers (`layers.Dense` with `lora_rank`; `DiTConfig.lora_*`): its params
beside each targeted kernel ({"kernel", "lora_a", "lora_b"}), merged into the kernels for export,
and added fresh to a DiT that has none (a fine-tune of converted Wan weights)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from onestory_jax.config import DiTConfig, DiTRuntime
from onestory_jax.models.dit import init_fn as dit_init_fn
from onestory_jax.sharding import init_sharded

LORA_KEYS = ("lora_a", "lora_b")


def has_lora(tree: Any) -> bool:
    """Whether a (DiT) param tree holds LoRA params."""
    return isinstance(tree, dict) and any(k in LORA_KEYS or has_lora(v) for k, v in tree.items())


def merge(params: Any, cfg: DiTConfig) -> tuple[Any, DiTConfig]:
    """(DiT params with every LoRA folded into its kernel, W + (alpha / r) A B, and its config without
    LoRA): the plain DiT that computes the same function."""
    scale = cfg.lora_alpha / max(cfg.lora_rank, 1)

    def fold(tree: Any) -> Any:
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:  # kernel [..., in, out] (a leading layers axis in scanned blocks)
            a, b = tree["lora_a"], tree["lora_b"]
            delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
            kernel = (tree["kernel"].astype(jnp.float32) + delta).astype(tree["kernel"].dtype)
            return {**{k: v for k, v in tree.items() if k not in LORA_KEYS}, "kernel": kernel}
        return {k: fold(v) for k, v in tree.items()}

    return jax.jit(fold)(params), dataclasses.replace(cfg, lora_rank=0)


def _only_lora(tree: Any) -> Any:
    """The LoRA leaves of a (boxed) param tree, with their paths; other branches dropped."""
    if not isinstance(tree, dict):
        return None
    out = {k: v for k, v in tree.items() if k in LORA_KEYS}
    out.update({k: sub for k, v in tree.items() if k not in LORA_KEYS and (sub := _only_lora(v))})
    return out


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_fresh_lora(dit_params: Any, cfg: DiTConfig, rt: DiTRuntime, mesh: jax.sharding.Mesh, rng: jax.Array) -> Any:
    """A DiT without LoRA params plus fresh ones (B = 0: the same function; in `rt`'s param dtype), created in
    their sharding; the base kernels are not initialised again (XLA drops the unused random init)."""
    lora = init_sharded(lambda key: _only_lora(dit_init_fn(cfg, rt.plain())(key)), mesh, rng)
    return _deep_merge(dit_params, lora)
