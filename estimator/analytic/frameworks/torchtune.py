"""torchtune: what its recipes save for backward and allocate, term by term.

Derived from torchtune at commit 1814feb17 (2024-11-18, 0.5.0 dev: the README "Optimization
flags" table; the ops below are unchanged since 30b8519e8, the Llama 3.1 table) with torchao
0.7 (NF4), and recorded on tiny models against that code (tests/torch/test_torchtune_terms.py):

- recipes/full_finetune_single_device.py, lora_finetune_single_device.py: the model is built
  in `dtype` (bf16, or fp32; no autocast, no fp32 master copy): weights, adapters, gradients
  and optimizer states share it. Labels are shifted (no copy of the logits); `del logits`
  after the loss forward.
- modules/rms_norm.py `RMSNorm.forward`: `x.float()` (saved by pow and mul: T·h·4, the input
  itself in fp32), the fp32 rstd (T·4); `x_normed * self.scale` saves the normed input when
  the scale trains.
- modules/attention.py `MultiHeadAttention.forward`: q/k/v read the norm output; RoPE
  (models/llama3_1/_position_embeddings.py, modules/position_embeddings.py) upcasts to fp32
  and saves the cache rows it multiplies by: packed batches pass `input_pos`, so
  `cache[input_pos]` is a fresh [b, s, d/2, 2] fp32 index per call (q and k); k and v are
  expanded to every head (`expand(...).flatten(1, 2)`, a copy) for SDPA, which saves q, k, v,
  its output and the fp32 logsumexp; the output, transposed back, is contiguous (q's layout),
  so output_proj reads it without a copy.
- modules/feed_forward.py: `w2(silu(w1(x)) * w3(x))`: SiLU saves w1(x), the product saves
  silu(w1(x)) and w3(x), w2 saves the product.
- modules/peft/lora.py `LoRALinear.forward`: frozen base `F.linear(x, weight)` (QLoRA:
  torchao `linear_nf4`, which saves only the NF4 weight and dequantises it per call);
  `lora_b(lora_a(dropout(x)))`: lora_a saves its input (x itself without dropout, one tensor
  for every adapter that reads x), lora_b its rank-wide input.
- modules/loss/ce_chunked_output_loss.py with TransformerDecoder.chunked_output: 8 logit
  chunks in `dtype`, each upcast to fp32 for F.cross_entropy (log_softmax saves its fp32
  output); with compile only `compute_cross_entropy` is compiled (training/_compile.py).
"""

import math

from estimator.analytic.frameworks.bnb import paged_adamw_device_bytes
from estimator.analytic.frameworks.targets import ATTENTION_NAMES, LM_HEAD, adapted
from estimator.analytic.frameworks.torchtune_compile import (
    compiled_backward_bytes,
    compiled_layer_saved_bytes,
    compiled_loss_bytes,
)
from estimator.analytic.params import layer_groups, norms_per_layer
from estimator.errors import SetupError
from estimator.specs import ModelSpec, ParamCounts, TrainSetup

FP32_BYTES = 4
INDEX_BYTES = 8
LOSS_CHUNKS = 8
"""CEWithChunkedOutputLoss(num_output_chunks=8): the recipe sets the model's output chunks to it."""
PACKED = True
"""Batches are packed (`dataset.packed=True`, as in the README tables): `input_pos` goes to
every layer, so RoPE indexes its cache per call and each checkpoint keeps the int64 positions."""


def check_supported(model: ModelSpec) -> None:
    """torchtune 0.5 builds Llama-style blocks only: no mixture of experts, latent attention or
    q/k norms (Qwen3 came later); refuse rather than guess."""
    if model.moe is not None or model.mla is not None or model.qk_norm:
        raise SetupError(f"torchtune's terms model Llama-style dense blocks; {model.name} has "
                         "experts, latent attention or q/k norms (not modelled)")


def dtype_bytes(setup: TrainSetup) -> int:
    """Bytes of torchtune's `dtype`: fp32 when the compute dtype or a 32-bit base says so, else
    bf16 (torchtune trains without autocast: mixed_precision plays no part)."""
    return FP32_BYTES if setup.compute_dtype == "fp32" or setup.weight_bits == 32 else 2


def linear_inputs_bytes(setup: TrainSetup, names: list[str], width: int, num_tokens: float,
                        *, input_grad: bool = True, kept: bool = False,
                        mask_bytes: int | None = None) -> float:
    """What the linears `names`, reading one tensor of `width` features, keep for backward.

    Full: the tensor once (every trained linear saves the same input), unless another op
    keeps it already (`kept`). LoRA: lora_a keeps the tensor once for all adapters without
    dropout; with dropout each adapter keeps its dropped-out copy and, when the input needs a
    gradient, the dropout's noise (CPU `_dropout_impl`: noise in the input's dtype; CUDA's
    fused kernel keeps a 1-byte mask — counted as the CPU's c bytes, an upper bound); lora_b
    keeps A·x, rank wide. `mask_bytes`: bytes per element of what the dropout keeps (compiled:
    inductor's 1-byte bool mask)."""
    c = dtype_bytes(setup)
    noise = c if mask_bytes is None else mask_bytes
    if setup.method == "full":
        return 0.0 if kept else num_tokens * width * c
    on = [n for n in names if n in adapted(setup)]
    if not on:
        return 0.0
    if setup.lora_dropout > 0:
        total = len(on) * num_tokens * width * (c + (noise if input_grad else 0))
    else:
        total = 0.0 if kept else num_tokens * width * c
    return total + len(on) * num_tokens * setup.lora_rank * c


def norm_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: float,
                     *, input_grad: bool = True) -> float:
    """One RMSNorm: the fp32 upcast of its input (T·h·4) and the fp32 rstd (T·4) when the
    input needs a gradient; the normed input (T·h·c) when its scale trains (full)."""
    h = model.hidden_size
    total = num_tokens * (h + 1) * FP32_BYTES if input_grad else 0.0
    if setup.method == "full":
        total += num_tokens * h * dtype_bytes(setup)
    return total


def rope_index_bytes(model: ModelSpec, num_tokens: float, num_calls: int) -> float:
    """RoPE's `cache[input_pos]` rows (fp32, T·d·4) kept per call on a tensor that needs a
    gradient (packed batches only; an unpacked batch reads a view of the cache buffer)."""
    return num_calls * num_tokens * model.head_dim * FP32_BYTES if PACKED else 0.0


def attention_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int,
                          *, input_grad: bool = True) -> float:
    """One attention block: its norm, the q/k/v inputs and adapters, RoPE's cache rows, SDPA's
    q, expanded k and v, output and logsumexp, output_proj's adapters (its input is SDPA's
    output)."""
    c = dtype_bytes(setup)
    h, heads, d = model.hidden_size, model.num_heads, model.head_dim
    ada = adapted(setup)
    total = norm_saved_bytes(model, setup, num_tokens, input_grad=input_grad)
    total += linear_inputs_bytes(setup, ["q_proj", "k_proj", "v_proj"], h, num_tokens,
                                 input_grad=input_grad)
    grads = [input_grad or setup.method == "full" or n in ada for n in ("q_proj", "k_proj")]
    total += rope_index_bytes(model, num_tokens, sum(grads))
    sdpa = any(grads) or input_grad or "v_proj" in ada
    if sdpa:
        total += num_tokens * heads * d * c * 4
        total += setup.batch_size * heads * setup.seq_len * FP32_BYTES
    return total + linear_inputs_bytes(setup, ["o_proj"], heads * d, num_tokens, kept=sdpa)


def mlp_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int,
                    *, input_grad: bool = True) -> float:
    """One FFN: its norm, the w1/w3 input and adapters, SiLU's input, the product's two
    factors (GELU MLP: the GELU input), w2's input or adapters."""
    c = dtype_bytes(setup)
    width = model.intermediate_size
    gated = model.mlp != "gelu"
    first = ["gate_proj", "up_proj"] if gated else ["up_proj"]
    total = norm_saved_bytes(model, setup, num_tokens, input_grad=input_grad)
    total += linear_inputs_bytes(setup, first, model.hidden_size, num_tokens,
                                 input_grad=input_grad)
    hidden_grad = input_grad or setup.method == "full" or bool(adapted(setup) & set(first))
    if not hidden_grad:
        return total
    total += (3 if gated else 1) * num_tokens * width * c
    return total + linear_inputs_bytes(setup, ["down_proj"], width, num_tokens)


def layer_saved_bytes(model: ModelSpec, setup: TrainSetup, *, first: bool = False) -> float:
    """Everything one TransformerSelfAttentionLayer saves. `first`: the first layer of a LoRA
    model, whose input (the frozen embedding's output) needs no gradient."""
    if setup.compile:
        return compiled_layer_saved_bytes(model, setup, first=first)
    tokens = setup.batch_size * setup.seq_len
    input_grad = not (first and setup.method != "full")
    total = attention_saved_bytes(model, setup, tokens, input_grad=input_grad)
    mlp_grad = input_grad or bool(adapted(setup) & ATTENTION_NAMES)
    return total + mlp_saved_bytes(model, setup, tokens, input_grad=mlp_grad)


def backward_working_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """What a recomputed layer's backward forms beside its saved tensors, at its largest: in
    eager the product's gradient splits into SiLU's and w3's ([T, I] each, beside ∂product:
    2·T·I·c net of what the down projection's backward frees, measured 2.0 with LitGPT's
    identical MLP); compiled: compiled_backward_bytes."""
    if setup.compile:
        return compiled_backward_bytes(model, setup)
    return 2 * setup.batch_size * setup.seq_len * model.intermediate_size * dtype_bytes(setup)


def head_saved_bytes(model: ModelSpec, setup: TrainSetup) -> float:
    """Final norm, the output projection's input (when it trains or carries an adapter) and,
    when the embedding trains, its int64 token ids."""
    tokens = setup.batch_size * setup.seq_len
    total = norm_saved_bytes(model, setup, tokens)
    total += linear_inputs_bytes(setup, [LM_HEAD], model.hidden_size, tokens)
    if setup.method == "full":
        total += tokens * INDEX_BYTES
    return total


def activation_bytes(model: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Saved activations of one micro-batch at the start of backward, by part.

    Checkpointing (`enable_activation_checkpointing`: torch's checkpoint_wrapper, non-
    reentrant, per TransformerSelfAttentionLayer) keeps each layer's input (T·h·c, and the
    positions of a packed batch, one int64 tensor shared by all layers) and recomputes one layer
    at a time; in fp32 the recomputed norm saves that kept input itself. Activation
    offloading (training/_activation_offloading.py) copies what the forward saves outside the
    output projection to pinned host memory: the kept inputs leave the device but for the
    last one, still in the copy stream's stash when backward starts (the final norm's tensors
    are in that stash too, so `head` stays)."""
    check_supported(model)
    if setup.method == "inference":
        return {"layers": 0, "recompute": 0, "head": 0}
    tokens = setup.batch_size * setup.seq_len
    per = layer_saved_bytes(model, setup)
    head = round(head_saved_bytes(model, setup))
    if setup.checkpointing:
        block_input = tokens * model.hidden_size * dtype_bytes(setup)
        kept = 1 if setup.activation_offloading else model.num_layers
        positions = tokens * INDEX_BYTES if PACKED else 0
        input_kept = dtype_bytes(setup) == FP32_BYTES or setup.compile
        recompute = per - (block_input if input_kept else 0) + backward_working_bytes(
            model, setup)
        return {"layers": block_input * kept + positions, "recompute": round(recompute),
                "head": head}
    first = layer_saved_bytes(model, setup, first=True)
    positions = tokens * INDEX_BYTES if PACKED and setup.compile else 0
    return {"layers": round(per * (model.num_layers - 1) + first) + positions, "recompute": 0,
            "head": head}


def logits_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """The loss head at its peak, N = b·s·V logits.

    torch.nn.CrossEntropyLoss (fused_loss False): `output(h).float()`, log_softmax saves its
    fp32 output, the recipe deletes the logits; in backward the saved output, nll_loss's dense
    gradient and log_softmax's fp32 gradient: 12 B per logit (compile does not change it: the
    recipe drops compile_loss's return value for a plain loss).
    CEWithChunkedOutputLoss (fused_loss True), eager: all C chunks in `dtype` (c·N) stay
    listed while each is upcast (4N/C) and log_softmax saves its fp32 output (4 B per logit
    over all chunks): (c + 4 + 4/C)·N at the last chunk (no upcast copy in fp32); compiled:
    compiled_loss_bytes. A full fine-tune then runs the C output-projection backwards into one
    weight: the engine sums their ∂L/∂W in the input buffer of the weight's AccumulateGrad
    (out of place: buffer, new chunk's, sum = 3·V·h·c) beside the C − 2 chunk gradients not
    yet consumed (head_weight_grad_bytes)."""
    n = setup.batch_size * setup.seq_len * model.vocab_size
    if setup.method == "inference":
        return setup.batch_size * model.vocab_size * FP32_BYTES
    if not setup.fused_loss:
        return 12 * n
    c = dtype_bytes(setup)
    if setup.compile:
        peak = compiled_loss_bytes(model, setup)
    else:
        peak = math.ceil(n * (c + FP32_BYTES + (FP32_BYTES / LOSS_CHUNKS if c != FP32_BYTES
                                                else 0)))
    return max(peak, head_weight_grad_bytes(model, setup))


def head_weight_grad_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Full fine-tune, chunked output: the second chunk's ∂L/∂W summed into the first in the
    AccumulateGrad input buffer (3·V·h·c) while C − 2 chunks' c-byte logit gradients wait."""
    if setup.method != "full" or LOSS_CHUNKS < 2:
        return 0
    c = dtype_bytes(setup)
    n = setup.batch_size * setup.seq_len * model.vocab_size
    return math.ceil(n * c * (LOSS_CHUNKS - 2) / LOSS_CHUNKS) + 3 * head_weight_bytes(model,
                                                                                     setup)


def head_weight_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """One gradient of the output projection's weight, V·h·c."""
    return model.vocab_size * model.hidden_size * dtype_bytes(setup)


def loss_residue_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """While the blocks run backward: ∂L/∂h (T·h·c) and, in a full fine-tune, the output
    projection's weight gradient (V·h·c: `.grad`, or for a tied model the AccumulateGrad buffer
    that waits for the embedding's)."""
    c = dtype_bytes(setup)
    head = head_weight_bytes(model, setup) if setup.method == "full" else 0
    return setup.batch_size * setup.seq_len * model.hidden_size * c + head


def as_run(setup: TrainSetup) -> TrainSetup:
    """torchtune's precision: one `dtype` for weights, adapters, gradients and optimizer
    states, no autocast (mixed_precision off; a 32-bit base means dtype fp32); its NF4
    (torchao `to_nf4`: block 64, scaler block 256) always quantises the block scales."""
    update: dict = {"mixed_precision": False}
    if dtype_bytes(setup) == FP32_BYTES:
        update["compute_dtype"] = "fp32"
        update["weight_bits"] = 32 if setup.weight_bits >= 16 else setup.weight_bits
    if setup.method == "qlora":
        update["double_quant"] = True
    return setup.model_copy(update=update)


def block_linears(model: ModelSpec) -> list[tuple[str, int, int, float]]:
    """(name, in, out, instances over all layers) of the block linears."""
    return [(lin.name, lin.in_features, lin.out_features, lin.count * num_layers)
            for linears, num_layers in layer_groups(model, routed_all=True) for lin in linears]


def quantized_linear_params(model: ModelSpec) -> tuple[int, int]:
    """(weights, output rows) torchtune's QLoRA stores in NF4: every block linear (LoRALinear
    with quantize_base, FrozenNF4Linear for the others, models/llama3_2/_component_builders.py
    at 1814feb17); embedding, norms and the output projection stay in `dtype`."""
    shapes = block_linears(model)
    return (round(sum(i * o * n for _, i, o, n in shapes)),
            round(sum(o * n for _, _, o, n in shapes)))


def lm_head_cast_params(model: ModelSpec, setup: TrainSetup) -> int:
    """torchtune has no autocast: no cast copies of the output projection."""
    return 0


def adapter_copy_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """What the adapters' matmuls save beyond the activations: nothing (lora_a and lora_b are
    nn.Linear in `dtype`; their saved weights are the parameters themselves)."""
    return 0


def trainable_tensors(model: ModelSpec, setup: TrainSetup) -> list[tuple[int, float]]:
    """(elements, count) of every trainable tensor: full: embedding, untied output projection,
    block linears, norms; LoRA: A (r × in) and B (out × r) of each adapted linear."""
    h, v, r = model.hidden_size, model.vocab_size, setup.lora_rank
    if setup.method == "full":
        heads = [(v * h, 1 if model.tied_embeddings else 2)]
        norms = [(h, norms_per_layer(model) * model.num_layers + 1)]
        return heads + norms + [(i * o, n) for _, i, o, n in block_linears(model)]
    ada = adapted(setup)
    out = [(r * i, n) for name, i, _, n in block_linears(model) if name in ada]
    out += [(r * o, n) for name, _, o, n in block_linears(model) if name in ada]
    return out + ([(r * h, 1), (r * v, 1)] if LM_HEAD in ada else [])


def paged_state_bytes(model: ModelSpec, setup: TrainSetup) -> int | None:
    """Device bytes of the optimizer states when torchtune's configs name bitsandbytes'
    `PagedAdamW8bit` (adamw8bit; bnb.paged_adamw_device_bytes); None for the others (torch's
    AdamW: two moments in `dtype`)."""
    if setup.optimizer != "adamw8bit" or setup.method == "inference":
        return None
    return paged_adamw_device_bytes(trainable_tensors(model, setup), bits=8)


def optimizer_transient_bytes(model: ModelSpec, setup: TrainSetup, device,
                              params: ParamCounts) -> int:
    """Beside the gradients at the end of backward: torch's fused AdamW (the configs'
    `fused: True`) and bitsandbytes' 8-bit kernels keep no temporaries, but a full fine-tune
    of a tied model (Llama 3.2) forms the embedding's dense gradient (V·h·c) while the output
    projection's waits in their shared AccumulateGrad's input buffer, and sums it in place."""
    if setup.method != "full" or not model.tied_embeddings:
        return 0
    return head_weight_bytes(model, setup)


def dequant_transient_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """QLoRA: torchao's `linear_nf4` dequantises one block weight to `dtype` per call (forward
    and backward): the largest one."""
    return max(i * o for _, i, o, _ in block_linears(model)) * dtype_bytes(setup)
