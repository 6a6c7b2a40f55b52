"""Never let a disturbed timing replace a quiet one: per-point merge of a new calibration run
with the profile it would replace, the profile's quality, and the refusal to store.

Pure Python (no torch). Rule, per point (same op class and label in both runs):
- the new timing was quiet → the new one (the machine as it is now);
- the new one was disturbed and the old one quiet → the old one;
- both disturbed → the less disturbed one (lower `score`), then the faster.
Points the new run did not measure are dropped: the new run's plan (quick or full) defines
what the profile covers. A point is judged against its own run's typical reference GEMM
(the median, contention.SLOWDOWN_LIMIT); a whole run is disturbed when its median reference
ran RUN_SLOWDOWN_LIMIT× slower than the previous profile's (a slowdown CPU accounting cannot
see: another VM on the host, a lower clock); then every new point counts as disturbed.

A profile whose kept points include disturbed ones is not stored (`refusal` says why in one
line) unless the caller forces it, and then it is marked `disturbed`.
"""

from __future__ import annotations

import statistics

from estimator.calibrate.contention import (
    DISTURBED_FRACTION,
    FASTEST_LIMIT,
    RUN_SLOWDOWN_LIMIT,
    SLOWDOWN_LIMIT,
)
from estimator.hardware.profiles import quality_note
from estimator.specs.calibration import CalibrationPoint, CalibrationProfile, ProfileQuality


def _slowdown(point: CalibrationPoint, quiet_rate: float) -> float:
    rate = point.reference_flops_per_second
    if rate <= 0 or quiet_rate <= 0:
        return 1.0
    return max(1.0, quiet_rate / rate)


def is_disturbed(point: CalibrationPoint, quiet_rate: float = 0.0,
                 fastest_rate: float = 0.0) -> bool:
    """Other processes took more than DISTURBED_FRACTION of the CPUs while it was timed, or
    its reference ran SLOWDOWN_LIMIT× slower than `quiet_rate` (its run's typical rate) or
    FASTEST_LIMIT× slower than `fastest_rate` (its run's fastest sample)."""
    return point.others_fraction > DISTURBED_FRACTION or (
        _slowdown(point, quiet_rate) > SLOWDOWN_LIMIT) or (
        _slowdown(point, fastest_rate) > FASTEST_LIMIT)


def fastest_reference(points: list[CalibrationPoint] | tuple[CalibrationPoint, ...]) -> float:
    """A run's fastest reference GEMM sample (FLOP/s; 0 if none was sampled)."""
    return max((p.reference_flops_per_second for p in points), default=0.0)


def score(point: CalibrationPoint, quiet_rate: float = 0.0) -> float:
    """Lower = quieter: the others' CPU share plus the reference's excess slowdown."""
    return point.others_fraction + (_slowdown(point, quiet_rate) - 1.0)


def typical_reference(points: list[CalibrationPoint] | tuple[CalibrationPoint, ...]) -> float:
    """A run's typical reference GEMM rate: the median over its points that CPU accounting
    found quiet (all of them when none was; FLOP/s; 0 if none was sampled)."""
    rates = [p.reference_flops_per_second for p in points if p.reference_flops_per_second > 0]
    quiet = [p.reference_flops_per_second for p in points
             if p.reference_flops_per_second > 0 and p.others_fraction <= DISTURBED_FRACTION]
    return statistics.median(quiet or rates) if rates else 0.0


def merge_points(new: list[CalibrationPoint], old: CalibrationProfile | None,
                 ) -> tuple[list[CalibrationPoint], int]:
    """Per-point merge of a new run with the previous profile: (kept points, how many came
    from the previous profile). Every kept point's `disturbed` is re-judged against the
    quiet machine of both runs."""
    old_points = {(p.op_class, p.label): p for p in (old.points if old else ())}
    baseline = typical_reference(new)
    old_baseline = typical_reference(list(old_points.values()))
    run_slowed = baseline > 0 and baseline * RUN_SLOWDOWN_LIMIT < old_baseline
    fastest = fastest_reference(new)
    old_fastest = fastest_reference(list(old_points.values()))
    kept: list[CalibrationPoint] = []
    from_previous = 0
    for point in new:
        point = _judged(point, baseline, fastest, run_slowed)
        previous = old_points.get((point.op_class, point.label))
        if previous is not None and point.disturbed:
            previous = _judged(previous, old_baseline, old_fastest)
            if not previous.disturbed or (score(previous, old_baseline), previous.seconds) < (
                    score(point, baseline), point.seconds):
                point = previous
                from_previous += 1
        kept.append(point)
    return kept, from_previous


def _judged(point: CalibrationPoint, baseline: float, fastest: float = 0.0,
            run_slowed: bool = False) -> CalibrationPoint:
    disturbed = run_slowed or is_disturbed(point, baseline, fastest)
    return point if disturbed == point.disturbed else point.model_copy(
        update={"disturbed": disturbed})


def quality_of(points: list[CalibrationPoint], *, num_retimed: int, from_previous: int,
               run_points: list[CalibrationPoint], load: float | None) -> ProfileQuality:
    """The profile's quality from its kept points and the run's own timings (run_points)."""
    num_disturbed = sum(p.disturbed for p in points)
    level = "disturbed" if num_disturbed else ("merged" if from_previous else "quiet")
    fractions = [p.others_fraction for p in run_points] or [0.0]
    quality = ProfileQuality(
        level=level, num_points=len(points), num_disturbed=num_disturbed,
        num_retimed=num_retimed, num_from_previous=from_previous,
        mean_others_fraction=statistics.fmean(fractions), max_others_fraction=max(fractions),
        reference_flops_per_second=typical_reference(points), load_average=load)
    return quality.model_copy(update={"note": quality_note(quality)})


def refusal(quality: ProfileQuality, *, has_previous: bool) -> str | None:
    """Why a profile of this quality is not stored (one line), or None to store it."""
    if quality.level != "disturbed":
        return None
    load = "" if quality.load_average is None else f", load average {quality.load_average:.1f}"
    kept = ("the previous profile is kept" if has_previous
            else "no profile stored")
    return (f"calibration disturbed: other processes used {quality.mean_others_fraction:.0%} of "
            f"the CPUs (up to {quality.max_others_fraction:.0%}{load}) and {quality.num_disturbed}"
            f" of {quality.num_points} timings stayed slowed after re-timing; {kept} — rerun "
            "when the machine is quiet, or `--force` to store it marked disturbed")
