"""What a training run is given and what it carries: TrainConfig (the options besides the model
and setup), Run (the mutable state prepare_run builds and train_step advances), StepProgress
(what the loop reports after each step)."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from estimator.executor import distributed
from estimator.executor.data import PackedDataset
from estimator.executor.optim import BackwardStep
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

DEFAULT_LR = {"full": 1e-4, "lora": 2e-4, "qlora": 2e-4}
"""Peak learning rate per method when none is given (common fine-tuning defaults: HF/PEFT
examples use 1e-4–2e-4 for LoRA; 1e-5–1e-4 for full fine-tunes)."""
REPORT_FILE = "run_report.json"


@dataclass(frozen=True)
class StepProgress:
    """What the loop reports after every optimizer step (the CLI renders it)."""

    step: int
    """Optimizer steps done (count)."""
    max_steps: int
    """Step target (count)."""
    loss: float
    """Mean loss of the step (nats/token)."""
    lr: float
    """Learning rate used by the step."""
    step_seconds: float
    """Wall time of this step (seconds)."""
    tokens_per_second: float
    """Tokens per second at the median step time so far (tokens/s)."""
    eta_seconds: float
    """Remaining steps × median step time (seconds)."""
    memory_bytes: int
    """Peak memory of the training phase so far (bytes)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything train() needs besides the model and setup (defaults are the CLI's)."""

    max_steps: int
    output_dir: Path
    data: Path | None = None
    text_field: str = "text"
    model_path: Path | None = None
    resume: bool = False
    """Continue from the newest checkpoint in output_dir that loads (older ones when newer ones
    do not load, said in the report's message); ConfigError when checkpoints exist and none
    loads."""
    restart: bool = False
    """Delete output_dir's checkpoints and report first and start at step 0 on purpose."""
    device: str = "cpu"
    seed: int = 0
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this (0: no clipping); None: 1.0, or 0 when the
    optimizer steps in backward (which cannot clip: see optim.BackwardStep)."""
    lora_dropout: float = 0.0
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1
    predict: bool = True
    compile: bool = False
    """torch.compile each decoder block (checkpointing.compile_blocks) after LoRA, NF4 and
    checkpointing; the first steps compile (the step-time median skips them)."""


@dataclass
class Run:
    """Mutable state of one run: what prepare_run builds and train_step advances."""

    config: TrainConfig
    spec: ModelSpec
    setup: TrainSetup
    device: torch.device
    dataset: PackedDataset
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    grads_bytes: int | None = None
    scaler: torch.amp.GradScaler | None = None
    dist: distributed.DistContext = field(default_factory=distributed.DistContext)
    ddp: torch.nn.Module | None = None
    """The DDP-wrapped LossModule that forwards micro-batches when dist.is_distributed."""
    sharded: bool = False
    """ZeRO-3: `ddp` is the FSDP2-sharded LossModule (fsdp.wrap_fsdp), parameters are
    DTensors, every rank takes part in checkpoints."""
    comm: distributed.CommTimer | None = None
    """Times the step's collectives on gloo (DDP's all-reduce, FSDP2's all-gathers and
    reduce-scatters)."""
    backward_step: BackwardStep | None = None
    """The optimizer's per-parameter step inside backward (setup.optimizer_in_backward)."""
