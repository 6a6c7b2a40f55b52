"""Model states on one device, one named term per function: weights (quantised or not), master
weights, LoRA adapters, gradients, optimizer states and the optimizer step's transient buffers,
and the largest tensors they are made of. Unsharded: sharding.py divides them over ZeRO ranks,
memory.py composes them into the peak."""

import functools

from estimator.analytic.frameworks import OWN_TERMS, hf, terms
from estimator.analytic.params import layer_groups, lora_params
from estimator.analytic.precision import dtype_bytes, int8_bytes, nf4_bytes
from estimator.specs import Device, ModelSpec, ParamCounts, TrainSetup

FP32_BYTES = 4


ADAM8BIT_BLOCK = 256
"""bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values (Dettmers et al. 2022,
8-bit Optimizers via Block-wise Quantization)."""


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


def trainer_upcasts_base(setup: TrainSetup) -> bool:
    """The bundled trainer's LoRA with a bf16 base under fp32 compute
    (TrainSetup.upcasts_frozen_base); other frameworks build the model in fp32 for it."""
    return setup.upcasts_frozen_base and setup.framework == "nvfree"


def base_storage_bytes(setup: TrainSetup) -> int:
    """Bytes per parameter of a frozen base (LoRA), and of what a 4/8-bit base leaves
    unquantised (embeddings, norms, router, lm_head), in the bundled trainer and frameworks that
    build the model in its storage dtype (executor/build.py storage_dtype): fp32 for a 32-bit
    base or fp32 compute, else the compute dtype's. HF loads as the user asks instead
    (frameworks/hf.py unquantized_param_bytes). The bundled trainer's LoRA with a 16-bit base
    under fp32 compute keeps the base in bf16 (TrainSetup.upcasts_frozen_base; its fp32 norms,
    ~2·h per layer, are left at 2 B)."""
    if trainer_upcasts_base(setup):
        return 2
    if setup.weight_bits == 32 or setup.compute_dtype == "fp32":
        return FP32_BYTES
    return dtype_bytes(setup.compute_dtype)


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
        storage = (base_storage_bytes(setup) if setup.framework != "hf"
                   else FP32_BYTES if setup.weight_bits == 32 else 2)
        return {"weights": base * storage + copies, "quant_scales": 0}
    quantized, rows = quantized_linear_params(model)
    if setup.framework in OWN_TERMS:  # which linears the framework quantises
        quantized, rows = terms(setup.framework).quantized_linear_params(model)
    rest = (base - quantized) * (hf.unquantized_param_bytes(setup) if setup.framework == "hf"
                                 else base_storage_bytes(setup))
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
