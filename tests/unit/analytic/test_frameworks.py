"""The torchtune and LitGPT framework plumbing (no torch): precision as each runs it, which
linears LoRA reaches, paged optimizer states, and estimates for setups a framework cannot
describe. The terms themselves are checked against the real code in
tests/torch/test_{torchtune,litgpt}_terms.py and against published peaks in
tests/reference/test_published_frameworks.py."""

import pytest

from estimator.analytic.frameworks import FRAMEWORKS, as_run, litgpt
from estimator.analytic.frameworks.bnb import paged_adamw_device_bytes
from estimator.analytic.params import count_params, lora_params
from estimator.api import estimate
from estimator.catalog import load_model
from estimator.errors import SetupError
from estimator.specs import ModelSpec, TrainSetup

SPEC = ModelSpec(name="t", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=8,
                 num_kv_heads=4, head_dim=32, vocab_size=2048, tied_embeddings=True)


def test_every_framework_is_a_setup_value():
    assert {"torchtune", "litgpt"} <= set(FRAMEWORKS)
    for framework in FRAMEWORKS:
        assert TrainSetup(framework=framework).framework == framework


def test_torchtune_trains_in_one_dtype_and_always_double_quantises():
    run = as_run(TrainSetup(framework="torchtune", method="qlora", weight_bits=4,
                            double_quant=False))
    assert not run.mixed_precision and run.double_quant
    fp32 = as_run(TrainSetup(framework="torchtune", method="lora", weight_bits=32))
    assert fp32.compute_dtype == "fp32"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"method": "full"}, "bf16-mixed"),
    ({"method": "full", "mixed_precision": False}, "bf16-true"),
    ({"method": "lora"}, "bf16-true"),  # a 16-bit base has no mixed mode in LitGPT
    ({"method": "lora", "weight_bits": 32}, "bf16-mixed"),
    ({"method": "qlora", "weight_bits": 4}, "bf16-true"),
    ({"method": "full", "compute_dtype": "fp32", "weight_bits": 32}, "32-true"),
])
def test_litgpt_precision(fields, expected):
    assert litgpt.precision(TrainSetup(framework="litgpt", **fields)) == expected


def test_mlp_adapters_come_as_a_whole_and_lm_head_counts():
    one = TrainSetup(framework="torchtune", method="lora", lora_rank=8,
                     lora_targets=("q_proj", "gate_proj"))
    whole = one.model_copy(update={"lora_targets": ("q_proj", "gate_proj", "up_proj",
                                                    "down_proj")})
    assert lora_params(SPEC, one) == lora_params(SPEC, whole)
    head = one.model_copy(update={"lora_targets": ("q_proj", "lm_head")})
    q_only = one.model_copy(update={"lora_targets": ("q_proj",)})
    assert lora_params(SPEC, head) - lora_params(SPEC, q_only) == 8 * (256 + 2048)


def test_litgpt_fine_tunes_untied():
    tied = count_params(SPEC, TrainSetup(framework="torchtune"))
    untied = count_params(SPEC, TrainSetup(framework="litgpt"))
    assert untied.total - tied.total == SPEC.vocab_size * SPEC.hidden_size


def test_paged_adamw_keeps_only_small_tensors_on_the_device():
    """bitsandbytes: moments of tensors under 1e5 elements on the device; 8-bit keeps fp32
    moments under 4096 elements and two fp32 absmax per 256 elements always."""
    assert paged_adamw_device_bytes([(1_000_000, 1)], bits=32) == 0
    assert paged_adamw_device_bytes([(50_000, 2)], bits=32) == 2 * 50_000 * 8
    assert paged_adamw_device_bytes([(1000, 1)], bits=8) == 1000 * 8
    assert paged_adamw_device_bytes([(1_000_000, 1)], bits=8) == 8 * 3907


def test_estimate_leaves_out_frameworks_that_cannot_describe_the_model():
    moe = load_model("mixtral-8x7b")
    with pytest.raises(SetupError):
        estimate(moe, TrainSetup(framework="torchtune", method="lora"), "h100-sxm")
    others = estimate(moe, TrainSetup(method="lora"), "h100-sxm").other_frameworks
    assert "torchtune" not in others and "nvfree" in others


def test_lm_head_target_only_where_modelled():
    with pytest.raises(SetupError):
        estimate(SPEC, TrainSetup(method="lora", lora_targets=("q_proj", "lm_head")), "h100-sxm")
    estimate(SPEC, TrainSetup(framework="litgpt", method="lora",
                              lora_targets=("q_proj", "lm_head")), "h100-sxm")


MIXTRAL_270M = ModelSpec.model_validate({
    "name": "mixtral270m", "num_layers": 8, "hidden_size": 768, "intermediate_size": 1536,
    "num_heads": 12, "num_kv_heads": 4, "head_dim": 64, "vocab_size": 32000,
    "moe": {"num_experts": 8, "num_experts_per_token": 2, "expert_intermediate_size": 1536}})


@pytest.mark.parametrize(("fields", "mib"), [
    ({"method": "full", "compute_dtype": "fp32", "weight_bits": 32}, 864),  # 8·8·3·768·1536·4 B
    ({"method": "lora", "compute_dtype": "fp32", "weight_bits": 32}, 864),
    ({"method": "full", "compute_dtype": "bf16", "weight_bits": 16}, 864),  # fp32 master weights
    ({"method": "lora", "compute_dtype": "bf16", "weight_bits": 16}, 0),  # loaded as stored
    ({"method": "qlora", "compute_dtype": "bf16", "weight_bits": 4}, 0),  # loaded synchronously
])
def test_hf_loader_arena_holds_the_merged_per_expert_fp32_copies(fields, mib):
    from estimator.analytic.frameworks import hf

    setup = TrainSetup(framework="hf", **fields)
    assert hf.loader_arena_bytes(MIXTRAL_270M, setup) == mib * 2**20
    assert hf.loader_arena_bytes(SPEC, setup) == 0  # dense: the casts are the parameters


def test_hf_loader_arena_is_empty_when_expert_matrices_are_mmapped():
    from estimator.analytic.frameworks import hf

    setup = TrainSetup(framework="hf", method="full", compute_dtype="fp32", weight_bits=32)
    assert hf.loader_arena_bytes(load_model("mixtral-8x7b"), setup) == 0  # 224 MiB > 32 MiB
    assert hf.loader_arena_bytes(load_model("qwen3-30b-a3b"), setup) > 0  # 6 MiB each
