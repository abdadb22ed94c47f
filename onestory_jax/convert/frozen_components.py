"""Conversion of the frozen components: Wan-VAE, umT5 text encoder, CLIP image encoder.

Sources, per component: the original Wan file (`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`,
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`; a torch pickle, memory-mapped) or the
diffusers/transformers folder (`vae/`, `text_encoder/`, `image_encoder/` with safetensors). The
written checkpoint's params are the component's own tree. Its architecture comes from the folder's
config.json; an original file has none, so there it is `--config`'s section (default: the published
sizes). Either way the weights are checked against it strictly (keys and shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onestory_jax.checkpoint import check_out_dir, save_model
from onestory_jax.config import Config
from onestory_jax.config_files import load_config
from onestory_jax.convert import image_encoder as clip_map
from onestory_jax.convert import text_encoder as umt5_map
from onestory_jax.convert import vae as vae_map
from onestory_jax.convert.mapping import ModelMap
from onestory_jax.convert.safetensors_io import open_dir
from onestory_jax.convert.source_config import SourceSchema, read_json, written_config
from onestory_jax.errors import UserError
from onestory_jax.models.layers import DTYPES


@dataclasses.dataclass(frozen=True)
class Frozen:
    section: str  # Config field
    original_file: str
    diffusers_dir: str
    model: ModelMap
    config_json: SourceSchema


FROZEN = {
    "vae": Frozen("vae", "Wan2.1_VAE.pth", "vae", vae_map.VAE, vae_map.CONFIG_JSON),
    "umt5": Frozen("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth", "text_encoder", umt5_map.UMT5, umt5_map.CONFIG_JSON),
    "clip": Frozen(
        "image_encoder",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        "image_encoder",
        clip_map.CLIP,
        clip_map.CONFIG_JSON,
    ),
}


@dataclasses.dataclass
class TorchFile:
    """A torch state-dict pickle, memory-mapped: cheap `shapes`, lazy `read`."""

    path: Path

    def __post_init__(self) -> None:
        try:
            import torch
        except ImportError:
            raise UserError("reading .pth files needs torch: pip install 'onestory-jax[convert]'") from None
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise UserError(f"cannot read '{self.path}' as a torch state dict: {str(e).splitlines()[0]}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise UserError(f"'{self.path}' holds a {type(sd).__name__}, not a state dict (a mapping of names to tensors)")
        self._sd = {k: v for k, v in sd.items() if hasattr(v, "shape")}
        self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}

    def read(self, name: str) -> np.ndarray:
        t = self._sd[name]
        return t.float().numpy() if str(t.dtype) in ("torch.bfloat16", "torch.float16") else t.numpy()


def open_frozen_source(comp: Frozen, source: Path, layout: str) -> tuple[Any, str, Path]:
    """(reader with .shapes/.read, layout, the file or folder read) for a file or folder; a wrong path
    is a UserError."""
    if not source.exists():
        raise UserError(f"source '{source}' does not exist")
    candidates = []
    if source.is_file():
        candidates.append(("original", source))
    else:
        if (source / comp.original_file).is_file():
            candidates.append(("original", source / comp.original_file))
        for d in (source / comp.diffusers_dir, source):
            if d.is_dir() and any(d.glob("*.safetensors")):
                candidates.append(("diffusers", d))
                break
    if layout != "auto":
        candidates = [c for c in candidates if c[0] == layout]
    if not candidates:
        raise UserError(
            f"'{source}' holds no {comp.section} weights: expected {comp.original_file} (original) or "
            f"{comp.diffusers_dir}/*.safetensors (diffusers)"
        )
    kind, path = candidates[0]
    reader = TorchFile(path) if path.suffix in (".pth", ".pt", ".bin") else open_dir(path)
    return reader, kind, path


def source_section(comp: Frozen, base: Config, path: Path) -> Any:
    """The component's config section: the architecture from the folder's config.json when it has
    one, on `base`'s section (which keeps the runtime settings)."""
    section = getattr(base, comp.section)
    config_json = path / "config.json"
    if not config_json.is_file():
        return section
    try:
        return comp.config_json.section(read_json(config_json), section)
    except UserError as e:
        raise UserError(f"'{config_json}': {e}") from None


def convert_frozen(args: argparse.Namespace) -> int:
    """One of vae | umt5 | clip: strict, streamed, written atomically."""
    comp = FROZEN[args.component]
    out = check_out_dir(args.out, args.force)
    base = load_config(args.config) if args.config else Config()
    reader, layout, path = open_frozen_source(comp, Path(args.source), args.layout)
    section = source_section(comp, base, path)
    if hasattr(section, "param_dtype"):
        section = dataclasses.replace(section, param_dtype=args.dtype)
    config = written_config(base, comp.section, section, f"{args.component}:{Path(args.source).name}", args.config)
    if args.verify:
        from onestory_jax.convert.dit_verify import require_torch

        require_torch()
        if layout != "diffusers":
            raise UserError(
                f"--verify for {args.component} loads the transformers/diffusers module: give the "
                f"diffusers-layout source ({comp.diffusers_dir}/), or convert without --verify"
            )
    params = comp.model.convert(
        section, reader.shapes, reader.read, layout, DTYPES[args.dtype], bar=f"{args.component} ({layout})"
    )
    save_model(out, params, config, force=args.force)
    leaves = jax.tree.leaves(params)
    print(f"wrote {out}: {args.component} ({layout}), {sum(a.size for a in leaves):,} {args.dtype} params")
    if not args.verify:
        return 0
    err, rel = verify_frozen(args.component, out, reader_dir(Path(args.source), comp), config)
    from onestory_jax.convert.dit_verify import TOLERANCE

    tol = TOLERANCE[args.dtype]
    print(
        f"verify: max |ours - reference| = {err:.3e}, relative {rel:.3e} (tolerance {tol:g}): {'OK' if rel <= tol else 'FAILED'}"
    )
    return 0 if rel <= tol else 1


def reader_dir(source: Path, comp: Frozen) -> Path:
    """The diffusers/transformers folder of a component under `source` (or `source` itself)."""
    return source / comp.diffusers_dir if (source / comp.diffusers_dir).is_dir() else source


def verify_frozen(comp_name: str, out: Path, source_dir: Path, config: Config, seed: int = 0) -> tuple[float, float]:
    """Run the written checkpoint and the transformers/diffusers module from `source_dir` on one
    random input; returns (max abs error, error relative to the reference output's std)."""
    import torch

    from onestory_jax.checkpoint import restore_params
    from onestory_jax.config import MeshConfig
    from onestory_jax.models import image_encoder, text_encoder, vae
    from onestory_jax.sharding import abstract_params, make_mesh

    rng = np.random.default_rng(seed)
    mesh = make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    comp = FROZEN[comp_name]
    section = getattr(config, comp.section)
    init = comp.model.init_fn(section)
    params = jax.tree.map(lambda a: a.astype(np.float32), restore_params(out, abstract_params(init, mesh, jax.random.key(0))))
    with torch.no_grad():
        if comp_name == "vae":
            from diffusers import AutoencoderKLWan

            ref_model = AutoencoderKLWan.from_pretrained(source_dir, local_files_only=True).float().eval()
            video = rng.uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
            mu = ref_model.encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3))).latent_dist.mode().numpy()
            mean, std = vae.latent_stats(section)
            ref = (mu.transpose(0, 2, 3, 4, 1) - mean) / std
            ours = np.asarray(jax.jit(lambda p, v: vae.encode(section, p, v))(params, jnp_f32(video)))
        elif comp_name == "umt5":
            from transformers import UMT5EncoderModel

            ref_model = UMT5EncoderModel.from_pretrained(source_dir, local_files_only=True).float().eval()
            ids = rng.integers(0, section.vocab_size, (1, 12))
            ref = ref_model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
            encoder = jax.jit(text_encoder.UMT5Encoder(section).apply)
            ours = np.asarray(encoder({"params": params}, ids, np.ones_like(ids, bool)))[:, :12]
        else:
            from transformers import CLIPVisionModel

            ref_model = CLIPVisionModel.from_pretrained(source_dir, local_files_only=True).float().eval()
            px = rng.standard_normal((1, section.image_size, section.image_size, 3)).astype(np.float32)
            out_ref = ref_model(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2)), output_hidden_states=True)
            ref = out_ref.hidden_states[-2].numpy()
            ours = np.asarray(jax.jit(image_encoder.CLIPVisionTower(section).apply)({"params": params}, px))
    err = float(np.abs(ours - ref).max())
    return err, err / float(ref.std())


def jnp_f32(x: np.ndarray) -> jax.Array:
    return jax.numpy.asarray(x, jax.numpy.float32)
