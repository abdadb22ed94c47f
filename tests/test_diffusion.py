"""Schedules, solvers and CFG against the independent diffusers schedulers (torch float32).

torch and diffusers are imported by the tests that compare with them: a run of the `multidevice` tests
alone collects this file without them (the two imports were 16 s of each worker's collection)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.config import SamplerConfig
from onestory_jax.diffusion import (
    add_noise,
    cfg_batch,
    diffusers_flow_schedule,
    flow_match_euler_schedule,
    guidance_weights,
    guided_velocity_fn,
    make_schedule,
    sample,
    sample_training_sigmas,
    velocity_target,
    wan_flow_schedule,
)

if TYPE_CHECKING:
    from diffusers import UniPCMultistepScheduler

SHIFT = 3.0
A, B, C = -0.7, 0.3, 0.5  # synthetic velocity v(x, t) = A x + B sin(x) + C t / 1000
STEPS = [1, 2, 5, 40]
TOL = 1e-5


def _unipc(**kw) -> UniPCMultistepScheduler:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        use_flow_sigmas=True,
        flow_shift=kw.pop("flow_shift", SHIFT),
        prediction_type="flow_prediction",
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        **kw,
    )


def _noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)  # [B=2, ...]


def _torch_run(sched, x: np.ndarray) -> np.ndarray:
    """The diffusers denoising loop with the synthetic field, float32."""
    import torch

    xt = torch.from_numpy(x.copy())
    for t in sched.timesteps:
        v = A * xt + B * torch.sin(xt) + C * t.to(torch.float32) / 1000
        xt = sched.step(v, t, xt).prev_sample
    return xt.numpy()


def _velocity(x, t):
    return A * x + B * jnp.sin(x) + C * t / 1000


@jax.jit
def _run_unipc(x, sigmas, timesteps):
    return sample(_velocity, x, sigmas, solver="unipc", timesteps=timesteps)


def _run(solver: str, x: np.ndarray, sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    fn = jax.jit(lambda x: sample(_velocity, x, sigmas, solver=solver, timesteps=timesteps))
    return np.asarray(fn(jnp.asarray(x)))


@pytest.mark.parametrize("n", STEPS)
def test_grids_match_diffusers(n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    u = _unipc()
    u.set_timesteps(n)
    ours = diffusers_flow_schedule(n, SHIFT)
    np.testing.assert_array_equal(ours.sigmas, u.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, u.timesteps.numpy().astype(np.float32))
    e = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    e.set_timesteps(n)
    ours = flow_match_euler_schedule(n, SHIFT)
    np.testing.assert_array_equal(ours.sigmas, e.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, e.timesteps.numpy())


def test_wan_grid_published_values():
    s = wan_flow_schedule(40, 3.0)
    t = s.timesteps.astype(int).tolist()
    assert t[:6] == [999, 991, 982, 973, 963, 954] and t[-3:] == [195, 136, 71]
    assert s.sigmas.shape == (41,) and s.sigmas[-1] == 0 and s.sigmas.dtype == np.float32
    d = diffusers_flow_schedule(40, 3.0).timesteps.astype(int).tolist()
    assert d[:6] == [999, 991, 982, 973, 964, 954] and d[-3:] == [197, 138, 74]


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("n", STEPS)
def test_sampling_matches_diffusers(solver, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x = _noise()
    if solver == "euler":
        ref_sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        grid = flow_match_euler_schedule(n, SHIFT)
    else:
        ref_sched = _unipc()
        grid = diffusers_flow_schedule(n, SHIFT)
    ref_sched.set_timesteps(n)
    ref = _torch_run(ref_sched, x)
    ours = _run(solver, x, grid.sigmas, grid.timesteps)
    err = float(np.max(np.abs(ours - ref)))
    print(f"{solver} N={n}: max|ours - diffusers| = {err:.3e}")
    assert np.all(np.isfinite(ours)) and err < TOL


def test_wan_grid_unipc_matches_diffusers_with_custom_sigmas():
    # Wan's FlowUniPC = diffusers UniPC fed Wan's grid (flow_shift=1 leaves custom sigmas unchanged).
    n, x = 40, _noise()
    grid = wan_flow_schedule(n, SHIFT)
    ref_sched = _unipc(flow_shift=1.0)
    ref_sched.set_timesteps(sigmas=grid.sigmas[:-1].astype(np.float64))
    np.testing.assert_array_equal(ref_sched.timesteps.numpy().astype(np.float32), grid.timesteps)
    ref = _torch_run(ref_sched, x)
    ours = np.asarray(_run_unipc(jnp.asarray(x), grid.sigmas, grid.timesteps))
    assert float(np.max(np.abs(ours - ref))) < TOL


def test_sample_defaults_and_traced_sigmas():
    # Default timesteps (truncated sigma*1000 from the float32 grid) equal the reference's for Wan's grid,
    # and sigmas may also be a traced argument.
    x = jnp.asarray(_noise())
    grid = make_schedule("wan", 5, SHIFT)
    a = jax.jit(lambda x: sample(_velocity, x, grid.sigmas))(x)
    b = _run_unipc(x, jnp.asarray(grid.sigmas), jnp.asarray(grid.timesteps))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        sample(_velocity, x, flow_match_euler_schedule(3, SHIFT).sigmas, solver="unipc")


def test_cfg():
    """Text CFG is v_u + s (v_c - v_u); memory guidance adds (m - 1)(v_c - v_no_memory); scales of 1 drop a branch."""
    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (2, 3))
    full, no_text, no_memory = jnp.array([[1.0], [2.0]]), jnp.array([[-1.0], [0.5]]), jnp.array([[0.3], [-2.0]])
    fn = lambda x, t, ctx: x * ctx + t  # noqa: E731
    vc, vu, vm = (fn(x, 0.25, c) for c in (full, no_text, no_memory))
    got = cfg_batch(fn, x, 0.25, [full, no_text], guidance_weights(4.0), None)
    np.testing.assert_allclose(got, vu + 4.0 * (vc - vu), rtol=1e-6)
    got = cfg_batch(fn, x, 0.25, [full, no_text, no_memory], guidance_weights(4.0, 3.0), None)
    np.testing.assert_allclose(got, vc + 3.0 * (vc - vu) + 2.0 * (vc - vm), rtol=1e-6)
    got = cfg_batch(fn, x, 0.25, [full, no_memory], guidance_weights(1.0, 3.0), None)
    np.testing.assert_allclose(got, vc + 2.0 * (vc - vm), rtol=1e-6)
    assert guidance_weights(1.0, 1.0) == (1.0,)
    np.testing.assert_allclose(guided_velocity_fn(fn, [full], (1.0,))(x, 0.25), vc)


def test_training_helpers():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x0, eps = jax.random.normal(k1, (4, 2, 3)), jax.random.normal(k2, (4, 2, 3))
    s = sample_training_sigmas(k3, (4,), SHIFT)
    u = jax.random.uniform(k3, (4,))
    np.testing.assert_allclose(s, SHIFT * u / (1 + (SHIFT - 1) * u), rtol=1e-6)
    assert s.shape == (4,) and bool(jnp.all((s >= 0) & (s <= 1)))
    xt, v = add_noise(x0, eps, s), velocity_target(x0, eps)
    np.testing.assert_allclose(xt, (1 - s[:, None, None]) * x0 + s[:, None, None] * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(xt - s[:, None, None] * v, x0, atol=1e-5)


def test_sampler_config():
    c = SamplerConfig()
    assert (c.solver, c.steps, c.shift, c.guidance, c.negative_prompt) == ("unipc", 40, 3.0, 5.0, "")


@pytest.mark.multidevice
def test_on_step_and_sharded_cfg_pair():
    seen = []
    x = jnp.asarray(_noise())
    grid = make_schedule("wan", 3, SHIFT)
    jax.block_until_ready(jax.jit(lambda x: sample(_velocity, x, grid.sigmas, on_step=lambda i: seen.append(int(i))))(x))
    jax.effects_barrier()
    assert seen == [0, 1, 2]

    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    fn = lambda x, t, ctx: x * ctx[:, :1, None, None] + t  # noqa: E731  x [2B, 3, 4, 5], ctx [2B, 7]
    cond, uncond = jnp.ones((2, 7)), jnp.full((2, 7), 0.5)
    got = jax.jit(lambda x: cfg_batch(fn, x, 0.1, [cond, uncond], guidance_weights(5.0), sh))(x)
    want = fn(x, 0.1, uncond) + 5.0 * (fn(x, 0.1, cond) - fn(x, 0.1, uncond))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_step_cache_skips_the_model_while_the_input_barely_moves():
    """cache=0 and a threshold no change reaches run the model every step (same result); a threshold
    every change stays under runs only steps 0, 1 and the last; a middle one, some of them."""
    from jax.experimental import io_callback

    from onestory_jax.diffusion.loop import sample

    calls = []

    def velocity(x, t):
        io_callback(lambda: calls.append(1), None, ordered=True)
        return x * 0.3 - 0.1 * jnp.sin(x) + t / 1000.0

    sched = make_schedule("wan", 12, 3.0)
    x = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 3))
    run = lambda cache: (
        calls.clear(),
        np.asarray(jax.jit(lambda x: sample(velocity, x, sched.sigmas, "unipc", sched.timesteps, cache=cache))(x)),
        len(calls),
    )[1:]
    exact, n_exact = run(0.0)
    tiny, n_tiny = run(1e-12)
    np.testing.assert_array_equal(tiny, exact)
    assert n_exact == n_tiny == 12
    coarse, n_coarse = run(1e9)
    assert n_coarse == 3 and np.isfinite(coarse).all()
    _, n_mid = run(0.05)
    assert 3 < n_mid < 12
