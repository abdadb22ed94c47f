"""Sampling's jitted programs: parameters are arguments, never compiled-in constants; and the 14B
preset's whole story program (480p, 81 frames, 3 shots, 40 UniPC steps, onestory memory) traces on
this CPU from abstract parameters, with cuDNN flash attention as on a GPU."""

import contextlib
from unittest import mock

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks

from onestory_jax.config_files import load_config
from onestory_jax.models import frozen, onestory
from onestory_jax.sampling import components
from onestory_jax.sampling.generate import abstract_story_inputs, generation_spec, story_program
from onestory_jax.sharding import abstract_params, make_mesh

MIB = 1 << 20


def captured_constants(closed_jaxpr) -> list:
    """Every constant array a traced program captured, nested programs included."""
    found = list(closed_jaxpr.consts)
    for eqn in closed_jaxpr.jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if hasattr(sub, "consts"):
                found += captured_constants(sub)
    return found


def assert_no_params_captured(traced, params) -> None:
    consts = captured_constants(traced.jaxpr)
    ids = {id(leaf) for leaf in jax.tree.leaves(params)}
    assert not [c for c in consts if id(c) in ids], "parameters compiled in as constants"
    total = sum(np.asarray(c).nbytes for c in consts if hasattr(c, "shape"))
    assert total <= MIB, f"{total / MIB:.1f} MiB of constants captured"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    mesh = make_mesh(cfg.mesh)
    return cfg, components.random_params(cfg, mesh, 0)


def test_encoders_and_decoder_take_params_as_arguments(tiny):
    cfg, params = tiny
    ids, mask = jnp.zeros((2, cfg.text_encoder.text_len), jnp.int32), jnp.ones((2, cfg.text_encoder.text_len), jnp.int32)
    video = jnp.zeros((1, 5, 48, 32, 3))
    traced = [
        frozen.text_encoder_fn(cfg.text_encoder).trace(params["text_encoder"], ids, mask),
        frozen.vae_encode_fn(cfg.vae).trace(params["vae"], video),
        frozen.vae_decode_fn(cfg.vae).trace(params["vae"], jnp.zeros((1, 2, 6, 4, 16))),
        frozen.image_tokens_fn(cfg).trace(params, jnp.zeros((48, 32, 3))),
    ]
    for t in traced:
        assert_no_params_captured(t, params)


def test_story_program_takes_params_as_arguments(tiny):
    cfg, params = tiny
    spec = generation_spec(cfg, "onestory", None, (6, 4), steps=2, shift=3.0, solver="unipc", guidance=5.0)
    inputs = abstract_story_inputs(cfg, shots=3, latent_shape=(2, 6, 4, 16))
    assert_no_params_captured(story_program(cfg, spec).trace(params, inputs), params)


@contextlib.contextmanager
def as_on_a_gpu():
    """Let jax's cuDNN attention trace on this CPU: its version/device probes pass, its layout checks run."""
    with (
        mock.patch.object(cudnn_checks, "check_cudnn_version", lambda *a, **k: None),
        mock.patch.object(cudnn_checks, "check_compute_capability", lambda *a, **k: True),
    ):
        yield


def test_14b_story_program_traces_at_real_size():
    cfg = load_config("wan2.1-i2v-14b-480p", ["dit_runtime.attention=cudnn", "dit_runtime.param_dtype=bfloat16"])
    mesh = make_mesh(cfg.mesh)
    with as_on_a_gpu():
        params = abstract_params(onestory.init_fn(cfg, onestory.components(cfg)), mesh, jax.random.key(0))
        n_params = sum(np.prod(a.shape) for a in jax.tree.leaves(params["dit"]))
        assert 16e9 < n_params < 17e9, n_params  # Wan2.1-I2V-14B: 16.4B with its image branch
        latent = (21, 60, 104, 16)  # 81 frames of 480x832
        spec = generation_spec(cfg, "onestory", None, latent[1:3], steps=40, shift=3.0, solver="unipc", guidance=5.0)
        inputs = abstract_story_inputs(cfg, shots=3, latent_shape=latent)
        out = story_program(cfg, spec).trace(params, inputs).out_info
    assert out.latents.shape == (3, *latent)


def test_14b_encoders_trace_at_real_size():
    cfg = load_config("wan2.1-i2v-14b-480p", ["text_encoder.param_dtype=bfloat16"])
    mesh = make_mesh(cfg.mesh)
    params = abstract_params(onestory.init_fn(cfg, ["text_encoder", "vae"]), mesh, jax.random.key(0))
    tl = cfg.text_encoder.text_len
    ids = jax.ShapeDtypeStruct((4, tl), jnp.int32)
    assert frozen.text_encoder_fn(cfg.text_encoder).trace(params["text_encoder"], ids, ids).out_info.shape == (4, tl, 4096)
    z = jax.ShapeDtypeStruct((1, 21, 60, 104, 16), jnp.float32)
    assert frozen.vae_decode_fn(cfg.vae).trace(params["vae"], z).out_info.shape == (1, 81, 480, 832, 3)
