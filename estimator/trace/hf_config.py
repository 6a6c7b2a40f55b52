"""The transformers config of the model to trace: a config.json (file or model directory) as
it is, or a catalogue preset (ModelSpec) translated to the closest transformers model_type.

No remote code and no hub access: only model types transformers ships are built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from estimator.errors import ConfigError
from estimator.specs import ModelSpec


def model_type_of(spec: ModelSpec) -> str:
    """The transformers model_type whose modeling code matches the preset's architecture."""
    if spec.mla is not None:
        return "longcat_flash" if spec.attentions_per_layer == 2 else "deepseek_v3"
    if spec.moe is not None:
        if spec.attention_sinks:
            return "gpt_oss"
        if spec.qk_norm:
            return "qwen3_moe"
        return "qwen2_moe" if spec.moe.num_shared_experts else "mixtral"
    if spec.position == "learned":
        return "gpt2"
    if spec.qk_norm:
        return "qwen3"
    if spec.qkv_bias:
        return "qwen2"
    return "mistral" if spec.sliding_window else "llama"


def common_fields(spec: ModelSpec) -> dict[str, Any]:
    """Fields every Llama-family config spells the same way."""
    return {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "tie_word_embeddings": spec.tied_embeddings,
            "max_position_embeddings": spec.max_seq_len}


def moe_fields(spec: ModelSpec, model_type: str) -> dict[str, Any]:
    """The MoE fields in the names of mixtral / qwen2_moe / qwen3_moe / gpt_oss."""
    moe = spec.moe
    assert moe is not None
    if model_type in ("mixtral", "gpt_oss"):
        return {"num_local_experts": moe.num_experts, "num_experts_per_tok":
                moe.num_experts_per_token, "intermediate_size": moe.expert_intermediate_size}
    fields = {"num_experts": moe.num_experts, "num_experts_per_tok": moe.num_experts_per_token,
              "moe_intermediate_size": moe.expert_intermediate_size, "decoder_sparse_step": 1,
              "mlp_only_layers": list(range(moe.num_dense_layers)), "norm_topk_prob": True}
    if model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = (
            (moe.shared_expert_intermediate_size or moe.expert_intermediate_size)
            * moe.num_shared_experts)
    return fields


def mla_fields(spec: ModelSpec) -> dict[str, Any]:
    """Multi-head latent attention fields (DeepSeek-V3 and LongCat-Flash spell them alike)."""
    mla = spec.mla
    assert mla is not None
    return {"q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim}


def longcat_fields(spec: ModelSpec) -> dict[str, Any]:
    """LongcatFlashConfig: 28 blocks of 2 MLA + 2 dense FFNs + 1 MoE with zero experts."""
    moe = spec.moe
    assert moe is not None
    return {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "num_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
            "ffn_hidden_size": spec.intermediate_size,
            "expert_ffn_hidden_size": moe.expert_intermediate_size,
            "n_routed_experts": moe.num_experts, "zero_expert_num": moe.num_zero_experts,
            "moe_topk": moe.num_experts_per_token, "max_position_embeddings": spec.max_seq_len,
            "head_dim": spec.mla.qk_rope_head_dim if spec.mla else 64,  # rotary width
            **mla_fields(spec)}


def deepseek_fields(spec: ModelSpec) -> dict[str, Any]:
    """DeepseekV3Config: MLA, shared + routed experts, leading dense layers."""
    moe = spec.moe
    assert moe is not None
    fields = {**common_fields(spec), **mla_fields(spec),
              "n_routed_experts": moe.num_experts, "num_experts_per_tok":
              moe.num_experts_per_token, "moe_intermediate_size": moe.expert_intermediate_size,
              "n_shared_experts": moe.num_shared_experts,
              "first_k_dense_replace": moe.num_dense_layers}
    fields.pop("head_dim")
    if moe.num_experts % 8:
        fields.update(n_group=1, topk_group=1)
    return fields


def gpt2_fields(spec: ModelSpec) -> dict[str, Any]:
    """GPT2Config: learned positions, LayerNorm, GELU MLP of width 4·d."""
    return {"vocab_size": spec.vocab_size, "n_embd": spec.hidden_size, "n_layer": spec.num_layers,
            "n_head": spec.num_heads, "n_positions": spec.max_seq_len,
            "n_inner": spec.intermediate_size}


def config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """A config.json-like dict for the preset (model_type included)."""
    model_type = model_type_of(spec)
    if model_type == "longcat_flash":
        fields = longcat_fields(spec)
    elif model_type == "deepseek_v3":
        fields = deepseek_fields(spec)
    elif model_type == "gpt2":
        fields = gpt2_fields(spec)
    else:
        fields = common_fields(spec)
        if spec.moe is not None:
            fields.update(moe_fields(spec, model_type))
        if spec.sliding_window and model_type in ("mistral", "gpt_oss"):
            fields["sliding_window"] = spec.sliding_window
    return {"model_type": model_type, **fields}


def load_config_dict(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) from a config.json / model directory, or a preset name."""
    from estimator.catalog import load_model, read_hf_config

    path = Path(name_or_path).expanduser()
    if path.is_dir() or path.suffix == ".json" or path.exists():
        config = read_hf_config(path)
        if "model_type" not in config:
            raise ConfigError(f"{path}: config.json has no model_type")
        return str(path), config
    spec = load_model(name_or_path)
    return spec.name, config_from_spec(spec)


def build_config(config: dict[str, Any]):
    """The transformers PretrainedConfig for the dict; ConfigError for a model_type this
    transformers does not ship (no remote code is run)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = dict(config)
    model_type = str(fields.pop("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model_type '{model_type}' is not in the installed transformers; "
                          "nvfree trace builds only the model types transformers ships")
    fields.pop("auto_map", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"transformers rejects the {model_type} config: "
                          f"{str(exc).splitlines()[0]}") from None
    hf_config.use_cache = False
    return hf_config
