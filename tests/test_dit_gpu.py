"""bf16 on GPU: the JAX DiT (cuDNN attention) vs diffusers in fp32 and in bf16. Skipped without a GPU."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from torch_refs import diffusers_dit, random_dit_inputs, run_diffusers_dit, state_dict_numpy, tiny_dit_config

from onestory_jax.config import DiTRuntime
from onestory_jax.convert.dit import convert
from onestory_jax.models.dit import WanDiT

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu" or not torch.cuda.is_available(), reason="needs a GPU")


def test_bf16_dit_close_to_fp32_reference():
    cfg = dataclasses.replace(tiny_dit_config("i2v", layers=4), num_heads=2, dim=256, ffn_dim=512)
    model = diffusers_dit(cfg)
    sd = state_dict_numpy(model)
    x, text, image = random_dit_inputs(cfg, (5, 16, 24))
    t = np.array([500, 900], np.int64)
    ref32 = run_diffusers_dit(model, x, t, text, image)
    with torch.no_grad():
        m16 = model.to("cuda", torch.bfloat16)
        out16 = m16(
            hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).cuda().bfloat16(),
            timestep=torch.from_numpy(t).cuda(),
            encoder_hidden_states=torch.from_numpy(text).cuda().bfloat16(),
            encoder_hidden_states_image=torch.from_numpy(image).cuda().bfloat16(),
            return_dict=False,
        )[0]
    torch16 = out16.float().cpu().numpy().transpose(0, 2, 3, 4, 1)
    bf = DiTRuntime(dtype="bfloat16", param_dtype="bfloat16", attention="cudnn")
    params = convert(cfg, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers", dtype=jax.numpy.bfloat16)
    ours = np.asarray(WanDiT(cfg, bf).apply({"params": params}, x, t, text, image), np.float32)
    err_ours = np.abs(ours - ref32).max() / ref32.std()
    err_torch = np.abs(torch16 - ref32).max() / ref32.std()
    print(f"bf16 max error relative to output std: jax {err_ours:.3e}, diffusers {err_torch:.3e}")
    assert err_ours < max(2 * err_torch, 2e-2)


def test_cudnn_flash_hides_empty_memory_slots_by_key_length():
    """The memory bank's empty slots, hidden by key length on cuDNN flash = masked fp32 XLA attention."""
    import jax.numpy as jnp

    from onestory_jax.models.layers import attention

    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((2, 2048, 8, 128)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray([2048, 1500], jnp.int32)
    bf = lambda a: a.astype(jnp.bfloat16)
    out = attention(bf(q), bf(k), bf(v), "cudnn", kv_lengths=lengths).astype(jnp.float32)
    ref = attention(q, k, v, "xla", kv_mask=jnp.arange(2048)[None] < lengths[:, None])
    err = float(jnp.abs(out - ref).max())
    print(f"cuDNN flash with key lengths vs masked fp32 XLA: max error {err:.2e}")
    assert err < 3e-2
