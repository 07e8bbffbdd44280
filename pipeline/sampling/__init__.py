"""The ACE-Step v1 sampler: flow-matching schedules, Euler+omega steps, APG/CFG guidance, the
sampling loop, and `generate` (checkpoint + prompt + lyrics → wav)."""
from __future__ import annotations

from pipeline.sampling.generation import Conditioning, build_conditioning, generate, params_path
from pipeline.sampling.guidance import (
    MomentumBuffer,
    apg,
    cfg,
    guidance_interval,
    guidance_scale_at,
)
from pipeline.sampling.sampler import (
    SamplerSettings,
    duration_for_frames,
    erg_diffusion_modules,
    erg_lyric_modules,
    frames_for_duration,
    make_noise,
    null_conditioning,
    resolve_seeds,
    sample,
    scaled_outputs,
)
from pipeline.sampling.schedule import (
    default_sigma_min,
    euler_step,
    inference_sigmas,
    inference_timesteps,
    omega_scale,
    shift_sigmas,
    train_sigmas,
)

__all__ = [
    "Conditioning",
    "build_conditioning",
    "generate",
    "params_path",
    "SamplerSettings",
    "duration_for_frames",
    "erg_diffusion_modules",
    "erg_lyric_modules",
    "frames_for_duration",
    "make_noise",
    "null_conditioning",
    "resolve_seeds",
    "sample",
    "scaled_outputs",
    "MomentumBuffer",
    "apg",
    "cfg",
    "default_sigma_min",
    "euler_step",
    "guidance_interval",
    "guidance_scale_at",
    "inference_sigmas",
    "inference_timesteps",
    "omega_scale",
    "shift_sigmas",
    "train_sigmas",
]
