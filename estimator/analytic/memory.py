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

This module composes the peak; the terms live beside it: model_state.py (weights, master
weights, adapters, gradients, optimizer states), activations.py (saved activations),
micro_batch.py (logits/loss buffers, dequantised weights, KV cache), runtime.py (the process
beyond tensors: runtime, caches, heap, OS reserve), sharding.py (ZeRO and expert parallelism)
and frameworks/ (what each framework adds or saves differently).
"""

from estimator.analytic.activations import activation_bytes
from estimator.analytic.frameworks import as_run
from estimator.analytic.micro_batch import dequant_transient_bytes, kv_cache_bytes, loss_phase_terms
from estimator.analytic.model_state import (
    adapter_bytes,
    autocast_copy_params,
    autocasting,
    backward_step_gradient_bytes,
    gradient_bytes,
    master_weight_bytes,
    optimizer_state_bytes,
    optimizer_transient_bytes,
    quantized_linear_params,  # noqa: F401 (frameworks/hf.py imports it from here)
    trainable_bytes_per_param,
    weight_bytes,
)
from estimator.analytic.precision import dtype_bytes
from estimator.analytic.runtime import (
    expert_kernel_cache_bytes,
    heap_retention_bytes,
    os_reserve_bytes,
    pads_expert_rows,
    runtime_overhead_bytes,
    step_runtime_bytes,
)
from estimator.analytic.sharding import (
    ZERO_MIN_STAGE,
    gathered_params_bytes,
    replicated_nf4_bytes,
    routed_fractions,
    sharded_bytes,
)
from estimator.analytic.uncertainty import band_fractions, lower_bytes, upper_bytes
from estimator.specs import Device, MemoryBreakdown, ModelSpec, ParamCounts, TrainSetup

HOST_TERMS = {"optimizer": ("optimizer_states", "master_weights", "optimizer_transient",
                             "gradients"),
              "optimizer_and_params": ("optimizer_states", "master_weights",
                                       "optimizer_transient", "gradients", "weights",
                                       "quant_scales", "adapter_weights")}
"""Terms offload keeps in host memory. ZeRO-Offload (Ren et al. 2021, §4.1: the 16-bit
parameters stay on the GPU; the 16-bit gradients, the fp32 master copy and the optimizer
states live in CPU memory, where the update runs) keeps the reduced, sharded gradients on the
host with the optimizer; ZeRO-Infinity parameter offload and FSDP2's CPUOffloadPolicy (torch
fsdp/_fully_shard/_fsdp_api.py: "offloads parameters, gradients, and optimizer states to
CPU") also the sharded parameters, frozen and trainable. The device keeps what a step is
working on: the gathered block (gathered_params) and activations."""


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

    whole = replicated_nf4_bytes(model, setup)  # FSDP2 leaves the NF4 buffers whole
    return {
        "weights": shard("weights", stored - whole["codes"], w_share) + whole["codes"],
        "autocast_copies": copies,
        "quant_scales": shard("quant_scales", weights["quant_scales"] - whole["scales"],
                              w_share) + whole["scales"],
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
    grads = state.get("gradients", 0)
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
        "adapter_weights": state.get("adapter_weights", 0),
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
    capacity = max(0, device.memory_bytes - os_reserve_bytes(device))  # a reserve above it: 0
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
