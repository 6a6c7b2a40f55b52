"""`compare`: one model + setup on every catalogue device — does it fit on one, how many are
needed, how many hours, what cost, which method — plus smaller models and free tiers.

Pure library (no torch, no printing). Every number comes from `estimator.api.estimate`; this
module only searches device counts, picks methods and sorts.

Rules (stated in the result):
* Devices needed: the fewest N (in whole nodes of DEVICES_PER_NODE beyond one node) for which
  `estimate(..., TrainSetup(num_devices=N, zero_stage=3))` fits, then the lowest ZeRO stage that
  still fits at that N. Where `estimate` does not model several devices yet (its memory does not
  change with num_devices), the fallback shards weights, gradients and optimizer states ideally
  (FALLBACK_SHARDED_TERMS) and scales throughput by N with no communication time; such options carry
  multi_device_modelled=False.
* Method, when the user did not fix it: among full, LoRA and QLoRA, the one that needs the
  fewest devices, then the fewest device-hours per token on that device (what a fixed hourly
  price makes cheapest); ties go to the earlier of full, lora, qlora. Training setups are also
  tried with gradient checkpointing (unless the user already set it), under the same rule: a
  job that misses one device by its activations gets checkpointing, not 200 devices.
* Inference: prefill tokens/s from the per-op forward model, decode tokens/s from
  analytic/inference.py; the budget is generated tokens at the decode rate. N devices are
  treated as ideal tensor parallelism (N× bandwidth and FLOP/s).
"""

from collections.abc import Sequence
from typing import Any

from estimator.analytic.inference import decode_step_seconds
from estimator.analytic.params import count_params
from estimator.catalog import (
    GB,
    GIB,
    TERA,
    linked,
    list_devices,
    list_models,
    load_device,
    priced,
    read_toml,
)
from estimator.catalog.prices import PriceRule
from estimator.catalog.software import nearest_method, runs, software_note, software_path
from estimator.errors import SetupError
from estimator.planner.estimate import estimate
from estimator.planner.fit import SEARCH_RULE, Fixed, best_at, searched_plan
from estimator.planner.sizing import (
    Sizing,
    devices_per_node,
    smallest_fit,
)
from estimator.request import auto_dtype, typed_errors
from estimator.specs import (
    CalibrationProfile,
    Comparison,
    Device,
    DeviceOption,
    FreeTier,
    ModelSpec,
    SmallerModel,
    TrainSetup,
)
from estimator.specs.plan import Candidate
from estimator.units import SECONDS_PER_HOUR

AUTO_METHODS = ("full", "lora", "qlora")
DEFAULT_MAX_DEVICES = 1024
MAX_SMALLER_MODELS = 3
METHOD_RULE = "method per device among full, lora and qlora"


def method_setup(setup: TrainSetup, method: str) -> TrainSetup:
    """The setup with another method: full/lora at 16-bit, qlora at 4-bit; the user's bits
    are kept for the method they gave."""
    if method == setup.method:
        return setup
    return setup.model_copy(update={"method": method, "weight_bits": 4 if method == "qlora"
                                    else 16})


def device_dtype_setup(setup: TrainSetup, device: Device, profile: CalibrationProfile | None,
                       auto: bool) -> TrainSetup:
    """With `auto`, the compute dtype `--dtype auto` picks on this device; mixed precision
    stays as requested unless the dtype becomes fp32."""
    if not auto:
        return setup
    dtype = auto_dtype(device, profile)
    return setup.model_copy(update={"compute_dtype": dtype,
                                    "mixed_precision": setup.mixed_precision and dtype != "fp32"})


def rates(model: ModelSpec, sizing: Sizing, device: Device) -> tuple[float, float | None,
                                                                     str | None]:
    """(tokens/s over all devices — training or prefill —, decode tokens/s, decode bound)."""
    n = sizing.num_devices or 1
    est = sizing.est
    if sizing.modelled:
        tokens = est.setup.global_tokens_per_step / est.throughput.step_seconds
    else:
        tokens = n * est.throughput.tokens_per_second
    if est.setup.method != "inference":
        return tokens, None, None
    one = sizing.single
    weights = one.memory.components["weights"] + one.memory.components["quant_scales"]
    seconds, bound = decode_step_seconds(model, one.setup, device, one.params, weights,
                                         one.memory.components["kv_cache"])
    return tokens, n * one.setup.batch_size / seconds, bound


def device_unknowns(device: Device, setup: TrainSetup, requested_dtype: str | None) -> list[str]:
    """What the catalogue does not know for this device, one line each."""
    from estimator.analytic.comms import default_network

    out = []
    if device.price_per_hour_usd is None:
        out.append("no on-demand price in the catalogue: cost unknown")
    elif (device.price_source or "").startswith("bought"):
        out.append(f"price is a purchase amortised: {device.price_source}")
    if setup.num_nodes > 1 and device.network_bytes_per_second is None:
        what = "desktop machines on " if device.desktop else ""
        out.append(f"network between machines assumed: {what}"
                   f"{default_network(device) * 8 / 1e9:g} Gb/s per device (--link sets it)")
    if requested_dtype and device.peak_for(requested_dtype) is None:
        out.append(f"no {requested_dtype} peak: its fp32 rate is used")
    elif setup.compute_dtype == "fp32" and device.peak_for("bf16") is None:
        out.append("no bf16/fp16 peak: runs in fp32")
    if device.achievable_matmul_fraction is None:
        out.append("no measured large-GEMM efficiency: 60 % of peak assumed")
    if devices_per_node(device) > 1 and device.interconnect_bytes_per_second is None:
        out.append("no interconnect bandwidth in the catalogue")
    return out


def option_for(model: ModelSpec, setup: TrainSetup, device: Device,
               profile: CalibrationProfile | None, max_devices: int,
               requested_dtype: str | None, exact: int | None = None) -> DeviceOption:
    """Size one setup on one device and price it."""
    sizing = smallest_fit(model, setup, device, profile, max_devices, exact)
    est = sizing.est
    tokens = decode = bound = hours_per_m = total = cost = None
    if sizing.num_devices is not None:
        tokens, decode, bound = rates(model, sizing, device)
        rate = decode if decode is not None else tokens
        hours_per_m = sizing.num_devices * 1e6 / rate / SECONDS_PER_HOUR
        if setup.num_tokens is not None:
            total = setup.num_tokens / rate
            if device.price_per_hour_usd is not None:
                cost = (sizing.num_devices * device.price_per_hour_usd * total
                        / SECONDS_PER_HOUR)
    return DeviceOption(
        device=device.name, display_name=device.display_name, kind=device.kind,
        vendor=device.vendor, method=setup.method, weight_bits=setup.weight_bits,
        compute_dtype=setup.compute_dtype, checkpointing=setup.checkpointing,
        fits_on_one=sizing.num_devices == 1, min_devices=sizing.num_devices,
        num_devices=sizing.num_devices, zero_stage=sizing.zero_stage,
        peak_memory_bytes=est.memory.total_bytes, capacity_bytes=est.memory.capacity_bytes,
        memory_components={k: v for k, v in est.memory.components.items() if v},
        tokens_per_second=tokens, decode_tokens_per_second=decode, decode_bound=bound,
        total_seconds=total, device_hours_per_million_tokens=hours_per_m,
        price_per_hour_usd=device.price_per_hour_usd, cost_usd=cost,
        within_limits=sizing.num_devices is not None,
        multi_device_modelled=sizing.modelled or sizing.num_devices in (None, 1),
        price_source=device.price_source, sources=device.sources,
        unknowns=device_unknowns(device, setup, requested_dtype))


def method_key(option: DeviceOption) -> tuple:
    """Fewest devices, then fewest device-hours per token; when nothing fits, the smallest
    peak memory; ties by method order, then without checkpointing."""
    hours = option.device_hours_per_million_tokens
    order = AUTO_METHODS.index(option.method) if option.method in AUTO_METHODS else 0
    if option.num_devices is None:
        return (True, 0, option.peak_memory_bytes / option.capacity_bytes, order,
                option.checkpointing)
    return (False, option.num_devices, hours or 0.0, order, option.checkpointing)


def best_option(model: ModelSpec, setup: TrainSetup, device: Device, methods: Sequence[str],
                profile: CalibrationProfile | None, max_devices: int, auto: bool,
                requested_dtype: str | None, exact: int | None = None, *,
                objective: str = "time", fixed: Fixed | None = None) -> DeviceOption:
    """The option of the recommended method on one device: training by the planner's search
    (planner/fit.py), inference by the device-count sizing above."""
    if setup.method == "inference":
        options = []
        for method in methods:
            s = device_dtype_setup(method_setup(setup, method), device, profile, auto)
            options.append(option_for(model, s, device, profile, max_devices, requested_dtype,
                                      exact))
        return min(options, key=method_key)
    methods, notes = runnable_methods(device, methods)
    setups = [device_dtype_setup(method_setup(setup, m), device, profile, auto)
              for m in methods]
    fixed = fixed or Fixed()
    if exact is not None:
        found = best_at(model, setups, device, profile, exact, fixed)
        fewest = exact if found else None
    else:
        found, fewest = searched_plan(model, setups, device, profile, max_devices=max_devices,
                                      objective=objective, fixed=fixed)
    option = planned_option(model, found, setups[0], device, profile, requested_dtype, fewest)
    table = read_toml("software.toml")
    chosen = software_note(device.name, option.method, table)
    path = software_path(device.name, option.method, table)
    return option.model_copy(update={
        "unknowns": [*notes, *([chosen] if chosen else []), *option.unknowns],
        "software": None if path is None else f"{path.status}: {path.stack}"})


def runnable_methods(device: Device, methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """(The methods that have a software stack on the device, one line per method refused).
    A method the user fixed that has none is replaced by the nearest one that has
    (catalog.software: QLoRA → LoRA → full)."""
    table = read_toml("software.toml")
    keep = [m for m in methods if runs(device.name, m, table)]
    notes = [software_note(device.name, m, table) or "" for m in methods if m not in keep]
    if not keep:
        near = nearest_method(device.name, methods[0], table)
        keep = [near] if near else list(methods)
    return keep, [n for n in notes if n]


def planned_option(model: ModelSpec, found: Candidate | None, first: TrainSetup,
                   device: Device, profile: CalibrationProfile | None,
                   requested_dtype: str | None, fewest: int | None) -> DeviceOption:
    """A DeviceOption from the search's plan (estimate() at the chosen setup), or the
    single-device estimate of the first setup when nothing fits."""
    chosen = first.model_copy(update={"num_tokens": first.num_tokens}) if found is None else \
        found.setup.model_copy(update={"num_tokens": first.num_tokens})
    est = estimate(model, chosen, device, profile)
    n = chosen.num_devices if found is not None else None
    tokens = total = hours_per_m = cost = None
    if n is not None:
        tokens = chosen.global_tokens_per_step / est.throughput.step_seconds
        hours_per_m = n * 1e6 / tokens / SECONDS_PER_HOUR
        if chosen.num_tokens is not None:
            total = chosen.num_tokens / tokens
            if device.price_per_hour_usd is not None:
                cost = n * device.price_per_hour_usd * total / SECONDS_PER_HOUR
    return DeviceOption(
        device=device.name, display_name=device.display_name, kind=device.kind,
        vendor=device.vendor, method=chosen.method, weight_bits=chosen.weight_bits,
        compute_dtype=chosen.compute_dtype, checkpointing=chosen.checkpointing,
        fits_on_one=fewest == 1, min_devices=fewest, num_devices=n,
        zero_stage=chosen.zero_stage if n else None,
        batch_size=chosen.batch_size, grad_accum=chosen.grad_accum,
        expert_parallel=chosen.expert_parallel,
        lora_targets=chosen.lora_targets if chosen.method in ("lora", "qlora") else (),
        peak_memory_bytes=est.memory.total_bytes, capacity_bytes=est.memory.capacity_bytes,
        memory_components={k: v for k, v in est.memory.components.items() if v},
        tokens_per_second=tokens, total_seconds=total,
        device_hours_per_million_tokens=hours_per_m,
        price_per_hour_usd=device.price_per_hour_usd, cost_usd=cost,
        within_limits=n is not None, multi_device_modelled=True,
        price_source=device.price_source, sources=device.sources,
        unknowns=device_unknowns(device, chosen, requested_dtype))


def apply_limits(option: DeviceOption, max_hours: float | None,
                 max_cost_usd: float | None) -> DeviceOption:
    """Mark an option outside --max-hours / --max-cost. A limit that cannot be checked (no
    price, no token budget) counts as missed, and the option says why."""
    within = option.num_devices is not None
    unknowns = list(option.unknowns)
    if max_hours is not None:
        if option.total_seconds is None:
            unknowns.append("no token budget: cannot confirm --max-hours")
            within = False
        else:
            within &= option.total_seconds / SECONDS_PER_HOUR <= max_hours
    if max_cost_usd is not None:
        if option.cost_usd is None:
            unknowns.append("cost unknown: cannot confirm --max-cost")
            within = False
        else:
            within &= option.cost_usd <= max_cost_usd
    return option.model_copy(update={"within_limits": within, "unknowns": unknowns})


def sort_key(objective: str):
    """Sort: within limits first, then fitting, then by time or cost."""

    def key(o: DeviceOption) -> tuple:
        hours = o.device_hours_per_million_tokens
        time = (o.total_seconds if o.total_seconds is not None
                else (hours / (o.num_devices or 1) if hours is not None else None))
        head = (not o.within_limits, o.num_devices is None)
        if objective == "cost":
            return (*head, o.cost_usd is None, o.cost_usd or 0.0, time or 0.0)
        return (*head, time is None, time or 0.0)

    return key


def resolve_devices(names: Sequence[str] | None, prices: dict[str, float] | None = None,
                    rule: PriceRule | None = None,
                    link_gbit_per_second: float | None = None) -> list[Device]:
    """Catalogue devices by name (all when None), priced by the catalogue's rule (or `rule`)
    and the user's `prices` (device key → USD per device-hour); unknown names raise
    UnknownDeviceError."""
    devices = list_devices() if names is None else [load_device(n) for n in names]
    if not devices:
        raise SetupError("no devices given: use --devices a,b,c (see `nvfree devices`)")
    prices = {k.strip().lower(): v for k, v in (prices or {}).items()}
    for key in prices:
        load_device(key)  # an unknown key is an error, not a silent no-op
    devices = [priced(d, prices.get(d.name), rule) for d in devices]
    if link_gbit_per_second is None:
        return devices
    return [with_link(d, link_gbit_per_second) for d in devices]


def with_link(device: Device, gbit_per_second: float) -> Device:
    """catalog.linked: the device with the user's --link."""
    return linked(device, gbit_per_second)


def compare(model: ModelSpec, setup: TrainSetup, devices: list[str] | None = None,
            profile: CalibrationProfile | None = None, *,
            methods: Sequence[str] | None = None, auto_dtype_per_device: bool = False,
            objective: str = "time", max_hours: float | None = None,
            max_cost_usd: float | None = None, max_devices: int = DEFAULT_MAX_DEVICES,
            alternatives: bool = True, fixed: Fixed | None = None,
            prices: dict[str, float] | None = None,
            price_rule: PriceRule | None = None,
            link_gbit_per_second: float | None = None) -> Comparison:
    """Run the job on each device: fits, devices needed, hours, cost, recommended method.

    methods: candidate methods (None = setup.method only; AUTO_METHODS = recommend one per
    device). auto_dtype_per_device: choose the compute dtype per device as `--dtype auto`."""
    if objective not in ("time", "cost"):
        raise SetupError(f"--objective must be time or cost, got {objective}")
    methods = tuple(methods) if methods else (setup.method,)
    requested = None if auto_dtype_per_device else setup.compute_dtype
    options = [apply_limits(best_option(model, setup, dev, methods, profile, max_devices,
                                        auto_dtype_per_device, requested, objective=objective,
                                        fixed=fixed), max_hours, max_cost_usd)
               for dev in resolve_devices(devices, prices, price_rule, link_gbit_per_second)]
    options.sort(key=sort_key(objective))
    params = estimate(model, method_setup(setup, methods[0]), options_device(options),
                      profile).params
    smaller: list[SmallerModel] = []
    if alternatives and not any(o.within_limits and o.fits_on_one for o in options):
        smaller = smaller_models(model, setup, devices, profile, methods=methods,
                                 auto=auto_dtype_per_device, objective=objective,
                                 max_hours=max_hours, max_cost_usd=max_cost_usd, fixed=fixed,
                                 prices=prices, price_rule=price_rule)
    tiers = (free_tiers(model, setup, profile, methods, auto_dtype_per_device, fixed)
             if alternatives else [])
    return Comparison(
        model=model.name, total_params=params.total, active_params=params.active_per_token,
        setup=setup, objective=objective,
        method_rule=method_rule(methods),
        max_hours=max_hours, max_cost_usd=max_cost_usd, max_devices=max_devices,
        options=options, smaller_models=smaller, free_tiers=tiers, notes=shared_notes(setup))


def method_rule(methods: Sequence[str]) -> str:
    """The sentence that says how each option's method was chosen."""
    if methods[0] == "inference":
        return "fixed by the user: inference"
    head = METHOD_RULE if len(methods) > 1 else f"method fixed by the user: {methods[0]}"
    return f"{head}; {SEARCH_RULE}"


def options_device(options: list[DeviceOption]) -> Device:
    """Any device of the comparison (parameter counts do not depend on it)."""
    return load_device(options[0].device) if options else list_devices()[0]


def shared_notes(setup: TrainSetup) -> list[str]:
    """Assumptions every option shares."""
    notes = ["uncalibrated catalogue peaks with default efficiency (run `nvfree calibrate` on a "
             "machine to measure it)",
             "devices per node: 1 for CPUs and Apple machines, 8 for accelerators; beyond one "
             "node counts are whole nodes"]
    if setup.method == "inference":
        notes.append("inference: decode at a full seq_len context (the slowest step); the token "
                     "budget is generated tokens; N devices = ideal tensor parallelism")
    return notes


def smaller_models(model: ModelSpec, setup: TrainSetup, devices: list[str] | None,
                   profile: CalibrationProfile | None, *, methods: Sequence[str], auto: bool,
                   objective: str, max_hours: float | None,
                   max_cost_usd: float | None, fixed: Fixed | None = None,
                   prices: dict[str, float] | None = None,
                   price_rule: PriceRule | None = None) -> list[SmallerModel]:
    """Presets smaller than the model that fit one device within the limits (largest first)."""
    total = count_params(model).total
    presets = sorted(((count_params(m).total, m) for m in list_models()),
                     key=lambda pm: -pm[0])
    out = []
    for size, preset in presets:
        if size >= total or preset.name == model.name:
            continue
        try:
            result = compare(preset, setup, devices, profile, methods=methods,
                             auto_dtype_per_device=auto, objective=objective, max_hours=max_hours,
                             max_cost_usd=max_cost_usd, max_devices=1, alternatives=False,
                             fixed=fixed, prices=prices, price_rule=price_rule)
        except SetupError:  # the setup does not apply to it (e.g. --seq-len past gpt2's)
            continue
        best = next((o for o in result.options if o.within_limits and o.fits_on_one), None)
        if best is not None:
            out.append(SmallerModel(model=preset.name, total_params=size, option=best))
        if len(out) == MAX_SMALLER_MODELS:
            break
    return out


def offer_device(entry: dict[str, Any]) -> Device:
    """The catalogue device an offer maps to, with its device_override applied."""
    device = load_device(entry["device"])
    override = dict(entry.get("device_override", {}))
    update: dict[str, Any] = {}
    if "display_name" in override:
        update["display_name"] = override["display_name"]
    if "memory_gib" in override:
        update["memory_bytes"] = round(override["memory_gib"] * GIB)
    if "bandwidth_gb_per_s" in override:
        update["memory_bandwidth_bytes_per_second"] = override["bandwidth_gb_per_s"] * GB
    if "peak_tflops" in override:
        update["peak_flops_per_second"] = {k: v * TERA
                                           for k, v in override["peak_tflops"].items()}
        update["achievable_matmul_fraction"] = None
    return device.model_copy(update={**update, "price_per_hour_usd": 0.0})


def free_tiers(model: ModelSpec, setup: TrainSetup, profile: CalibrationProfile | None,
               methods: Sequence[str], auto: bool, fixed: Fixed | None = None
               ) -> list[FreeTier]:
    """Each free offer (data/offers.toml) with the job sized to the offer's device count."""
    out = []
    for key, entry in read_toml("offers.toml")["offers"].items():
        device = offer_device(entry)
        count = entry["num_devices"]
        option = best_option(model, setup, device, methods, profile, max_devices=count,
                             auto=auto, requested_dtype=None, exact=count, fixed=fixed)
        weekly = entry.get("weekly_hours")
        weeks = (option.total_seconds / SECONDS_PER_HOUR / weekly
                 if weekly and option.total_seconds is not None else None)
        out.append(FreeTier(
            offer=key, display_name=entry["display_name"], provider=entry["provider"],
            device=entry["device"], num_devices=count, weekly_hours=weekly,
            session_hours=entry.get("session_hours"), fits=option.num_devices is not None,
            method=option.method, total_seconds=option.total_seconds, weeks_of_quota=weeks,
            sources=tuple(entry.get("sources", ())), read_on=entry["read_on"],
            notes=entry.get("notes")))
    return out


@typed_errors
def compare_request(model: ModelSpec | str | None = None, *, params: float | None = None,
                    active_params: float | None = None, active_ratio: float | None = None,
                    devices: list[str] | None = None, objective: str = "time",
                    max_hours: float | None = None, max_cost_usd: float | None = None,
                    max_devices: int = DEFAULT_MAX_DEVICES,
                    prices: dict[str, float] | None = None,
                    price_rule: PriceRule | None = None,
                    link_gbit_per_second: float | None = None, **flags) -> Comparison:
    """compare() from what `nvfree compare` takes, by its flag names (request.SETUP_DEFAULTS):
    no --method or --bits lets each device pick full, LoRA or QLoRA; --dtype auto picks the
    dtype per device."""
    from estimator.inputs import checked
    from estimator.request import SETUP_DEFAULTS, build_setup, resolve_model

    max_hours, max_cost_usd = checked("--max-hours", max_hours), checked("--max-cost",
                                                                          max_cost_usd)
    max_devices = checked("--max-devices", max_devices)
    spec = resolve_model(model, params, active_params, active_ratio)
    first = resolve_devices(devices)[0]
    dtype = flags.get("dtype", SETUP_DEFAULTS["dtype"])
    setup = build_setup(first, None, **{**flags, "dtype": "bf16" if dtype == "auto" else dtype})
    auto_methods = flags.get("method") is None and flags.get("bits") is None
    result = compare(spec, setup, devices, None,
                     methods=AUTO_METHODS if auto_methods else None,
                     auto_dtype_per_device=dtype == "auto", objective=objective,
                     max_hours=max_hours, max_cost_usd=max_cost_usd, max_devices=max_devices,
                     fixed=fixed_fields(flags), prices=prices, price_rule=price_rule,
                     link_gbit_per_second=link_gbit_per_second)
    if params is None:
        return result
    from estimator.request import preset_hints

    return result.model_copy(update={"notes": [f"hint: {h}" for h in preset_hints(params)]
                                     + result.notes})


def fixed_fields(flags: dict) -> Fixed:
    """The setup fields a flag fixed: a value other than request.SETUP_DEFAULTS' (a flag left
    at its default is searched)."""
    from estimator.request import SETUP_DEFAULTS

    def given(name: str):
        value = flags.get(name, SETUP_DEFAULTS[name])
        return None if value == SETUP_DEFAULTS[name] else value

    zero = given("zero")
    return Fixed(batch_size=given("batch_size"), grad_accum=given("grad_accum"),
                 checkpointing=given("checkpointing"),
                 zero_stage=None if zero is None else int(zero),
                 expert_parallel=given("expert_parallel"),
                 lora_targets=given("lora_targets") is not None)
