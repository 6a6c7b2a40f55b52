"""Parameter counts of a ModelSpec, by named group.

Every count is exact for the tensors the bundled executor builds (tests/torch checks
`sum(p.numel())` against it) and for Hugging Face's Llama/Qwen/Mixtral/DeepSeek/gpt-oss modules:
a linear in→out has in·out weights (+ out bias); RMSNorm has h weights, LayerNorm 2h.
"""

import functools
from collections.abc import Iterable
from typing import NamedTuple

from estimator.specs import ModelSpec, ParamCounts, TrainSetup

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class LinearShape(NamedTuple):
    """One linear layer kind inside a block: PEFT name, in/out width, how many per layer. A
    named tuple, like flops.Op: immutable and cheap to build (the op lists build a few per
    linear)."""

    name: str
    in_features: int
    out_features: int
    count: float
    """Instances per layer, or tokens-weighted instances for routed experts (may be fractional)."""
    bias: bool = False
    routed: bool = False
    """True for routed MoE experts (each token visits only some of them)."""

    @property
    def num_params(self) -> int:
        """Weights + bias of one instance (count)."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def norm_params(model: ModelSpec) -> int:
    """Parameters of one norm: h for RMSNorm, 2h (weight + bias) for LayerNorm."""
    return model.hidden_size * (2 if model.norm == "layernorm" else 1)


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def attention_linears(model: ModelSpec) -> tuple[LinearShape, ...]:
    """Linears of one attention block: q, k, v, o (or MLA's low-rank q/kv projections);
    cached per model (the activation terms read their names per micro-batch).

    MLA (DeepSeek-V2 §2.1): q = W_qb·norm(W_qa·x) (or W_q·x), [c_kv, k_rope] = W_kva·x,
    [k_nope, v] = W_kvb·norm(c_kv), out = W_o·attn. PEFT names: q_proj covers q_a/q_b,
    k_proj and v_proj both map to kv_a/kv_b (counted under k_proj), o_proj = o.
    """
    h, heads = model.hidden_size, model.num_heads
    if model.mla is not None:
        m = model.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            q = [LinearShape("q_proj", h, heads * qk, 1)]
        else:
            q = [LinearShape("q_proj", h, m.q_lora_rank, 1),
                 LinearShape("q_proj", m.q_lora_rank, heads * qk, 1)]
        kv = [LinearShape("k_proj", h, m.kv_lora_rank + m.qk_rope_head_dim, 1),
              LinearShape("k_proj", m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), 1)]
        return (*q, *kv, LinearShape("o_proj", heads * m.v_head_dim, h, 1))
    qkv_bias = model.qkv_bias or model.linear_bias or model.attention_bias
    q_out, kv_out = heads * model.head_dim, model.num_kv_heads * model.head_dim
    return (
        LinearShape("q_proj", h, q_out, 1, qkv_bias),
        LinearShape("k_proj", h, kv_out, 1, qkv_bias),
        LinearShape("v_proj", h, kv_out, 1, qkv_bias),
        LinearShape("o_proj", q_out, h, 1, model.linear_bias or model.attention_bias),
    )


def attention_extra_params(model: ModelSpec) -> int:
    """Non-linear attention parameters: qk-norm weights (2·d, Qwen3), sinks (H, gpt-oss),
    MLA's latent norms (q_lora_rank + kv_lora_rank)."""
    extra = 2 * model.head_dim if model.qk_norm else 0
    extra += model.num_heads if model.attention_sinks else 0
    if model.mla is not None:
        extra += (model.mla.q_lora_rank or 0) + model.mla.kv_lora_rank
    return extra


def ffn_linears(model: ModelSpec, width: int, count: float, bias: bool,
                routed: bool = False) -> list[LinearShape]:
    """Linears of `count` FFNs of hidden width `width`: SwiGLU gate/up/down or GELU up/down."""
    h = model.hidden_size
    names = ["up_proj", "down_proj"] if model.mlp == "gelu" else ["gate_proj", "up_proj",
                                                                   "down_proj"]
    return [LinearShape(n, width if n == "down_proj" else h, h if n == "down_proj" else width,
                        count, bias, routed) for n in names]


def dense_ffn_linears(model: ModelSpec) -> list[LinearShape]:
    """FFN linears of a dense layer (count 1 each)."""
    return ffn_linears(model, model.intermediate_size, 1, model.linear_bias)


def moe_ffn_linears(model: ModelSpec, *, routed_count: float) -> list[LinearShape]:
    """FFN linears of an MoE layer: `routed_count` routed experts, the shared experts and
    the dense FFNs that sit beside the MoE (LongCat-Flash)."""
    moe = model.moe
    assert moe is not None
    shared_width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
    return [
        *ffn_linears(model, moe.expert_intermediate_size, routed_count, moe.expert_bias,
                     routed=True),
        *(ffn_linears(model, shared_width, moe.num_shared_experts, False)
          if moe.num_shared_experts else []),
        *(ffn_linears(model, model.intermediate_size, moe.dense_mlps_per_layer, False)
          if moe.dense_mlps_per_layer else []),
    ]


def router_params(model: ModelSpec) -> int:
    """Router of one MoE layer: h·(E + Z) weights (+ E + Z bias for gpt-oss)."""
    moe = model.moe
    if moe is None:
        return 0
    width = moe.num_experts + moe.num_zero_experts
    return model.hidden_size * width + (width if moe.expert_bias else 0)


def linears_params(linears: Iterable[LinearShape]) -> int:
    """Sum of weights + biases over a list of linear kinds (count)."""
    return round(sum(lin.num_params * lin.count for lin in linears))


def lora_params(model: ModelSpec, setup: TrainSetup, *, b_only: bool = False) -> int:
    """LoRA adapter parameters: r·(in + out) per targeted linear (Hu et al. 2021, A: r×in,
    B: out×r), or only the B halves r·out. Targets use PEFT's module names; experts count once
    per expert."""
    if not setup.trains_adapters:
        return 0
    targets = set(setup.lora_targets)
    total = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        for lin in linears:
            if lin.name in targets:
                width = lin.out_features + (0 if b_only else lin.in_features)
                total += setup.lora_rank * width * lin.count * num_layers
    return round(total)


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def layer_groups(model: ModelSpec, *, routed_all: bool
                 ) -> tuple[tuple[tuple[LinearShape, ...], int], ...]:
    """(linears of one layer, number of such layers) for dense and MoE layers.

    routed_all=True counts every expert (storage); False counts the experts a token visits
    on average (compute, MoE active parameters). Cached per model (tuples, so no caller can
    change the cached value): every op list and memory term walks them."""
    attn = [LinearShape(a.name, a.in_features, a.out_features,
                        a.count * model.attentions_per_layer, a.bias, a.routed)
            for a in attention_linears(model)]
    groups = []
    num_dense = model.num_layers - model.num_moe_layers
    if num_dense:
        groups.append((tuple(attn + dense_ffn_linears(model)), num_dense))
    if model.moe is not None and model.num_moe_layers:
        routed = (model.moe.num_experts if routed_all
                  else model.moe.routed_experts_per_token)
        groups.append((tuple(attn + moe_ffn_linears(model, routed_count=routed)),
                       model.num_moe_layers))
    return tuple(groups)


def count_params(model: ModelSpec, setup: TrainSetup | None = None) -> ParamCounts:
    """Total, active-per-token and trainable parameters, by named group."""
    setup = setup or TrainSetup()
    h, num_layers = model.hidden_size, model.num_layers
    embedding = model.vocab_size * h + (model.max_seq_len * h if model.position == "learned" else 0)
    lm_head = 0 if model.tied_embeddings else model.vocab_size * h
    attn_one = linears_params(attention_linears(model)) + attention_extra_params(model)
    attention = attn_one * model.attentions_per_layer * num_layers
    norms = (2 * model.attentions_per_layer * num_layers + 1) * norm_params(model)
    num_dense = num_layers - model.num_moe_layers
    mlp = linears_params(dense_ffn_linears(model)) * num_dense
    experts = active_experts = router = 0
    if model.moe is not None:
        moe_layers = model.num_moe_layers
        experts = linears_params(moe_ffn_linears(model, routed_count=model.moe.num_experts))
        active_experts = linears_params(
            moe_ffn_linears(model, routed_count=model.moe.routed_experts_per_token))
        experts, active_experts = experts * moe_layers, active_experts * moe_layers
        router = router_params(model) * moe_layers
    components = {"embedding": embedding, "attention": attention, "mlp": mlp, "experts": experts,
                  "router": router, "norms": norms, "lm_head": lm_head}
    total = sum(components.values())
    active = total - experts + active_experts
    lora = lora_params(model, setup)
    components["lora"] = lora
    trainable = {"full": total, "lora": lora, "qlora": lora, "inference": 0}[setup.method]
    return ParamCounts(total=total, active_per_token=active, trainable=trainable,
                       embedding=embedding, lm_head=lm_head, components=components)
