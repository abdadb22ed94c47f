"""Community LoRAs merged at load (convert/lora_formats.py) against diffusers' `load_lora_weights`, in each
key format Wan LoRAs ship in; the errors, the scale, and the story / CLI / resume plumbing."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch_refs import diffusers_dit, random_dit_inputs, run_diffusers_dit, state_dict_numpy, tiny_dit_config

from onestory_jax.config import DiTRuntime
from onestory_jax.convert.dit import convert, original_to_diffusers
from onestory_jax.convert.lora_formats import apply_loras, read_loras
from onestory_jax.errors import UserError
from onestory_jax.models.dit import WanDiT
from onestory_jax.sampling import resume
from onestory_jax.sampling.story import LoraFile, lora_from_arg, parse_story

pytest.importorskip("peft")  # diffusers' LoRA loading needs it (the `test` extra)
from diffusers.loaders import WanLoraLoaderMixin  # noqa: E402

CFG = tiny_dit_config("i2v")  # 2 blocks, dim 24, ffn 32, with the image branch (k_img, v_img)
LATENT, RANK, T = (3, 4, 6), 4, 500
BLOCK_MODULES = [f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + [
    "attn2.add_k_proj",
    "attn2.add_v_proj",
    "ffn.net.0.proj",
    "ffn.net.2",
]
# Outside the blocks: the ones diffusers' original-layout converter reads (time_projection, head, text/image MLPs)
GLOBAL_MODULES = [
    "condition_embedder.time_proj",
    "proj_out",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.image_embedder.ff.net.0.proj",
]
NORMS = ["norm2", "attn1.norm_q"]  # per block, diffusers names


class _Pipeline(WanLoraLoaderMixin):
    """What diffusers' `WanPipeline.load_lora_weights` uses of a pipeline: its transformer."""

    hf_device_map = None

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.components = {"transformer": transformer}


@pytest.fixture(scope="module")
def base():
    """(diffusers state dict, our params as jax Arrays, inputs, our jitted forward, our base output)."""
    sd = state_dict_numpy(diffusers_dit(CFG))
    params = jax.tree.map(jax.numpy.asarray, convert(CFG, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers"))
    x, text, image = random_dit_inputs(CFG, LATENT, 1, seed=1)
    apply = jax.jit(WanDiT(CFG, DiTRuntime()).apply)
    forward = lambda p: np.asarray(apply({"params": p}, x, np.array([T]), text, image))
    return sd, params, (x, text, image), forward, forward(params)


def _factors(sd: dict[str, np.ndarray], seed: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """diffusers module name -> (down [r, in], up [out, r], alpha): nonzero, random, alpha != rank (alpha / rank
    a power of 2: diffusers scales bf16 factors in bf16, exactly only then)."""
    rng = np.random.default_rng(seed)
    modules = [f"blocks.{i}.{m}" for i in range(CFG.num_layers) for m in BLOCK_MODULES] + GLOBAL_MODULES
    out = {}
    for n, m in enumerate(modules):
        out_dim, in_dim = sd[f"{m}.weight"].shape
        down = rng.standard_normal((RANK, in_dim)).astype(np.float32) * 0.2
        up = rng.standard_normal((out_dim, RANK)).astype(np.float32) * 0.2
        out[m] = (down, up, (1.0, 4.0, 8.0)[n % 3])
    return out


def _original(module: str) -> str:
    """The original Wan module name of a diffusers one (the converter's own table)."""
    table = {d: o for o, d in original_to_diffusers(CFG).items()}
    return table[f"{module}.weight"].removesuffix(".weight")


def diffusers_file(sd, path):
    """diffusers / PEFT keys with lora_B biases; alpha in diffusers' `lora_adapter_metadata` header (one global,
    one per pattern)."""
    rng = np.random.default_rng(4)
    tensors = {}
    for m, (down, up, _) in _factors(sd).items():
        tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"] = down, up
        tensors[f"transformer.{m}.lora_B.bias"] = rng.standard_normal(up.shape[0]).astype(np.float32) * 0.05
    config = {
        "r": RANK,
        "lora_alpha": 2.0,
        "alpha_pattern": {"blocks.1.ffn.net.2": 8.0},
        "lora_bias": True,
        "target_modules": sorted(_factors(sd)),
    }
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})})


def kohya_file(sd, path):
    """kohya / musubi keys (blocks only, every module with its alpha: diffusers' converter requires them)."""
    tensors = {}
    for m, (down, up, alpha) in _factors(sd).items():
        if m.startswith("blocks."):
            key = "lora_unet_" + _original(m).replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, path)


def original_file(sd, path, down_up=("lora_down", "lora_up")):
    """Original Wan keys as lightx2v / ComfyUI write them, in bf16: factors with alphas in the blocks, without
    outside; `.diff_b` bias deltas; all-zero `.diff` norm deltas (diffusers drops those)."""
    rng = np.random.default_rng(5)
    tensors = {}
    for m, (down, up, alpha) in _factors(sd).items():
        key = f"diffusion_model.{_original(m)}"
        tensors[f"{key}.{down_up[0]}.weight"], tensors[f"{key}.{down_up[1]}.weight"] = down, up
        tensors[f"{key}.diff_b"] = rng.standard_normal(up.shape[0]).astype(np.float32) * 0.05
        if m.startswith("blocks."):
            tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    for i in range(CFG.num_layers):
        for norm in NORMS:
            tensors[f"diffusion_model.{_original(f'blocks.{i}.{norm}')}.diff"] = np.zeros_like(sd[f"blocks.{i}.{norm}.weight"])
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, path)


FORMATS = {
    "diffusers": diffusers_file,
    "kohya": kohya_file,
    "original": original_file,
    "original-lora_A": lambda sd, path: original_file(sd, path, ("lora_A", "lora_B")),
}


def diffusers_output(base, path, scale: float) -> np.ndarray:
    """diffusers' WanTransformer3DModel output with the LoRA loaded by `load_lora_weights` at `scale`."""
    model = diffusers_dit(CFG)
    _Pipeline(model).load_lora_weights(str(path), adapter_name="x")
    model.set_adapters(["x"], [scale])
    return run_diffusers_dit(model, *base[2][:1], np.array([T]), *base[2][1:])


def merged(base, path, scale: float):
    """Our params with the LoRA merged (into a copy: the merge donates the leaves it changes)."""
    return apply_loras(jax.tree.map(lambda a: a.copy(), base[1]), read_loras([(path, scale)], CFG, DiTRuntime()))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / b.std())


@pytest.mark.parametrize("fmt,scale", [(f, 1.0) for f in FORMATS] + [("kohya", 0.5), ("original", -0.7)])
def test_merged_lora_matches_diffusers(base, tmp_path, fmt, scale):
    path = tmp_path / f"{fmt}.safetensors"
    FORMATS[fmt](base[0], path)
    ref = diffusers_output(base, path, scale)
    assert rel_err(ref, base[4]) > 1e-2, "the LoRA must change diffusers' output, or the test proves nothing"
    ours = base[3](merged(base, path, scale))
    assert rel_err(ours, ref) < 1e-4


def test_scale_zero_is_the_base_model(base, tmp_path):
    path = tmp_path / "kohya.safetensors"
    kohya_file(base[0], path)
    params = merged(base, path, 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base[1])))
    assert np.array_equal(base[3](params), base[4])


def test_norm_diff_and_modulation_diff_add_to_their_leaves(base, tmp_path):
    """Nonzero `.diff` on a norm and a block's modulation table, `.diff_b` on a norm's bias (diffusers drops
    norm diffs: checked against the params)."""
    rng = np.random.default_rng(0)
    d_norm, d_bias, d_mod = (rng.standard_normal(s).astype(np.float32) for s in ((24,), (24,), (1, 6, 24)))
    path = tmp_path / "diff.safetensors"
    save_file(
        {
            "diffusion_model.blocks.1.norm3.diff": d_norm,
            "diffusion_model.blocks.1.norm3.diff_b": d_bias,
            "diffusion_model.blocks.0.modulation.diff": d_mod,
        },
        path,
    )
    params, blocks = merged(base, path, 2.0)["blocks"], base[1]["blocks"]
    np.testing.assert_allclose(params["norm_cross"]["scale"][1], blocks["norm_cross"]["scale"][1] + 2 * d_norm, rtol=1e-6)
    np.testing.assert_allclose(params["norm_cross"]["bias"][1], blocks["norm_cross"]["bias"][1] + 2 * d_bias, rtol=1e-6)
    np.testing.assert_allclose(params["modulation"][0], blocks["modulation"][0] + 2 * d_mod[0], rtol=1e-6)
    np.testing.assert_array_equal(params["norm_cross"]["scale"][0], blocks["norm_cross"]["scale"][0])


def test_alpha_keys_in_diffusers_format_equal_kohya(base, tmp_path):
    """`.alpha` keys beside PEFT names (no header) merge as kohya's alphas do; absent alpha = rank."""
    factors = _factors(base[0])
    tensors = {}
    for m, (down, up, alpha) in factors.items():
        tensors |= {f"transformer.{m}.lora_A.weight": down, f"transformer.{m}.lora_B.weight": up}
        if m.startswith("blocks."):
            tensors[f"transformer.{m}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, tmp_path / "peft.safetensors")
    kohya_file(base[0], tmp_path / "kohya.safetensors")
    peft = read_loras([(tmp_path / "peft.safetensors", 1.0)], CFG, DiTRuntime())
    kohya = read_loras([(tmp_path / "kohya.safetensors", 1.0)], CFG, DiTRuntime())
    q = ("blocks", "self_attn", "q", "kernel")
    np.testing.assert_allclose(peft[q].arrays((2, 24, 24))[1], kohya[q].arrays((2, 24, 24))[1], rtol=1e-6)
    head = peft[("head", "kernel")].arrays((1, 24, 64))
    down, up, _ = factors["proj_out"]
    np.testing.assert_allclose(head[0][0] @ head[1][0], (up @ down).T, rtol=1e-5, atol=1e-7)  # alpha = rank: scale 1


def _one_line_error(path, fragment: str) -> None:
    with pytest.raises(UserError) as e:
        read_loras([(path, 1.0)], CFG, DiTRuntime())
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unmatched_keys_are_one_line(base, tmp_path):
    path = tmp_path / "bad.safetensors"
    down, up, _ = _factors(base[0])["blocks.0.attn1.to_q"]
    save_file(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": down,
            "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
            "transformer.blocks.7.attn1.to_q.lora_A.weight": down,  # no block 7 in this model
            "transformer.blocks.0.attn1.to_q.lora_magnitude_vector": up[:, 0],
        },
        path,
    )  # DoRA
    _one_line_error(
        path,
        "2 key(s) match no layer of this Wan2.1 I2V DiT (2 blocks): transformer.blocks.0.attn1.to_q."
        "lora_magnitude_vector, transformer.blocks.7.attn1.to_q.lora_A.weight",
    )


def test_lora_that_does_not_fit_is_one_line(base, tmp_path):
    path = tmp_path / "other_model.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.ffn.0.lora_down.weight": np.ones((RANK, 40), np.float32),
            "diffusion_model.blocks.0.ffn.0.lora_up.weight": np.ones((32, RANK), np.float32),
        },
        path,
    )
    _one_line_error(path, "blocks.0.ffn.0: lora_down [4, 40] and lora_up [32, 4] do not fit its weight [out 32, in 24]")
    save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": np.ones((RANK, 24), np.float32)}, path)
    _one_line_error(path, "blocks.0.ffn.0 has no lora_up weight")
    save_file({"diffusion_model.blocks.0.norm3.diff": np.ones(7, np.float32)}, path)
    _one_line_error(path, "diffusion_model.blocks.0.norm3.diff is [7], its tensor [24]")


def test_story_lora_setting_and_cli_argument(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"")
    story = parse_story(
        {"settings": {"lora": ["style.safetensors", {"path": "style.safetensors", "scale": 0.5}]}, "shots": ["a"]},
        "s.yaml",
        tmp_path,
    )
    assert story.settings.lora == (LoraFile(tmp_path / "style.safetensors", 1.0), LoraFile(tmp_path / "style.safetensors", 0.5))
    for bad, message in (
        ({"path": "missing.safetensors"}, "settings.lora[1].path: file"),
        ({"path": "style.safetensors", "scale": "x"}, "settings.lora[1].scale: expected"),
        ({"file": "style.safetensors"}, "settings.lora[1].file: unknown field"),
    ):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_story({"settings": {"lora": [bad]}, "shots": ["a"]}, "s.yaml", tmp_path)
    path = tmp_path / "style.safetensors"
    assert lora_from_arg(f"{path}:0.8") == LoraFile(path, 0.8) and lora_from_arg(str(path)) == LoraFile(path, 1.0)
    with pytest.raises(UserError, match="does not exist"):
        lora_from_arg(f"{tmp_path}/nope.safetensors:2")


def test_lora_file_and_scale_are_in_the_model_identity(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"1")
    b.write_bytes(b"1")
    ident = lambda loras: resume.model_identity(None, {}, 0, loras=loras)
    assert ident([(a, 1.0)]) == ident([(b, 1.0)]), "by content, not by name"
    assert len({ident([]), ident([(a, 1.0)]), ident([(a, 0.5)]), ident([(a, 1.0), (a, 1.0)])}) == 4
    before = ident([(a, 1.0)])
    a.write_bytes(b"2")
    assert ident([(a, 1.0)]) != before
