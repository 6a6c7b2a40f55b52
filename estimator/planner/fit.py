"""The one search behind `compare`'s rows: the planner's search (ranking.search) at the fewest
devices that fit, over micro-batch × accumulation × ZeRO stage × checkpointing × method and,
for an MoE, expert parallelism — instead of a fixed micro-batch of one.

Rules (stated in every Comparison, SEARCH_RULE):
* Global batch: COMPARE_GLOBAL_BATCH sequences per optimizer step (a common fine-tuning batch),
  rounded up to a multiple of the device count; a --batch-size / --grad-accum the user gave
  fixes the micro-batch and accumulation instead.
* Device counts: the fewest N (whole nodes past one) at which the least-memory setup (ZeRO-3,
  micro-batch 1, checkpointing where allowed) fits by memory_breakdown — a lower bound — and
  then the next counts until the search finds a fitting candidate (N0); then the next power of two
  and twice that. Objective `time`: the fastest of these plans that costs no more than the one
  on N0 (more devices only where they do not cost more). Objective `cost`: the cheapest
  (device-hours where there is no price).
* Expert parallelism (MoE): 1, the largest power of two within a node and the largest overall
  that divide both the experts and N.
* LoRA targets (MoE, unless --lora-targets is given): all-linear and ATTENTION_TARGETS.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.errors import SetupError
from estimator.planner.ranking import search
from estimator.planner.space import Constraints
from estimator.specs import CalibrationProfile, Device, ModelSpec, TrainSetup
from estimator.specs.plan import Candidate

COMPARE_GLOBAL_BATCH = 64
"""Sequences per optimizer step compare plans for when the user fixes no batch (64 × 2048
tokens ≈ 131k tokens per step, the order of LoRA/QLoRA fine-tuning recipes: Dettmers et al.
2023, Table 9 uses 16–64)."""
SEARCH_RULE = (f"planner search per device: global batch {COMPARE_GLOBAL_BATCH} sequences "
               "(micro-batch × accumulation × devices), ZeRO stage, checkpointing and, for MoE, "
               "expert parallelism and MoE LoRA targets, on the fewest devices that fit (N0), "
               "the next power of two and twice that; objective time: the fastest plan that "
               "costs no more than the best on N0; objective cost: the cheapest (device-hours "
               "where the price is unknown)")


@dataclass(frozen=True)
class Fixed:
    """Setup fields the user fixed; None = searched."""

    batch_size: int | None = None
    grad_accum: int | None = None
    checkpointing: bool | None = None
    zero_stage: int | None = None
    expert_parallel: int | None = None
    global_batch: int | None = None
    """Sequences per optimizer step over all devices, when given (micro-batch searched)."""
    lora_targets: bool = False
    """True when the user named --lora-targets (else MoE searches ATTENTION_TARGETS too)."""


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""LoRA on the attention projections only: for an MoE the expert FFNs stay frozen and
adapter-free (the common MoE LoRA recipe; an adapter on each of hundreds of experts costs a
small GEMM, a cast and an optimizer tensor each)."""


def per_node(device: Device) -> int:
    """Devices on one fast interconnect: the catalogue's devices_per_node where it says (a TPU
    slice on its ICI torus), else 1 for a CPU socket, an Apple machine or a desktop machine
    (Device.desktop), 8 for accelerators (HGX/OAM boards; Trainium hosts are 16, 8 is the
    common case)."""
    if device.devices_per_node:
        return device.devices_per_node
    return 1 if device.kind == "cpu" or device.backend == "mps" or device.desktop else 8


def whole_nodes(num_devices: int, node: int) -> int:
    """num_devices rounded up to whole nodes once it exceeds one node (count)."""
    return num_devices if num_devices <= node else -(-num_devices // node) * node


def at_count(setup: TrainSetup, num_devices: int, node: int, **update) -> TrainSetup:
    """The setup on num_devices devices over whole nodes (with further field changes)."""
    nodes = num_devices // node if num_devices > node else 1
    return setup.model_copy(update={"num_devices": num_devices, "num_nodes": nodes, **update})


def floor_count(model: ModelSpec, setups: Sequence[TrainSetup], device: Device,
                max_devices: int) -> int | None:
    """Fewest devices (whole nodes past one) at which any of the least-memory setups (ZeRO-3,
    micro-batch 1, with and without checkpointing: the memory model's recompute term can
    exceed the activations it saves; for an MoE each LoRA target choice) fits by
    memory_breakdown: doubling, then bisection (per-device memory never grows with N). A lower
    bound for the search; None when max_devices do not hold it."""
    node = per_node(device)

    def fits(n: int) -> bool:
        for s in setups:
            s = at_count(s, n, node, zero_stage=3 if n > 1 else 0)
            if memory_breakdown(model, s, device, count_params(model, s)).fits:
                return True
        return False

    if fits(1):
        return 1
    lo, hi = 1, 2
    while not fits(whole_nodes(hi, node)):
        if hi >= max_devices:
            return None
        lo, hi = hi, min(2 * hi, max_devices)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(whole_nodes(mid, node)) else (mid, hi)
    n = whole_nodes(hi, node)
    return n if n <= max_devices else None


def global_batch(num_devices: int, fixed: Fixed) -> int:
    """Sequences per step at num_devices: the user's micro-batch × accumulation × N, else the
    given global batch (or COMPARE_GLOBAL_BATCH) rounded up to a multiple of N."""
    if fixed.batch_size is not None or fixed.grad_accum is not None:
        return (fixed.batch_size or 1) * (fixed.grad_accum or 1) * num_devices
    if fixed.global_batch is not None:
        return -(-fixed.global_batch // num_devices) * num_devices
    return -(-COMPARE_GLOBAL_BATCH // num_devices) * num_devices


EP_NODE = 8
"""Expert-parallel degree that stays inside one 8-device node (all-to-all on the node's
fabric)."""


def expert_degrees(model: ModelSpec, num_devices: int, fixed: Fixed) -> list[int]:
    """Expert-parallel degrees searched at num_devices: the user's, else 1, the largest power
    of two within a node (EP_NODE) and the largest overall that divide both the number of
    experts and N (dense models: 1)."""
    if fixed.expert_parallel is not None:
        return [fixed.expert_parallel] if num_devices % fixed.expert_parallel == 0 else []
    if model.moe is None:
        return [1]
    experts = model.moe.num_experts
    valid = [d for d in (2**k for k in range(num_devices.bit_length()))
             if num_devices % d == 0 and experts % d == 0]
    within_node = [d for d in valid if d <= EP_NODE]
    return sorted({1, max(within_node), max(valid)})


def best_at(model: ModelSpec, setups: Sequence[TrainSetup], device: Device,
            profile: CalibrationProfile | None, num_devices: int,
            fixed: Fixed) -> Candidate | None:
    """The fastest fitting candidate of the planner's search at exactly num_devices over the
    setups' methods, ZeRO stages, checkpointing, micro-batches and expert-parallel degrees."""
    node = per_node(device)
    base = setups[0]
    gb = global_batch(num_devices, fixed)
    stages = ((fixed.zero_stage,) if fixed.zero_stage is not None
              else ((0, 1, 2, 3) if num_devices > 1 else (0,)))
    c = Constraints(
        global_batch=gb, methods=tuple(s.method for s in setups),
        precisions=((base.compute_dtype, base.mixed_precision),),
        optimizers=(base.optimizer,),
        checkpointing=((fixed.checkpointing,) if fixed.checkpointing is not None
                       else (False, True)),
        zero_stages=stages, objective="time", top=3,
        micro_batches=((fixed.batch_size or 1,) if fixed.batch_size or fixed.grad_accum
                       else ()))
    best = None
    for targets in target_choices(model, setups, fixed):
        for ep in expert_degrees(model, num_devices, fixed):
            s = at_count(base, num_devices, node, expert_parallel=ep, lora_targets=targets,
                         zero_stage=stages[0], num_tokens=base.num_tokens or gb * base.seq_len)
            try:
                found = search(model, s, device, profile, c).candidates[0]
            except (SetupError, ValueError):
                continue
            if found.verdict.startswith("chosen") and (
                    best is None or found.total_seconds < best.total_seconds):
                best = found
    return best


def target_choices(model: ModelSpec, setups: Sequence[TrainSetup],
                   fixed: Fixed) -> list[tuple[str, ...]]:
    """LoRA targets searched: the setup's, and for an MoE with adapters (unless the user named
    targets) ATTENTION_TARGETS as well."""
    own = setups[0].lora_targets
    adapters = any(s.method in ("lora", "qlora") for s in setups)
    if model.moe is None or fixed.lora_targets or not adapters or own == ATTENTION_TARGETS:
        return [own]
    return [own, ATTENTION_TARGETS]


def counts_after(n: int, node: int, max_devices: int) -> list[int]:
    """n, then the next whole-node counts (doubling) up to max_devices."""
    out = [n]
    while out[-1] < max_devices:
        out.append(min(max_devices, whole_nodes(max(out[-1] + 1, 2 * out[-1]), node)))
    return [c for c in out if c <= max_devices]


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def searched_plan(model: ModelSpec, setups: Sequence[TrainSetup], device: Device,
                  profile: CalibrationProfile | None, *, max_devices: int, objective: str,
                  fixed: Fixed) -> tuple[Candidate | None, int | None]:
    """(The plan compare shows for one device (see the module rules), or None when nothing
    fits on max_devices; the fewest devices that fit, N0). setups: one per candidate method,
    at micro-batch 1."""
    node = per_node(device)
    ckpt = (True, False) if fixed.checkpointing is None else (fixed.checkpointing,)
    least = [s.model_copy(update={"batch_size": 1, "grad_accum": 1, "checkpointing": c,
                                  "lora_targets": t})
             for s in setups for c in ckpt for t in target_choices(model, setups, fixed)]
    floor = floor_count(model, least, device, max_devices)
    if floor is None:
        return None, None
    first = None
    for n in counts_after(floor, node, max_devices):
        first = best_at(model, setups, device, profile, n, fixed)
        if first is not None:
            break
    if first is None:
        return None, None
    n0 = first.setup.num_devices
    more = {whole_nodes(next_power_of_two(n0), node), whole_nodes(2 * next_power_of_two(n0),
                                                                  node)} - {n0}
    options = [first] + [o for o in (best_at(model, setups, device, profile, n, fixed)
                                     for n in sorted(more) if n <= max_devices) if o]
    if objective == "cost":
        return min(options, key=spend), n0
    return min((o for o in options if spend(o) <= spend(first)),
               key=lambda o: o.total_seconds), n0


def spend(c: Candidate) -> float:
    """What objective `cost` minimises: USD, or device-seconds where there is no price."""
    return c.cost_usd if c.cost_usd is not None else c.total_seconds * c.setup.num_devices
