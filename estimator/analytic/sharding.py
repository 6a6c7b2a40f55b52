"""Model states over data-parallel ranks: ZeRO stages 1–3 (Rajbhandari et al. 2020) shard
optimizer states, gradients and parameters; routed experts split by expert parallelism. Scalar
or numpy-array device counts alike (the planner's sweeps), without importing numpy."""

import functools
import math

from estimator.analytic.model_state import (
    autocasting,
    largest_layer_params,
    routed_expert_params,
    trainable_bytes_per_param,
)
from estimator.analytic.params import layer_groups
from estimator.analytic.precision import dtype_bytes
from estimator.specs import ModelSpec, ParamCounts, TrainSetup


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


def replicated_nf4_bytes(model: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """The bundled trainer's 4-bit base under ZeRO-3: the NF4 codes and block scales are
    buffers (executor/nf4.py NF4Frozen), and FSDP2's fully_shard shards parameters only, so
    every rank keeps the whole 4-bit base (executor/fsdp.py); {'codes', 'scales'} in bytes,
    zeros where the base is sharded or not 4-bit (HF + bitsandbytes stores it as parameters,
    bnb_4bit_quant_storage, and FSDP shards it)."""
    if not (setup.framework == "nvfree" and setup.weight_bits == 4 and setup.zero_stage >= 3
            and setup.num_devices > 1 and setup.method != "full"):
        return {"codes": 0, "scales": 0}
    from estimator.analytic.model_state import quantized_linear_params
    from estimator.analytic.precision import nf4_bytes

    return nf4_bytes(quantized_linear_params(model)[0], double_quant=setup.double_quant)


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
    codes = replicated_nf4_bytes(model, setup)["codes"]
    if codes:  # only the block's adapters and norms are gathered: the codes are never sharded
        per_param = dtype_bytes(setup.compute_dtype) if autocasting(setup) else (
            trainable_bytes_per_param(setup))
        return math.ceil(params.trainable / model.num_layers) * per_param
    return math.ceil(largest_layer_params(model) * stored_bytes / params.total)
