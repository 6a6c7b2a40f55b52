"""Per HF model_type: the ModelSpec that estimator.catalog reads from a config.json counts exactly
the parameters of the transformers model built from that config (tiny sizes, meta device), both
from the full config and from transformers' diff-to-defaults file (which leans on our defaults);
LoRA on the model's own PEFT names counts exactly what PEFT adds; our defaults are
transformers'."""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from estimator.analytic.params import count_params, lora_params, resolve_lora_targets  # noqa: E402
from estimator.catalog import load_model  # noqa: E402
from estimator.catalog.hf_types import ARCHITECTURES  # noqa: E402
from estimator.specs import TrainSetup  # noqa: E402

pytestmark = pytest.mark.torch

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
MLA = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
       "num_key_value_heads": 4}
CASES = {  # id: (model_type, overrides of TINY)
    "llama": ("llama", {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "num_hidden_layers": 3,
                                "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "decoder_sparse_step": 2}),
    "phi": ("phi", {}),
    "phi-qk-layernorm": ("phi", {"qk_layernorm": True, "num_key_value_heads": 4}),
    "phi3": ("phi3", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox-sequential-nobias": ("gpt_neox", {"use_parallel_residual": False,
                                                "attention_bias": False}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {}),
    "granite": ("granite", {"attention_bias": True, "mlp_bias": True}),
    "glm4": ("glm4", {"head_dim": 16}),
    "starcoder2": ("starcoder2", {}),
    "starcoder2-nobias-untied": ("starcoder2", {"use_bias": False,
                                                "tie_word_embeddings": False}),
    "smollm3": ("smollm3", {}),
    "deepseek_v2": ("deepseek_v2", {**MLA, "q_lora_rank": None, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "n_shared_experts": 2, "first_k_dense_replace": 1,
                                    "n_group": 1, "topk_group": 1}),
    "deepseek_v3": ("deepseek_v3", {**MLA, "q_lora_rank": 24, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "n_shared_experts": 1, "first_k_dense_replace": 1,
                                    "n_group": 1, "topk_group": 1}),
    "longcat_flash": ("longcat_flash", {**MLA, "q_lora_rank": 24, "num_layers": 2,
                                        "ffn_hidden_size": 96, "head_dim": 4,
                                        "n_routed_experts": 4, "zero_expert_num": 2,
                                        "moe_topk": 2, "expert_ffn_hidden_size": 32}),
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2,
                            "head_dim": 16}),
}


TOKENS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}  # inside the tiny vocab


def tiny_config(model_type: str, overrides: dict):
    kwargs = {**TINY, **overrides}
    if model_type == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in TINY}
    kwargs.update(TOKENS)
    if model_type == "longcat_flash":
        kwargs.pop("num_hidden_layers")
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def build(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("use_diff", [False, True], ids=["full", "diff"])
@pytest.mark.parametrize("case", list(CASES))
def test_param_count_equals_transformers(case, use_diff, tmp_path):
    model_type, overrides = CASES[case]
    config = tiny_config(model_type, overrides)
    config.to_json_file(tmp_path / "config.json", use_diff=use_diff)
    spec = load_model(str(tmp_path))
    assert spec.hf_model_type == model_type
    assert count_params(spec, TrainSetup()).total == numel(build(config))


def test_gemma3_multimodal_counts_the_text_decoder(tmp_path):
    text = {**TINY, "head_dim": 16}
    config = transformers.Gemma3Config(text_config=text, vision_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 28, "patch_size": 14}, mm_tokens_per_image=4)
    config.to_json_file(tmp_path / "config.json", use_diff=False)
    spec = load_model(str(tmp_path))
    with torch.device("meta"):
        model = transformers.Gemma3ForConditionalGeneration(config)
    assert count_params(spec).total == numel(model.model.language_model)  # lm_head is tied
    assert "vision tower" in spec.inferred_from


def linear_names(model) -> set[str]:
    """Leaf names of the linear modules in the blocks (PEFT target names; GPT-2's Conv1D)."""
    kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, kinds) and (".layers." in name or ".h." in name)}


DENSE = [c for c, (t, o) in CASES.items() if not any(k in o for k in (
    "num_local_experts", "num_experts", "n_routed_experts"))]


@pytest.mark.parametrize("case", DENSE)
def test_lora_on_native_names_equals_peft(case, tmp_path):
    """--lora-targets with the model's own module names (all of them): our count of adapter
    parameters = PEFT's, fused modules (query_key_value, c_attn, qkv_proj) included."""
    peft = pytest.importorskip("peft")
    model_type, overrides = CASES[case]
    config = tiny_config(model_type, overrides)
    config.to_json_file(tmp_path / "config.json", use_diff=False)
    spec = load_model(str(tmp_path))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = sorted(linear_names(model))
    targets, unknown = resolve_lora_targets(spec, names)
    assert not unknown, f"{case}: names the spec does not know: {unknown}"
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=names))
    expected = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    setup = TrainSetup(method="lora", lora_rank=4, lora_targets=targets)
    assert lora_params(spec, setup) == expected


MOE = [c for c in CASES if c not in DENSE]


@pytest.mark.parametrize("case", MOE)
def test_lora_on_attention_names_equals_peft(case, tmp_path):
    """MoE models: adapters on every attention linear by its own name (MLA's q_a_proj,
    kv_b_proj, …) count what PEFT adds (transformers' experts are 3-D parameters that PEFT's
    target_modules do not reach, so the FFN is left out here)."""
    peft = pytest.importorskip("peft")
    model_type, overrides = CASES[case]
    config = tiny_config(model_type, overrides)
    config.to_json_file(tmp_path / "config.json", use_diff=False)
    spec = load_model(str(tmp_path))
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".self_attn." in n})
    targets, unknown = resolve_lora_targets(spec, names)
    assert not unknown
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=names))
    expected = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora_params(spec, TrainSetup(method="lora", lora_rank=4,
                                        lora_targets=targets)) == expected


def field_default(cls, key: str, aliases: tuple[str, ...]):
    """The dataclass default of `key` (or of the field attribute_map or an older name maps it
    to) in transformers' config class."""
    fields = cls.__dataclass_fields__
    names = [key, cls.attribute_map.get(key, key), *aliases]
    key = next((n for n in names if n in fields), key)
    assert key in fields, f"{cls.__name__} has no field {key}"
    f = fields[key]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - {"qwen", "gemma3"}))
def test_defaults_match_transformers(model_type):
    cls = transformers.models.auto.configuration_auto.CONFIG_MAPPING[model_type]
    arch = ARCHITECTURES[model_type]
    ours = arch.defaults
    theirs = {key: field_default(cls, key, arch.aliases.get(key, ())) for key in ours}
    assert ours == theirs


def test_lora_target_map_is_json_round_trip(tmp_path):
    config = tiny_config("gpt_neox", {})
    config.to_json_file(tmp_path / "config.json")
    spec = load_model(str(tmp_path))
    again = type(spec).model_validate(json.loads(spec.model_dump_json()))
    assert again == spec and again.lora_module_names["query_key_value"] == (
        "q_proj", "k_proj", "v_proj")
