"""The `hf` framework's terms against the real transformers + PEFT + bitsandbytes code on tiny
models: every saved-activation part (saved_tensors_hooks), and the whole training step's
tensor peak (the CPU allocator's own event stream, recorded by torch.profiler) against
memory_breakdown's tensor terms."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import hf_build
import torch
from torch.profiler import ProfilerActivity, profile

from estimator.analytic.activations import activation_bytes
from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.catalog import load_device
from estimator.specs import ModelSpec, MoESpec, TrainSetup

pytestmark = pytest.mark.torch

DENSE = ModelSpec(name="t", num_layers=3, hidden_size=128, intermediate_size=320, num_heads=8,
                  num_kv_heads=2, head_dim=16, vocab_size=2000)
SPECS = {
    "llama": DENSE,
    "qwen2": DENSE.model_copy(update={"qkv_bias": True}),
    "tied": DENSE.model_copy(update={"tied_embeddings": True, "vocab_size": 32000}),
    "qwen3": DENSE.model_copy(update={"qk_norm": True}),
    "mixtral": DENSE.model_copy(update={"moe": MoESpec(
        num_experts=4, num_experts_per_token=2, expert_intermediate_size=96)}),
}
CASES = {
    "llama-full-fp32": ("llama", {"method": "full", "compute_dtype": "fp32", "weight_bits": 32}),
    "llama-full-bf16-autocast": ("llama", {"method": "full"}),
    "llama-full-bf16-pure-eager": ("llama", {"method": "full", "mixed_precision": False,
                                                 "attention": "eager"}),
    "llama-lora-bf16": ("llama", {"method": "lora"}),
    "llama-lora-fp32-dropout": ("llama", {"method": "lora", "compute_dtype": "fp32",
                                              "weight_bits": 32, "lora_dropout": 0.1}),
    "llama-lora-bf16-pure-dropout": ("llama", {"method": "lora", "mixed_precision": False,
                                                   "lora_dropout": 0.1}),
    "llama-lora-bf16-ckpt": ("llama", {"method": "lora", "checkpointing": True}),
    "llama-full-fp32-ckpt": ("llama", {"method": "full", "compute_dtype": "fp32",
                                           "weight_bits": 32, "checkpointing": True}),
    "qwen2-lora-qv": ("qwen2", {"method": "lora", "lora_targets": ("q_proj", "v_proj")}),
    "qwen3-full-bf16": ("qwen3", {"method": "full"}),
    "qwen3-lora-qv-fp32": ("qwen3", {"method": "lora", "compute_dtype": "fp32", "weight_bits": 32,
                                         "lora_targets": ("q_proj", "v_proj")}),
    "mixtral-full-bf16": ("mixtral", {"method": "full"}),
    "mixtral-lora-fp32": ("mixtral", {"method": "lora", "compute_dtype": "fp32",
                                          "weight_bits": 32}),
    "llama-qlora-bf16": ("llama", {"method": "qlora", "weight_bits": 4}),
    "llama-qlora-bf16-ckpt": ("llama", {"method": "qlora", "weight_bits": 4,
                                        "checkpointing": True}),
    "tied-full-fp32": ("tied", {"method": "full", "compute_dtype": "fp32", "weight_bits": 32}),
}


def setup_of(case: str) -> tuple[ModelSpec, TrainSetup]:
    arch, fields = CASES[case]
    return SPECS[arch], TrainSetup(framework="hf", batch_size=2, seq_len=64, lora_rank=8,
                                   **fields)


@pytest.mark.parametrize("case", [c for c in CASES if "ckpt" not in c and "qlora" not in c])
def test_saved_activations_equal_the_real_code(case: str) -> None:
    """Every byte HF + PEFT saves for backward, by part: inside the decoder layers (activations
    'layers') and after them ('head': final norm, lm_head input, embedding ids)."""
    spec, setup = setup_of(case)
    got = hf_build.saved_bytes(hf_build.build(spec, setup), spec, setup)
    predicted = activation_bytes(spec, setup)
    assert predicted["layers"] == pytest.approx(got["layers"], rel=1e-3)
    assert predicted["head"] == pytest.approx(got["head"], rel=1e-3)


def allocation_peak(model, spec: ModelSpec, setup: TrainSetup, steps: int = 2) -> int:
    """Peak bytes above the start of two HF training steps (forward with labels, backward,
    fused AdamW, zero_grad), from the CPU allocator's allocation events."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=True)
    batch = hf_build.batch(spec, setup)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            with hf_build.autocast(setup):
                loss = model(**batch).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    return hf_build.profiled_peak(prof)


NOT_TENSORS = ("runtime_overhead", "kernel_caches", "allocator_retention",
               "expert_kernel_caches", "heap_retention")
BEFORE_THE_STEPS = ("weights", "quant_scales", "master_weights")


@pytest.mark.parametrize("case", list(CASES))
def test_step_tensor_peak_equals_the_allocators(case: str) -> None:
    """memory_breakdown's tensor terms (all but the CPU process terms, less the parameters
    that exist before the steps) equal the allocator's peak within 3 %."""
    spec, setup = setup_of(case)
    got = allocation_peak(hf_build.build(spec, setup), spec, setup)
    params = count_params(spec, setup)
    memory = memory_breakdown(spec, setup, load_device("xeon-platinum-8480plus"), params)
    stored_adapters = params.trainable * 4 if setup.trains_adapters else 0
    predicted = sum(v for k, v in memory.components.items()
                    if k not in NOT_TENSORS + BEFORE_THE_STEPS) - stored_adapters
    assert predicted == pytest.approx(got, rel=0.03)
