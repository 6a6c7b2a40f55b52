"""The ops of one training (or prefill) step: FLOPs, bytes and kernel calls per op.

Counting rules (Kaplan et al. 2020 §2.1; Narayanan et al. 2021 appendix; EleutherAI
Transformer Math 101): a linear in→out over T tokens costs 2·T·in·out FLOPs forward; backward
costs as much again for the input gradient and again for the weight gradient — the weight
gradient is skipped for frozen weights (LoRA/QLoRA), so LoRA training is ≈ 2·forward + adapters
instead of 3·forward. Attention core: QKᵀ and PV are 2·s²·d FLOPs per head each (4·b·s²·H·d),
halved by a causal kernel that skips masked blocks; backward = 2·forward. Checkpointing runs
each block's forward twice. MoE: each token visits its routed experts only. Memory-bound ops
(norms, activations, residuals, casts, loss) are counted in bytes read + written.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

from estimator.analytic.activations import padded_expert_rows
from estimator.analytic.micro_batch import fused_loss_chunk_rows
from estimator.analytic.model_state import (
    autocasting,
    casts_fp32_weights,
    trainable_bytes_per_param,
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
    """LoRA A (in→r) and B (r→out): forward, both gradients (Hu et al. 2021)."""
    r = setup.lora_rank
    a = LinearShape(f"{lin.name}.lora_A", lin.in_features, r, lin.count)
    b = LinearShape(f"{lin.name}.lora_B", r, lin.out_features, lin.count)
    return [op for part in (a, b)
            for op in linear_ops(part, num_layers, tokens, setup, trainable=True,
                                 phase_mult=phase_mult, group="lora", op_class="lora")]


def block_linear_ops(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False
                     ) -> list[Op]:
    """GEMMs of all transformer blocks for one micro-batch. `pad_experts`: each expert's rows
    are padded to a multiple of EXPERT_ROW_GRANULE (the executor on CPU with 16-bit matmuls,
    memory.pads_expert_rows), (granule − 1) / 2 rows more per expert call on average."""
    tokens = setup.batch_size * setup.seq_len
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


@dataclass(frozen=True)
class TokenBytes:
    """Memory-bound bytes per token of one block pass (every non-GEMM, non-attention, non-view
    aten call): hidden·h + ffn·i + q·H·d + kv·K·d + rank·r·(adapted linears), in `calls`
    kernel calls. Coefficients in bytes per unit of each dimension (dtypes fixed by the
    regime)."""

    hidden: float
    ffn: float
    q: float
    kv: float
    rank: float
    calls: int

    def per_token(self, model: ModelSpec, width: float, rank_sum: float) -> float:
        """Bytes per token of one block for the model's dimensions (bytes)."""
        return (self.hidden * model.hidden_size + self.ffn * width
                + self.q * model.num_heads * model.head_dim
                + self.kv * model.num_kv_heads * model.head_dim + self.rank * rank_sum)


MEMORY_BOUND_BYTES: dict[tuple[str, str], dict[str, TokenBytes]] = {
    ("lora", "mixed"): {
        "forward": TokenBytes(96.2, 10.1, 18.1, 18.2, 0.2, 63),
        "backward": TokenBytes(216.1, 28.1, 26.1, 20.1, 0.1, 75),
        "recompute": TokenBytes(90.2, 10.1, 18.1, 18.2, 0.2, 62),
    },
    ("qlora", "mixed"): {
        "forward": TokenBytes(96.2, 10.1, 18.1, 18.2, 0.2, 126),
        "backward": TokenBytes(216.1, 28.1, 26.1, 20.1, 0.1, 138),
        "recompute": TokenBytes(90.2, 10.1, 18.1, 18.2, 0.2, 125),
    },
    ("full", "mixed"): {
        "forward": TokenBytes(96.2, 18.1, 22.1, 26.2, 0.0, 52),
        "backward": TokenBytes(262.2, 28.1, 20.1, 20.2, 0.0, 61),
        "recompute": TokenBytes(86.2, 18.1, 22.1, 26.2, 0.0, 51),
    },
    ("full", "fp32"): {
        "forward": TokenBytes(96.2, 36.1, 44.1, 52.2, 0.0, 39),
        "backward": TokenBytes(244.2, 56.1, 40.1, 40.2, 0.0, 48),
        "recompute": TokenBytes(84.2, 36.1, 44.1, 52.2, 0.0, 38),
    },
    ("lora", "fp32"): {
        "forward": TokenBytes(80.2, 20.1, 36.1, 36.2, 0.2, 39),
        "backward": TokenBytes(240.1, 56.1, 52.1, 40.1, 0.1, 53),
    },
    ("full", "pure"): {
        "forward": TokenBytes(104.2, 18.1, 22.1, 26.2, 0.0, 49),
        "backward": TokenBytes(266.2, 28.1, 20.1, 20.2, 0.0, 62),
    },
    ("lora", "pure"): {
        "forward": TokenBytes(96.2, 10.1, 18.1, 18.2, 0.2, 49),
        "backward": TokenBytes(216.1, 28.1, 26.1, 20.1, 0.1, 61),
    },
}
"""Per (method, precision) — method 'full' | 'lora' | 'qlora', precision 'fp32' | 'mixed'
(16-bit autocast over fp32 weights) | 'pure' (16-bit weights) — the bytes per token of a
block's 'forward', 'backward' and checkpoint 'recompute' (the extra backward-phase bytes of a
checkpointed block: the recomputed forward plus the non-reentrant machinery).

Measured (benchmarks/record_block_bytes.py; torch 2.13 CPU, the executor's Llama block, RMSNorm
composition, rope, SDPA, SwiGLU, LoRA on all 7 linears): a TorchDispatchMode sums the bytes
every aten call reads + writes (calibrate.benches.record_op_bytes); per block = the difference
of 2- and 1-block models, per token = the difference of 64- and 32-token micro-batches (so
weight-sized ops — autocast weight casts, NF4 dequantisation, gradient accumulation — drop out:
cast_ops, adapter_cast_ops and dequant_ops charge those); coefficients = least squares over
5–6 shapes varying h, i, H, K and r (residual ≤ 0.1 %). tests/torch/test_block_bytes.py checks
them against a fresh recording on 2 shapes. The recompute of a checkpointed block records as the
forward's bytes less 6–20 B per unit of h (the non-reentrant machinery moves no activation-sized
data of its own); regimes without a recorded recompute use their forward. The adapters' own
in/out-sized bytes are folded into the h, i, H·d, K·d coefficients (recorded with all seven
linears adapted), so fewer targets are slightly over-charged."""


def precision_regime(setup: TrainSetup) -> str:
    """'fp32', 'mixed' (16-bit compute over fp32 weights: autocast) or 'pure' (16-bit
    weights)."""
    if setup.compute_dtype == "fp32":
        return "fp32"
    return "mixed" if setup.mixed_precision else "pure"


def block_token_bytes(setup: TrainSetup) -> dict[str, TokenBytes]:
    """The measured coefficients for the setup; a regime not measured falls back to the
    nearest measured one (QLoRA → LoRA of the same precision; pure ↔ mixed of the same
    method; recompute → the regime's forward plus the mixed recompute extra)."""
    method = "full" if setup.method in ("full", "inference") else setup.method
    precision = precision_regime(setup)
    for key in ((method, precision), ("lora" if method == "qlora" else method, precision),
                (method, "mixed" if precision == "pure" else precision),
                ("full", precision), ("lora", "mixed")):
        if key in MEMORY_BOUND_BYTES:
            table = MEMORY_BOUND_BYTES[key]
            break
    else:  # pragma: no cover - the table always has ('lora', 'mixed')
        raise KeyError((method, precision))
    if "recompute" not in table:
        table = {**table, "recompute": table["forward"]}
    return table


def mlp_width(model: ModelSpec) -> float:
    """Activated MLP width per token (count): the dense intermediate size, or for MoE the
    routed experts' width times experts per token plus the shared experts'."""
    if model.moe is None:
        return model.intermediate_size
    moe = model.moe
    return moe.expert_intermediate_size * moe.routed_experts_per_token + (
        moe.num_shared_experts * (moe.shared_expert_intermediate_size
                                  or moe.expert_intermediate_size))


def block_passes(setup: TrainSetup) -> list[str]:
    """The passes a block's memory-bound work runs in: 'forward'; training adds 'backward' and,
    with checkpointing, the 'recompute' of the forward."""
    if setup.method == "inference":
        return ["forward"]
    return ["forward", "backward", *(["recompute"] if setup.checkpointing else [])]


def elementwise_ops(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False
                    ) -> list[Op]:
    """Memory-bound kernels of the blocks (norms, rope, SwiGLU, residuals, autocast casts of
    activations, LoRA scaling, their gradients): bytes per token per block and pass from
    MEMORY_BOUND_BYTES (measured on the executor), over `calls` kernels per block and pass;
    checkpointing adds the measured recompute pass; MoE routing and padded expert rows in
    moe_routing_ops."""
    tokens = setup.batch_size * setup.seq_len
    table = block_token_bytes(setup)
    rank_sum = 0.0
    if setup.trains_adapters:
        rank_sum = setup.lora_rank * len(set(setup.lora_targets)
                                         & set(ATTENTION_TARGETS + MLP_TARGETS))
    ops = []
    for phase in block_passes(setup):
        coef = table[phase]
        dense = [(model.intermediate_size, model.num_layers - model.num_moe_layers)]
        if model.moe is not None and model.num_moe_layers:
            dense.append((mlp_width(model), model.num_moe_layers))
        for width, num_layers in dense:
            if num_layers <= 0:
                continue
            total = tokens * coef.per_token(model, width, rank_sum) * num_layers
            calls = max(1, coef.calls) * num_layers
            ops.append(Op("elementwise", "elementwise", 0, total / calls, calls))
    return ops + moe_routing_ops(model, setup, pad_experts=pad_experts)


MOE_ROUTING_BYTES: dict[str, tuple[float, float, int]] = {
    "forward": (13.3, 13.9, 48),
    "backward": (42.3, -10.3, 69),
}
"""Routing, gather and scatter of an MoE layer beyond a dense block of the activated width
(router softmax, top-k, argsort, index_select of the routed copies, the weighting multiply,
index_add back, and their gradients): (bytes per token per unit of h·k, per unit of h, extra
calls per layer), k = experts per token. Measured like MEMORY_BOUND_BYTES on the executor's MoE
block (LoRA, bf16 autocast; benchmarks/record_block_bytes.py --moe): the recording minus the
dense coefficients at width k·i_expert, with whole expert groups (padding is its own term),
fitted over 5 shapes (h 64/96, i_expert 32/48, 4/8 experts, k 1/2); extra calls = the fewest
recorded. Residual up to 25 % of this term (≤ 4 % of the block), because which experts a
random router hits changes with the batch. The full fine-tune's recording (7.3·h·k + 0.0·h
forward, 31·h·k + 26·h backward) is within that spread, so one set serves all methods.
Re-recorded 2026-11-28 with `_NormLinears` / `_SwiGLUDown` (the per-h backward term is the
remainder after the dense block's coefficients, which moved; it came out negative)."""


def moe_routing_ops(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False
                    ) -> list[Op]:
    """MoE routing/gather/scatter bytes per MoE layer and pass (MOE_ROUTING_BYTES); the
    recompute of a checkpointed block repeats the forward's. `pad_experts`
    (memory.pads_expert_rows): each expert's group gains (granule − 1) / 2 rows on average,
    each costing what a routed row costs: its share of the expert MLP's memory-bound bytes
    (the block table's ffn coefficient × the expert width) and of the routing (per h·k)."""
    if model.moe is None or not model.num_moe_layers:
        return []
    k = model.moe.routed_experts_per_token
    tokens = setup.batch_size * setup.seq_len
    pad_rows = padded_expert_rows(model) if pad_experts else 0.0
    table = block_token_bytes(setup) if pad_experts else {}
    ops = []
    for phase in block_passes(setup):
        per_hk, per_h, calls = MOE_ROUTING_BYTES["forward" if phase == "recompute" else phase]
        per_token = per_hk * model.hidden_size * k + per_h * model.hidden_size
        per_layer = per_token * tokens
        if pad_rows:
            per_row = (per_hk * model.hidden_size
                       + table[phase].ffn * model.moe.expert_intermediate_size)
            per_layer += pad_rows * per_row
        num_calls = calls * model.num_moe_layers
        ops.append(Op("moe.routing", "elementwise", 0,
                      per_layer * model.num_moe_layers / num_calls, num_calls))
    return ops


def head_ops(model: ModelSpec, setup: TrainSetup) -> list[Op]:
    """lm_head GEMMs and the cross-entropy over b·s·V logits (inference: last token)."""
    tokens = setup.batch_size * (1 if setup.method == "inference" else setup.seq_len)
    head = LinearShape("lm_head", model.hidden_size, model.vocab_size, 1)
    ops = linear_ops(head, 1, tokens, setup, trainable=setup.method == "full", phase_mult=1,
                     group="lm_head")
    return [*ops, *cross_entropy_ops(setup, tokens * model.vocab_size)]


CROSS_ENTROPY_PASSES = {True: (5, 4.0), False: (3, 28.0 / 3)}
"""fp32 passes over the logits and their mean aten bytes per logit, by setup.fused_loss.
Fused chunked loss on fp32 logits (executor/model.py `_softmax_minus_onehot`): amax, sub_,
exp_, sum and mul_ over each chunk, 4 B each (an in-place op counts its tensor once, the unit
of the recorded tables). Full logits (F.cross_entropy): log_softmax 8 B, nll_loss_backward
8 B (its zeroed output and its shape argument), log_softmax_backward 12 B. gather,
scatter_add_, index_put_ and nll_loss touch one logit per row (benches.INDEXED_ARGUMENTS).
Recorded with a TorchDispatchMode on the executor (V = 151,936, 512 tokens): 311.2 MB per fp32
pass."""


def cross_entropy_ops(setup: TrainSetup, logits: float) -> list[Op]:
    """The memory-bound passes of the cross-entropy over `logits` = b·s·V elements
    (CROSS_ENTROPY_PASSES; one call per pass with all chunks' bytes, the planner's affine
    form: a chunk is ≥ 2^25 logits when there are several, beyond the curve's last knot).
    16-bit compute: the fused loss makes one torch.softmax call per chunk on the 16-bit lm_head
    output (reads c, writes c B per logit; `_softmax_minus_onehot`; recorded 311.2 MB at
    V = 151,936, 512 tokens, bf16); the full logits add the upcast of the lm_head output and the
    downcast of the gradient, (c + 4) B per logit each (the same two casts the fused loss made
    before round 6, recorded there: 933.5 MB for both)."""
    c = dtype_bytes(setup.compute_dtype)
    if setup.fuses_loss and c != FP32_BYTES:
        return [Op("cross_entropy", "elementwise", 0, logits * 2 * c, 1)]
    passes, per_logit = CROSS_ENTROPY_PASSES[setup.fuses_loss]
    ops = [Op("cross_entropy", "elementwise", 0, logits * per_logit, passes)]
    if c != FP32_BYTES:
        ops.append(Op("cross_entropy.casts", "elementwise", 0, logits * (c + FP32_BYTES), 2))
    return ops


def dequant_ops(model: ModelSpec, setup: TrainSetup, quantized_params: int) -> list[Op]:
    """NF4/int8 → 16-bit dequantisation of every quantised weight, in forward, backward and
    recompute (bytes = the 16-bit output)."""
    if setup.weight_bits > 8:
        return []
    c = dtype_bytes(setup.compute_dtype)
    passes = 1 if setup.method == "inference" else (2 + (1 if setup.checkpointing else 0))
    calls = 7 * model.num_layers * passes
    per_call = quantized_params * c * passes / calls
    kind = "dequant.nf4" if setup.weight_bits == 4 else "dequant.int8"
    return [Op("dequantize", kind, 0, per_call, calls)]


def cast_ops(setup: TrainSetup, cast_params: int, trainable: bool) -> list[Op]:
    """Autocast's dtype casts of fp32 weights: every forward (and recompute) reads 4 B and
    writes 2 B per matmul weight; a trained weight's 16-bit gradient is cast back to fp32
    (read 2, write 4). Measured as a visible share of CPU bf16 step time (docs/calibration.md)."""
    if cast_params == 0:
        return []
    passes = 2 if setup.checkpointing else 1
    ops = [Op("autocast.weight_cast", "elementwise", 0, cast_params * 6, passes)]
    if trainable:
        ops.append(Op("autocast.grad_cast", "elementwise", 0, cast_params * 6, 1))
    return ops


def adapter_cast_ops(setup: TrainSetup, adapter_params: int, num_tensors: int) -> list[Op]:
    """Under autocast the fp32 LoRA A and B weights are cast to 16 bits at every call and their
    16-bit gradients cast back: two small casts per adapter tensor and micro-batch (per-call
    overhead dominates; counted by the profiler as aten::_to_copy)."""
    if adapter_params == 0 or num_tensors == 0:
        return []
    passes = 3 if setup.checkpointing else 2
    return [Op("autocast.adapter_cast", "elementwise", 0, adapter_params * 6 / num_tensors,
               num_tensors * passes)]


MMAP_THRESHOLD_MAX_BYTES = 32 * 1024**2
"""glibc's ceiling on its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): a
larger allocation is always mapped afresh and returned on free, so each of its pages faults on
its first write."""


def lm_head_grad_ops(model: ModelSpec, setup: TrainSetup) -> list[Op]:
    """Memory-bound work of a full fine-tune's lm_head and embedding gradients beyond their
    GEMMs (aten bytes, as recorded; w = the trainable dtype's bytes, c = the compute dtype's):

    - fused loss in 16 bits (executor/model.py `_LinearCrossEntropy`): each chunk after the
      first adds its 16-bit V·D product into the fp32 sum (4 + c B per element, in row blocks,
      tokens/C − 1 times, fractional: the planner's affine form); without autocast the first
      product is upcast and the sum cast back to w bytes (6 B each; under autocast the upcast is
      autocast.grad_cast's lm_head share and no cast back is needed);
    - the embedding's gradient (embedding_dense_backward: b·s·D incoming gradient read, V·D
      written, w B each) and, with tied embeddings, autograd's sum of the two (3·V·D·w).

    Recorded at V = 151,936, D = 256, 512 tokens, full bf16 mixed (C = 220, 3 chunks): adds
    2 × 233 MB, embedding_dense_backward 156 MB, tied sum 467 MB."""
    if setup.method != "full":
        return []
    vd, w = model.vocab_size * model.hidden_size, trainable_bytes_per_param(setup)
    tokens = setup.batch_size * setup.seq_len
    c = dtype_bytes(setup.compute_dtype)
    ops = []
    if setup.fuses_loss and c != FP32_BYTES:
        later_chunks = tokens / fused_loss_chunk_rows(model, setup) - 1
        ops.append(Op("lm_head.grad_accumulate", "elementwise", 0,
                      later_chunks * (FP32_BYTES + c) * vd, 1))
        if not autocasting(setup):
            ops.append(Op("lm_head.grad_casts", "elementwise", 0, (c + FP32_BYTES) * vd, 2))
    ops.append(Op("embedding.grad", "elementwise", 0, (tokens * model.hidden_size + vd) * w, 1))
    if model.tied_embeddings:
        ops.append(Op("embedding.tied_sum", "elementwise", 0, 3 * vd * w, 1))
    return ops


def loss_head_fresh_ops(model: ModelSpec, setup: TrainSetup) -> list[Op]:
    """First touch of the loss head's and the embedding gradient's buffers above glibc's mmap
    ceiling (CPU): a buffer over 32 MiB is mapped afresh at every allocation and each of its
    pages faults on its first write. The ops that write them are timed on reused memory (the
    GEMM curves; the elementwise curve, whose probe keeps every buffer under the ceiling:
    calibrate/block_rates.py), so the faults are charged here, on the `alloc` curve (above
    the ceiling its time is the faults: touching one cache line per page runs at the same
    4.6 GB/s as empty + fill_; the page the kernel zeroes is then in cache).

    Buffers (c = compute, w = trainable bytes; per chunk of C = max(64, 2^25 // V) rows):
    - fused loss: the [C, V] logits (c B each), in 16 bits also their softmax (c B), and once
      the 16-bit copy of an fp32 lm_head weight;
    - full logits (F.cross_entropy): the [b·s, V] logits, log_softmax's output, the zeroed
      gradient of nll_loss and log_softmax's gradient (4 B each), in 16 bits the two casts;
    - a full fine-tune's lm_head gradient: each chunk's V·D product (c B; fp32 accumulates
      into the first one in place), in 16 bits the fp32 sum and without autocast its cast
      back (w B); the embedding's gradient (w B) and with tied embeddings their sum. The
      gradient the optimizer reads (the last of these) is fresh_gradient_op's.

    Measured loss-head page faults per step (`ru_minflt`, smollm2-135m, 512 tokens): LoRA
    bf16 50.1 k = 196 MiB, LoRA fp32 25.7 k = 100 MiB, full bf16 105.7 k (docs/accuracy.md
    §4). Fixed call count, bytes affine in the tokens (the planner's form); no aten calls of
    their own (no dispatch)."""
    if setup.method == "inference":
        return []
    tokens, vocab = setup.batch_size * setup.seq_len, model.vocab_size
    c, w = dtype_bytes(setup.compute_dtype), trainable_bytes_per_param(setup)
    half, vd = c != FP32_BYTES, vocab * model.hidden_size
    casts = [FP32_BYTES, c] if half else []
    head = []  # the lm_head gradient's buffers, in the order they are made
    if setup.fuses_loss:
        rows = fused_loss_chunk_rows(model, setup)
        chunks = tokens / rows
        buffers = [(rows * vocab * c, chunks)] * (2 if half else 1)
        if casts_fp32_weights(setup):
            buffers.append((vd * c, 1.0))  # the 16-bit copy of the fp32 lm_head weight
        head = [(vd * c, chunks if half else 1.0)]
        if half:
            head.append((vd * FP32_BYTES, 1.0))
            if not autocasting(setup):
                head.append((vd * w, 1.0))
    else:
        buffers = [(tokens * vocab * b, 1.0) for b in [c, *casts, *[FP32_BYTES] * 3]]
    if setup.method == "full":
        embedding = [(vd * w, 1.0)]
        if model.tied_embeddings:
            buffers += head + embedding  # their sum is the gradient
        else:
            buffers += head[:-1]  # the last one and the embedding's are the gradients
    fresh = [(size, count) for size, count in buffers if size > MMAP_THRESHOLD_MAX_BYTES]
    if not fresh:
        return []
    total = sum(size * count for size, count in fresh)
    return [Op("loss_head.fresh_pages", "alloc", 0, total / len(fresh), len(fresh))]


def gradient_alloc_ops(setup: TrainSetup, gradient_bytes: int, num_tensors: int) -> list[Op]:
    """Gradients are freed every step (zero_grad(set_to_none=True)) and allocated afresh: the
    first write of a fresh tensor page-faults (`alloc` op class: calibrate/benches.py). With
    accumulation every micro-batch's backward allocates its gradients (autograd's
    AccumulateGrad keeps the first and adds each later one into it, then frees it), and each
    later micro-batch adds them: read both, write one (3 × the gradient bytes, elementwise).
    The add has a call of 0 count at grad_accum 1, so the op list is the same for every
    accumulation (the planner's affine form)."""
    if gradient_bytes == 0:
        return []
    per_tensor = gradient_bytes / num_tensors
    return [Op("gradients.alloc", "alloc", 0, per_tensor, num_tensors * setup.grad_accum),
            Op("gradients.accumulate", "elementwise", 0, 3 * per_tensor,
               num_tensors * (setup.grad_accum - 1))]


def fresh_gradient_op(op: Op, setup: TrainSetup) -> Op:
    """`gradients.alloc` on a CPU under the bundled trainer: one fresh region of all gradient
    bytes per micro-batch, instead of one heap allocation per tensor. zero_grad frees the
    gradients, the loss-head trim of the next micro-batch returns their heap pages to the OS
    (executor/train.py `_release_before_loss_head`), and the backward faults them in again,
    at the `alloc` curve's rate for its size (the fresh-page rate above glibc's 32 MiB mmap
    ceiling). Measured: the backward of smollm2-135m full bf16 (432 MiB of non-embedding
    fp32 gradients) takes 87 k page faults = 340 MiB per step (`ru_minflt`, docs/accuracy.md
    §4). Bytes per call constant, calls = grad_accum (the planner's affine form)."""
    return Op(op.name, op.op_class, 0, op.bytes_moved / setup.grad_accum, setup.grad_accum)


def optimizer_bytes_per_param(setup: TrainSetup) -> float:
    """Bytes an optimizer step reads + writes per trainable parameter. AdamW: read p, g, m, v,
    write p, m, v = 7 tensors (28 B in fp32, 14 B pure bf16); 8-bit AdamW: p, g, p' in the
    trainable dtype + m, v read and written at 1 B; Lion 5 tensors; SGD 3; momentum 5."""
    t = FP32_BYTES if setup.mixed_precision else dtype_bytes(setup.compute_dtype)
    return {"adamw": 7 * t, "adamw8bit": 3 * t + 4, "lion": 5 * t, "sgd": 3 * t,
            "sgd_momentum": 5 * t, "adafactor": 4 * t}[setup.optimizer]


def optimizer_ops(setup: TrainSetup, trainable: int, num_tensors: int) -> list[Op]:
    """One optimizer step over the trainable parameters (memory-bound)."""
    if trainable == 0:
        return []
    total = trainable * optimizer_bytes_per_param(setup)
    return [Op("optimizer.step", optimizer_class(setup), 0, total / num_tensors, num_tensors)]


def optimizer_class(setup: TrainSetup) -> str:
    """Curve of the optimizer step: 'optimizer' (torch's fused AdamW and the other torch
    optimizers), 'optimizer.adamw8bit' for our 8-bit AdamW, a per-tensor PyTorch loop measured
    3× slower per step than fused AdamW (benchmarks/planner_choice.py, docs/planning.md)."""
    return "optimizer.adamw8bit" if setup.optimizer == "adamw8bit" else "optimizer"


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


# ----------------------------------------------------------------------------- cold GEMMs

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
    dyᵀ·x (its own layout, measured apart: calibrate/benches.py cold_gemm_cases), else
    `matmul_cold`; a profile without `matmul_wgrad` falls back to `matmul_cold`."""
    return "matmul_wgrad" if op_name.endswith(".backward_weight") else "matmul_cold"


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


# ----------------------------------------------------------------------------- dispatch

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DispatchCounts:
    """Framework ops (aten calls seen by a TorchDispatchMode) of one decoder block and of the
    rest of one micro-batch, per pass. Measured on the executor (tiny Llama, 2 × 32 tokens,
    torch 2.13 CPU): counts of blocks = 1 and 2 differ by the per-layer numbers below, exactly,
    for full / LoRA / QLoRA × fp32 / bf16 autocast × checkpointing × 2 or 7 adapter targets."""

    layer_forward: int = 76
    """fp32 block forward: linears, RMSNorm composition, rope, SDPA, SwiGLU, residuals."""
    layer_forward_16bit: int = 10
    """Extra casts of a 16-bit block forward (norm and rope upcasts, SDPA inputs)."""
    layer_forward_weight_cast: int = 3
    """Extra autocast casts of trained fp32 weights (full fine-tune under autocast)."""
    layer_backward_trained: tuple[int, int] = (111, 124)
    """Block backward with every weight trained (fp32, 16-bit)."""
    layer_backward_frozen: tuple[int, int] = (81, 89)
    """Block backward with a frozen base (input gradients only; fp32, 16-bit)."""
    adapter: tuple[tuple[int, int], tuple[int, int]] = ((5, 16), (7, 18))
    """(forward, backward) per LoRA-adapted linear (fp32, 16-bit autocast)."""
    nf4: tuple[tuple[int, int], tuple[int, int]] = ((24, 18), (25, 19))
    """(forward, backward) dequantisation ops per NF4 linear (fp32, 16-bit compute)."""
    recompute_trained: int = 21
    """Checkpointing bookkeeping per block beyond the recomputed forward (full fine-tune)."""
    recompute_frozen: tuple[int, int] = (12, 8)
    """… with a frozen base: constant + per adapted linear."""
    router: tuple[int, int] = (9, 3)
    """(forward, backward) of an MoE router: gate, softmax, top-k, sort, split, index_add."""
    expert: tuple[int, int] = (11, 31)
    """(forward, backward) per expert that receives tokens."""
    expert_adapter: tuple[int, int] = (7, 13)
    """(forward, backward) per adapted linear of an expert that receives tokens."""
    rest_forward: tuple[int, int] = (63, 68)
    """Embedding, final norm, fused lm_head + loss (one chunk) per micro-batch (fp32, 16-bit)."""
    rest_backward: tuple[int, int, int] = (18, -30, -75)
    """Rest of the backward per micro-batch for full / LoRA / QLoRA: negative for a frozen base,
    whose first block computes no input gradient (fewer ops than the per-layer count)."""
    optimizer_per_tensor: int = 9
    """Per-tensor (for-loop) optimizers (8-bit AdamW …): ops per trainable tensor."""
    optimizer_fixed: int = 13
    """Step-count bookkeeping (4) + foreach gradient-norm clipping (9)."""
    fused_adamw: int = 9
    """AdamW as torch's fused kernel (the executor's on CPU): all its ops, clipping included,
    independent of the number of tensors."""


DISPATCH = DispatchCounts()
"""Measured counts (tests/torch/test_dispatch_count.py checks the formula against a
TorchDispatchMode count of the executor; benchmark: estimator/calibrate, `dispatch.autograd`)."""


def _expected_experts_hit(num_experts: int, experts_per_token: float, tokens: float) -> float:
    """Experts that receive at least one of `tokens` tokens under uniform routing (count)."""
    miss = max(0.0, 1 - experts_per_token / num_experts) ** tokens
    return num_experts * (1 - miss)


def dispatch_op_count(model: ModelSpec, setup: TrainSetup, num_trainable_tensors: int) -> float:
    """Framework ops (aten calls: forward, backward, optimizer) of one optimizer step.

    per micro-batch = Σ_layers (forward · (1 + ckpt) + backward + ckpt bookkeeping) + rest;
    per step = grad_accum · micro-batch + 9 (fused AdamW), or + 9 · trainable tensors + 13
    (per-tensor optimizers). Source: measured (DispatchCounts). Assumes the executor's eager
    path: fused AdamW, fused loss in one
    chunk, uniform MoE routing; 8-bit AdamW, Lion, compiled blocks are not measured."""
    d = DISPATCH
    half = setup.compute_dtype != "fp32"
    frozen = setup.method != "full"
    targets = set(setup.lora_targets) if setup.trains_adapters else set()
    n_attn = len(targets & set(ATTENTION_TARGETS)) * model.attentions_per_layer
    n_mlp = len(targets & set(MLP_TARGETS))
    nf4 = setup.weight_bits == 4
    ad_f, ad_b = d.adapter[half]
    q_f, q_b = d.nf4[half] if nf4 else (0, 0)
    fwd = (d.layer_forward + (d.layer_forward_16bit if half else 0)
           + (d.layer_forward_weight_cast if half and setup.mixed_precision and not frozen else 0))
    bwd = (d.layer_backward_frozen if frozen else d.layer_backward_trained)[half]
    f_dense = fwd + (n_attn + n_mlp) * (ad_f + q_f)
    b_dense = bwd + (n_attn + n_mlp) * (ad_b + q_b)
    layers = [(f_dense, b_dense, n_attn + n_mlp, model.num_layers - model.num_moe_layers)]
    if model.moe is not None and model.num_moe_layers:
        moe = model.moe
        hit = _expected_experts_hit(moe.num_experts, moe.routed_experts_per_token,
                                    setup.batch_size * setup.seq_len) + moe.num_shared_experts
        e_f = d.expert[0] + n_mlp * (d.expert_adapter[0] + q_f)
        e_b = d.expert[1] + n_mlp * (d.expert_adapter[1] + q_b)
        f_moe = f_dense + d.router[0] - n_mlp * (ad_f + q_f) + hit * e_f
        b_moe = b_dense + d.router[1] - n_mlp * (ad_b + q_b) + hit * e_b
        layers.append((f_moe, b_moe, n_attn + n_mlp * hit, model.num_moe_layers))
    if setup.method == "inference":
        return d.rest_forward[half] + model.num_layers * f_dense
    rest_b = d.rest_backward[("full", "lora", "qlora").index(setup.method)]
    micro = d.rest_forward[half] + rest_b
    for f, b, adapted, num in layers:
        recompute = 0.0
        if setup.checkpointing:
            recompute = f + (d.recompute_frozen[0] + d.recompute_frozen[1] * adapted if frozen
                             else d.recompute_trained)
        micro += num * (f + b + recompute)
    if setup.optimizer == "adamw":
        return setup.grad_accum * micro + d.fused_adamw
    return (setup.grad_accum * micro + d.optimizer_per_tensor * num_trainable_tensors
            + d.optimizer_fixed)


def dispatch_ops(model: ModelSpec, setup: TrainSetup, num_trainable_tensors: int,
                 num_timed_calls: float) -> list[Op]:
    """Per-op framework cost (Python → dispatcher → autograd node → kernel launch) of the ops
    of a step, charged to the `dispatch.autograd` curve (one tiny autograd op, forward +
    backward, per aten call). The `num_timed_calls` ops that other curves already time (their
    overhead includes a dispatch) are subtracted. ~10.4 k ops per step for SmolLM2-135M LoRA."""
    count = dispatch_op_count(model, setup, num_trainable_tensors) - num_timed_calls
    return [Op("framework.dispatch", "dispatch.autograd", 0, 0, max(0.0, count))]
