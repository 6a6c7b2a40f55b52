"""The one-call library API: estimate(model, setup, device, profile) → Estimate."""

from estimator.analytic.advice import advise, devices_needed
from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.analytic.throughput import throughput
from estimator.errors import SetupError
from estimator.specs import (
    Advice,
    CalibrationProfile,
    Device,
    Estimate,
    MemoryBreakdown,
    ModelSpec,
    TrainSetup,
)

SHARDED_TERMS = ("weights", "quant_scales", "master_weights", "adapter_weights", "gradients",
                 "optimizer_states")


def check_setup(model: ModelSpec, setup: TrainSetup) -> None:
    """Reject setups the model cannot have (one line each)."""
    if setup.trains_adapters and setup.lora_rank > model.hidden_size:
        raise SetupError(
            f"LoRA rank {setup.lora_rank} exceeds the hidden size {model.hidden_size}")
    from estimator.specs.setup import LINEAR_TARGETS

    unknown = [t for t in setup.lora_targets if t not in LINEAR_TARGETS]
    if setup.trains_adapters and unknown:
        raise SetupError(f"unknown LoRA target(s) {', '.join(unknown)}; use PEFT names: "
                         f"{', '.join(LINEAR_TARGETS)} or all-linear")


def assumptions_for(model: ModelSpec, setup: TrainSetup, device: Device,
                    profile: CalibrationProfile | None) -> list[str]:
    """What the estimate assumed that the user did not say."""
    out = []
    if model.inferred_from:
        out.append(model.inferred_from)
    if device.peak_for(setup.compute_dtype) is None:
        out.append(f"{device.display_name} has no known {setup.compute_dtype} peak: its fp32 "
                   "rate is used (on CPUs without AVX512_BF16/AMX, bf16 is far slower)")
    if profile is None:
        out.append("uncalibrated: catalogue peaks with default size-dependent efficiency "
                   "(run `nvfree calibrate` on the target machine to measure it)")
    if device.backend in ("mps", "xla", "hpu", "neuron"):
        out.append(f"runtime overhead on {device.backend} is unknown and counted as 0")
    if model.moe is not None and model.moe.mean_routed_experts_per_token is not None:
        out.append(f"MoE: {model.moe.mean_routed_experts_per_token:.2f} real experts per token on "
                   "average (published average active parameters)")
    if setup.method in ("full", "lora", "qlora"):
        out.append("batch of fully packed sequences; gradients freed between steps "
                   "(zero_grad(set_to_none=True))")
    return out


def combined_update(advice: list[Advice], setup: TrainSetup) -> dict:
    """The setup update of the smallest advised change (for sharding on top of it)."""
    from estimator.analytic.advice import candidate_changes

    best = min(advice, key=lambda a: a.total_bytes)
    update: dict = {}
    for flag, change in candidate_changes(setup):
        if flag in best.change:
            update.update(change)
    return update


def sharding_advice(memory: MemoryBreakdown, advice: list[Advice]) -> list[Advice]:
    """'N devices with ZeRO-3/FSDP' on top of the smallest advised change, when one device is
    not enough."""
    shard = sum(memory.components[k] for k in SHARDED_TERMS)
    n = devices_needed(shard, memory.total_bytes - shard, memory.capacity_bytes)
    if n is None or n == 1:
        return []
    best = min(advice, key=lambda a: a.total_bytes).change + " + " if advice else ""
    total = -(-shard // n) + memory.total_bytes - shard
    return [Advice(change=f"{best}{n} devices with ZeRO-3/FSDP sharding", total_bytes=total,
                   fits=True)]


def estimate(model: ModelSpec, setup: TrainSetup, device: Device | str = "local",
             profile: CalibrationProfile | None = None) -> Estimate:
    """Predict parameters, peak memory, step time, cost and a verdict with advice."""
    from estimator.catalog import load_device

    dev = load_device(device) if isinstance(device, str) else device
    check_setup(model, setup)

    def memory_of(s: TrainSetup) -> MemoryBreakdown:
        return memory_breakdown(model, s, dev, count_params(model, s))

    params = count_params(model, setup)
    memory = memory_of(setup)
    fits = memory.total_bytes <= memory.capacity_bytes
    advice = advise(setup, memory_of, memory.capacity_bytes)
    advice += sharding_advice(memory if not advice else memory_of(setup.model_copy(
        update=combined_update(advice, setup))), advice)
    if fits:
        verdict = "fits"
    else:
        verdict = "fits_with_changes" if any(a.fits for a in advice) else "does_not_fit"
    minimum = min([memory.total_bytes, *(a.total_bytes for a in advice)])
    perf = throughput(model, setup, dev, params, profile,
                      weight_storage_bytes=memory.components["weights"]
                      + memory.components["quant_scales"],
                      kv_bytes=memory.components["kv_cache"])
    return Estimate(model=model, setup=setup, device=dev, params=params, memory=memory,
                    throughput=perf, verdict=verdict, advice=advice,
                    minimum_memory_bytes=minimum,
                    assumptions=assumptions_for(model, setup, dev, profile))


def auto_dtype(device: Device, profile: CalibrationProfile | None) -> str:
    """The compute dtype `--dtype auto` picks: what calibration measured fastest, else bf16
    where the device has a bf16 rate, fp16 where it has only fp16, else fp32."""
    if profile is not None:
        return profile.preferred_dtype
    for dtype in ("bf16", "fp16"):
        if device.peak_for(dtype) and device.peak_for(dtype) > (device.peak_for("fp32") or 0):
            return dtype
    return "fp32"
