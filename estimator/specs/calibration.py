"""Measured efficiency curves of one machine: what the calibrated model reads."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from estimator.specs.base import Spec

CALIBRATION_SCHEMA_VERSION = 1

WorkUnit = Literal["flops", "bytes"]


class EfficiencyCurve(Spec):
    """Achieved rate as a monotone piecewise-linear function of log10(work), plus a fixed
    per-op overhead: seconds(W) = overhead_seconds + W / rate(log10 W) (Calculon-style curve,
    anchors.md Part 2 §0)."""

    op_class: str
    """Op class key, e.g. 'matmul.fp32', 'attention.bf16', 'memory', 'optimizer', 'dequant.nf4'."""
    unit: WorkUnit
    """What the work W counts: FLOPs for compute-bound ops, bytes moved for memory-bound ops."""
    log10_work: tuple[float, ...] = Field(min_length=1)
    """Knots: log10 of the work of the measured ops, strictly increasing."""
    rates: tuple[float, ...] = Field(min_length=1)
    """Achieved rate at each knot (FLOP/s or bytes/s); non-decreasing for FLOP curves (GEMM
    efficiency grows with size), as measured for byte curves (a memory-bound rate falls once
    the operands leave the caches)."""
    overhead_seconds: float = Field(default=0.0, ge=0)
    """Fixed cost per op call (seconds): dispatch, launch, thread wake-up."""
    num_samples: int = Field(default=0, ge=0)
    """Measurements the curve was fitted to (count)."""

    @model_validator(mode="after")
    def _check(self) -> "EfficiencyCurve":
        if len(self.log10_work) != len(self.rates):
            raise ValueError("log10_work and rates must have the same length")
        if any(b <= a for a, b in zip(self.log10_work, self.log10_work[1:], strict=False)):
            raise ValueError("log10_work must be strictly increasing")
        if self.unit == "flops" and any(b < a for a, b in zip(self.rates, self.rates[1:],
                                                               strict=False)):
            raise ValueError("rates of a FLOP curve must be non-decreasing in work")
        if any(r <= 0 for r in self.rates):
            raise ValueError("rates must be positive")
        return self


class CalibrationPoint(Spec):
    """One timed case of a calibration run, kept in the profile so that a later run can
    replace it point by point (estimator/calibrate/merge.py) and the curves can be refitted."""

    op_class: str
    """Curve the point feeds ('matmul.fp32', 'elementwise.bf16' …)."""
    label: str
    """The case (shape, orientation): points of two runs with equal class and label are the
    same measurement."""
    work: float = Field(gt=0)
    """FLOPs or bytes of one call (count)."""
    seconds: float = Field(ge=0)
    """Median per-call time (seconds)."""
    p20_seconds: float = Field(ge=0)
    """20th percentile of the per-call time (seconds); the overhead probes use it."""
    tiny: bool = False
    """True for the class's overhead probe (not a curve knot)."""
    num_calls: int = Field(default=1, ge=1)
    """Calls pooled into this point (the executor-recorded bins of elementwise.*; count)."""
    others_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of all CPUs other processes (and hypervisor steal) used while it was timed
    (fraction)."""
    reference_flops_per_second: float = Field(default=0.0, ge=0)
    """Rate of the reference GEMM timed next to the point (FLOP/s; 0 = not sampled)."""
    disturbed: bool = False
    """Other processes disturbed the timing (calibrate/contention.py); kept only when no
    quieter timing of the same point exists."""
    measured_at: str = ""
    """ISO-8601 UTC time of the calibration that measured it (a point kept from an earlier
    calibration keeps that one's time)."""


class ProfileQuality(Spec):
    """How far a profile's timings can be trusted: were other processes using the CPUs?"""

    level: Literal["quiet", "merged", "disturbed"]
    """quiet: no kept point was disturbed; merged: no kept point was disturbed, but some came
    from an earlier calibration because this run's timing of them was; disturbed: some kept
    points were disturbed (stored only on request: `nvfree calibrate --force`)."""
    num_points: int = Field(ge=0)
    """Points of the profile (count)."""
    num_disturbed: int = Field(default=0, ge=0)
    """Kept points that other processes disturbed (count)."""
    num_retimed: int = Field(default=0, ge=0)
    """Timings repeated because the first was disturbed (count)."""
    num_from_previous: int = Field(default=0, ge=0)
    """Points taken from the previous profile because this run's timing was disturbed
    (count)."""
    mean_others_fraction: float = Field(default=0.0, ge=0, le=1)
    """Mean share of all CPUs other processes used while this run timed its points."""
    max_others_fraction: float = Field(default=0.0, ge=0, le=1)
    """Largest such share of one point (fraction)."""
    reference_flops_per_second: float = Field(default=0.0, ge=0)
    """Typical (median) rate of the reference GEMM over the run's quiet points: the quiet
    machine (FLOP/s; calibrate/merge.typical_reference)."""
    load_average: float | None = None
    """1-minute load average when the run ended (runnable tasks; None where unknown)."""
    note: str = ""
    """One line for estimates: how trustworthy the profile is."""


class CalibrationProfile(Spec):
    """Microbenchmark results for one machine + torch + thread count."""

    schema_version: int = CALIBRATION_SCHEMA_VERSION
    """Version of this file format."""
    fingerprint: str
    """Machine fingerprint (CPU model, cores, RAM, accelerator names) the profile belongs to."""
    torch_version: str
    """torch.__version__ at measurement time."""
    num_threads: int = Field(gt=0)
    """torch intra-op threads used (count)."""
    allocator: str = "system"
    """malloc the measuring process ran: 'system', or 'tcmalloc' / 'jemalloc' preloaded
    (estimator/allocator.py); step times differ by 20–35 % between them on CPU."""
    backend: str
    """Device backend measured: cpu, cuda, rocm, mps, xpu."""
    device_name: str
    """Human name of the measured device."""
    created_at: str
    """ISO-8601 UTC time of measurement."""
    quick: bool = False
    """True if measured with --quick (fewer sizes and repeats)."""
    curves: dict[str, EfficiencyCurve]
    """Fitted curve per op class."""
    preferred_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The 16/32-bit compute dtype that measured fastest for large GEMMs here."""
    private_cache_bytes: int | None = Field(default=None, ge=0)
    """Cache private to the training cores (largest per-core level × cores; bytes): matmul
    weight sets larger than this read cold operands (`matmul_cold` curves). None: unknown
    (older profiles, accelerators)."""
    points: tuple[CalibrationPoint, ...] = ()
    """Every timed case behind the curves (empty in profiles stored before 2026-12)."""
    quality: ProfileQuality | None = None
    """How trustworthy the timings are (None: stored before disturbance checks existed)."""
    corrections: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict)
    """Per-op-class time multipliers fitted by `nvfree validate --update-profile` from whole
    training runs (empty = none); each is applied to that class's predicted seconds, so each
    is a finite number > 0."""

    @property
    def profile_id(self) -> str:
        """Short identifier recorded in plans and reports."""
        return f"{self.fingerprint[:12]}-{self.created_at}"
