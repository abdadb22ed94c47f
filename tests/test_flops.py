"""The FLOP model of models/flops.py (training MFU, benchmarks) against XLA's own count."""

import jax

from onestory_jax.config import DiTConfig, DiTRuntime
from onestory_jax.models.dit import WanDiT, init_inputs
from onestory_jax.models.flops import dit_forward_flops, peak_flops


def test_flop_model_matches_xla_cost_analysis():
    """The MFU's FLOP model against XLA's count of the compiled forward (one layer: XLA counts a
    scanned stack's body once); XLA also counts the elementwise ops the model leaves out."""
    cfg = DiTConfig(
        model_type="t2v", in_dim=16, dim=256, ffn_dim=1024, num_heads=4, num_layers=1, text_dim=64, image_dim=None, text_len=32
    )
    x = init_inputs(cfg, 1, (4, 32, 32), text_len=32)
    model = WanDiT(cfg, DiTRuntime())
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x["x"], x["t"], x["text"]))
    cost = jax.jit(model.apply).lower(params, x["x"], x["t"], x["text"]).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 1.0 < xla / dit_forward_flops(cfg, 4 * 16 * 16, 32) < 1.1
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("cpu") is None
