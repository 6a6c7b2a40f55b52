"""The result of `nvfree validate`: predicted vs measured for every run of a suite."""

from typing import Any

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
    flags: tuple[str, ...] = ()
    """The `nvfree train` flags of the run (with hf_config: enough to rerun it)."""
    hf_config: dict[str, Any] | None = None
    """The HF config.json of a drawn model (random suite); None for presets."""


class ValidationReport(Spec):
    """Error table of a suite with its summary and the goals it is held to."""

    suite: str
    """quick, full or random."""
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
    memory_quartiles: tuple[float, float, float] | None = None
    """25th, 50th and 75th percentile of |peak-memory error| (fraction)."""
    step_quartiles: tuple[float, float, float] | None = None
    """25th, 50th and 75th percentile of |step-time error| (fraction)."""
    memory_median_signed_error: float | None = None
    """Median signed peak error: < 0 = under-predicted (fraction)."""
    step_median_signed_error: float | None = None
    """Median signed step-time error: < 0 = under-predicted (fraction)."""
    seed: int | None = None
    """Seed of the random suite (None for the fixed suites)."""
    skipped_draws: tuple[str, ...] = ()
    """Random suite: drawn configurations not run, and why (over the memory or time budget
    by their own prediction, or not buildable), one line each."""
    profile_quality: str | None = None
    """The calibration profile's quality note (estimator.hardware.profiles.profile_quality_note)."""
