"""Tests of the time discretisation, against the specification:

    sigma(tau) = s tau / (1 + (s - 1) tau)
    n-NFE segments in raw time: D = 1 / (n - 1 + r); lengths D, ..., D, r D (sum 1)
    teacher_ratio(iter, N) = 1 - min(iter, N) / N
"""

from __future__ import annotations

import math

import pytest
import torch

from arcflow.method.schedule import segment_bounds, segment_lengths, shifted_sigma, teacher_ratio

# --------------------------------------------------------------------------------------
# shifted_sigma
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 0.5, 2.0, 3.0, 7.5])
def test_shifted_sigma_endpoints_and_monotone(shift):
    assert shifted_sigma(0.0, shift) == pytest.approx(0.0, abs=1e-15)
    assert shifted_sigma(1.0, shift) == pytest.approx(1.0, rel=1e-15)
    tau = torch.linspace(0, 1, 1001, dtype=torch.float64)
    sigma = shifted_sigma(tau, shift)
    assert isinstance(sigma, torch.Tensor) and sigma.shape == tau.shape
    assert sigma[0].item() == pytest.approx(0.0, abs=1e-15)
    assert sigma[-1].item() == pytest.approx(1.0, rel=1e-15)
    assert (sigma[1:] > sigma[:-1]).all()
    assert ((sigma >= 0) & (sigma <= 1)).all()


@pytest.mark.parametrize("tau,shift,expected", [
    (0.5, 3.0, 0.75),            # 1.5 / 2
    (0.25, 3.0, 0.5),            # 0.75 / 1.5
    (0.5, 1.0, 0.5),             # shift 1 is the identity
    (0.3, 1.0, 0.3),
    (0.5, 0.5, 1.0 / 3.0),       # 0.25 / 0.75
    (0.2, 4.0, 0.8 / 1.6),
])
def test_shifted_sigma_values(tau, shift, expected):
    assert shifted_sigma(tau, shift) == pytest.approx(expected, rel=1e-12)
    assert shifted_sigma(torch.tensor([tau], dtype=torch.float64), shift).item() == pytest.approx(expected, rel=1e-12)


def test_shifted_sigma_larger_shift_means_more_noise():
    tau = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert (shifted_sigma(tau, 3.0) > shifted_sigma(tau, 1.0)).all()
    assert (shifted_sigma(tau, 1.0) > shifted_sigma(tau, 0.5)).all()


# --------------------------------------------------------------------------------------
# segment_lengths / segment_bounds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("r", [0.25, 0.5, 1.0, 2.0, 3.7])
def test_segment_lengths_sum_to_one_and_follow_ratio(n, r):
    lengths = segment_lengths(n, r)
    assert len(lengths) == n
    assert math.fsum(lengths) == pytest.approx(1.0, abs=1e-12)
    base = 1.0 / (n - 1 + r)
    for length in lengths[:-1]:
        assert length == pytest.approx(base, rel=1e-12)
    assert lengths[-1] == pytest.approx(r * base, rel=1e-12)
    assert all(length > 0 for length in lengths)


def test_segment_lengths_known_values():
    assert segment_lengths(2, 1.0) == pytest.approx([0.5, 0.5])
    assert segment_lengths(2) == pytest.approx([0.5, 0.5])  # r defaults to 1
    assert segment_lengths(1, 1.0) == pytest.approx([1.0])
    assert segment_lengths(1, 3.0) == pytest.approx([1.0])  # a single segment spans everything
    assert segment_lengths(2, 3.0) == pytest.approx([0.25, 0.75])
    assert segment_lengths(3, 0.5) == pytest.approx([0.4, 0.4, 0.2])
    assert segment_lengths(4, 1.0) == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("n", [0, -1, -5])
def test_segment_lengths_invalid_n(n):
    with pytest.raises(ValueError):
        segment_lengths(n, 1.0)
    with pytest.raises(ValueError):
        segment_bounds(n, 1.0)


@pytest.mark.parametrize("r", [0.0, -0.5, -2.0])
def test_segment_lengths_invalid_r(r):
    with pytest.raises(ValueError):
        segment_lengths(2, r)
    with pytest.raises(ValueError):
        segment_bounds(2, r)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("r", [0.5, 1.0, 2.5])
def test_segment_bounds_cover_one_to_zero(n, r):
    bounds = segment_bounds(n, r)
    lengths = segment_lengths(n, r)
    assert len(bounds) == n
    assert bounds[0][0] == 1.0
    assert bounds[-1][1] == 0.0  # exactly
    for (start, end), length in zip(bounds, lengths):
        assert start > end
        assert start - end == pytest.approx(length, abs=1e-12)
    for (_, end), (start, _) in zip(bounds[:-1], bounds[1:]):
        assert end == start  # contiguous, no gaps


def test_segment_bounds_known_values():
    assert segment_bounds(2, 1.0) == [(1.0, 0.5), (0.5, 0.0)]
    got = segment_bounds(2, 3.0)
    assert got[0] == pytest.approx((1.0, 0.75))
    assert got[1] == pytest.approx((0.75, 0.0))


# --------------------------------------------------------------------------------------
# teacher_ratio
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [1, 10, 1000])
def test_teacher_ratio_endpoints(decay):
    assert teacher_ratio(0, decay) == 1.0
    assert teacher_ratio(decay, decay) == 0.0
    assert teacher_ratio(decay + 1, decay) == 0.0
    assert teacher_ratio(10 * decay, decay) == 0.0


def test_teacher_ratio_linear_decay():
    assert teacher_ratio(50, 100) == pytest.approx(0.5)
    assert teacher_ratio(25, 100) == pytest.approx(0.75)
    values = [teacher_ratio(i, 100) for i in range(0, 120)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= 1.0 for v in values)
