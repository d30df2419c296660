"""Tests of the ArcFlow policy (closed-form K-mode momentum velocity field).

Written against the specification, not the implementation:

    w = softmax_k(l),  g_1 = 0,  v(sigma) = sum_k w_k m_k exp(g_k (sigma_src - sigma))
    x(sigma_b) = x(sigma_a) - sum_k w_k m_k exp(g_k (sigma_src - sigma_a)) h phi(g_k h)
    h = sigma_a - sigma_b,  phi(z) = (e^z - 1) / z,  phi(0) = 1

References are computed in float64 with numpy (numerical quadrature, or the closed form
written with ``expm1``), independently of ``arcflow.method.policy``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arcflow.method.policy import ArcFlowPolicy, log_phi, phi

F64 = torch.float64


# --------------------------------------------------------------------------------------
# Helpers / independent references
# --------------------------------------------------------------------------------------


def _random_policy(batch, modes, channels, height, width, *, seed, rate_scale=5.0, dtype=F64, sigma_src=None):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(batch, modes, channels, height, width, generator=gen, dtype=F64)
    logits = 2.0 * torch.randn(batch, modes, 1, height, width, generator=gen, dtype=F64)
    rates = rate_scale * (2.0 * torch.rand(batch, modes - 1, 1, height, width, generator=gen, dtype=F64) - 1.0)
    if sigma_src is None:
        sigma_src = torch.ones(batch, dtype=F64)
    return means.to(dtype), logits.to(dtype), rates.to(dtype), torch.as_tensor(sigma_src, dtype=dtype)


def _np(t):
    return t.detach().to(F64).cpu().numpy()


def _softmax_np(logits):
    logits = np.asarray(logits, dtype=np.float64)
    top = np.max(np.where(np.isfinite(logits), logits, -np.inf), axis=1, keepdims=True)
    e = np.exp(logits - top)
    return e / e.sum(axis=1, keepdims=True)


def _all_rates_np(rates):
    rates = np.asarray(rates, dtype=np.float64)
    zero = np.zeros_like(rates[:, :1]) if rates.shape[1] > 0 else np.zeros(rates.shape[:1] + (1,) + rates.shape[2:])
    return np.concatenate([zero, rates], axis=1)


def _quadrature_increment(means, logits, rates, sigma_src, sigma_a, sigma_b, panels=16, order=20):
    """int_{sigma_b}^{sigma_a} v(s) ds per sample by composite Gauss-Legendre, float64.

    Returns (increment, scale): scale = int sum_k w_k |m_k| exp(...) ds, the sum of absolute
    per-mode contributions, used as the denominator of a cancellation-free relative error.
    """
    m, w, g = np.asarray(means), _softmax_np(logits), _all_rates_np(rates)
    nodes, weights = np.polynomial.legendre.leggauss(order)
    inc = np.zeros((m.shape[0],) + m.shape[2:])
    scale = np.zeros_like(inc)
    for b in range(m.shape[0]):
        lo, hi = float(sigma_b[b]), float(sigma_a[b])
        edges = np.linspace(lo, hi, panels + 1)
        mids, halves = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
        s = (mids[:, None] + halves[:, None] * nodes[None, :]).ravel()
        q = (halves[:, None] * weights[None, :]).ravel()
        # (K, 1, H, W, S)
        e = np.exp(g[b][..., None] * (float(sigma_src[b]) - s))
        per_mode = (e * q).sum(axis=-1)  # (K, 1, H, W): int exp(g (src - s)) ds >= 0
        inc[b] = (w[b] * m[b] * per_mode).sum(axis=0)
        scale[b] = (w[b] * np.abs(m[b]) * per_mode).sum(axis=0)
    return inc, scale


def _closed_form_increment(means, logits, rates, sigma_src, sigma_a, sigma_b):
    """Closed form in float64 numpy: sum_k w_k m_k exp(g_k d) expm1(g_k h) / g_k (h when g_k = 0)."""
    m, w, g = np.asarray(means, dtype=np.float64), _softmax_np(logits), _all_rates_np(rates)
    shape = (-1,) + (1,) * (m.ndim - 1)
    d = (np.asarray(sigma_src, dtype=np.float64) - np.asarray(sigma_a, dtype=np.float64)).reshape(shape)
    h = (np.asarray(sigma_a, dtype=np.float64) - np.asarray(sigma_b, dtype=np.float64)).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        factor = np.where(g == 0, h, np.expm1(g * h) / np.where(g == 0, 1.0, g))
        weighted = np.where(w == 0, 0.0, w * np.exp(g * d) * factor)
        inc = (weighted * m).sum(axis=1)
        scale = (weighted * np.abs(m)).sum(axis=1)
    return inc, scale


def _direct_velocity(means, logits, rates, sigma_src, sigma):
    """Torch, straight from the formula (no log-space tricks)."""
    w = torch.softmax(logits, dim=1)
    g = torch.cat([torch.zeros_like(logits[:, :1]), rates], dim=1)
    d = (sigma_src - sigma).reshape(-1, 1, 1, 1, 1)
    return (w * means * torch.exp(g * d)).sum(dim=1)


def _col(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# Per-sample (sigma_src, sigma_a, sigma_b): all differ across the batch.
_CONFIGS = [
    (1.0, 1.0, 0.0),
    (0.8, 0.5, 0.1),
    (0.3, 0.3, 0.29),
    (1.0, 0.2, 0.0),
    (0.6, 0.45, 0.05),
    (0.9, 0.9, 0.6),
    (0.75, 0.7, 0.69999),
]

# Worst relative error against quadrature seen in this module (printed with -s).
_MAX_QUAD_REL_ERR = {"integrate": 0.0, "average_velocity": 0.0}


def _config_tensors(configs, dtype=F64):
    src, a, b = zip(*configs)
    return _col(src, dtype), _col(a, dtype), _col(b, dtype)


# --------------------------------------------------------------------------------------
# phi / log_phi
# --------------------------------------------------------------------------------------

_Z_GRID = [0.0, 1e-12, -1e-12, 1e-8, -1e-8, 1e-5, -1e-5, 9.99e-5, -9.99e-5, 1e-4, -1e-4, 1.01e-4, -1.01e-4,
           1e-3, -1e-3, 0.1, -0.1, 1.0, -1.0, 5.0, -5.0, 30.0, -30.0, 80.0, -80.0, -200.0, -1e4]


def _phi_ref(z):
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z == 0, 1.0, np.expm1(z) / np.where(z == 0, 1.0, z))


def _log_phi_ref(z):
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    for i, zi in np.ndenumerate(z):
        if zi == 0:
            out[i] = 0.0
        elif abs(zi) < 1e-3:
            out[i] = zi / 2 + zi * zi / 24 - zi ** 4 / 2880
        elif zi > 0:
            out[i] = zi + math.log(-math.expm1(-zi) / zi)
        else:
            out[i] = math.log(-math.expm1(zi) / -zi)
    return out


def _dlog_phi_ref(z):
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    for i, zi in np.ndenumerate(z):
        if abs(zi) < 1e-3:
            out[i] = 0.5 + zi / 12 - zi ** 3 / 720
        elif zi > 0:
            out[i] = 1.0 / -math.expm1(-zi) - 1.0 / zi
        else:
            out[i] = math.exp(zi) / math.expm1(zi) - 1.0 / zi
    return out


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_phi_matches_expm1_reference(dtype, rtol):
    z = torch.tensor(_Z_GRID, dtype=dtype)
    got = phi(z)
    ref = _phi_ref(_np(z))
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(_np(got), ref, rtol=rtol, atol=0)
    assert phi(torch.zeros((), dtype=dtype)).item() == 1.0


# log_phi is checked to an absolute 1e-13 in float64: that is a relative 1e-13 on phi = exp(log_phi),
# which is what the policy consumes (a truncated series near 0 is fine).
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-13), (torch.float32, 2e-6, 1e-7)])
def test_log_phi_matches_reference_and_stays_finite(dtype, rtol, atol):
    grid = _Z_GRID + [200.0, 1e4, 1e6]
    z = torch.tensor(grid, dtype=dtype, requires_grad=True)
    got = log_phi(z)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(_np(got), _log_phi_ref(_np(z)), rtol=rtol, atol=atol)
    got.sum().backward()
    assert torch.isfinite(z.grad).all()
    # float32: the closed-form derivative cancels (1/z - 1/z) just above the series threshold,
    # costing ~eps32 / |z| ~ 1e-3 absolute at |z| = 1e-4 (reported, not a spec requirement).
    grad_atol = 1e-8 if dtype == torch.float64 else 2e-3
    np.testing.assert_allclose(_np(z.grad), _dlog_phi_ref(_np(z)), rtol=max(rtol, 1e-9) * 10, atol=grad_atol)


def test_phi_log_phi_gradcheck():
    z = torch.tensor([0.0, 1e-9, -1e-7, 1e-4, -1e-4, 3e-4, 0.3, -2.0, 7.0, -40.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(log_phi, (z,))
    assert torch.autograd.gradcheck(phi, (z,))


# --------------------------------------------------------------------------------------
# Exactness against quadrature / direct formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("modes", [2, 4])
def test_integrate_and_average_velocity_match_quadrature(seed, modes):
    src, a, b = _config_tensors(_CONFIGS)
    means, logits, rates, _ = _random_policy(len(_CONFIGS), modes, 3, 4, 5, seed=seed)
    # Make sure both signs and the extremes of the rate range are present.
    rates[:, 0, 0, 0, 0] = 5.0
    rates[:, -1, 0, 0, 1] = -5.0
    policy = ArcFlowPolicy(means, logits, rates, src)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(means.shape[0], 3, 4, 5, generator=gen, dtype=F64)

    ref_inc, scale = _quadrature_increment(_np(means), _np(logits), _np(rates), _np(src), _np(a), _np(b))

    # The pure increment (x = 0) is measured, so x's rounding does not mask the policy's error.
    inc = -_np(policy.integrate(torch.zeros_like(x), a, b))
    torch.testing.assert_close(policy.integrate(x, a, b), x - torch.from_numpy(inc), rtol=1e-15, atol=4e-16)
    rel = np.abs(inc - ref_inc) / scale
    assert rel.max() < 1e-6, rel.max()
    _MAX_QUAD_REL_ERR["integrate"] = max(_MAX_QUAD_REL_ERR["integrate"], float(rel.max()))

    h = _np(a - b).reshape(-1, 1, 1, 1)
    avg = _np(policy.average_velocity(a, b))
    rel_avg = np.abs(avg - ref_inc / h) / (scale / h)
    assert rel_avg.max() < 1e-6, rel_avg.max()
    _MAX_QUAD_REL_ERR["average_velocity"] = max(_MAX_QUAD_REL_ERR["average_velocity"], float(rel_avg.max()))

    # Plain element-wise relative error where there is no heavy cancellation.
    mask = np.abs(ref_inc) > 1e-3 * scale
    assert (np.abs(inc - ref_inc)[mask] / np.abs(ref_inc)[mask]).max() < 1e-6


def test_report_max_quadrature_error():
    """Runs after the quadrature tests (file order); prints the worst error seen (see -s)."""
    print(f"\nmax relative error vs quadrature: {_MAX_QUAD_REL_ERR}")
    assert all(v < 1e-6 for v in _MAX_QUAD_REL_ERR.values())


@pytest.mark.parametrize("seed", [0, 5])
def test_velocity_equals_direct_formula(seed):
    src, a, b = _config_tensors(_CONFIGS)
    means, logits, rates, _ = _random_policy(len(_CONFIGS), 3, 2, 3, 3, seed=seed)
    policy = ArcFlowPolicy(means, logits, rates, src)
    for sigma in (a, b, src):
        got = policy.velocity(sigma)
        assert got.shape == (len(_CONFIGS), 2, 3, 3)
        torch.testing.assert_close(got, _direct_velocity(means, logits, rates, src, sigma), rtol=1e-12, atol=1e-12)


def test_average_velocity_over_zero_length_interval_is_velocity():
    src, a, _ = _config_tensors(_CONFIGS)
    means, logits, rates, _ = _random_policy(len(_CONFIGS), 3, 2, 3, 3, seed=3)
    policy = ArcFlowPolicy(means, logits, rates, src)
    torch.testing.assert_close(policy.average_velocity(a, a), policy.velocity(a), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(policy.average_velocity(a, a), _direct_velocity(means, logits, rates, src, a),
                               rtol=1e-12, atol=1e-12)
    x = torch.randn(len(_CONFIGS), 2, 3, 3, dtype=F64)
    torch.testing.assert_close(policy.integrate(x, a, a), x, rtol=0, atol=0)


def test_average_velocity_limit_approaches_velocity():
    src, a, _ = _config_tensors(_CONFIGS)
    means, logits, rates, _ = _random_policy(len(_CONFIGS), 3, 2, 3, 3, seed=4)
    policy = ArcFlowPolicy(means, logits, rates, src)
    b = a - 1e-7
    torch.testing.assert_close(policy.average_velocity(a, b), policy.velocity(a), rtol=1e-5, atol=1e-6)


def test_closed_form_reference_agrees_with_quadrature():
    """Sanity check of the two independent references against each other."""
    src, a, b = _config_tensors(_CONFIGS)
    means, logits, rates, _ = _random_policy(len(_CONFIGS), 3, 2, 3, 3, seed=9)
    q, scale = _quadrature_increment(_np(means), _np(logits), _np(rates), _np(src), _np(a), _np(b))
    c, _ = _closed_form_increment(_np(means), _np(logits), _np(rates), _np(src), _np(a), _np(b))
    assert (np.abs(q - c) / scale).max() < 1e-12


def test_composition_of_integrations():
    configs = [(1.0, 1.0, 0.55, 0.0), (0.8, 0.6, 0.6, 0.2), (0.5, 0.45, 0.1, 0.1), (0.9, 0.7, 0.3, 0.05)]
    src, a, mid, c = (_col(v) for v in zip(*configs))
    means, logits, rates, _ = _random_policy(len(configs), 4, 3, 2, 2, seed=11)
    policy = ArcFlowPolicy(means, logits, rates, src)
    x = torch.randn(len(configs), 3, 2, 2, dtype=F64)
    two_step = policy.integrate(policy.integrate(x, a, mid), mid, c)
    one_step = policy.integrate(x, a, c)
    torch.testing.assert_close(two_step, one_step, rtol=1e-12, atol=1e-12)
    # And average velocities combine as length-weighted means.
    h1, h2 = (a - mid).reshape(-1, 1, 1, 1), (mid - c).reshape(-1, 1, 1, 1)
    combined = h1 * policy.average_velocity(a, mid) + h2 * policy.average_velocity(mid, c)
    torch.testing.assert_close(combined, (h1 + h2) * policy.average_velocity(a, c), rtol=1e-12, atol=1e-12)


def test_integrate_preserves_shape_and_dtype():
    for dtype in (torch.float32, torch.float64):
        means, logits, rates, src = _random_policy(2, 3, 4, 3, 5, seed=0, dtype=dtype)
        policy = ArcFlowPolicy(means, logits, rates, src)
        x = torch.randn(2, 4, 3, 5, dtype=dtype)
        a, b = torch.tensor([1.0, 0.5], dtype=dtype), torch.tensor([0.5, 0.0], dtype=dtype)
        for out in (policy.integrate(x, a, b), policy.average_velocity(a, b), policy.velocity(b)):
            assert out.shape == (2, 4, 3, 5)
            assert out.dtype == dtype


def test_single_mode_policy_is_constant_velocity():
    """K = 1: rates has shape (B, 0, 1, H, W); the only mode has rate 0, so v = m_1."""
    means = torch.randn(2, 1, 3, 2, 2, dtype=F64)
    policy = ArcFlowPolicy(means, torch.randn(2, 1, 1, 2, 2, dtype=F64), torch.zeros(2, 0, 1, 2, 2, dtype=F64),
                           _col([1.0, 0.7]))
    a, b = _col([0.9, 0.7]), _col([0.2, 0.0])
    torch.testing.assert_close(policy.velocity(b), means[:, 0])
    torch.testing.assert_close(policy.average_velocity(a, b), means[:, 0])
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(policy.integrate(x, a, b), x - (a - b).reshape(-1, 1, 1, 1) * means[:, 0])


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def _gradcheck_inputs(rate_kind):
    gen = torch.Generator().manual_seed(21)
    means = torch.randn(3, 3, 2, 1, 2, generator=gen, dtype=F64)
    logits = torch.randn(3, 3, 1, 1, 2, generator=gen, dtype=F64)
    if rate_kind == "zero":
        rates = torch.zeros(3, 2, 1, 1, 2, dtype=F64)
    elif rate_kind == "tiny":
        rates = torch.tensor([[1e-8, -1e-5], [-1e-8, 1e-5]], dtype=F64).reshape(1, 2, 1, 1, 2).repeat(3, 1, 1, 1, 1)
    else:
        rates = 4.0 * (2 * torch.rand(3, 2, 1, 1, 2, generator=gen, dtype=F64) - 1)
        rates[:, 0, 0, 0, 0] = 0.0  # exact zeros mixed in
        rates[0, 1, 0, 0, 1] = 0.0
    x = torch.randn(3, 2, 1, 2, generator=gen, dtype=F64)
    # sample 0: ordinary interval; sample 1: zero length; sample 2: starts at sigma_src.
    src, a, b = _col([0.9, 0.6, 0.5]), _col([0.7, 0.4, 0.5]), _col([0.2, 0.4, 0.0])
    return means, logits, rates, x, src, a, b


@pytest.mark.parametrize("rate_kind", ["mixed", "zero", "tiny"])
def test_gradcheck_integrate_and_average_velocity(rate_kind):
    means, logits, rates, x, src, a, b = _gradcheck_inputs(rate_kind)
    tensors = [t.clone().requires_grad_(True) for t in (means, logits, rates, x)]

    def integrate(m, l, g, x_):
        return ArcFlowPolicy(m, l, g, src).integrate(x_, a, b)

    def average(m, l, g):
        return ArcFlowPolicy(m, l, g, src).average_velocity(a, b)

    def velocity(m, l, g):
        return ArcFlowPolicy(m, l, g, src).velocity(b)

    assert torch.autograd.gradcheck(integrate, tuple(tensors))
    assert torch.autograd.gradcheck(average, tuple(tensors[:3]))
    assert torch.autograd.gradcheck(velocity, tuple(tensors[:3]))


def test_gradcheck_wrt_sigmas():
    means, logits, rates, x, src, a, b = _gradcheck_inputs("mixed")
    sig = [t.clone().requires_grad_(True) for t in (src, a, b)]

    def integrate(s, sa, sb):
        return ArcFlowPolicy(means, logits, rates, s).integrate(x, sa, sb)

    assert torch.autograd.gradcheck(integrate, tuple(sig))
    # d x(sigma_b) / d sigma_b = v(sigma_b) (elementwise, per sample).
    sb = b.clone().requires_grad_(True)
    policy = ArcFlowPolicy(means, logits, rates, src)
    out = policy.integrate(x, a, sb)
    v = policy.velocity(b)
    for i in range(out.shape[0]):
        (grad,) = torch.autograd.grad(out[i].sum(), sb, retain_graph=True)
        torch.testing.assert_close(grad[i], v[i].sum(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# Finiteness and edge cases
# --------------------------------------------------------------------------------------


def test_zero_rates_give_weighted_mean_times_h():
    src, a, b = _config_tensors(_CONFIGS)
    means, logits, _, _ = _random_policy(len(_CONFIGS), 3, 2, 3, 3, seed=2)
    rates = torch.zeros(len(_CONFIGS), 2, 1, 3, 3, dtype=F64)
    policy = ArcFlowPolicy(means, logits, rates, src)
    mean = (torch.softmax(logits, dim=1) * means).sum(dim=1)
    h = (a - b).reshape(-1, 1, 1, 1)
    x = torch.randn_like(mean)
    torch.testing.assert_close(x - policy.integrate(x, a, b), h * mean, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(policy.average_velocity(a, b), mean, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(policy.velocity(b), mean, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("tiny", [1e-8, -1e-8, 1e-5, -1e-5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiny_rates_agree_with_rate_zero(tiny, dtype):
    src, a, b = _config_tensors(_CONFIGS)
    means, logits, _, _ = _random_policy(len(_CONFIGS), 3, 2, 3, 3, seed=6)
    rates = torch.full((len(_CONFIGS), 2, 1, 3, 3), tiny, dtype=F64)
    tiny_policy = ArcFlowPolicy(means.to(dtype), logits.to(dtype), rates.to(dtype), src.to(dtype))
    zero_policy = ArcFlowPolicy(means, logits, torch.zeros_like(rates), src)
    a_, b_ = a.to(dtype), b.to(dtype)

    got = tiny_policy.average_velocity(a_, b_).to(F64)
    assert torch.isfinite(got).all()
    zero = zero_policy.average_velocity(a, b)
    scale = (torch.softmax(logits, dim=1) * means.abs()).sum(dim=1)
    # The true difference from rate 0 is O(|g| (sigma_src - sigma_b)) <= |g|.
    dtype_eps = 1e-13 if dtype == F64 else 2e-6
    assert ((got - zero).abs() / scale).max() < 2 * abs(tiny) + dtype_eps

    # Against the float64 closed form, which resolves the tiny rate exactly.
    ref, ref_scale = _closed_form_increment(_np(means), _np(logits), _np(rates), _np(src), _np(a), _np(b))
    h = _np(a - b).reshape(-1, 1, 1, 1)
    nonzero = h[:, 0, 0, 0] > 0
    rel = np.abs(_np(got) - ref / np.where(h > 0, h, 1))[nonzero] / (ref_scale / np.where(h > 0, h, 1))[nonzero]
    assert rel.max() < (1e-12 if dtype == F64 else 2e-6), rel.max()

    # Gradients through tiny rates stay finite.
    leaves = [t.detach().clone().requires_grad_(True) for t in (means.to(dtype), logits.to(dtype), rates.to(dtype))]
    out = ArcFlowPolicy(*leaves, src.to(dtype)).integrate(torch.zeros(len(_CONFIGS), 2, 3, 3, dtype=dtype), a_, b_)
    out.square().sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


# (rate of mode 2, sigma_src, sigma_a, sigma_b, dtypes in which the true values are representable)
_LARGE_CASES = [
    (-200.0, 1.0, 1.0, 0.0, ("f32", "f64")),     # contribution (1 - e^-200) / 200
    (-200.0, 1.0, 0.5, 0.0, ("f32", "f64")),     # e^-100 / 200: mode 2 vanishes (underflows in f32)
    (-1e4, 1.0, 1.0, 0.0, ("f32", "f64")),
    (-1e4, 1.0, 0.9, 0.2, ("f32", "f64")),       # exp(-1000): exactly 0 in both dtypes
    (-1e4, 0.5, 0.5, 0.5, ("f32", "f64")),       # zero-length interval at sigma_src
    (-1e4, 1.0, 0.999, 0.999, ("f32", "f64")),   # zero-length interval, exp(-10)
    (200.0, 1.0, 1.0, 0.7, ("f32", "f64")),      # g h = 60
    (200.0, 0.5, 0.45, 0.3, ("f32", "f64")),     # g d = 10, g h = 30
    (1e4, 1.0, 1.0, 0.995, ("f32", "f64")),      # g h = 50
    (200.0, 1.0, 1.0, 0.0, ("f64",)),            # e^200 / 200
    (1e4, 1.0, 1.0, 0.94, ("f64",)),             # g h = 600
    (1e4, 0.5, 0.47, 0.45, ("f64",)),            # g d = 300, g h = 200
]


def _large_case_policy(rate, src, a, b, dtype):
    gen = torch.Generator().manual_seed(31)
    means = torch.randn(2, 3, 2, 2, 2, generator=gen, dtype=F64)
    logits = torch.randn(2, 3, 1, 2, 2, generator=gen, dtype=F64)
    rates = torch.empty(2, 2, 1, 2, 2, dtype=F64)
    rates[:, 0] = rate
    rates[:, 1] = 1.3
    sigmas = tuple(torch.full((2,), v, dtype=F64) for v in (src, a, b))
    return means, logits, rates, sigmas


# Only the dtypes in which the true value is representable; the overflowing ones are
# covered by test_overflowing_rates_do_not_give_nan.
_LARGE_PARAMS = [
    pytest.param(case, dtype, id=f"g{case[0]:g}_src{case[1]}_a{case[2]}_b{case[3]}-{name}")
    for case in _LARGE_CASES
    for dtype, name in ((torch.float32, "f32"), (torch.float64, "f64"))
    if name in case[4]
]


@pytest.mark.parametrize("case,dtype", _LARGE_PARAMS)
def test_large_rates_are_finite_and_accurate(case, dtype):
    rate, src_v, a_v, b_v, _ = case
    means, logits, rates, (src, a, b) = _large_case_policy(rate, src_v, a_v, b_v, dtype)
    leaves = [t.to(dtype).requires_grad_(True) for t in (means, logits, rates)]
    x = torch.randn(2, 2, 2, 2, dtype=dtype, requires_grad=True)
    policy = ArcFlowPolicy(*leaves, src.to(dtype))
    a_, b_ = a.to(dtype), b.to(dtype)
    out = policy.integrate(x, a_, b_)
    avg = policy.average_velocity(a_, b_)
    vel = policy.velocity(b_)

    # Reference from the dtype-rounded inputs: in float32, rounding 0.995 alone moves e^{g h} by ~5e-5.
    means, logits, rates, src, a, b = (t.detach().to(dtype).to(F64) for t in (means, logits, rates, src, a, b))
    ref_inc, ref_scale = _closed_form_increment(_np(means), _np(logits), _np(rates), _np(src), _np(a), _np(b))
    zero_len = a_v == b_v
    rtol = 1e-10 if dtype == F64 else 1e-5
    for t in (out, avg, vel):
        assert not torch.isnan(t).any()
        assert torch.isfinite(t).all()
    got_inc = _np(x) - _np(out)
    if zero_len:
        assert np.all(got_inc == 0)
    else:
        # Relative to the size of the largest term; the increment also carries x's rounding.
        denom = ref_scale + (np.abs(_np(x)) * np.finfo(np.float32).eps * 4 if dtype == torch.float32 else 0)
        assert (np.abs(got_inc - ref_inc) / denom).max() < rtol
        h = float(a[0] - b[0])
        assert (np.abs(_np(avg) - ref_inc / h) / (ref_scale / h)).max() < rtol
    ref_vel = _np(_direct_velocity(means, logits, rates, src, b))
    ref_vel_scale = _np(_direct_velocity(means.abs(), logits, rates, src, b))
    assert (np.abs(_np(vel) - ref_vel) / ref_vel_scale).max() < rtol
    if rate < 0 and (src_v - b_v) * abs(rate) > 800:
        # A very negative rate over a long interval removes the mode from v(sigma_b).
        assert np.all(np.abs(_np(vel) - ref_vel) <= rtol * ref_vel_scale)

    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=F64).to(dtype)).sum() for t in (out, avg, vel))
    loss.backward()
    for leaf in [*leaves, x]:
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all(), leaf.grad


def test_very_negative_rate_mode_contribution_vanishes():
    """Mode 2 with g = -1e4 over [0.2, 0.9] below sigma_src = 1: the result is that of modes 1 and 3 only."""
    for dtype in (torch.float32, torch.float64):
        means, logits, rates, (src, a, b) = _large_case_policy(-1e4, 1.0, 0.9, 0.2, dtype)
        full = ArcFlowPolicy(means.to(dtype), logits.to(dtype), rates.to(dtype), src.to(dtype))
        # Keep mode 2 in the softmax (its weight stays) but give it a zero mean.
        means_wo = means.clone()
        means_wo[:, 1] = 0
        ref = ArcFlowPolicy(means_wo, logits, rates, src)
        torch.testing.assert_close(full.average_velocity(a.to(dtype), b.to(dtype)).to(F64),
                                   ref.average_velocity(a, b), rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("dtype,rate,src,a,b", [
    (torch.float32, 200.0, 1.0, 1.0, 0.0),
    (torch.float32, 1e4, 1.0, 0.9, 0.2),
    (torch.float64, 1e4, 1.0, 1.0, 0.0),
])
def test_overflowing_rates_do_not_give_nan(dtype, rate, src, a, b):
    """Where the true value overflows the dtype, the output is +-inf, never NaN."""
    means, logits, rates, (s, sa, sb) = _large_case_policy(rate, src, a, b, dtype)
    policy = ArcFlowPolicy(means.to(dtype), logits.to(dtype), rates.to(dtype), s.to(dtype))
    out = policy.average_velocity(sa.to(dtype), sb.to(dtype))
    assert not torch.isnan(out).any()
    x = torch.zeros(2, 2, 2, 2, dtype=dtype)
    assert not torch.isnan(policy.integrate(x, sa.to(dtype), sb.to(dtype))).any()


@pytest.mark.parametrize("rate", [200.0, -200.0, 1e4, -1e4, 1e20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropped_mode_with_huge_rate_is_harmless(rate, dtype):
    gen = torch.Generator().manual_seed(41)
    means = torch.randn(2, 3, 2, 2, 2, generator=gen, dtype=F64)
    logits = torch.randn(2, 3, 1, 2, 2, generator=gen, dtype=F64)
    rates = torch.empty(2, 2, 1, 2, 2, dtype=F64)
    rates[:, 0] = rate          # mode 2: huge rate ...
    rates[:, 1] = -0.7
    logits[:, 1] = float("-inf")  # ... but dropped
    src, a, b = _col([1.0, 0.8]), _col([0.5, 0.8]), _col([0.0, 0.1])

    leaves = [t.to(dtype).requires_grad_(True) for t in (means, logits, rates)]
    x = torch.randn(2, 2, 2, 2, dtype=dtype, requires_grad=True)
    policy = ArcFlowPolicy(*leaves, src.to(dtype))
    a_, b_ = a.to(dtype), b.to(dtype)
    out = policy.integrate(x, a_, b_)
    avg = policy.average_velocity(a_, b_)
    vel = policy.velocity(b_)

    # Reference: the same policy without mode 2 at all.
    keep = [0, 2]
    reduced = ArcFlowPolicy(means[:, keep], logits[:, keep], rates[:, [1]], src)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(avg.detach().to(F64), reduced.average_velocity(a, b), **tol)
    torch.testing.assert_close(vel.detach().to(F64), reduced.velocity(b), **tol)
    torch.testing.assert_close(out.detach().to(F64), reduced.integrate(x.detach().to(F64), a, b), **tol)

    (out.sum() + avg.sum() + vel.sum()).backward()
    for leaf in [*leaves, x]:
        assert torch.isfinite(leaf.grad).all(), leaf.grad
    assert torch.all(leaves[0].grad[:, 1] == 0)  # dropped mode's mean has no influence
    assert torch.all(leaves[2].grad[:, 0] == 0)  # nor does its rate


# --------------------------------------------------------------------------------------
# Component dropout
# --------------------------------------------------------------------------------------


def _dropout_policy(batch=3, modes=4, seed=0):
    means, logits, rates, src = _random_policy(batch, modes, 2, 3, 3, seed=seed, dtype=torch.float32)
    return ArcFlowPolicy(means, logits, rates, src)


def _dropped_mask(policy):
    """(B, K) bool; asserts the mask is shared by all pixels of a mode."""
    dropped = torch.isneginf(policy.logits)
    flat = dropped.flatten(2)
    assert torch.equal(flat.all(dim=2), flat.any(dim=2)), "dropping must be shared across pixels"
    return flat.any(dim=2)


def test_dropout_p0_changes_nothing():
    policy = _dropout_policy()
    out = policy.dropout(0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.logits, policy.logits)
    assert torch.equal(out.means, policy.means)
    assert torch.equal(out.rates, policy.rates)
    assert torch.equal(out.sigma_src, policy.sigma_src)
    assert not torch.isinf(out.logits).any()


def test_dropout_p1_drops_nothing():
    policy = _dropout_policy(batch=16)
    out = policy.dropout(1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.logits, policy.logits)
    assert not torch.isinf(out.logits).any()


def test_dropout_never_drops_a_single_mode():
    means, logits, _, src = _random_policy(64, 1, 2, 2, 2, seed=0, dtype=torch.float32)
    policy = ArcFlowPolicy(means, logits, torch.zeros(64, 0, 1, 2, 2), src)
    out = policy.dropout(0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.logits, policy.logits)


def test_dropout_frequency_and_independence():
    batch, modes, p = 4000, 4, 0.1
    policy = _dropout_policy(batch=batch, modes=modes)
    out = policy.dropout(p, generator=torch.Generator().manual_seed(123))
    dropped = _dropped_mask(out).double()  # (B, K)

    n = batch * modes
    # P(all K dropped) = p^K = 1e-4 is restored to "none", a negligible bias.
    freq = dropped.mean().item()
    assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), freq
    for k in range(modes):  # every mode is dropped, not just one per sample
        fk = dropped[:, k].mean().item()
        assert abs(fk - p) < 5 * math.sqrt(p * (1 - p) / batch), (k, fk)
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()  # independent across modes
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / batch), both
    # Per sample: patterns vary across the batch.
    per_sample = dropped.sum(dim=1)
    assert (per_sample == 0).any() and (per_sample >= 1).any()
    assert not (dropped == dropped[:1]).all()
    # Nothing else changes: kept logits are untouched; means/rates/sigma_src are the same.
    kept = ~torch.isneginf(out.logits)
    assert torch.equal(out.logits[kept], policy.logits[kept])
    assert torch.equal(out.means, policy.means)
    assert torch.equal(out.rates, policy.rates)
    assert torch.equal(out.sigma_src, policy.sigma_src)


def test_dropout_all_dropped_rule():
    """K = 2, p = 0.9: 81% of samples would lose both modes and keep both instead."""
    batch, p = 4000, 0.9
    out = _dropout_policy(batch=batch, modes=2).dropout(p, generator=torch.Generator().manual_seed(5))
    count = _dropped_mask(out).sum(dim=1)
    assert (count < 2).all(), "a sample lost every mode"
    none = (count == 0).double().mean().item()
    expected = (1 - p) ** 2 + p ** 2
    assert abs(none - expected) < 5 * math.sqrt(expected * (1 - expected) / batch), none


def test_dropout_is_reproducible_with_generator_and_does_not_modify_original():
    policy = _dropout_policy(batch=64, modes=4)
    before = [t.clone() for t in (policy.means, policy.logits, policy.rates, policy.sigma_src)]
    first = policy.dropout(0.3, generator=torch.Generator().manual_seed(7))
    second = policy.dropout(0.3, generator=torch.Generator().manual_seed(7))
    third = policy.dropout(0.3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.logits, second.logits)
    assert not torch.equal(first.logits, third.logits)
    assert torch.isneginf(first.logits).any()
    for t, ref in zip((policy.means, policy.logits, policy.rates, policy.sigma_src), before):
        assert torch.equal(t, ref)
    assert not torch.isinf(policy.logits).any()


def test_dropped_policy_evaluates_finitely_with_gradients():
    means, logits, rates, src = _random_policy(32, 4, 2, 2, 2, seed=3)
    leaves = [t.requires_grad_(True) for t in (means, logits, rates)]
    policy = ArcFlowPolicy(*leaves, src).dropout(0.5, generator=torch.Generator().manual_seed(0))
    a, b = torch.full((32,), 0.8, dtype=F64), torch.full((32,), 0.1, dtype=F64)
    out = policy.average_velocity(a, b)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    # Equals the renormalised mixture of the surviving modes.
    w = torch.softmax(policy.logits.detach(), dim=1)
    g = torch.cat([torch.zeros_like(rates[:, :1]), rates.detach()], dim=1)
    h = 0.7
    ones = torch.ones_like(g)
    phi_ref = torch.where(g == 0, ones, torch.expm1(g * h) / torch.where(g == 0, ones, g * h))
    ref = (w * means.detach() * torch.exp(g * 0.2) * phi_ref).sum(dim=1)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# detach
# --------------------------------------------------------------------------------------


def test_detach_removes_grad_and_keeps_values():
    means, logits, rates, src = _random_policy(2, 3, 2, 2, 2, seed=1)
    leaves = [t.requires_grad_(True) for t in (means, logits, rates)]
    src = src.clone().requires_grad_(True)
    policy = ArcFlowPolicy(*[t * 1.0 for t in leaves], src * 1.0)
    detached = policy.detach()
    for t, ref in zip((detached.means, detached.logits, detached.rates, detached.sigma_src),
                      (policy.means, policy.logits, policy.rates, policy.sigma_src)):
        assert not t.requires_grad
        assert t.grad_fn is None
        assert torch.equal(t, ref.detach())
    assert policy.means.requires_grad  # original untouched
    a, b = torch.full((2,), 0.9, dtype=F64), torch.full((2,), 0.3, dtype=F64)
    out = detached.average_velocity(a, b)
    assert not out.requires_grad
    torch.testing.assert_close(out, policy.average_velocity(a, b).detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Shape validation
# --------------------------------------------------------------------------------------

B, K, C, H, W = 2, 3, 4, 3, 5


def _good():
    return (torch.randn(B, K, C, H, W), torch.randn(B, K, 1, H, W), torch.randn(B, K - 1, 1, H, W), torch.ones(B))


def test_valid_shapes_accepted():
    policy = ArcFlowPolicy(*_good())
    assert policy.num_modes == K


@pytest.mark.parametrize("shape", [
    (B, K, C, H, W),        # one logit per channel
    (B, K + 1, 1, H, W),    # wrong K
    (B, K - 1, 1, H, W),
    (B + 1, K, 1, H, W),    # wrong batch
    (B, K, 2, H, W),
])
def test_bad_logits_shape_raises(shape):
    means, _, rates, src = _good()
    with pytest.raises(ValueError):
        ArcFlowPolicy(means, torch.randn(shape), rates, src)


@pytest.mark.parametrize("shape", [
    (B, K, 1, H + 1, W),    # spatial mismatch with means
    (B, K, 1, 1, 1),        # would silently broadcast
    (B, K),                 # too few dimensions
])
def test_bad_logits_spatial_or_rank_raises(shape):
    means, _, rates, src = _good()
    with pytest.raises(ValueError):
        ArcFlowPolicy(means, torch.randn(shape), rates, src)


@pytest.mark.parametrize("shape", [
    (B, K, 1, H, W),        # K rates instead of K - 1
    (B, K - 2, 1, H, W),
    (B + 1, K - 1, 1, H, W),
    (B, K - 1, C, H, W),    # one rate per channel
])
def test_bad_rates_shape_raises(shape):
    means, logits, _, src = _good()
    with pytest.raises(ValueError):
        ArcFlowPolicy(means, logits, torch.randn(shape), src)


@pytest.mark.parametrize("shape", [
    (B, K - 1, 1, H, W + 1),  # spatial mismatch with means
    (B, K - 1, 1, 1, 1),      # would silently broadcast
    (B, K - 1),               # too few dimensions
])
def test_bad_rates_spatial_or_rank_raises(shape):
    means, logits, _, src = _good()
    with pytest.raises(ValueError):
        ArcFlowPolicy(means, logits, torch.randn(shape), src)


@pytest.mark.parametrize("shape", [(B, 1), (), (B + 1,), (1,), (B, K)])
def test_bad_sigma_src_shape_raises(shape):
    means, logits, rates, _ = _good()
    with pytest.raises(ValueError):
        ArcFlowPolicy(means, logits, rates, torch.ones(shape))
