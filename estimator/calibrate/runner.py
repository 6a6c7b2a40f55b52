"""The timing loop of a calibration run: every case and recording bracketed by contention
checks (calibrate/contention.py), re-timed while disturbed and the wait budget lasts, skipped
when projected too slow, and the run given up when the machine is plainly busy."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from estimator.calibrate import suite
from estimator.calibrate.benches import Case
from estimator.calibrate.contention import Disturbance, Monitor, ReferenceKernel
from estimator.calibrate.merge import score
from estimator.calibrate.suite import ModeSettings
from estimator.calibrate.timing import time_call, wait_until_idle
from estimator.specs.calibration import CalibrationPoint

Progress = Callable[[int, int, str], None]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Runner:
    """Times cases and recordings on one device with contention checks; keeps the run's
    state (rates per kind for the skip projection, the wait budget, re-time counts)."""

    device: str
    settings: ModeSettings
    reference: ReferenceKernel | None
    measured_at: str = field(default_factory=_now)
    started: float = field(default_factory=time.perf_counter)
    wait_left: float = 0.0
    num_retimed: int = 0
    rates: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.wait_left = self.settings.max_wait_seconds

    @property
    def quiet_rate(self) -> float:
        return self.reference.quiet_rate if self.reference else 0.0

    @property
    def fastest_rate(self) -> float:
        return self.reference.fastest_rate if self.reference else 0.0

    def point(self, op_class: str, label: str, work: float, seconds: float, p20: float,
              disturbance: Disturbance, *, tiny: bool = False, calls: int = 1,
              ) -> CalibrationPoint:
        """A timed point with its disturbance (judged against the run's typical reference)."""
        if self.settings.cpu_clock:  # CPU time: other processes cannot inflate it
            disturbance = Disturbance(0.0, 0.0, disturbance.max_running)
        elif self.device != "cpu":  # an accelerator's kernels do not share the host's cores:
            # only its own reference GEMM can tell that it was slowed
            disturbance = Disturbance(0.0, disturbance.reference_rate, disturbance.max_running)
        return CalibrationPoint(
            op_class=op_class, label=label, work=work, seconds=seconds, p20_seconds=p20,
            tiny=tiny, num_calls=calls, others_fraction=disturbance.others_fraction,
            reference_flops_per_second=disturbance.reference_rate,
            disturbed=disturbance.disturbed(self.quiet_rate, self.fastest_rate),
            measured_at=self.measured_at)

    def retries_left(self) -> int:
        elapsed = time.perf_counter() - self.started
        in_budget = self.wait_left > 0 and elapsed < self.settings.retry_until_seconds
        return self.settings.max_retries if in_budget else 0

    def wait(self) -> None:
        start = time.perf_counter()
        wait_until_idle(max(0.0, self.wait_left))
        self.wait_left -= time.perf_counter() - start

    def time_case(self, case: Case, fn: Callable[[], object]) -> CalibrationPoint:
        s = self.settings
        with Monitor(self.reference) as monitor:
            timing = time_call(
                fn, device=self.device, warmup_seconds=s.warmup_seconds,
                min_run_seconds=s.min_run_seconds, min_samples=s.min_samples,
                max_samples=s.max_samples, max_seconds=s.max_case_seconds,
                clock=time.process_time if s.cpu_clock else time.perf_counter)
        return self.point(case.op_class, case.label, case.work, timing.median_seconds,
                          timing.p20_seconds, monitor.result(), tiny=case.tiny)

    def measure(self, case: Case, retries: int) -> CalibrationPoint:
        """Time a case; while disturbed (and retries are left) wait for idle CPUs and time it
        again, keeping the quietest timing."""
        fn = case.build(self.device)
        best: CalibrationPoint | None = None
        for attempt in range(retries + 1):
            if attempt or (self.settings.wait_first and self.wait_left > 0):
                self.wait()
            if attempt:
                self.num_retimed += 1
            current = self.time_case(case, fn)
            if not current.disturbed:
                return current
            if best is None or (current.others_fraction, current.seconds) < (
                    best.others_fraction, best.seconds):
                best = current
        assert best is not None
        return best

    def record(self, produce: Callable[[], list[tuple[str, float, float, int]]], op_class: str,
               *, tiny_first: bool = False) -> list[CalibrationPoint]:
        """Points of a recording (an executor step, the collectives) that share one
        disturbance: `produce` returns (label, work, mean seconds, calls) rows; re-recorded
        once when disturbed and retries are left, keeping the quieter recording."""
        best: list[CalibrationPoint] = []
        for attempt in range(1 + min(1, self.retries_left())):
            if attempt:
                self.wait()
                self.num_retimed += 1
            with Monitor(self.reference) as monitor:
                rows = produce()
            disturbance = monitor.result()
            points = [self.point(op_class, label, work, seconds, seconds, disturbance,
                                 tiny=tiny_first and i == 0, calls=calls)
                      for i, (label, work, seconds, calls) in enumerate(rows)]
            if not best or (points and points[0].others_fraction < best[0].others_fraction):
                best = points
            if points and not points[0].disturbed:
                break
        return best

    def projected_seconds(self, case: Case) -> float:
        """work / the rate the case's kind last measured (else the class's best)."""
        rate = self.rates.get((case.op_class, _kind(case)))
        rate = rate or max((r for (c, _), r in self.rates.items() if c == case.op_class),
                           default=0.0)
        return case.work / rate if rate else 0.0

    def run_cases(self, cases: list[Case], progress: Progress | None = None,
                  ) -> tuple[list[CalibrationPoint], list[tuple[str, str]], bool]:
        """Time every case (skipping ones projected too slow or failing): (points, skipped,
        whether the run gave up because the machine was busy)."""
        points: list[CalibrationPoint] = []
        skipped: list[tuple[str, str]] = []
        for i, case in enumerate(cases):
            if progress is not None:
                progress(i, len(cases), case.label)
            if self.busy(points):
                skipped += [(c.label, "machine busy") for c in cases[i:]]
                return points, skipped, True
            projected = self.projected_seconds(case)
            if not case.tiny and projected > self.settings.max_call_seconds:
                skipped.append((case.label, f"projected {projected:.2f} s per call"))
                continue
            try:
                point = self.measure(case, self.retries_left())
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                skipped.append((case.label, str(exc).splitlines()[0][:120] if str(exc)
                                else "error"))
                continue
            points.append(point)
            if not case.tiny and point.seconds > 0:
                self.rates[(case.op_class, _kind(case))] = case.work / point.seconds
        if progress is not None:
            progress(len(cases), len(cases), "done")
        return points, skipped, False

    def busy(self, points: list[CalibrationPoint]) -> bool:
        """The first ABORT_AFTER points were mostly disturbed (the mode's share)."""
        if len(points) < suite.ABORT_AFTER:
            return False
        first = points[:suite.ABORT_AFTER]
        return sum(p.disturbed for p in first) >= self.settings.abort_disturbed_share * len(first)

    def second_pass(self, cases: list[Case], points: list[CalibrationPoint]) -> None:
        """Re-time, within the mode's second_pass_seconds, the cases whose point is still
        disturbed (in place; the quieter timing is kept: a quiet one, else the lower score —
        a point slowed only by its reference GEMM has no others' share to compare)."""
        deadline = time.perf_counter() + self.settings.second_pass_seconds
        by_label = {c.label: c for c in cases}
        for i, point in enumerate(points):
            case = by_label.get(point.label)
            if not point.disturbed or case is None or time.perf_counter() > deadline:
                continue
            self.num_retimed += 1
            again = self.time_case(case, case.build(self.device))
            quiet = self.quiet_rate
            if not again.disturbed or score(again, quiet) < score(point, quiet):
                points[i] = again


def _kind(case: Case) -> str:
    """The orientation word of a case label (fwd, dgrad, copy …): its rate projects the next
    size of the same kind (bf16 dgrad ran 100× slower than bf16 fwd on an AVX2-only CPU)."""
    return next((w for w in case.label.split()
                 if w != case.op_class and not any(ch.isdigit() for ch in w)), "")
