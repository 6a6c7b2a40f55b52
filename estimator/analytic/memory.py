"""Peak memory on one device, one named term per function.

Peak = static terms (weights, master weights, optimizer states, runtime overhead)
     + max(forward/backward phase, optimizer-step phase), where
  forward/backward = activations + logits/loss buffers + transient dequantised weight
                     + autocast's 16-bit copies of fp32 weights (saved for backward, freed
                     by it) (+ gradients when accumulating over micro-batches, since they
                     persist),
  optimizer step   = gradients + the optimizer's transient buffers.
Gradients are freed (`zero_grad(set_to_none=True)`) between steps and, with one micro-batch,
appear during backward while activations are freed, so they overlap little with the activation
peak (the first term to check against a measurement when the two disagree).
"""

import functools
import math
from collections.abc import Collection

from estimator.analytic.activations import EXPERT_ROW_GRANULE, activation_bytes
from estimator.analytic.frameworks import OWN_TERMS, as_run, hf, terms
from estimator.analytic.params import layer_groups, lora_params
from estimator.analytic.precision import dtype_bytes, int8_bytes, nf4_bytes
from estimator.analytic.uncertainty import band_fractions, lower_bytes, upper_bytes
from estimator.specs import Device, MemoryBreakdown, ModelSpec, ParamCounts, TrainSetup
from estimator.units import GIB

FP32_BYTES = 4
ADAM8BIT_BLOCK = 256
"""bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values (Dettmers et al. 2022,
8-bit Optimizers via Block-wise Quantization)."""

RUNTIME_OVERHEAD_BYTES = {
    "cpu": 248 * 1024**2,
    "cuda": 650 * 1000**2,
    "rocm": 650 * 1000**2,
    "xpu": 650 * 1000**2,
    "mps": 0,
    "xla": 0,
    "hpu": 0,
    "neuron": 0,
}
"""Memory the framework itself holds before any tensor. cpu: resident set of a Python process
after `import torch` + the executor's imports (measured: benchmarks/bench_runtime_rss.py, torch
2.13 CPU, x86-64). cuda/rocm/xpu: context + kernels, 650 MB as gpu_poor uses (anchors.md §3;
vram.asmirnov.xyz measures 300 MiB–2 GiB); not visible to torch's allocator counters. mps/xla/
hpu/neuron: unknown, 0 (stated in the assumptions)."""

TRAINING_DATA_BYTES = 4 * 1024**2 * 4
"""The bundled trainer holds its whole tokenised corpus in host memory: the default corpus is
4 MiB of source text (executor/data.py DEFAULT_CORPUS_MAX_BYTES), one id per byte with the
byte-level tokenizer (fewer with a model's BPE tokenizer), stored as int32: 16 MiB."""

MODEL_BUILD_RESIDUE_BYTES = 70 * 1024**2
"""Host memory that building the model leaves resident beyond the model's tensors: the code
pages of the kernels it ran, the OpenMP worker threads and their malloc arenas (≈ 24 MiB of
live non-tensor allocations; the trainer trims the freed heap after the build). measured:
benchmarks/memory_table.py, the `runtime` row (memory after the build − weights) is
333–340 MiB in ten runs of three models (45 to 513 MiB of weights; full/LoRA/QLoRA;
fp32/bf16): 334 − 248 − 16 = 70 MiB."""

KERNEL_CACHE_BYTES = 40 * 1024**2
"""Host memory the first training step leaves resident for good beyond the optimizer states:
oneDNN's primitive cache (one JIT-compiled matmul kernel per shape × pass, up to 1024 kept) and
the code pages of the backward and optimizer kernels. measured (VmRSS after the step with the
heap trimmed, minus weights + optimizer states): 26 MiB (8-layer fp32 full fine-tune),
49 MiB (smollm2-135m bf16 LoRA); benchmarks/memory_table.py."""

EXPERT_PRIMITIVE_BYTES = 384 * 1024
PRIMITIVES_PER_ADAPTED_SHAPE = 8
PRIMITIVE_CACHE_CAPACITY = 1024
"""Primitives of adapted experts' GEMMs: per padded row count and distinct (in, out) expert
linear shape, 8 GEMMs (base forward and input gradient, LoRA A and B forward, their input
gradients and weight gradients), each a cached oneDNN primitive of ~0.37 MiB; oneDNN keeps at
most 1024 (ONEDNN_PRIMITIVE_CACHE_CAPACITY's default). measured: validate's tiny-moe LoRA bf16
(b·s = 512, granule 32) created 270 primitives in 6 steps (ONEDNN_VERBOSE=all, create:cache_miss
lines), 16 per row count for every one of the 16 row counts 32…512; its peak was 779 MiB with
the default cache and 679 MiB with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 (100 MiB / 270)."""
PRIMITIVES_PER_SHAPE = (2, 3)
"""Primitives per row count and unadapted expert shape: forward and input gradient of frozen
experts, + the weight gradient of trained ones. measured: validate's tiny-moe full bf16 (b·s =
512, 2 expert shapes), with groups then cut into 32·k + r rows, created 297 primitives in 12
steps (ONEDNN_VERBOSE=all): 6 for each of its 47 row counts, + 15 of dense GEMMs."""

ALLOCATOR_RETENTION_BYTES = 35 * 1024**2
GRADIENT_RETENTION_FRACTION = 0.3
"""glibc keeps what a step frees resident in its heap (every tensor under the dynamic mmap
threshold, up to 32 MiB, is served from the heap), and tensors allocated after others were
freed do not all fit into the holes: the resident peak of a step exceeds its live-tensor peak.
Two parts: a constant for the forward's temporaries (35 MiB), and a share of the gradients
allocated during backward that lands in fresh heap instead of the freed activations' memory
(0.3 of the gradient bytes). The trainer trims the heap once per micro-batch, before the loss
head (executor/train.py `_release_before_loss_head`), so what earlier steps freed does not
accumulate. measured, not derived (a property of the
allocator): peak − baseline − optimizer states − the predicted activations, logits and weight
copies − KERNEL_CACHE_BYTES is 28–42 MiB (LoRA, 5–19 MiB of gradients), 66 MiB (fp32 full,
106 MiB of gradients) and 187 MiB (bf16 full, 513 MiB of gradients); benchmarks/
memory_table.py. The share is fitted on two full fine-tunes on one machine: for multi-GiB
gradients it is an extrapolation (tensors over glibc's 32 MiB mmap ceiling bypass the heap)."""


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def quantized_linear_params(model: ModelSpec) -> tuple[int, int]:
    """(weights, output rows) of the block linears a 4/8-bit base quantises (attention,
    FFN, experts); embeddings, norms, router and lm_head stay 16-bit (QLoRA, bitsandbytes'
    default skip of lm_head)."""
    num_weights = num_rows = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        for lin in linears:
            num_weights += lin.in_features * lin.out_features * lin.count * num_layers
            num_rows += lin.out_features * lin.count * num_layers
    return round(num_weights), round(num_rows)


def weight_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> dict[str, int]:
    """Base weights in their storage format, and the 16-bit copies autocast makes.

    full + mixed: the fp32 weights are the master copy (master_weights); autocast's bf16 casts
    of every linear weight are saved for backward and freed by it (2 B/param in the
    forward/backward phase only: model_state_terms' 'autocast_copies').
    4-bit: NF4 codes + block scales (nf4_bytes); 8-bit: int8 + fp32 row scales; the
    remaining tensors at 16 bits. Adapter weights are counted in adapter_bytes."""
    c = dtype_bytes(setup.compute_dtype)
    base = params.total
    copies = autocast_copy_params(model, setup, params) * c
    if setup.method == "full":
        stored = 0 if setup.mixed_precision else base * c
        return {"weights": stored + copies, "quant_scales": 0}
    if setup.weight_bits >= 16:
        storage = FP32_BYTES if setup.weight_bits == 32 else 2
        return {"weights": base * storage + copies, "quant_scales": 0}
    quantized, rows = quantized_linear_params(model)
    if setup.framework in OWN_TERMS:  # which linears the framework quantises
        quantized, rows = terms(setup.framework).quantized_linear_params(model)
    rest = (base - quantized) * (hf.unquantized_param_bytes(setup) if setup.framework == "hf"
                                 else 2)
    if setup.weight_bits == 4:
        parts = nf4_bytes(quantized, double_quant=setup.double_quant)
    else:
        parts = int8_bytes(quantized, rows)
    return {"weights": parts["codes"] + rest, "quant_scales": parts["scales"]}


def autocasting(setup: TrainSetup) -> bool:
    """True when fp32 weights are cast to 16 bits per op (torch.autocast mixed precision)."""
    return setup.mixed_precision and setup.compute_dtype != "fp32"


def casts_fp32_weights(setup: TrainSetup) -> bool:
    """True when autocast casts stored fp32 matmul weights to 16 bits every pass: a full
    fine-tune's fp32 master weights, or a 32-bit frozen base (16-bit storage is not cast)."""
    return autocasting(setup) and (setup.method == "full" or setup.weight_bits == 32)


def block_linear_params(model: ModelSpec, params: ParamCounts) -> int:
    """Weights of the matmuls inside the transformer blocks (all but embeddings, lm_head and
    norms)."""
    return params.total - params.embedding - params.lm_head - params.components["norms"]


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def largest_layer_params(model: ModelSpec) -> int:
    """Linear weights of the largest block (count)."""
    return round(max(sum(lin.num_params * lin.count for lin in linears)
                     for linears, _ in layer_groups(model, routed_all=True)))


def autocast_copy_params(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """fp32 matmul weights whose 16-bit autocast casts are alive at the start of backward:
    each linear saves its cast weight for the input gradient (torch.autocast caches the casts of
    leaf weights). With checkpointing only the recomputing block's casts are alive; lm_head's
    only with full logits (the fused loss casts it transiently). 0 unless the weights are fp32
    under autocast (a mixed-precision full fine-tune or a 32-bit LoRA base) — or, for a
    k-bit base prepared for HF training (hf.kbit_prepared), lm_head's fp32 weight alone."""
    fp32_weights = setup.method == "full" or setup.weight_bits == 32
    if setup.framework == "hf" and hf.kbit_prepared(setup) and autocasting(setup):
        return model.vocab_size * model.hidden_size
    if not (autocasting(setup) and fp32_weights):
        return 0
    blocks = largest_layer_params(model) if setup.checkpointing else (
        block_linear_params(model, params))
    if setup.framework == "hf":  # grouped_mm experts run in the weights' dtype (no autocast)
        blocks -= routed_expert_params(model) // (model.num_layers if setup.checkpointing
                                                  else 1)
    lm_head = 0 if setup.fuses_loss else model.vocab_size * model.hidden_size
    if setup.framework in OWN_TERMS:  # lm_head's casts per logit chunk
        lm_head = terms(setup.framework).lm_head_cast_params(model, setup)
    return blocks + lm_head


def trainable_bytes_per_param(setup: TrainSetup) -> int:
    """Bytes of a trainable parameter, its gradient and Adam states: fp32 under mixed precision
    or fp32 training, else the 16-bit compute dtype (pure bf16 as model.to(bfloat16)). PEFT
    keeps LoRA adapters in fp32 on any base (`autocast_adapter_dtype=True`, peft 0.21)."""
    if setup.framework == "hf" and setup.trains_adapters:
        return FP32_BYTES
    return FP32_BYTES if setup.mixed_precision else dtype_bytes(setup.compute_dtype)


def master_weight_bytes(setup: TrainSetup, params: ParamCounts) -> int:
    """fp32 master weights of a mixed-precision full fine-tune: 4 B/param (ZeRO paper §3,
    Rajbhandari et al. 2020: '4 bytes fp32 parameters')."""
    if setup.method == "full" and setup.mixed_precision:
        return params.total * FP32_BYTES
    return 0


def adapter_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """LoRA A and B weights in the trainable dtype, plus the c-byte weight copies their matmuls
    save for backward: under autocast the cast of every adapter weight; in pure 16-bit a
    contiguous copy of each Bᵀ (r × out: torch's mm keeps a skinny transposed operand
    contiguous; measured in tests/torch/test_activation_parity.py). Checkpointing recomputes
    them instead."""
    if not setup.trains_adapters:
        return 0
    copies = 0
    if setup.framework == "hf" and not autocasting(setup):
        pass  # fp32 adapters used as they are (hf.lora_input_bytes casts the input instead)
    elif setup.framework in OWN_TERMS:
        copies = terms(setup.framework).adapter_copy_bytes(model, setup, params)
    elif not setup.checkpointing:
        copied = params.trainable if autocasting(setup) else lora_params(model, setup,
                                                                          b_only=True)
        copies = copied * dtype_bytes(setup.compute_dtype)
    return params.trainable * trainable_bytes_per_param(setup) + copies


def gradient_bytes(setup: TrainSetup, params: ParamCounts) -> int:
    """One gradient per trainable parameter, in the trainable dtype (fp32 under mixed precision:
    the '4' of 16 B/param; 2 B in pure bf16)."""
    return params.trainable * trainable_bytes_per_param(setup)


def backward_step_gradient_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts
                                 ) -> int:
    """Gradients alive at once when the optimizer steps in backward (optimizer_in_backward):
    the largest trainable tensor's. Each gradient is applied and freed as soon as backward has
    accumulated it (torch's register_post_accumulate_grad_hook; PyTorch tutorial "How to save
    memory by fusing the optimizer step into the backward pass"; torchtitan's
    optimizer-in-backward), so the gradient term of 4 B/param shrinks to one tensor."""
    return largest_trainable_tensor(model, setup, params) * trainable_bytes_per_param(setup)


def optimizer_state_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """Optimizer states of the trainable parameters.

    AdamW: m and v (2 states); Lion and SGD-momentum: 1; SGD: 0 — each in the trainable dtype
    (torch keeps states in the parameter dtype). AdamW 8-bit: 2 × 1 B + 2 fp32 absmax per
    256-block (bitsandbytes). Adafactor: factored second moment, (rows + cols) fp32 per matrix,
    no first moment (Shazeer & Stern 2018; HF default beta1=None)."""
    n = params.trainable
    state = trainable_bytes_per_param(setup)
    if setup.framework in OWN_TERMS:  # paged bitsandbytes states live in unified memory
        paged = terms(setup.framework).paged_state_bytes(model, setup)
        if paged is not None:
            return paged
    if setup.optimizer == "adamw":
        return 2 * n * state
    if setup.optimizer == "adamw8bit":
        return 2 * n + 2 * FP32_BYTES * -(-n // ADAM8BIT_BLOCK)
    if setup.optimizer in ("lion", "sgd_momentum"):
        return n * state
    if setup.optimizer == "adafactor":
        return adafactor_state_params(model, setup, params) * FP32_BYTES
    return 0


def adafactor_state_params(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """Adafactor's factored statistics: rows + cols per trainable matrix (count)."""
    total = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        for lin in linears:
            if setup.method == "full":
                total += (lin.in_features + lin.out_features) * lin.count * num_layers
            elif lin.name in setup.lora_targets:
                pair = lin.in_features + lin.out_features + 2 * setup.lora_rank
                total += pair * lin.count * num_layers
    if setup.method == "full":
        total += (model.vocab_size + model.hidden_size) * (1 if model.tied_embeddings else 2)
        total += params.components["norms"] + params.components["router"]
    return round(total)


def optimizer_transient_bytes(model: ModelSpec, setup: TrainSetup, device: Device,
                              params: ParamCounts) -> int:
    """Temporaries of the optimizer step. On a CPU the bundled trainer runs torch's fused
    AdamW (one kernel per tensor, no temporaries: measured VmHWM +0 MiB over a 108 MiB tensor,
    against +216 MiB for the default per-tensor loop's two temporaries). On accelerators torch's
    default foreach AdamW (HF Trainer) allocates a full-size sqrt(v) list. 8-bit AdamW
    updates a chunk of ADAMW8BIT_CHUNK_ELEMENTS at a time: ADAMW8BIT_TEMP_BYTES per element of
    the largest chunk. Lion (no executor implementation): two fp32 temporaries of the largest
    tensor. With the step in backward (optimizer_in_backward) each step sees one tensor, so
    the foreach list is the largest tensor's."""
    if params.trainable == 0 or setup.optimizer in ("sgd", "sgd_momentum", "adafactor"):
        return 0
    if setup.framework == "hf":  # fused AdamW (adamw_torch_fused), in-place 8-bit AdamW
        return hf.tied_gradient_bytes(model, setup) * trainable_bytes_per_param(setup)
    if setup.framework in OWN_TERMS:
        return terms(setup.framework).optimizer_transient_bytes(model, setup, device, params)
    if device.backend != "cpu" and setup.optimizer in ("adamw", "lion"):
        if setup.optimizer_in_backward:
            return backward_step_gradient_bytes(model, setup, params)
        return params.trainable * trainable_bytes_per_param(setup)
    if setup.optimizer == "adamw":  # CPU: fused
        return 0
    largest = largest_trainable_tensor(model, setup, params)
    if setup.optimizer == "adamw8bit":
        return ADAMW8BIT_TEMP_BYTES * min(largest, ADAMW8BIT_CHUNK_ELEMENTS)
    return 2 * largest * FP32_BYTES


ADAMW8BIT_CHUNK_ELEMENTS = 2**16
ADAMW8BIT_TEMP_BYTES = 42
"""The executor's 8-bit AdamW (executor/optim.py) dequantises, updates and requantises 2^16
elements at a time; per element of a chunk its fp32 moments, gradient, update and the
quantisation's padded copy, normalised values and int64 code indices: 42 B. measured (VmHWM
over one step of a 8192×512 fp32 tensor, heap trimmed): 2.6 MiB at 2^16 (42 B/element), 36 B
at 2^18–2^20, 112 MiB for the whole 4.2M-element tensor in one piece (validate's 8-bit case
had held 223 MiB more than predicted before the chunking)."""


@functools.lru_cache(maxsize=64)  # a pure function of the frozen model
def largest_block_weight(model: ModelSpec) -> int:
    """Elements of the largest single weight matrix inside the blocks."""
    return max(lin.in_features * lin.out_features
               for linears, _ in layer_groups(model, routed_all=True) for lin in linears)


def largest_trainable_tensor(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """Elements of the largest trainable tensor (embedding/lm_head for full, else a LoRA A/B)."""
    if setup.method == "full":
        return max(params.embedding, params.lm_head, largest_block_weight(model))
    widest = max(model.hidden_size, model.intermediate_size)
    return setup.lora_rank * widest


FUSED_LOSS_CHUNK_ELEMENTS = 2**25
"""Fused loss chunk: 2^25 fp32 logits (128 MiB), at least 64 rows (executor/model.py)."""


def fused_loss_chunk_rows(model: ModelSpec, setup: TrainSetup) -> int:
    """Rows of one fused-loss chunk: max(64, 2^25 // V), at most the b·s rows there are."""
    rows = max(64, FUSED_LOSS_CHUNK_ELEMENTS // model.vocab_size)
    return min(rows, setup.batch_size * setup.seq_len)


def logits_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Logits and cross-entropy buffers at their peak.

    Full logits (`fused_loss=False`), at the start of backward: b·s·V·(c + 12) — the lm_head
    output (c), log_softmax's saved fp32 output (4), its incoming gradient (4) and the fp32
    gradient of the logits (4); fp32 compute has no separate upcast (16 B).
    Fused chunked loss: one chunk's softmax — in fp32 computed in place of the logits, C·V·4
    (measured VmHWM over forward + backward at V = 151,936, C = 220: 127.5 MiB = 1 buffer); in
    16 bits torch.softmax's c-byte output beside the c-byte logits it reads, C·V·2c
    (executor/model.py `_softmax_minus_onehot`) — plus what the forward keeps for backward:
    ∂L/∂h (b·s·h·c) and, when lm_head trains, ∂L/∂W (Hsu et al. 2024, Liger-Kernel). In fp32
    ∂L/∂W is the first chunk's V·h·4 product, beside that chunk's softmax, later chunks
    accumulating in place. In 16 bits the logits are freed once the softmax is formed, so the
    two peaks do not add: max(C·V·2c + V·h·4 when a later chunk sees the fp32 sum, C·V·c +
    V·h·(c + 4): the chunk's gradient, its c-byte product and the fp32 sum it is upcast into or
    added to). Summing both over-predicted smollm2-135m pure bf16 full by 8–9 % (activations
    and transients 769 MiB predicted, 625 measured). Measured at V = 151,936, h = 256,
    b·s = 512: fp32 128.1 MiB frozen head (predicted 128.0); the 16-bit softmax (round 6)
    lowered the benchmark's dense LoRA / QLoRA bf16 peaks by 63 / 54 MiB, C·V·2 B = 62.5 MiB.
    Inference keeps only the last position's fp32 logits: b·V·4."""
    if setup.framework == "hf":
        return hf.logits_bytes(model, setup)
    if setup.framework in OWN_TERMS:
        return terms(setup.framework).logits_bytes(model, setup)
    if setup.method == "inference":
        return setup.batch_size * model.vocab_size * FP32_BYTES
    c = dtype_bytes(setup.compute_dtype)
    tokens = setup.batch_size * setup.seq_len
    if not setup.fuses_loss:
        return tokens * model.vocab_size * (c + 12)
    rows = fused_loss_chunk_rows(model, setup)
    chunk_logits = rows * model.vocab_size
    grad_h = tokens * model.hidden_size * c
    vd = model.vocab_size * model.hidden_size
    if c == FP32_BYTES:
        return chunk_logits * FP32_BYTES + grad_h + (vd * FP32_BYTES if setup.method == "full"
                                                     else 0)
    softmax = chunk_logits * 2 * c
    if setup.method != "full":
        return softmax + grad_h
    several = tokens > rows
    return grad_h + max(softmax + (vd * FP32_BYTES if several else 0),
                        chunk_logits * c + vd * (c + FP32_BYTES))


def loss_residue_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """What the loss head leaves alive while the blocks run their backward (and recompute):
    the bundled trainer's fused loss keeps the whole logits_bytes term (∂L/∂h and ∂L/∂W are
    formed in the forward); full logits (HF) leave only ∂L/∂h, b·s·h·c — the logits and
    their gradients are freed once lm_head's backward has run."""
    if setup.fuses_loss:
        return logits_bytes(model, setup)
    if setup.framework in OWN_TERMS:
        return terms(setup.framework).loss_residue_bytes(model, setup)
    return setup.batch_size * setup.seq_len * model.hidden_size * dtype_bytes(
        setup.compute_dtype)


def loss_phase_terms(model: ModelSpec, setup: TrainSetup, acts: dict[str, int]
                     ) -> dict[str, int]:
    """The larger of the two moments of backward beyond the kept activations: the loss head
    at its peak (logits_bytes), or a checkpointed block recomputing its saved set with the
    loss head's residue (loss_residue_bytes) — as {'logits', 'recompute'} of that moment."""
    recompute = acts["recompute"] + loss_residue_bytes(model, setup)
    logits = logits_bytes(model, setup)
    if acts["recompute"] and recompute > logits:
        return {"logits": loss_residue_bytes(model, setup), "recompute": acts["recompute"]}
    return {"logits": logits, "recompute": 0}


def micro_batch_bytes(model: ModelSpec, setup: TrainSetup, backend: str) -> int:
    """Forward/backward bytes of one micro-batch (the phase terms that grow with it): kept
    activations, the larger loss-head or recompute moment (loss_phase_terms), the dequantised
    weight — what memory_breakdown's forward/backward phase holds besides the model states."""
    setup = as_run(setup)
    acts = activation_bytes(model, setup, pad_experts=pads_expert_rows(model, setup, backend))
    return (acts["layers"] + acts["head"] + sum(loss_phase_terms(model, setup, acts).values())
            + dequant_transient_bytes(model, setup))


def dequant_transient_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """QLoRA/int8: the largest block linear dequantised to the compute dtype, alive while its
    matmul runs (the executor dequantises one weight at a time, forward and backward)."""
    if setup.weight_bits > 8:
        return 0
    if setup.framework in OWN_TERMS:  # LitGPT quantises lm_head too
        return terms(setup.framework).dequant_transient_bytes(model, setup)
    return largest_block_weight(model) * dtype_bytes(setup.compute_dtype)


def kv_cache_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Inference KV cache for batch·seq tokens: 2 (K and V) · layers · kv_heads · head_dim · c,
    or for MLA the compressed latent (kv_lora_rank + rope dim) per token per layer
    (DeepSeek-V2 §2.1.2)."""
    if setup.method != "inference":
        return 0
    c = dtype_bytes(setup.compute_dtype)
    tokens = setup.batch_size * setup.seq_len
    if model.mla is not None:
        per_token = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
    else:
        per_token = 2 * model.num_kv_heads * model.head_dim
    return tokens * per_token * c * model.num_layers * model.attentions_per_layer


def runtime_overhead_bytes(device: Device, setup: TrainSetup | None = None) -> int:
    """Framework/runtime memory for the device's backend (RUNTIME_OVERHEAD_BYTES); on a CPU
    the whole process baseline of the bundled trainer before its first step: imports +
    tokenised corpus (training_data_bytes) + what building the model leaves beyond its tensors
    (MODEL_BUILD_RESIDUE_BYTES) — what a run report's `runtime` row measures."""
    if device.backend != "cpu":
        return RUNTIME_OVERHEAD_BYTES[device.backend]
    if setup is not None and setup.framework == "hf":
        return hf.PROCESS_BYTES
    return (RUNTIME_OVERHEAD_BYTES["cpu"] + training_data_bytes(device, setup)
            + MODEL_BUILD_RESIDUE_BYTES)


def training_data_bytes(device: Device, setup: TrainSetup | None) -> int:
    """The trainer's tokenised corpus, held in host memory (TRAINING_DATA_BYTES); 0 off the
    CPU, where it is not in device memory, and for inference."""
    if device.backend != "cpu" or setup is None or setup.method == "inference":
        return 0
    return TRAINING_DATA_BYTES


def routed_expert_shapes(model: ModelSpec, names: Collection[str] | None = None
                         ) -> set[tuple[int, int]]:
    """(in, out) features of the routed expert linears, of those named `names` when given
    (empty for dense models)."""
    if model.moe is None:
        return set()
    return {(lin.in_features, lin.out_features)
            for linears, _ in layer_groups(model, routed_all=False) for lin in linears
            if lin.routed and (names is None or lin.name in names)}


def adapted_expert_shapes(model: ModelSpec, setup: TrainSetup) -> set[tuple[int, int]]:
    """(in, out) features of the routed expert linears LoRA adapts (empty for dense models and
    methods without adapters)."""
    if not setup.trains_adapters:
        return set()
    return routed_expert_shapes(model, setup.lora_targets)


def pads_expert_rows(model: ModelSpec, setup: TrainSetup, backend: str) -> bool:
    """Whether the executor pads expert token groups to EXPERT_ROW_GRANULE rows: an MoE
    trained on a CPU with 16-bit matmuls (executor/model.py `_reuses_shapes`)."""
    return (model.moe is not None and backend == "cpu" and setup.method != "inference"
            and setup.compute_dtype in ("bf16", "fp16"))


def expert_kernel_cache_bytes(model: ModelSpec, setup: TrainSetup, backend: str) -> int:
    """oneDNN primitives of the padded routed-expert GEMMs (CPU, 16-bit: pads_expert_rows): an
    expert can receive 1 … b·s tokens, so up to ⌈b·s / 32⌉ padded row counts, each with one
    cached primitive of ~0.37 MiB (EXPERT_PRIMITIVE_BYTES) per GEMM of every distinct expert
    linear shape — 8 for an adapted shape (PRIMITIVES_PER_ADAPTED_SHAPE), else 3 when the
    experts train and 2 when frozen (PRIMITIVES_PER_SHAPE) — at most the cache's 1024
    entries. The upper bound is the prediction: with a skewed router every row count appeared
    within 6 steps here; a balanced router visits fewer."""
    if not pads_expert_rows(model, setup, backend):
        return 0
    adapted = adapted_expert_shapes(model, setup)
    plain = routed_expert_shapes(model) - adapted
    per_row_count = (len(adapted) * PRIMITIVES_PER_ADAPTED_SHAPE
                     + len(plain) * PRIMITIVES_PER_SHAPE[setup.method == "full"])
    row_counts = math.ceil(setup.batch_size * setup.seq_len / EXPERT_ROW_GRANULE)
    return min(row_counts * per_row_count, PRIMITIVE_CACHE_CAPACITY) * EXPERT_PRIMITIVE_BYTES


def step_runtime_bytes(setup: TrainSetup, device: Device, gradient_bytes: int) -> dict[str, int]:
    """Host memory of a training step that is no tensor of the model (CPU only; an
    accelerator's allocator statistics do not see it): kernel caches the first step leaves
    resident (KERNEL_CACHE_BYTES) and what the allocator keeps of freed tensors within a step
    (ALLOCATOR_RETENTION_BYTES + GRADIENT_RETENTION_FRACTION × gradient_bytes)."""
    if device.backend != "cpu" or setup.method == "inference":
        return {"kernel_caches": 0, "allocator_retention": 0}
    if setup.framework == "hf":  # its glibc heap: heap_retention_bytes
        return {"kernel_caches": KERNEL_CACHE_BYTES, "allocator_retention": 0}
    retained = ALLOCATOR_RETENTION_BYTES + round(GRADIENT_RETENTION_FRACTION * gradient_bytes)
    return {"kernel_caches": KERNEL_CACHE_BYTES, "allocator_retention": retained}


def heap_retention_bytes(model: ModelSpec, setup: TrainSetup, device: Device) -> int:
    """What glibc's heap keeps resident of memory the training code freed, on a CPU (the
    bundled trainer trims its heap and runs under tcmalloc where it can: 0 there; its
    within-step retention is step_runtime_bytes'). HF: hf.heap_retention_bytes."""
    if device.backend != "cpu" or setup.framework != "hf" or setup.method == "inference":
        return 0
    return hf.heap_retention_bytes(model, setup)


def os_reserve_bytes(device: Device) -> int:
    """Memory a unified-memory device keeps for the OS and other programs: max(2 GiB, 10 %)
    on CPUs (a heuristic: desktop sessions use 1.5–4 GiB), 25 % on Apple GPUs (Metal's default
    recommendedMaxWorkingSetSize is ≈ 75 % of RAM). Discrete devices: 0."""
    if not device.unified_memory:
        return 0
    if device.backend == "mps":
        return device.memory_bytes // 4
    return max(2 * GIB, device.memory_bytes // 10)


# ------------------------------------------------------------------ multi-device sharding


def zero_model_state_bytes(param_bytes: float, grad_bytes: float, state_bytes: float,
                           zero_stage: int, num_devices: int) -> dict[str, float]:
    """Per-device model states under ZeRO (Rajbhandari et al. 2020, §5 and Figure 1): with
    Ψ parameters, K bytes/param of optimizer states and N_d devices, baseline (2+2+K)Ψ;
    P_os (stage 1) 2Ψ + 2Ψ + KΨ/N_d; P_os+g (stage 2) 2Ψ + (2+K)Ψ/N_d; P_os+g+p (stage 3)
    (2+2+K)Ψ/N_d. Takes the three byte totals and returns them per device."""
    n = num_devices
    return {"params": param_bytes / n if zero_stage >= 3 else param_bytes,
            "gradients": grad_bytes / n if zero_stage >= 2 else grad_bytes,
            "optimizer_states": state_bytes / n if zero_stage >= 1 else state_bytes}


ZERO_MIN_STAGE = {"optimizer_states": 1, "master_weights": 1, "optimizer_transient": 1,
                  "gradients": 2, "weights": 3, "quant_scales": 3, "adapter_weights": 3}
"""The ZeRO stage from which each memory term is sharded over the devices (ZeRO paper §5:
stage 1 partitions the optimizer states, which include the fp32 master copy; 2 the gradients;
3 the parameters)."""


@functools.lru_cache(maxsize=64)
def routed_expert_params(model: ModelSpec) -> int:
    """Weights of all routed experts (count): what expert parallelism splits (cached per
    model: the planner asks for every device count and stage)."""
    if model.moe is None:
        return 0
    total = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        total += sum(lin.num_params * lin.count for lin in linears if lin.routed) * num_layers
    return round(total)


def routed_fractions(model: ModelSpec, setup: TrainSetup, params: ParamCounts
                     ) -> tuple[float, float]:
    """(share of the stored weights, share of the trainable parameters) in routed experts.
    LoRA: adapters on routed experts ≈ the routed share of the targeted linears' adapters."""
    if model.moe is None or setup.expert_parallel <= 1:
        return 0.0, 0.0
    weights = routed_expert_params(model) / params.total
    if not setup.trains_adapters:
        return weights, weights if setup.method == "full" else 0.0
    routed = routed_adapter_params(model, setup.lora_rank, setup.lora_targets)
    return weights, min(1.0, routed / max(params.trainable, 1))


@functools.lru_cache(maxsize=64)
def routed_adapter_params(model: ModelSpec, lora_rank: int, lora_targets: tuple[str, ...]
                          ) -> float:
    """LoRA A and B weights on the routed experts' targeted linears (count; cached per model
    and adapter choice: the planner asks for every device count and stage)."""
    routed = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        for lin in linears:
            if lin.routed and lin.name in lora_targets:
                routed += lora_rank * (lin.in_features + lin.out_features) * lin.count * (
                    num_layers)
    return routed


def sharded_bytes(num_bytes: int, setup: TrainSetup, *, min_stage: int,
                  routed_fraction: float = 0.0, num_devices=None) -> int:
    """Per-device bytes of a model-state term: routed-expert bytes split over the
    expert-parallel degree E (each device holds 1/E of the experts), then ZeRO-sharded over the
    N/E devices that replicate those experts; the rest ZeRO-sharded over all N devices from
    `min_stage` on (zero_model_state_bytes).

    `num_devices`: N to use instead of setup.num_devices, an int or an array of counts (the
    planner's device-count axis; then the result is an array of whole bytes as floats)."""
    n = setup.num_devices if num_devices is None else num_devices
    ep = setup.expert_parallel
    shard = setup.zero_stage >= min_stage
    routed = num_bytes * routed_fraction
    dense = (num_bytes - routed) / (n if shard else 1)
    if not routed_fraction:  # no routed experts: dense + 0.0
        return ceil_bytes(dense)
    experts = routed / ep / ((n // ep) if shard else 1)
    return ceil_bytes(dense + experts)


def ceil_bytes(num_bytes):
    """math.ceil of a scalar (an int); of an array, np.ceil elementwise (the same values).
    numpy is imported only when an array comes: `nvfree estimate` never needs it."""
    if not is_array(num_bytes):
        return math.ceil(num_bytes)
    import numpy as np

    return np.ceil(num_bytes)


def is_array(value) -> bool:
    """Whether `value` is a numpy array (numpy scalars, of shape (), count as scalars)."""
    return bool(getattr(value, "shape", ()))


def gathered_params_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts,
                          stored_bytes: int) -> int:
    """ZeRO-3/FSDP: the largest block's parameters gathered in full while its forward or
    backward runs (freed after; prefetch of the next block not counted), in the gather dtype
    (16-bit under mixed precision) or, for a frozen base, its storage format."""
    if setup.zero_stage < 3 or setup.num_devices <= 1:
        return 0
    if setup.method == "full":
        per_param = dtype_bytes(setup.compute_dtype) if autocasting(setup) else (
            trainable_bytes_per_param(setup))
        return largest_layer_params(model) * per_param
    return math.ceil(largest_layer_params(model) * stored_bytes / params.total)


HOST_TERMS = {"optimizer": ("optimizer_states", "master_weights", "optimizer_transient"),
              "optimizer_and_params": ("optimizer_states", "master_weights",
                                       "optimizer_transient", "weights", "quant_scales")}
"""Terms ZeRO-Offload (Ren et al. 2021) keeps in host memory: the optimizer states with the
fp32 master copy (the optimizer step runs on the CPU); ZeRO-Infinity parameter offload also
the (sharded) parameters. Gradients stay on the device until they are shipped per step."""




def sixteen_bit_params(setup: TrainSetup) -> bool:
    """True when a mixed-precision full fine-tune keeps 16-bit working parameters and
    gradients on the device and the fp32 master copy with the optimizer (DeepSpeed's layout,
    the ZeRO paper's 2Ψ + 2Ψ + KΨ, K = 12): whenever the master copy is sharded (ZeRO ≥ 1 on
    several devices) or offloaded. Single-device torch.autocast keeps fp32 parameters instead."""
    return (setup.method == "full" and autocasting(setup)
            and (setup.offload != "none" or (setup.zero_stage >= 1 and setup.num_devices > 1)))


def device_gradient_bytes(setup: TrainSetup, params: ParamCounts) -> int:
    """Gradients as they are reduced: 16-bit in the sharded layout (sixteen_bit_params), else
    gradient_bytes."""
    if sixteen_bit_params(setup):
        return params.trainable * dtype_bytes(setup.compute_dtype)
    return gradient_bytes(setup, params)


def model_state_terms(model: ModelSpec, setup: TrainSetup, device: Device,
                      params: ParamCounts, *, num_devices=None) -> dict[str, int]:
    """Weights, master weights, adapters, gradients, optimizer states and transients of one
    device before the peak-phase choice: sharded per ZeRO stage and expert parallelism.

    `num_devices`: an array of device counts to evaluate at instead of setup.num_devices (each
    term then an array), all on the same side of 1 as setup.num_devices (which layout applies,
    sixteen_bit_params and the gathered block, is read from the setup)."""
    weights = weight_bytes(model, setup, params)
    copies = autocast_copy_params(model, setup, params) * dtype_bytes(setup.compute_dtype)
    stored = weights["weights"] - copies
    if sixteen_bit_params(setup):
        stored, copies = params.total * dtype_bytes(setup.compute_dtype), 0
    if setup.zero_stage >= 3 and setup.num_devices > 1:
        copies = 0  # FSDP casts on gather: the gathered block replaces autocast's casts
    adapters = adapter_bytes(model, setup, params)
    adapter_stored = params.trainable * trainable_bytes_per_param(setup) if adapters else 0
    w_share, t_share = routed_fractions(model, setup, params)

    def shard(name: str, value: int, share: float) -> int:
        return sharded_bytes(value, setup, min_stage=ZERO_MIN_STAGE[name], routed_fraction=share,
                             num_devices=num_devices)

    return {
        "weights": shard("weights", stored, w_share),
        "autocast_copies": copies,
        "quant_scales": shard("quant_scales", weights["quant_scales"], w_share),
        "master_weights": shard("master_weights", master_weight_bytes(setup, params), t_share),
        "adapter_weights": shard("adapter_weights", adapter_stored, t_share)
        + adapters - adapter_stored,
        "gradients": backward_step_gradient_bytes(model, setup, params)
        if setup.optimizer_in_backward else
        shard("gradients", device_gradient_bytes(setup, params), t_share),
        "optimizer_states": shard("optimizer_states",
                                  optimizer_state_bytes(model, setup, params), t_share),
        "optimizer_transient": shard(
            "optimizer_transient", optimizer_transient_bytes(model, setup, device, params),
            t_share) if device.backend != "cpu" else optimizer_transient_bytes(
                model, setup, device, params),
        "gathered_params": gathered_params_bytes(model, setup, params,
                                                 stored + weights["quant_scales"]),
    }


def memory_breakdown(model: ModelSpec, setup: TrainSetup, device: Device,
                     params: ParamCounts) -> MemoryBreakdown:
    """Peak memory of one device, by term (see the module docstring for the phases); on
    several devices the model states are sharded (model_state_terms) and offloaded terms are
    reported as host memory."""
    setup = as_run(setup)
    state = model_state_terms(model, setup, device, params)
    host = {k: state.pop(k) for k in HOST_TERMS.get(setup.offload, ())}
    acts = activation_bytes(model, setup,
                            pad_experts=pads_expert_rows(model, setup, device.backend))
    grads = state["gradients"]
    loss = loss_phase_terms(model, setup, acts)
    fwd_bwd = (acts["layers"] + acts["head"] + sum(loss.values())
               + dequant_transient_bytes(model, setup) + state["gathered_params"]
               + state["autocast_copies"])
    accumulate = setup.grad_accum > 1
    opt_transient = state.get("optimizer_transient", 0)
    opt_phase = grads + opt_transient
    fwd_phase = fwd_bwd + (grads if accumulate else 0)
    peak_in_opt = opt_phase > fwd_phase
    components = {
        "weights": state.get("weights", 0),
        "quant_scales": state.get("quant_scales", 0),
        "master_weights": state.get("master_weights", 0),
        "adapter_weights": state["adapter_weights"],
        "gradients": grads if (peak_in_opt or accumulate) else 0,
        "optimizer_states": state.get("optimizer_states", 0),
        "optimizer_transient": opt_transient if peak_in_opt else 0,
        "activations": 0 if peak_in_opt else acts["layers"] + acts["head"],
        "recompute": 0 if peak_in_opt else loss["recompute"],
        "logits": 0 if peak_in_opt else loss["logits"],
        "dequant_transient": 0 if peak_in_opt else dequant_transient_bytes(model, setup),
        "gathered_params": 0 if peak_in_opt else state["gathered_params"],
        "autocast_copies": 0 if peak_in_opt else state["autocast_copies"],
        "kv_cache": kv_cache_bytes(model, setup),
        "runtime_overhead": runtime_overhead_bytes(device, setup),
        **step_runtime_bytes(setup, device, grads),
        "expert_kernel_caches": expert_kernel_cache_bytes(model, setup, device.backend),
        "heap_retention": heap_retention_bytes(model, setup, device),
    }
    notes = {"peak_phase": "optimizer step" if peak_in_opt else "start of backward"}
    notes.update(sharding_notes(setup))
    over, under, source = band_fractions(setup, device)
    notes["band"] = f"measured peaks −{over:.0%} … +{under:.0%} of the estimate ({source})"
    capacity = device.memory_bytes - os_reserve_bytes(device)
    total = sum(components.values())
    return MemoryBreakdown(components=components, total_bytes=total,
                           capacity_bytes=capacity, notes=notes, host_components=host,
                           host_total_bytes=sum(host.values()),
                           lower_bytes=lower_bytes(total, setup, device),
                           upper_bytes=upper_bytes(total, setup, device))


def sharding_notes(setup: TrainSetup) -> dict[str, str]:
    """One line on how the model states are split (only on several devices or offload)."""
    notes = {}
    if setup.num_devices > 1:
        what = {0: "replicated (DDP)", 1: "optimizer states sharded (ZeRO-1)",
                2: "optimizer states + gradients sharded (ZeRO-2)",
                3: "parameters, gradients, optimizer states sharded (ZeRO-3/FSDP)"}
        notes["sharding"] = f"per device of {setup.num_devices}: {what[setup.zero_stage]}"
    if setup.expert_parallel > 1:
        notes["expert_parallel"] = (f"routed experts split over {setup.expert_parallel} "
                                    "devices")
    if setup.offload != "none":
        notes["offload"] = ("optimizer states and master weights in host memory"
                            + (", parameters too" if setup.offload != "optimizer" else ""))
    return notes
