"""Flow-matching ODE solvers as pure, static-shape state machines (one `lax.scan` step each).

Both solvers consume the model *velocity* `v = eps - x0` at sample `x_i` (sigma_i) and produce
`x_{i+1}` (sigma_{i+1}); `sigmas` is the full [N+1] grid (last entry 0).

- Euler: `x_{i+1} = x_i + (s_{i+1} - s_i) v_i` (diffusers FlowMatchEulerDiscreteScheduler).
- UniPC: bh2, solver order 2, predict-x0, lower_order_final; the multistep predictor (UniP) plus
  corrector (UniC) of diffusers `UniPCMultistepScheduler` / Wan's FlowUniPC with flow sigmas
  (alpha = 1 - s, lambda = log(alpha) - log(s), x0 prediction m = x - s * v).

Order schedule (N steps, step i = 0..N-1): predictor order min(2, i + 1, N - i); the corrector at
step i >= 1 uses the previous predictor's order, i.e. 1 at i == 1 and 2 from i == 2 on.
The last predictor step lands on sigma = 0 (lambda = +inf) and reduces to `x_N = m_{N-1}`; it is
selected explicitly so no inf/NaN enters the arithmetic.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
SolverName = Literal["unipc", "euler"]


@flax.struct.dataclass
class SolverState:
    """Carry of the denoising scan. All tensors have the sample's shape [B, ...] (history: UniPC only)."""

    x: Array  # current sample at sigma_step (before UniPC's correction)
    step: Array  # [] int32 index i of the sigma that `x` sits at
    m_prev: Array | None = None  # x0 prediction of step i-1 (UniPC)
    m_prev2: Array | None = None  # x0 prediction of step i-2 (UniPC)
    last_sample: Array | None = None  # corrected sample of step i-1, input of the last predictor (UniPC)


def init_state(x: Array, solver: SolverName = "unipc") -> SolverState:
    """Initial state for the noise `x` [B, ...] at sigmas[0]."""
    step = jnp.zeros((), jnp.int32)
    if solver == "euler":
        return SolverState(x=x, step=step)
    if solver == "unipc":
        z = jnp.zeros_like(x)
        return SolverState(x=x, step=step, m_prev=z, m_prev2=z, last_sample=z)
    raise ValueError(f"unknown solver {solver!r} (known: unipc, euler)")


def euler_step(state: SolverState, model_output: Array, sigmas: Array) -> SolverState:
    """x_{i+1} = x_i + (s_{i+1} - s_i) * v_i. model_output [B, ...] is the velocity at x_i."""
    i = state.step
    sigmas = jnp.asarray(sigmas, state.x.dtype)
    dt = sigmas[i + 1] - sigmas[i]
    x = state.x + dt * model_output.astype(state.x.dtype)
    return state.replace(x=x, step=i + 1)


def _lam(sigma: Array) -> Array:
    """Half log-SNR of flow sigmas: log(1 - s) - log(s)."""
    return jnp.log(1 - sigma) - jnp.log(sigma)


def _phi_coeffs(h: Array, r1: Array) -> tuple[Array, Array, Array]:
    """bh2 scalars for step size h (predict-x0, so hh = -h): (phi1 = expm1(-h), B = phi1, rho) where
    rho = (rho0, rho1) solves [[1, 1], [r1, 1]] rho = (b1, b2) (the order-2 corrector weights)."""
    hh = -h
    phi1 = jnp.expm1(hh)
    b_h = phi1  # bh2
    h_phi_k = phi1 / hh - 1
    b1 = h_phi_k / b_h
    h_phi_k = h_phi_k / hh - 0.5
    b2 = h_phi_k * 2 / b_h
    rho0 = (b1 - b2) / (1 - r1)
    rho1 = b1 - rho0
    return phi1, b_h, jnp.stack([rho0, rho1])


def unipc_step(state: SolverState, model_output: Array, sigmas: Array) -> SolverState:
    """One UniPC (bh2, order 2, predict-x0, lower_order_final) step for flow sigmas.

    model_output [B, ...]: velocity at `state.x` (sigma_i). Corrects `x_i` with the new x0
    prediction (i >= 1), then predicts `x_{i+1}`. `sigmas` [N+1] static-length, last entry 0,
    first entry < 1.
    """
    dtype = state.x.dtype
    sigmas = jnp.asarray(sigmas, dtype)
    n = sigmas.shape[0] - 1  # static number of steps
    i = state.step
    im1, im2 = jnp.maximum(i - 1, 0), jnp.maximum(i - 2, 0)
    s_i, s_im1, s_im2, s_next = sigmas[i], sigmas[im1], sigmas[im2], sigmas[i + 1]
    a_i, a_next = 1 - s_i, 1 - s_next
    lam_i, lam_im1, lam_im2 = _lam(s_i), _lam(s_im1), _lam(s_im2)
    final = s_next == 0
    lam_next = jnp.where(final, lam_i + 1, _lam(jnp.where(final, 0.5, s_next)))  # dummy finite value when final

    x = state.x
    m_i = x - s_i * model_output.astype(dtype)  # x0 prediction at the (uncorrected) sample
    m1, m2 = state.m_prev, state.m_prev2

    # ---- corrector (UniC), order 1 at i == 1, order 2 at i >= 2, none at i == 0
    use_c = i >= 1
    c_order2 = i >= 2
    h_c = jnp.where(use_c, lam_i - lam_im1, 1.0)
    r1_c = jnp.where(c_order2, (lam_im2 - lam_im1) / h_c, 0.5)
    phi1_c, b_c, rho_c = _phi_coeffs(h_c, r1_c)
    base_c = (s_i / jnp.where(use_c, s_im1, 1.0)) * state.last_sample - (a_i * phi1_c) * m1
    d1_t = m_i - m1
    corr2 = rho_c[0] * ((m2 - m1) / r1_c) + rho_c[1] * d1_t
    corr1 = 0.5 * d1_t
    x_c = base_c - (a_i * b_c) * jnp.where(c_order2, corr2, corr1)
    x = jnp.where(use_c, x_c, x)

    # ---- predictor (UniP), order min(2, i + 1, N - i)
    p_order2 = (i >= 1) & (i < n - 1)
    h_p = lam_next - lam_i
    r1_p = jnp.where(p_order2, (lam_im1 - lam_i) / h_p, 0.5)
    phi1_p = jnp.expm1(-h_p)
    b_p = phi1_p  # bh2
    x_next = (s_next / s_i) * x - (a_next * phi1_p) * m_i
    pred2 = 0.5 * ((m1 - m_i) / r1_p)
    x_next = jnp.where(p_order2, x_next - (a_next * b_p) * pred2, x_next)
    x_next = jnp.where(final, m_i, x_next)  # sigma_{i+1} = 0: lambda = inf, phi1 = -1  =>  x_N = m_i

    return SolverState(x=x_next, step=i + 1, m_prev=m_i, m_prev2=m1, last_sample=x)


def solver_step(solver: SolverName, state: SolverState, model_output: Array, sigmas: Array) -> SolverState:
    """Dispatch on the (static) solver name."""
    if solver == "unipc":
        return unipc_step(state, model_output, sigmas)
    if solver == "euler":
        return euler_step(state, model_output, sigmas)
    raise ValueError(f"unknown solver {solver!r} (known: unipc, euler)")
