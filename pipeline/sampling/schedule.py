"""Flow-matching noise schedules and the Euler step of the ACE-Step v1 sampler (spec §6.3, §8).

Conventions: x_t = σ·ε + (1−σ)·x0, the model predicts the velocity v = ε − x0 from the timestep
t = 1000·σ. σ runs from 1 (pure noise) down to 0 (clean latent).
"""
from __future__ import annotations

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0


def shift_sigmas(sigmas, shift: float = DEFAULT_SHIFT):
    """The resolution shift σ' = shift·σ / (1 + (shift−1)·σ); works on floats, arrays and tensors."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def train_sigmas(shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training σ table S_k (k = 0..999): shifted (1000−k)/1000, i.e. 1.0 … 0.002994 (fp32).

    One definition for training and sampling: the objective's table (the inference schedule's
    σ_min is this table's last entry, so the two must never drift apart).
    """
    from pipeline.objective import training_sigmas

    return training_sigmas(shift=shift, num_train_timesteps=num_train_timesteps)


def default_sigma_min(shift: float = DEFAULT_SHIFT) -> float:
    """The smallest training σ (the table's last entry): 3·0.001/(1+2·0.001) ≈ 0.002994 for shift 3."""
    return float(train_sigmas(shift)[-1].item())


def inference_sigmas(
    num_steps: int,
    shift: float = DEFAULT_SHIFT,
    sigma_max: float = 1.0,
    sigma_min: float | None = None,
) -> torch.Tensor:
    """σ for ``num_steps`` Euler steps plus the final 0: shape [num_steps + 1], fp32.

    The reference spaces the steps linearly between σ_max and σ_min — where σ_min is taken from
    the already shifted training table — and then applies the shift a second time. That double
    shift is what the released model was tuned with, so it is kept.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if sigma_min is None:
        sigma_min = default_sigma_min(shift)
    # float64 for the spacing (as numpy does in the reference), fp32 for the result.
    t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sig = shift_sigmas(t / NUM_TRAIN_TIMESTEPS, shift)
    sig = torch.from_numpy(sig).to(torch.float32)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float32)])


def inference_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Model timesteps for a σ schedule from ``inference_sigmas``: 1000·σ without the final 0."""
    return sigmas[:-1] * NUM_TRAIN_TIMESTEPS


def omega_scale(omega: float) -> float:
    """Map the user's "granularity" ω to the factor on the step's zero-mean part:
    0.9 + 0.2·sigmoid(0.1·ω) (ω = 10 → 1.0462; ω = 0 → 1.0, i.e. a plain Euler step)."""
    return 0.9 + 0.2 / (1.0 + math.exp(-0.1 * omega))


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    omega: float = 10.0,
) -> torch.Tensor:
    """One Euler step x ← x + dx with dx = (σ_next − σ)·v, where the deviation of dx from its mean
    (over the whole tensor, batch included, as in the reference) is scaled by ``omega_scale(omega)``
    and the mean kept: a mild sharpening that leaves the overall level unchanged.

    Computed in fp32 whatever the model dtype; the result is fp32.
    """
    x32 = x.to(torch.float32)
    v32 = v.to(torch.float32)
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(torch.float32)
    if isinstance(sigma_next, torch.Tensor):
        sigma_next = sigma_next.to(torch.float32)
    dx = (sigma_next - sigma) * v32
    m = dx.mean()
    dx = (dx - m) * omega_scale(omega) + m
    return x32 + dx
