"""A question in the CLI's own words turned into specs: the one place that fills the defaults
the help texts state (method from bits, bits from method and dtype, `--dtype auto`, LoRA
targets, token budget, devices and ZeRO stage). `nvfree estimate` / `compare` and the library's
`estimate(...)` / `compare(...)` both call it, so a notebook gets what the command prints.
"""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from estimator.errors import SetupError
from estimator.inputs import checked
from estimator.specs import CalibrationProfile, Device, ModelSpec, TrainSetup

P = ParamSpec("P")
R = TypeVar("R")

SETUP_DEFAULTS: dict[str, object] = {
    "method": None, "bits": None, "dtype": "auto", "framework": "hf", "lora_rank": 16,
    "lora_alpha": 32.0, "lora_targets": "all-linear", "lora_dropout": 0.0, "batch_size": 1,
    "seq_len": 2048, "grad_accum": 1, "checkpointing": False, "optimizer_in_backward": False,
    "optimizer": "adamw", "mixed_precision": True, "attention": "sdpa", "double_quant": True,
    "fused_loss": True, "num_devices": 1, "nodes": 1, "zero": 0, "offload": "none",
    "expert_parallel": 1, "tokens": None,
}
"""Every setup flag and its default, once: the CLI declares its options from these names and
values (cli/options.py), the library fills what a call leaves out with them."""

PLAN_DEFAULTS: dict[str, object] = {
    "model": "smollm2-135m", "seq_len": 256, "global_batch": 8, "tokens": 32_768,
}
"""What `nvfree plan` (and estimator.plan) assumes where estimate would use SETUP_DEFAULTS,
and why they differ: with no arguments, plan prepares a short training run of a small model on
this machine that `nvfree run` then executes — 16 steps of 8 × 256 tokens (32,768 tokens), about
two minutes of the default model on a 2-core CPU (docs/planning.md). Estimate's seq_len 2048
describes a fine-tune of a named model; planning 2048-token sequences on a CPU would make the
no-argument run take ten times as long. Name --seq-len to plan (or estimate) anything else."""


def resolve_model(model: str | ModelSpec | None = None, params: float | None = None,
                  active_params: float | None = None, active_ratio: float | None = None
                  ) -> ModelSpec:
    """The ModelSpec of --model (a preset, HF id, config.json or model directory), or one
    inferred from --params (and --active-params / --active-ratio for an MoE)."""
    from estimator.analytic.infer import infer_model
    from estimator.catalog import load_model

    if isinstance(model, ModelSpec):
        return model
    params, active_params = checked("--params", params), checked("--active-params", active_params)
    if model is not None and params is not None:
        raise SetupError("give either --model or --params, not both")
    if active_params is not None and active_ratio is not None:
        raise SetupError("give either --active-params or --active-ratio, not both")
    if model is not None:
        return load_model(model)
    if params is None:
        raise SetupError("say which model: --model NAME (see `nvfree models`) or --params N")
    if active_ratio is not None:
        if not 0 < active_ratio <= 1:
            raise SetupError(f"--active-ratio must be in (0, 1], got {active_ratio:g}")
        active_params = active_ratio * params
    return infer_model(params, active_params=active_params)


PRESET_TOLERANCE = 0.10
"""--params within this fraction of a preset's total or active count (or of ten times or a
tenth of it) names the preset."""
MAX_PRESET_HINTS = 3


def preset_scale(params: float, counts: list[int]) -> float | None:
    """1 when params lies within PRESET_TOLERANCE of one of the counts, else 10 or 0.1 when
    ten times or a tenth of it does, else None."""
    for scale in (1, 10, 0.1):
        if any(abs(params * scale / c - 1) <= PRESET_TOLERANCE for c in counts):
            return scale
    return None


def preset_hints(params: float) -> list[str]:
    """Presets whose published total or active parameter count lies within PRESET_TOLERANCE
    of --params (else ten times or a tenth of it): the seed's "56B" is LongCat-Flash's 560B
    total → 'longcat-flash has 560B total / ~27B active (10× your --params): --model
    longcat-flash'. Exact matches first; at most MAX_PRESET_HINTS."""
    from estimator.catalog import list_models

    found: dict[float, list[str]] = {1: [], 10: [], 0.1: []}
    for preset in list_models():
        counts = [c for c in (preset.published_num_params, preset.published_active_params) if c]
        scale = preset_scale(params, counts)
        if scale is None:
            continue
        sizes = f"{preset.published_num_params / 1e9:.3g}B total"
        if preset.published_active_params:
            sizes += f" / ~{preset.published_active_params / 1e9:.3g}B active"
        away = {1: "", 10: " (10× your --params)", 0.1: " (a tenth of your --params)"}[scale]
        found[scale].append(f"{preset.name} has {sizes}{away}: --model {preset.name}")
    hints = found[1] or found[10] + found[0.1]
    return hints[:MAX_PRESET_HINTS]


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--lora-targets: comma-separated PEFT module names, or all-linear."""
    from estimator.specs import LINEAR_TARGETS

    if not isinstance(targets, str):
        return tuple(targets)
    if targets.strip() == "all-linear":
        return LINEAR_TARGETS
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def auto_dtype(device: Device, profile: CalibrationProfile | None) -> str:
    """The compute dtype `--dtype auto` picks: what calibration measured fastest, else bf16
    where the device has a bf16 rate, fp16 where it has only fp16, else fp32."""
    if profile is not None:
        return profile.preferred_dtype
    for dtype in ("bf16", "fp16"):
        if device.peak_for(dtype) and device.peak_for(dtype) > (device.peak_for("fp32") or 0):
            return dtype
    return "fp32"


def build_setup(device: Device, profile: CalibrationProfile | None, **flags) -> TrainSetup:
    """A TrainSetup from CLI flag names (SETUP_DEFAULTS for what is not given): the method
    from --bits (4 → qlora, 8 → lora, else full), the bits from the method and dtype (4 for
    qlora; fp32 compute stores fp32 weights, as the executor builds them), `--dtype auto` for
    this device and profile, mixed precision only with a 16-bit dtype."""
    unknown = set(flags) - set(SETUP_DEFAULTS)
    if unknown:
        raise SetupError(f"unknown setup option(s): {', '.join(sorted(unknown))}")
    f = {**SETUP_DEFAULTS, **flags}
    bits = int(f["bits"]) if f["bits"] is not None else None
    method = f["method"] or {4: "qlora", 8: "lora"}.get(bits or 16, "full")
    dtype = auto_dtype(device, profile) if f["dtype"] == "auto" else f["dtype"]
    if bits is None:
        bits = 4 if method == "qlora" else (32 if dtype == "fp32" else 16)
    tokens = checked("--tokens", f["tokens"])
    fields = {k: v for k, v in f.items() if k not in (
        "method", "bits", "dtype", "lora_targets", "tokens", "nodes", "zero",
        "mixed_precision")}
    try:
        return TrainSetup(method=method, weight_bits=bits, compute_dtype=dtype,
                          mixed_precision=bool(f["mixed_precision"]) and dtype != "fp32",
                          lora_targets=parse_targets(f["lora_targets"]),
                          num_tokens=round(tokens) if tokens else None,
                          num_nodes=f["nodes"], zero_stage=int(f["zero"]), **fields)
    except ValueError as exc:
        raise setup_error(exc) from None


def setup_error(exc: ValueError) -> SetupError:
    """A TrainSetup validation error as one line naming the field (pydantic's first
    message)."""
    errors = getattr(exc, "errors", None)
    if not errors:
        return SetupError(str(exc))
    first = errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = str(first["msg"]).removeprefix("Value error, ")
    return SetupError(f"{where}: {message}" if where else message)


def typed_errors(entry: Callable[P, R]) -> Callable[P, R]:
    """An entry point (estimate, compare_request, plan_request) whose pydantic errors leave it
    as SetupError naming the field (setup_error): a spec built from checked arguments can
    still break a cross-field rule, and no ValidationError reaches a caller or the CLI."""
    from pydantic import ValidationError

    @functools.wraps(entry)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return entry(*args, **kwargs)
        except ValidationError as exc:
            raise setup_error(exc) from None

    return wrapped
