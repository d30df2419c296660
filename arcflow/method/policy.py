"""The ArcFlow policy: a closed-form velocity field predicted by one network evaluation.

A policy is a per-pixel mixture of K momentum modes (SPEC §2). Mode k moves in the fixed
direction ``m_k`` with speed scaled by ``exp(g_k (sigma_src - sigma))``, so the whole
trajectory from ``sigma_src`` downwards integrates exactly. All mixing coefficients are
evaluated in log space (``log w_k + g_k d + log phi(g_k h)``): a dropped mode (weight 0)
or a large ``|g h|`` never produces ``0 * inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Below this |z| the closed form of log(phi(z)) loses precision (0/0 at z = 0, and its
# float32 gradient cancels); there the Taylor series z/2 + z^2/24 - z^4/2880 is used, whose
# next term (z^6/181440) is below 1e-17 at the threshold.
_SERIES_THRESHOLD = 1e-2


def log_phi(z: Tensor) -> Tensor:
    """log((exp(z) - 1) / z), finite with finite gradients for every finite z (0 included)."""
    small = z.abs() < _SERIES_THRESHOLD
    z_safe = torch.where(small, torch.ones_like(z), z)
    a = z_safe.abs()
    closed_form = torch.relu(z_safe) + torch.log(-torch.expm1(-a) / a)
    z_small = torch.where(small, z, torch.zeros_like(z))
    z2 = z_small * z_small
    series = z_small / 2 + z2 / 24 - z2 * z2 / 2880
    return torch.where(small, series, closed_form)


def phi(z: Tensor) -> Tensor:
    """(exp(z) - 1) / z with phi(0) = 1."""
    return torch.exp(log_phi(z))


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    """Shape a (B,) tensor for broadcasting against (B, K, 1, H, W)."""
    return value.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class ArcFlowPolicy:
    """K-mode momentum policy predicted at ``sigma_src``.

    Shapes: ``means`` (B, K, C, H, W); ``logits`` (B, K, 1, H, W) of the mixture weights
    (softmaxed over K here, so any offset is harmless); ``rates`` (B, K-1, 1, H, W), the
    exponential rates of modes 2..K (mode 1 has rate 0); ``sigma_src`` (B,).
    Sigmas passed to the methods are (B,) tensors with ``sigma <= sigma_src``.
    """

    def __init__(self, means: Tensor, logits: Tensor, rates: Tensor, sigma_src: Tensor):
        if means.dim() != 5:
            raise ValueError(f"means must be (B, K, C, H, W); got {tuple(means.shape)}")
        batch, num_modes, _, height, width = means.shape
        expected = {"logits": (batch, num_modes, 1, height, width), "rates": (batch, num_modes - 1, 1, height, width)}
        for name, tensor in (("logits", logits), ("rates", rates)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]}; got {tuple(tensor.shape)}")
        if sigma_src.shape != (batch,):
            raise ValueError(f"sigma_src must have shape ({batch},); got {tuple(sigma_src.shape)}")
        self.means = means
        self.logits = logits
        self.rates = rates
        self.sigma_src = sigma_src

    @property
    def num_modes(self) -> int:
        return self.means.shape[1]

    def _all_rates(self) -> Tensor:
        """Rates of all K modes, mode 1 fixed at 0: (B, K, 1, H, W)."""
        zero = torch.zeros_like(self.logits[:, :1])
        return torch.cat([zero, self.rates], dim=1)

    def average_velocity(self, sigma_from: Tensor, sigma_to: Tensor) -> Tensor:
        """(x(sigma_from) - x(sigma_to)) / (sigma_from - sigma_to); the velocity where they meet."""
        rates = self._all_rates()
        elapsed = _per_sample(self.sigma_src - sigma_from, rates)
        step = _per_sample(sigma_from - sigma_to, rates)
        log_weights = torch.log_softmax(self.logits, dim=1)
        coefficients = torch.exp(log_weights + rates * elapsed + log_phi(rates * step))
        return (self.means * coefficients).sum(dim=1)

    def velocity(self, sigma: Tensor) -> Tensor:
        """Instantaneous velocity v(sigma): (B, C, H, W)."""
        return self.average_velocity(sigma, sigma)

    def integrate(self, x: Tensor, sigma_from: Tensor, sigma_to: Tensor) -> Tensor:
        """Exact solution x(sigma_to) of dx/dsigma = v(sigma) from x(sigma_from) = x."""
        step = _per_sample(sigma_from - sigma_to, x)
        return x - step * self.average_velocity(sigma_from, sigma_to).to(x.dtype)

    def dropout(self, p: float, generator: torch.Generator | None = None,
                uniforms: Tensor | None = None) -> "ArcFlowPolicy":
        """Drop each mode of each sample with probability p (logit -> -inf); never all of them.

        ``uniforms`` (B, K) replaces the generator's draws, so a caller can fix the draws of
        a whole batch before splitting it into micro-batches.
        """
        batch, num_modes = self.logits.shape[:2]
        if uniforms is None:
            device = generator.device if generator is not None else self.logits.device
            uniforms = torch.rand(batch, num_modes, generator=generator, device=device)
        dropped = (uniforms < p).to(self.logits.device)
        dropped &= ~dropped.all(dim=1, keepdim=True)
        mask = dropped.reshape(batch, num_modes, *([1] * (self.logits.dim() - 2)))
        logits = self.logits.masked_fill(mask, float("-inf"))
        return ArcFlowPolicy(self.means, logits, self.rates, self.sigma_src)

    def detach(self) -> "ArcFlowPolicy":
        return ArcFlowPolicy(self.means.detach(), self.logits.detach(), self.rates.detach(), self.sigma_src.detach())
