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

from arcflow.method.policy import ArcFlowPolicy
from arcflow.method.schedule import shifted_sigma

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


@dataclass(frozen=True)
class RolloutNoise:
    """The uniform draws of one student step, per sample.

    Drawn for the whole batch before it is split into micro-batches, so that
    ``grad_accum_batch_size`` does not change which states are visited.
    """

    dropout: Tensor  # (B, K): mode dropout of the rollout policy
    student: Tensor  # (B, n): positions along the student's share of the rollout
    teacher: Tensor  # (B, n - 1): split points of the teacher's share

    @classmethod
    def draw(cls, batch: int, num_modes: int, cfg: RolloutConfig,
             generator: torch.Generator | None = None) -> "RolloutNoise":
        device = generator.device if generator is not None else None

        def draw(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=device)

        return cls(draw(batch, num_modes), draw(batch, cfg.num_states), draw(batch, cfg.num_states - 1))

    def __getitem__(self, index: slice) -> "RolloutNoise":
        return RolloutNoise(self.dropout[index], self.student[index], self.teacher[index])

    @staticmethod
    def cat(parts: list["RolloutNoise"]) -> "RolloutNoise":
        return RolloutNoise(*(torch.cat([getattr(p, f) for p in parts]) for f in ("dropout", "student", "teacher")))


def student_intervals(uniforms: Tensor, span: Tensor) -> Tensor:
    """Differences of the sorted uniforms scaled to [0, span], starting from 0: (B, n), sums <= span."""
    points = uniforms.to(span.device).sort(dim=1).values * span[:, None]
    return torch.diff(points, dim=1, prepend=torch.zeros_like(points[:, :1]))


def teacher_intervals(uniforms: Tensor, span: Tensor) -> Tensor:
    """A random split of [0, span] into n pieces (sorted n - 1 uniforms with 0 and 1 added): (B, n)."""
    inner = uniforms.to(span.device).sort(dim=1).values
    edges = torch.cat([torch.zeros_like(span[:, None]), inner, torch.ones_like(span[:, None])], dim=1)
    return torch.diff(edges, dim=1) * span[:, None]


def segment_loss(
    policy: ArcFlowPolicy,
    teacher: VelocityFn,
    x_src: Tensor,
    tau_src: Tensor,
    segment: float,
    teacher_ratio: float,
    cfg: RolloutConfig,
    noise: RolloutNoise,
) -> tuple[Tensor, Tensor]:
    """Imitation loss of one student step and the detached state at the segment's end.

    ``policy`` was predicted at (x_src, sigma(tau_src)); ``tau_src`` is (B,). Returns
    ``(loss, x_next)`` with x_next at tau_src - segment (clamped to 0).
    """
    def sigma(tau: Tensor) -> Tensor:
        return shifted_sigma(tau, cfg.shift)

    num_substeps = max(round(segment * cfg.total_substeps), 1)
    window = min(cfg.window_substeps * segment / num_substeps, segment)
    rollout_span = torch.full_like(tau_src, segment - window)
    rollout_policy = policy.detach().dropout(cfg.dropout, uniforms=noise.dropout)
    student_steps = student_intervals(noise.student, (1 - teacher_ratio) * rollout_span)
    teacher_steps = teacher_intervals(noise.teacher, teacher_ratio * rollout_span)

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
