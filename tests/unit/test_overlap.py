"""analytic/overlap.py: communication hidden behind compute never makes a step faster than
its compute, never hides anything on one device or on a CPU, hides the DDP buckets only
behind the last backward, and the planner's arrays equal estimate() with overlap on."""

import numpy as np
import pytest

from estimator.analytic import overlap as O
from estimator.analytic.comms import Collective
from estimator.catalog import load_device, load_model
from estimator.planner.estimate import estimate
from estimator.specs import TrainSetup


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_overlap_never_beats_compute_and_never_adds_time(stage: int) -> None:
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(method="full", seq_len=2048, num_devices=16, num_nodes=2,
                       zero_stage=stage, grad_accum=2)
    t = estimate(model, setup, "h100-sxm").throughput
    compute = sum(op.seconds for op in t.ops if not op.name.startswith(("comm.", "offload.")))
    exposed = _rows_t(t, "comm.")
    hidden = _hidden(t)
    assert hidden > 0 and all(op.seconds >= 0 and op.hidden_seconds >= 0 for op in t.ops)
    assert compute <= t.step_seconds <= compute + exposed + hidden + 1e-12
    assert t.communication_seconds == pytest.approx(exposed)
    assert t.step_seconds == pytest.approx(sum(op.seconds for op in t.ops))


def _rows_t(t, prefix: str) -> float:
    return sum(op.seconds for op in t.ops if op.name.startswith(prefix))


def _hidden(t) -> float:
    return sum(op.hidden_seconds for op in t.ops)


def test_one_device_and_cpus_hide_nothing() -> None:
    model = load_model("llama-3.1-8b")
    one = estimate(model, TrainSetup(method="lora"), "h100-sxm").throughput
    assert _hidden(one) == 0
    cpu = estimate(model, TrainSetup(method="lora", num_devices=4, num_nodes=4),
                   "xeon-platinum-8480plus").throughput
    assert cpu.communication_seconds > 0
    assert _hidden(cpu) == 0
    assert cpu.communication_seconds == pytest.approx(_rows_t(cpu, "comm."))


def test_slot_windows_and_tails() -> None:
    setup = TrainSetup(num_devices=8, zero_stage=3, grad_accum=4)
    share = O.forward_share(setup)
    assert share == pytest.approx(1 / 3)  # forward 2 of 2 + 4 FLOPs per parameter and token
    assert O.forward_share(setup.model_copy(update={"checkpointing": True})) == pytest.approx(
        1 / 4)
    assert O.forward_share(setup.model_copy(update={"method": "lora"})) == pytest.approx(1 / 2)
    # more communication than compute: each slot hides at most its window
    hidden = O.hidden_seconds((5.0, 5.0, 5.0, 5.0), (1.0, 0.0, 0.0, 0.0), 3.0, 4, share)
    assert hidden == pytest.approx([0.0, 2.0 / 4, 1.0, 2.0])
    # little communication: all but the tail hides
    hidden = O.hidden_seconds((0.1, 0.1, 0.1, 0.1), (1.0, 0.2, 0.5, 0.5), 30.0, 4, share)
    assert hidden == pytest.approx([0.0, 0.08, 0.05, 0.05])
    # arrays and scalars agree
    arrays = O.hidden_seconds(np.full((4, 3), 5.0), np.zeros((4, 3)), np.array([1.0, 3.0, 9.0]),
                              np.array([1, 4, 2]), share)
    for j, (c, a) in enumerate([(1.0, 1), (3.0, 4), (9.0, 2)]):
        assert np.allclose([h[j] for h in arrays],
                           O.hidden_seconds((5.0,) * 4, (0.0,) * 4, c, a, share))


def test_ddp_tail_is_the_last_bucket_and_zero3_the_first_block() -> None:
    model = load_model("llama-3.1-8b")
    dev = load_device("h100-sxm")
    setup = TrainSetup(num_devices=8)
    grads = Collective("grad.all_reduce", "all_reduce", 100 * O.DDP_BUCKET_BYTES, 1)
    assert O.slot_weights(grads, setup) == (0.0, 1.0, 0.0, 0.0)
    assert O.tails(model, setup, dev, [grads])[1] == pytest.approx(0.01)
    z3 = setup.model_copy(update={"zero_stage": 3})
    gather = Collective("param.all_gather", "all_gather", 10, 2)
    assert O.slot_weights(gather, z3) == (0.0, 0.0, 0.5, 0.5)
    assert O.tails(model, z3, dev, [gather])[2] == pytest.approx(1 / model.num_layers)
    a2a = Collective("moe.all_to_all", "all_to_all", 10, 4, 8)
    assert O.slot_weights(a2a, z3)[0] == 1.0  # on the critical path: exposed
    z1 = setup.model_copy(update={"zero_stage": 1})
    after_step = Collective("param.all_gather", "all_gather", 10, 1)
    assert O.slot_weights(after_step, z1)[0] == 1.0


def test_accumulation_hides_ddp_only_behind_the_last_backward() -> None:
    """DDP reduces once per step: more micro-batches add compute, not window."""
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(method="lora", seq_len=512, num_devices=16, num_nodes=16)
    one = estimate(model, setup, "h100-sxm").throughput
    four = estimate(model, setup.model_copy(update={"grad_accum": 4}), "h100-sxm").throughput
    assert _hidden(four) == pytest.approx(_hidden(one), rel=0.05)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_planner_equals_estimate_with_overlap(stage: int,
                                               assert_planner_equals_estimate) -> None:
    model = load_model("llama-3.1-8b")
    device = load_device("h100-sxm")
    setup = TrainSetup(method="full", seq_len=1024, num_devices=16, num_nodes=2,
                       zero_stage=stage, checkpointing=stage >= 2)
    assert_planner_equals_estimate(model, setup, device, [1, 2, 4], [4, 2, 1])
    assert _hidden(estimate(model, setup, device).throughput) > 0


@pytest.mark.parametrize("stage", [1, 3])
def test_planner_equals_estimate_for_an_moe_with_expert_parallelism(
        stage: int, assert_planner_equals_estimate) -> None:
    model = load_model("mixtral-8x7b")
    device = load_device("mi300x")
    setup = TrainSetup(method="lora", seq_len=1024, num_devices=16, num_nodes=2,
                       expert_parallel=8, zero_stage=stage)
    assert_planner_equals_estimate(model, setup, device, [1, 2], [2, 1])
