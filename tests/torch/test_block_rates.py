"""Memory-bound rates timed on the executor's own step (calibrate/block_rates.py)."""

import pytest

torch = pytest.importorskip("torch")

from estimator.calibrate import block_rates  # noqa: E402
from estimator.calibrate.fit import curve_seconds  # noqa: E402

pytestmark = pytest.mark.torch


def test_time_calls_keeps_forward_and_backward_memory_bound_calls():
    """GEMMs, views and what runs after backward (the optimizer's work) are left out; every
    kept call has its aten bytes."""
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(32, 32)
    after = torch.ones(1000)

    def step():
        y = (x * 2.0) @ w  # mul kept (read x, write y: 8 KiB), mm left out
        y.view(-1).sum().backward()  # sum and backward's memory-bound calls kept
        after.add_(1.0)  # after backward: left out (4000 B written)

    points = block_rates.time_calls(step)
    assert points and all(t > 0 for _, t in points)
    assert points[0][0] == 2 * 32 * 32 * 4
    assert 4000 not in [b for b, _ in points]


def test_binned_pools_a_quarter_decade_and_reproduces_its_time():
    points = [(1000.0, 1e-6), (1100.0, 3e-6), (1e6, 1e-4)]
    bins = block_rates.binned(points)
    assert bins == [(1050.0, 2e-6), (1e6, 1e-4)]


def test_step_points_give_a_usable_curve():
    """A real (small) executor step: calls from bytes-sized to activation-sized, positive
    rates, and the fitted curve reproduces each bin's mean time."""
    points = block_rates.step_points("bf16", 64, steps=2)
    assert len(points) > 100
    bins = block_rates.binned(points)
    curve = block_rates.fit_curve("elementwise.bf16", "bytes", bins, monotone=False)
    assert min(curve.rates) > 0 and curve.unit == "bytes"
    for work, seconds in bins:
        assert curve_seconds(curve, work) == pytest.approx(seconds, rel=1e-9)
