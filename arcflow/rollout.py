"""The data-free training objective: trajectory imitation along mixed rollouts (SPEC §4).

The trainer calls :func:`segment_loss` once per student step with the policy it just
predicted (with grad). Everything on the rollout itself — the detached, dropped-out
student policy and the teacher's Euler steps — runs without grad; only the student's
average velocities at the visited states carry gradient.

Randomness is per sample: each prompt of the batch draws its own intervals, so one batch
visits B different sets of states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from arcflow.policy import ArcFlowPolicy
from arcflow.schedule import shifted_sigma

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""(x, sigma (B,)) -> velocity, the frozen teacher on fixed conditioning."""


@dataclass(frozen=True)
class RolloutConfig:
    """Hyper-parameters of one segment's imitation loss (reference values as defaults)."""

    num_states: int = 4
    window_substeps: int = 3
    total_substeps: int = 128
    dropout: float = 0.1
    loss_scale: float = 30.0
    shift: float = 3.2

    def __post_init__(self) -> None:
        if self.num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {self.num_states}")
        if self.total_substeps < 1 or self.window_substeps < 0:
            raise ValueError("total_substeps must be >= 1 and window_substeps >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def student_intervals(batch: int, num: int, span: Tensor, generator: torch.Generator | None) -> Tensor:
    """Differences of sorted uniforms on [0, span], starting from 0: (B, num), sums <= span."""
    points = torch.rand(batch, num, generator=generator, device=_device(generator)).sort(dim=1).values
    points = points.to(span.device) * span[:, None]
    return torch.diff(points, dim=1, prepend=torch.zeros_like(points[:, :1]))


def teacher_intervals(batch: int, num: int, span: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random split of [0, span] into num pieces (sorted uniforms with 0 and 1 added): (B, num)."""
    inner = torch.rand(batch, num - 1, generator=generator, device=_device(generator)).sort(dim=1).values
    inner = inner.to(span.device)
    edges = torch.cat([torch.zeros_like(span[:, None]), inner, torch.ones_like(span[:, None])], dim=1)
    return torch.diff(edges, dim=1) * span[:, None]


def _device(generator: torch.Generator | None) -> torch.device | None:
    return generator.device if generator is not None else None


def segment_loss(
    policy: ArcFlowPolicy,
    teacher: VelocityFn,
    x_src: Tensor,
    tau_src: Tensor,
    segment: float,
    teacher_ratio: float,
    cfg: RolloutConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Imitation loss of one student step and the detached state at the segment's end.

    ``policy`` was predicted at (x_src, sigma(tau_src)); ``tau_src`` is (B,). Returns
    ``(loss, x_next)`` with x_next at tau_src - segment (clamped to 0).
    """
    batch = x_src.shape[0]

    def sigma(tau: Tensor) -> Tensor:
        return shifted_sigma(tau, cfg.shift)

    num_substeps = max(round(segment * cfg.total_substeps), 1)
    window = min(cfg.window_substeps * segment / num_substeps, segment)
    rollout_span = torch.full_like(tau_src, segment - window)
    rollout_policy = policy.detach().dropout(cfg.dropout, generator=generator)
    student_steps = student_intervals(batch, cfg.num_states, (1 - teacher_ratio) * rollout_span, generator)
    teacher_steps = teacher_intervals(batch, cfg.num_states, teacher_ratio * rollout_span, generator)

    student_velocities, teacher_velocities = [], []
    x, tau = x_src.detach(), tau_src
    for j in range(cfg.num_states):
        tau_a = (tau - student_steps[:, j]).clamp(min=0)
        tau_b = (tau_a - teacher_steps[:, j]).clamp(min=0)
        tau_end = tau_b - window  # may dip slightly below 0 on the last segment; not clamped
        with torch.no_grad():
            x_a = rollout_policy.integrate(x, sigma(tau), sigma(tau_a))
            u_teacher = teacher(x_a, sigma(tau_a)).to(x_a.dtype)
        too_short = torch.round((tau_a - tau_end) * cfg.total_substeps) < 2
        sigma_to = torch.where(too_short, sigma(tau_a), sigma(tau_end))
        student_velocities.append(policy.average_velocity(sigma(tau_a), sigma_to))
        teacher_velocities.append(u_teacher)
        step = (sigma(tau_b) - sigma(tau_a)).reshape(-1, *([1] * (x.dim() - 1)))
        x = x_a + step.to(x_a.dtype) * u_teacher
        tau = tau_b

    error = torch.stack(student_velocities) - torch.stack(teacher_velocities)
    loss = cfg.loss_scale * 0.5 * error.pow(2).mean()
    tau_next = (tau_src - segment).clamp(min=0)
    with torch.no_grad():
        x_next = rollout_policy.integrate(x, sigma(tau), sigma(tau_next))
    return loss, x_next
