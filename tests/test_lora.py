"""LoRA on the DiT (models/layers.py Dense, models/lora.py): the published formula, a zero start, the
merge, training only the adapter, and the adapter's place in model folders."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.config import DiTConfig, DiTRuntime
from onestory_jax.config_files import load_config
from onestory_jax.errors import UserError
from onestory_jax.models import lora
from onestory_jax.models.dit import WanDiT, init_inputs
from onestory_jax.models.layers import Dense
from onestory_jax.models.onestory import init_params


def test_dense_lora_is_the_published_formula():
    """y = x W + b + (alpha / r) x A B (Hu et al. 2021), with B = 0 at init (the base layer)."""
    layer = Dense(5, ("embed", "mlp"), lora_rank=3, lora_alpha=6.0)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    params = nn_unbox(layer.init(jax.random.key(0), x)["params"])
    assert not np.any(params["lora_b"]) and np.any(params["lora_a"])
    base = x @ params["kernel"] + params["bias"]
    np.testing.assert_allclose(layer.apply({"params": params}, x), base, rtol=1e-6)
    b = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    trained = {**params, "lora_b": b}
    expected = base + (6.0 / 3) * (x @ np.asarray(params["lora_a"])) @ b
    np.testing.assert_allclose(layer.apply({"params": trained}, x), expected, rtol=1e-5, atol=1e-6)


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


LORA_CONFIG = ("tiny", ["dit.lora_rank=2", "dit.lora_alpha=4.0"])


@pytest.fixture(scope="module")
def lora_dit() -> tuple[DiTConfig, dict]:
    """(tiny DiT config with LoRA, its params with a trained adapter), made once for the file. The params are
    read, never changed, by the tests."""
    cfg = load_config(*LORA_CONFIG)
    # init_params: one jitted init (eagerly, each of its small ops compiles a program of its own, ~150 here),
    # the program the model folder test runs again (cached per config).
    params = init_params(cfg, jax.random.key(0))["dit"]
    rng = np.random.default_rng(0)  # a trained adapter: B no longer zero
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: rng.standard_normal(a.shape).astype(np.float32) * 0.1 if "lora_b" in jax.tree_util.keystr(p) else a, params
    )
    return cfg.dit, params


def test_lora_targets_the_blocks_linear_layers_only(lora_dit):
    cfg, params = lora_dit
    blocks = params["blocks"]
    assert set(blocks["self_attn"]["q"]) == {"kernel", "bias", "lora_a", "lora_b"}
    assert blocks["self_attn"]["q"]["lora_a"].shape == (cfg.num_layers, cfg.dim, 2)  # scanned: a layers axis
    assert "lora_a" in blocks["ffn"]["fc2"] and "lora_a" not in blocks["cross_attn"]["k_img"]  # not a default target
    assert not lora.has_lora({k: v for k, v in params.items() if k != "blocks"})
    with pytest.raises(UserError, match="lora_targets: qkv"):
        load_config("tiny", ["dit.lora_targets=[qkv]"])


@partial(jax.jit, static_argnums=0)
def _dit(cfg: DiTConfig, params: dict, x: dict) -> jax.Array:
    """The DiT of `cfg` on `x`: one program per config (eagerly, each small op would compile on its own)."""
    return WanDiT(cfg, DiTRuntime()).apply({"params": params}, **x)


def test_merge_computes_the_same_function(lora_dit):
    cfg, params = lora_dit
    merged, plain = lora.merge(params, cfg)
    assert plain.lora_rank == 0 and not lora.has_lora(merged)
    x = init_inputs(cfg, batch=1, latent_shape=(1, 4, 4), text_len=8, image_len=4)
    x = {k: None if v is None else jax.random.normal(jax.random.key(i), v.shape) for i, (k, v) in enumerate(x.items())}
    x["t"] = jnp.array([500.0])
    with_lora = _dit(cfg, params, x)
    folded = _dit(plain, merged, x)
    base, _ = lora.merge(params, dataclasses.replace(cfg, lora_alpha=0.0))  # the kernels alone
    without = _dit(plain, base, x)
    np.testing.assert_allclose(folded, with_lora, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(without) - np.asarray(with_lora)).max() > 1e-3  # the adapter matters


def test_fresh_lora_keeps_the_base_and_starts_at_zero(lora_dit):
    from onestory_jax.sharding import make_mesh

    cfg, params = lora_dit
    base, plain = lora.merge(params, cfg)
    mesh = make_mesh(load_config("tiny").mesh)
    fresh = lora.with_fresh_lora(base, cfg, DiTRuntime(), mesh, jax.random.key(3))
    assert lora.has_lora(fresh)
    np.testing.assert_array_equal(fresh["blocks"]["ffn"]["fc1"]["kernel"], base["blocks"]["ffn"]["fc1"]["kernel"])
    assert not np.any(fresh["blocks"]["ffn"]["fc1"]["lora_b"])
    assert jax.tree.structure(fresh) == jax.tree.structure(params)


def test_a_model_folder_with_lora_beside_its_dit_samples_with_it(tmp_path, lora_dit):
    """train.merge_lora=false exports the adapter beside the kernels (dit.lora_* in the config): the
    folder loads with it, and the DiT it computes is the adapted one."""
    from onestory_jax.checkpoint import save_model
    from onestory_jax.models.folder import folder_config, load_model
    from onestory_jax.sharding import make_mesh

    cfg = load_config(*LORA_CONFIG)
    _, dit = lora_dit
    save_model(tmp_path / "onestory", {**init_params(cfg, jax.random.key(0)), "dit": dit}, cfg)
    loaded_cfg = folder_config(tmp_path)
    assert loaded_cfg.dit.lora_rank == 2
    with pytest.warns(UserWarning, match="RANDOM"):  # no frozen parts in this folder
        params = load_model(tmp_path, loaded_cfg, make_mesh(loaded_cfg.mesh), 0, allow_random=True)
    np.testing.assert_array_equal(params["dit"]["blocks"]["self_attn"]["q"]["lora_b"], dit["blocks"]["self_attn"]["q"]["lora_b"])
