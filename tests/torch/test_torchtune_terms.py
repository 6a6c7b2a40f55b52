"""The `torchtune` framework's terms against torchtune's own code on tiny models: every
saved-activation part (saved_tensors_hooks) and the whole training step's tensor peak (the CPU
allocator's events, torch.profiler) against memory_breakdown's tensor terms. Written against
torchtune 1814feb17 (0.5.0 dev) + torchao 0.7; runs wherever both import."""

import pytest

pytest.importorskip("torchao.dtypes.nf4tensor")
pytest.importorskip("torchtune.modules.loss")

import torch
import torchtune_build as tb

from estimator.analytic.activations import activation_bytes
from estimator.analytic.frameworks import as_run
from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.catalog import load_device
from estimator.specs import ModelSpec, TrainSetup

pytestmark = pytest.mark.torch

SPEC = ModelSpec(name="t", num_layers=3, hidden_size=256, intermediate_size=512, num_heads=8,
                 num_kv_heads=4, head_dim=32, vocab_size=2048, max_seq_len=256)
"""NF4 needs each linear's weight count to be a multiple of 64 × 256 (torchao's block sizes)."""
TIED = SPEC.model_copy(update={"tied_embeddings": True})
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVED = {
    "full-bf16": (SPEC, {"method": "full"}),
    "full-fp32": (SPEC, {"method": "full", "compute_dtype": "fp32", "weight_bits": 32}),
    "tied-full": (TIED, {"method": "full"}),
    "lora-qvo-mlp": (SPEC, {"method": "lora", "lora_targets": ("q_proj", "v_proj", "o_proj",
                                                               "gate_proj")}),
    "lora-qv": (SPEC, {"method": "lora", "lora_targets": ("q_proj", "v_proj")}),
    "lora-all-head-dropout": (SPEC, {"method": "lora", "lora_dropout": 0.1,
                                     "lora_targets": (*ALL, "lm_head")}),
    "qlora": (SPEC, {"method": "qlora", "weight_bits": 4}),
    "compiled-full": (SPEC, {"method": "full", "compile": True}),
    "compiled-lora-dropout": (SPEC, {"method": "lora", "compile": True, "lora_dropout": 0.1}),
    "compiled-qlora-qv": (SPEC, {"method": "qlora", "weight_bits": 4, "compile": True,
                                 "lora_targets": ("q_proj", "v_proj")}),
}
PEAK = {
    "full-bf16-plain-ce": (SPEC, {"method": "full", "fused_loss": False}),
    "full-bf16-chunked-ce": (SPEC, {"method": "full"}),
    "full-fp32": (SPEC, {"method": "full", "compute_dtype": "fp32", "weight_bits": 32}),
    "full-opt-in-bwd": (SPEC, {"method": "full", "optimizer_in_backward": True}),
    "tied-full-ckpt": (TIED, {"method": "full", "checkpointing": True}),
    "lora-chunked-ce": (SPEC, {"method": "lora"}),
    "lora-ckpt": (SPEC, {"method": "lora", "checkpointing": True}),
    "lora-qv-head-dropout": (SPEC, {"method": "lora", "lora_dropout": 0.1,
                                    "lora_targets": ("q_proj", "v_proj", "lm_head")}),
    "qlora": (SPEC, {"method": "qlora", "weight_bits": 4}),
    "compiled-full": (SPEC, {"method": "full", "compile": True}),
    "compiled-lora-ckpt": (SPEC, {"method": "lora", "compile": True, "checkpointing": True}),
    "compiled-qlora-ckpt": (SPEC, {"method": "qlora", "weight_bits": 4, "compile": True,
                                   "checkpointing": True}),
}
NOT_TENSORS = ("runtime_overhead", "kernel_caches", "allocator_retention",
               "expert_kernel_caches")
BEFORE_THE_STEPS = ("weights", "quant_scales", "master_weights")


def setup_of(fields: dict) -> TrainSetup:
    return TrainSetup(framework="torchtune", batch_size=2, seq_len=64, lora_rank=8, **fields)


@pytest.mark.parametrize("case", list(SAVED))
def test_saved_activations_equal_torchtunes(case: str) -> None:
    """Every byte torchtune's layers, final norm and output projection save, by part (the
    loss function's own tensors are compared in the step peak)."""
    spec, fields = SAVED[case]
    setup = setup_of(fields)
    model = tb.build(spec, setup)
    if setup.compile:  # compile before recording
        tb.saved_bytes(model, spec, setup)
    got = tb.saved_bytes(model, spec, setup)
    predicted = activation_bytes(spec, as_run(setup))
    assert predicted["layers"] == got["layers"]
    assert predicted["head"] == got["head"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PEAK))
def test_step_tensor_peak_equals_the_allocators(case: str) -> None:
    """memory_breakdown's tensor terms (less the process terms and the parameters that exist
    before the steps) equal the CPU allocator's peak over two recipe steps within 3 %."""
    spec, fields = PEAK[case]
    setup = setup_of(fields)
    torch.manual_seed(0)
    got = tb.allocation_peak(tb.build(spec, setup), spec, setup)
    params = count_params(spec, setup)
    memory = memory_breakdown(spec, setup, load_device("xeon-platinum-8480plus"), params)
    stored = params.trainable * (4 if as_run(setup).compute_dtype == "fp32" else 2)
    predicted = sum(v for k, v in memory.components.items()
                    if k not in NOT_TENSORS + BEFORE_THE_STEPS)
    predicted -= stored if setup.trains_adapters else 0
    assert predicted == pytest.approx(got, rel=0.03)
