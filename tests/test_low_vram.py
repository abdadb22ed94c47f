"""Low-VRAM sampling switches (docs/performance.md "Low VRAM"): fp8 DiT kernels, tiled VAE decode, the text
encoder on the host CPU, the DiT's blocks in host memory; all on tiny models, fp32 unless fp8."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from test_vae import TINY, diffusers_vae
from torch_refs import state_dict_numpy

from onestory_jax.config import DiTRuntime
from onestory_jax.config_files import load_config
from onestory_jax.convert.vae import convert_vae
from onestory_jax.errors import UserError
from onestory_jax.models import lowvram
from onestory_jax.models.dit import WanDiT, init_fn, init_inputs
from onestory_jax.models.frozen import decode_video
from onestory_jax.models.layers import Dense
from onestory_jax.sampling.components import load_for_sampling
from onestory_jax.sampling.pipeline import render_story
from onestory_jax.sampling.story import MemorySettings, Settings, Shot, Story
from onestory_jax.sharding import activate, make_mesh

# e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most half an ulp, 2^-4 = 6.25% of a value, and by
# 2.65% RMS (uniform within the ulp, mantissas log-uniform in [1, 2)). A layer's output sums in-x-out products
# whose rounding errors are independent: its relative RMS error is that RMS, not the 6.25% worst case.
FP8_ELEMENT_MAX, FP8_ELEMENT_RMS = 2.0**-4, 0.0265


def rel_rms(a, b) -> float:
    """RMS of a - b over the RMS of b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def test_quantizer_matches_ml_dtypes_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 40)).astype(np.float32) * np.geomspace(1e-3, 30, 40, dtype=np.float32)
    w[1, :, 7] = 0.0  # an all-zero channel: scale 1, zeros
    q, scale = (np.asarray(a) for a in lowvram.quantize_fp8(jnp.asarray(w)))
    amax = np.abs(w).max(axis=-2)
    np.testing.assert_allclose(scale, np.where(amax > 0, amax / 448.0, 1.0), rtol=1e-6)
    reference = (w / scale[:, None, :]).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even, as ml_dtypes does
    assert q.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(q.view(np.uint8), reference.view(np.uint8))
    assert np.abs(q.astype(np.float32)).max(axis=-2)[amax > 0].min() == 448.0  # each channel's peak is e4m3's largest
    deq = q.astype(np.float32) * scale[:, None, :]
    nonzero = np.abs(w) > 2.0**-6 * scale[:, None, :]  # normal e4m3 values (subnormals keep absolute precision)
    err = np.abs(deq - w)[nonzero] / np.abs(w)[nonzero]
    assert err.max() <= FP8_ELEMENT_MAX * (1 + 1e-6)
    assert 0.8 * FP8_ELEMENT_RMS < np.sqrt(np.mean(err**2)) < 1.2 * FP8_ELEMENT_RMS


def test_fp8_dense_error_is_the_rounding_rms():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((256, 512)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((512, 96)) * np.geomspace(0.01, 1, 96), jnp.float32)
    exact = Dense(96, (None, None), use_bias=False).apply({"params": {"kernel": kernel}}, x)
    q, scale = lowvram.quantize_fp8(kernel)
    fp8 = Dense(96, (None, None), use_bias=False, fp8=True).apply({"params": {"kernel": q, "scale": scale}}, x)
    assert 0.7 * FP8_ELEMENT_RMS < rel_rms(fp8, exact) < 1.3 * FP8_ELEMENT_RMS


@functools.cache
def perturbed_dit_params(cfg, seed: int = 0):
    """Tiny DiT params (stored: fp32, no fp8) with every leaf (zero biases, unit norms too) perturbed, so every
    weight matters. Made once per config and seed in a process, in one program (eagerly, each leaf's noise would
    compile programs of its own); the tests only read them."""

    def make(key: jax.Array):
        params = nn.meta.unbox(init_fn(cfg, DiTRuntime())(key))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])

    return jax.jit(make)(jax.random.key(seed))


@functools.cache
def dit_apply(cfg, rt: DiTRuntime):
    """jit (params, inputs) -> the DiT's output, one per config and runtime (eagerly, the forward's small ops
    would compile one by one: ~200 programs)."""
    return jax.jit(lambda p, i: WanDiT(cfg, rt).apply({"params": p}, **i))


def dit_inputs(cfg, seed: int = 0):
    rng = np.random.default_rng(seed)
    inputs = init_inputs(cfg, batch=2, latent_shape=(2, 6, 4), text_len=8, image_len=4)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in inputs.items()}
    return {**inputs, "t": jnp.asarray([500.0, 900.0])}


@pytest.mark.parametrize("layers", ["ffn", "all"])
def test_fp8_dit_forward_close_to_fp32(layers):
    cfg = load_config("tiny").dit
    fp8 = DiTRuntime(weights_dtype="fp8", fp8_layers=layers)
    params, inputs = perturbed_dit_params(cfg), dit_inputs(cfg)
    quantized = jax.jit(lowvram.quantize_dit, static_argnums=1)(params, fp8)  # as lowvram.place_dit runs it
    kernels = jax.tree_util.tree_flatten_with_path(quantized["blocks"])[0]
    in_fp8 = {jax.tree_util.keystr(p[:-1]) for p, a in kernels if a.dtype == jnp.float8_e4m3fn}
    expected = {"ffn": 2, "all": 2 + 4 + 6}[layers]  # fc1 fc2; + self q k v o; + cross q k v o k_img v_img
    assert len(in_fp8) == expected, in_fp8
    assert all(str(p[-1].key) == "kernel" for p, a in kernels if a.dtype == jnp.float8_e4m3fn)
    exact = dit_apply(cfg, DiTRuntime())(params, inputs)
    ours = dit_apply(cfg, fp8)(quantized, inputs)
    err = rel_rms(ours, exact)
    # Each quantized layer errs by ~2.65% RMS of its output (above); the residual stream adds the unquantized
    # parts, so the DiT's output errs by less. 1e-3 from below: the kernels really are rounded to fp8.
    assert 1e-3 < err < FP8_ELEMENT_RMS * 1.5, err


def test_fp8_abstract_tree_matches_the_quantized_one():
    cfg, rt = load_config("tiny").dit, DiTRuntime(weights_dtype="fp8", fp8_layers="all")
    mesh = make_mesh(load_config("tiny").mesh)
    params = lowvram.place_dit(perturbed_dit_params(cfg), cfg, rt, mesh)
    abstract = lowvram.abstract_dit(cfg, rt, mesh)
    same = jax.tree.map(lambda a, s: (a.shape, a.dtype, a.sharding) == (s.shape, s.dtype, s.sharding), params, abstract)
    assert all(jax.tree.leaves(same))


def test_tiled_decode_matches_diffusers_tiled_decode():
    """Tiles of 32 px (4 latents) every 24 px on a 48x72 frame (6x9 latents): 2 x 3 tiles, overlaps blended."""
    cfg = dataclasses.replace(TINY["diffusers_test"], tile=32)
    model = diffusers_vae(cfg)
    sd = state_dict_numpy(model)
    params = convert_vae(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    latents = np.random.default_rng(0).standard_normal((1, 3, 6, 9, cfg.z_dim)).astype(np.float32)
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)
    model.enable_tiling(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24
    )
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents * std + mean).permute(0, 4, 1, 2, 3)).sample
    ref = ref.permute(0, 2, 3, 4, 1).numpy()
    tiled = decode_video(cfg, params, latents)  # what sample.py's decode runs: tile by tile from the host
    whole = decode_video(dataclasses.replace(cfg, tile=0), params, latents)
    assert tiled.shape == ref.shape == (1, 9, 48, 72, 3)
    assert np.abs(tiled - ref).max() < 1e-4 * ref.std()  # the same tiles, blends and order as diffusers
    # Tiles really were decoded apart: this random VAE sees far past a 32 px tile, so tiling changes its output.
    assert rel_rms(tiled, whole) > 0.05
    one_tile = dataclasses.replace(cfg, tile=96)  # a tile as large as the frame: no tiling at all
    np.testing.assert_allclose(decode_video(one_tile, params, latents), whole, rtol=0, atol=1e-6)


def test_vae_tile_must_be_whole_latents():
    with pytest.raises(UserError, match="vae.tile"):
        load_config("wan2.1-i2v-14b-480p", ["vae.tile=200"])
    assert load_config("wan2.1-i2v-14b-480p", ["vae.tile=256"]).vae.tile == 256


def test_offloaded_blocks_live_in_host_memory_and_compute_the_same():
    cfg, offload, plain = load_config("tiny").dit, DiTRuntime(offload="blocks"), DiTRuntime()
    mesh = make_mesh(load_config("tiny").mesh)
    params, inputs = perturbed_dit_params(cfg), dit_inputs(cfg)
    with activate(mesh):
        placed = lowvram.place_dit(params, cfg, offload, mesh)
        kinds = {k: {a.sharding.memory_kind for a in jax.tree.leaves(v)} for k, v in placed.items()}
        assert kinds.pop("blocks") == {"pinned_host"} and all(v == {"device"} for v in kinds.values()), kinds
        reference = lowvram.place_dit(params, cfg, plain, mesh)  # the same shardings, in device memory
        ours = dit_apply(cfg, offload)(placed, inputs)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(dit_apply(cfg, plain)(reference, inputs)))
        # On a GPU the layer scan moves each layer's slice to the device: lowered for CUDA (on this CPU), the
        # params arrive in host memory and every block leaf is annotated for device placement inside the loop.
        text = dit_apply(cfg, offload).trace(placed, inputs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count('mhlo.memory_kind = "pinned_host"') == len(jax.tree.leaves(placed["blocks"]))
    body = text[text.index("stablehlo.while") :]
    assert body.count('_xla_buffer_placement = "device"') >= len(jax.tree.leaves(placed["blocks"]))


def test_story_renders_with_every_low_vram_switch(tmp_path):
    """fp8 (all layers), blocks in host memory, captions encoded on the host CPU, tiled decode: sample.py's load
    and render path end to end on the tiny preset (48x32 frames, tiles of 32 px)."""
    switches = [
        "dit_runtime.weights_dtype=fp8",
        "dit_runtime.fp8_layers=all",
        "dit_runtime.offload=blocks",
        "text_encoder.device=cpu",
        "vae.tile=32",
    ]
    cfg, params, comps, mesh = load_for_sampling(None, "tiny", switches, seed=0)
    assert "text_encoder" not in params  # only the components hold it, on the host
    base_comps = load_for_sampling(None, "tiny", [], seed=0)[2]
    captions = ["a red square", "the same square, later"]
    np.testing.assert_allclose(comps.encode_text(captions), base_comps.encode_text(captions), rtol=1e-5, atol=1e-6)
    story = Story(
        settings=Settings(width=32, height=48, frames=5, steps=2, guidance=3.0, solver="unipc"),
        memory=MemorySettings(strategy="onestory"),
        shots=tuple(Shot(c) for c in captions),
    )
    with activate(mesh):
        manifest = render_story(cfg, params, comps, story, tmp_path, progress=False, mesh=mesh)
    assert len(manifest["shots"]) == 2 and (tmp_path / "story.mp4").is_file()
    assert manifest["config"]["dit_runtime"]["weights_dtype"] == "fp8" and manifest["config"]["vae"]["tile"] == 32


def test_model_folder_loads_through_the_host(tmp_path):
    """models/demo read with fp8 + offload + the text encoder on the CPU: the DiT read on the host, quantized, put on
    the mesh (blocks in host memory), the memory modules moved to the mesh; its velocity close to the plain load's."""
    from pathlib import Path

    from onestory_jax.models.onestory import velocity

    folder = Path(__file__).resolve().parents[1] / "models" / "demo"
    switches = ["dit_runtime.weights_dtype=fp8", "dit_runtime.fp8_layers=all", "dit_runtime.offload=blocks"]
    switches.append("text_encoder.device=cpu")
    cfg, params, comps, mesh = load_for_sampling(folder, None, switches, seed=0)
    base_cfg, base, _, _ = load_for_sampling(folder, None, [], seed=0)
    mesh_devices = set(mesh.devices.flat)
    for part in ("dit", "memory"):
        assert all(a.sharding.device_set <= mesh_devices for a in jax.tree.leaves(params[part])), part
    assert {a.sharding.memory_kind for a in jax.tree.leaves(params["dit"]["blocks"])} == {"pinned_host"}
    assert params["dit"]["blocks"]["ffn"]["fc1"]["kernel"].dtype == jnp.float8_e4m3fn
    jax.tree.map(np.testing.assert_array_equal, params["memory"], base["memory"])  # read as stored, only moved
    d = cfg.dit
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((1, 2, 4, 4, d.in_dim - 16)), jnp.float32)
    text = jnp.asarray(comps.encode_text(["a red square"]))
    image = jnp.asarray(rng.standard_normal((1, cfg.image_encoder.num_tokens, d.image_dim)), jnp.float32)
    t = jnp.asarray([600.0])
    with activate(mesh):
        ours = jax.jit(lambda p: velocity(p, cfg, x, t, text, image, cond, None))(params)
        plain = jax.jit(lambda p: velocity(p, base_cfg, x, t, text, image, cond, None))(base)
    assert 1e-4 < rel_rms(ours, plain) < FP8_ELEMENT_RMS * 1.5


def test_lora_merge_is_refused_with_low_vram_switches():
    from onestory_jax.convert.lora_formats import read_loras

    cfg = load_config("tiny", ["dit_runtime.weights_dtype=fp8"])
    with pytest.raises(UserError, match="dit_runtime.weights_dtype=fp8"):
        read_loras([], cfg.dit, cfg.dit_runtime)
    assert read_loras([], cfg.dit, DiTRuntime()) == {}


def test_random_params_are_those_of_one_full_init():
    """random_params makes each part in its own init (on its own mesh when a switch moves it): the same weights as
    the one init of every part, the memory modules' patchifiers seeded from the DiT's patch embedding included."""
    from onestory_jax.models.onestory import components, init_fn
    from onestory_jax.sampling.components import random_params
    from onestory_jax.sharding import init_sharded

    cfg = load_config("tiny")
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        ours = random_params(cfg, mesh, 0)  # seed 0: the programs of sample.py --config tiny (compile cache)
        full = init_sharded(init_fn(cfg, components(cfg)), mesh, jax.random.key(0))
    assert sorted(ours) == sorted(full) == ["dit", "image_encoder", "memory", "text_encoder", "vae"]
    jax.tree.map(np.testing.assert_array_equal, ours, full)
