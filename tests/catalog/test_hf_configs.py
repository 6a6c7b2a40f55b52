"""config.json files of every supported model_type → ModelSpec, without torch: Qwen-1 (remote
code) against a hand count of its modeling_qwen.py, legacy field names, transformers' defaults
for missing fields, the one-line refusal of other types, LongCat-Flash's own config against its
preset, and LoRA targets given in a model's own module names."""

import json

import pytest

from estimator.analytic.params import count_params, lora_params, resolve_lora_targets
from estimator.api import estimate
from estimator.catalog import HF_MODEL_TYPES, load_model
from estimator.errors import ConfigError, SetupError
from estimator.specs import TrainSetup

# Qwen/Qwen-7B config.json (huggingface.co/Qwen/Qwen-7B/blob/main/config.json), fields that matter
QWEN_7B = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 4096,
           "intermediate_size": 22016, "kv_channels": 128, "max_position_embeddings": 32768,
           "no_bias": True, "num_attention_heads": 32, "num_hidden_layers": 32,
           "rotary_pct": 1.0, "seq_length": 8192, "tie_word_embeddings": False,
           "vocab_size": 151936}
# meituan-longcat/LongCat-Flash-Chat config.json, the fields its modelling code reads
LONGCAT = {"model_type": "longcat_flash", "hidden_size": 6144, "ffn_hidden_size": 12288,
           "expert_ffn_hidden_size": 2048, "num_layers": 28, "num_attention_heads": 64,
           "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
           "qk_nope_head_dim": 128, "v_head_dim": 128, "n_routed_experts": 512,
           "zero_expert_num": 256, "moe_topk": 12, "vocab_size": 131072,
           "max_position_embeddings": 131072, "router_bias": False}


def write(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_model(str(tmp_path))


def test_qwen1_7b_hand_count_from_modeling_qwen(tmp_path):
    """modeling_qwen.py: wte V·h; per block ln_1 h, attn.c_attn h·3p + 3p (bias), attn.c_proj
    h·p (no_bias), ln_2 h, mlp.w1 and mlp.w2 h·(i/2), mlp.c_proj (i/2)·h; ln_f h; lm_head V·h.
    p = kv_channels·heads = 4096, i/2 = 11008. HF lists Qwen-7B at 7.72B."""
    spec = write(tmp_path, QWEN_7B)
    h, v, p, f, layers = 4096, 151936, 128 * 32, 22016 // 2, 32
    block = h + (h * 3 * p + 3 * p) + h * p + h + 2 * h * f + f * h
    expected = v * h + layers * block + h + v * h
    assert expected == 7_721_324_544
    assert count_params(spec).total == expected
    assert (spec.intermediate_size, spec.head_dim, spec.num_kv_heads) == (11008, 128, 32)
    assert spec.qkv_bias and not spec.linear_bias and not spec.tied_embeddings


def test_qwen1_native_lora_names(tmp_path):
    spec = write(tmp_path, QWEN_7B)
    targets, unknown = resolve_lora_targets(spec, ["c_attn", "c_proj", "w1", "w2"])
    assert not unknown
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj",
                            "down_proj"}
    setup = TrainSetup(method="lora", lora_rank=8, lora_targets=targets)
    h, f, r = 4096, 11008, 8
    # PEFT: c_attn is one Linear h→3h (one A), attn.c_proj h→h, w1/w2 h→f, mlp.c_proj f→h
    per_block = r * ((h + 3 * h) + (h + h) + 2 * (h + f) + (f + h))
    assert lora_params(spec, setup) == 32 * per_block


def test_native_targets_through_estimate(tmp_path):
    spec = write(tmp_path, QWEN_7B)
    native = TrainSetup(method="lora", lora_targets=("c_attn",))
    canonical = TrainSetup(method="lora", lora_targets=("q_proj", "k_proj", "v_proj"))
    a = estimate(spec, native, "h100-sxm")
    b = estimate(spec, canonical, "h100-sxm")
    assert a.setup.lora_targets == ("q_proj", "k_proj", "v_proj")
    assert a.params.trainable == b.params.trainable and a.memory.total_bytes == \
        b.memory.total_bytes
    with pytest.raises(SetupError, match=r"unknown LoRA target.*c_attn, c_proj, w1, w2"):
        estimate(spec, TrainSetup(method="lora", lora_targets=("qkv",)), "h100-sxm")


def test_fused_member_brings_the_module(tmp_path):
    """Phi-3 stores q, k, v in one qkv_proj: PEFT cannot adapt q alone."""
    spec = write(tmp_path, {"model_type": "phi3"})
    assert resolve_lora_targets(spec, ["q_proj"]) == (("q_proj", "k_proj", "v_proj"), ())
    assert resolve_lora_targets(spec, ["o_proj", "nope"]) == (("o_proj",), ("nope",))


def test_longcat_config_matches_preset(tmp_path):
    spec = write(tmp_path, LONGCAT)
    preset = load_model("longcat-flash")
    assert (spec.num_layers, spec.attentions_per_layer, spec.head_dim) == (28, 2, 192)
    assert spec.moe.num_zero_experts == 256 and spec.moe.dense_mlps_per_layer == 2
    assert spec.moe.mean_routed_experts_per_token == pytest.approx(8.0)  # 12·512/768
    assert count_params(spec).total == count_params(preset).total


def test_longcat_num_hidden_layers_counts_sublayers(tmp_path):
    config = {k: v for k, v in LONGCAT.items() if k != "num_layers"} | {"num_hidden_layers": 56}
    assert write(tmp_path, config).num_layers == 28


@pytest.mark.parametrize("config,field,value", [
    # Gemma-3 4B's text_config omits heads, head_dim and vocab: transformers' defaults apply
    ({"model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                              "num_hidden_layers": 34,
                                              "model_type": "gemma3_text"}},
     "vocab_size", 262208),
    ({"model_type": "gemma3", "text_config": {"hidden_size": 2560}}, "head_dim", 256),
    ({"model_type": "mistral", "hidden_size": 1024, "num_attention_heads": 16}, "num_kv_heads", 8),
    ({"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 16}, "num_kv_heads", 16),
    ({"model_type": "mistral", "sliding_window": None}, "sliding_window", None),
    ({"model_type": "qwen2"}, "sliding_window", None),  # use_sliding_window defaults to False
    ({"model_type": "starcoder2"}, "tied_embeddings", True),
    ({"model_type": "gpt_neox", "rotary_pct": 0.25}, "rotary_fraction", 0.25),
    ({"model_type": "gpt_neox"}, "rotary_fraction", 0.25),
    ({"model_type": "phi", "partial_rotary_factor": 0.4}, "rotary_fraction", 0.4),
    ({"model_type": "phi", "rope_parameters": {"partial_rotary_factor": 0.4}},
     "rotary_fraction", 0.4),
    ({"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25}, "intermediate_size",
     6400),
])
def test_missing_and_legacy_fields(tmp_path, config, field, value):
    assert getattr(write(tmp_path, config), field) == value


def test_gpt2_config_matches_preset(tmp_path):
    spec = write(tmp_path, {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768,
                            "n_layer": 12, "n_head": 12, "n_positions": 1024})
    assert count_params(spec).total == count_params(load_model("gpt2")).total == 124_439_808


def test_unknown_model_type_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        write(tmp_path, {"model_type": "bloom", "hidden_size": 64})
    message = str(exc.value)
    assert "\n" not in message and "unsupported model_type 'bloom'" in message
    assert "--trace" in message and all(t in message for t in HF_MODEL_TYPES)


def test_every_required_type_is_supported():
    assert {"llama", "mistral", "mixtral", "qwen", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
            "phi", "phi3", "gpt_neox", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo2",
            "starcoder2", "deepseek_v2", "deepseek_v3", "longcat_flash"} <= set(HF_MODEL_TYPES)
