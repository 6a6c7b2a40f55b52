"""The analytic estimate of the traced model and setup, reduced to tensor bytes (no torch)."""

from __future__ import annotations

from estimator.errors import ConfigError
from estimator.specs import TrainSetup
from estimator.specs.trace import NON_TENSOR_TERMS, AnalyticSide

UNLIMITED_BYTES = 2**60
"""Capacity given to the estimate's device so that it fits and no advice search runs."""


def analytic_side(model: str, setup: TrainSetup, device: str) -> tuple[AnalyticSide | None, str]:
    """(AnalyticSide, note) from estimator.api.estimate; (None, why) when the analytic model
    cannot read the model's config. HF computes full b·s·V logits, so the estimate is made with
    fused_loss=False."""
    from estimator.catalog import load_model
    from estimator.hardware import resolve_device
    from estimator.planner.estimate import estimate

    try:
        spec = load_model(model)
    except ConfigError as exc:
        return None, f"no analytic estimate: {exc}"
    dev = resolve_device(device)[0].model_copy(update={"memory_bytes": UNLIMITED_BYTES})
    est = estimate(spec, setup.model_copy(update={"fused_loss": False}), dev)
    components = dict(est.memory.components)
    non_tensor = sum(components.get(term, 0) for term in NON_TENSOR_TERMS)
    side = AnalyticSide(device_name=device, total_bytes=est.memory.total_bytes,
                        components=components, tensor_bytes=est.memory.total_bytes - non_tensor,
                        peak_phase=est.memory.notes.get("peak_phase", ""))
    note = "" if not setup.fused_loss else "estimate made with --no-fused-loss (HF's full logits)"
    return side, note
