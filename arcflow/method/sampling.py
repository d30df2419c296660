"""Samplers on the shifted-sigma schedule: the teacher's Euler and the student's n-NFE policy.

Both start from the same noise at tau = 1 and end at tau = 0, so their latents are
directly comparable (validation, export checks, the pipeline equivalence test).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from arcflow.method.schedule import full_batch, segment_bounds, shifted_sigma

if TYPE_CHECKING:  # the interface is defined one layer up, in arcflow.models
    from arcflow.models.base import Backbone, Conditioning


def euler_sigmas(num_steps: int, shift: float) -> list[float]:
    """Sigmas of an n-step Euler sampler: uniform in raw time, shifted, ending at 0.

    Equals diffusers' FlowMatchEulerDiscreteScheduler(shift=s, use_dynamic_shifting=False)
    with ``sigmas=linspace(1, 1/n, n)``.
    """
    return [float(shifted_sigma(1 - i / num_steps, shift)) for i in range(num_steps)] + [0.0]


@torch.no_grad()
def sample_teacher(backbone: Backbone, noise: Tensor, cond: Conditioning, num_steps: int, shift: float) -> Tensor:
    """Multi-step Euler integration of the teacher's velocity from sigma = 1 to 0."""
    sigmas = euler_sigmas(num_steps, shift)
    x = noise.float()
    for sigma_a, sigma_b in zip(sigmas[:-1], sigmas[1:]):
        u = backbone.teacher_velocity(x, full_batch(sigma_a, x.shape[0], x), cond)
        x = x + (sigma_b - sigma_a) * u
    return x


@torch.no_grad()
def sample_student(backbone: Backbone, noise: Tensor, cond: Conditioning, nfe: int, shift: float,
                   timestep_ratio: float = 1.0) -> Tensor:
    """SPEC §3: n student evaluations, each integrated exactly over its segment."""
    x = noise.float()
    for tau_a, tau_b in segment_bounds(nfe, timestep_ratio):
        sigma_a = full_batch(shifted_sigma(tau_a, shift), x.shape[0], x)
        sigma_b = full_batch(shifted_sigma(tau_b, shift), x.shape[0], x)
        x = backbone.student_policy(x, sigma_a, cond).integrate(x, sigma_a, sigma_b)
    return x
