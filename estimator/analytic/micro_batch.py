"""The terms of one micro-batch beyond the blocks' saved activations (activations.py): the
logits and loss buffers of the loss head (chunked or not), the residue the loss leaves, the
transient dequantised weight of a quantised layer, and the KV cache of inference."""

from estimator.analytic.activations import activation_bytes
from estimator.analytic.frameworks import OWN_TERMS, as_run, hf, terms
from estimator.analytic.model_state import FP32_BYTES, largest_block_weight, trainer_upcasts_base
from estimator.analytic.precision import dtype_bytes
from estimator.analytic.runtime import pads_expert_rows
from estimator.specs import ModelSpec, TrainSetup

FUSED_LOSS_CHUNK_ELEMENTS = 2**25
"""Fused loss chunk: 2^25 fp32 logits (128 MiB), at least 64 rows (executor/model.py)."""


def fused_loss_chunk_rows(model: ModelSpec, setup: TrainSetup) -> int:
    """Rows of one fused-loss chunk: max(64, 2^25 // V), at most the b·s rows there are."""
    rows = max(64, FUSED_LOSS_CHUNK_ELEMENTS // model.vocab_size)
    return min(rows, setup.tokens_per_micro_batch)


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
    tokens = setup.tokens_per_micro_batch
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
    return setup.tokens_per_micro_batch * model.hidden_size * dtype_bytes(
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
    matmul runs (the executor dequantises one weight at a time, forward and backward).
    A bf16 base under fp32 compute (model_state.trainer_upcasts_base): the largest weight
    upcast to fp32 — lm_head's V·D, which the loss head upcasts whole for the forward
    (kernels/loss.py), or a larger block linear (executor/lora.py _UpcastLinear)."""
    if trainer_upcasts_base(setup):
        return max(model.vocab_size * model.hidden_size, largest_block_weight(model)) * FP32_BYTES
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
    tokens = setup.tokens_per_micro_batch
    if model.mla is not None:
        per_token = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
    else:
        per_token = 2 * model.num_kv_heads * model.head_dim
    return tokens * per_token * c * model.num_layers * model.attentions_per_layer
