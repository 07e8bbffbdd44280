"""Classifier-free guidance variants of the ACE-Step v1 sampler (spec §8): plain CFG, APG with
momentum (the default), and the guidance interval that limits guidance to the middle steps."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Dims APG normalises over: the 16 latent rows × T frames, separately per batch item and channel.
APG_DIMS = (-1, -2)


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain classifier-free guidance: uncond + s·(cond − uncond)."""
    return uncond + scale * (cond - uncond)


@dataclass
class MomentumBuffer:
    """Running average of the guidance direction shared by consecutive APG steps of one sampling
    run. The reference uses a negative momentum (−0.75), which damps oscillation between steps."""

    momentum: float = -0.75
    running_average: torch.Tensor | float = field(default=0.0)

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.running_average = value + self.momentum * self.running_average
        return self.running_average


def _project(v: torch.Tensor, onto: torch.Tensor, dims=APG_DIMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``v`` into its parts parallel and orthogonal to ``onto`` (per batch item and channel).
    Done in fp64: the parallel part is a small difference of large numbers."""
    dtype = v.dtype
    v64 = v.double()
    unit = torch.nn.functional.normalize(onto.double(), dim=dims)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = v64 - parallel
    return parallel.to(dtype), orthogonal.to(dtype)


def apg(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    momentum: MomentumBuffer | None = None,
    norm_threshold: float = 2.5,
    eta: float = 0.0,
    dims=APG_DIMS,
) -> torch.Tensor:
    """Adaptive projected guidance: the guidance direction cond − uncond is smoothed by the
    momentum buffer, its L2 norm (over ``dims``) clipped to ``norm_threshold``, and only its part
    orthogonal to ``cond`` (plus ``eta`` × the parallel part) is added, scaled by (s − 1). Removing
    the parallel part avoids the over-saturation plain CFG gives at high scales like 15."""
    diff = cond - uncond
    if momentum is not None:
        diff = momentum.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    parallel, orthogonal = _project(diff, cond, dims)
    return cond + (scale - 1) * (orthogonal + eta * parallel)


def guidance_interval(num_steps: int, interval: float = 0.5) -> tuple[int, int]:
    """Step indices [start, end) where guidance is applied: the middle ``interval`` fraction of the
    run (0.5 with 60 steps → 15…44). Outside it the sampler does a single conditional pass."""
    start = int(num_steps * (1 - interval) / 2)
    end = int(num_steps * (interval / 2 + 0.5))
    return start, end


def guidance_scale_at(
    step: int,
    num_steps: int,
    guidance_scale: float,
    interval: float = 0.5,
    decay: float = 0.0,
    min_guidance_scale: float = 3.0,
) -> float | None:
    """The guidance scale at step ``step``, or None outside the guidance interval.

    With ``decay`` > 0 the scale moves linearly across the interval from ``guidance_scale`` toward
    ``min_guidance_scale`` (all the way at decay 1 on the last guided step)."""
    start, end = guidance_interval(num_steps, interval)
    if not start <= step < end:
        return None
    if decay <= 0:
        return guidance_scale
    span = max(end - start - 1, 1)
    progress = (step - start) / span
    return guidance_scale - (guidance_scale - min_guidance_scale) * progress * decay
