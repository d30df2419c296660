"""Time discretisation shared by training and sampling (SPEC §1, §3)."""

from __future__ import annotations

import torch
from torch import Tensor


def shifted_sigma(tau: Tensor | float, shift: float) -> Tensor | float:
    """sigma(tau) = s tau / (1 + (s - 1) tau): raw time to noise level, fixed shift."""
    return shift * tau / (1 + (shift - 1) * tau)


def segment_lengths(num_steps: int, timestep_ratio: float = 1.0) -> list[float]:
    """Raw-time lengths of the n NFE segments from tau = 1 to 0: D, ..., D, r D."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if timestep_ratio <= 0:
        raise ValueError(f"timestep_ratio must be > 0, got {timestep_ratio}")
    base = 1.0 / (num_steps - 1 + timestep_ratio)
    return [base] * (num_steps - 1) + [timestep_ratio * base]


def segment_bounds(num_steps: int, timestep_ratio: float = 1.0) -> list[tuple[float, float]]:
    """(tau_start, tau_end) of each segment; the last one ends exactly at 0."""
    bounds, tau = [], 1.0
    lengths = segment_lengths(num_steps, timestep_ratio)
    for index, length in enumerate(lengths):
        end = 0.0 if index == len(lengths) - 1 else tau - length
        bounds.append((tau, end))
        tau = end
    return bounds


def teacher_ratio(iteration: int, decay_iters: int) -> float:
    """rho = 1 - min(iter, N) / N: the teacher's share of each training rollout."""
    if decay_iters <= 0:
        return 0.0
    return 1.0 - min(iteration, decay_iters) / decay_iters


def full_batch(value: float, batch: int, like: Tensor) -> Tensor:
    """A (B,) tensor of one value, on ``like``'s device, float32."""
    return torch.full((batch,), float(value), device=like.device, dtype=torch.float32)
