"""Measured efficiency curves of one machine: what the calibrated model reads."""

from typing import Literal

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
    corrections: dict[str, float] = Field(default_factory=dict)
    """Per-op-class time multipliers fitted by `nvfree validate --update-profile` from whole
    training runs (empty = none); each is applied to that class's predicted seconds."""

    @property
    def profile_id(self) -> str:
        """Short identifier recorded in plans and reports."""
        return f"{self.fingerprint[:12]}-{self.created_at}"
