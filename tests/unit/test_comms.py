"""Collective times (ring formulas by hand), per-step collectives, and the multi-device step."""

import math

import pytest

from estimator.analytic import comms as C
from estimator.analytic.parallel import communication_ops
from estimator.analytic.params import count_params
from estimator.api import estimate
from estimator.catalog import load_device, load_model
from estimator.specs import CalibrationProfile, Device, EfficiencyCurve, TrainSetup

GB = 1e9


def test_ring_all_reduce_by_hand() -> None:
    # 2(n-1)/n · B / β = 2·3/4 · 1 GB / 1 GB/s = 1.5 s; latency 2(n-1)·α = 6 ms
    assert math.isclose(C.ring_all_reduce_seconds(GB, 4, GB), 1.5)
    assert math.isclose(C.ring_all_reduce_seconds(GB, 4, GB, 1e-3), 1.506)


def test_all_gather_reduce_scatter_all_to_all_by_hand() -> None:
    # (n-1)/n · B / β = 7/8 s for n = 8; (n-1)·α = 7 ms
    for fn in (C.ring_all_gather_seconds, C.ring_reduce_scatter_seconds, C.all_to_all_seconds):
        assert math.isclose(fn(GB, 8, GB), 0.875)
        assert math.isclose(fn(GB, 8, GB, 1e-3), 0.882)


def test_one_rank_or_empty_buffer_costs_nothing() -> None:
    assert C.ring_all_reduce_seconds(GB, 1, GB, 1e-3) == 0.0
    assert C.ring_all_gather_seconds(0, 8, GB, 1e-3) == 0.0


def links(g: int, k: int) -> C.Links:
    return C.Links(intra_bytes_per_second=100 * GB, inter_bytes_per_second=10 * GB,
                   intra_latency_seconds=0.0, inter_latency_seconds=0.0,
                   devices_per_node=g, num_nodes=k)


def test_hierarchical_on_one_node_is_the_flat_ring() -> None:
    assert math.isclose(C.all_reduce_seconds(GB, links(8, 1)),
                        C.ring_all_reduce_seconds(GB, 8, 100 * GB))
    assert math.isclose(C.all_gather_seconds(GB, links(8, 1)),
                        C.ring_all_gather_seconds(GB, 8, 100 * GB))


def test_hierarchical_all_reduce_two_nodes_by_hand() -> None:
    # intra RS + AG: 2 · 3/4 · 1 GB / 100 GB/s = 15 ms; inter AR of B/4 over 2 nodes:
    # 2 · 1/2 · 0.25 GB / 10 GB/s = 25 ms
    assert math.isclose(C.all_reduce_seconds(GB, links(4, 2)), 0.015 + 0.025)


def test_data_parallel_collectives_per_stage() -> None:
    base = TrainSetup(num_devices=8, grad_accum=4)
    ddp = C.data_parallel_collectives(base, 100, 50, 0)
    assert [(c.kind, c.num_calls) for c in ddp] == [("all_reduce", 1)]
    z2 = C.data_parallel_collectives(base.model_copy(update={"zero_stage": 2}), 100, 50, 0)
    assert [(c.kind, c.num_calls) for c in z2] == [("reduce_scatter", 4), ("all_gather", 1)]
    z3 = C.data_parallel_collectives(base.model_copy(update={"zero_stage": 3}), 100, 50, 7)
    assert [(c.kind, c.num_calls, c.num_bytes) for c in z3] == [
        ("reduce_scatter", 4, 100), ("all_gather", 8, 57)]
    per_unit = C.data_parallel_collectives(base.model_copy(update={"zero_stage": 3}), 100, 50,
                                           7, units=5)  # the same bytes in 5 groups
    assert [(c.kind, c.num_calls, c.num_bytes) for c in per_unit] == [
        ("reduce_scatter", 20, 20), ("all_gather", 40, 57 / 5)]
    assert C.data_parallel_collectives(TrainSetup(), 100, 50, 0) == []


def test_each_collective_reads_its_own_measured_curve() -> None:
    """A measured all-gather curve times all-gathers itself; without one, half a measured
    all-reduce; gloo's are not the ring's halves (calibrate/collectives.py)."""
    from estimator.specs import EfficiencyCurve

    def curve(kind: str, rate: float) -> EfficiencyCurve:
        return EfficiencyCurve(op_class=f"collective.{kind}", unit="bytes",
                               log10_work=(3.0, 9.0), rates=(rate, rate), overhead_seconds=0.0)

    c, lk = C.Collective("param.all_gather", "all_gather", 1e8, 2), links(2, 1)
    reduce = {"collective.all_reduce": curve("all_reduce", 1e9)}
    assert math.isclose(C.collective_seconds(c, lk, reduce), 2 * 0.5 * 0.1)
    both = {**reduce, "collective.all_gather": curve("all_gather", 2.5e8)}
    assert math.isclose(C.collective_seconds(c, lk, both), 2 * 0.4)
    assert C.collective_seconds(c, lk, None) == C.collective_seconds(c, lk, {})


def test_moe_all_to_all_four_per_layer_per_micro_batch() -> None:
    model = load_model("mixtral-8x7b")
    setup = TrainSetup(method="lora", num_devices=8, expert_parallel=8, grad_accum=2,
                       seq_len=1024)
    (c,) = C.expert_parallel_collectives(model, setup)
    assert c.num_calls == 4 * model.num_moe_layers * 2
    assert c.num_bytes == 1024 * 2 * model.hidden_size * 2  # tokens · top-2 · h · bf16


def test_single_device_step_is_unchanged() -> None:
    model = load_model("llama-3.1-8b")
    one = estimate(model, TrainSetup(method="qlora", weight_bits=4), "rtx-4090")
    assert one.throughput.communication_seconds == 0.0
    assert not any(op.name.startswith("comm.") for op in one.throughput.ops)
    assert math.isclose(one.throughput.step_seconds,
                        sum(op.seconds for op in one.throughput.ops))


def test_ddp_step_adds_communication_and_counts_all_devices() -> None:
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(method="lora", num_tokens=10**9)
    one = estimate(model, setup, "h100-sxm").throughput
    eight = estimate(model, setup.model_copy(update={"num_devices": 8}), "h100-sxm").throughput
    assert eight.communication_seconds > 0
    assert eight.step_seconds > one.step_seconds
    assert one.tokens_per_second < eight.tokens_per_second <= 8 * one.tokens_per_second
    hours = eight.total_seconds / 3600
    assert math.isclose(eight.cost_usd, 8 * load_device("h100-sxm").price_per_hour_usd * hours)


def test_more_nodes_never_faster_collectives() -> None:
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(num_devices=16, zero_stage=3)
    dev = load_device("h100-sxm")
    params = count_params(model, setup)
    one_node = sum(o.seconds for o in communication_ops(model, setup, dev, params, None))
    two = setup.model_copy(update={"num_nodes": 2})
    two_nodes = sum(o.seconds for o in communication_ops(model, two, dev, params, None))
    assert two_nodes > one_node


def test_offload_moves_optimizer_step_to_host() -> None:
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(num_devices=8, zero_stage=2, offload="optimizer")
    names = [op.name for op in estimate(model, setup, "h100-sxm").throughput.ops]
    assert "offload.optimizer_step" in names and "optimizer.step" not in names
    assert "comm.offload.grad_to_host" in names


@pytest.fixture
def local_cpu() -> Device:
    return Device(name="local", display_name="test CPU", vendor="x", kind="cpu",
                  backend="cpu", memory_bytes=64 * 2**30,
                  memory_bandwidth_bytes_per_second=50e9,
                  peak_flops_per_second={"fp32": 1e12}, unified_memory=True)


def test_measured_all_reduce_curve_replaces_the_model_locally(local_cpu: Device) -> None:
    curve = EfficiencyCurve(op_class="collective.all_reduce", unit="bytes",
                            log10_work=(3.0, 9.0), rates=(1e8, 1e9), overhead_seconds=1e-4)
    profile = CalibrationProfile(fingerprint="f" * 16, torch_version="2.13.0", num_threads=2,
                                 backend="cpu", device_name="test", created_at="2026-01-01",
                                 curves={"collective.all_reduce": curve})
    model = load_model("gpt2")
    setup = TrainSetup(num_devices=2, compute_dtype="fp32", mixed_precision=False)
    params = count_params(model, setup)
    (row,) = communication_ops(model, setup, local_cpu, params, profile)
    payload = params.trainable * 4
    rate = 1e8 + (math.log10(payload) - 3) / 6 * (1e9 - 1e8)
    assert math.isclose(row.seconds, 1e-4 + payload / rate)
    catalogue = local_cpu.model_copy(update={"name": "xeon"})
    (modelled,) = communication_ops(model, setup, catalogue, params, profile)
    assert not math.isclose(modelled.seconds, row.seconds)


def test_compose_keeps_decode_rate_per_device_group() -> None:
    model = load_model("llama-3.1-8b")
    one = estimate(model, TrainSetup(method="inference", weight_bits=4), "l4").throughput
    two = estimate(model, TrainSetup(method="inference", weight_bits=4, num_devices=2),
                   "l4").throughput
    assert math.isclose(two.decode_tokens_per_second, 2 * one.decode_tokens_per_second)
    assert two.communication_seconds == 0.0


def test_cpu_ranks_on_one_machine_share_it() -> None:
    model = load_model("gpt2")
    setup = TrainSetup(compute_dtype="fp32", mixed_precision=False, seq_len=512)
    one = estimate(model, setup, "xeon-platinum-8480plus")
    two = estimate(model, setup.model_copy(update={"num_devices": 2}), "xeon-platinum-8480plus")
    assert two.memory.capacity_bytes < one.memory.capacity_bytes
    # two processes on one machine: no more than the machine's rate, less after communication
    assert two.throughput.tokens_per_second < 1.05 * one.throughput.tokens_per_second
    apart = estimate(model, setup.model_copy(update={"num_devices": 2, "num_nodes": 2}),
                     "xeon-platinum-8480plus")
    assert apart.throughput.tokens_per_second > 1.2 * one.throughput.tokens_per_second


def test_sharding_advice_has_a_step_time() -> None:
    est = estimate(load_model("llama-3.1-70b"), TrainSetup(checkpointing=True), "h100-sxm")
    sharded = [a for a in est.advice if "--num-devices" in a.change]
    assert sharded and all(a.fits and a.step_seconds > 0 for a in sharded)
