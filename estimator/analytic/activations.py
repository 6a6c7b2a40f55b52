"""Activation memory: the tensors autograd saves for backward, op by op.

Derived from the ops the executor runs (estimator/executor/model.py) rather than copied from
Korthikanti et al. 2022, whose s·b·h·(34 + 5·a·s/h) assumes GPT-2 blocks with dropout, a 4h GELU
MLP and eager attention (reproduced by `korthikanti_layer_bytes` as a reference check).
Conventions: T = batch·seq tokens; c = bytes of the compute dtype; r = bytes of the residual
stream: fp32 when the weights are fp32 under autocast (a mixed-precision full fine-tune, or a
32-bit LoRA base), else the storage dtype. Norms produce their output in the compute dtype, so
the linears after a norm share one saved c-byte input. A frozen linear (LoRA base) saves no
input: its weight gradient is not needed (PyTorch saves mm operands only for the gradients it
must compute). Each norm keeps only its input and an fp32 rstd (executor/model.py
_RMSNormFunction). Measured against torch.autograd.graph.saved_tensors_hooks:
tests/torch/test_activation_parity.py.
"""

from estimator.analytic.frameworks import OWN_TERMS, hf, terms
from estimator.analytic.params import attention_linears, norms_per_layer
from estimator.analytic.precision import dtype_bytes
from estimator.specs import ModelSpec, TrainSetup

FP32_BYTES = 4

EXPERT_ROW_GRANULE = 32
"""Row multiple of the executor's expert GEMMs on CPU with 16-bit matmuls (executor/model.py
MoE): oneDNN compiles and caches one kernel ("primitive") per GEMM shape, and the tokens an
expert receives change every step, so every expert's rows are padded up to a multiple of 32
(one call per expert, few shapes)."""


def padded_expert_rows(model: ModelSpec) -> float:
    """Rows the padding adds to one MoE layer's expert groups, in expectation: (granule − 1)/2
    per expert (a group's size is taken as uniform modulo the granule)."""
    return model.moe.num_experts * (EXPERT_ROW_GRANULE - 1) / 2 if model.moe else 0.0


def elem_bytes(setup: TrainSetup) -> tuple[int, int]:
    """(c, r): compute-dtype bytes and residual-stream bytes per element. The residual stream
    has the dtype of the embedding output: fp32 for a mixed-precision full fine-tune or a
    32-bit base, else the 16-bit storage dtype (pure training, 16/8/4-bit LoRA bases)."""
    c = dtype_bytes(setup.compute_dtype)
    fp32_weights = setup.compute_dtype == "fp32" or setup.weight_bits == 32 or (
        setup.method == "full" and setup.mixed_precision)
    return c, FP32_BYTES if fp32_weights else c


def saved_linear_inputs(setup: TrainSetup, names: list[str]) -> int:
    """1 if any of the linears `names` (which read one shared tensor) saves its input, else 0.

    Full training: every linear needs its input for the weight gradient. LoRA: only targeted
    linears (lora_A needs x); frozen ones save nothing."""
    if setup.method == "full":
        return 1
    return 1 if any(n in setup.lora_targets for n in names) else 0


def norm_output_recomputed(model: ModelSpec, setup: TrainSetup) -> bool:
    """A full fine-tune with RMSNorm: the executor's _NormLinears feeds a norm's output to the
    q/k/v (or a dense FFN's gate/up) linears and recomputes it in backward from the norm's
    input and rstd, so the linears keep no copy of it (Liger-Kernel's and Unsloth's fused
    norm-plus-matmul recompute the same way)."""
    return setup.method == "full" and model.norm == "rmsnorm" and model.mla is None


def norm_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> int:
    """One norm: its input (r bytes) + fp32 rstd (RMSNorm) or mean and rstd (LayerNorm)."""
    _, r = elem_bytes(setup)
    stats = 2 if model.norm == "layernorm" else 1
    return num_tokens * (model.hidden_size * r + stats * FP32_BYTES)


def lora_hidden_bytes(setup: TrainSetup, names: list[str], num_tokens: int) -> int:
    """lora_B saves its input A·x (T·r_lora·c) per targeted linear."""
    if not setup.trains_adapters:
        return 0
    c, _ = elem_bytes(setup)
    return sum(num_tokens * setup.lora_rank * c for n in names if n in setup.lora_targets)


def attention_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> int:
    """One attention block: norm, q/k/v input(s) (see norm_output_recomputed), q/k/v/out and
    logsumexp saved by SDPA (or the b·H·s² probabilities of eager attention), the o_proj input
    (with SDPA the same tensor as its output: the executor keeps q in [B, T, H, C] memory, and
    SDPA's CPU kernel gives the output q's layout), LoRA hidden states."""
    c, _ = elem_bytes(setup)
    h, heads = model.hidden_size, model.num_heads
    batch, seq = setup.batch_size, setup.seq_len
    if model.mla is not None:
        q_width = heads * (model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim)
        kv_width = q_width + heads * model.mla.v_head_dim
        out_width = heads * model.mla.v_head_dim
    else:
        q_width = heads * model.head_dim
        kv_width = 2 * model.num_kv_heads * model.head_dim
        out_width = q_width
    total = norm_saved_bytes(model, setup, num_tokens)
    if not norm_output_recomputed(model, setup):
        total += saved_linear_inputs(setup, ["q_proj", "k_proj", "v_proj"]) * num_tokens * h * c
    if model.qk_norm:
        total += num_tokens * (q_width + kv_width // 2) * c  # q/k norm inputs: projections
    total += num_tokens * (q_width + kv_width) * c  # q, k, v (QKᵀ and PV, or SDPA)
    if setup.attention == "eager":  # HF eager: softmax in fp32, then a 16-bit copy for PV
        total += batch * heads * seq * seq * (FP32_BYTES + c)
        total += saved_linear_inputs(setup, ["o_proj"]) * num_tokens * out_width * c
    else:  # SDPA keeps its output and the fp32 logsumexp; the o_proj input is a view of it
        total += num_tokens * out_width * c + batch * heads * seq * FP32_BYTES
    names = [lin.name for lin in attention_linears(model)]
    return total + lora_hidden_bytes(setup, names, num_tokens)


def ffn_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: float, width: int,
                    *, input_copies: bool = True) -> float:
    """One FFN over `num_tokens`: gate/up input(s), a gated FFN's g and u (SwiGLU's silu(g) is
    recomputed in backward: the executor's _SiLUMul, as Liger-Kernel's SwiGLU; GeGLU is taken
    to save the same; GELU: its input), the down_proj input (not for a fully trained SwiGLU
    FFN: the executor's _SwiGLUDown recomputes it from g and u for ∂W_down); LoRA hidden
    states."""
    c, _ = elem_bytes(setup)
    h = model.hidden_size
    gated = model.mlp != "gelu"
    first = ["gate_proj", "up_proj"] if gated else ["up_proj"]
    total = 0.0
    if input_copies:
        total += saved_linear_inputs(setup, first) * num_tokens * h * c
    total += (2 if gated else 1) * num_tokens * width * c
    if not (model.mlp == "swiglu" and setup.method == "full"):
        total += saved_linear_inputs(setup, ["down_proj"]) * num_tokens * width * c
    return total + lora_hidden_bytes(setup, [*first, "down_proj"], round(num_tokens))


def moe_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int,
                    pad_rows: float = 0.0) -> float:
    """One MoE FFN: router input (trainable router only) and fp32 softmax probabilities,
    top-k weights; per routed token copy (and per padding row, `pad_rows`) the gathered input,
    the expert FFN tensors and the expert output kept for the routing-weight multiply; shared
    and side-by-side dense FFNs."""
    moe = model.moe
    assert moe is not None
    c, _ = elem_bytes(setup)
    h = model.hidden_size
    routed_tokens = num_tokens * moe.routed_experts_per_token + pad_rows
    width = moe.num_experts + moe.num_zero_experts
    total = float(num_tokens * width * FP32_BYTES + num_tokens * moe.num_experts_per_token * 4)
    if setup.method == "full":
        total += num_tokens * h * c  # router input
    total += routed_tokens * h * c * 2  # gathered expert input + expert output for the weighting
    total += ffn_saved_bytes(model, setup, routed_tokens, moe.expert_intermediate_size)
    shared_width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
    total += moe.num_shared_experts * ffn_saved_bytes(model, setup, num_tokens, shared_width)
    total += moe.dense_mlps_per_layer * ffn_saved_bytes(
        model, setup, num_tokens, model.intermediate_size)
    return total


def shares_one_norm(model: ModelSpec) -> bool:
    """Phi-2: one norm feeds both the parallel attention and the MLP (one saved output)."""
    return model.parallel_residual and norms_per_layer(model) == 1


def norm_adjust_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> int:
    """Norms the spec's norms_per_layer states besides the one before each attention and the
    one before the FFN: post-norms (Gemma-2/3) save their input and statistics too; Phi-2's
    single shared norm saves one set fewer; a parallel-residual block whose two norms read the
    same block input (GPT-NeoX) keeps that input once. Without norms_per_layer nothing is
    added (LongCat-Flash's second pre-FFN norm is not counted, as before)."""
    _, r = elem_bytes(setup)
    extra = 0 if model.norms_per_layer is None else (
        norms_per_layer(model) - (model.attentions_per_layer + 1))
    total = extra * norm_saved_bytes(model, setup, num_tokens)
    if model.parallel_residual and extra >= 0:
        total -= num_tokens * model.hidden_size * r
    return total


def layer_saved_bytes(model: ModelSpec, setup: TrainSetup, *, moe_layer: bool,
                      pad_experts: bool = False) -> int:
    """Everything one transformer block saves for backward (bytes); `pad_experts`: expert
    groups padded to EXPERT_ROW_GRANULE rows."""
    tokens = setup.tokens_per_micro_batch
    total = model.attentions_per_layer * attention_saved_bytes(model, setup, tokens)
    total += norm_saved_bytes(model, setup, tokens) + norm_adjust_bytes(model, setup, tokens)
    if moe_layer:
        pad_rows = padded_expert_rows(model) if pad_experts else 0.0
        total += moe_saved_bytes(model, setup, tokens, pad_rows)
    else:
        copies = not (norm_output_recomputed(model, setup) or shares_one_norm(model))
        total += ffn_saved_bytes(model, setup, tokens, model.intermediate_size,
                                 input_copies=copies)
    return round(total)


def head_saved_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Final norm, and the lm_head input when lm_head trains and the loss is not fused (the
    fused loss keeps gradients instead: counted in memory.logits_bytes)."""
    c, _ = elem_bytes(setup)
    tokens = setup.tokens_per_micro_batch
    head_input = tokens * model.hidden_size * c if (
        setup.method == "full" and not setup.fuses_loss) else 0
    return norm_saved_bytes(model, setup, tokens) + head_input


def checkpointed_layer_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """With full activation checkpointing a block keeps only its input (T·h·r)."""
    _, r = elem_bytes(setup)
    return setup.tokens_per_micro_batch * model.hidden_size * r


def activation_bytes(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False
                     ) -> dict[str, int]:
    """Peak saved activations of one micro-batch, by part (bytes); `pad_experts` as
    memory.pads_expert_rows.

    Without checkpointing every block's saved set is alive at the start of backward. With it,
    every block keeps its input and one block at a time recomputes its full set (Chen et al.
    2016; Korthikanti et al. 2022 §4 "full recomputation")."""
    if setup.framework == "hf":
        return hf.activation_bytes(model, setup)
    if setup.framework in OWN_TERMS:
        return terms(setup.framework).activation_bytes(model, setup)
    if setup.method == "inference":
        return {"layers": 0, "recompute": 0, "head": 0}
    num_moe = model.num_moe_layers
    num_dense = model.num_layers - num_moe
    dense = layer_saved_bytes(model, setup, moe_layer=False) if num_dense else 0
    moe = layer_saved_bytes(model, setup, moe_layer=True, pad_experts=pad_experts) \
        if num_moe else 0
    head = head_saved_bytes(model, setup)
    if setup.trains_adapters and not setup.checkpointing:
        # frozen embeddings: the first norm's input needs no gradient, so nothing is saved
        dense_or_moe = dense if num_dense else moe
        first = dense_or_moe - norm_saved_bytes(model, setup, setup.tokens_per_micro_batch)
        return {"layers": dense * num_dense + moe * num_moe - dense_or_moe + first,
                "recompute": 0, "head": head}
    if setup.checkpointing:
        block_input = checkpointed_layer_bytes(model, setup)
        # the recomputed set's first saved tensor (the norm input) is the kept block input
        recompute = max(dense, moe) - block_input
        return {"layers": block_input * model.num_layers, "recompute": recompute, "head": head}
    return {"layers": dense * num_dense + moe * num_moe, "recompute": 0, "head": head}


def korthikanti_layer_bytes(seq: int, batch: int, hidden: int, heads: int) -> int:
    """Korthikanti et al. 2022 (arXiv 2205.05198) eq. 2: activations of one GPT layer, 16-bit,
    no parallelism, no recomputation: s·b·h·(34 + 5·a·s/h) bytes."""
    return seq * batch * hidden * 34 + 5 * heads * seq * seq * batch
