"""Hugging Face Transformers + PEFT (+ bitsandbytes): what their eager code saves for backward.

Derived from the code that runs, at the versions named below, and recorded with
torch.autograd.graph.saved_tensors_hooks on tiny models (tests/torch/test_hf_parity_terms.py):

- transformers 5.25 `models/llama/modeling_llama.py` (Llama, Mistral, Qwen2/3 share it):
  `LlamaRMSNorm.forward` upcasts its input to fp32 (`hidden_states.to(torch.float32)`), which
  `pow`/`mul` save, with the fp32 rstd; `self.weight * hidden_states.to(input_dtype)` saves the
  normalised input when the weight trains. `LlamaMLP.forward` is
  `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: SiLU saves g, the product saves silu(g) and
  u, down_proj saves the product. RoPE (`apply_rotary_pos_emb`) saves only cos and sin (shared
  by every layer). `integrations/sdpa_attention.py` passes GQA to SDPA (`enable_gqa`) when the
  mask is None — a packed, unpadded batch: `masking_utils._ignore_causal_mask_sdpa` — so SDPA
  saves q, k, v at their own widths, its output and the fp32 logsumexp; its output, transposed
  back, is o_proj's input (same storage). `eager_attention_forward` repeats k and v to every
  head (`repeat_kv`), saves the fp32 softmax and its c-byte copy and copies the output
  (`.transpose(1, 2).contiguous()`).
- torch.autocast caches the casts of leaf weights only: each linear that reads an fp32
  activation makes (and saves) its own c-byte copy of it.
- peft 0.21 `tuners/lora/layer.py` `Linear.forward`: adapters are fp32
  (`autocast_adapter_dtype=True`); `x = self._cast_input_dtype(x, lora_A.weight.dtype)` then
  `lora_B(lora_A(dropout(x)))`: every adapted linear keeps its own copy of its input (the
  autocast cast of the fp32 cast, or the fp32 cast itself without autocast), lora_B saves
  A·x. With `lora_dropout > 0` each adapter also keeps its dropout mask (1 B/element).
- bitsandbytes 0.50 `autograd/_functions.py` `MatMul4Bit.forward`: `ctx.tensors = (None, B)`
  — a 4-bit linear saves no input (its weight needs no gradient); backward dequantises the
  weight (`dequantize_4bit`) into a transient. (Before 0.49 it saved the input A as well.)
- transformers `loss/loss_utils.py` `ForCausalLMLoss`: `logits.float()`, labels padded and
  shifted (no shifted copy of the logits), `F.cross_entropy` = log_softmax (saves its fp32
  output) + nll_loss.
"""

from estimator.analytic.params import attention_linears, ffn_linears, linears_params
from estimator.analytic.precision import dtype_bytes
from estimator.specs import ModelSpec, TrainSetup
from estimator.specs.setup import LINEAR_TARGETS

FP32_BYTES = 4
INT32_BYTES = 4

PROCESS_BYTES = 432 * 1024**2
"""Resident set of an HF Trainer process on a CPU before its first step, beyond the model's
tensors: Python + torch + transformers + accelerate (+ peft, bitsandbytes) and what building
the model and the Trainer leaves. measured (VmRSS at `on_train_begin`, fp32 runs whose
weights were still unloaded mmap pages): 425–426 MiB for full fine-tunes, 438–441 MiB with
peft imported; benchmarks/bench_hf_memory.py, torch 2.13 CPU, transformers 5.25."""


def autocast_on(setup: TrainSetup) -> bool:
    """torch.autocast is active: HF Trainer's bf16/fp16 mixed precision (`bf16=True`)."""
    return setup.mixed_precision and setup.compute_dtype != "fp32"


def kbit_prepared(setup: TrainSetup) -> bool:
    """A 4/8-bit bitsandbytes base prepared as PEFT documents it for QLoRA:
    `prepare_model_for_kbit_training` (peft 0.21 utils/other.py) casts every parameter that
    is not quantised — embeddings, norms, lm_head — from 16 bits to fp32, so the residual
    stream is fp32."""
    return setup.weight_bits <= 8 and setup.trains_adapters


def unquantized_param_bytes(setup: TrainSetup) -> int:
    """Bytes per parameter of the weights a 4/8-bit base leaves unquantised (embeddings,
    norms, lm_head, router): fp32 after prepare_model_for_kbit_training."""
    return FP32_BYTES if kbit_prepared(setup) else 2


def residual_bytes(setup: TrainSetup) -> int:
    """Bytes per element of the residual stream = the dtype the embedding is stored in: fp32
    for a full fine-tune of an fp32 model (mixed precision or fp32), a 32-bit base or a
    k-bit base after prepare_model_for_kbit_training, else the 16-bit dtype the model was
    loaded in (`from_pretrained(dtype=torch.bfloat16)`)."""
    c = dtype_bytes(setup.compute_dtype)
    if c == FP32_BYTES or setup.weight_bits == 32 or kbit_prepared(setup):
        return FP32_BYTES
    if setup.method == "full" and setup.mixed_precision:
        return FP32_BYTES
    return c


def matmul_input_bytes(setup: TrainSetup) -> int:
    """Bytes of the tensor a base linear saves as its input: the compute dtype (autocast casts
    fp32 activations; pure training computes in the storage dtype)."""
    return dtype_bytes(setup.compute_dtype) if autocast_on(setup) else residual_bytes(setup)


def linear_output_bytes(setup: TrainSetup) -> int:
    """Bytes of a base linear's output: the compute dtype under autocast; a bitsandbytes 4/8-bit
    linear casts its output back to its input's dtype (`Linear4bit.forward`:
    `matmul_4bit(...).to(inp_dtype)`, bitsandbytes 0.50), the fp32 residual stream of a
    prepared k-bit base."""
    if setup.weight_bits <= 8:
        return residual_bytes(setup)
    return matmul_input_bytes(setup)


def linear_inputs_bytes(setup: TrainSetup, names: list[str], width: int,
                        num_tokens: float, *, input_grad: bool = True) -> float:
    """Saved inputs of the linears `names` that read one shared tensor of `width` features.

    Trained linears (full fine-tune) need their input: under autocast an fp32 input is cast
    once per linear (no cache for activations), else they share the tensor itself. Adapted
    linears (LoRA) keep their own copy each (lora_input_bytes); frozen ones keep nothing."""
    if setup.method != "full":
        return lora_input_bytes(setup, names, width, num_tokens, input_grad=input_grad)
    per_linear = autocast_on(setup) and residual_bytes(setup) == FP32_BYTES
    copies = len(names) if per_linear else 1
    return copies * num_tokens * width * matmul_input_bytes(setup)


def lora_input_bytes(setup: TrainSetup, names: list[str], width: int, num_tokens: float,
                     *, input_kept: bool = False, input_grad: bool = True) -> float:
    """PEFT adapters of the linears `names` reading one tensor of `width` features: each
    adapted linear's own input copy (c bytes under autocast, else its fp32 cast), lora_B's
    input A·x (rank wide) and, when lora_dropout > 0 and the input needs a gradient
    (`input_grad`), the dropout's noise tensor: on a CPU torch's `_dropout_impl` keeps
    `bernoulli_` noise in the input's dtype (fp32 after PEFT's cast; CUDA's fused
    native_dropout keeps a 1-byte mask — counted as the CPU's 4 bytes, an upper bound). An
    fp32 input without autocast or dropout is not copied: the adapters share it, and keep
    nothing extra when another op saves it already (`input_kept`: SDPA's output, o_proj's
    input)."""
    adapted = [n for n in names if n in setup.lora_targets]
    if not adapted:
        return 0.0
    c = dtype_bytes(setup.compute_dtype)
    a_bytes = c if autocast_on(setup) else FP32_BYTES
    shared = not autocast_on(setup) and residual_bytes(setup) == FP32_BYTES and (
        setup.lora_dropout == 0)
    copies = (0 if input_kept else 1) if shared else len(adapted)
    total = copies * num_tokens * width * a_bytes
    if setup.lora_dropout > 0 and input_grad:
        total += len(adapted) * num_tokens * width * FP32_BYTES
    return total + len(adapted) * num_tokens * setup.lora_rank * a_bytes


def norm_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: float,
                     width: int | None = None, *, input_grad: bool = True,
                     input_bytes: int | None = None) -> float:
    """One HF RMSNorm/LayerNorm: its input upcast to fp32 (T·w·4, the input itself when it
    is fp32) and the fp32 rstd (T·4; LayerNorm also the mean), when its input needs a
    gradient; the normalised input cast back to the input's dtype (`input_bytes`, the
    residual stream's by default) when its weight trains (full)."""
    w = model.hidden_size if width is None else width
    stats = 2 if model.norm == "layernorm" else 1
    total = num_tokens * (w * FP32_BYTES + stats * FP32_BYTES) if input_grad else 0.0
    if setup.method == "full":
        total += num_tokens * w * (input_bytes or residual_bytes(setup))
    return total


def attention_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int,
                          *, input_grad: bool = True) -> float:
    """One HF attention block: input norm, q/k/v inputs, (q/k norms), SDPA's q, k, v,
    output and logsumexp (eager: k and v repeated to all heads, fp32 softmax + its c-byte
    copy, output copy), o_proj's input, adapters."""
    c = dtype_bytes(setup.compute_dtype)
    h, heads, d = model.hidden_size, model.num_heads, model.head_dim
    batch, seq = setup.batch_size, setup.seq_len
    q_w, kv_w = heads * d, model.num_kv_heads * d
    total = norm_saved_bytes(model, setup, num_tokens, input_grad=input_grad)
    total += linear_inputs_bytes(setup, ["q_proj", "k_proj", "v_proj"], h, num_tokens,
                                 input_grad=input_grad)
    if model.qk_norm:  # per-head norms over the c-byte q and k projections
        for name, num_heads in (("q_proj", heads), ("k_proj", model.num_kv_heads)):
            grad = input_grad or setup.method == "full" or name in setup.lora_targets
            total += norm_saved_bytes(model, setup, num_tokens * num_heads, d,
                                      input_grad=grad, input_bytes=linear_output_bytes(setup))
    if setup.attention == "eager":
        total += num_tokens * q_w * c * 3  # q, repeated k, repeated v
        total += batch * heads * seq * seq * (FP32_BYTES + (c if c != FP32_BYTES else 0))
    else:
        total += num_tokens * (2 * q_w + 2 * kv_w) * c + batch * heads * seq * FP32_BYTES
    if setup.method == "full":  # o_proj's input: SDPA's saved output, eager's output copy
        total += num_tokens * q_w * c if setup.attention == "eager" else 0
    else:
        total += lora_input_bytes(setup, ["o_proj"], q_w, num_tokens,
                                  input_kept=setup.attention != "eager")
    return total


def ffn_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: float, width: int,
                    *, with_norm: bool = True) -> float:
    """One HF FFN: its norm, gate/up inputs, g (SiLU), silu(g) and u (the product), the
    down_proj input (GELU MLP: fc input, GELU input, fc2 input), adapters."""
    out = linear_output_bytes(setup)
    total = norm_saved_bytes(model, setup, num_tokens) if with_norm else 0.0
    first = ["gate_proj", "up_proj"] if model.mlp == "swiglu" else ["up_proj"]
    total += linear_inputs_bytes(setup, first, model.hidden_size, num_tokens)
    total += (3 if model.mlp == "swiglu" else 1) * num_tokens * width * out
    if setup.method == "full":
        total += num_tokens * width * out
    else:
        total += lora_input_bytes(setup, ["down_proj"], width, num_tokens)
    return total


def mla_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> float:
    """Multi-head latent attention in HF's DeepSeek-V2/V3 code (`DeepseekV3Attention`),
    derived, not recorded: the inputs of the low-rank projections (q_a and kv_a read the
    normed input; q_b and kv_b the fp32-upcast latents of their RMSNorms), SDPA's q, k, v,
    output and logsumexp, o_proj's input."""
    mla, c = model.mla, dtype_bytes(setup.compute_dtype)
    assert mla is not None
    heads, qk = model.num_heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim
    total = linear_inputs_bytes(setup, ["q_proj", "k_proj"], model.hidden_size, num_tokens)
    for rank, name in ((mla.q_lora_rank, "q_proj"), (mla.kv_lora_rank, "k_proj")):
        if rank:
            total += norm_saved_bytes(model, setup, num_tokens, rank)
            total += linear_inputs_bytes(setup, [name], rank, num_tokens)
    total += num_tokens * heads * (2 * qk + 2 * mla.v_head_dim) * c
    total += setup.batch_size * heads * setup.seq_len * FP32_BYTES
    if setup.method != "full":
        total += lora_input_bytes(setup, ["o_proj"], heads * mla.v_head_dim, num_tokens)
    return total


def adapts_experts(setup: TrainSetup) -> bool:
    """PEFT adapts transformers 5's fused 3-D expert tensors (`gate_up_proj`, `down_proj`)
    only with target_modules='all-linear' (peft 0.21 wraps them in a ParamWrapper); module
    names (gate_proj, up_proj, down_proj) do not reach them. An nvfree setup listing all
    seven Llama linears is what `--lora-targets all-linear` expands to."""
    return setup.trains_adapters and set(LINEAR_TARGETS) <= set(setup.lora_targets)


def peft_target_modules(setup: TrainSetup) -> str | list[str]:
    """What a user passes to `peft.LoraConfig(target_modules=…)` for this setup: 'all-linear'
    when the setup lists every Llama linear (the expansion of `--lora-targets all-linear`, which
    also reaches fused experts: adapts_experts), else the module names."""
    return "all-linear" if adapts_experts(setup) else list(setup.lora_targets)


def experts_train(setup: TrainSetup) -> bool:
    """Routed experts need weight gradients: a full fine-tune, or LoRA on them
    (adapts_experts)."""
    return setup.method == "full" or adapts_experts(setup)


def moe_saved_bytes(model: ModelSpec, setup: TrainSetup, num_tokens: int) -> float:
    """One HF MoE FFN with transformers' default `grouped_mm` experts
    (integrations/moe.py `grouped_mm_experts_forward`; recorded on Mixtral): the router's
    input (when it trains), fp32 softmax, top-k ids and weights; per routed token-expert pair
    the down output (the routing weights' gradient needs it), the gate/up output (SiLU's
    input), silu(g), and when the experts train the gathered input and the product (down's
    input) — in the weights' dtype, since
    autocast does not cast grouped_mm; sort and scatter indices; shared and side-by-side dense FFNs
    as dense FFNs."""
    moe = model.moe
    assert moe is not None
    h, i = model.hidden_size, moe.expert_intermediate_size
    e = residual_bytes(setup)
    pairs = num_tokens * moe.routed_experts_per_token
    k, width = moe.num_experts_per_token, moe.num_experts + moe.num_zero_experts
    total = num_tokens * (width * FP32_BYTES + k * 12 + FP32_BYTES)
    trains = experts_train(setup)
    if trains:
        total += num_tokens * h * matmul_input_bytes(setup)  # router input
        total += pairs * (h + i) * e  # gathered input, down input
        total += moe.num_experts * INT32_BYTES  # grouped_mm's expert offsets (weight grads)
    if adapts_experts(setup):  # ParamWrapper's merged W + BA, kept for the input gradient
        total += moe.num_experts * 3 * h * i * e
        total += num_tokens * width * FP32_BYTES  # the adapted router's logits (recorded)
    total += pairs * ((h + 3 * i) * e + FP32_BYTES + 3 * 8)
    shared = moe.shared_expert_intermediate_size or i
    total += moe.num_shared_experts * ffn_saved_bytes(model, setup, num_tokens, shared,
                                                      with_norm=False)
    total += moe.dense_mlps_per_layer * ffn_saved_bytes(
        model, setup, num_tokens, model.intermediate_size, with_norm=False)
    return total


def layer_saved_bytes(model: ModelSpec, setup: TrainSetup, *, moe_layer: bool,
                      first: bool = False) -> float:
    """Everything one HF decoder layer saves for backward (bytes). `first`: the first layer
    of a LoRA model, whose input (the frozen embedding's output) needs no gradient, so its
    input norm keeps nothing. Norms beyond the two of a Llama block (Gemma-2/3, OLMo-2
    post-norms) each save like one norm."""
    tokens = setup.batch_size * setup.seq_len
    grad_in = not (first and setup.method != "full")
    attention = (mla_saved_bytes(model, setup, tokens)
                 + norm_saved_bytes(model, setup, tokens, input_grad=grad_in)
                 if model.mla is not None else
                 attention_saved_bytes(model, setup, tokens, input_grad=grad_in))
    total = model.attentions_per_layer * attention
    extra_norms = (model.norms_per_layer or 2) - 2
    total += extra_norms * norm_saved_bytes(model, setup, tokens)
    if moe_layer:
        return total + norm_saved_bytes(model, setup, tokens) + moe_saved_bytes(
            model, setup, tokens)
    return total + ffn_saved_bytes(model, setup, tokens, model.intermediate_size)


def rope_table_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """RoPE's cos and sin, [1, s, d] in the residual dtype, saved once and shared by every
    layer (`LlamaRotaryEmbedding.forward`: position ids of one sequence broadcast over the
    batch). Under checkpointing they are recomputed with the layer."""
    if model.position != "rope":
        return 0
    return 2 * setup.seq_len * model.head_dim * residual_bytes(setup)


def head_saved_bytes(model: ModelSpec, setup: TrainSetup) -> float:
    """Final norm; when lm_head and the embedding train (full fine-tune) lm_head's input and
    the embedding's int64 token ids."""
    tokens = setup.batch_size * setup.seq_len
    total = norm_saved_bytes(model, setup, tokens)
    if setup.method == "full":
        total += tokens * (model.hidden_size * matmul_input_bytes(setup) + 8)
    return total


def activation_bytes(model: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Saved activations of one micro-batch at the start of backward, by part.

    HF gradient checkpointing (`GradientCheckpointingLayer`, torch.utils.checkpoint,
    use_reentrant=False: transformers' default) keeps every layer's input (T·h·r) and
    recomputes one layer at a time in backward."""
    if setup.method == "inference":
        return {"layers": 0, "recompute": 0, "head": 0}
    tokens = setup.batch_size * setup.seq_len
    num_moe = model.num_moe_layers
    num_dense = model.num_layers - num_moe
    kinds = [(moe, n) for moe, n in ((False, num_dense), (True, num_moe)) if n]
    per = {moe: layer_saved_bytes(model, setup, moe_layer=moe) for moe, _ in kinds}
    head = round(head_saved_bytes(model, setup))
    if setup.checkpointing:
        block_input = tokens * model.hidden_size * residual_bytes(setup)
        return {"layers": block_input * model.num_layers, "recompute": round(max(per.values())),
                "head": head}
    first_moe = kinds[0][0]
    first = layer_saved_bytes(model, setup, moe_layer=first_moe, first=True)
    layers = sum(per[moe] * n for moe, n in kinds) - per[first_moe] + first
    return {"layers": round(layers) + rope_table_bytes(model, setup), "recompute": 0,
            "head": head}


def logits_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """The loss head at its peak, log_softmax's backward: its saved fp32 output, the incoming
    gradient (nll_loss's backward, dense) and the fp32 gradient it forms — 12 B per logit,
    whatever the compute dtype (ForCausalLMLoss upcasts the logits first). The forward's
    lm_head output (c) + fp32 upcast (4) + log_softmax output (4) is below it."""
    if setup.method == "inference":
        return setup.batch_size * model.vocab_size * FP32_BYTES
    return setup.batch_size * setup.seq_len * model.vocab_size * 3 * FP32_BYTES


def tied_gradient_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Elements of the transient gradients a tied embedding adds at the end of backward (times
    the gradient's bytes): lm_head's gradient is already the weight's .grad when the
    embedding's backward forms its own dense V×h gradient (`embedding_dense_backward`, zeros +
    index add) and autograd's AccumulateGrad adds the two out of place — two V×h tensors beside
    the .grad (recorded: 3.5·V·h·4 B peak over a tied lm_head + embedding backward, torch 2.13
    CPU; tests/torch/test_hf_terms.py). Only when the embedding trains (full fine-tune)."""
    if setup.method != "full" or not model.tied_embeddings:
        return 0
    return 2 * model.vocab_size * model.hidden_size


HEAP_RETENTION_FRACTION = 0.6
"""Share of one step's activation traffic that glibc's heap keeps resident beyond the live
tensors on a CPU. Under glibc's dynamic mmap threshold every tensor below 32 MiB comes from
the heap after the first frees, and the holes HF's eager code leaves (the forward's transients
— fp32 norm upcasts, RoPE halves, casts — between the tensors it keeps) are only partly
reused: the heap stays above the live bytes (measured with mallinfo2: 1346–1396 MiB of heap
against 666 MiB of peak live small tensors, LoRA, 1024 tokens). measured, not derived (a
property of the allocator): (peak RSS − the predicted tensors − PROCESS_BYTES − kernel caches)
/ the activations the layers allocate per step (without checkpointing: recomputation
allocates them too) is 0.27–0.93 over eight fp32 HF runs, median 0.6
(benchmarks/bench_hf_memory.py; docs/accuracy.md). A fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_=131072) or tcmalloc removes it: the same LoRA run peaked at 1956
instead of 2490 MiB, 15 MiB above the tensor prediction + PROCESS_BYTES."""


def heap_retention_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """glibc's retained heap of an HF run on a CPU: HEAP_RETENTION_FRACTION × the activation
    bytes one step allocates (activation_bytes without checkpointing) + what loading left
    (load_residue_bytes; loader_arena_bytes in the loader's worker arenas)."""
    traffic = activation_bytes(model, setup.model_copy(update={"checkpointing": False}))
    return (round(HEAP_RETENTION_FRACTION * sum(traffic.values()))
            + load_residue_bytes(model, setup) + loader_arena_bytes(model, setup))


MMAP_THRESHOLD_MAX = 32 * 1024**2
"""glibc's ceiling on its dynamic mmap threshold on 64-bit (malloc.c
DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB × sizeof(long)): a larger request is always mmapped and
returned to the OS when freed."""


def loader_arena_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Heap that transformers' threaded weight loading leaves in its worker threads' glibc
    arenas, where the training thread never allocates: the per-expert copies of an MoE's
    routed experts, when they are cast to a wider dtype than the checkpoint's.

    transformers 5.25 `core_model_loading.py`: without on-the-fly quantisation the loader
    materialises every checkpoint tensor in a `ThreadPoolExecutor(GLOBAL_WORKERS)`
    (`GLOBAL_WORKERS = min(4, os.cpu_count())`; off with HF_DEACTIVATE_ASYNC_LOAD=1):
    `_materialize_copy` = `tensor[...]` (a view of the mmapped safetensors file) then
    `.to(dtype)` — a real copy only when the load dtype differs from the checkpoint's. glibc
    serves each worker thread from its own arena (up to 8 × cores arenas). Published MoE
    checkpoints store one tensor per expert and linear (`experts.{e}.w1/w2/w3`); the
    `WeightConverter` of `conversion_mapping.py` (`MergeModulelist`, `Concatenate`) stacks
    them into transformers 5's fused 3-D experts in the main thread and frees the per-expert
    copies. Once the first freed copy has raised glibc's dynamic mmap threshold above an
    expert matrix, the copies come from the workers' heaps; freed, they stay there as holes
    (glibc returns only a heap's top), and the main thread, bound to its own arena, never
    reuses them. The dense weights' casts are kept as the parameters: no residue (measured:
    0–1 MiB free in the worker arenas after loading each dense model of the matrix).

    The term is all routed experts' parameters in the load dtype (4 B: an fp32 load of a
    16-bit checkpoint, as published models are; a 16-bit load makes no copy), 0 when one
    expert matrix is over glibc's 32 MiB mmap ceiling (MMAP_THRESHOLD_MAX: Mixtral 8x7B's
    4096 × 14336 in fp32 is mmapped and unmapped); an upper bound, reached when the workers
    run ahead of the main thread's merges (they are given every tensor at once), about one
    layer's copies when they do not. gpt-oss publishes its experts fused (MXFP4
    `gate_up_proj_blocks`), nothing to merge: 0 (ModelSpec marks it only by its expert
    biases). measured (mallinfo2 / malloc_info after `from_pretrained`, torch 2.13 CPU, glibc
    2.36, 2 workers): 611–663 MiB free in the two worker arenas against 864 MiB of per-expert
    fp32 copies for the matrix's Mixtral 270M — the copies of the last layers sit at the heaps'
    tops and are returned; bf16 load: 0; HF_DEACTIVATE_ASYNC_LOAD=1: 0 beyond the main arena's.
    MALLOC_ARENA_MAX=1 removes it: the Mixtral 270M full fp32 run peaked at 5591 instead of
    6229 MiB (benchmarks/probe_hf_heap.py, docs/accuracy.md §6)."""
    if model.moe is None or setup.weight_bits <= 8 or residual_bytes(setup) != FP32_BYTES:
        return 0
    moe = model.moe
    if model.hidden_size * moe.expert_intermediate_size * FP32_BYTES > MMAP_THRESHOLD_MAX:
        return 0  # every copy is mmapped, and unmapped when freed
    if moe.expert_bias:  # gpt-oss, the one MoE with expert biases, publishes fused experts
        return 0
    experts = linears_params(ffn_linears(model, moe.expert_intermediate_size, moe.num_experts,
                                         moe.expert_bias, routed=True))
    return experts * model.num_moe_layers * FP32_BYTES


def load_residue_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Heap that `from_pretrained` leaves on a CPU when it converts weights instead of mapping
    them: bitsandbytes quantises each linear from a materialised 16-bit copy (the checkpoint's
    dtype; published checkpoints are 16-bit), and glibc keeps those copies' memory (measured:
    4437 MiB more RSS after building a 1.1B 4-bit model from an fp32 checkpoint than after the
    fp32 LoRA build, whose 4.0 GiB of linears were mapped)."""
    if setup.weight_bits > 8:
        return 0
    from estimator.analytic.memory import quantized_linear_params

    return quantized_linear_params(model)[0] * 2


def attention_names(model: ModelSpec) -> list[str]:
    """PEFT names of one attention block's linears."""
    return [lin.name for lin in attention_linears(model)]


HF_BLOCK_BYTES: dict[tuple[str, str], dict[str, tuple[float, float, float, float, float, int]]] = {
    ("full", "fp32"): {"forward": (96.23, 36.11, 48.10, 72.20, 0.0, 35),
                       "backward": (252.34, 36.17, 72.15, 72.31, 0.0, 56),
                       "recompute": (76.23, 36.11, 48.10, 56.20, 0.0, 29)},
    ("lora", "fp32"): {"forward": (152.20, 92.10, 76.09, 128.18, 8.21, 63),
                       "backward": (296.30, 64.15, 92.13, 88.27, 0.31, 66),
                       "recompute": (112.20, 92.10, 76.09, 112.18, 8.21, 55)},
    ("qlora", "fp32"): {"forward": (180.20, 104.10, 84.09, 136.18, 8.21, 70),
                        "backward": (336.30, 72.15, 100.13, 88.27, 0.31, 94),
                        "recompute": (140.20, 104.10, 84.09, 120.18, 8.21, 62)},
    ("full", "mixed"): {"forward": (114.23, 18.11, 40.10, 56.20, 0.0, 49),
                        "backward": (294.34, 18.17, 62.15, 62.31, 0.0, 76),
                        "recompute": (100.23, 18.11, 40.10, 44.20, 0.0, 43)},
    ("lora", "mixed"): {"forward": (180.20, 58.10, 50.09, 64.18, 4.21, 95),
                        "backward": (304.30, 44.15, 58.13, 44.27, 0.31, 98),
                        "recompute": (160.20, 58.10, 50.09, 56.18, 4.21, 87)},
    ("qlora", "mixed"): {"forward": (210.20, 118.10, 102.09, 152.18, 4.21, 113),
                         "backward": (386.30, 96.15, 116.13, 116.27, 0.31, 138),
                         "recompute": (172.20, 118.10, 102.09, 136.18, 4.21, 104)},
}
"""Memory-bound bytes per token of one HF decoder layer, per (method, precision regime) and
pass, as elementwise.MEMORY_BOUND_BYTES holds them for the bundled trainer: (bytes per unit of
h, i, H·d, K·d, r·adapted linears; memory-bound aten calls per layer). What the eager code
above moves beyond the trainer's: the fp32 round trip of every RMSNorm (`to(float32)`, pow,
mean, rsqrt, mul, `to(input_dtype)`, weight mul), RoPE as `rotate_half` (slices, neg, cat,
two muls and an add per q and k), and PEFT's `result + lora_B(lora_A(dropout(x))) * scaling`
per adapted linear (an input cast, the scaling multiply and the add, each an out-sized
pass); bitsandbytes' `MatMul4Bit` adds its fp32 residual stream (prepare_model_for_kbit_
training) and the output cast. Recorded, not derived by hand: benchmarks/record_hf_block_bytes.py
(transformers 5.25, peft 0.21, bitsandbytes 0.50, torch 2.13 CPU; a TorchDispatchMode sums
the bytes every non-GEMM, non-attention, non-view aten call reads + writes over one HF Trainer
optimizer step, tests/torch/hf_build.record_hf_step; per layer per token = the double
difference of 1/2 layers × 1/2 sequences of 32 tokens; least squares over 5–6 Llama shapes,
residual ≤ 0.04 %); 'recompute' = the checkpointed backward less the plain one.
tests/torch/test_hf_block_bytes.py re-records two shapes the fit did not use."""
