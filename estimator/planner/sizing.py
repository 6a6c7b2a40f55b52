"""Fewest devices that fit: how many devices (in whole nodes) and which ZeRO stage a setup needs
on one catalogue device, from the same memory model `estimate` uses (the rule is stated in
planner/compare.py's docstring, which uses it for every row). Pure library."""

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.planner.estimate import estimate
from estimator.planner.fit import per_node
from estimator.specs import CalibrationProfile, Device, Estimate, ModelSpec, TrainSetup

FALLBACK_SHARDED_TERMS = ("weights", "quant_scales", "master_weights", "adapter_weights",
                          "gradients", "optimizer_states")
"""Terms ideal ZeRO-3 sharding divides by N in the fallback (activations, logits, KV cache and
runtime stay per device; Rajbhandari et al. 2020)."""


def devices_per_node(device: Device) -> int:
    """Devices one machine holds (planner.fit.per_node, the one rule)."""
    return per_node(device)


def whole_nodes(num_devices: int, per_node: int) -> int:
    """num_devices rounded up to whole nodes once it exceeds one node (count)."""
    if num_devices <= per_node:
        return num_devices
    return -(-num_devices // per_node) * per_node


def sized(setup: TrainSetup, num_devices: int, zero_stage: int, per_node: int) -> TrainSetup:
    """The setup on num_devices devices with a ZeRO stage, spread over whole nodes."""
    nodes = max(1, num_devices // per_node) if num_devices > per_node else 1
    return setup.model_copy(update={"num_devices": num_devices, "num_nodes": nodes,
                                    "zero_stage": zero_stage})


def fits(est: Estimate) -> bool:
    """Peak memory within the device's capacity."""
    return est.memory.fits


class Sizing:
    """The smallest fitting device count for one setup on one device."""

    def __init__(self, num_devices: int | None, zero_stage: int | None, est: Estimate,
                 single: Estimate, modelled: bool) -> None:
        self.num_devices, self.zero_stage = num_devices, zero_stage
        self.est, self.single, self.modelled = est, single, modelled


def fallback_sizing(single: Estimate, per_node: int, max_devices: int) -> Sizing:
    """Ideal ZeRO-3 sharding of weights, gradients and optimizer states over N devices:
    the fewest N with sharded/N + replicated ≤ capacity."""
    mem = single.memory
    shard = sum(mem.components.get(k, 0) for k in FALLBACK_SHARDED_TERMS)
    room = mem.capacity_bytes - (mem.total_bytes - shard)
    if room <= 0:
        return Sizing(None, None, single, single, False)
    n = whole_nodes(max(1, -(-shard // room)), per_node)
    if n > max_devices:
        return Sizing(None, None, single, single, False)
    return Sizing(n, 3, single, single, False)


def smallest_fit(model: ModelSpec, setup: TrainSetup, device: Device,
                 profile: CalibrationProfile | None, max_devices: int,
                 exact: int | None = None) -> Sizing:
    """Fewest devices (then lowest ZeRO stage) that hold the job; see the module rules.
    With `exact`, exactly that many devices (a free tier's session), lowest fitting stage.

    The search reads the same memory model `estimate` uses (memory_breakdown) and runs the
    full `estimate` once, at the chosen count — a whole estimate per probe would re-run its
    own advice search every time."""
    per_node = devices_per_node(device)

    def fits_at(n: int, zero: int) -> bool:
        s = sized(setup, n, zero, per_node)
        mem = memory_breakdown(model, s, device, count_params(model, s))
        return mem.fits

    single = estimate(model, sized(setup, 1, 0, per_node), device, profile)
    two = sized(setup, 2, 3, per_node)
    multi = max(max_devices, exact or 1) >= 2 and memory_breakdown(
        model, two, device, count_params(model, two)).total_bytes != single.memory.total_bytes
    if exact is not None and exact > 1 and not multi:
        fallback = fallback_sizing(single, per_node, exact)
        ok = fallback.num_devices is not None
        return Sizing(exact if ok else None, 3 if ok else None, single, single, False)
    if exact is None:
        if fits(single):
            return Sizing(1, 0, single, single, True)
        if max_devices < 2:
            return Sizing(None, None, single, single, True)
        if not multi:
            return fallback_sizing(single, per_node, max_devices)
        n = fewest_sharded(fits_at, per_node, max_devices)
    else:
        n = exact
    for zero in (0, 1, 2, 3):
        if n is not None and (n > 1 or zero == 0) and fits_at(n, zero):
            est = single if n == 1 else estimate(model, sized(setup, n, zero, per_node),
                                                 device, profile)
            return Sizing(n, zero, est, single, True)
    return Sizing(None, None, single, single, True)


def fewest_sharded(fits_at, per_node: int, max_devices: int) -> int | None:
    """Fewest device count (whole nodes past one) that fits with ZeRO-3: doubling, then
    bisection (per-device memory never grows with N)."""
    lo, hi = 1, 2
    while not fits_at(whole_nodes(hi, per_node), 3):
        if hi >= max_devices:
            return None
        lo, hi = hi, min(2 * hi, max_devices)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_at(whole_nodes(mid, per_node), 3):
            hi = mid
        else:
            lo = mid
    n = whole_nodes(hi, per_node)
    return n if n <= max_devices else None
