"""The result of `compare`: one model + setup on every catalogue device, with alternatives."""

from typing import Literal

from pydantic import Field

from estimator.specs.base import Spec
from estimator.specs.device import DeviceKind
from estimator.specs.setup import Method, TrainSetup

Objective = Literal["time", "cost"]


class DeviceOption(Spec):
    """What it takes to run the job on one catalogue device kind."""

    device: str
    """Catalogue key (e.g. 'mi300x')."""
    display_name: str
    """Human name with vendor."""
    kind: DeviceKind
    """cpu, gpu, tpu or other accelerator."""
    vendor: str
    """Vendor name."""
    method: Method
    """Method used on this device (the recommended one when the user did not fix it)."""
    weight_bits: int
    """Storage bits of the base weights for that method (bits)."""
    compute_dtype: str
    """Compute dtype used on this device (auto: bf16/fp16 where it has that rate, else fp32)."""
    checkpointing: bool
    """Gradient checkpointing used on this device (switched on where it saves device-hours)."""
    fits_on_one: bool
    """True if one device holds the job."""
    num_devices: int | None = Field(default=None, gt=0)
    """Devices of the chosen plan (count; the fewest that hold it, or more where that is
    faster at no more cost); None = not even max_devices hold it."""
    min_devices: int | None = Field(default=None, gt=0)
    """Fewest devices on which the search found a fitting plan (count); None = none."""
    zero_stage: int | None = None
    """ZeRO stage of the chosen plan (0 = plain data parallel); None if no fit."""
    batch_size: int = Field(default=1, gt=0)
    """Micro-batch per device of the chosen plan (sequences)."""
    grad_accum: int = Field(default=1, gt=0)
    """Gradient accumulation steps of the chosen plan (count)."""
    expert_parallel: int = Field(default=1, gt=0)
    """Expert-parallel degree of the chosen plan (1 = none, or a dense model)."""
    lora_targets: tuple[str, ...] = ()
    """LoRA target modules of the chosen plan (empty for full fine-tuning and inference)."""
    peak_memory_bytes: int
    """Peak memory per device at num_devices (or on one device if nothing fits) (bytes)."""
    capacity_bytes: int
    """Memory one device offers for the job (bytes)."""
    memory_components: dict[str, int] = Field(default_factory=dict)
    """Non-zero terms of peak_memory_bytes (bytes each)."""
    tokens_per_second: float | None = None
    """Training tokens/s over all num_devices; inference: prefill tokens/s (tokens/s)."""
    decode_tokens_per_second: float | None = None
    """Inference only: generated tokens/s over the batch on num_devices (tokens/s)."""
    decode_bound: str | None = None
    """Inference only: what limits decode, 'bandwidth' or 'compute'."""
    total_seconds: float | None = None
    """Wall time for the token budget (seconds; inference: generating the budget at the decode
    rate); None without a budget or a fit."""
    device_hours_per_million_tokens: float | None = None
    """num_devices × hours per 10^6 tokens (device-hours); None if nothing fits."""
    price_per_hour_usd: float | None = None
    """On-demand price of one device (USD/hour); None = unknown."""
    cost_usd: float | None = None
    """num_devices × price × hours for the budget (USD); None if price or budget is unknown."""
    within_limits: bool = True
    """False if it misses --max-hours or --max-cost (or does not fit at all)."""
    multi_device_modelled: bool = True
    """False when num_devices > 1 was sized with the ideal-sharding fallback (no comms time)."""
    price_source: str | None = None
    """Where and when the price was read."""
    sources: tuple[str, ...] = ()
    """The catalogue entry's sources for the device numbers."""
    software: str | None = None
    """The software stack that runs the method on this device's family, with its status
    (data/software.toml); None where the file has no cell (inference, a device outside it)."""
    unknowns: list[str] = Field(default_factory=list)
    """What the catalogue does not know for this device (price, a dtype peak …), one line each."""


class SmallerModel(Spec):
    """A smaller catalogue model that does fit (within the limits), and its best device."""

    model: str
    """Preset name."""
    total_params: int
    """Its total parameters (count)."""
    option: DeviceOption
    """Its best option under the objective."""


class FreeTier(Spec):
    """A free offer (data/offers.toml) evaluated for the job."""

    offer: str
    """Offer key in data/offers.toml."""
    display_name: str
    """Human name (e.g. 'Kaggle GPU T4 ×2')."""
    provider: str
    """Who offers it."""
    device: str
    """Catalogue device it maps to."""
    num_devices: int = Field(gt=0)
    """Devices one session gets (count)."""
    weekly_hours: float | None = None
    """Published weekly quota (hours); None = not published (dynamic)."""
    session_hours: float | None = None
    """Longest session (hours); None = not published."""
    fits: bool
    """True if the job fits the offer's devices."""
    method: Method
    """Method used (the recommended one when the user did not fix it)."""
    total_seconds: float | None = None
    """Wall time for the token budget on the offer (seconds)."""
    weeks_of_quota: float | None = None
    """total_seconds / weekly quota (weeks); None without a quota or a budget."""
    sources: tuple[str, ...] = ()
    """Where the quota was read."""
    read_on: str
    """Date the quota was read (YYYY-MM-DD)."""
    notes: str | None = None
    """Caveats (quotas float; the device is an approximation …)."""


class Comparison(Spec):
    """One model + setup on many devices: fits, how many, how long, what cost, alternatives."""

    model: str
    """Model name."""
    total_params: int
    """Total parameters of the model (count)."""
    active_params: int
    """Parameters active per token (count)."""
    setup: TrainSetup
    """The setup as given (the method and dtype may differ per device, see each option)."""
    objective: Objective
    """Sort key: time (total_seconds / device-hours) or cost (cost_usd)."""
    method_rule: str
    """How each option's method was chosen, one sentence."""
    max_hours: float | None = None
    """Wall-time limit (hours); None = none."""
    max_cost_usd: float | None = None
    """Cost limit (USD); None = none."""
    max_devices: int = Field(gt=0)
    """Largest device count searched (count)."""
    options: list[DeviceOption]
    """Devices, best first under the objective; devices that cannot hold it last."""
    smaller_models: list[SmallerModel] = Field(default_factory=list)
    """Smaller presets that fit within the limits, when this model does not (largest first)."""
    free_tiers: list[FreeTier] = Field(default_factory=list)
    """Free offers evaluated for the job."""
    notes: list[str] = Field(default_factory=list)
    """Assumptions shared by all options."""
