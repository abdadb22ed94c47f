"""The Flax DiT against diffusers' WanTransformer3DModel with the same random weights."""

import numpy as np
import pytest
from torch_refs import (
    diffusers_dit,
    random_dit_inputs,
    run_diffusers_dit,
    state_dict_numpy,
    tiny_dit_config,
    to_original_layout,
)

from onestory_jax.config import DiTRuntime
from onestory_jax.convert.dit import convert
from onestory_jax.models.dit import WanDiT

# batch 2, odd latent frames (3), non-square latent grid (4 x 6).
BATCH, LATENT = 2, (3, 4, 6)


@pytest.fixture(scope="module", params=["i2v", "t2v"])
def reference(request):
    cfg = tiny_dit_config(request.param)
    model = diffusers_dit(cfg)
    return cfg, model, state_dict_numpy(model)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_dit_matches_diffusers(reference, layout):
    cfg, model, sd = reference
    if layout == "original":
        sd = to_original_layout(sd)
    params = convert(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, layout)
    x, text, image = random_dit_inputs(cfg, LATENT, BATCH, seed=1)
    apply = WanDiT(cfg, DiTRuntime()).apply
    for tv in (17, 500, 999):
        t = np.array([tv, tv // 2], np.int64)  # a different timestep per batch row
        ref = run_diffusers_dit(model, x, t, text, image)
        ours = np.asarray(apply({"params": params}, x, t, text, image))
        assert ours.shape == ref.shape == (BATCH, *LATENT, cfg.out_dim)
        err = np.abs(ours - ref).max() / ref.std()
        assert err < 1e-4, f"t={tv}: max error {err:.2e} relative to output std"
