"""Kernel launches per step: how many ATen ops a training step dispatches (per block, per
trainable tensor, per routed expert hit), each costing the backend's fixed per-call time on
small models (efficiency.py's dispatch class)."""

from dataclasses import dataclass

from estimator.analytic.flops import Op
from estimator.specs import ModelSpec, TrainSetup

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
                                    setup.tokens_per_micro_batch) + moe.num_shared_experts
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
