"""The ops of a step outside the blocks: the LM head and its loss (chunked cross-entropy, the
head's weight gradient), dequantisation and casts of weights, gradient allocation and the
optimizer step, in FLOPs and bytes per op (flops.Op)."""


from estimator.analytic.flops import FP32_BYTES, Op, linear_ops
from estimator.analytic.micro_batch import fused_loss_chunk_rows
from estimator.analytic.model_state import (
    autocasting,
    casts_fp32_weights,
    trainable_bytes_per_param,
    trainer_upcasts_base,
)
from estimator.analytic.params import LinearShape
from estimator.analytic.precision import dtype_bytes
from estimator.specs import ModelSpec, TrainSetup


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


def weight_transform_calls(model: ModelSpec, setup: TrainSetup) -> tuple[int, int]:
    """(passes, calls) of a transform each block weight goes through before its matmul (NF4/int8
    dequantisation, a bf16 base's upcast): forward, backward and recompute (the forward only
    for inference), one call per block linear (7 per layer) and pass."""
    passes = 1 if setup.method == "inference" else (2 + (1 if setup.checkpointing else 0))
    return passes, 7 * model.num_layers * passes


def dequant_ops(model: ModelSpec, setup: TrainSetup, quantized_params: int) -> list[Op]:
    """NF4/int8 → 16-bit dequantisation of every quantised weight, in forward, backward and
    recompute (bytes = the 16-bit output)."""
    if setup.weight_bits > 8:
        return []
    c = dtype_bytes(setup.compute_dtype)
    passes, calls = weight_transform_calls(model, setup)
    per_call = quantized_params * c * passes / calls
    kind = "dequant.nf4" if setup.weight_bits == 4 else "dequant.int8"
    return [Op("dequantize", kind, 0, per_call, calls)]


def upcast_ops(model: ModelSpec, setup: TrainSetup, block_params: int) -> list[Op]:
    """A bf16 frozen base under fp32 compute (model_state.trainer_upcasts_base): each block
    weight upcast to fp32 before its matmul in forward, backward (the input gradient) and
    recompute (executor/lora.py _UpcastLinear: reads 2 B, writes 4 B per element; calls as
    weight_transform_calls); lm_head's V·D once per micro-batch with the fused loss (it
    upcasts the weight whole in the forward and forms the gradients there), twice without."""
    if not trainer_upcasts_base(setup):
        return []
    passes, calls = weight_transform_calls(model, setup)
    head_calls = 1 if setup.fuses_loss else 2
    return [Op("upcast.base", "elementwise", 0, block_params * 6 * passes / calls, calls),
            Op("upcast.lm_head", "elementwise", 0,
               model.vocab_size * model.hidden_size * 6, head_calls)]


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
    tokens = setup.tokens_per_micro_batch
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
      back (w B); under full logits the one V·D product (c B) and in 16 bits its fp32 cast
      (AccumulateGrad); the embedding's gradient (w B) and with tied embeddings their sum.
      The gradient the optimizer reads (the last of these) is fresh_gradient_op's. (Until
      2026-12-07 the full-logits product was missed: HF Qwen2 360M, tied, fp32, 256 tokens:
      its [151936, 896] product took 1.40 s in the profiled step against 0.92 s for the
      forward GEMM of the same FLOPs.)

    Measured loss-head page faults per step (`ru_minflt`, smollm2-135m, 512 tokens): LoRA
    bf16 50.1 k = 196 MiB, LoRA fp32 25.7 k = 100 MiB, full bf16 105.7 k (docs/accuracy.md
    §4). Fixed call count, bytes affine in the tokens (the planner's form); no aten calls of
    their own (no dispatch)."""
    if setup.method == "inference":
        return []
    tokens, vocab = setup.tokens_per_micro_batch, model.vocab_size
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
        head = [(vd * c, 1.0)] + ([(vd * FP32_BYTES, 1.0)] if half else [])
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
