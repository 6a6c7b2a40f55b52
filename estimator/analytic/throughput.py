"""Step time, tokens/s, wall time and cost from the per-op model (flops.py) and efficiency
curves (efficiency.py): step_seconds = Σ_ops calls · (overhead + work / rate(work)), ops run one
after another (eager execution on one device; the overlap of communication with compute on
several devices is parallel.overlap_ops)."""

from estimator.analytic import dispatch as DP
from estimator.analytic import elementwise as EW
from estimator.analytic import flops as F
from estimator.analytic import loss_optim as SO
from estimator.analytic.efficiency import (
    LORA_RANK_PREFIX,
    call_seconds,
    cold_gemms,
    profile_curve,
)
from estimator.analytic.inference import decode_tokens_per_second
from estimator.analytic.model_state import (
    autocasting,
    block_linear_params,
    casts_fp32_weights,
    gradient_bytes,
    quantized_linear_params,
    trainer_upcasts_base,
)
from estimator.analytic.params import layer_groups
from estimator.analytic.runtime import pads_expert_rows
from estimator.specs import (
    CalibrationProfile,
    Device,
    ModelSpec,
    OpTime,
    ParamCounts,
    Throughput,
    TrainSetup,
)
from estimator.units import SECONDS_PER_HOUR

DTYPED_CLASSES = ("matmul", "matmul_dgrad", "matmul_cold", "matmul_cold_dgrad", "matmul_wgrad",
                  "attention", "lora", "elementwise")
"""Op classes whose calibrated curve depends on the compute dtype (memory-bound work in the
compute dtype's kernels for 'elementwise'; a profile without 'elementwise.<dtype>' falls back
to its 'elementwise' curve)."""
TRAINABLE_TENSORS_PER_LINEAR_LORA = 2


def num_trainable_tensors(model: ModelSpec, setup: TrainSetup) -> int:
    """Trainable tensors the optimizer loops over (count)."""
    if setup.method == "inference":
        return 0
    per_layer = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        for lin in linears:
            if setup.method == "full":
                per_layer += lin.count * num_layers * (2 if lin.bias else 1)
            elif lin.name in setup.lora_targets:
                per_layer += lin.count * num_layers * TRAINABLE_TENSORS_PER_LINEAR_LORA
    extra = 0
    if setup.method == "full":  # norms, embedding, final norm, lm_head, MoE routers
        router = 2 if model.moe is not None and model.moe.expert_bias else 1
        extra = (2 * model.num_layers + (2 if model.tied_embeddings else 3)
                 + model.num_moe_layers * router)
    return max(1, round(per_layer + extra))


def step_ops(model: ModelSpec, setup: TrainSetup, params: ParamCounts, *,
             pad_experts: bool = False, fused: bool = False) -> list[F.Op]:
    """All ops of one optimizer step (grad_accum micro-batches + one optimizer step);
    `pad_experts` as in flops.block_linear_ops; `fused`: the block's elementwise work as a
    compiling stack fuses it (elementwise.fused_token_bytes)."""
    micro = [*F.block_linear_ops(model, setup, pad_experts=pad_experts),
             *F.attention_core_ops(model, setup),
             *EW.elementwise_ops(model, setup, pad_experts=pad_experts, fused=fused),
             *SO.head_ops(model, setup),
             *SO.lm_head_grad_ops(model, setup)]
    if setup.weight_bits <= 8 or trainer_upcasts_base(setup):  # per-matmul weight transforms
        block = quantized_linear_params(model)[0]
        micro += SO.dequant_ops(model, setup, block) + SO.upcast_ops(model, setup, block)
    casts = autocast_copy_params_per_pass(model, setup, params)
    micro += SO.cast_ops(setup, casts, trainable=setup.method == "full")
    tensors = num_trainable_tensors(model, setup)
    if setup.trains_adapters and autocasting(setup):
        micro += SO.adapter_cast_ops(setup, params.trainable, tensors)
    a = setup.grad_accum
    ops = micro if a == 1 else [op._replace(num_calls=op.num_calls * a) for op in micro]
    return (ops + SO.gradient_alloc_ops(setup, gradient_bytes(setup, params), tensors)
            + SO.optimizer_ops(setup, params.trainable, tensors))


def autocast_copy_params_per_pass(model: ModelSpec, setup: TrainSetup,
                                  params: ParamCounts) -> int:
    """fp32 matmul weights autocast casts in one forward pass (all blocks + lm_head)."""
    if not casts_fp32_weights(setup):
        return 0
    return block_linear_params(model, params) + model.vocab_size * model.hidden_size


def timed_ops(model: ModelSpec, setup: TrainSetup, params: ParamCounts, device: Device,
              profile: CalibrationProfile | None) -> list[F.Op]:
    """step_ops with the calibration's choices: GEMMs that read cold operands on the
    `matmul_cold` curve (weight gradients on `matmul_wgrad`, input gradients on
    `matmul_cold_dgrad`, flops.cold_gemm_class) when the weight set exceeds the private cache
    (efficiency.cold_gemms), the others on `matmul` (input gradients on `matmul_dgrad`,
    flops.hot_gemm_class),
    and, on a CPU, the framework's per-op dispatch/autograd cost (flops.dispatch_ops), the
    gradients as one fresh region per micro-batch (flops.fresh_gradient_op) and the fresh pages
    of the loss head's large buffers (flops.loss_head_fresh_ops). On an
    accelerator the host-side dispatch overlaps the asynchronous kernels and is left out;
    under a compiling stack (TPU/XLA, Trainium/Neuron, Gaudi graph mode) the block's
    elementwise work is fused (elementwise.fused_token_bytes)."""
    ops = step_ops(model, setup, params,
                   pad_experts=pads_expert_rows(model, setup, device.backend),
                   fused=EW.fuses_elementwise(device.backend))
    cold = cold_gemms(profile, setup.compute_dtype, F.matmul_weight_bytes(model, setup))
    ops = [op._replace(op_class=F.cold_gemm_class(op.name)
                       if cold and F.reads_cold_operands(op.name, setup)
                       else F.hot_gemm_class(op.name))
           if op.op_class == "matmul" else op for op in ops]
    if device.kind == "cpu":
        timed = sum(op.num_calls for op in ops
                    if carries_dispatch(profile, op.op_class, setup.compute_dtype))
        ops += DP.dispatch_ops(model, setup, num_trainable_tensors(model, setup), timed)
        ops = [SO.fresh_gradient_op(op, setup) if op.name == "gradients.alloc" else op
               for op in ops]
        ops += [op._replace(num_calls=op.num_calls * setup.grad_accum)  # no aten calls
                for op in SO.loss_head_fresh_ops(model, setup)]
    return ops


def carries_dispatch(profile: CalibrationProfile | None, op_class: str, dtype: str) -> bool:
    """Whether an op's curve includes the framework's per-call cost: a curve timed through
    Python (the microbenchmarks, the defaults) does; a curve with no per-call overhead, timed
    on the kernel alone (calibrate/block_rates.py: the executor's own memory-bound calls),
    does not, so those calls stay in the dispatch.autograd count."""
    curve = profile_curve(profile, op_class, dtype)
    return curve is None or curve.overhead_seconds > 0


def op_class_key(op_class: str, dtype: str) -> str:
    """The class an op's time is reported (and corrected) under: 'matmul.bf16', 'memory' …;
    adapter GEMMs of every rank under 'lora.<dtype>'."""
    if op_class.startswith(LORA_RANK_PREFIX):
        op_class = "lora"
    return f"{op_class}.{dtype}" if op_class in DTYPED_CLASSES else op_class


def correction(profile: CalibrationProfile | None, key: str) -> float:
    """The per-op-class time multiplier `nvfree validate --update-profile` fitted from whole
    runs (1 when none was fitted)."""
    return profile.corrections.get(key, 1.0) if profile is not None else 1.0


def ops_seconds(ops: list[F.Op], device: Device, profile: CalibrationProfile | None,
                dtype: str) -> tuple[list[OpTime], bool]:
    """Time every op; returns the per-op times (merged by name) and whether all came from
    measured curves. One call's time is computed once per distinct class and work (a GEMM's
    forward and backward calls do the same work)."""
    merged: dict[str, tuple[str, int, int, float]] = {}  # name -> class, flops, bytes, seconds
    per_call: dict[tuple[str, float, float, float], tuple[float, bool]] = {}
    all_measured = True
    for op in ops:
        work = op.op_class, op.flops_per_call, op.bytes_per_call, op.rate_flops
        if work not in per_call:
            per_call[work] = call_seconds(device, profile, dtype, *work)
        one, measured = per_call[work]
        all_measured &= measured
        klass = op_class_key(op.op_class, dtype)
        one *= correction(profile, klass)
        _, flops, moved, seconds = merged.get(op.name, (klass, 0, 0, 0.0))
        merged[op.name] = (klass, round(op.flops) + flops, round(op.bytes_moved) + moved,
                           one * op.num_calls + seconds)
    return [OpTime(name=name, op_class=klass, flops=flops, bytes_moved=moved, seconds=seconds)
            for name, (klass, flops, moved, seconds) in merged.items()], all_measured


def throughput(model: ModelSpec, setup: TrainSetup, device: Device, params: ParamCounts,
               profile: CalibrationProfile | None, *, weight_storage_bytes: int,
               kv_bytes: int) -> Throughput:
    """Step time and rates for the setup on the device."""
    dtype = setup.compute_dtype
    ops = timed_ops(model, setup, params, device, profile)
    times, calibrated = ops_seconds(ops, device, profile, dtype)
    step_seconds = sum(t.seconds for t in times)
    tokens = setup.tokens_per_step
    tokens_per_second = tokens / step_seconds
    total_seconds = cost = None
    if setup.num_tokens is not None:
        total_seconds = setup.num_tokens / tokens_per_second
        if device.price_per_hour_usd is not None:
            cost = total_seconds / SECONDS_PER_HOUR * device.price_per_hour_usd
    decode = None
    if setup.method == "inference":
        decode = decode_tokens_per_second(model, setup, device, params, weight_storage_bytes,
                                          kv_bytes)
    return Throughput(
        step_flops=round(sum(op.flops for op in ops)),
        model_flops_per_token=F.model_flops_per_token(
            model, setup, params.active_per_token, params.embedding),
        step_seconds=step_seconds, tokens_per_second=tokens_per_second, ops=times,
        compute_dtype=dtype, calibrated=calibrated and profile is not None,
        total_seconds=total_seconds, cost_usd=cost, decode_tokens_per_second=decode)
