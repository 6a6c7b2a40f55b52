"""A training plan: what `nvfree plan` chose and `nvfree run` executes (a versioned JSON file)."""

from typing import Literal

from pydantic import Field, model_validator

from estimator.inputs import MAX_SEED
from estimator.specs.base import Spec
from estimator.specs.device import Device
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

PLAN_SCHEMA_VERSION = 2
Objective = Literal["time", "cost"]


class Candidate(Spec):
    """One setup the planner scored."""

    setup: TrainSetup
    """The candidate setup (method, bits, dtype, batch, accumulation, checkpointing, optimizer)."""
    peak_bytes: int = Field(ge=0)
    """Predicted peak memory per device (bytes)."""
    step_seconds: float = Field(gt=0)
    """Predicted wall time of one optimizer step (seconds)."""
    total_seconds: float = Field(gt=0)
    """Predicted wall time for the plan's token budget (seconds)."""
    cost_usd: float | None
    """Predicted cost of the token budget (USD); None when the device has no price."""
    fits: bool
    """Whether the peak fits the memory limit."""
    verdict: str
    """Why it won or lost, one line (e.g. 'chosen', '1.4× slower than the chosen plan')."""


class Plan(Spec):
    """A chosen training plan with its prediction; `nvfree run` executes it and compares."""

    schema_version: Literal[2] = PLAN_SCHEMA_VERSION
    """Version of this file format."""
    created_at: str
    """ISO-8601 UTC time the plan was made."""
    nvfree_version: str
    """Version of nvfree that made the plan."""
    model: ModelSpec
    """The architecture to train."""
    model_source: str
    """What the user named: a preset, a config.json / model directory, or '--params N'."""
    data: str | None
    """Training data path (text file, directory or JSONL); None = the embedded corpus."""
    text_field: str = "text"
    """JSONL field holding the text."""
    setup: TrainSetup
    """The chosen setup; setup.num_tokens is the token budget; setup.framework is 'nvfree'
    (a plan is what the bundled trainer runs)."""
    device: Device
    """The device planned for (one of setup.num_devices)."""
    device_key: str
    """'local' (this machine) or the catalogue key of the device."""
    torch_device: str = "cpu"
    """torch device the executor trains on (cpu, cuda, mps, xpu)."""
    machine_fingerprint: str | None
    """Fingerprint of the planning machine when device_key is 'local'; None otherwise."""
    profile_id: str | None
    """Calibration profile the prediction used; None = uncalibrated."""
    max_steps: int = Field(gt=0)
    """Optimizer steps to run = ceil(token budget / global tokens per step) (count)."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    """Seed of initialisation, data order and dropout (as `nvfree train --seed`)."""
    memory_limit_bytes: int = Field(gt=0)
    """Memory the plan had to fit per device (bytes)."""
    objective: Objective = "time"
    """What the ranking minimised: wall time or cost."""
    predicted_peak_bytes: int = Field(ge=0)
    """Predicted peak memory per device (bytes)."""
    predicted_step_seconds: float = Field(gt=0)
    """Predicted wall time of one optimizer step (seconds)."""
    predicted_total_seconds: float = Field(gt=0)
    """Predicted wall time of all max_steps steps, excluding start-up (seconds)."""
    predicted_cost_usd: float | None
    """Predicted cost (USD); None when the device has no price."""
    num_candidates: int = Field(ge=0)
    """Configurations the search scored (count)."""
    num_fitting: int = Field(ge=0)
    """Of those, how many fit the memory limit (count)."""
    candidates: tuple[Candidate, ...]
    """The best candidates, chosen first, with why each lost."""

    @model_validator(mode="after")
    def _bundled_trainer(self) -> "Plan":
        if self.setup.framework != "nvfree":
            raise ValueError(f"a plan runs the bundled trainer, not {self.setup.framework!r}: "
                             "setup.framework must be 'nvfree'")
        return self
