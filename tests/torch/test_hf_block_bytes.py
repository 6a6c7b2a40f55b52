"""The HF layer table (frameworks/hf.HF_BLOCK_BYTES, as elementwise.block_token_bytes serves it
for `framework="hf"`) against a fresh TorchDispatchMode recording of HF Trainer steps on
shapes and regimes the fit did not use (benchmarks/record_hf_block_bytes.py made the table)."""

import pytest

from estimator.analytic.elementwise import block_token_bytes
from estimator.specs import ModelSpec, TrainSetup

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.torch
SEQ = 16


def _per_token_per_layer(spec: ModelSpec, setup: TrainSetup) -> dict[str, float]:
    """Double difference: 2 − 1 layers, 2 − 1 sequences of SEQ tokens."""
    from hf_build import record_hf_step

    from estimator.calibrate.aten_ops import per_layer_per_token

    setup = setup.model_copy(update={"seq_len": SEQ})
    rec = {(n, b): r for n in (1, 2) for b, r in record_hf_step(
        spec.model_copy(update={"num_layers": n}), setup).items()}
    return {phase: per_layer_per_token(rec, phase, SEQ) for phase in ("forward", "backward")}


SPEC = ModelSpec(name="t", num_layers=1, hidden_size=80, intermediate_size=160, num_heads=5,
                 num_kv_heads=1, head_dim=16, vocab_size=258, max_seq_len=256)


@pytest.mark.parametrize("overrides", [
    {"method": "lora", "compute_dtype": "bf16", "lora_rank": 6},
    {"method": "full", "compute_dtype": "fp32", "weight_bits": 32, "checkpointing": True},
    {"method": "qlora", "compute_dtype": "fp32", "weight_bits": 4, "lora_rank": 6},
], ids=["lora-bf16-mixed", "full-fp32-ckpt", "qlora-fp32"])
def test_hf_layer_bytes_match_the_recording(overrides):
    setup = TrainSetup(framework="hf", **overrides)
    measured = _per_token_per_layer(SPEC, setup)
    table = block_token_bytes(setup)
    rank_sum = setup.lora_rank * 7 if setup.trains_adapters else 0.0
    forward = table["forward"].per_token(SPEC, SPEC.intermediate_size, rank_sum)
    backward = table["backward"].per_token(SPEC, SPEC.intermediate_size, rank_sum)
    if setup.checkpointing:
        backward += table["recompute"].per_token(SPEC, SPEC.intermediate_size, rank_sum)
    assert forward == pytest.approx(measured["forward"], rel=0.02)
    assert backward == pytest.approx(measured["backward"], rel=0.02)
    nvfree = block_token_bytes(setup.model_copy(update={"framework": "nvfree"}))
    assert table["forward"] != nvfree["forward"]  # HF's own table, not the trainer's
