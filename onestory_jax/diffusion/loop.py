"""The denoising loop: one `jax.lax.scan` over the N steps of a sigma grid."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.diffusion.schedule import sigmas_to_timesteps
from onestory_jax.diffusion.solvers import SolverName, init_state, solver_step

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]  # (x [B, ...], t_model [] float32) -> v [B, ...]


def sample(
    velocity_fn: VelocityFn,
    x_T: Array,
    sigmas: np.ndarray | Array,
    solver: SolverName = "unipc",
    timesteps: np.ndarray | Array | None = None,
    truncate_timesteps: bool = True,
    on_step: Callable[[Array], None] | None = None,
    cache: float = 0.0,
) -> Array:
    """Integrate the flow ODE from noise `x_T` [B, ...] at sigmas[0] to sigmas[-1] (normally 0).

    sigmas: [N+1] grid (see `schedule.make_schedule`); UniPC needs sigmas[0] < 1.
    timesteps: [N] model timesteps; default `sigmas[:-1] * 1000`, truncated toward zero when
        `truncate_timesteps` (Wan's and diffusers UniPC's int cast). Pass
        `make_schedule(...).timesteps` for the references' exact values.
    velocity_fn(x, t) -> v: the (guided) model velocity `eps - x0`; x in the solver dtype
        (float32, or float64 under x64), t a float32 scalar.
    on_step(i): optional host callback (via `jax.debug.callback`) before step i, e.g. a progress bar.
    cache: step caching threshold (0 = off, every step runs the model). TeaCache's rule without a
        per-model fitted polynomial: the relative L1 change of the model input x since the last step
        that ran the model is accumulated, and while it stays below `cache` the model's last output is
        reused (a `lax.cond` in the loop: no host round-trip). The first two steps and the last always run.
    Returns x_0 in x_T's dtype. Jit-friendly; `sigmas`, `solver`, `on_step` and `cache` shape the program.
    """
    n = int(np.shape(sigmas)[0]) - 1
    if n < 1:
        raise ValueError(f"sigmas must have at least 2 entries (N+1 with N >= 1), got {n + 1}")
    if not isinstance(sigmas, jax.Array):
        sigmas = np.asarray(sigmas, np.float64)  # host grid: timesteps computed in float64
        if solver == "unipc" and sigmas[0] >= 1.0:
            s0 = float(sigmas[0])
            raise ValueError(f"UniPC needs sigmas[0] < 1 (log alpha is -inf at 1), got {s0}; use a wan/diffusers grid")
    dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    if timesteps is None:
        timesteps = sigmas_to_timesteps(sigmas[:-1], truncate_timesteps)
    if np.shape(timesteps) != (n,):
        raise ValueError(f"timesteps must have shape ({n},) for {n + 1} sigmas, got {np.shape(timesteps)}")
    sig = jnp.asarray(sigmas, dtype)  # [N+1]
    ts = jnp.asarray(timesteps, jnp.float32)  # [N]

    def body(carry, _):
        state, cached = carry
        i = state.step
        if on_step is not None:
            jax.debug.callback(on_step, i)
        if cache <= 0.0:
            return (solver_step(solver, state, velocity_fn(state.x, ts[i]), sig), cached), None
        last_v, last_x, acc = cached
        acc = acc + jnp.mean(jnp.abs(state.x - last_x)) / jnp.maximum(jnp.mean(jnp.abs(last_x)), 1e-8)
        run = (i < 2) | (i == n - 1) | (acc >= cache)
        v = jax.lax.cond(run, lambda: velocity_fn(state.x, ts[i]).astype(last_v.dtype), lambda: last_v)
        cached = (v, state.x, jnp.where(run, 0.0, acc).astype(acc.dtype))
        return (solver_step(solver, state, v, sig), cached), None

    x = x_T.astype(dtype)
    cached = (jnp.zeros_like(x), x, jnp.zeros((), dtype)) if cache > 0.0 else None
    (state, _), _ = jax.lax.scan(body, (init_state(x, solver), cached), None, length=n)
    return state.x.astype(x_T.dtype)
