"""Flow-matching diffusion: sigma schedules, Euler / UniPC solvers, CFG and the scan sampling loop."""

from onestory_jax.diffusion.guidance import cfg_batch, guidance_weights, guided_velocity_fn
from onestory_jax.diffusion.loop import sample
from onestory_jax.diffusion.schedule import (
    FlowSchedule,
    add_noise,
    diffusers_flow_schedule,
    diffusers_flow_sigmas,
    flow_match_euler_schedule,
    flow_match_euler_sigmas,
    make_schedule,
    sample_training_sigmas,
    shift_sigmas,
    sigmas_to_timesteps,
    velocity_target,
    wan_flow_schedule,
    wan_flow_sigmas,
)
from onestory_jax.diffusion.solvers import SolverState, euler_step, init_state, solver_step, unipc_step

__all__ = [
    "FlowSchedule",
    "SolverState",
    "add_noise",
    "cfg_batch",
    "diffusers_flow_schedule",
    "diffusers_flow_sigmas",
    "euler_step",
    "flow_match_euler_schedule",
    "flow_match_euler_sigmas",
    "guidance_weights",
    "guided_velocity_fn",
    "init_state",
    "make_schedule",
    "sample",
    "sample_training_sigmas",
    "shift_sigmas",
    "sigmas_to_timesteps",
    "solver_step",
    "unipc_step",
    "velocity_target",
    "wan_flow_schedule",
    "wan_flow_sigmas",
]
