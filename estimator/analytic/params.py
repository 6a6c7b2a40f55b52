"""Parameter counts of a ModelSpec, by named group.

Every count is exact for the tensors the bundled executor builds (tests/torch checks
`sum(p.numel())` against it) and for the Hugging Face modules of every model_type that
estimator.catalog reads (tests/torch/test_hf_param_counts.py builds each at tiny size): a linear
in→out has in·out weights (+ out bias); RMSNorm has h weights, LayerNorm 2h.
"""

import functools
from collections.abc import Iterable
from typing import NamedTuple

from estimator.analytic.frameworks.targets import HEAD_TARGET_FRAMEWORKS, LM_HEAD, adapted
from estimator.specs import LINEAR_TARGETS, ModelSpec, ParamCounts, TrainSetup

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


def norms_per_layer(model: ModelSpec) -> int:
    """Hidden-width norms in one block: the spec's norms_per_layer, else one before each
    attention and one before each FFN (2·attentions_per_layer)."""
    return model.norms_per_layer or 2 * model.attentions_per_layer


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def attention_linears(model: ModelSpec) -> tuple[LinearShape, ...]:
    """Linears of one attention block: q, k, v, o (or MLA's low-rank q/kv projections);
    cached per model (the activation terms read their names per micro-batch).

    MLA (DeepSeek-V2 §2.1): q = W_qb·norm(W_qa·x) (or W_q·x), [c_kv, k_rope] = W_kva·x,
    [k_nope, v] = W_kvb·norm(c_kv), out = W_o·attn; q_a, kv_a and o carry biases with
    attention_bias (HF DeepseekV2/V3, LongCat). PEFT names: q_proj covers q_a/q_b, k_proj and
    v_proj both map to kv_a/kv_b (counted under k_proj), o_proj = o.
    """
    h, heads = model.hidden_size, model.num_heads
    if model.mla is not None:
        m, bias = model.mla, model.attention_bias  # HF: q_a, kv_a and o biased with it
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            q = [LinearShape("q_proj", h, heads * qk, 1)]
        else:
            q = [LinearShape("q_proj", h, m.q_lora_rank, 1, bias),
                 LinearShape("q_proj", m.q_lora_rank, heads * qk, 1)]
        kv = [LinearShape("k_proj", h, m.kv_lora_rank + m.qk_rope_head_dim, 1, bias),
              LinearShape("k_proj", m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), 1)]
        return (*q, *kv, LinearShape("o_proj", heads * m.v_head_dim, h, 1, bias))
    qkv_bias = model.qkv_bias or model.linear_bias or model.attention_bias
    q_out, kv_out = heads * model.head_dim, model.num_kv_heads * model.head_dim
    return (
        LinearShape("q_proj", h, q_out, 1, qkv_bias),
        LinearShape("k_proj", h, kv_out, 1, qkv_bias),
        LinearShape("v_proj", h, kv_out, 1, qkv_bias),
        LinearShape("o_proj", q_out, h, 1, model.linear_bias or model.attention_bias),
    )


def qk_norm_params(model: ModelSpec) -> int:
    """qk-norm weights of one attention: 2·d per head-wise norm pair (Qwen3, Gemma-3), or
    (H + K)·d over the whole projections (OLMo-2); ×2 for LayerNorm's bias (Phi qk_layernorm)."""
    if not model.qk_norm:
        return 0
    if model.qk_norm_scope == "projection":
        width = (model.num_heads + model.num_kv_heads) * model.head_dim
    else:
        width = 2 * model.head_dim
    return width * (2 if model.norm == "layernorm" else 1)


def attention_extra_params(model: ModelSpec) -> int:
    """Non-linear attention parameters: qk-norm weights (qk_norm_params), sinks (H, gpt-oss),
    MLA's latent norms (q_lora_rank + kv_lora_rank)."""
    extra = qk_norm_params(model)
    extra += model.num_heads if model.attention_sinks else 0
    if model.mla is not None:
        extra += (model.mla.q_lora_rank or 0) + model.mla.kv_lora_rank
    return extra


def ffn_linears(model: ModelSpec, width: int, count: float, bias: bool,
                routed: bool = False) -> list[LinearShape]:
    """Linears of `count` FFNs of hidden width `width`: gated (SwiGLU, GeGLU) gate/up/down or
    GELU up/down."""
    h = model.hidden_size
    names = ["up_proj", "down_proj"] if model.mlp == "gelu" else ["gate_proj", "up_proj",
                                                                   "down_proj"]
    return [LinearShape(n, width if n == "down_proj" else h, h if n == "down_proj" else width,
                        count, bias, routed) for n in names]


def dense_ffn_linears(model: ModelSpec) -> list[LinearShape]:
    """FFN linears of a dense layer (count 1 each); biased with linear_bias or mlp_bias."""
    return ffn_linears(model, model.intermediate_size, 1, model.linear_bias or model.mlp_bias)


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
    """Router of one MoE layer: h·(E + Z) weights (+ E + Z bias for gpt-oss), + h for
    Qwen2-MoE's shared-expert gate (h→1)."""
    moe = model.moe
    if moe is None:
        return 0
    width = moe.num_experts + moe.num_zero_experts
    gate = model.hidden_size if moe.shared_expert_gate else 0
    return model.hidden_size * width + (width if moe.expert_bias else 0) + gate


def linears_params(linears: Iterable[LinearShape]) -> int:
    """Sum of weights + biases over a list of linear kinds (count)."""
    return round(sum(lin.num_params * lin.count for lin in linears))


def resolve_lora_targets(model: ModelSpec, targets: Iterable[str]
                         ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(canonical targets, names neither canonical nor the model's own): each of the model's
    PEFT module names (model.lora_module_names, e.g. Qwen-1 'c_attn') becomes the canonical
    linears it holds; a canonical member of a fused module (Phi-3 'q_proj') brings the whole
    module (PEFT can only adapt qkv_proj as one). Order kept, duplicates dropped."""
    resolved: list[str] = []
    unknown: list[str] = []
    for name in targets:
        if name in model.lora_module_names:
            resolved += model.lora_module_names[name]
        elif name in LINEAR_TARGETS or name == LM_HEAD:  # lm_head: checks.check per framework
            resolved.append(name)
        else:
            unknown.append(name)
    for group in model.fused_linears:
        if any(n in resolved for n in group):
            resolved += group
    return tuple(dict.fromkeys(resolved)), tuple(unknown)


def fused_lora_a_overlap(model: ModelSpec, linears: Iterable[LinearShape],
                         targets: set[str]) -> float:
    """Input widths of LoRA A matrices that a fused module does not have (count per rank):
    k canonical linears stored as one module (model.fused_linears) get one A of r×in from
    PEFT, not k, so (k − 1)·in per fused module is taken off the per-linear sum."""
    overlap = 0.0
    for group in model.fused_linears:
        members = [lin for lin in linears if lin.name in group and not lin.routed]
        if len(members) > 1 and all(m.name in targets for m in members):
            overlap += members[0].in_features * (sum(m.count for m in members) - members[0].count)
    return overlap


def lora_params(model: ModelSpec, setup: TrainSetup, *, b_only: bool = False) -> int:
    """LoRA adapter parameters: r·(in + out) per targeted linear (Hu et al. 2021, A: r×in,
    B: out×r), or only the B halves r·out; a fused module (GPT-NeoX query_key_value) has one
    A for its k linears (fused_lora_a_overlap). Targets are canonical names
    (resolve_lora_targets); experts count once per expert. With the hf framework routed
    experts get none: transformers 5 keeps them as fused 3-D tensors that PEFT's module names
    do not reach unless all seven are targeted (frameworks/hf.py adapts_experts)."""
    if not setup.trains_adapters:
        return 0
    targets = set(adapted(setup))
    skip_routed = setup.framework == "hf" and not set(LINEAR_TARGETS) <= targets
    total = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        for lin in linears:
            if lin.name in targets and not (skip_routed and lin.routed):
                width = lin.out_features + (0 if b_only else lin.in_features)
                total += setup.lora_rank * width * lin.count * num_layers
        if not b_only and setup.framework not in HEAD_TARGET_FRAMEWORKS:  # their own A per part
            total -= setup.lora_rank * fused_lora_a_overlap(model, linears, targets) * num_layers
    if LM_HEAD in targets:  # torchtune apply_lora_to_output, LitGPT lora_head
        total += setup.lora_rank * (model.vocab_size + (0 if b_only else model.hidden_size))
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
    tied = model.tied_embeddings and setup.framework != "litgpt"  # LitGPT fine-tunes untied
    lm_head = (0 if tied else model.vocab_size * h) + (
        model.vocab_size if model.lm_head_bias else 0)
    attn_one = linears_params(attention_linears(model)) + attention_extra_params(model)
    attention = attn_one * model.attentions_per_layer * num_layers
    norms = (norms_per_layer(model) * num_layers + 1) * norm_params(model)
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
