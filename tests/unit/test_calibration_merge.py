"""A disturbed timing never replaces a quiet one (calibrate/merge.py), the profile's quality,
the one-line refusal, and the note estimates state. Pure: no torch."""

import pytest

from estimator.calibrate.merge import merge_points, quality_of, refusal
from estimator.hardware.profiles import profile_quality_note
from estimator.specs.calibration import (
    CalibrationPoint,
    CalibrationProfile,
    EfficiencyCurve,
    ProfileQuality,
)

REF = 100e9  # reference GEMM rate of a quiet machine (FLOP/s)


def point(label: str, seconds: float, *, others: float = 0.0, ref: float = REF,
          disturbed: bool | None = None, when: str = "new") -> CalibrationPoint:
    return CalibrationPoint(
        op_class="matmul.fp32", label=f"matmul.fp32 {label}", work=1e9, seconds=seconds,
        p20_seconds=seconds, others_fraction=others, reference_flops_per_second=ref,
        disturbed=others > 0.2 if disturbed is None else disturbed, measured_at=when)


def profile(points: list[CalibrationPoint]) -> CalibrationProfile:
    curve = EfficiencyCurve(op_class="matmul.fp32", unit="flops", log10_work=(9.0,),
                            rates=(1e11,))
    return CalibrationProfile(fingerprint="f", torch_version="2", num_threads=2, backend="cpu",
                              device_name="cpu", created_at="old", curves={"matmul.fp32": curve},
                              points=tuple(points))


def test_quiet_new_timing_replaces_the_old_one() -> None:
    old = profile([point("a", 0.010, when="old")])
    kept, from_previous = merge_points([point("a", 0.012)], old)
    assert from_previous == 0 and kept[0].seconds == 0.012 and kept[0].measured_at == "new"


def test_disturbed_new_timing_never_replaces_a_quiet_one() -> None:
    old = profile([point("a", 0.010, when="old"), point("b", 0.020, when="old")])
    new = [point("a", 0.050, others=0.6), point("b", 0.021)]
    kept, from_previous = merge_points(new, old)
    assert from_previous == 1
    assert [(p.label[-1], p.seconds, p.disturbed) for p in kept] == [
        ("a", 0.010, False), ("b", 0.021, False)]


def test_both_disturbed_keeps_the_less_disturbed_one() -> None:
    old = profile([point("a", 0.030, others=0.3, when="old")])
    kept, from_previous = merge_points([point("a", 0.050, others=0.7)], old)
    assert from_previous == 1 and kept[0].seconds == 0.030 and kept[0].disturbed
    kept, _ = merge_points([point("a", 0.020, others=0.25)], old)
    assert kept[0].seconds == 0.020  # the new one is quieter


def test_points_the_new_run_did_not_measure_are_dropped() -> None:
    old = profile([point("a", 0.010, when="old"), point("old-only", 0.5, when="old")])
    kept, _ = merge_points([point("a", 0.011)], old)
    assert [p.label for p in kept] == ["matmul.fp32 a"]


def test_a_run_slower_throughout_is_disturbed_against_the_old_reference() -> None:
    """CPU accounting saw nothing (another VM, a lower clock), but the reference GEMM ran at
    half the previous profile's rate: every new point counts as disturbed."""
    old = profile([point("a", 0.010, when="old")])
    kept, from_previous = merge_points([point("a", 0.020, ref=REF / 2)], old)
    assert from_previous == 1 and kept[0].seconds == 0.010
    kept, _ = merge_points([point("a", 0.011, ref=REF * 0.9)], old)  # within the limit
    assert kept[0].seconds == 0.011 and not kept[0].disturbed


def test_a_quiet_run_is_judged_against_its_typical_reference_not_its_fastest() -> None:
    """On a quiet 2-core VM the reference sample next to each point spread 1.0–1.75× around
    its run's median (3.2× around its fastest); judged against the fastest, 242 of 275 points
    of a quiet calibration counted as disturbed. Against the median only a gross slowdown
    (a busy core under a 2-thread kernel: 10–100×) does."""
    spread = [1.0, 0.8, 1.3, 0.6, 1.1, 0.9, 1.2, 0.7, 1.0]  # × REF, fastest 1.3, slowest 0.6
    new = [point(str(i), 0.01, ref=REF * f) for i, f in enumerate(spread)]
    kept, _ = merge_points(new, None)
    assert not any(p.disturbed for p in kept)
    kept, _ = merge_points([*new, point("slowed", 0.03, ref=REF / 3)], None)
    assert [p.label for p in kept if p.disturbed] == ["matmul.fp32 slowed"]


def test_no_previous_profile_keeps_the_run() -> None:
    kept, from_previous = merge_points([point("a", 0.05, others=0.5)], None)
    assert from_previous == 0 and kept[0].disturbed


def quality(points, run_points=None, from_previous=0):
    return quality_of(points, num_retimed=1, from_previous=from_previous,
                      run_points=run_points or points, load=3.5)


def test_quality_levels_and_notes() -> None:
    quiet = quality([point("a", 0.01), point("b", 0.02)])
    assert quiet.level == "quiet" and quiet.num_disturbed == 0 and "quiet" in quiet.note
    merged = quality([point("a", 0.01)], [point("a", 0.05, others=0.6)], from_previous=1)
    assert merged.level == "merged" and merged.max_others_fraction == pytest.approx(0.6)
    assert "1 of 1 timings kept from the previous calibration" in merged.note
    bad = quality([point("a", 0.05, others=0.8), point("b", 0.02)])
    assert bad.level == "disturbed" and bad.num_disturbed == 1 and "DISTURBED" in bad.note


def test_refusal_is_one_line_and_says_what_to_do() -> None:
    bad = quality([point("a", 0.05, others=0.8), point("b", 0.02, others=0.4)])
    message = refusal(bad, has_previous=True)
    assert message is not None and "\n" not in message
    assert message.startswith("calibration disturbed: other processes used 60% of the CPUs")
    assert "2 of 2 timings" in message and "load average 3.5" in message
    assert "the previous profile is kept" in message and "--force" in message
    assert "no profile stored" in (refusal(bad, has_previous=False) or "")
    assert refusal(quality([point("a", 0.01)]), has_previous=False) is None


def test_profile_quality_note_for_estimates() -> None:
    assert profile_quality_note(None) is None
    assert "quality unknown" in (profile_quality_note(profile([])) or "")
    q = ProfileQuality(level="quiet", num_points=3)
    note = profile_quality_note(profile([]).model_copy(update={"quality": q}))
    assert note is not None and "none of its 3 timings" in note


def test_one_clock_tick_of_others_on_a_short_point_is_not_a_neighbour() -> None:
    """/proc/stat and os.times() count whole 10 ms ticks: over a 20 ms point on 2 CPUs one
    stray tick read as 25 % of the machine (5 of 91 points of a quiet quick calibration).
    A neighbour that really ran shows beyond the allowance."""
    import os

    from estimator.calibrate.contention import CpuSnapshot, num_cpus, others_busy_fraction

    tick = 1 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
    start = CpuSnapshot(0.0, 100.0, 0.0, 10.0, 1)
    stray = CpuSnapshot(0.02, 100.0 + 0.02 + tick, 0.0, 10.02, 1)  # own 20 ms + one tick
    assert others_busy_fraction(start, stray) == pytest.approx(0.0, abs=1e-9)
    busy = CpuSnapshot(0.5, 100.0 + 0.5 + 0.5, 0.0, 10.5, 2)  # a neighbour on a whole CPU
    assert others_busy_fraction(start, busy) == pytest.approx(
        (0.5 - tick) / (0.5 * num_cpus()))
