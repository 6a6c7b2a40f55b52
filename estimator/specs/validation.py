"""The result of `nvfree validate`: predicted vs measured for every run of a suite."""

from pydantic import Field

from estimator.specs.base import Spec
from estimator.specs.run import TermComparison


class CaseResult(Spec):
    """One configuration of the suite, run in a fresh process."""

    case_id: str
    """Model-method-dtype-batch/sequence-options of the run."""
    error: str | None = None
    """Why the run produced no report (one line); None when it ran."""
    predicted_peak_bytes: int | None = None
    """Predicted peak memory, runtime included (bytes)."""
    measured_peak_bytes: int | None = None
    """Measured peak memory of the training steps (bytes)."""
    peak_error: float | None = None
    """(predicted − measured) / measured peak memory (fraction)."""
    predicted_step_seconds: float | None = None
    """Predicted optimizer-step time (seconds)."""
    measured_step_seconds: float | None = None
    """Median measured optimizer-step time after warm-up (seconds)."""
    step_error: float | None = None
    """(predicted − measured) / measured step time (fraction)."""
    memory_terms: tuple[TermComparison, ...] = ()
    """Predicted vs measured memory, term by term."""
    predicted_seconds_by_class: dict[str, float] = Field(default_factory=dict)
    """Predicted step seconds per op class (matmul.bf16, memory, optimizer …) (seconds)."""


class ValidationReport(Spec):
    """Error table of a suite with its summary and the goals it is held to."""

    suite: str
    """quick or full."""
    profile_id: str | None
    """Calibration profile the predictions used; None = uncalibrated."""
    cases: tuple[CaseResult, ...]
    """Every configuration, in suite order."""
    memory_median_error: float | None
    """Median |relative error| of peak memory (fraction)."""
    memory_max_error: float | None
    """Max |relative error| of peak memory (fraction)."""
    step_median_error: float | None
    """Median |relative error| of step time (fraction)."""
    step_max_error: float | None
    """Max |relative error| of step time (fraction)."""
    goals: dict[str, float]
    """The |error| bounds aimed at: memory_median, memory_max, step_median, step_max."""
    corrections: dict[str, float] = Field(default_factory=dict)
    """Per-op-class correction factors fitted from these runs (empty = not fitted)."""
    corrected_step_median_error: float | None = None
    """Median |step-time error| with corrections fitted on the other runs only (leave one
    out, fraction); None when not fitted."""
    corrected_step_max_error: float | None = None
    """Max |step-time error| with leave-one-out corrections (fraction)."""
