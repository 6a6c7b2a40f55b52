"""data/models.toml: every preset validates, and our parameter count reproduces the published
total within 1 % (published figures: model cards / HF pages, see each preset's comments)."""

import pytest

from estimator.analytic.params import count_params
from estimator.catalog import load_model, read_toml

ENTRIES = read_toml("models.toml")["models"]
KEYS = list(ENTRIES)

EXPECTED_KEYS = {
    "longcat-flash", "deepseek-v3", "gpt-oss-20b", "qwen3-30b-a3b", "mixtral-8x7b",
    "mistral-7b", "llama-2-7b", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b",
    "tinyllama-1.1b", "smollm2-135m", "smollm2-360m", "smollm2-1.7b", "gpt2", "phi-3-mini",
    # added for the published peak-memory rows (data/published_peaks.toml)
    "llama-2-13b", "llama-3-8b", "llama-3.2-1b", "llama-3.2-3b",
}


def test_presets_cover_hardware_reference():
    assert set(KEYS) == EXPECTED_KEYS


@pytest.mark.parametrize("key", KEYS, ids=KEYS)
def test_preset_validates(key):
    spec = load_model(key)
    assert spec.name == key
    assert spec.hf_id and spec.source and spec.source.startswith("https://huggingface.co/")
    assert spec.published_num_params
    assert spec.is_moe == (spec.published_active_params is not None)


@pytest.mark.parametrize("key", KEYS, ids=KEYS)
def test_param_count_matches_published(key):
    spec = load_model(key)
    total = count_params(spec).total
    assert total == pytest.approx(spec.published_num_params, rel=0.01)


def test_aliases_are_unique_and_resolve():
    seen: dict[str, str] = {}
    for key, entry in ENTRIES.items():
        names = [key, entry["hf_id"], *entry.get("aliases", [])]
        for name in dict.fromkeys(n.lower() for n in names):
            assert seen.setdefault(name, key) == key, f"{name} names {seen[name]} and {key}"
            assert load_model(name).name == key
    assert all(entry["hf_id"] in entry["aliases"] for entry in ENTRIES.values())


def test_longcat_flash_structure_and_average_active():
    spec = load_model("longcat")
    assert (spec.num_layers, spec.attentions_per_layer) == (28, 2)  # not HF's 56 sub-layers
    assert spec.mla is not None and spec.moe is not None
    assert (spec.moe.num_experts, spec.moe.num_zero_experts) == (512, 256)
    assert spec.moe.dense_mlps_per_layer == 2 and spec.intermediate_size == 12288
    counts = count_params(spec)
    # The published 18.6B-31.3B (avg ~27B) range excludes the input embedding.
    active = counts.active_per_token - counts.embedding
    assert active == pytest.approx(27e9, rel=0.01)
    assert counts.total == pytest.approx(560e9, rel=0.01)  # 560B, not "56B"


def test_deepseek_v3_structure():
    spec = load_model("deepseek-ai/DeepSeek-V3")
    assert spec.num_layers == 61 and spec.num_moe_layers == 58
    assert spec.moe.num_shared_experts == 1 and spec.mla.q_lora_rank == 1536


def test_gpt_oss_and_gpt2_flags():
    oss = load_model("gpt-oss-20b")
    assert oss.attention_bias and oss.attention_sinks and oss.moe.expert_bias
    assert oss.sliding_window == 128 and not oss.linear_bias
    gpt2 = load_model("gpt2")
    assert (gpt2.mlp, gpt2.norm, gpt2.position) == ("gelu", "layernorm", "learned")
    assert gpt2.linear_bias and gpt2.tied_embeddings and gpt2.max_seq_len == 1024


@pytest.mark.parametrize(("key", "flag"), [
    ("qwen2.5-7b", "qkv_bias"), ("qwen3-30b-a3b", "qk_norm"), ("smollm2-135m", "tied_embeddings"),
    ("smollm2-360m", "tied_embeddings"), ("smollm2-1.7b", "tied_embeddings"),
])
def test_family_flags(key, flag):
    assert getattr(load_model(key), flag)
