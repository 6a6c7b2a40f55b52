"""The one-call library API: estimate(model, setup, device, profile) → Estimate."""

from estimator.analytic.advice import advise, devices_needed
from estimator.analytic.memory import memory_breakdown
from estimator.analytic.parallel import compose_throughput, rank_device, rank_profile
from estimator.analytic.params import count_params, resolve_lora_targets
from estimator.analytic.throughput import throughput
from estimator.errors import SetupError
from estimator.specs import (
    Advice,
    CalibrationProfile,
    Device,
    Estimate,
    MemoryBreakdown,
    ModelSpec,
    Throughput,
    TrainSetup,
)


def lora_target_names(model: ModelSpec) -> str:
    """The --lora-targets names a model takes, for messages: canonical, then its own."""
    from estimator.specs.setup import LINEAR_TARGETS

    return ", ".join([*LINEAR_TARGETS, *(n for n in model.lora_module_names
                                         if n not in LINEAR_TARGETS)])


def resolve_setup(model: ModelSpec, setup: TrainSetup) -> TrainSetup:
    """The setup with its LoRA targets in the canonical names the analytic model counts
    (analytic.params.resolve_lora_targets: Qwen-1's c_attn → q_proj, k_proj, v_proj; a fused
    module's members all together); the same object when nothing changes. Callers that take
    a user's setup resolve it before check_setup (estimate does)."""
    if not setup.trains_adapters:
        return setup
    targets, unknown = resolve_lora_targets(model, setup.lora_targets)
    if unknown:
        raise SetupError(f"unknown LoRA target(s) {', '.join(unknown)} for {model.name}; use "
                         f"PEFT names: {lora_target_names(model)} or all-linear")
    if targets == setup.lora_targets:
        return setup
    return setup.model_copy(update={"lora_targets": targets})


def check_setup(model: ModelSpec, setup: TrainSetup) -> None:
    """Reject setups the model cannot have (one line each). LoRA targets must be canonical
    names (resolve_setup turns a model's own names into them)."""
    if setup.trains_adapters and setup.lora_rank > model.hidden_size:
        raise SetupError(
            f"LoRA rank {setup.lora_rank} exceeds the hidden size {model.hidden_size}")
    from estimator.analytic.frameworks.targets import head_target_ok
    from estimator.specs.setup import LINEAR_TARGETS

    unknown = [t for t in setup.lora_targets
               if t not in LINEAR_TARGETS and not head_target_ok(setup, t)]
    if setup.trains_adapters and unknown:
        raise SetupError(f"unknown LoRA target(s) {', '.join(unknown)}; use PEFT names: "
                         f"{', '.join(LINEAR_TARGETS)} or all-linear")
    if setup.expert_parallel > 1 and model.moe is None:
        raise SetupError(f"--expert-parallel {setup.expert_parallel} needs an MoE model; "
                         f"{model.name} is dense")
    if model.moe is not None and setup.expert_parallel > model.moe.num_experts:
        raise SetupError(f"--expert-parallel {setup.expert_parallel} exceeds the "
                         f"{model.moe.num_experts} experts of {model.name}")


def multi_device_assumptions(setup: TrainSetup, device: Device) -> list[str]:
    """The link numbers and the overlap assumption of a multi-device or offloaded estimate."""
    from estimator.analytic import comms as C

    out = []
    if setup.num_devices > 1:
        intra = device.interconnect_bytes_per_second
        if intra:
            out.append(f"device interconnect {intra / 1e9:g} GB/s per direction (catalogue)")
        elif device.kind != "cpu":
            default = C.DEFAULT_INTERCONNECT_BYTES_PER_SECOND / 1e9
            out.append(f"device interconnect unknown: {default:g} GB/s assumed (PCIe 4.0 x16)")
        net = device.network_bytes_per_second
        if setup.num_nodes > 1 or (device.kind == "cpu" and not intra):
            default = C.DEFAULT_NETWORK_BYTES_PER_SECOND[device.kind] * 8 / 1e9
            out.append(f"inter-node network {net / 1e9:g} GB/s per device (catalogue)" if net
                       else f"inter-node network unknown: {default:g} Gb/s per device assumed")
        out.append(f"collectives reach {C.LINK_EFFICIENCY:.0%} of the link peak and do NOT "
                   "overlap compute (step time is an upper bound)")
        per_node = setup.num_devices // setup.num_nodes
        if device.kind == "cpu" and per_node > 1:
            out.append(f"{per_node} processes share each CPU machine: each gets 1/{per_node} of "
                       "its cores, memory and bandwidth (and of calibrated rates)")
    if setup.offload != "none":
        out.append(f"offload over PCIe at {C.DEFAULT_PCIE_BYTES_PER_SECOND / 1e9:g} GB/s; host "
                   f"optimizer step at {C.DEFAULT_HOST_BANDWIDTH_BYTES_PER_SECOND / 1e9:g} GB/s "
                   "host memory bandwidth shared by the node's devices")
    return out


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
    return out + multi_device_assumptions(setup, device)


def combined_update(advice: list[Advice], setup: TrainSetup) -> dict:
    """The setup update of the smallest advised change (for sharding on top of it)."""
    from estimator.analytic.advice import candidate_changes

    best = min(advice, key=lambda a: a.total_bytes)
    update: dict = {}
    for flag, change in candidate_changes(setup):
        if flag in best.change:
            update.update(change)
    return update


def sharding_advice(setup: TrainSetup, memory_of, time_of, one_per_node: bool,
                    prefix: str = "") -> list[Advice]:
    """'--num-devices N --zero S': the fewest devices (and lowest ZeRO stage) whose per-device
    memory fits (advice.devices_needed over the sharded memory model), with its step time.
    The optimizer step in backward runs on one device only: the sharded setup goes without it
    (and says so when the user's setup had it)."""
    suffix = ""
    if setup.optimizer_in_backward:
        flag = "--optimizer-in-backward"
        suffix = "" if flag in prefix else f" (without {flag})"
        prefix = " ".join(f for f in prefix.split() if f != flag)
        setup = setup.model_copy(update={"optimizer_in_backward": False})
    found = devices_needed(setup, memory_of, one_per_node=one_per_node)
    if found is None:
        return []
    n, stage, total = found
    if n == setup.num_devices and stage == setup.zero_stage:
        return []
    update = {"num_devices": n, "zero_stage": stage} | ({"num_nodes": n} if one_per_node else {})
    nodes = f" --nodes {n}" if one_per_node and n > 1 else ""
    change = f"{prefix + ' ' if prefix else ''}--num-devices {n}{nodes} --zero {stage}{suffix}"
    return [Advice(change=change, total_bytes=total, fits=True,
                   step_seconds=time_of(setup.model_copy(update=update)))]


def step_throughput(model: ModelSpec, setup: TrainSetup, device: Device,
                    profile: CalibrationProfile | None,
                    memory: MemoryBreakdown | None = None) -> Throughput:
    """Step time and rates: the compute of one rank (parallel.rank_device / rank_profile)
    composed with communication (parallel.compose_throughput)."""
    rank, params = rank_device(device, setup), count_params(model, setup)
    memory = memory or memory_breakdown(model, setup, rank, params)
    perf = throughput(model, setup, rank, params, rank_profile(profile, device, setup),
                      weight_storage_bytes=memory.components["weights"]
                      + memory.components["quant_scales"],
                      kv_bytes=memory.components["kv_cache"])
    return compose_throughput(model, setup, rank, params, profile, perf)


def other_framework_peaks(setup: TrainSetup, memory_of) -> dict[str, int]:
    """The peak memory of the same setup under each other framework nvfree models (those
    whose terms cannot describe the model, e.g. torchtune for an MoE, are left out)."""
    from estimator.analytic.frameworks import FRAMEWORKS

    peaks = {}
    for f in FRAMEWORKS:
        if f != setup.framework:
            try:
                peaks[f] = memory_of(setup.model_copy(update={"framework": f})).total_bytes
            except SetupError:
                continue
    return peaks


def estimate(model: ModelSpec, setup: TrainSetup, device: Device | str = "local",
             profile: CalibrationProfile | None = None) -> Estimate:
    """Predict parameters, peak memory, step time, cost and a verdict with advice. LoRA
    targets may be the model's own PEFT names (resolve_setup); the Estimate's setup carries
    the canonical names they mean."""
    from estimator.catalog import load_device

    dev = load_device(device) if isinstance(device, str) else device
    setup = resolve_setup(model, setup)
    check_setup(model, setup)

    def memory_of(s: TrainSetup) -> MemoryBreakdown:
        return memory_breakdown(model, s, rank_device(dev, s), count_params(model, s))

    def perf_of(s: TrainSetup, memory: MemoryBreakdown) -> Throughput:
        return step_throughput(model, s, dev, profile, memory)

    params = count_params(model, setup)
    memory = memory_of(setup)
    fits = memory.fits
    advice = advise(setup, memory_of)
    if not fits and setup.method != "inference":
        def time_of(s: TrainSetup) -> float:
            return perf_of(s, memory_of(s)).step_seconds

        cpu = dev.kind == "cpu"
        advice += sharding_advice(setup, memory_of, time_of, cpu)
        single = [a for a in advice if "--num-devices" not in a.change]
        best = min(single, key=lambda a: a.total_bytes) if single else None
        if best is not None and not best.fits:
            combined = setup.model_copy(update=combined_update(single, setup))
            advice += sharding_advice(combined, memory_of, time_of, cpu, best.change)
    if fits:
        verdict = "fits"
    elif memory.total_bytes <= memory.capacity_bytes:
        verdict = "tight"
    else:
        verdict = "fits_with_changes" if any(a.fits for a in advice) else "does_not_fit"
    minimum = min([memory.total_bytes, *(a.total_bytes for a in advice)])
    return Estimate(model=model, setup=setup, device=dev, params=params, memory=memory,
                    throughput=perf_of(setup, memory), verdict=verdict, advice=advice,
                    minimum_memory_bytes=minimum,
                    other_frameworks=other_framework_peaks(setup, memory_of),
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
