"""segment_loss against a direct, slow, per-sample transcription of SPEC §4 in float64."""

import math

import pytest
import torch

from arcflow.method.policy import ArcFlowPolicy
from arcflow.method.rollout import RolloutConfig, RolloutNoise, segment_loss

SHIFT = 3.2


def sigma_of(tau: float) -> float:
    return SHIFT * tau / (1 + (SHIFT - 1) * tau)


def mode_terms(m, lg, g, keep, sigma_src, i, pix):
    """Weights, means and rates of sample i at one latent pixel, straight from SPEC §2."""
    k_modes = m.shape[1]
    logits = [lg[i, k, 0][pix].item() if keep[k] else -math.inf for k in range(k_modes)]
    top = max(logits)
    z = sum(math.exp(v - top) for v in logits)
    weights = [math.exp(v - top) / z for v in logits]
    rates = [0.0] + [g[i, k, 0][pix].item() for k in range(k_modes - 1)]
    return weights, rates


def integrate_ref(m, lg, g, keep, sigma_src, i, x, s_a, s_b):
    """x(s_b) from x(s_a) = x for sample i, using (e^{gh} - 1)/g (h for g = 0)."""
    out = x.clone()
    h = s_a - s_b
    _, c_dim, h_dim, w_dim = m.shape[1:]
    for r in range(h_dim):
        for c in range(w_dim):
            weights, rates = mode_terms(m, lg, g, keep, sigma_src, i, (r, c))
            for k, (wk, gk) in enumerate(zip(weights, rates)):
                if wk == 0.0:
                    continue
                amount = h if gk == 0.0 else (math.exp(gk * h) - 1) / gk
                out[:, r, c] -= wk * m[i, k, :, r, c] * math.exp(gk * (sigma_src - s_a)) * amount
    return out


def reference_segment(m, lg, g, teacher, x_src, tau_src, S, rho, cfg, keep, u_student, u_teacher):
    """One student step of SPEC §4, sample by sample, with the uniforms given."""
    B, K = m.shape[:2]
    T = cfg.total_substeps
    n_sub = max(round(S * T), 1)
    w = min(cfg.window_substeps * S / n_sub, S)
    sq_sum, count, x_next = 0.0, 0, []
    for i in range(B):
        sigma_src = sigma_of(tau_src[i].item())
        kept = keep[i]
        pts = sorted(u * (1 - rho) * (S - w) for u in u_student[i])
        a = [pts[0]] + [pts[j] - pts[j - 1] for j in range(1, len(pts))]
        edges = [0.0] + sorted(u_teacher[i]) + [1.0]
        b = [(edges[j + 1] - edges[j]) * rho * (S - w) for j in range(len(edges) - 1)]
        x, tau = x_src[i].clone(), tau_src[i].item()
        for j in range(cfg.num_states):
            tau_a = max(tau - a[j], 0.0)
            tau_b = max(tau_a - b[j], 0.0)
            x_a = integrate_ref(m, lg, g, kept, sigma_src, i, x, sigma_of(tau), sigma_of(tau_a))
            u_t = teacher(x_a[None], torch.tensor([sigma_of(tau_a)], dtype=torch.float64))[0]
            all_modes = [True] * K
            if round((tau_a - (tau_b - w)) * T) < 2:
                eps = 1e-7  # instantaneous velocity by a tiny exact step
                x1 = integrate_ref(m, lg, g, all_modes, sigma_src, i, torch.zeros_like(x), sigma_of(tau_a),
                                   sigma_of(tau_a) - eps)
                u_s = -x1 / eps
            else:
                s_from, s_to = sigma_of(tau_a), sigma_of(tau_b - w)
                x1 = integrate_ref(m, lg, g, all_modes, sigma_src, i, torch.zeros_like(x), s_from, s_to)
                u_s = -x1 / (s_from - s_to)
            sq_sum += float(((u_s - u_t) ** 2).sum())
            count += u_s.numel()
            x = x_a + u_t * (sigma_of(tau_b) - sigma_of(tau_a))
            tau = tau_b
        tau_next = max(tau_src[i].item() - S, 0)
        x_next.append(integrate_ref(m, lg, g, kept, sigma_src, i, x, sigma_of(tau), sigma_of(tau_next)))
    return cfg.loss_scale * 0.5 * sq_sum / count, torch.stack(x_next)


def linear_teacher(x, sigma):
    return 0.7 * x * sigma.reshape(-1, 1, 1, 1) - 0.3 * torch.cos(x)


@pytest.mark.parametrize("rho", [1.0, 0.37, 0.0])
@pytest.mark.parametrize("S,tau0", [(0.5, 1.0), (0.5, 0.5), (1 / 128, 1 / 128)])
def test_segment_loss_matches_spec_transcription(rho, S, tau0):
    torch.manual_seed(0)
    B, K, C, H, W = 3, 4, 2, 2, 2
    cfg = RolloutConfig(shift=SHIFT, dropout=0.3)
    m = torch.randn(B, K, C, H, W, dtype=torch.float64)
    lg = torch.randn(B, K, 1, H, W, dtype=torch.float64)
    g = torch.randn(B, K - 1, 1, H, W, dtype=torch.float64) * 2
    x_src = torch.randn(B, C, H, W, dtype=torch.float64)
    tau_src = torch.full((B,), tau0, dtype=torch.float64)
    policy = ArcFlowPolicy(m, lg, g, torch.tensor([sigma_of(tau0)] * B, dtype=torch.float64))

    noise = RolloutNoise.draw(B, K, cfg, torch.Generator().manual_seed(7))
    loss, x_next = segment_loss(policy, linear_teacher, x_src, tau_src, S, rho, cfg, noise)

    dropped = noise.dropout < cfg.dropout
    dropped &= ~dropped.all(dim=1, keepdim=True)
    u_student = noise.student.double().tolist()
    u_teacher = noise.teacher.double().tolist()
    keep = (~dropped).tolist()
    ref_loss, ref_next = reference_segment(m, lg, g, linear_teacher, x_src, tau_src, S, rho, cfg, keep,
                                           u_student, u_teacher)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(x_next, ref_next, rtol=1e-7, atol=1e-9)


def test_gradient_flows_only_through_the_student_velocities():
    torch.manual_seed(1)
    B, K, C, H, W = 2, 3, 2, 2, 2
    m = torch.randn(B, K, C, H, W, requires_grad=True)
    lg = torch.randn(B, K, 1, H, W, requires_grad=True)
    g = torch.randn(B, K - 1, 1, H, W, requires_grad=True)
    policy = ArcFlowPolicy(m, lg, g, torch.ones(B))
    x_src = torch.randn(B, C, H, W)
    cfg = RolloutConfig()
    loss, x_next = segment_loss(policy, linear_teacher, x_src, torch.ones(B), 0.5, 0.5, cfg,
                                RolloutNoise.draw(B, K, cfg))
    assert not x_next.requires_grad
    loss.backward()
    for t in (m, lg, g):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_rollout_with_rho_one_follows_the_teacher():
    """With rho = 1 and a teacher equal to the policy's own velocity, the loss is ~0."""
    torch.manual_seed(2)
    B, K, C, H, W = 2, 1, 2, 2, 2
    m = torch.randn(B, K, C, H, W, dtype=torch.float64)
    policy = ArcFlowPolicy(m, torch.zeros(B, K, 1, H, W, dtype=torch.float64),
                           torch.zeros(B, 0, 1, H, W, dtype=torch.float64), torch.ones(B, dtype=torch.float64))
    constant_teacher = lambda x, sigma: m[:, 0]  # noqa: E731
    cfg = RolloutConfig(dropout=0.0)
    loss, _ = segment_loss(policy, constant_teacher, torch.randn(B, C, H, W, dtype=torch.float64),
                           torch.ones(B, dtype=torch.float64), 0.5, 1.0, cfg, RolloutNoise.draw(B, K, cfg))
    assert loss.item() < 1e-20


def test_micro_batches_see_the_same_draws_as_the_full_batch():
    torch.manual_seed(3)
    B, K, C, H, W = 4, 3, 2, 2, 2
    m, lg, g = torch.randn(B, K, C, H, W), torch.randn(B, K, 1, H, W), torch.randn(B, K - 1, 1, H, W)
    x_src, tau = torch.randn(B, C, H, W), torch.ones(B)
    cfg = RolloutConfig()
    noise = RolloutNoise.draw(B, K, cfg, torch.Generator().manual_seed(0))
    full_loss, full_next = segment_loss(ArcFlowPolicy(m, lg, g, tau), linear_teacher, x_src, tau, 0.5, 0.4, cfg, noise)
    parts = [segment_loss(ArcFlowPolicy(m[s], lg[s], g[s], tau[s]), linear_teacher, x_src[s], tau[s], 0.5, 0.4,
                          cfg, noise[s]) for s in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(sum(w * p[0] for w, p in zip((0.25, 0.75), parts)), full_loss)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_next)
