"""LitGPT's finetune scripts: what they save for backward and allocate, term by term.

Derived from litgpt at commit 00af8b0d (2024-09-27, 0.4.13.dev1: the config-hub table's
scripts; lightning 2.4, bitsandbytes 0.42 as it pinned) and recorded on tiny models against
that code (tests/torch/test_litgpt_terms.py):

- litgpt/finetune/{full,lora}.py: Fabric `precision` bf16-true / 16-true / 32-true (weights,
  adapters, gradients and AdamW states in one dtype) or bf16-mixed (fp32 weights under
  torch.autocast); `--quantize bnb.nf4[-dq]` goes through lightning's BitsandbytesPrecision,
  which swaps every nn.Linear, lm_head included, for a bitsandbytes 4-bit linear, and the
  script then uses bitsandbytes' PagedAdamW (32-bit); otherwise torch.optim.AdamW (foreach on
  CUDA). `model(x, lm_head_chunk_size=128)` returns the logits as a list of 128-token chunks
  that the loop keeps (`logits`) through backward; `chunked_cross_entropy` runs
  F.cross_entropy on each chunk in the logits' dtype (no upcast).
- litgpt/model.py `RMSNorm.forward`: `x.float()` (T·h·4, the input itself in fp32), rstd
  (T·4), `x_normed * weight.float()`: the fp32 weight copy (h·4) and, when the weight trains,
  the fp32 normed input (T·h·4). `CausalSelfAttention`: one fused qkv linear; q, k, v are
  reshaped out of it (k and v expanded to every head for GQA), RoPE saves only its cos/sin
  buffers, `torch.cat` makes the roped q and k that SDPA saves with v, its output and the fp32
  logsumexp; the output (q's layout) is transposed and reshaped, a copy, for `proj`.
  `LLaMAMLP`: `proj(silu(fc_1(x)) * fc_2(x))`.
- litgpt/lora.py: `LoRALinear`: `dropout(x) @ A.T @ B.T` (saves the dropped-out input, or x
  itself, and the rank-wide A·x); `LoRAQKVLinear`: one A for the enabled q/k/v parts, a grouped
  conv1d for B (saves A·x); every adapted module has its own dropout (`lora_dropout`, 0.05 in
  the config hub).
- bitsandbytes 0.42 `autograd/_functions.py` `MatMul4Bit.forward`: `ctx.tensors = (A, B)`: a
  4-bit linear keeps its input whenever it needs a gradient (bitsandbytes 0.43.2 stopped
  this: BNB_KEEPS_4BIT_INPUT).
"""

import math

from estimator.analytic.frameworks.bnb import paged_adamw_device_bytes
from estimator.analytic.frameworks.targets import LM_HEAD, adapted
from estimator.analytic.params import layer_groups
from estimator.errors import SetupError
from estimator.specs import ModelSpec, ParamCounts, TrainSetup

FP32_BYTES = 4
INDEX_BYTES = 8
LM_HEAD_CHUNK = 128
"""`lm_head_chunk_size=128` in every finetune script's training step."""
BNB_KEEPS_4BIT_INPUT = True
"""bitsandbytes < 0.43.2 (the 0.41/0.42 the published LitGPT tables ran) keeps each 4-bit
linear's input for backward; later versions (current LitGPT pins >= 0.45.2) do not, so for
them the `quantized_input` terms are an upper bound."""
QKV = ("q_proj", "k_proj", "v_proj")
MLP_FIRST = ("gate_proj", "up_proj")


def check_supported(model: ModelSpec) -> None:
    """LitGPT's terms here cover its dense Llama-style (and GPT-NeoX) blocks; its MoE (a loop
    over experts) and latent attention are not modelled."""
    if model.moe is not None or model.mla is not None or model.qk_norm:
        raise SetupError(f"LitGPT's terms model dense blocks; {model.name} has experts, latent "
                         "attention or q/k norms (not modelled)")


def precision(setup: TrainSetup) -> str:
    """Fabric's precision for the setup: 32-true (fp32), bf16-mixed (fp32 weights under
    autocast: a mixed-precision full fine-tune or a 32-bit LoRA base), else bf16-true (a
    16-bit or 4-bit base: LitGPT has no mixed mode over 16-bit weights; quantisation refuses
    mixed precision)."""
    if setup.compute_dtype == "fp32":
        return "32-true"
    if setup.mixed_precision and setup.method != "qlora" and (
            setup.method == "full" or setup.weight_bits == 32):
        return "bf16-mixed"
    return "bf16-true"


def as_run(setup: TrainSetup) -> TrainSetup:
    """The setup under LitGPT's precision: mixed_precision only for bf16-mixed."""
    return setup.model_copy(update={"mixed_precision": precision(setup) == "bf16-mixed"})


def weight_bytes_per(setup: TrainSetup) -> int:
    """Bytes of a stored (trainable or 16/32-bit frozen) weight and of the residual stream."""
    return 2 if precision(setup) == "bf16-true" else FP32_BYTES


def act_bytes(setup: TrainSetup) -> int:
    """Bytes of a matmul's output (autocast computes bf16 from fp32 weights)."""
    return FP32_BYTES if precision(setup) == "32-true" else 2


def cast_copies(setup: TrainSetup) -> bool:
    """Under bf16-mixed every linear casts its fp32 input itself (autocast caches only leaf
    weights), so linears reading one fp32 tensor keep a c-byte copy each."""
    return precision(setup) == "bf16-mixed"


def quantized_input(setup: TrainSetup, input_grad: bool) -> bool:
    """A frozen 4-bit linear keeps its input (BNB_KEEPS_4BIT_INPUT) when it needs a gradient."""
    return setup.method == "qlora" and BNB_KEEPS_4BIT_INPUT and input_grad


def adapter_side_bytes(setup: TrainSetup, count: int, width: int, num_tokens: float,
                       in_bytes: int, *, input_grad: bool) -> float:
    """`count` LoRA modules reading one tensor of `width` (element bytes `in_bytes`), beyond
    the tensor itself: what each module's A matmul keeps — under bf16-mixed autocast's c-byte
    cast of its input, else the dropped-out copy when there is a dropout — and, when the
    input needs a gradient, each dropout's noise (CPU: in the input's dtype; CUDA's 1-byte mask
    counted as that, an upper bound)."""
    if setup.lora_dropout > 0:
        kept = act_bytes(setup) if cast_copies(setup) else in_bytes
        return count * num_tokens * width * (kept + (in_bytes if input_grad else 0))
    if cast_copies(setup):
        return count * num_tokens * width * act_bytes(setup)
    return 0.0


def reads_bytes(setup: TrainSetup, modules: list[list[str]], width: int, num_tokens: float,
                in_bytes: int, *, input_grad: bool = True, kept: bool = False) -> float:
    """What the linear modules `modules` (each a list of the canonical names it computes: the
    fused qkv is one module) keep of the one tensor they read, plus their adapters' A·x.

    The tensor itself (T·width·in_bytes), once, when a trained linear, an adapter without
    dropout or autocast, or a 4-bit linear keeps it and no other op does (`kept`); under
    bf16-mixed a trained linear keeps its own cast instead."""
    c, ada = act_bytes(setup), adapted(setup)
    on = [m for m in modules if any(n in ada for n in m)]
    total = adapter_side_bytes(setup, len(on), width, num_tokens, in_bytes,
                               input_grad=input_grad)
    total += sum(num_tokens * setup.lora_rank * c * sum(n in ada for n in m) for m in on)
    if setup.method == "full" and cast_copies(setup):
        return total + len(modules) * num_tokens * width * c
    plain = on and setup.lora_dropout == 0 and not cast_copies(setup)
    if setup.method == "full" or plain or quantized_input(setup, input_grad):
        total += 0.0 if kept else num_tokens * width * in_bytes
    return total


def norm_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: float,
                     *, input_grad: bool = True) -> float:
    """One RMSNorm (litgpt/model.py): the fp32 input and rstd when it needs a gradient, the
    fp32 weight copy (a 16-bit weight's `.float()`), the fp32 normed input when the weight
    trains. LayerNorm (torch.nn): its input and two fp32 statistics."""
    h, w = model.hidden_size, weight_bytes_per(setup)
    if model.norm == "layernorm":
        return num_tokens * (h * w + 2 * FP32_BYTES) if input_grad else 0.0
    total = num_tokens * (h + 1) * FP32_BYTES + (h * FP32_BYTES if w != FP32_BYTES else 0)
    total = total if input_grad else 0.0
    if setup.method == "full":
        total += num_tokens * h * FP32_BYTES
    return total


def attention_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int,
                          *, input_grad: bool = True) -> float:
    """One CausalSelfAttention with its norm_1: the qkv module's input and adapters, SDPA's
    q, k, v, output and logsumexp, the reshaped output copy for `proj`."""
    c, w, ada = act_bytes(setup), weight_bytes_per(setup), adapted(setup)
    h, heads, d = model.hidden_size, model.num_heads, model.head_dim
    total = norm_saved_bytes(model, setup, num_tokens, input_grad=input_grad)
    total += reads_bytes(setup, [list(QKV)], h, num_tokens, w, input_grad=input_grad)
    total += zero_pad_bytes(model, setup, num_tokens)
    if input_grad or setup.method == "full" or any(n in ada for n in QKV):
        total += sdpa_saved_bytes(model, setup, num_tokens)
        return total + reads_bytes(setup, [["o_proj"]], heads * d, num_tokens, c)
    return total + reads_bytes(setup, [["o_proj"]], heads * d, num_tokens, c,
                               input_grad=False)


def sdpa_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> float:
    """SDPA's q and k (the roped `torch.cat` outputs), v, output (T·H·d·c each) and fp32
    logsumexp. With grouped queries v is expanded, a copy; with one key/value head per query
    head (MHA) `v.reshape` is a view of the fused qkv output, which SDPA's saved v then keeps
    whole: T·(H + 2·KV)·d·c."""
    c, heads, d = act_bytes(setup), model.num_heads, model.head_dim
    v_width = heads + 2 * model.num_kv_heads if model.num_kv_heads == heads else heads
    return (num_tokens * (3 * heads + v_width) * d * c
            + setup.batch_size * heads * setup.seq_len * FP32_BYTES)


def zero_pad_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> float:
    """LoRAQKVLinear with some but not all of q, k, v enabled: `zero_pad` index_copy_s the
    B output (T × enabled widths) into zeros, and autograd's index_copy formula keeps that
    source (it reads `source.dim()` and `expand_as(source)`)."""
    on = [n for n in QKV if n in adapted(setup)]
    if not on or len(on) == len(QKV):
        return 0.0
    width = {"q_proj": model.num_heads, "k_proj": model.num_kv_heads,
             "v_proj": model.num_kv_heads}
    return num_tokens * sum(width[n] for n in on) * model.head_dim * act_bytes(setup)


def mlp_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int,
                    *, input_grad: bool = True) -> float:
    """norm_2 and the MLP: fc_1/fc_2 inputs and adapters, SiLU's input and the product's two
    factors (GptNeoxMLP: the GELU input), proj's input."""
    c, w, ada = act_bytes(setup), weight_bytes_per(setup), adapted(setup)
    width = model.intermediate_size
    gated = model.mlp != "gelu"
    first = [[n] for n in MLP_FIRST] if gated else [["up_proj"]]
    total = norm_saved_bytes(model, setup, num_tokens, input_grad=input_grad)
    total += reads_bytes(setup, first, model.hidden_size, num_tokens, w, input_grad=input_grad)
    if not (input_grad or setup.method == "full" or any(m[0] in ada for m in first)):
        return total
    total += (3 if gated else 1) * num_tokens * width * c
    return total + reads_bytes(setup, [["down_proj"]], width, num_tokens, c)


def layer_saved_bytes(model: ModelSpec, setup: TrainSetup, *, first: bool = False) -> float:
    """Everything one Block saves; `first`: a LoRA model's first block (frozen embedding)."""
    tokens = setup.batch_size * setup.seq_len
    input_grad = not (first and setup.method != "full")
    total = attention_saved_bytes(model, setup, tokens, input_grad=input_grad)
    mlp_grad = input_grad or any(n in adapted(setup) for n in (*QKV, "o_proj"))
    return total + mlp_saved_bytes(model, setup, tokens, input_grad=mlp_grad)


def head_saved_bytes(model: ModelSpec, setup: TrainSetup) -> float:
    """ln_f, lm_head's input (trained, adapted or 4-bit: once over its chunks) and the
    embedding's int64 ids when it trains."""
    tokens = setup.batch_size * setup.seq_len
    total = norm_saved_bytes(model, setup, tokens)
    total += reads_bytes(setup, [[LM_HEAD]], model.hidden_size, tokens,
                         weight_bytes_per(setup))
    return total + (tokens * INDEX_BYTES if setup.method == "full" else 0)


def activation_bytes(model: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Saved activations of one micro-batch at the start of backward, by part. Checkpointing
    (Fabric FSDP's `activation_checkpointing_policy={Block}`: torch's non-reentrant
    checkpoint_wrapper) keeps each block's input and recomputes one block in backward (in fp32
    the recomputed norm saves that kept input itself)."""
    check_supported(model)
    if setup.method == "inference":
        return {"layers": 0, "recompute": 0, "head": 0}
    per = layer_saved_bytes(model, setup)
    head = round(head_saved_bytes(model, setup))
    if setup.checkpointing:
        w = weight_bytes_per(setup)
        block_input = setup.batch_size * setup.seq_len * model.hidden_size * w
        recompute = per - (block_input if w == FP32_BYTES else 0) + backward_working_bytes(
            model, setup)
        return {"layers": block_input * model.num_layers, "recompute": round(recompute),
                "head": head}
    first = layer_saved_bytes(model, setup, first=True)
    return {"layers": round(per * (model.num_layers - 1) + first), "recompute": 0,
            "head": head}


def backward_working_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """What a recomputed block's backward forms beside its saved tensors, at its largest: the
    product's gradient splits into SiLU's and fc_2's ([T, I] each, beside ∂product): 2·T·I·c
    net (measured 2.0 with q/v adapters; 1.0 with adapted MLP linears, 3.0 in a full
    fine-tune, whose down-projection and lm_head gradients also exist by then)."""
    return 2 * setup.batch_size * setup.seq_len * model.intermediate_size * act_bytes(setup)


def num_chunks(setup: TrainSetup) -> int:
    """Logit chunks of one sequence: ⌈s / 128⌉."""
    return math.ceil(setup.seq_len / LM_HEAD_CHUNK)


def logits_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """The loss head at its peak, N = b·s·V logits in the logits' dtype (c bytes).

    finetune/lora.py: lm_head in chunks of 128 tokens (n chunks); the loop keeps the chunk
    list (c·N) while log_softmax saves its output per chunk (l·N: c, or fp32 under bf16-mixed,
    where autocast runs cross_entropy in fp32 from a per-chunk cast); backward starts at the
    last chunk: nll_loss's and log_softmax's gradients of one chunk, 2·l·N/n.
    finetune/full.py: whole logits (kept by the loop), `logits[..., :-1, :]` reshaped (a copy
    for b > 1) and split into 128-row chunks; backward gathers the chunks' gradients, cats them
    and scatters them into zeros of the logits' shape for the slice: 3·c·N (the logits, the
    chunk gradients and their cat, or the cat and the slice's gradient)."""
    c = act_bytes(setup)
    logits = setup.batch_size * setup.seq_len * model.vocab_size
    if setup.method == "inference":
        return setup.batch_size * model.vocab_size * FP32_BYTES
    if setup.method == "full":  # bf16-mixed: fp32 casts of the chunks, fp32 log_softmax
        copy = 2 if setup.batch_size > 1 else 1
        mixed = (copy * c + FP32_BYTES * (1 + 1 / num_chunks(setup))) if cast_copies(setup) else 0
        return math.ceil(logits * max(3 * c, mixed))
    lsm = FP32_BYTES if cast_copies(setup) else c
    return math.ceil(logits * (c + lsm + 2 * lsm / num_chunks(setup)))


def loss_residue_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """While the blocks run backward: ∂L/∂h (T·h·c), the logits the loop still holds (c·N,
    freed only when the next step's logits replace them) and, in a full fine-tune, lm_head's
    weight gradient (V·h·w)."""
    tokens = setup.batch_size * setup.seq_len
    c = act_bytes(setup)
    head = model.vocab_size * model.hidden_size * weight_bytes_per(setup) if (
        setup.method == "full") else 0
    return tokens * model.hidden_size * c + tokens * model.vocab_size * c + head


def block_linears(model: ModelSpec) -> list[tuple[str, int, int, float]]:
    """(name, in, out, instances over all layers) of the block linears."""
    return [(lin.name, lin.in_features, lin.out_features, lin.count * num_layers)
            for linears, num_layers in layer_groups(model, routed_all=True) for lin in linears]


def quantized_linear_params(model: ModelSpec) -> tuple[int, int]:
    """(weights, output rows) in 4 bits: BitsandbytesPrecision (lightning 2.4
    plugins/precision/bitsandbytes.py `_convert_layers`, no ignore_modules from LitGPT)
    replaces every nn.Linear: the block linears and lm_head; embedding and norms stay."""
    shapes = block_linears(model)
    return (round(sum(i * o * n for _, i, o, n in shapes)) + model.vocab_size * model.hidden_size,
            round(sum(o * n for _, _, o, n in shapes)) + model.vocab_size)


def dequant_transient_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """bitsandbytes' MatMul4Bit dequantises the whole weight per call (forward and backward):
    the largest 4-bit linear, lm_head for most vocabularies (once per logit chunk)."""
    largest = max(max(i * o for _, i, o, _ in block_linears(model)),
                  model.vocab_size * model.hidden_size)
    return largest * act_bytes(setup)


def lm_head_cast_params(model: ModelSpec, setup: TrainSetup) -> int:
    """Autocast's bf16 copies of lm_head alive at the start of backward (bf16-mixed): one,
    cached, when it trains; a frozen fp32 head is cast anew for each logit chunk and every cast
    is saved."""
    per = model.vocab_size * model.hidden_size
    return per if setup.method == "full" else per * num_chunks(setup)


def adapter_copy_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """Copies of adapter weights the matmuls save: autocast's cached bf16 cast of every fp32
    adapter (bf16-mixed); none in a true precision (A and B are used as they are)."""
    return params.trainable * act_bytes(setup) if cast_copies(setup) else 0


def lora_tensors(model: ModelSpec, setup: TrainSetup) -> list[tuple[int, float]]:
    """(elements, count) of the adapters: one A of r·(enabled parts) × h and one B of
    (enabled outputs) × r per LoRAQKVLinear; A (r × in), B (out × r) per other LoRALinear."""
    ada, r, h = adapted(setup), setup.lora_rank, model.hidden_size
    shapes = block_linears(model)
    layers = model.num_layers
    qkv = [(o, n) for name, _, o, n in shapes if name in QKV and name in ada]
    out = [(r * len(qkv) * h, layers), (r * sum(o for o, _ in qkv), layers)] if qkv else []
    for name, i, o, n in shapes:
        if name not in QKV and name in ada:
            out += [(r * i, n), (r * o, n)]
    return out + ([(r * h, 1), (r * model.vocab_size, 1)] if LM_HEAD in ada else [])


def paged_state_bytes(model: ModelSpec, setup: TrainSetup) -> int | None:
    """QLoRA: LitGPT's `instantiate_bnb_optimizer` makes bitsandbytes' PagedAdamW (32-bit):
    only the moments of adapters under 1e5 elements are device memory
    (bnb.paged_adamw_device_bytes). Other methods: None (torch's AdamW)."""
    if setup.method != "qlora":
        return None
    return paged_adamw_device_bytes(lora_tensors(model, setup), bits=32)


def optimizer_transient_bytes(model: ModelSpec, setup: TrainSetup, device,
                              params: ParamCounts) -> int:
    """torch.optim.AdamW as the config hub names it (no `fused`): on CUDA the foreach
    implementation forms sqrt(v) for every trainable tensor at once (trainable·w); on a CPU
    the per-tensor loop forms two temporaries of one tensor (sqrt(v), then its quotient), the
    largest. bitsandbytes' paged AdamW (QLoRA) updates in place; other optimizers: 0."""
    if setup.method == "qlora" or setup.optimizer != "adamw" or params.trainable == 0:
        return 0
    w = weight_bytes_per(setup)
    if device.backend != "cpu":
        return params.trainable * w
    if setup.method == "full":
        largest = max(model.vocab_size * model.hidden_size,
                      max(i * o for _, i, o, _ in block_linears(model)))
    else:
        largest = max(n for n, _ in lora_tensors(model, setup))
    return 2 * largest * w
