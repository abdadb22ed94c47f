"""Sharded DiT forward on 8 forced host devices equals the single-device result; the full-size frozen encoders'
big parameters shard on fsdp."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.config import DiTRuntime, MeshConfig
from onestory_jax.config_files import load_config
from onestory_jax.errors import UserError
from onestory_jax.models.dit import WanDiT, init_fn
from onestory_jax.sharding import (
    abstract_params,
    activate,
    batch_sharding,
    check_params_sharded,
    init_sharded,
    make_mesh,
    param_shardings,
    replicated_large_params,
)

pytestmark = pytest.mark.multidevice  # meshes over the 8 host devices (tests/conftest.py)
MESHES = {
    "data": MeshConfig(data=8, fsdp=1, sequence=1, tensor=1),
    "fsdp_tensor": MeshConfig(data=1, fsdp=4, sequence=1, tensor=2),
    "sequence_tensor": MeshConfig(data=1, fsdp=1, sequence=4, tensor=2),
    "data_fsdp_tensor": MeshConfig(data=2, fsdp=2, sequence=1, tensor=2),
}


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) == 8, "conftest forces 8 host devices"
    cfg, rt = load_config("tiny").dit, DiTRuntime()
    params = nn.meta.unbox(jax.jit(init_fn(cfg, rt))(jax.random.key(0)))
    rng = np.random.default_rng(0)
    b = 8
    inputs = (
        rng.standard_normal((b, 2, 4, 8, cfg.in_dim)).astype(np.float32),  # 2*2*4 = 16 tokens
        np.linspace(0, 999, b).astype(np.float32),
        rng.standard_normal((b, 512, cfg.text_dim)).astype(np.float32),
        rng.standard_normal((b, 257, cfg.image_dim)).astype(np.float32),
    )
    ref = np.asarray(jax.jit(WanDiT(cfg, rt).apply)({"params": params}, *inputs))
    return cfg, params, inputs, ref


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_matches_single_device(setup, mesh_name):
    cfg, params, inputs, ref = setup
    rt = DiTRuntime(sequence_parallel="gspmd")  # 2 heads cannot split over 4 (Ulysses: test_sequence_parallel)
    mesh = make_mesh(MESHES[mesh_name])
    shardings = nn.meta.unbox(param_shardings(jax.eval_shape(init_fn(cfg, rt), jax.random.key(0)), mesh))
    with activate(mesh):
        p = jax.device_put(params, shardings)
        x = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in inputs]
        out = jax.jit(WanDiT(cfg, rt).apply)({"params": p}, *x)
    assert not out.sharding.is_fully_replicated or mesh_name == "sequence_tensor"
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_params_created_in_their_sharding(setup):
    cfg = setup[0]
    mesh = make_mesh(MESHES["fsdp_tensor"])
    params = init_sharded(init_fn(cfg, DiTRuntime()), mesh, jax.random.key(0))
    q = params["blocks"]["self_attn"]["q"]["kernel"]  # [layers, embed, heads]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (cfg.num_layers, cfg.dim // 4, cfg.dim // 2)


def test_full_size_params_are_sharded_on_fsdp():
    cfg = load_config("wan2.1-i2v-14b-480p")
    mesh = make_mesh(MeshConfig(fsdp=-1))
    abstract = abstract_params(init_fn(cfg.dit, cfg.dit_runtime), mesh, jax.random.key(0))  # no allocation
    check_params_sharded(abstract, mesh)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
    assert abs(n - 16.395e9) / 16.395e9 < 1e-3  # the published I2V-14B parameter count


def test_replication_check_fails_on_a_replicated_large_param():
    mesh = make_mesh(MeshConfig(fsdp=-1))
    big = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with pytest.raises(AssertionError, match="replicated"):
        check_params_sharded({"w": big}, mesh)


@pytest.mark.parametrize("cfg", [MeshConfig(data=3, fsdp=-1), MeshConfig(data=-1, fsdp=-1), MeshConfig(data=16, fsdp=1)])
def test_bad_mesh_is_a_clear_error(cfg):
    with pytest.raises(UserError):
        make_mesh(cfg)


def sharded_full_size(init) -> dict:
    """Abstract params of a full-size init on an fsdp-only mesh, checked to replicate no big parameter."""
    mesh = make_mesh(MeshConfig(fsdp=-1))
    abstract = abstract_params(init, mesh, jax.random.key(0))
    assert replicated_large_params(abstract, mesh) == []
    return abstract


def test_full_size_umt5_shards_its_big_params_on_fsdp():
    from onestory_jax.config import TextEncoderConfig
    from onestory_jax.models import text_encoder

    abstract = sharded_full_size(text_encoder.init_fn(TextEncoderConfig()))
    assert sum(np.prod(a.shape) for a in jax.tree.leaves(abstract)) == pytest.approx(5.68e9, rel=1e-3)


def test_full_size_clip_shards_its_big_params_on_fsdp():
    from onestory_jax.config import ImageEncoderConfig
    from onestory_jax.models import image_encoder

    abstract = sharded_full_size(image_encoder.init_fn(ImageEncoderConfig()))
    assert abstract["position_embedding"].shape == (257, 1280)  # ViT-H/14 at 224: 16 x 16 patches + the class token
