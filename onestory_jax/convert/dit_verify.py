"""`--verify` for the DiT: the written checkpoint against diffusers' `WanTransformer3DModel` on the source.

The reference is built on the meta device and takes the source tensors memory-mapped (fp32
sources are not copied); both models run the checkpoint's own config on one small random input.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onestory_jax.checkpoint import load_config_from_checkpoint, load_params, stored_keys
from onestory_jax.config import Config, DiTConfig
from onestory_jax.convert.dit import is_ignored, original_to_diffusers
from onestory_jax.convert.dit_source import DiTSource, diffusers_config
from onestory_jax.errors import UserError
from onestory_jax.models.dit import WanDiT, init_fn
from onestory_jax.sharding import activate, batch_sharding, make_mesh

# Max |ours - reference| relative to the reference output's std, by stored dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
LATENT = (3, 4, 6)  # latent frames, height, width: 18 tokens
TIMESTEP = 500
IMAGE_TOKENS = 257


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    max_abs_error: float
    output_std: float
    tolerance: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.output_std

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance

    def summary(self) -> str:
        return (
            f"verify: max |ours - diffusers| = {self.max_abs_error:.3e}, output std {self.output_std:.3e}, "
            f"relative {self.relative_error:.3e} (tolerance {self.tolerance:.0e}): "
            f"{'OK' if self.ok else 'FAILED'}"
        )


def require_torch() -> None:
    """Fail early, with the fix, when the convert extra (torch + diffusers) is not installed."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise UserError(f"--verify needs torch and diffusers ({e.name} is missing): pip install -e '.[convert]'") from None


def verify_dit(ckpt_dir: str | Path, source: DiTSource, seed: int = 0) -> VerifyResult:
    """Run the checkpoint and the diffusers reference on the same input and compare."""
    require_torch()
    cfg = load_config_from_checkpoint(ckpt_dir)
    inputs = example_inputs(cfg.dit, np.random.default_rng(seed))
    ref = run_reference(reference_model(source), inputs)
    ours = run_checkpoint(ckpt_dir, cfg, inputs)
    return VerifyResult(float(np.abs(ours - ref).max()), float(ref.std()), TOLERANCE[cfg.dit_runtime.param_dtype])


def example_inputs(cfg: DiTConfig, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    """Batch-1 channels-last latent, text and (I2V) CLIP tokens."""
    shapes = {
        "x": (1, *LATENT, cfg.in_dim),
        "text": (1, cfg.text_len, cfg.text_dim),
        "image": (1, IMAGE_TOKENS, cfg.image_dim) if cfg.has_image_branch else None,
    }
    return {k: None if s is None else rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def run_checkpoint(ckpt_dir: str | Path, cfg: Config, inputs: dict[str, np.ndarray | None]) -> np.ndarray:
    """Our DiT, fp32 compute, restored on the checkpoint's mesh; the input is repeated over the batch axes."""
    dit, rt = cfg.dit, dataclasses.replace(cfg.dit_runtime.plain(), dtype="float32", attention="xla", remat_policy="none")
    mesh = make_mesh(cfg.mesh)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = {k: None if v is None else np.repeat(v, n, axis=0) for k, v in inputs.items()}
    batch["t"] = np.full((n,), TIMESTEP, np.float32)
    if "dit" in stored_keys(ckpt_dir):  # a model folder's onestory/ part: {"dit": ...}
        params = load_params(ckpt_dir, mesh, lambda rng: {"dit": init_fn(dit, rt)(rng)})["dit"]
    else:
        params = load_params(ckpt_dir, mesh, init_fn(dit, rt))
    with activate(mesh), jax.default_matmul_precision("highest"):  # fp32 means fp32 on GPUs too (no TF32)
        batch = {k: None if v is None else jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        out = jax.jit(WanDiT(dit, rt).apply)({"params": params}, **batch)
    return np.asarray(out)


def reference_model(source: DiTSource) -> Any:
    """diffusers `WanTransformer3DModel` holding the source tensors (original names renamed)."""
    import torch
    from diffusers import WanTransformer3DModel

    if source.layout == "diffusers":
        model_config = {k: v for k, v in source.raw_config.items() if not k.startswith("_")}
        rename = {}
    else:
        model_config = diffusers_config(source.config)
        rename = original_to_diffusers(source.config)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(model_config)
    with warnings.catch_warnings():  # the mapped source is read-only; the reference never writes it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {
            rename.get(name, name): torch.from_numpy(np.asarray(source.tensors.read(name), np.float32))
            for name in source.tensors.shapes
            if not is_ignored(name, source.layout)
        }
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the RoPE tables) are not in the state dict: take them from a CPU twin
    # without blocks (they depend on the head and patch geometry only).
    twin = dict(WanTransformer3DModel.from_config({**model_config, "num_layers": 0}).named_buffers())
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, twin[name], persistent=False)
    return model.eval()


def run_reference(model: Any, inputs: dict[str, np.ndarray | None]) -> np.ndarray:
    """The diffusers model on the channels-last inputs; channels-last output of the single batch row."""
    import torch

    image = inputs["image"]
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 4, 1, 2, 3))),
            timestep=torch.tensor([TIMESTEP]),
            encoder_hidden_states=torch.from_numpy(inputs["text"]),
            encoder_hidden_states_image=None if image is None else torch.from_numpy(image),
            return_dict=False,
        )[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)
