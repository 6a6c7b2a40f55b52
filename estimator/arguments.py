"""The library's argument boundary (issue 21): every argument a notebook passes to estimate,
compare or plan is checked here for its type before any code uses it — a name the command does
not take, a string where a number goes, a NaN, a list for a device — and becomes one SetupError
line naming the argument, the value and what it takes. Ranges stay where the specs declare them
(TrainSetup's fields, inputs.RANGES, checks.check); this module only makes sure that what
reaches them is of the right kind, so that no Python TypeError, AttributeError or pydantic
ValidationError leaves the library (tests/property/test_fuzz_library.py).

The CLI's flags arrive typed by typer and pass the same check unchanged."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from estimator.catalog.prices import PriceRule
from estimator.errors import SetupError
from estimator.specs import CalibrationProfile, Device, ModelSpec, TrainSetup

Number = Annotated[float, Field(allow_inf_nan=False)]
"""A finite real number (ints accepted); its range is checked where it is used."""

COMMON: dict[str, Any] = {
    "model": str | ModelSpec | None, "params": Number | None, "active_params": Number | None,
    "active_ratio": Number | None, "method": str | None, "bits": int | None, "dtype": str | None,
    "framework": str, "lora_rank": int, "lora_alpha": Number, "lora_targets": str | list[str]
    | tuple[str, ...], "lora_dropout": Number, "batch_size": int, "seq_len": int | None,
    "grad_accum": int, "checkpointing": bool | None, "optimizer_in_backward": bool,
    "optimizer": str | None, "mixed_precision": bool, "attention": str, "double_quant": bool,
    "fused_loss": bool, "num_devices": int, "nodes": int, "zero": int | str | None,
    "offload": str, "expert_parallel": int, "tokens": Number | None,
    "prices": dict[str, Number] | None, "link_gbit_per_second": Number | None,
    "objective": str, "max_hours": Number | None, "max_cost": Number | None,
    "max_devices": int | None,
}
"""The type of every argument name that more than one entry point takes."""

ONLY: dict[str, dict[str, Any]] = {
    "estimate": {"setup": TrainSetup | None, "device": str | Device,
                 "profile": CalibrationProfile | None, "use_profile": bool,
                 "device_memory": Number | None},
    "compare": {"devices": str | list[str] | None, "price_rule": PriceRule | None},
    "plan": {"output": Path | str | None, "calibrate": bool, "global_batch": int | None,
             "data": Path | str | None, "text_field": str, "device": str,
             "memory_limit": Number | None, "top": int, "torch_device": str, "seed": int},
}
"""The arguments of one entry point alone."""

NOT_TAKEN = {
    "estimate": {"objective", "max_hours", "max_cost", "max_devices"},
    "compare": {"setup", "device", "profile"},
    "plan": {"framework", "bits", "batch_size", "grad_accum", "optimizer_in_backward",
             "mixed_precision", "attention", "double_quant", "fused_loss", "expert_parallel",
             "lora_dropout", "link_gbit_per_second"},
}
"""Names of COMMON an entry point does not take (plan always describes the bundled trainer
and searches the batch, precision and kernels itself)."""


def accepted(command: str) -> dict[str, Any]:
    """Every argument `command` takes, with its type."""
    common = {k: v for k, v in COMMON.items() if k not in NOT_TAKEN[command]}
    return {**common, **ONLY[command]}


@cache
def adapter(command: str, name: str) -> TypeAdapter:
    """The pydantic validator of one argument (built once)."""
    return TypeAdapter(accepted(command)[name])


def library_arguments(command: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` checked for `command` ('estimate', 'compare' or 'plan') and converted as pydantic
    does in lax mode ("4" → 4 for an integer): SetupError for a name the command does not take
    or a value of the wrong kind."""
    takes = accepted(command)
    unknown = sorted(set(given) - set(takes))
    if unknown:
        raise SetupError(f"{command}() takes no argument {', '.join(unknown)} (it takes: "
                         f"{', '.join(sorted(takes))})")
    out = {}
    for name, value in given.items():
        try:
            out[name] = adapter(command, name).validate_python(value)
        except ValidationError as exc:
            raise SetupError(f"{name}={short(value)}: {exc.errors()[0]['msg']}") from None
    return out


def short(value: Any) -> str:
    """repr of a value, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

