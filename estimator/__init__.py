"""nvfree: can this LLM be trained or fine-tuned on this hardware — memory, time, cost.

Public API (lazy: importing `estimator` loads neither torch nor rich):
    estimate(model, setup, device="local", profile=None, **flags) -> Estimate
    plan(model, **flags) -> Plan      compare(model, devices=None, **flags) -> Comparison
    validate(suite="quick") -> ValidationReport
    (each takes its command's flags by name and returns what the command's --json prints)
    load_model(name_or_path) -> ModelSpec     load_device(name) -> Device
    infer_model(num_params, active_params=None) -> ModelSpec
    count_params(model, setup=None) -> ParamCounts
    specs: ModelSpec, TrainSetup, Device, Estimate, CalibrationProfile …
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "estimate": "estimator.api",
    "plan": "estimator.api",
    "compare": "estimator.api",
    "validate": "estimator.api",
    "load_model": "estimator.catalog",
    "load_device": "estimator.catalog",
    "list_models": "estimator.catalog",
    "list_devices": "estimator.catalog",
    "infer_model": "estimator.analytic.infer",
    "count_params": "estimator.analytic.params",
    "ModelSpec": "estimator.specs",
    "MoESpec": "estimator.specs",
    "MLASpec": "estimator.specs",
    "TrainSetup": "estimator.specs",
    "Device": "estimator.specs",
    "Estimate": "estimator.specs",
    "Plan": "estimator.specs.plan",
    "Comparison": "estimator.specs",
    "CalibrationProfile": "estimator.specs",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    """Import public names on first use (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'estimator' has no attribute {name!r}")
