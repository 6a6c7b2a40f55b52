"""The planner: the vectorised scoring equals the analytic model exactly; ranking, limits and
verdicts."""

import numpy as np
import pytest

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.catalog import load_device
from estimator.errors import SetupError
from estimator.planner import (
    Constraints,
    _exact_seconds,
    memory_totals,
    micro_batches,
    search,
    step_seconds,
    structural_setups,
)
from estimator.specs import CalibrationProfile, EfficiencyCurve, ModelSpec, TrainSetup

BATCHES = np.array([1, 2, 4, 8, 16])


def profile() -> CalibrationProfile:
    """A synthetic measured profile: GEMM, attention, LoRA and memory-bound curves."""
    def curve(op_class: str, unit: str, rates: tuple[float, ...]) -> EfficiencyCurve:
        return EfficiencyCurve(op_class=op_class, unit=unit, log10_work=(4.0, 7.0, 10.0),
                               rates=rates, overhead_seconds=4e-6)
    flops = {f"{c}.{d}": curve(f"{c}.{d}", "flops", (1e9, 5e10, 2e11))
             for c in ("matmul", "attention") for d in ("fp32", "bf16")}
    return CalibrationProfile(
        fingerprint="test", torch_version="x", num_threads=2, backend="cpu", device_name="t",
        created_at="2026-01-01T00:00:00Z", preferred_dtype="bf16",
        curves={**flops, "memory": curve("memory", "bytes", (1e9, 8e9, 1e10))},
        corrections={"matmul.bf16": 1.3, "memory": 0.9})


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("model_name", ["tiny_dense", "tiny_moe"])
def test_vectorised_scores_equal_the_analytic_model(model_name: str, calibrated: bool,
                                                    request: pytest.FixtureRequest) -> None:
    model: ModelSpec = request.getfixturevalue(model_name)
    device = load_device("xeon-platinum-8480plus")
    prof = profile() if calibrated else None
    base = TrainSetup(seq_len=64)
    accums = 16 // BATCHES
    for setup in structural_setups(base, [("fp32", False), ("bf16", True), ("bf16", False)],
                                   Constraints()):
        seconds = step_seconds(model, setup, device, prof, BATCHES, accums)
        exact = [_exact_seconds(model, setup, device, prof, b, a) for b, a in
                 zip(BATCHES, accums, strict=True)]
        np.testing.assert_allclose(seconds, exact, rtol=1e-9)
        memory = memory_totals(model, setup, device, BATCHES, accums)
        at = [setup.model_copy(update={"batch_size": int(b), "grad_accum": int(a)})
              for b, a in zip(BATCHES, accums, strict=True)]
        exact_memory = [memory_breakdown(model, s, device, count_params(model, s)).total_bytes
                        for s in at]
        np.testing.assert_allclose(memory, exact_memory, rtol=1e-12)


def test_search_ranks_fitting_candidates_by_time(tiny_dense: ModelSpec) -> None:
    device = load_device("xeon-platinum-8480plus")
    result = search(tiny_dense, TrainSetup(seq_len=64, num_tokens=10_000), device, None,
                    Constraints(global_batch=8))
    assert result.num_candidates == 3 * 3 * 2 * 2 * 4  # methods·precisions·optim·ckpt·batches
    best, *rest = result.candidates
    assert best.verdict.startswith("chosen") and best.fits
    assert all(best.total_seconds <= r.total_seconds for r in rest if r.fits)
    assert result.max_steps == -(-10_000 // (8 * 64))
    assert all(c.setup.batch_size * c.setup.grad_accum == 8 for c in result.candidates)


def test_memory_limit_prunes_and_fixed_method_narrows(tiny_dense: ModelSpec) -> None:
    device = load_device("xeon-platinum-8480plus")
    base = TrainSetup(seq_len=64, num_tokens=10_000)
    free = search(tiny_dense, base, device, None, Constraints(methods=("full",)))
    assert {c.setup.method for c in free.candidates} == {"full"}
    smallest = min(c.peak_bytes for c in free.candidates)
    limit = (smallest + free.candidates[0].peak_bytes) // 2
    tight = search(tiny_dense, base, device, None,
                   Constraints(methods=("full",), memory_limit_bytes=limit, top=50))
    assert tight.candidates[0].peak_bytes <= limit
    assert tight.num_fitting < tight.num_candidates
    assert any(c.verdict.startswith("does not fit") for c in tight.candidates)


def test_nothing_fits_is_said(tiny_dense: ModelSpec) -> None:
    result = search(tiny_dense, TrainSetup(seq_len=64, num_tokens=1000),
                    load_device("xeon-platinum-8480plus"), None,
                    Constraints(memory_limit_bytes=1000))
    assert result.num_fitting == 0
    assert result.candidates[0].verdict.startswith("does not fit")


def test_cost_objective_uses_price(tiny_dense: ModelSpec) -> None:
    device = load_device("mi300x")
    assert device.price_per_hour_usd
    result = search(tiny_dense, TrainSetup(seq_len=64, num_tokens=10_000), device, None,
                    Constraints(objective="cost"))
    best = result.candidates[0]
    assert best.cost_usd == pytest.approx(best.total_seconds / 3600 * device.price_per_hour_usd)
    assert best.verdict == "chosen: cheapest that fits"


def test_budget_and_divisibility_errors(tiny_dense: ModelSpec) -> None:
    with pytest.raises(SetupError, match="token budget"):
        search(tiny_dense, TrainSetup(seq_len=64), load_device("mi300x"), None, Constraints())
    with pytest.raises(SetupError, match="not divisible"):
        micro_batches(6, 4)
    assert list(micro_batches(12, 2)) == [1, 2, 3, 6]


def test_corrections_scale_only_their_class(tiny_dense: ModelSpec) -> None:
    from estimator.api import estimate

    device = load_device("xeon-platinum-8480plus")
    setup = TrainSetup(seq_len=64, compute_dtype="bf16")
    corrected = estimate(tiny_dense, setup, device, profile()).throughput.ops
    plain = estimate(tiny_dense, setup, device, profile().model_copy(
        update={"corrections": {}})).throughput.ops
    factor = {"matmul.bf16": 1.3, "memory": 0.9}
    for c, p in zip(corrected, plain, strict=True):
        assert c.seconds == pytest.approx(p.seconds * factor.get(p.op_class, 1.0))
