"""What a training run measured, beside what the analytic model predicted for the same config."""

from typing import Literal

from pydantic import Field

from estimator.specs.base import Spec
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

StopReason = Literal["max_steps", "interrupted", "nonfinite_loss"]
MemoryMethod = Literal["vmhwm", "rss_sampled", "accelerator"]


class TermComparison(Spec):
    """One memory term, predicted by the analytic model and measured on the run."""

    name: str
    """Term name: weights, gradients, optimizer_states, activations_and_other, total_peak."""
    predicted_bytes: int | None
    """Analytic prediction for the term (bytes); None when no prediction was available."""
    measured_bytes: int | None
    """Measured size of the term (bytes); None when it cannot be measured here."""
    relative_error: float | None
    """(predicted − measured) / measured (fraction); None when either side is missing."""
    method: str
    """How the measured side was obtained (one line)."""


class RunReport(Spec):
    """A finished (or stopped) training run: measured memory, time and loss, with the
    prediction for the same model, setup and device beside it."""

    model: ModelSpec
    """The architecture that was trained."""
    setup: TrainSetup
    """The training setup that was run."""
    device_name: str
    """torch device the run used (e.g. 'cpu', 'cuda:0', 'mps')."""
    device_display_name: str
    """Human name of that device (CPU brand string or accelerator name)."""
    torch_version: str
    """torch.__version__ of the run."""
    num_threads: int = Field(gt=0)
    """torch intra-op threads (count)."""
    seed: int
    """Seed of model initialisation, data order and dropout."""
    data_source: str
    """Path of the training data, or 'stdlib' for the embedded default corpus."""
    num_data_tokens: int = Field(ge=0)
    """Tokens in the tokenised training data (count)."""
    start_step: int = Field(ge=0)
    """Optimizer step the run began at (0, or the resumed checkpoint's step)."""
    num_steps: int = Field(ge=0)
    """Optimizer step reached at the end of the run (count, includes resumed steps)."""
    max_steps: int = Field(gt=0)
    """Step target of the run (count)."""
    losses: tuple[float, ...]
    """Mean training loss of every optimizer step since step 0, resumed ones included (nats)."""
    num_tokens: int = Field(ge=0)
    """Tokens trained on in this invocation (count)."""
    stop_reason: StopReason
    """Why the run ended."""
    message: str
    """One line on how the run ended (what to do next, where the checkpoint is)."""
    checkpoint_dir: str | None
    """Latest good checkpoint directory; None if none was written."""
    memory_method: MemoryMethod
    """How peak memory was measured: Linux VmHWM, sampled RSS, or accelerator allocator stats."""
    runtime_bytes: int = Field(ge=0)
    """Memory before the model was built (bytes): interpreter, torch, data (not the job)."""
    baseline_bytes: int = Field(ge=0)
    """Memory after the model was built and transformed (bytes), runtime included."""
    peak_bytes: int = Field(ge=0)
    """Peak memory during the training steps (bytes), runtime included."""
    step_seconds: float | None
    """Median wall time of one optimizer step after warm-up (seconds); None if too few steps."""
    tokens_per_second: float | None
    """Training tokens per second at the median step time (tokens/s)."""
    memory_terms: tuple[TermComparison, ...]
    """Predicted vs measured memory, term by term."""
    predicted_step_seconds: float | None
    """Analytic step time for the same config (seconds); None without a prediction."""
    step_seconds_relative_error: float | None
    """(predicted − measured) / measured step time (fraction); None when either is missing."""
    prediction_note: str | None = None
    """Why the prediction is missing or partial; None when it is complete."""
    world_size: int = Field(default=1, gt=0)
    """Data-parallel processes that trained (count); peak_bytes is the largest rank's peak."""
    peak_bytes_per_rank: tuple[int, ...] = ()
    """Peak memory of each rank during the training steps, rank order (bytes); empty for a
    single process."""
    communication_seconds: float | None = None
    """Median over steps (after warm-up) of the collectives' wall time per optimizer step on
    rank 0 (seconds): DDP's gradient all-reduce per bucket, or FSDP2's all-gathers and
    reduce-scatters per call, each from launch to completion, union over calls (waiting for
    slower ranks and time overlapping compute included); None for one process or off gloo."""
    predicted_communication_seconds: float | None = None
    """Analytic collective time per optimizer step for the same config, before any of it is
    hidden behind compute (seconds: the estimate's 'comm.*' collective ops); None without a
    multi-device prediction."""
    compiled: bool = False
    """True when the decoder blocks ran under torch.compile (`nvfree train --compile`); the
    predicted step time models eager execution, so it is not like for like with the measured."""
