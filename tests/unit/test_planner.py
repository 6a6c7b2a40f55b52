"""The planner: the array scoring equals the analytic model exactly (one device, several
devices and nodes, ZeRO stages, offload, expert parallelism, a CPU split between ranks,
calibrated or not); the device-count axis; ranking, limits and verdicts."""

from dataclasses import replace

import numpy as np
import pytest

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.analytic.uncertainty import upper_bytes
from estimator.catalog import load_device
from estimator.errors import SetupError
from estimator.planner import (
    Constraints,
    devices_up_to,
    memory_totals,
    micro_batches,
    nodes_for,
    score,
    score_groups,
    search,
    search_space,
    setups_at_device_counts,
    structural_setups,
)
from estimator.planner.ranking import _search
from estimator.planner.scoring import _exact_scores
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
                                                    request: pytest.FixtureRequest,
                                                    assert_planner_equals_estimate) -> None:
    model: ModelSpec = request.getfixturevalue(model_name)
    device = load_device("xeon-platinum-8480plus")
    prof = profile() if calibrated else None
    base = TrainSetup(seq_len=64)
    accums = 16 // BATCHES
    for setup in structural_setups(base, [("fp32", False), ("bf16", True), ("bf16", False)],
                                   Constraints()):
        assert_planner_equals_estimate(model, setup, device, BATCHES, accums, prof)
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
    def upper(c):  # what must fit: the band's upper end
        return upper_bytes(c.peak_bytes, c.setup, device)

    smallest = min(upper(c) for c in free.candidates)
    limit = (smallest + upper(free.candidates[0])) // 2
    tight = search(tiny_dense, base, device, None,
                   Constraints(methods=("full",), memory_limit_bytes=limit, top=10_000))
    assert tight.candidates[0].fits and upper(tight.candidates[0]) <= limit
    assert tight.num_fitting < tight.num_candidates
    assert any(c.verdict.startswith("does not fit") for c in tight.candidates), {
        c.verdict for c in tight.candidates if not c.fits}


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


SMALL = Constraints(global_batch=8, precisions=(("fp32", False), ("bf16", True)),
                    zero_stages=(0, 1, 2, 3))


def assert_scores_exact(model: ModelSpec, base: TrainSetup, device_name: str,
                        prof: CalibrationProfile | None, c: Constraints) -> int:
    """score_groups over the whole space equals memory_breakdown and step_throughput per
    candidate; returns the number of candidates compared."""
    device = load_device(device_name)
    groups = search_space(base, list(c.precisions), c)
    peak, seconds = score_groups(model, groups, device, prof)
    exact_peak, exact_seconds = _exact_scores(model, groups, device, prof)
    np.testing.assert_allclose(seconds, exact_seconds, rtol=1e-9)
    np.testing.assert_allclose(peak, exact_peak, rtol=1e-12)
    return len(peak)


@pytest.mark.parametrize("calibrated", [False, True])
def test_scores_equal_the_analytic_model_over_devices_and_zero_stages(
        tiny_dense: ModelSpec, calibrated: bool) -> None:
    base = TrainSetup(seq_len=64, num_devices=16, num_nodes=2)  # 8 per node: 16 spans nodes
    c = replace(SMALL, device_counts=(1, 2, 8, 16))
    count = assert_scores_exact(tiny_dense, base, "mi300x", profile() if calibrated else None, c)
    # structures × (N = 1: 4 micro-batches + 4 stages × (N = 2: 3 + N = 8: 1)); 16 ∤ 8: skipped
    assert count == 3 * 2 * 2 * 2 * (4 + 4 * (3 + 1))


@pytest.mark.parametrize("offload,stage", [("optimizer", 1), ("optimizer_and_params", 3)])
def test_scores_equal_the_analytic_model_with_offload(tiny_dense: ModelSpec, offload: str,
                                                      stage: int) -> None:
    base = TrainSetup(seq_len=64, num_devices=4, offload=offload)
    assert_scores_exact(tiny_dense, base, "h100-sxm", None,
                        replace(SMALL, zero_stages=(stage,), device_counts=(2, 4)))


def test_scores_equal_the_analytic_model_moe_expert_parallel(tiny_moe: ModelSpec) -> None:
    base = TrainSetup(seq_len=64, num_devices=4, expert_parallel=2)
    assert_scores_exact(tiny_moe, base, "mi300x", profile(),
                        replace(SMALL, methods=("full", "lora"), device_counts=(1, 2, 4)))


@pytest.mark.parametrize("model_name", ["tiny_dense", "tiny_moe"])
def test_scores_equal_the_analytic_model_cpu_ranks_sharing_a_machine(
        model_name: str, request: pytest.FixtureRequest) -> None:
    base = TrainSetup(seq_len=64, num_devices=2)  # two processes split one CPU machine
    assert_scores_exact(request.getfixturevalue(model_name), base, "xeon-platinum-8480plus",
                        profile(), replace(SMALL, methods=("lora",), zero_stages=(0, 1, 3),
                                           device_counts=(1, 2)))


def test_device_count_axis() -> None:
    assert devices_up_to(1) == (1,)
    assert devices_up_to(64) == (1, 2, 4, 8, 16, 32, 64)
    assert devices_up_to(6) == (1, 2, 4, 6)
    base = TrainSetup(num_devices=64, num_nodes=8)
    assert [nodes_for(base, n) for n in (1, 8, 16, 12)] == [1, 1, 2, None]
    at = setups_at_device_counts(base, Constraints(global_batch=48,
                                                   device_counts=(1, 2, 12, 16, 64)))
    assert [(s.num_devices, s.num_nodes) for s in at] == [(1, 1), (2, 1), (16, 2)]
    with pytest.raises(SetupError, match="not divisible by any"):
        setups_at_device_counts(base, Constraints(global_batch=3, device_counts=(2, 4)))


def test_search_over_device_counts_agrees_with_estimate(tiny_dense: ModelSpec) -> None:
    device = load_device("mi300x")
    base = TrainSetup(seq_len=64, num_tokens=10**6, num_devices=8)
    c = Constraints(global_batch=16, zero_stages=(0, 3), device_counts=devices_up_to(8),
                    objective="cost", top=8)
    ranked, agree, num_candidates, *_ = _search(tiny_dense, base, device, None, c, exact=False)
    assert agree  # the array scores of the best 8 equal estimate()
    assert num_candidates == 36 * (5 + 2 * (4 + 3 + 2))  # N = 1 | 2, 4, 8 × stages 0, 3
    assert ranked[0].verdict == "chosen: cheapest that fits"
    assert all(ranked[0].cost_usd <= r.cost_usd for r in ranked[1:] if r.fits)
    assert ranked[0].setup.num_devices == 1  # cost: one device idles least
    fastest = search(tiny_dense, base, device, None, replace(c, objective="time"))
    assert fastest.candidates[0].setup.num_devices > 1  # time: several devices, sooner
    assert fastest.candidates[0].total_seconds <= min(r.total_seconds for r in ranked)


def test_default_seconds_array_equals_the_scalar_roofline() -> None:
    from estimator.analytic.efficiency import default_seconds, default_seconds_array

    device = load_device("xeon-platinum-8480plus")
    flops = np.array([0.0, 1.0, 3e5, 2e7, 4e12, 0.0])
    nbytes = np.array([0.0, 7e3, 0.0, 2e5, 1e9, 5e10])
    for op_class in ("matmul", "attention", "elementwise"):
        scalar = [default_seconds(device, "bf16", op_class, f, b)
                  for f, b in zip(flops, nbytes, strict=True)]
        assert list(default_seconds_array(device, "bf16", op_class, flops, nbytes)) == scalar


def test_exact_scoring_path_equals_the_array_path(tiny_dense: ModelSpec) -> None:
    """The fallback `search` takes when a re-scored candidate disagrees with its array score."""
    device = load_device("mi300x")
    base = TrainSetup(seq_len=64, num_tokens=10**5, num_devices=4)
    c = replace(SMALL, methods=("qlora",), zero_stages=(0, 2), device_counts=(1, 4))
    fast, exact = (score(tiny_dense, base, device, None, c, exact=e) for e in (False, True))
    np.testing.assert_allclose(fast.step_seconds, exact.step_seconds, rtol=1e-9)
    np.testing.assert_array_equal(fast.peak_bytes, exact.peak_bytes)
    assert [fast.setup(i) for i in (0, 7)] == [exact.setup(i) for i in (0, 7)]


COUNTS = np.array([2, 4, 8, 16, 64])


def at_count(setup: TrainSetup, n: int) -> TrainSetup:
    return setup.model_copy(update={"num_devices": n, "num_nodes": max(1, n // 8)})


@pytest.mark.parametrize("stage,offload,method", [(0, "none", "full"), (1, "none", "lora"),
                                                  (2, "optimizer", "full"),
                                                  (3, "optimizer_and_params", "qlora")])
def test_sharding_terms_over_device_counts_equal_the_scalar_ones(
        tiny_moe: ModelSpec, stage: int, offload: str, method: str) -> None:
    """model_state_terms, step_collectives and optimizer_share at an array of device counts
    equal the scalar calls at each count, bit for bit (the planner's sweeps rely on it)."""
    from estimator.analytic.memory import model_state_terms
    from estimator.analytic.parallel import optimizer_share, step_collectives

    device = load_device("h100-sxm")
    bits = 4 if method == "qlora" else 16
    setup = TrainSetup(seq_len=64, num_devices=2, zero_stage=stage, offload=offload,
                       method=method, weight_bits=bits, expert_parallel=2, grad_accum=2)
    params = count_params(tiny_moe, setup)
    arrays = model_state_terms(tiny_moe, setup, device, params, num_devices=COUNTS)
    share = optimizer_share(tiny_moe, setup, params, num_devices=COUNTS)
    collectives = step_collectives(tiny_moe, setup, params, num_devices=COUNTS)
    for i, n in enumerate(COUNTS.tolist()):
        at = at_count(setup, n)
        scalar = model_state_terms(tiny_moe, at, device, params)
        assert {k: np.broadcast_to(v, COUNTS.shape)[i] for k, v in arrays.items()} == scalar
        assert np.broadcast_to(share, COUNTS.shape)[i] == optimizer_share(tiny_moe, at, params)
        each = step_collectives(tiny_moe, at, params)
        assert [(c.name, c.num_calls) for c in collectives] == [(c.name, c.num_calls)
                                                                for c in each]
        assert [np.broadcast_to(c.num_bytes, COUNTS.shape)[i] for c in collectives] == [
            c.num_bytes for c in each]


def test_collective_times_over_layouts_equal_the_scalar_ones() -> None:
    """comms' ring, hierarchical and expert all-to-all times over arrays of node layouts and
    payloads equal the scalar times elementwise, bit for bit, one rank and empty buffers
    included."""
    from estimator.analytic import comms as C

    links = C.links_for(load_device("mi300x"), TrainSetup(num_devices=8))
    per_node = np.array([1, 2, 8, 8, 8, 8])
    nodes = np.array([1, 1, 1, 2, 4, 8])
    payload = np.array([3e8, 0.0, 1e9, 7.5e6, 2e10, 1.0])
    many = replace(links, devices_per_node=per_node, num_nodes=nodes)
    one = [replace(links, devices_per_node=g, num_nodes=k)
           for g, k in zip(per_node.tolist(), nodes.tolist(), strict=True)]
    for kind, ranks in [("all_reduce", 0), ("all_gather", 0), ("reduce_scatter", 0),
                        ("all_to_all", 16), ("host_transfer", 0)]:
        c = C.Collective("x", kind, payload, 3, ranks)
        scalar = [C.collective_seconds(replace(c, num_bytes=b), lk, None)
                  for b, lk in zip(payload.tolist(), one, strict=True)]
        assert C.collective_seconds(c, many, None).tolist() == scalar, kind
    counts = per_node * nodes
    assert C.ring_all_reduce_seconds(payload, counts, 1e10, 5e-6).tolist() == [
        C.ring_all_reduce_seconds(b, n, 1e10, 5e-6)
        for b, n in zip(payload.tolist(), counts.tolist(), strict=True)]


def test_exact_rows_are_the_numbers_of_estimate(tiny_moe: ModelSpec) -> None:
    """The re-score composes estimate()'s own memory and step time (without its advice)."""
    from estimator.api import estimate
    from estimator.planner.ranking import _exact

    device = load_device("h100-sxm")
    setups = [TrainSetup(seq_len=64, num_devices=4, zero_stage=3, expert_parallel=2,
                         batch_size=2, grad_accum=2, method="lora"),
              TrainSetup(seq_len=64, num_devices=2, offload="optimizer", zero_stage=1),
              TrainSetup(seq_len=64, method="qlora", weight_bits=4, checkpointing=True)]
    rows = _exact(tiny_moe, setups, device, None, 10, 2**40)
    for row, setup in zip(rows, setups, strict=True):
        est = estimate(tiny_moe, setup, device)
        assert (row.peak_bytes, row.step_seconds) == (est.memory.total_bytes,
                                                      est.throughput.step_seconds)


def test_numpy_stays_out_of_the_estimate_path() -> None:
    """memory.py and comms.py take arrays without importing numpy: `nvfree estimate` never
    loads it (it adds ~0.1 s to every start)."""
    import subprocess
    import sys

    code = ("import sys, estimator.api, estimator.analytic.comms, estimator.analytic.parallel;"
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
