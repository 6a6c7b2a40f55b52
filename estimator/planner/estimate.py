"""estimate(model, setup, device, profile) → Estimate: the analytic model's peak memory and step
time (analytic.step), the setup check (checks.check), and the advice of advice.py when it does
not fit (the fewest devices / lowest ZeRO stage that fit). The public entry is estimator.api."""

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.parallel import rank_device
from estimator.analytic.params import count_params
from estimator.analytic.step import step_throughput
from estimator.checks import check, trainer_limits
from estimator.errors import SetupError
from estimator.planner.advice import advise, devices_needed, flags_for
from estimator.request import typed_errors
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


def multi_device_assumptions(setup: TrainSetup, device: Device) -> list[str]:
    """The link numbers and the overlap assumptions (analytic/overlap.py) of a multi-device
    or offloaded estimate."""
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
            default = C.default_network(device) * 8 / 1e9
            where = "desktop machines, " if device.desktop else ""
            out.append(f"inter-node network {net / 1e9:g} GB/s per device (given)" if net
                       else f"inter-node network unknown: {where}{default:g} Gb/s per device "
                            "assumed (--link to set it)")
        out.append(f"collectives reach {C.LINK_EFFICIENCY:.0%} of the link peak; "
                   + ("none overlaps compute on CPUs (gloo reduces on the compute cores)"
                      if device.kind == "cpu" else
                      "DDP/ZeRO-1 gradient buckets overlap the last backward (the last 25 MiB "
                      "bucket does not), ZeRO-2/3 collectives overlap each block's compute "
                      "(the first gather and last reduce-scatter do not); the ZeRO-1/2 "
                      "parameter all-gather, MoE all-to-all and host transfers do not overlap"))
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
    from estimator.catalog import read_toml
    from estimator.catalog.software import software_note

    out = []
    if model.inferred_from:
        out.append(model.inferred_from)
    software = software_note(device.name, setup.method, read_toml("software.toml"))
    if software:
        out.append(software)
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


def sharding_advice(setup: TrainSetup, memory_of, time_of, one_per_node: bool,
                    first: dict | None = None) -> list[Advice]:
    """The fewest devices (and lowest ZeRO stage) whose per-device memory fits
    (advice.devices_needed over the sharded memory model), on top of the change `first`, with
    its step time. The optimizer step in backward runs on one device only: the sharded setup
    goes without it."""
    update = dict(first or {})
    if setup.model_copy(update=update).optimizer_in_backward:
        update["optimizer_in_backward"] = False
    changed = setup.model_copy(update=update)
    found = devices_needed(changed, memory_of, one_per_node=one_per_node)
    if found is None:
        return []
    n, stage, total = found
    if n == setup.num_devices and stage == setup.zero_stage:
        return []
    update |= {"num_devices": n, "zero_stage": stage} | (
        {"num_nodes": n} if one_per_node else {})
    return [Advice(change=flags_for(update), update=update, total_bytes=total, fits=True,
                   step_seconds=time_of(setup.model_copy(update=update)))]


def upcast_hint(setup: TrainSetup, device: Device,
                profile: CalibrationProfile | None) -> list[str]:
    """A 16-bit LoRA on a CPU whose calibrated 16-bit GEMMs are slower than its fp32 ones (no
    bf16 matrix units: 5–100× slower, docs/training.md) is pointed at the bundled trainer's bf16
    base with fp32 compute (TrainSetup.upcasts_frozen_base): the same base memory at fp32
    speed. Compares the best rates of the profile's 'matmul.<dtype>' curves."""
    if (device.kind != "cpu" or profile is None or setup.method != "lora"
            or setup.compute_dtype == "fp32"):
        return []
    half, full = (profile.curves.get(f"matmul.{d}") for d in (setup.compute_dtype, "fp32"))
    if half is None or full is None:
        return []
    ratio = max(full.rates) / max(half.rates)
    if ratio <= 1:
        return []
    return [f"this CPU's {setup.compute_dtype} GEMMs measured {ratio:.1f}× slower than fp32: "
            "`nvfree train --method lora --bits 16 --dtype fp32` keeps the base in bf16 and "
            "computes in fp32 (the bundled trainer; docs/training.md)"]


def trainer_note(model: ModelSpec, setup: TrainSetup) -> list[str]:
    """'the bundled trainer cannot run this: …' when checks.trainer_limits finds something."""
    limits = trainer_limits(model, setup) if setup.method != "inference" else []
    return [f"the bundled trainer (nvfree train) cannot run this: {'; '.join(limits)}"
            ] if limits else []


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


def question_hints(params: float | None, device: Device | str) -> list[str]:
    """The presets a --params count names, and that 'local' answers for this machine."""
    from estimator.request import preset_hints

    out = preset_hints(params) if params is not None else []
    if isinstance(device, str) and device.strip().lower() == "local":
        out.append("no --device: this answers for this machine; --device NAME for another "
                   "(`nvfree devices`), or `nvfree compare` for all of them")
    return out


def with_user_price(device: Device, prices: dict[str, float] | None) -> Device:
    """The device with the user's --price for it; a price for another device is an error."""
    from estimator.catalog import priced

    if not prices:
        return device
    prices = {k.strip().lower(): v for k, v in prices.items()}
    other = set(prices) - {device.name}
    if other:
        raise SetupError(f"--price names {', '.join(sorted(other))}, but the device is "
                         f"{device.name}")
    return priced(device, prices[device.name])


@typed_errors
def estimate(model: ModelSpec | str | None = None, setup: TrainSetup | None = None,
             device: Device | str = "local", profile: CalibrationProfile | None = None, *,
             params: float | None = None, active_params: float | None = None,
             active_ratio: float | None = None, use_profile: bool = True,
             device_memory: float | None = None, prices: dict[str, float] | None = None,
             link_gbit_per_second: float | None = None, **flags) -> Estimate:
    """Predict parameters, peak memory, step time, cost and a verdict with advice.

    Takes specs (a ModelSpec, a TrainSetup, a Device) or what `nvfree estimate` takes, by its
    flag names: a preset / config path / --params, a device name ('local' is this machine
    with its calibration profile), and the setup flags (request.SETUP_DEFAULTS: method,
    bits, dtype='auto', …) — `estimate("qwen2.5-7b", method="qlora", seq_len=4096,
    device="m4-max")` returns what the command prints. LoRA targets may be the model's own
    PEFT names (resolve_setup); the Estimate's setup carries the canonical names they mean."""
    from estimator.request import build_setup, resolve_model

    model = resolve_model(model, params, active_params, active_ratio)
    hints, asked = question_hints(params, device), params
    note = None
    if isinstance(device, str):
        from estimator.hardware import resolve_device

        dev, found, note = resolve_device(device, use_profile=use_profile,
                                          memory_gib=device_memory)
        profile = profile if profile is not None else found
        note = note if dev.name == "local" else None  # catalogue: 'uncalibrated' says it
    else:
        dev = device
    dev = with_user_price(dev, prices)
    if link_gbit_per_second is not None:
        from estimator.catalog import linked

        dev = linked(dev, link_gbit_per_second)
    if setup is None:
        setup = build_setup(dev, profile, **flags)
    elif flags:
        raise SetupError(f"give a TrainSetup or setup options, not both ({', '.join(flags)})")
    setup = check(model, setup, dev)

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
        single = [a for a in advice if "num_devices" not in a.update]
        best = min(single, key=lambda a: a.total_bytes) if single else None
        if best is not None and not best.fits:
            advice += sharding_advice(setup, memory_of, time_of, cpu, best.update)
    if fits:
        verdict = "fits"
    elif memory.total_bytes <= memory.capacity_bytes:
        verdict = "tight"
    else:
        verdict = "fits_with_changes" if any(a.fits for a in advice) else "does_not_fit"
    minimum = min([memory.total_bytes, *(a.total_bytes for a in advice)])
    if verdict != "fits" and setup.method != "inference" and dev.name != "local":
        which = f"--params {asked:g}" if asked is not None else f"--model {model.name}"
        hints.append("the advice keeps your batch; the planner's search over devices, batch, "
                     "ZeRO stage and expert parallelism: "
                     f"`nvfree compare {which} --devices {dev.name}`")
    return Estimate(model=model, setup=setup, device=dev, params=params, memory=memory,
                    throughput=perf_of(setup, memory), verdict=verdict, advice=advice,
                    minimum_memory_bytes=minimum,
                    other_frameworks=other_framework_peaks(setup, memory_of),
                    hints=hints + upcast_hint(setup, dev, profile),
                    assumptions=assumptions_for(model, setup, dev, profile)
                    + ([f"calibration: {note}"] if note else [])
                    + trainer_note(model, setup))

