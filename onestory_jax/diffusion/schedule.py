"""Flow-matching noise schedule: shifted sigma grids, model timesteps and training helpers.

Convention (rectified flow, as Wan2.1): `x_s = (1 - s) * x0 + s * eps`, the model predicts the
velocity `v = eps - x0`, so `x0 = x_s - s * v`. The model timestep is `t = s * 1000`.

Grids are static numpy arrays: `sigmas` has N+1 entries (the last is 0), float32 like the
references; `timesteps` has N entries and is derived from the float64 sigmas *before* the float32
cast, exactly as diffusers / Wan do, so truncation to int matches them bit for bit.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
GridName = Literal["diffusers", "wan", "euler"]
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """Timestep shift `shift * s / (1 + (shift - 1) * s)`; works on numpy and jax arrays alike."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowSchedule(NamedTuple):
    """A sampling grid: `sigmas` [N+1] float32 (last 0) and model `timesteps` [N] float32."""

    sigmas: np.ndarray
    timesteps: np.ndarray


def _finish(sigmas64: np.ndarray, timesteps: np.ndarray | None, truncate: bool) -> FlowSchedule:
    """Append sigma 0, cast to float32; timesteps default to sigma64 * 1000 (truncated if asked)."""
    if timesteps is None:
        timesteps = sigmas64 * NUM_TRAIN_TIMESTEPS
    if truncate:
        timesteps = np.trunc(timesteps)
    sigmas = np.concatenate([sigmas64, [0.0]]).astype(np.float32)
    return FlowSchedule(sigmas, np.asarray(timesteps, dtype=np.float32))


def _check_steps(steps: int, shift: float) -> None:
    if steps < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")


def diffusers_flow_schedule(steps: int, shift: float, truncate: bool = True) -> FlowSchedule:
    """Grid of diffusers `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`.

    `linspace(1, 1/1000, N+1)[:-1]`, shifted, first sigma moved to 1 - 1e-6 if it is 1 (to keep
    log(alpha) finite), then 0 appended. diffusers hands the model int64 (truncated) timesteps.
    """
    _check_steps(steps, shift)
    s = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1]
    s = shift_sigmas(s, float(shift))
    if np.fabs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    return _finish(s, None, truncate)


def wan_flow_schedule(steps: int, shift: float, truncate: bool = True) -> FlowSchedule:
    """Grid of Wan's own FlowUniPCMultistepScheduler (`set_timesteps(N, shift=shift)`).

    sigma_max is 0.999 as stored in float32 by Wan's constructor (float32(1 - 1/1000)); the grid is
    `linspace(sigma_max, 0, N+1)[:-1]`, shifted, 0 appended. Wan truncates t to int64 for the model.
    """
    _check_steps(steps, shift)
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    s = shift_sigmas(s, float(shift))
    return _finish(s, None, truncate)


def flow_match_euler_schedule(steps: int, shift: float, truncate: bool = False) -> FlowSchedule:
    """Grid of diffusers `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)` (default config).

    Its constructor already shifts the 1000-step training grid in float32, so sigma_min = shift(0.001);
    `set_timesteps` spaces N points linearly from 1 to that sigma_min and shifts them *again*.
    It starts at sigma = 1 exactly (fine for Euler, not for UniPC). Timesteps are float32 sigma * 1000.
    """
    _check_steps(steps, shift)
    f32 = np.float32
    s_min_train = f32(1.0) / f32(NUM_TRAIN_TIMESTEPS)  # float32 arithmetic, as in the torch constructor
    sigma_min = float(f32(shift) * s_min_train / (f32(1.0) + f32(shift - 1.0) * s_min_train))
    t = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    s = shift_sigmas(t / NUM_TRAIN_TIMESTEPS, float(shift))
    timesteps = s.astype(np.float32) * np.float32(NUM_TRAIN_TIMESTEPS)  # float32 product, like torch
    return _finish(s, timesteps, truncate)


def diffusers_flow_sigmas(steps: int, shift: float) -> np.ndarray:
    """[N+1] float32 sigmas of diffusers UniPC with flow sigmas (see `diffusers_flow_schedule`)."""
    return diffusers_flow_schedule(steps, shift).sigmas


def wan_flow_sigmas(steps: int, shift: float) -> np.ndarray:
    """[N+1] float32 sigmas of Wan's FlowUniPC (see `wan_flow_schedule`)."""
    return wan_flow_schedule(steps, shift).sigmas


def flow_match_euler_sigmas(steps: int, shift: float) -> np.ndarray:
    """[N+1] float32 sigmas of diffusers FlowMatchEulerDiscreteScheduler (see `flow_match_euler_schedule`)."""
    return flow_match_euler_schedule(steps, shift).sigmas


def make_schedule(grid: GridName, steps: int, shift: float, truncate: bool | None = None) -> FlowSchedule:
    """Named grid: "wan" | "diffusers" | "euler". `truncate=None` keeps the reference's own choice
    (int timesteps for wan/diffusers UniPC, float for FlowMatchEuler)."""
    makers = {"wan": wan_flow_schedule, "diffusers": diffusers_flow_schedule, "euler": flow_match_euler_schedule}
    if grid not in makers:
        raise ValueError(f"unknown sigma grid {grid!r} (known: {', '.join(makers)})")
    return makers[grid](steps, shift) if truncate is None else makers[grid](steps, shift, truncate)


def sigmas_to_timesteps(sigmas, truncate: bool = True):
    """Model timesteps `sigma * 1000`, optionally truncated toward zero (Wan's int cast).

    Works on numpy (float64 math) and jax arrays. For the exact reference timesteps of a named
    grid prefer `make_schedule(...).timesteps`, computed before the float32 rounding of sigmas.
    """
    xp = jnp if isinstance(sigmas, jax.Array) else np
    t = sigmas * NUM_TRAIN_TIMESTEPS
    return xp.trunc(t) if truncate else t


# ---------------------------------------------------------------------------------------------
# training helpers


def _bcast(sigma: Array, ndim: int) -> Array:
    """[B] -> [B, 1, ..., 1] with `ndim` dims total (scalars pass through)."""
    sigma = jnp.asarray(sigma)
    return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def sample_training_sigmas(rng: Array, shape: tuple[int, ...], shift: float, dtype=jnp.float32) -> Array:
    """Shifted-uniform training sigmas: u ~ U[0, 1), sigma = shift(u). Shape `shape`."""
    u = jax.random.uniform(rng, shape, dtype=dtype)
    return shift_sigmas(u, shift)


def add_noise(x0: Array, noise: Array, sigma: Array) -> Array:
    """x_s = (1 - s) * x0 + s * eps. x0, noise [B, ...]; sigma scalar or [B]."""
    s = _bcast(sigma, x0.ndim).astype(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Array, noise: Array) -> Array:
    """Flow-matching target v = eps - x0 (so that x0 = x_s - s * v)."""
    return noise - x0
