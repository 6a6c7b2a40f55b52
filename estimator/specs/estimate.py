"""The result of an estimate: parameter counts, memory breakdown, throughput, verdict."""

from typing import Literal

from pydantic import Field

from estimator.specs.base import Spec
from estimator.specs.device import Device
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

Verdict = Literal["fits", "tight", "fits_with_changes", "does_not_fit"]
"""fits: the band's upper end fits; tight: the estimate fits but the upper end does not;
fits_with_changes: an advised change fits; does_not_fit: nothing advised fits."""


class ParamCounts(Spec):
    """Parameter counts of the model under the setup."""

    total: int
    """All parameters (count)."""
    active_per_token: int
    """Parameters a token passes through, counting routed experts as computed (count)."""
    trainable: int
    """Parameters that receive gradients and optimizer states (count)."""
    embedding: int
    """Input embedding + position table (count)."""
    lm_head: int
    """Output projection (count; 0 when tied)."""
    components: dict[str, int]
    """Named groups: embedding, attention, mlp, experts, router, norms, lm_head, lora (count)."""


class MemoryBreakdown(Spec):
    """Peak memory on one device, by named term."""

    components: dict[str, int]
    """Term name → bytes at the peak (weights, gradients, optimizer_states, activations …)."""
    total_bytes: int
    """Sum of components (bytes)."""
    capacity_bytes: int
    """Memory the device offers for this job (bytes), after what the OS keeps (unified memory)."""
    lower_bytes: int = 0
    """Lower end of the measured band around total_bytes (bytes; data/uncertainty.toml)."""
    upper_bytes: int = 0
    """Upper end of the measured band: the largest peak seen for an estimate of total_bytes
    with this framework on this device class (bytes). FITS means upper_bytes fits."""
    notes: dict[str, str] = Field(default_factory=dict)
    """Term name → how it was derived (one line)."""
    host_components: dict[str, int] = Field(default_factory=dict)
    """Offloaded term → bytes this device's rank keeps in host (CPU) memory (bytes); not part
    of total_bytes. Empty without --offload."""
    host_total_bytes: int = 0
    """Sum of host_components: host memory per device rank (bytes); a node needs this times its
    devices per node."""


    @property
    def fits(self) -> bool:
        """The upper end of the band fits the capacity (never a FITS that can run out)."""
        return self.upper_bytes <= self.capacity_bytes


class OpTime(Spec):
    """Time of one op class within a training step."""

    name: str
    """Op name (e.g. 'linear.forward', 'attention.backward', 'optimizer.step')."""
    op_class: str
    """Efficiency-curve class used (matmul.bf16, memory …)."""
    flops: int
    """FLOPs of the op per optimizer step (count)."""
    bytes_moved: int
    """Bytes read + written per optimizer step (bytes)."""
    seconds: float = Field(ge=0)
    """Predicted time per optimizer step (seconds); for a collective, the part compute does
    not hide."""
    hidden_seconds: float = Field(default=0.0, ge=0)
    """A collective's time hidden behind compute (seconds, not in `seconds`: its whole time is
    seconds + hidden_seconds; analytic/overlap.py, docs/methodology.md §6.4); 0 elsewhere."""


class Throughput(Spec):
    """Time and cost."""

    step_flops: int
    """FLOPs per optimizer step including recompute (count)."""
    model_flops_per_token: int
    """Useful FLOPs per token (6·N_active-style, no recompute) (count)."""
    step_seconds: float
    """Predicted wall time of one optimizer step (seconds)."""
    tokens_per_second: float
    """Training (or prefill) tokens processed per second (tokens/s)."""
    ops: list[OpTime]
    """Per-op breakdown of step_seconds."""
    compute_dtype: str
    """Dtype the time was computed for."""
    calibrated: bool
    """True if a measured CalibrationProfile supplied the efficiency curves."""
    total_seconds: float | None = None
    """Wall time for the token budget (seconds); None without --tokens."""
    cost_usd: float | None = None
    """Cost for the token budget at the device price (USD); None if either is unknown."""
    decode_tokens_per_second: float | None = None
    """Inference only: bandwidth-bound decode rate at this batch (tokens/s)."""
    num_devices: int = 1
    """Devices the step runs on in parallel (count); tokens_per_second and cost cover all."""
    communication_seconds: float = 0.0
    """Part of step_seconds spent in collectives and host transfers that compute does not
    hide: the sum of the comm.* rows' seconds (their hidden_seconds excluded,
    analytic/overlap.py) (seconds)."""


class Advice(Spec):
    """One concrete change and what it does to peak memory."""

    change: str
    """What to change, as the user would type it (e.g. '--checkpointing')."""
    update: dict[str, int | float | str | bool] = Field(default_factory=dict)
    """The same change as TrainSetup fields (apply with setup.model_copy(update=...))."""
    total_bytes: int
    """Peak memory after the change (bytes)."""
    fits: bool
    """Whether it fits the device after the change."""
    step_seconds: float | None = None
    """Predicted step time after the change (seconds)."""


class Estimate(Spec):
    """Everything nvfree predicts for one model + setup + device."""

    model: ModelSpec
    """The architecture estimated (possibly inferred, see model.inferred_from)."""
    setup: TrainSetup
    """The training setup."""
    device: Device
    """The device."""
    params: ParamCounts
    """Parameter counts."""
    memory: MemoryBreakdown
    """Peak memory breakdown."""
    throughput: Throughput
    """Time and cost."""
    verdict: Verdict
    """fits / fits_with_changes / does_not_fit."""
    advice: list[Advice]
    """Changes that make it fit (or fit better), best first."""
    minimum_memory_bytes: int
    """Smallest peak memory any advised change reaches (bytes)."""
    other_frameworks: dict[str, int] = Field(default_factory=dict)
    """Framework → the peak memory it would reach for the same setup on the same device
    (bytes): what the user would need with the other training codes nvfree models."""
    assumptions: list[str]
    """Everything assumed that the user did not say."""
    hints: list[str] = Field(default_factory=list)
    """Lines that help with the question itself: the preset a --params count names
    (request.preset_hints), that no --device means this machine."""

    def summary(self) -> dict[str, str | int | float | bool | None]:
        """The headline numbers as one flat dict (one row of a pandas DataFrame:
        `pd.DataFrame([e.summary() for e in estimates])`). Units in the key names: bytes,
        seconds, tokens per second, USD; the full breakdowns stay in the Estimate."""
        s, m, t = self.setup, self.memory, self.throughput
        return {
            "model": self.model.name, "device": self.device.name,
            "num_devices": s.num_devices, "framework": s.framework, "method": s.method,
            "compute_dtype": s.compute_dtype, "weight_bits": s.weight_bits,
            "optimizer": s.optimizer, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "grad_accum": s.grad_accum, "checkpointing": s.checkpointing,
            "zero_stage": s.zero_stage,
            "total_params": self.params.total, "active_params": self.params.active_per_token,
            "trainable_params": self.params.trainable,
            "peak_bytes": m.total_bytes, "peak_upper_bytes": m.upper_bytes,
            "capacity_bytes": m.capacity_bytes, "host_bytes": m.host_total_bytes,
            "fits": m.fits, "verdict": self.verdict,
            "minimum_memory_bytes": self.minimum_memory_bytes,
            "step_seconds": t.step_seconds, "tokens_per_second": t.tokens_per_second,
            "communication_seconds": t.communication_seconds,
            "total_seconds": t.total_seconds, "cost_usd": t.cost_usd,
            "decode_tokens_per_second": t.decode_tokens_per_second,
            "calibrated": t.calibrated,
        }
