"""Model architecture specs: dense Llama/GPT-style decoders, MoE and MLA variants."""

from typing import Literal

from pydantic import Field, model_validator

from estimator.specs.base import Spec

MAX_SIZE = 2**30
"""Largest dimension, count or length of a model a spec takes (about 10^9): beyond every
published model by orders of magnitude (hidden sizes ≤ 2^15, vocabularies ≤ 2^18, contexts
≤ 2^24), and small enough that every product of them stays a finite float (a config.json
with a 400-digit intermediate_size overflowed float conversion: issue 21)."""


class MoESpec(Spec):
    """Mixture-of-experts feed-forward blocks (Mixtral, Qwen-MoE, DeepSeek, gpt-oss, LongCat)."""

    num_experts: int = Field(gt=1, le=MAX_SIZE)
    """Routed FFN experts per MoE layer (count)."""
    num_experts_per_token: int = Field(gt=0, le=MAX_SIZE)
    """Experts chosen by the router per token, top-k (count); includes zero-computation experts."""
    expert_intermediate_size: int = Field(gt=0, le=MAX_SIZE)
    """Hidden width of one expert's FFN (elements)."""
    num_shared_experts: int = Field(default=0, ge=0, le=MAX_SIZE)
    """Always-active shared experts per MoE layer (count)."""
    shared_expert_intermediate_size: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Hidden width of one shared expert (elements); None means expert_intermediate_size."""
    num_zero_experts: int = Field(default=0, ge=0, le=MAX_SIZE)
    """Zero-computation (identity) experts the router may pick (count, LongCat-Flash)."""
    mean_routed_experts_per_token: float | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Average real (non-zero) experts a token visits (count); None means num_experts_per_token."""
    num_dense_layers: int = Field(default=0, ge=0, le=MAX_SIZE)
    """Leading layers with a dense FFN instead of MoE (count, DeepSeek first_k_dense_replace)."""
    dense_mlps_per_layer: int = Field(default=0, ge=0, le=MAX_SIZE)
    """Extra dense FFNs inside each MoE layer beside the MoE (count, LongCat-Flash has 2)."""
    expert_bias: bool = False
    """Expert and router linears carry biases (gpt-oss)."""
    shared_expert_gate: bool = False
    """A sigmoid gate h→1 scales the shared experts' output (Qwen2-MoE `shared_expert_gate`:
    h weights per MoE layer, counted with the router)."""

    @model_validator(mode="after")
    def _check(self) -> "MoESpec":
        if self.num_experts_per_token > self.num_experts + self.num_zero_experts:
            raise ValueError("num_experts_per_token exceeds the number of experts")
        return self

    @property
    def routed_experts_per_token(self) -> float:
        """Real experts computed per token on average (count)."""
        if self.mean_routed_experts_per_token is not None:
            return self.mean_routed_experts_per_token
        return float(self.num_experts_per_token)


class MLASpec(Spec):
    """Multi-head latent attention (DeepSeek-V2/V3, LongCat-Flash), from the HF config names."""

    q_lora_rank: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Rank of the query down-projection (elements); None means a plain q projection."""
    kv_lora_rank: int = Field(gt=0, le=MAX_SIZE)
    """Rank of the joint key/value down-projection (elements)."""
    qk_nope_head_dim: int = Field(gt=0, le=MAX_SIZE)
    """Per-head query/key width without rotary embedding (elements)."""
    qk_rope_head_dim: int = Field(gt=0, le=MAX_SIZE)
    """Per-head query/key width with rotary embedding (elements)."""
    v_head_dim: int = Field(gt=0, le=MAX_SIZE)
    """Per-head value width (elements)."""


class ModelSpec(Spec):
    """A decoder-only transformer, exact enough to count parameters, FLOPs and activations."""

    name: str
    """Preset or user-facing name."""
    num_layers: int = Field(gt=0, le=MAX_SIZE)
    """Transformer blocks (count; LongCat-Flash: 28 blocks, not the 56 sub-layers)."""
    hidden_size: int = Field(gt=0, le=MAX_SIZE)
    """Residual stream width d_model (elements)."""
    intermediate_size: int = Field(gt=0, le=MAX_SIZE)
    """Dense FFN hidden width (elements)."""
    num_heads: int = Field(gt=0, le=MAX_SIZE)
    """Query heads per attention (count)."""
    num_kv_heads: int = Field(gt=0, le=MAX_SIZE)
    """Key/value heads per attention (count; < num_heads means GQA)."""
    head_dim: int = Field(gt=0, le=MAX_SIZE)
    """Width of one query/key/value head (elements)."""
    vocab_size: int = Field(gt=0, le=MAX_SIZE)
    """Tokenizer vocabulary = embedding rows = logits width (count)."""
    tied_embeddings: bool = False
    """lm_head shares the input embedding matrix."""
    mlp: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    """FFN type: gated SwiGLU or gated GELU (GeGLU, Gemma), 3 matrices gate/up/down; or a plain
    GELU MLP, 2 matrices up/down (GPT-2, Phi-2, GPT-NeoX, StarCoder2)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation type (LayerNorm has a bias vector too)."""
    norms_per_layer: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Hidden-width norms in one block (count); None = one before each attention and one before
    each FFN, 2·attentions_per_layer (Llama). Phi-2 shares one norm between its parallel
    attention and MLP (1); Gemma-2/3 add post-attention and post-FFN norms (4); OLMo-2 has the
    two post-norms only (2)."""
    parallel_residual: bool = False
    """Attention and FFN both read the block input and their outputs are added to it together,
    x + attn(ln1(x)) + mlp(ln2(x)) (GPT-J, GPT-NeoX, Phi-2); False = sequential (Llama)."""
    rotary_fraction: float = Field(default=1.0, gt=0, le=1)
    """Share of each query/key head's width that gets rotary embeddings (fraction; Phi-2 0.4,
    Pythia 0.25, HF `partial_rotary_factor` / `rotary_pct`). No parameters depend on it."""
    position: Literal["rope", "learned"] = "rope"
    """Rotary embeddings, or a learned position-embedding table (GPT-2)."""
    max_seq_len: int = Field(default=4096, gt=0, le=MAX_SIZE)
    """Context length of the configuration (tokens); rows of a learned position table."""
    qkv_bias: bool = False
    """q/k/v projections carry biases (Qwen2, gpt-oss)."""
    attention_bias: bool = False
    """q/k/v/o projections all carry biases (gpt-oss `attention_bias`)."""
    linear_bias: bool = False
    """Every linear layer in the blocks carries a bias (GPT-2 style)."""
    mlp_bias: bool = False
    """The dense FFN linears carry biases (GPT-NeoX; Llama's `mlp_bias`)."""
    lm_head_bias: bool = False
    """lm_head carries a bias of V elements (Phi-1/1.5/2)."""
    qk_norm: bool = False
    """A norm on queries and keys before attention (Qwen3, Gemma-3, OLMo-2; Phi's
    `qk_layernorm`), of the model's norm type."""
    qk_norm_scope: Literal["head", "projection"] = "head"
    """Width of the qk-norm weights: 'head' = one head_dim vector shared by all heads, for q and
    for k (Qwen3, Gemma-3); 'projection' = over the whole q (H·d) and k (K·d) projections
    (OLMo-2)."""
    attention_sinks: bool = False
    """One learned sink logit per head (gpt-oss)."""
    attentions_per_layer: int = Field(default=1, gt=0, le=MAX_SIZE)
    """Attention blocks inside one layer (count; LongCat-Flash has 2)."""
    sliding_window: int | None = Field(default=None, gt=0, le=MAX_SIZE)
    """Local attention window (tokens) where the model uses one; None = full attention."""
    moe: MoESpec | None = None
    """Mixture-of-experts settings; None for a dense model."""
    mla: MLASpec | None = None
    """Multi-head latent attention settings; None for standard (GQA/MHA) attention."""
    lora_module_names: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """The model's own PEFT module names → the canonical (Llama) linears they mean, e.g. Qwen-1's
    {'c_attn': ('q_proj', 'k_proj', 'v_proj'), 'c_proj': ('o_proj', 'down_proj'), ...}; a name
    that occurs in two places (Qwen-1's attn.c_proj and mlp.c_proj) lists both. Canonical names
    (setup.LINEAR_TARGETS) are always accepted too (analytic.params.resolve_lora_targets)."""
    fused_linears: tuple[tuple[str, ...], ...] = ()
    """Canonical linears that the model's code stores as ONE nn.Linear, so PEFT gives them one
    shared LoRA A (r × in): GPT-NeoX query_key_value, Qwen-1 c_attn, Phi-3 qkv_proj
    (q, k, v) and gate_up_proj (gate, up). Parameter counts are the same either way."""
    hf_model_type: str | None = None
    """The Hugging Face `model_type` a config.json spec was read from (None for presets)."""
    hf_id: str | None = None
    """Hugging Face model id the preset describes."""
    source: str | None = None
    """Where the numbers come from (URL or file path)."""
    published_num_params: int | None = Field(default=None, gt=0, le=10**15)
    """The total parameter count the authors publish (count), for checking our count."""
    published_active_params: int | None = Field(default=None, gt=0, le=10**15)
    """The published active parameters per token of an MoE model (count)."""
    inferred_from: str | None = None
    """Set when the architecture was inferred (e.g. from a bare parameter count); says how."""

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.mla is None and self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.moe is not None and self.moe.num_dense_layers > self.num_layers:
            raise ValueError("moe.num_dense_layers exceeds num_layers")
        return self

    def __hash__(self) -> int:
        """By name and main dimensions, so equal specs hash equal (pydantic's frozen hash
        walks every field and sub-spec; the analytic model's per-model caches hash the spec
        on every lookup, about 1,700 times in one plan search). Specs that share these but
        differ elsewhere only collide: the caches still compare them in full."""
        return hash((self.name, self.num_layers, self.hidden_size, self.vocab_size))

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model."""
        return self.moe is not None

    @property
    def num_params(self) -> int:
        """Total parameters (count; embedding and LM head included, tied ones once). Computed
        by analytic/params.py's count_params, the one parameter formula (imported when read:
        specs hold no formulas); count_params(model, setup) gives the active and trainable
        counts of a setup and the named groups."""
        from estimator.analytic.params import count_params

        return count_params(self).total

    @property
    def num_active_params(self) -> int:
        """Parameters that one token passes through (count): num_params for a dense model,
        the shared part + the routed experts per token for an MoE (analytic/params.py)."""
        from estimator.analytic.params import count_params

        return count_params(self).active_per_token

    @property
    def num_moe_layers(self) -> int:
        """Layers whose FFN is a mixture of experts (count)."""
        return 0 if self.moe is None else self.num_layers - self.moe.num_dense_layers
