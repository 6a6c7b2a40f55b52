"""The result of `nvfree trace`: one training step of a framework's real model code, traced
under FakeTensorMode, with its peak tensor memory by phase, module and category, beside the
analytic estimate for the same setup."""

from typing import Literal

from pydantic import Field, computed_field

from estimator.specs.base import Spec
from estimator.specs.setup import TrainSetup

TracePhase = Literal["setup", "forward", "backward", "recompute", "optimizer"]
TraceFramework = Literal["hf"]

NON_TENSOR_TERMS = ("runtime_overhead", "kernel_caches", "allocator_retention",
                    "expert_kernel_caches")
"""Analytic memory terms that are no tensor (CUDA context, kernel caches, allocator slack):
the trace cannot see them, so the comparison subtracts them from the analytic total."""


class ModulePeak(Spec):
    """Peak live tensor memory while one module ran, in each phase of the step."""

    name: str
    """Module path in the traced model (e.g. 'model.layers.3.mlp')."""
    forward_peak_bytes: int = Field(ge=0)
    """Most tensor memory live while the module's forward ran (bytes); 0 if never called."""
    backward_peak_bytes: int = Field(ge=0)
    """Most tensor memory live while the module's backward (and any recompute) ran (bytes)."""

    @property
    def peak_bytes(self) -> int:
        """The larger of the two phases (bytes)."""
        return max(self.forward_peak_bytes, self.backward_peak_bytes)


class TraceResult(Spec):
    """One forward + backward + optimizer step of the framework's model code, every tensor
    allocation tracked (torch MemTracker); on fake tensors unless `fake` is False."""

    model_name: str
    """Preset name or config path of the traced model."""
    model_type: str
    """transformers model_type the model was built as (llama, mixtral, longcat_flash …)."""
    framework: TraceFramework
    """Whose training code ran: hf = transformers + PEFT + bitsandbytes + torch AdamW."""
    setup: TrainSetup
    """The setup that was traced."""
    fake: bool
    """True when the step ran on FakeTensors (no memory, no compute); False for a real run."""
    peak_bytes: int = Field(ge=0)
    """Most tensor bytes live at once during the step (bytes; storage sizes, no allocator
    rounding or caching)."""
    peak_phase: TracePhase
    """Phase of the step in which the peak occurred."""
    peak_module: str
    """Innermost module running when the peak occurred ('' outside any module, e.g. in the
    optimizer step)."""
    peak_components: dict[str, int]
    """Category → bytes live at the peak: parameters, buffers, gradients, activations
    (forward and recompute outputs), temporaries (backward), optimizer_states, other."""
    phase_peaks: dict[str, int]
    """Phase → the most tensor bytes live during that phase (bytes)."""
    top_modules: list[ModulePeak]
    """Modules with the highest peaks, highest first; ancestors that share a listed module's
    peak are left out (the root and PEFT's wrappers are never listed)."""
    num_parameters: int = Field(ge=0)
    """Parameter elements of the traced model, quantized weights counted as stored (count)."""
    num_trainable_parameters: int = Field(ge=0)
    """Parameters that receive gradients (count)."""
    assumptions: list[str]
    """What the trace assumed or substituted (kernel pins, routing, defaults)."""
    trace_seconds: float = Field(ge=0)
    """Wall time of building and stepping the model (seconds)."""


class AnalyticSide(Spec):
    """The analytic estimate of the same model and setup, reduced to what a trace can see."""

    device_name: str
    """Catalogue device the estimate was made for (its capacity raised so nothing is clipped)."""
    total_bytes: int
    """Analytic peak memory total (bytes)."""
    components: dict[str, int]
    """Analytic memory terms (bytes)."""
    tensor_bytes: int
    """total_bytes minus the non-tensor terms NON_TENSOR_TERMS: comparable to the traced peak
    (bytes)."""
    peak_phase: str
    """Phase the analytic model puts the peak in (its notes' peak_phase)."""


class TraceReport(Spec):
    """A trace beside the analytic estimate of the same model, setup and device."""

    trace: TraceResult
    """The traced step."""
    estimate: AnalyticSide | None
    """The analytic side; None when the analytic model cannot read this model's config."""
    estimate_note: str = ""
    """Why the estimate is missing, or how its setup differs from the trace's (one line)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratio(self) -> float | None:
        """Analytic tensor bytes / traced peak (> 1: the estimate is higher)."""
        if self.estimate is None or not self.trace.peak_bytes:
            return None
        return self.estimate.tensor_bytes / self.trace.peak_bytes
