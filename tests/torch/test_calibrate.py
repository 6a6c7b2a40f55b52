"""Calibration: the curve fit (pure) and a real tiny-mode run on this machine's CPU."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.calibrate.fit import curve_rate, curve_seconds, fit_curve, isotonic_rates
from estimator.hardware.profiles import find_profile

REQUIRED_CLASSES = {
    "matmul.fp32", "matmul.bf16", "matmul.fp16", "attention.fp32", "attention.bf16",
    "attention.fp16", "memory", "elementwise.fp32", "elementwise.bf16", "optimizer",
    "dequant.nf4", "dispatch",
}


def test_fit_interpolates_monotone_measurements():
    # achieved rate rises with work: the curve must pass through every measured point
    overhead = 5e-6
    points = [(w, overhead + w / r) for w, r in [(1e6, 1e9), (1e7, 5e9), (1e8, 2e10), (1e9, 3e10)]]
    curve = fit_curve("matmul.fp32", "flops", points, overhead_seconds=overhead)
    assert curve.overhead_seconds == overhead
    for work, seconds in points:
        assert curve_seconds(curve, work) == pytest.approx(seconds, rel=1e-9)


def test_fit_pools_violators_and_keeps_block_time():
    # the 1e7 point is faster than the 1e8 point (a cache bump): PAV pools the two
    points = [(1e6, 1e-3), (1e7, 1e-4), (1e8, 2e-2)]
    curve = fit_curve("memory", "bytes", points)
    assert list(curve.rates) == sorted(curve.rates)
    pooled = (1e7 + 1e8) / (1e-4 + 2e-2)
    assert curve.rates[1] == pytest.approx(pooled) and curve.rates[2] == pytest.approx(pooled)
    assert curve_seconds(curve, 1e6) == pytest.approx(1e-3)  # unpooled point kept exactly
    block_time = curve_seconds(curve, 1e7) + curve_seconds(curve, 1e8)
    assert block_time == pytest.approx(1e-4 + 2e-2)


def test_fit_merges_equal_work_and_caps_overhead():
    points = [(1e6, 2e-4), (1e6, 4e-4), (1e8, 1e-2)]  # fwd and dgrad of the same shape
    curve = fit_curve("matmul.bf16", "flops", points, overhead_seconds=1.0)
    assert curve.overhead_seconds == pytest.approx(1e-4)  # capped at half the fastest op
    assert len(curve.log10_work) == 2 and curve.num_samples == 3
    assert curve_seconds(curve, 1e6) * 2 == pytest.approx(2e-4 + 4e-4)


def test_curve_clamps_outside_knots_and_interpolates_in_log_work():
    curve = fit_curve("memory", "bytes", [(1e3, 1e-6), (1e5, 1e-5)])
    assert curve_rate(curve, 1.0) == curve.rates[0]
    assert curve_rate(curve, 1e9) == curve.rates[-1]
    assert curve_rate(curve, 1e4) == pytest.approx((curve.rates[0] + curve.rates[1]) / 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e3, 1e12), st.floats(1e-7, 10.0)), min_size=1, max_size=12))
def test_fit_is_always_monotone_and_valid(points):
    curve = fit_curve("matmul.fp32", "flops", points, overhead_seconds=1e-6)
    assert all(b >= a for a, b in zip(curve.rates, curve.rates[1:], strict=False))
    assert all(r > 0 and math.isfinite(r) for r in curve.rates)
    # total predicted time of all points equals total measured time (PAV keeps block sums)
    predicted = sum(curve_seconds(curve, w) for w, _ in points)
    assert predicted == pytest.approx(sum(t for _, t in points), rel=1e-6)


def test_memory_bound_fit_keeps_the_measured_rates():
    """monotone=False: a rate that falls once operands leave the caches stays as measured,
    each knot reproduces its own point."""
    points = [(1e4, 1e-6 + 1e4 / 5e9), (1e6, 1e-6 + 1e6 / 40e9), (1e8, 1e-6 + 1e8 / 8e9)]
    curve = fit_curve("elementwise.bf16", "bytes", points, overhead_seconds=1e-6,
                      monotone=False)
    assert [round(r / 1e9, 6) for r in curve.rates] == [5.0, 40.0, 8.0]
    for w, t in points:
        assert curve_seconds(curve, w) == pytest.approx(t)


def test_isotonic_rates_identity_on_sorted_input():
    assert isotonic_rates([1, 2, 3], [1, 1, 1]) == [1, 2, 3]


@pytest.mark.torch
def test_tiny_calibration_run_stores_a_usable_profile(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from estimator.calibrate.run import calibrate
    from estimator.hardware import detect

    monkeypatch.setenv("NVFREE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    steps = []
    # force: on a busy machine (CI shares its cores) the run would be refused, not stored
    result = calibrate("cpu", "tiny", progress=lambda i, n, label: steps.append((i, n)),
                       force=True)
    profile = result.profile
    assert set(profile.curves) >= REQUIRED_CLASSES, result.skipped
    assert profile.backend == "cpu" and profile.quick and profile.preferred_dtype in (
        "fp32", "bf16", "fp16")
    assert steps[-1][0] == steps[-1][1]  # progress reached the end
    for curve in profile.curves.values():  # FLOP curves monotone, byte curves as measured
        assert curve.unit == "bytes" or list(curve.rates) == sorted(curve.rates)
        assert curve.overhead_seconds >= 0
    assert {"elementwise.fp32", "elementwise.bf16"} <= set(profile.curves)
    assert profile.curves["dispatch"].overhead_seconds > 0
    assert profile.curves["dispatch.autograd"].overhead_seconds > 0
    assert {"matmul_cold.fp32", "matmul_cold.bf16"} <= set(profile.curves)
    assert profile.private_cache_bytes is None or profile.private_cache_bytes > 0
    from estimator.calibrate import benches

    assert not benches._POOLS  # the cold-operand pool is freed after the run
    assert result.path is not None and result.path.parent.parent == tmp_path
    quality = profile.quality
    assert quality is not None and quality.num_points == len(profile.points) > 0
    assert quality.level in ("quiet", "disturbed") and quality.note
    assert find_profile(detect()) == profile


@pytest.mark.torch
def test_timing_harness_reports_ordered_percentiles():
    pytest.importorskip("torch")
    from estimator.calibrate.timing import time_call

    timing = time_call(lambda: sum(range(1000)), min_run_seconds=0.005)
    assert timing.p20_seconds <= timing.median_seconds <= timing.p80_seconds
    assert timing.num_samples >= 3 and timing.num_calls >= 1


@pytest.mark.torch
def test_preferred_dtype_only_when_measured_faster():
    from estimator.calibrate.run import preferred_dtype
    from estimator.specs.calibration import CalibrationPoint

    def m(dtype, label, seconds):
        return CalibrationPoint(op_class=f"matmul.{dtype}", label=f"matmul.{dtype} {label}",
                                work=2e9, seconds=seconds, p20_seconds=seconds)

    slow_bf16 = [m("fp32", "fwd a", 1.0), m("bf16", "fwd a", 40.0)]
    fast_bf16 = [m("fp32", "fwd a", 1.0), m("bf16", "fwd a", 0.3)]
    assert preferred_dtype(slow_bf16) == "fp32"
    assert preferred_dtype(fast_bf16) == "bf16"


@pytest.mark.torch
def test_nf4_dequant_case_times_the_executor_kernel():
    """The dequant.nf4 curve measures the trainer's own NF4 dequantisation (executor/nf4.py):
    n weights out, in bf16, work = 2·n bytes."""
    torch = pytest.importorskip("torch")
    from estimator.calibrate.benches import dequant_cases

    (case,) = dequant_cases([4096])
    out = case.build("cpu")()
    assert out.dtype == torch.bfloat16 and out.numel() == 4096 and case.work == 2 * 4096


@pytest.mark.torch
def test_cpu_clock_needs_one_thread(monkeypatch):
    pytest.importorskip("torch")
    from estimator.calibrate.run import calibrate
    from estimator.errors import NvfreeError

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with pytest.raises(NvfreeError, match="OMP_NUM_THREADS=1"):
        calibrate("cpu", "tiny", save=False, cpu_clock=True)


@pytest.mark.torch
def test_others_busy_fraction_is_a_share():
    pytest.importorskip("torch")
    from estimator.calibrate.timing import cpu_snapshot, others_busy_fraction

    start = cpu_snapshot()
    sum(range(100_000))
    assert 0.0 <= others_busy_fraction(start, cpu_snapshot()) <= 1.0


@pytest.mark.torch
def test_cold_gemm_case_rotates_through_the_pool():
    """Consecutive calls read different operands; the result equals a plain linear."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from estimator.calibrate import benches

    case = benches.cold_gemm_cases("fp32", [(4, 8, 16)], "matmul_cold.fp32",
                                   "matmul_wgrad.fp32", 4096 * 4)[0]
    fn = case.build("cpu")
    assert fn().shape == (4, 16)
    pool = benches.operand_pool("cpu", torch.float32, 4096 * 4)
    seen = []
    rotating = benches._rotating(pool, ((4, 8), (16, 8)),
                                 lambda x, w: seen.append((x.data_ptr(), w.data_ptr())))
    rotating(), rotating()
    assert seen[0] != seen[1]  # other operands each call
    # one buffer serves every dtype (POOL_PATTERN: normal values in fp32, bf16 and fp16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        view = benches.operand_pool("cpu", dtype, 4096 * 4)
        assert bool(torch.isfinite(view).all()) and float(view.abs().min()) >= 1.0
    pool = benches.operand_pool("cpu", torch.float32, 4096 * 4)
    x, w = pool[:32].view(4, 8), pool[32:160].view(16, 8)
    num_slots = 4096 // 160
    for _ in range(num_slots - 1):
        fn()
    assert torch.equal(fn(), F.linear(x, w))  # wrapped around to slot 0
    benches.release_pools()


@pytest.mark.torch
def test_autograd_dispatch_case_counts_its_aten_calls():
    pytest.importorskip("torch")
    from estimator.calibrate import benches

    case = benches.autograd_dispatch_case()
    assert case.op_class == "dispatch.autograd" and case.tiny
    assert case.work >= 2 * benches.AUTOGRAD_CHAIN  # a forward and a backward call per op
    case.build("cpu")()


@pytest.mark.torch
def test_executor_dispatch_case_counts_the_aten_calls_of_its_step():
    pytest.importorskip("torch")
    from estimator.calibrate import benches

    case = benches.executor_dispatch_case()
    step = case.build("cpu")
    step()
    assert case.op_class == "dispatch.autograd" and case.tiny
    assert benches.count_aten_calls(step) == pytest.approx(case.work, rel=0.01)
