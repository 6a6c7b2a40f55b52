"""The memory-bound bytes formula (flops.MEMORY_BOUND_BYTES / MOE_ROUTING_BYTES) against a
TorchDispatchMode recording of executor training steps on shapes the fit did not use, and the
byte accounting of one aten call (calibrate.benches.aten_call_bytes)."""


import pytest
import torch

from estimator.analytic.elementwise import MOE_ROUTING_BYTES, block_token_bytes, mlp_width
from estimator.calibrate.aten_ops import per_layer_per_token
from estimator.calibrate.benches import record_train_step_bytes
from estimator.specs import ModelSpec, MoESpec, TrainSetup

pytestmark = pytest.mark.torch
SEQ = 16


def _per_token_per_block(spec: ModelSpec, setup: TrainSetup) -> dict[str, float]:
    """Double difference: 2 − 1 blocks, 2 − 1 sequences of SEQ tokens."""
    rec = {(n, b): record_train_step_bytes(spec.model_copy(update={"num_layers": n}),
                           setup.model_copy(update={"batch_size": b, "seq_len": SEQ}))
           for n in (1, 2) for b in (1, 2)}
    return {phase: per_layer_per_token(rec, phase, SEQ) for phase in ("forward", "backward")}


SPEC = ModelSpec(name="t", num_layers=1, hidden_size=80, intermediate_size=160, num_heads=5,
                 num_kv_heads=1, head_dim=16, vocab_size=258, max_seq_len=256)


@pytest.mark.parametrize(("spec", "overrides"), [
    (SPEC, {"method": "lora", "compute_dtype": "bf16", "lora_rank": 6}),
    (SPEC.model_copy(update={"hidden_size": 48, "intermediate_size": 224, "num_heads": 3}),
     {"method": "full", "compute_dtype": "fp32", "weight_bits": 32, "checkpointing": True}),
], ids=["lora-bf16-mixed", "full-fp32-ckpt"])
def test_block_bytes_match_the_recording(spec, overrides):
    setup = TrainSetup(framework="nvfree", **overrides)  # the executor's table
    measured = _per_token_per_block(spec, setup)
    table = block_token_bytes(setup)
    rank_sum = setup.lora_rank * 7 if setup.trains_adapters else 0.0
    forward = table["forward"].per_token(spec, spec.intermediate_size, rank_sum)
    backward = table["backward"].per_token(spec, spec.intermediate_size, rank_sum)
    if setup.checkpointing:
        backward += table["recompute"].per_token(spec, spec.intermediate_size, rank_sum)
    assert forward == pytest.approx(measured["forward"], rel=0.02)
    assert backward == pytest.approx(measured["backward"], rel=0.02)


def test_moe_routing_bytes_match_the_recording(monkeypatch):
    """Per-token routing bytes, recorded with whole expert groups: the padding of adapted
    experts on CPU bf16 adds a per-layer constant (moe_routing_ops(pad_experts=True)) that the
    double difference over batch sizes cancels only in expectation."""
    import estimator.executor.model as model_module

    monkeypatch.setattr(model_module, "_reuses_shapes", lambda x: False)
    spec = SPEC.model_copy(update={"moe": MoESpec(num_experts=6, num_experts_per_token=2,
                                                  expert_intermediate_size=40)})
    setup = TrainSetup(framework="nvfree", method="lora", compute_dtype="bf16", lora_rank=4)
    measured = _per_token_per_block(spec, setup)
    table = block_token_bytes(setup)
    for phase in ("forward", "backward"):
        dense = table[phase].per_token(spec, mlp_width(spec), setup.lora_rank * 7)
        per_hk, per_h, _ = MOE_ROUTING_BYTES[phase]
        routing = (per_hk * 2 + per_h) * spec.hidden_size
        assert dense + routing == pytest.approx(measured[phase], rel=0.08), phase


def test_aten_call_bytes_counts_reads_and_writes():
    from estimator.calibrate.benches import aten_call_bytes

    a, b = torch.ones(10), torch.ones(10)
    out = torch.ops.aten.add.Tensor(a, b)
    assert aten_call_bytes(torch.ops.aten.add.Tensor, (a, b), {}, out) == 120
    dst = torch.empty(10, dtype=torch.bfloat16)
    res = torch.ops.aten.copy_.default(dst, a)
    assert aten_call_bytes(torch.ops.aten.copy_.default, (dst, a), {}, res) == 40 + 20
    view = torch.ops.aten.view.default(a, [2, 5])
    assert aten_call_bytes(torch.ops.aten.view.default, (a, [2, 5]), {}, view) == 0
