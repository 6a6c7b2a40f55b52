"""The Hugging Face model_types nvfree reads: per type, transformers' config defaults, what its
modelling code builds (as ModelSpec fields) and its own PEFT module names.

`defaults` are the dataclass defaults of transformers 5.25's
models/<type>/configuration_<type>.py for the fields read here; a field missing from a
config.json takes them, as transformers would (tests/torch/test_hf_param_counts.py compares them
with transformers). Qwen-1 (`qwen`, remote code, not in transformers) follows Qwen/Qwen-7B's
configuration_qwen.py and modeling_qwen.py (read from alibaba/MNN's copy,
transformers/llm/export/llm_models/Qwen-1_8B/modeling_qwen.py): c_attn h→3·kv_channels·H with
bias, c_proj and the MLP's w1/w2/c_proj biased unless no_bias, w1/w2 each intermediate_size/2
wide (a1 = w1(x), a2 = w2(x), c_proj(a1·silu(a2))), RMSNorm ln_1/ln_2/ln_f, untied lm_head.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from estimator.specs import MLASpec, MoESpec

_MISSING = object()


class HFConfig:
    """A config.json dict read with the model_type's defaults: a key the file has (even as
    null) wins, then an older name for it (`aliases`), then transformers' default."""

    def __init__(self, raw: Mapping[str, Any], defaults: Mapping[str, Any],
                 aliases: Mapping[str, tuple[str, ...]]) -> None:
        self.raw, self.defaults, self.aliases = raw, defaults, aliases

    def get(self, key: str, default: Any = None) -> Any:
        """The value for `key`, its alias, transformers' default, or `default`."""
        value = self.lookup(key)
        return default if value is _MISSING else value

    def __getitem__(self, key: str) -> Any:
        """A required value: KeyError(key) when neither the file nor the defaults have it."""
        value = self.lookup(key)
        if value is _MISSING or value is None:
            raise KeyError(key)
        return value

    def lookup(self, key: str) -> Any:
        for name in (key, *self.aliases.get(key, ())):
            if name in self.raw:
                return self.raw[name]
        return self.defaults.get(key, _MISSING)


Reader = Callable[[HFConfig], dict[str, Any]]


@dataclass(frozen=True)
class Arch:
    """How one model_type maps onto ModelSpec."""

    defaults: dict[str, Any]
    """transformers' config defaults for the fields read."""
    read: Reader
    """ModelSpec fields specific to the type (over the common ones of catalog.hf)."""
    lora_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The model's PEFT module names that differ from the canonical Llama ones."""
    fused: tuple[tuple[str, ...], ...] = ()
    """Canonical linears stored as one module (one LoRA A)."""
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Older config.json names of a field (GPT-2's n_embd for hidden_size, …)."""
    rotary_fraction: float = 1.0
    """Default share of a head with rotary embeddings."""
    text_config: bool = False
    """The decoder's fields live in config['text_config'] (multimodal Gemma-3)."""


MHA_ONLY: Any = object()
"""kv argument of _base for configs without num_key_value_heads (GPT-2, GPT-NeoX)."""


def _base(vocab: int, hidden: int, ffn: int | None, layers: int, heads: int, kv: Any,
          max_pos: int, tie: bool, **extra: Any) -> dict[str, Any]:
    """The defaults every decoder config has (kv None: derived from the heads)."""
    base = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": max_pos,
            "tie_word_embeddings": tie, **extra}
    if kv is MHA_ONLY:
        del base["num_key_value_heads"]
    return base


def _biases(cfg: HFConfig) -> dict[str, Any]:
    """Llama-family `attention_bias` (q, k, v, o) and `mlp_bias`."""
    return {"attention_bias": bool(cfg.get("attention_bias", False)),
            "mlp_bias": bool(cfg.get("mlp_bias", False))}


def _sparse_layers(cfg: HFConfig) -> int:
    """Qwen-MoE layers with a dense MLP: those in mlp_only_layers or off decoder_sparse_step."""
    only = set(cfg.get("mlp_only_layers") or ())
    step = cfg.get("decoder_sparse_step") or 1
    layers = cfg["num_hidden_layers"]
    return sum(1 for i in range(layers) if i in only or (i + 1) % step != 0)


def _mla(cfg: HFConfig) -> MLASpec:
    return MLASpec(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
                   qk_nope_head_dim=cfg["qk_nope_head_dim"],
                   qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"])


def _mla_fields(cfg: HFConfig) -> dict[str, Any]:
    mla = _mla(cfg)
    return {"mla": mla, "head_dim": mla.qk_nope_head_dim + mla.qk_rope_head_dim,
            "num_kv_heads": cfg["num_attention_heads"],
            "attention_bias": bool(cfg.get("attention_bias", False))}


def read_llama(cfg: HFConfig) -> dict[str, Any]:
    """Llama, SmolLM3, Granite (whose multipliers have no parameters): the canonical block;
    attention_bias / mlp_bias."""
    return _biases(cfg)


def read_plain(cfg: HFConfig) -> dict[str, Any]:
    """Mistral, Phi-3: the canonical block, no biases."""
    return {}


def read_qwen(cfg: HFConfig) -> dict[str, Any]:
    """Qwen-1: fused c_attn with bias, SwiGLU of intermediate_size/2, kv_channels per head."""
    heads = cfg["num_attention_heads"]
    return {"intermediate_size": cfg["intermediate_size"] // 2, "num_kv_heads": heads,
            "head_dim": cfg.get("kv_channels") or cfg["hidden_size"] // heads,
            "qkv_bias": True, "linear_bias": not cfg.get("no_bias", True)}


def read_qwen2(cfg: HFConfig) -> dict[str, Any]:
    return {"qkv_bias": True}


def read_qwen3(cfg: HFConfig) -> dict[str, Any]:
    return {"qk_norm": True, "attention_bias": bool(cfg.get("attention_bias", False))}


def read_phi(cfg: HFConfig) -> dict[str, Any]:
    """Phi-1/1.5/2: one LayerNorm feeding parallel attention and GELU MLP, biases everywhere
    (lm_head too), optional per-head qk LayerNorm."""
    return {"mlp": "gelu", "norm": "layernorm", "linear_bias": True, "lm_head_bias": True,
            "norms_per_layer": 1, "parallel_residual": True,
            "qk_norm": bool(cfg.get("qk_layernorm", False))}


def read_gpt_neox(cfg: HFConfig) -> dict[str, Any]:
    """Pythia / GPT-NeoX: fused query_key_value, GELU MLP with biases, 2 LayerNorms, MHA."""
    heads = cfg["num_attention_heads"]
    return {"mlp": "gelu", "norm": "layernorm", "num_kv_heads": heads,
            "head_dim": cfg["hidden_size"] // heads, "mlp_bias": True,
            "attention_bias": bool(cfg.get("attention_bias", True)),
            "parallel_residual": bool(cfg.get("use_parallel_residual", True))}


def read_gpt2(cfg: HFConfig) -> dict[str, Any]:
    """GPT-2: learned positions, Conv1D c_attn/c_proj/c_fc with biases, LayerNorm, MHA."""
    heads = cfg["num_attention_heads"]
    return {"mlp": "gelu", "norm": "layernorm", "position": "learned", "linear_bias": True,
            "num_kv_heads": heads, "head_dim": cfg["hidden_size"] // heads}


def read_gemma(cfg: HFConfig) -> dict[str, Any]:
    return {"mlp": "geglu", "attention_bias": bool(cfg.get("attention_bias", False))}


def read_gemma2(cfg: HFConfig) -> dict[str, Any]:
    return {**read_gemma(cfg), "norms_per_layer": 4}


def read_gemma3(cfg: HFConfig) -> dict[str, Any]:
    return {**read_gemma2(cfg), "qk_norm": True}


def read_glm4(cfg: HFConfig) -> dict[str, Any]:
    """GLM-4: q/k/v biased with attention_bias (o not), fused gate_up_proj, sandwich norms
    (input, post_self_attn, post_attention, post_mlp: 4 per block)."""
    return {"qkv_bias": bool(cfg.get("attention_bias", True)), "norms_per_layer": 4}


def read_olmo2(cfg: HFConfig) -> dict[str, Any]:
    """OLMo-2: post-norms only (2 per block), q/k RMSNorm over the whole projections."""
    return {"qk_norm": True, "qk_norm_scope": "projection", "norms_per_layer": 2,
            "attention_bias": bool(cfg.get("attention_bias", False))}


def read_starcoder2(cfg: HFConfig) -> dict[str, Any]:
    return {"mlp": "gelu", "norm": "layernorm", "linear_bias": bool(cfg.get("use_bias", True))}


def read_mixtral(cfg: HFConfig) -> dict[str, Any]:
    return {"moe": MoESpec(num_experts=cfg["num_local_experts"],
                           num_experts_per_token=cfg["num_experts_per_tok"],
                           expert_intermediate_size=cfg["intermediate_size"])}


def read_qwen2_moe(cfg: HFConfig) -> dict[str, Any]:
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return {"qkv_bias": bool(cfg.get("qkv_bias", True)), "moe": MoESpec(
        num_experts=cfg["num_experts"], num_experts_per_token=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["moe_intermediate_size"],
        num_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared or None,
        shared_expert_gate=bool(shared), num_dense_layers=_sparse_layers(cfg))}


def read_qwen3_moe(cfg: HFConfig) -> dict[str, Any]:
    return {**read_qwen3(cfg), "moe": MoESpec(
        num_experts=cfg["num_experts"], num_experts_per_token=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["moe_intermediate_size"],
        num_dense_layers=_sparse_layers(cfg))}


def read_deepseek(cfg: HFConfig) -> dict[str, Any]:
    """DeepSeek-V2/V3: MLA; MoE after first_k_dense_replace dense layers, with n_shared_experts
    shared experts (HF builds them as one MLP n_shared × moe_intermediate_size wide: the same
    parameters)."""
    return {**_mla_fields(cfg), "mlp_bias": bool(cfg.get("mlp_bias", False)), "moe": MoESpec(
        num_experts=cfg["n_routed_experts"], num_experts_per_token=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["moe_intermediate_size"],
        num_shared_experts=cfg.get("n_shared_experts") or 0,
        num_dense_layers=min(cfg.get("first_k_dense_replace") or 0, cfg["num_hidden_layers"]))}


def read_longcat(cfg: HFConfig) -> dict[str, Any]:
    """LongCat-Flash: num_layers blocks, each 2 MLA attentions, 2 dense SwiGLU MLPs
    (ffn_hidden_size) and one MoE over n_routed_experts real + zero_expert_num identity experts
    (top moe_topk). The real experts a token visits are taken as top-k·E/(E + Z), uniform
    routing (the published LongCat-Flash-Chat average, 7.86 of 12, is in the preset)."""
    experts, zero, top_k = (cfg["n_routed_experts"], cfg.get("zero_expert_num") or 0,
                            cfg["moe_topk"])
    layers = cfg.get("num_layers") or cfg["num_hidden_layers"] // 2
    return {**_mla_fields(cfg), "num_layers": layers, "attentions_per_layer": 2,
            "intermediate_size": cfg["ffn_hidden_size"], "moe": MoESpec(
                num_experts=experts, num_zero_experts=zero, num_experts_per_token=top_k,
                expert_intermediate_size=cfg["expert_ffn_hidden_size"], dense_mlps_per_layer=2,
                mean_routed_experts_per_token=top_k * experts / (experts + zero) if zero
                else None)}


def read_gpt_oss(cfg: HFConfig) -> dict[str, Any]:
    return {"attention_bias": bool(cfg.get("attention_bias", True)), "attention_sinks": True,
            "moe": MoESpec(num_experts=cfg["num_local_experts"],
                           num_experts_per_token=cfg["num_experts_per_tok"],
                           expert_intermediate_size=cfg["intermediate_size"],
                           expert_bias=True)}


QKV = ("q_proj", "k_proj", "v_proj")
MLA_NAMES = {"q_a_proj": ("q_proj",), "q_b_proj": ("q_proj",),
             "kv_a_proj_with_mqa": ("k_proj",), "kv_b_proj": ("k_proj",)}
DEEPSEEK_MLA = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "attention_bias": False}
QWEN_WINDOW = {"sliding_window": 4096, "use_sliding_window": False}

ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(_base(32000, 4096, 11008, 32, 32, None, 2048, False, head_dim=None,
                        attention_bias=False, mlp_bias=False), read_llama),
    "mistral": Arch(_base(32000, 4096, 14336, 32, 32, 8, 131072, False, head_dim=None,
                          sliding_window=4096), read_plain),
    "mixtral": Arch(_base(32000, 4096, 14336, 32, 32, 8, 131072, False, head_dim=None,
                          sliding_window=None, num_local_experts=8, num_experts_per_tok=2),
                    read_mixtral, aliases={"num_local_experts": ("num_experts",)}),
    "qwen": Arch(_base(151936, 4096, 22016, 32, 32, None, 8192, False, kv_channels=128,
                       no_bias=True, rotary_pct=1.0), read_qwen,
                 lora_names={"c_attn": QKV, "c_proj": ("o_proj", "down_proj"),
                             "w1": ("up_proj",), "w2": ("gate_proj",)},
                 fused=(QKV,),
                 aliases={"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",),
                          "num_attention_heads": ("n_head",),
                          "intermediate_size": ("ffn_hidden_size",),
                          "max_position_embeddings": ("n_positions", "seq_length")}),
    "qwen2": Arch(_base(151936, 4096, 22016, 32, 32, 32, 32768, False, **QWEN_WINDOW),
                  read_qwen2),
    "qwen2_moe": Arch(_base(151936, 2048, 5632, 24, 16, 16, 32768, False, **QWEN_WINDOW,
                            num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                            shared_expert_intermediate_size=5632, mlp_only_layers=None,
                            decoder_sparse_step=1, qkv_bias=True), read_qwen2_moe),
    "qwen3": Arch(_base(151936, 4096, 22016, 32, 32, 32, 32768, False, head_dim=128,
                        attention_bias=False, **QWEN_WINDOW), read_qwen3),
    "qwen3_moe": Arch(_base(151936, 2048, 6144, 24, 32, 4, 32768, False, attention_bias=False,
                            **QWEN_WINDOW, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768, mlp_only_layers=None,
                            decoder_sparse_step=1), read_qwen3_moe,
                      aliases={"num_experts": ("num_local_experts",)}),
    "phi": Arch(_base(51200, 2048, 8192, 24, 32, None, 2048, False, qk_layernorm=False),
                read_phi, lora_names={"dense": ("o_proj",), "fc1": ("up_proj",),
                                      "fc2": ("down_proj",)}, rotary_fraction=0.5),
    "phi3": Arch(_base(32064, 3072, 8192, 32, 32, None, 4096, False, sliding_window=None),
                 read_plain, lora_names={"qkv_proj": QKV,
                                         "gate_up_proj": ("gate_proj", "up_proj")},
                 fused=(QKV, ("gate_proj", "up_proj"))),
    "gpt_neox": Arch(_base(50432, 6144, 24576, 44, 64, MHA_ONLY, 2048, False, attention_bias=True,
                           use_parallel_residual=True), read_gpt_neox,
                     lora_names={"query_key_value": QKV, "dense": ("o_proj",),
                                 "dense_h_to_4h": ("up_proj",), "dense_4h_to_h": ("down_proj",)},
                     fused=(QKV,), rotary_fraction=0.25),
    "gpt2": Arch(_base(50257, 768, None, 12, 12, MHA_ONLY, 1024, True), read_gpt2,
                 lora_names={"c_attn": QKV, "c_proj": ("o_proj", "down_proj"),
                             "c_fc": ("up_proj",)}, fused=(QKV,),
                 aliases={"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",),
                          "num_attention_heads": ("n_head",), "intermediate_size": ("n_inner",),
                          "max_position_embeddings": ("n_positions",)}),
    "gemma": Arch(_base(256000, 3072, 24576, 28, 16, 16, 8192, True, head_dim=256,
                        attention_bias=False), read_gemma),
    "gemma2": Arch(_base(256000, 2304, 9216, 26, 8, 4, 8192, True, head_dim=256,
                         attention_bias=False, sliding_window=4096), read_gemma2),
    "gemma3_text": Arch(_base(262208, 2304, 9216, 26, 8, 4, 131072, True, head_dim=256,
                              attention_bias=False, sliding_window=4096), read_gemma3),
    "olmo2": Arch(_base(50304, 4096, 11008, 32, 32, None, 2048, False, attention_bias=False),
                  read_olmo2),
    "olmo3": Arch(_base(50304, 4096, 11008, 32, 32, None, 2048, False, attention_bias=False,
                        sliding_window=4096), read_olmo2),
    "granite": Arch(_base(32000, 4096, 11008, 32, 32, None, 2048, False, attention_bias=False,
                          mlp_bias=False), read_llama),
    "glm4": Arch(_base(151552, 4096, 13696, 40, 32, 2, 131072, False, head_dim=128,
                       attention_bias=True), read_glm4,
                 lora_names={"gate_up_proj": ("gate_proj", "up_proj")},
                 fused=(("gate_proj", "up_proj"),), rotary_fraction=0.5),
    "starcoder2": Arch(_base(49152, 3072, 12288, 30, 24, 2, 4096, True, sliding_window=None,
                             use_bias=True), read_starcoder2,
                       lora_names={"c_fc": ("up_proj",), "c_proj": ("down_proj",)}),
    "smollm3": Arch(_base(128256, 2048, 11008, 36, 16, 4, 32768, True, attention_bias=False,
                          mlp_bias=False, sliding_window=None, use_sliding_window=False),
                    read_llama),
    "deepseek_v2": Arch(_base(102400, 4096, 11008, 32, 32, None, 2048, False, **DEEPSEEK_MLA,
                              mlp_bias=False, num_experts_per_tok=None,
                              moe_intermediate_size=1407, n_shared_experts=2,
                              n_routed_experts=64, first_k_dense_replace=0),
                        read_deepseek, lora_names={**MLA_NAMES}),
    "deepseek_v3": Arch(_base(129280, 7168, 18432, 61, 128, 128, 4096, False, **DEEPSEEK_MLA,
                              num_experts_per_tok=8, moe_intermediate_size=2048,
                              n_shared_experts=1, n_routed_experts=256,
                              first_k_dense_replace=3), read_deepseek,
                        lora_names={**MLA_NAMES}),
    "longcat_flash": Arch({"vocab_size": 131072, "hidden_size": 6144, "num_layers": 28,
                           "num_attention_heads": 64, "num_key_value_heads": None,
                           "max_position_embeddings": 131072, "tie_word_embeddings": False,
                           **DEEPSEEK_MLA, "ffn_hidden_size": 12288,
                           "expert_ffn_hidden_size": 2048, "moe_topk": 12,
                           "n_routed_experts": 512, "zero_expert_num": 256},
                          read_longcat, lora_names={**MLA_NAMES},
                          aliases={"ffn_hidden_size": ("intermediate_size",),
                                   "expert_ffn_hidden_size": ("moe_intermediate_size",),
                                   "moe_topk": ("num_experts_per_tok",),
                                   "n_routed_experts": ("num_local_experts",)}),
    "gpt_oss": Arch(_base(201088, 2880, 2880, 36, 64, 8, 131072, False, head_dim=64,
                          attention_bias=True, sliding_window=128, num_local_experts=128,
                          num_experts_per_tok=4), read_gpt_oss,
                    aliases={"num_experts_per_tok": ("experts_per_token",),
                             "num_local_experts": ("num_experts",)}),
}
ARCHITECTURES["gemma3"] = Arch(ARCHITECTURES["gemma3_text"].defaults, read_gemma3,
                               text_config=True)
