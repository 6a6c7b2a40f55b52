"""The ops of one training (or prefill) step: FLOPs, bytes and kernel calls per op.

Counting rules (Kaplan et al. 2020 §2.1; Narayanan et al. 2021 appendix; EleutherAI
Transformer Math 101): a linear in→out over T tokens costs 2·T·in·out FLOPs forward; backward
costs as much again for the input gradient and again for the weight gradient — the weight
gradient is skipped for frozen weights (LoRA/QLoRA), so LoRA training is ≈ 2·forward + adapters
instead of 3·forward. Attention core: QKᵀ and PV are 2·s²·d FLOPs per head each (4·b·s²·H·d),
halved by a causal kernel that skips masked blocks; backward = 2·forward. Checkpointing runs
each block's forward twice. MoE: each token visits its routed experts only. Memory-bound ops
(norms, activations, residuals, casts, loss) are counted in bytes read + written.

Here: the Op record, the GEMMs (linears, LoRA, attention core) and the model's FLOPs per token.
Beside it: elementwise.py (the blocks' memory-bound ops and MoE routing), loss_optim.py (LM head
and loss, casts, dequantisation, gradient allocation, the optimizer step), dispatch.py (kernel
launches); throughput.step_ops lists them all for one step.
"""

import functools
from typing import NamedTuple

from estimator.analytic.activations import padded_expert_rows
from estimator.analytic.model_state import (
    autocasting,
)
from estimator.analytic.params import LinearShape, layer_groups
from estimator.analytic.precision import dtype_bytes
from estimator.specs import ModelSpec, TrainSetup

FP32_BYTES = 4


class Op(NamedTuple):
    """One kind of kernel in a step: `num_calls` calls of `flops_per_call` / `bytes_per_call`.
    A named tuple: immutable like a frozen dataclass, and built several times faster (the
    planner builds thousands per search); `op._replace(...)` copies with changes."""

    name: str
    op_class: str
    """'matmul', 'attention', 'elementwise', 'optimizer', 'dequant.nf4' (dtype appended later)."""
    flops_per_call: float
    bytes_per_call: float
    num_calls: float
    rate_flops: float = 0.0
    """FLOPs at which a FLOP curve's rate is read when not the call's (0: the call's): the
    attention curve is measured on one sequence, and a batch of b sequences runs at the rate
    of one (attention_core_ops)."""

    @property
    def flops(self) -> float:
        """FLOPs of all calls (count)."""
        return self.flops_per_call * self.num_calls

    @property
    def bytes_moved(self) -> float:
        """Bytes read + written by all calls (bytes)."""
        return self.bytes_per_call * self.num_calls


def linear_ops(lin: LinearShape, num_layers: int, tokens: float, setup: TrainSetup,
               *, trainable: bool, phase_mult: int, group: str = "linear",
               op_class: str = "matmul") -> list[Op]:
    """Forward, input-gradient and weight-gradient GEMMs of one linear kind.

    For routed experts `lin.count` is tokens-weighted (experts a token visits); the calls are
    split over the experts, each GEMM seeing tokens·count/num_experts rows — passed in as
    `tokens` by the caller."""
    c = dtype_bytes(setup.compute_dtype)
    calls = lin.count * num_layers
    flops = 2 * tokens * lin.in_features * lin.out_features
    io = c * (lin.in_features * lin.out_features + tokens * (lin.in_features + lin.out_features))
    ops = [Op(f"{group}.forward", op_class, flops, io, calls * phase_mult)]
    if setup.method != "inference":
        ops.append(Op(f"{group}.backward_input", op_class, flops, io, calls))
        if trainable:
            ops.append(Op(f"{group}.backward_weight", op_class, flops, io, calls))
    return ops


def lora_ops(lin: LinearShape, num_layers: int, tokens: float, setup: TrainSetup,
             phase_mult: int) -> list[Op]:
    """LoRA A (in→r) and B (r→out): forward, both gradients (Hu et al. 2021), in the
    rank's op class (lora_class)."""
    r = setup.lora_rank
    a = LinearShape(f"{lin.name}.lora_A", lin.in_features, r, lin.count)
    b = LinearShape(f"{lin.name}.lora_B", r, lin.out_features, lin.count)
    return [op for part in (a, b)
            for op in linear_ops(part, num_layers, tokens, setup, trainable=True,
                                 phase_mult=phase_mult, group="lora",
                                 op_class=lora_class(r))]


def lora_class(rank: int) -> str:
    """The op class of an adapter GEMM of rank r: 'lora.r<rank>', timed on the calibration's
    curve of the nearest measured rank (efficiency.profile_curve): a skinny GEMM's rate
    follows its narrow dimension, not its FLOPs (measured here, 1 thread, fp32: dyᵀ·z at
    2048×4096 ran 2.0 GFLOP/s at r = 8 and 13.8 at r = 16)."""
    return f"lora.r{rank}"


def block_linear_ops(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False
                     ) -> list[Op]:
    """GEMMs of all transformer blocks for one micro-batch. `pad_experts`: each expert's rows
    are padded to a multiple of EXPERT_ROW_GRANULE (the executor on CPU with 16-bit matmuls,
    memory.pads_expert_rows), (granule − 1) / 2 rows more per expert call on average."""
    tokens = setup.tokens_per_micro_batch
    mult = 2 if setup.checkpointing and setup.method != "inference" else 1
    trainable = setup.method == "full"
    adapted = setup.lora_targets if setup.trains_adapters else ()  # linears with adapters
    ops: list[Op] = []
    moe = model.moe
    for linears, num_layers in layer_groups(model, routed_all=False):
        for lin in linears:
            rows: float = tokens
            if lin.routed and moe is not None:  # one GEMM per expert over its share of tokens
                lin = LinearShape(lin.name, lin.in_features, lin.out_features,
                                  moe.num_experts, lin.bias, True)
                rows = tokens * moe.routed_experts_per_token / moe.num_experts
                rows += padded_expert_rows(model) / moe.num_experts if pad_experts else 0
            ops += linear_ops(lin, num_layers, rows, setup, trainable=trainable, phase_mult=mult)
            if lin.name in adapted:
                ops += lora_ops(lin, num_layers, rows, setup, mult)
    return ops


def attention_core_ops(model: ModelSpec, setup: TrainSetup) -> list[Op]:
    """SDPA forward + backward per attention block, as one op of 3× the forward FLOPs
    (forward 2·b·s²·H·(d_qk + d_v), causal ×½; backward 2× forward). The rate is read at one
    sequence's FLOPs (`rate_flops`): the kernel works on each (sequence, head) apart, so its
    efficiency follows s, not b·s², and the curve is measured at batch 1. smollm2-135m pure
    bf16 in the trainer: 155 ms per step at b2 s256 and 583 ms at b8 (3.8× for 4× the
    sequences), against 123 and 280 ms read at the batch's FLOPs."""
    b, s, heads = setup.batch_size, setup.seq_len, model.num_heads
    if model.mla is not None:
        d_qk = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim
        d_v = model.mla.v_head_dim
    else:
        d_qk = d_v = model.head_dim
    forward = 2 * b * s * s * heads * (d_qk + d_v) / 2
    c = dtype_bytes(setup.compute_dtype)
    io = b * s * heads * (2 * d_qk + 2 * d_v) * c
    calls = model.num_layers * model.attentions_per_layer
    if setup.method == "inference":
        return [Op("attention.forward", "attention", forward, io, calls, forward / b)]
    mult = 2 if setup.checkpointing else 1
    work = forward * (2 + mult)
    return [Op("attention.forward_backward", "attention", work, io * 3, calls, work / b)]


def model_flops_per_token(model: ModelSpec, setup: TrainSetup, active_params: int,
                          embedding_params: int) -> int:
    """Useful FLOPs per token (no recompute): 6·N (full) or 4·N (frozen base: forward +
    input gradient; Transformer Math 101) or 2·N (inference) over non-embedding active
    parameters, plus causal attention 6·s·H·d per layer (3× 2·s·H·d)."""
    n = active_params - embedding_params
    mult = {"full": 6, "lora": 4, "qlora": 4, "inference": 2}[setup.method]
    attn = model.num_layers * model.attentions_per_layer * 2 * setup.seq_len * model.num_heads * (
        model.head_dim) * (mult // 2)
    return round(mult * n + attn)


def matmul_weight_bytes(model: ModelSpec, setup: TrainSetup) -> float:
    """Bytes of all matmul weights of the blocks (every expert) and the lm_head in the compute
    dtype: the set one pass streams through the caches."""
    return dtype_bytes(setup.compute_dtype) * matmul_weight_params(model)


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def matmul_weight_params(model: ModelSpec) -> float:
    """Weights of all matmuls of the blocks (every expert) and the lm_head (count)."""
    params = sum(lin.in_features * lin.out_features * lin.count * num_layers
                 for linears, num_layers in layer_groups(model, routed_all=True)
                 for lin in linears)
    return params + model.vocab_size * model.hidden_size


def cold_gemm_class(op_name: str) -> str:
    """The curve of a GEMM that reads cold operands: `matmul_wgrad` for a weight gradient
    dyᵀ·x and `matmul_cold_dgrad` for an input gradient dy·W (their own layouts, measured
    apart: calibrate/benches.py cold_gemm_cases), else `matmul_cold`; a profile without them
    falls back to `matmul_cold` (efficiency.FALLBACK_CLASS)."""
    if op_name.endswith(".backward_weight"):
        return "matmul_wgrad"
    return "matmul_cold_dgrad" if op_name.endswith(".backward_input") else "matmul_cold"


def hot_gemm_class(op_name: str) -> str:
    """The curve of a GEMM on operands still in cache: `matmul_dgrad` for an input gradient
    dy·W (its own layout: bf16 without native support runs it ~8× slower than the forward,
    calibrate/benches.py gemm_cases), else `matmul` (forward and weight gradient pooled); a
    profile without it falls back to `matmul`."""
    return "matmul_dgrad" if op_name.endswith(".backward_input") else "matmul"


def reads_cold_operands(op_name: str, setup: TrainSetup) -> bool:
    """Whether a GEMM reads operands last touched a whole pass ago (stored weights, saved
    activations) rather than ones written just before it. Forward: the weight is fresh when
    autocast casts an fp32 weight or NF4 is dequantised right before the call; input
    gradient: the autocast copy is saved from the forward (cold) but NF4 is dequantised again
    (fresh); weight gradient: the saved input is always cold. Adapters (`lora` ops) are tiny
    and stay hot."""
    quantized = setup.weight_bits <= 8
    if op_name.endswith(".forward"):
        cast = autocasting(setup) and (setup.method == "full" or setup.weight_bits == 32)
        return not (cast or quantized)
    if op_name.endswith(".backward_input"):
        return not quantized
    return op_name.endswith(".backward_weight")
