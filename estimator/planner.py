"""Choose the training plan that fits and finishes soonest (or cheapest).

Pure (no torch). The search space is method × precision × optimizer × checkpointing × number
of devices × ZeRO stage × micro-batch, with the accumulation that keeps the global batch. A
*structure* is one method × precision × optimizer × checkpointing; a *group* is a structure at
one device count and stage, over its micro-batches; a *sweep* is the groups of one structure
and stage (on one rank device, on the same side of one device) over all device counts, which
the analytic model's branches treat alike, so its functions take the device counts as an
array (memory.model_state_terms, parallel.step_collectives / optimizer_share, comms.py). The
space is scored in arrays, every term taken from the analytic model of `estimate()`, and
assembled in one gather from per-sweep, per-structure × micro-batch and per-candidate terms
(index_space):

- Compute time: per structure, throughput.timed_ops at (micro-batch, accumulation) = (1, 1),
  (2, 1) and (1, 2) (OpTable): per-call work is affine in the micro-batch b at a fixed sequence
  length (GEMM rows and elementwise work scale with b·s; weight casts and the optimizer step do
  not), call counts are affine in the accumulation a. The lists do not depend on the device
  count or stage (a rank computes as one device; only a CPU split between ranks changes the
  rates), so one table serves every group of the structure. Per-call times are evaluated once
  per distinct micro-batch, each op class with one numpy call for all structures on one rank
  device (compute_sums), and summed in the affine form in a. The second optimizer of a
  structure needs only the list at (1, 1). A structure whose probes disagree with the affine
  form (other op names; calls that change with b: MoE dispatch on a CPU) is scored exactly.
- Several devices (parallel.compose_throughput's terms), per sweep: the optimizer ops scaled
  to each rank's shard (parallel.optimizer_share), the host optimizer step of offload, and the
  collectives of parallel.step_collectives at the same probes (payload affine in b, calls
  affine in a), one call of each timed by comms.collective_seconds over the array of node
  layouts, once per distinct payload and layout (_call_seconds); sweeps that differ only in
  the optimizer or checkpointing share the terms when their collectives at (1, 1) are equal.
- Peak memory: memory_breakdown's two phases, held + max(forward/backward, optimizer step)
  (phase_peak), from memory.py's own terms: memory_phases per sweep, micro_batch_bytes per structure
  and micro-batch (evaluated per b, not extrapolated: chunked logits are not affine in b), and
  memory_breakdown itself at the largest micro-batch of each structure for any term the phases
  leave out (KV cache, expert kernel caches, a term added later), per b where there is one.

The best candidates are re-scored exactly with the functions `estimator.api.estimate` composes
(memory_breakdown, step_throughput; not its advice) and those numbers are what the plan
records; if they differ from the array scores, the whole space is scored exactly.
"""
import functools
import math
import time
from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np

from estimator.analytic import comms as C
from estimator.analytic.efficiency import default_seconds_array, profile_curve
from estimator.analytic.memory import (
    HOST_TERMS,
    check_offload,
    memory_breakdown,
    micro_batch_bytes,
    model_state_terms,
    runtime_overhead_bytes,
    step_runtime_bytes,
)
from estimator.analytic.parallel import (
    host_optimizer_op,
    optimizer_share,
    rank_device,
    rank_profile,
    step_collectives,
)
from estimator.analytic.params import count_params
from estimator.analytic.throughput import correction, op_class_key, timed_ops
from estimator.analytic.uncertainty import upper_bytes
from estimator.errors import SetupError
from estimator.specs import (
    CalibrationProfile,
    Device,
    EfficiencyCurve,
    ModelSpec,
    ParamCounts,
    TrainSetup,
)
from estimator.specs.plan import Candidate, Objective

Precision = tuple[str, bool]
"""(compute dtype, mixed precision)."""

AFFINE_TOLERANCE = 1e-6
"""Relative mismatch between an array score and estimate() above which the space is scored
exactly."""
SECONDS_PER_HOUR = 3600
PROBES = ((1, 1), (2, 1), (1, 2))
"""(micro-batch, accumulation) at which the analytic model is evaluated per structure."""


@dataclass(frozen=True)
class Constraints:
    """What the user fixed or limited; empty tuples mean 'search all'."""

    global_batch: int = 8
    """Sequences per optimizer step over all devices."""
    memory_limit_bytes: int | None = None
    """Memory per device the plan must fit (bytes); None = the device's capacity."""
    max_seconds: float | None = None
    """Wall-time budget for the token budget (seconds)."""
    max_cost_usd: float | None = None
    """Money budget for the token budget (USD)."""
    methods: tuple[str, ...] = ("full", "lora", "qlora")
    precisions: tuple[Precision, ...] = ()
    optimizers: tuple[str, ...] = ("adamw", "adamw8bit")
    checkpointing: tuple[bool, ...] = (False, True)
    zero_stages: tuple[int, ...] = (0,)
    """ZeRO stages searched when the setup has several devices (the executor runs 0, DDP)."""
    device_counts: tuple[int, ...] = ()
    """Device counts searched (devices_up_to); empty = the setup's num_devices. Counts the
    global batch or the expert-parallel degree does not divide are skipped."""
    objective: Objective = "time"
    top: int = 5
    """Candidates re-scored exactly and kept in the plan."""


@dataclass(frozen=True)
class Group:
    """One structural choice at one device count and ZeRO stage, over its micro-batches."""

    choice: TrainSetup
    """The structural choice at micro-batch 1 and accumulation 1, validated (its device
    layout and ZeRO stage are the group's fields below)."""
    num_devices: int
    num_nodes: int
    zero_stage: int
    batches: np.ndarray
    """Micro-batches (sequences)."""
    accums: np.ndarray
    """Accumulation of each micro-batch (count)."""

    structure: tuple = field(init=False)
    """What the compute op lists depend on besides (b, a) and the rank device: (method,
    compute dtype, mixed precision, optimizer, checkpointing)."""

    def __post_init__(self) -> None:
        s = self.choice
        object.__setattr__(self, "structure", (s.method, s.compute_dtype, s.mixed_precision,
                                               s.optimizer, s.checkpointing))

    @classmethod
    def of(cls, setup: TrainSetup, batches: np.ndarray, accums: np.ndarray) -> "Group":
        """The group of a setup at its own device count and stage."""
        return cls(setup, setup.num_devices, setup.num_nodes, setup.zero_stage, batches, accums)

    @functools.cached_property
    def setup(self) -> TrainSetup:
        """The setup at micro-batch 1 and accumulation 1: the choice at the group's device
        count and stage (built when first read; scoring reads it for one group per sweep)."""
        return self.choice.model_copy(update={"num_devices": self.num_devices,
                                              "num_nodes": self.num_nodes,
                                              "zero_stage": self.zero_stage})

    @property
    def ranks_per_node(self) -> int:
        """parallel.ranks_per_node of the setup (devices per node), without building it."""
        return self.num_devices // self.num_nodes


@dataclass
class Scored:
    """All candidates as parallel arrays (one row per candidate), by group."""

    groups: list[Group]
    group: np.ndarray
    """Index into `groups` of each candidate."""
    batch: np.ndarray
    accum: np.ndarray
    num_devices: np.ndarray
    peak_bytes: np.ndarray
    step_seconds: np.ndarray

    def setup(self, i: int) -> TrainSetup:
        """The setup of candidate i."""
        return _at(self.groups[self.group[i]].setup, self.batch[i], self.accum[i])


@dataclass(frozen=True)
class SearchResult:
    """Ranked candidates (exact numbers for the first `top`) and search statistics."""

    candidates: list[Candidate]
    num_candidates: int
    num_fitting: int
    memory_limit_bytes: int
    max_steps: int
    search_seconds: float


# ------------------------------------------------------------------ the space


def device_precisions(device: Device, profile: CalibrationProfile | None) -> list[Precision]:
    """fp32, plus mixed and pure 16-bit where the device computes in 16-bit: bf16 if it has
    a bf16 rate (or calibration measured bf16 GEMMs), else fp16."""
    out: list[Precision] = [("fp32", False)]
    measured = set(profile.curves) if profile else set()
    for dtype in ("bf16", "fp16"):
        if device.peak_for(dtype) or f"matmul.{dtype}" in measured:
            return [*out, (dtype, True), (dtype, False)]
    return out


def structural_setups(base: TrainSetup, precisions: list[Precision],
                      c: Constraints) -> list[TrainSetup]:
    """Every method × precision × optimizer × checkpointing (× ZeRO stage on several
    devices), at micro-batch 1 (validated once per choice; the stage is a plain copy)."""
    stages = c.zero_stages if base.num_devices > 1 else (base.zero_stage,)
    return [setup if s == setup.zero_stage else setup.model_copy(update={"zero_stage": s})
            for setup in _choices(base, precisions, c, stages[0]) for s in stages]


def _choices(base: TrainSetup, precisions: list[Precision], c: Constraints,
             zero_stage: int) -> list[TrainSetup]:
    """Every method × precision × optimizer × checkpointing at micro-batch 1, validated."""
    out = []
    for method, (dtype, mixed), optim, ckpt in product(
            c.methods, precisions, c.optimizers, c.checkpointing):
        bits = 4 if method == "qlora" else (32 if dtype == "fp32" else 16)
        update = {"method": method, "weight_bits": bits, "compute_dtype": dtype,
                  "mixed_precision": mixed, "optimizer": optim, "checkpointing": ckpt,
                  "zero_stage": zero_stage, "batch_size": 1, "grad_accum": 1}
        out.append(TrainSetup.model_validate({**base.model_dump(), **update}))
    return out


def micro_batches(global_batch: int, num_devices: int) -> np.ndarray:
    """Micro-batches b that divide the per-device batch (so accumulation is whole)."""
    if global_batch % num_devices:
        raise SetupError(f"global batch {global_batch} is not divisible by "
                         f"{num_devices} devices")
    per_device = global_batch // num_devices
    return np.array([b for b in range(1, per_device + 1) if per_device % b == 0])


def devices_up_to(max_devices: int) -> tuple[int, ...]:
    """The device counts a search up to N tries: 1, 2, 4, … below N, and N."""
    counts = [2**k for k in range(max_devices.bit_length()) if 2**k < max_devices]
    return (*counts, max_devices)


def nodes_for(base: TrainSetup, num_devices: int) -> int | None:
    """Nodes for num_devices with the setup's devices per node (fewer devices: one node);
    None when they do not fill whole nodes."""
    per_node = base.num_devices // base.num_nodes
    if num_devices <= per_node:
        return 1
    return num_devices // per_node if num_devices % per_node == 0 else None


def setups_at_device_counts(base: TrainSetup, c: Constraints) -> list[TrainSetup]:
    """The base setup at every searched device count that divides the global batch, holds
    whole expert-parallel groups and fills whole nodes."""
    if not c.device_counts:
        micro_batches(c.global_batch, base.num_devices)  # the divisibility error
        return [base]
    out = [base.model_copy(update={"num_devices": n, "num_nodes": nodes_for(base, n)})
           for n in c.device_counts
           if c.global_batch % n == 0 and n % base.expert_parallel == 0
           and nodes_for(base, n) is not None]
    if not out:
        raise SetupError(f"global batch {c.global_batch} is not divisible by any of "
                         f"{', '.join(map(str, c.device_counts))} devices")
    return out


def search_space(base: TrainSetup, precisions: list[Precision], c: Constraints) -> list[Group]:
    """Every structural choice at every device count and ZeRO stage, with its micro-batches
    (structural_setups at each device count; each choice validated once, at the first count:
    setups_at_device_counts keeps only counts the setup's checks accept)."""
    groups, choices = [], None
    for at_n in setups_at_device_counts(base, c):
        batches = micro_batches(c.global_batch, at_n.num_devices)
        accums = (c.global_batch // at_n.num_devices) // batches
        stages = c.zero_stages if at_n.num_devices > 1 else (at_n.zero_stage,)
        choices = choices or _choices(at_n, precisions, c, stages[0])
        groups += [Group(choice, at_n.num_devices, at_n.num_nodes, s, batches, accums)
                   for choice in choices for s in stages]
    return groups


def _at(setup: TrainSetup, batch: int, accum: int = 1) -> TrainSetup:
    return setup.model_copy(update={"batch_size": int(batch), "grad_accum": int(accum)})


# ------------------------------------------------------------------ peak memory


def memory_phases(model: ModelSpec, setup: TrainSetup, device: Device,
                  params: ParamCounts, num_devices=None) -> tuple[int, int, int, int]:
    """The memory_breakdown terms that do not depend on the micro-batch, from memory.py's own
    term functions: (bytes held all step: weights, states, runtime; forward/backward bytes
    besides the micro-batch's (ZeRO-3's gathered block, autocast's weight copies); gradient
    bytes, held through forward/backward when accumulating; the optimizer-step phase:
    gradients + optimizer transients). `num_devices`: an array of device counts on the same
    side of 1 as the setup's (model_state_terms), each term then an array."""
    check_offload(setup, device)
    state = model_state_terms(model, setup, device, params, num_devices=num_devices)
    for name in HOST_TERMS.get(setup.offload, ()):
        state.pop(name)
    grads = state["gradients"]
    held = (state.get("weights", 0) + state.get("quant_scales", 0)
            + state.get("master_weights", 0) + state["adapter_weights"]
            + state.get("optimizer_states", 0) + runtime_overhead_bytes(device, setup)
            + _step_runtime(setup, device, grads))
    return (held, state["gathered_params"] + state["autocast_copies"], grads,
            grads + state.get("optimizer_transient", 0))


def _step_runtime(setup: TrainSetup, device: Device, grads) -> int:
    """memory.step_runtime_bytes summed, per element of an array of gradient bytes."""
    if np.ndim(grads) == 0:
        return sum(step_runtime_bytes(setup, device, grads).values())
    return np.array([sum(step_runtime_bytes(setup, device, g).values())
                     for g in grads.tolist()])


def phase_peak(phases: tuple, fwd_bwd, accums):
    """memory_breakdown's peak from its phases: held + max(forward/backward + gathered block
    (+ gradients when accumulating), optimizer step); scalars or arrays."""
    held, gathered, grads, optimizer_phase = phases
    forward = fwd_bwd + gathered + np.where(np.asarray(accums) > 1, grads, 0)
    return held + np.maximum(forward, optimizer_phase)


def memory_totals(model: ModelSpec, setup: TrainSetup, device: Device,
                  batches: np.ndarray, accums: np.ndarray) -> np.ndarray:
    """Peak bytes per device of one structure at each (b, a): score_groups on one group."""
    return score_groups(model, [Group.of(setup, batches, accums)], device, None)[0]


# ------------------------------------------------------------------ step time


def seconds_per_call(device: Device, profile: CalibrationProfile | None, dtype: str,
                     op_class: str, flops: np.ndarray, nbytes: np.ndarray,
                     rate_flops: np.ndarray) -> np.ndarray:
    """efficiency.call_seconds over arrays of per-call work: a measured curve interpolated in
    log10(work) (np.interp clamps at the end knots exactly as curve_rate does; a FLOP curve
    read at rate_flops where it is > 0), else the roofline default
    (efficiency.default_seconds_array)."""
    curve = profile_curve(profile, op_class, dtype)
    if curve is None:
        return default_seconds_array(device, dtype, op_class, flops, nbytes)
    work = flops if curve.unit == "flops" else nbytes
    at = np.where(rate_flops > 0, rate_flops, work) if curve.unit == "flops" else work
    rate = np.interp(np.log10(np.maximum(at, 1.0)), curve.log10_work, curve.rates)
    return curve.overhead_seconds + np.where(work > 0, work / rate, 0.0)


@dataclass(frozen=True)
class OpTable:
    """throughput.timed_ops at the PROBES as arrays, one row per op: per-call FLOPs and bytes
    at b = 1 and their increase per sequence of micro-batch; calls at a = 1 and their increase
    per accumulated micro-batch; correction; whether parallel.device_compute_ops scales the op
    to the rank's optimizer shard (class 'optimizer…')."""

    names: tuple[str, ...]
    rows: dict[str, np.ndarray]
    """Row indices of each op class."""
    flops: np.ndarray
    nbytes: np.ndarray
    calls: np.ndarray
    rate_flops: np.ndarray
    fix: np.ndarray
    optimizer: np.ndarray


def op_table(model: ModelSpec, setup: TrainSetup, params: ParamCounts, device: Device,
             profile: CalibrationProfile | None, sibling: OpTable | None = None
             ) -> OpTable | None:
    """The structure's op lists as an OpTable; None when the probes disagree with the affine
    form (other op names, calls that change with b, per-call work that changes with a).

    `sibling`: the table of the same structure with another optimizer. An optimizer adds or
    changes only per-step ops (its step, gradient allocation, its share of framework dispatch),
    which do not scale with b or a differently, so the list at (1, 1) with the sibling's slopes
    is the table, when the op names agree (tests/unit/test_planner.py checks every structure
    against the analytic model)."""
    if sibling is not None:
        names, classes, one = _columns(timed_ops(model, setup, params, device, profile))
        if names != sibling.names:
            return op_table(model, setup, params, device, profile)
        slopes = sibling.flops[1], sibling.nbytes[1], sibling.calls[1], sibling.rate_flops[1]
        return _table(names, classes, one, slopes, profile, setup.compute_dtype)
    probes = [_columns(timed_ops(model, _at(setup, b, a), params, device, profile))
              for b, a in PROBES]
    (names, classes, one), (names_b, _, at_b), (names_a, _, at_a) = probes
    if not names == names_b == names_a:
        return None
    if (at_b[2] != one[2]).any() or (at_a[[0, 1, 3]] != one[[0, 1, 3]]).any():
        return None
    slopes = at_b[0] - one[0], at_b[1] - one[1], at_a[2] - one[2], at_b[3] - one[3]
    return _table(names, classes, one, slopes, profile, setup.compute_dtype)


def _columns(ops: list) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """An op list as columns: (names, op classes, 4 × ops array of per-call FLOPs, per-call
    bytes, calls and the FLOPs a curve's rate is read at)."""
    names, classes, *work = zip(*ops, strict=True) if ops else ((), (), (), (), (), ())
    return names, classes, np.array(work, dtype=float).reshape(4, -1)


def _table(names: tuple, classes: tuple, one: np.ndarray, slopes: tuple,
           profile: CalibrationProfile | None, dtype: str) -> OpTable:
    rows: dict[str, list[int]] = {}
    for i, op_class in enumerate(classes):
        rows.setdefault(op_class, []).append(i)
    fixes = {k: correction(profile, op_class_key(k, dtype)) for k in rows}
    return OpTable(
        names=names, rows={k: np.array(idx) for k, idx in rows.items()},
        flops=np.array([one[0], slopes[0]]), nbytes=np.array([one[1], slopes[1]]),
        calls=np.array([one[2], slopes[2]]), rate_flops=np.array([one[3], slopes[3]]),
        fix=np.array([fixes[k] for k in classes]),
        optimizer=np.array([k.startswith("optimizer") for k in classes], dtype=bool))


def compute_sums(tables: list[OpTable], device: Device, profile: CalibrationProfile | None,
                 dtype: str, batches: np.ndarray) -> list[np.ndarray]:
    """The compute time of a candidate is Σ_ops calls(a) · correction · seconds_per_call(work(b)):
    per-call times depend on b only and calls are affine in a, so it is
    R₀(b) + (a − 1)·R₁(b) + (O₀(b) + (a − 1)·O₁(b)) · the rank's optimizer share (0 when
    offloaded to the host), with Xₖ(b) = Σ callsₖ · correction · seconds_per_call(b) over the
    optimizer ops (O) and the rest (R). Returns (R₀, R₁, O₀, O₁) at each micro-batch (4 × b)
    per table; the tables (on one device, profile and dtype) are timed together, one
    seconds_per_call per op class."""
    ends = np.cumsum([len(t.names) for t in tables])

    def at_batches(work: np.ndarray) -> np.ndarray:
        """(at b = 1, per sequence more) × ops -> ops × micro-batches."""
        return work[0][:, None] + work[1][:, None] * (batches - 1.0)

    flops = at_batches(np.concatenate([t.flops for t in tables], axis=1))
    nbytes = at_batches(np.concatenate([t.nbytes for t in tables], axis=1))
    rate_flops = at_batches(np.concatenate([t.rate_flops for t in tables], axis=1))
    by_class: dict[str, list[np.ndarray]] = {}
    for t, end in zip(tables, ends, strict=True):
        for op_class, rows in t.rows.items():
            by_class.setdefault(op_class, []).append(rows + (end - len(t.names)))
    per_call = np.empty(flops.shape)
    for op_class, parts in by_class.items():
        rows = np.concatenate(parts)
        per_call[rows] = seconds_per_call(device, profile, dtype, op_class, flops[rows],
                                          nbytes[rows], rate_flops[rows])
    out = []
    for t, end in zip(tables, ends, strict=True):
        weights = np.concatenate([t.calls * ~t.optimizer, t.calls * t.optimizer]) * t.fix
        out.append(weights @ per_call[end - len(t.names):end])
    return out


@dataclass(frozen=True)
class CommTerms:
    """The communication (and offloaded host optimizer step) of groups that differ only in
    their device count, in affine form: seconds = fixed + per_micro_batch · (a − 1), one entry
    per group (+ grows, per candidate, for payloads that grow with b: MoE all-to-all)."""

    fixed: np.ndarray
    per_micro_batch: np.ndarray
    grows: np.ndarray | None = None


def collective_terms(model: ModelSpec, sw: "Sweep", params: ParamCounts,
                     profile: CalibrationProfile | None, first: list[C.Collective],
                     timed: dict) -> CommTerms | None:
    """parallel.communication_ops's collectives over the sweep's device counts and (b, a):
    parallel.step_collectives at the PROBES over the array of device counts (`first`: at
    (1, 1)) gives each collective's payload (affine in b: MoE all-to-all) and calls (affine in
    a: per-micro-batch ZeRO-2/3 collectives); one call of each is timed over the array of node
    layouts (_call_seconds, `timed`). No collective at (1, 1) (one device, no offload): none
    at all. None when the probes disagree with the affine form."""
    counts, setup = sw.counts, sw.setup
    if not first:
        return CommTerms(np.zeros(len(counts)), np.zeros(len(counts)))
    lists = [first] + [step_collectives(model, _at(setup, b, a), params, num_devices=counts)
                       for b, a in PROBES[1:]]
    if not [c.name for c in lists[0]] == [c.name for c in lists[1]] == [c.name for c in lists[2]]:
        return None
    nodes = np.array([g.num_nodes for g in sw.groups])
    links = replace(C.links_for(sw.rank, setup), devices_per_node=counts // nodes,
                    num_nodes=nodes)
    curve = C.all_reduce_curve(sw.rank, profile)
    gi = np.repeat(np.arange(len(sw.groups)), [len(g.batches) for g in sw.groups])
    batches = np.concatenate([g.batches for g in sw.groups])
    accums = np.concatenate([g.accums for g in sw.groups])
    fixed, per_micro_batch, grows = np.zeros(len(counts)), np.zeros(len(counts)), None
    for one, at_b, at_a in zip(*lists, strict=True):
        if at_b.num_calls != one.num_calls or np.any(at_a.num_bytes != one.num_bytes):
            return None
        extra_calls = at_a.num_calls - one.num_calls
        if np.all(at_b.num_bytes == one.num_bytes):  # the payload does not grow with b
            each = _call_seconds(one, links, curve, timed)
            fixed = fixed + one.num_calls * each
            per_micro_batch = per_micro_batch + extra_calls * each
            continue
        slope = np.broadcast_to(at_b.num_bytes - one.num_bytes, counts.shape)[gi]
        payload = np.broadcast_to(one.num_bytes, counts.shape)[gi] + slope * (batches - 1.0)
        each = _call_seconds(
            replace(one, num_bytes=payload),
            replace(links, devices_per_node=links.devices_per_node[gi], num_nodes=nodes[gi]),
            curve, timed)
        grows = (0.0 if grows is None else grows) + (
            one.num_calls + extra_calls * (accums - 1.0)) * each
    return CommTerms(fixed, per_micro_batch, grows)


def _call_seconds(c: C.Collective, links: C.Links, curve: EfficiencyCurve | None,
                  timed: dict) -> np.ndarray:
    """comms.collective_seconds of one call of `c`, computed once per distinct kind, group
    size, payload, links and curve in `timed` (sweeps of other ZeRO stages and methods move
    the same payloads: ZeRO-1/2/3's gradient reduce-scatter, the MoE all-to-all). Arrays are
    keyed by their exact values."""
    key = (c.kind, c.num_ranks, _exact_key(c.num_bytes), links.intra_bytes_per_second,
           links.inter_bytes_per_second, links.intra_latency_seconds,
           links.inter_latency_seconds, _exact_key(links.devices_per_node),
           _exact_key(links.num_nodes), id(curve))  # one profile's curve: alive all search
    if key not in timed:
        timed[key] = C.collective_seconds(replace(c, num_calls=1), links, curve)
    return timed[key]


def _exact_key(value) -> tuple:
    """A hashable key equal only for equal scalars or arrays (dtype, shape and bytes)."""
    a = np.asarray(value)
    return a.dtype.str, a.shape, a.tobytes()


def _exact_seconds(model: ModelSpec, setup: TrainSetup, device: Device,
                   profile: CalibrationProfile | None, batch: int, accum: int) -> float:
    from estimator.api import step_throughput

    return step_throughput(model, _at(setup, batch, accum), device, profile).step_seconds


def step_seconds(model: ModelSpec, setup: TrainSetup, device: Device,
                 profile: CalibrationProfile | None, batches: np.ndarray,
                 accums: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Step time of one structure at each (micro-batch b, accumulation a): score_groups on
    one group."""
    return score_groups(model, [Group.of(setup, batches, accums)], device, profile,
                        exact=exact)[1]


# ------------------------------------------------------------------ scoring


def score_groups(model: ModelSpec, groups: list[Group], device: Device,
                 profile: CalibrationProfile | None, *,
                 exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(peak bytes, step seconds) of every candidate of the groups, in order (group_peaks,
    group_seconds); with `exact`, memory_breakdown and step_throughput per candidate."""
    if exact:
        return _exact_scores(model, groups, device, profile)
    params: dict[str, ParamCounts] = {}
    for g in groups:
        if g.choice.method not in params:
            params[g.choice.method] = count_params(model, g.setup)
    space = index_space(groups, device)
    return (group_peaks(model, groups, device, params, space),
            group_seconds(model, groups, device, profile, params, space))


@dataclass(frozen=True)
class Sweep:
    """Groups that differ only in their device count (same structure, rank device, ZeRO
    stage and side of one device: the branches of the analytic model read these), scored
    together with the device count as an array."""

    groups: list[Group]
    members: np.ndarray
    """Index of each group in the space's group list."""
    rank: Device
    """The device one rank gets (parallel.rank_device)."""
    split: int | None
    """Ranks sharing a CPU machine (rank_device split it), else None."""
    counts: np.ndarray
    """Device count of each group."""

    @property
    def setup(self) -> TrainSetup:
        return self.groups[0].setup

    @property
    def structure(self) -> tuple:
        return self.groups[0].structure


@dataclass(frozen=True)
class Space:
    """Where the candidates of a list of groups are: per candidate its group and distinct
    micro-batch, per group its structure-and-rank key, and the sweeps. Scores are
    assembled from per-group terms (sweeps), per-key and micro-batch terms (op tables,
    batch rows) and per-candidate accumulation in one gather."""

    sweeps: list[Sweep]
    starts: np.ndarray
    """First candidate of each group, and the number of candidates at the end."""
    group: np.ndarray
    """Group of each candidate."""
    accum: np.ndarray
    """Accumulation of each candidate."""
    batch_values: np.ndarray
    """The distinct micro-batches of the space."""
    batch_index: np.ndarray
    """Index into batch_values of each candidate's micro-batch."""
    keys: list[tuple]
    """(structure, CPU split) of the op tables and batch rows."""
    key: np.ndarray
    """Index into keys of each group."""

    def candidates(self, members: np.ndarray) -> np.ndarray:
        """Indices of the candidates of the groups `members`, group by group."""
        return np.concatenate([np.arange(self.starts[i], self.starts[i + 1])
                               for i in members.tolist()])


def index_space(groups: list[Group], device: Device) -> Space:
    """The groups' sweeps and candidate indices (rank_device once per number of ranks per
    node)."""
    ranks, members, keys = {}, {}, {}
    key = np.empty(len(groups), dtype=int)
    for i, g in enumerate(groups):
        per_node = g.ranks_per_node
        if per_node not in ranks:
            rank = rank_device(device, g.setup)
            ranks[per_node] = rank, (None if rank is device else per_node)
        rank, split = ranks[per_node]
        key[i] = keys.setdefault((g.structure, split), len(keys))
        members.setdefault((g.structure, split, g.zero_stage, g.num_devices > 1),
                           (rank, split, []))[2].append(i)
    sweeps = [Sweep(groups=[groups[i] for i in idx], members=np.array(idx), rank=rank,
                    split=split, counts=np.array([groups[i].num_devices for i in idx]))
              for rank, split, idx in members.values()]
    sizes = [len(g.batches) for g in groups]
    values, index = np.unique(np.concatenate([g.batches for g in groups]), return_inverse=True)
    return Space(sweeps=sweeps, starts=np.concatenate([[0], np.cumsum(sizes)]).astype(int),
                 group=np.repeat(np.arange(len(groups)), sizes),
                 accum=np.concatenate([g.accums for g in groups]), batch_values=values,
                 batch_index=index, keys=list(keys), key=key)


def group_peaks(model: ModelSpec, groups: list[Group], device: Device,
                params: dict[str, ParamCounts], space: Space) -> np.ndarray:
    """Peak bytes per device of every candidate: memory_phases per sweep (over the array of
    its device counts), batch rows per structure and micro-batch (_batch_rows), phase_peak over
    all candidates at once."""
    phases = np.empty((4, len(groups)))
    tables: list[dict] = [{} for _ in space.keys]
    fwd_bwd: dict[tuple, int] = {}
    for sw in space.sweeps:
        p = params[sw.setup.method]
        terms = memory_phases(model, sw.setup, sw.rank, p, sw.counts)
        for k, term in enumerate(terms):
            phases[k, sw.members] = term
        _batch_rows(model, sw, p, terms, tables[space.key[sw.members[0]]], fwd_bwd)
    rows = np.zeros((2, len(space.keys), len(space.batch_values)))
    for k, table in enumerate(tables):
        at = np.searchsorted(space.batch_values, list(table))
        rows[:, k, at] = np.array(list(table.values()), dtype=float).T
    g, key, b = space.group, space.key[space.group], space.batch_index
    return rows[1, key, b] + phase_peak(phases[:, g], rows[0, key, b], space.accum)


def group_seconds(model: ModelSpec, groups: list[Group], device: Device,
                  profile: CalibrationProfile | None, params: dict[str, ParamCounts],
                  space: Space) -> np.ndarray:
    """Step seconds of every candidate: one OpTable per structure and rank device, its
    compute time per distinct micro-batch (compute_sums; the optimizer ops scaled to each
    group's shard); collectives and the host optimizer step per sweep over its device counts
    (_sweep_comm). A sweep whose probes disagree with the affine forms is scored by
    step_throughput per candidate."""
    fixed, per_micro_batch, scale = (np.zeros(len(groups)) for _ in range(3))
    grows = np.zeros(space.starts[-1])
    sums = np.zeros((4, len(space.keys), len(space.batch_values)))
    tables: dict[int, OpTable | None] = {}
    siblings: dict[tuple, OpTable] = {}  # a structure's table but for its optimizer
    timing: dict[tuple, tuple] = {}  # (rank, profile, dtype) -> (the rank etc., keys)
    collectives: dict[tuple, CommTerms | None] = {}  # by layout and collectives (_sweep_comm)
    timed: dict[tuple, np.ndarray] = {}  # one call of a collective (_call_seconds)
    exact: list[int] = []
    for sw in space.sweeps:
        s, p = sw.setup, params[sw.setup.method]
        key = space.key[sw.members[0]]
        if key not in tables:
            rprofile = rank_profile(profile, device, s)
            mate = (*sw.structure[:3], *sw.structure[4:], sw.split)
            tables[key] = op_table(model, s, p, sw.rank, rprofile, siblings.get(mate))
            if tables[key] is not None:
                siblings.setdefault(mate, tables[key])
                timing.setdefault((id(sw.rank), id(rprofile), s.compute_dtype),
                                  (sw.rank, rprofile, s.compute_dtype, []))[3].append(key)
        terms = _sweep_comm(model, sw, p, profile, collectives, timed)
        if tables[key] is None or terms is None:
            exact += sw.members.tolist()
            continue
        fixed[sw.members] = terms.fixed
        per_micro_batch[sw.members] = terms.per_micro_batch
        if terms.grows is not None:
            grows[space.candidates(sw.members)] = terms.grows
        scale[sw.members] = 0.0 if s.offload != "none" else optimizer_share(
            model, s, p, num_devices=sw.counts)
    for rank, rprofile, dtype, keys in timing.values():
        found = compute_sums([tables[k] for k in keys], rank, rprofile, dtype,
                             space.batch_values)
        for k, values in zip(keys, found, strict=True):
            sums[:, k] = values
    g, key, b, extra = space.group, space.key[space.group], space.batch_index, space.accum - 1.0
    step = (fixed[g] + per_micro_batch[g] * extra + grows + sums[0, key, b]
            + sums[1, key, b] * extra + (sums[2, key, b] + sums[3, key, b] * extra) * scale[g])
    for i in exact:
        step[space.starts[i]:space.starts[i + 1]] = _exact_steps(model, groups[i], device,
                                                                 profile)
    return step


def _sweep_comm(model: ModelSpec, sw: Sweep, params: ParamCounts,
                profile: CalibrationProfile | None, known: dict, timed: dict
                ) -> CommTerms | None:
    """collective_terms of a sweep plus its groups' host optimizer step (offload). The
    collectives move gradients and parameters, which neither the optimizer nor checkpointing
    changes: a sweep reuses `known` terms of the same method, precision, ZeRO stage and
    device layouts when its collectives at (1, 1) are the same (_collectives_key). `timed`:
    calls already timed (_call_seconds)."""
    s = sw.setup
    first = step_collectives(model, s, params, num_devices=sw.counts)
    key = (*sw.structure[:3], s.zero_stage, sw.split, tuple(sw.counts.tolist()),
           tuple(g.num_nodes for g in sw.groups), _collectives_key(first))
    if key not in known:
        known[key] = collective_terms(model, sw, params, profile, first, timed)
    terms = known[key]
    if terms is None or s.offload == "none":
        return terms
    host = np.array([sum(op.seconds for op in host_optimizer_op(model, g.setup, params))
                     for g in sw.groups])
    return replace(terms, fixed=terms.fixed + host)


def _collectives_key(collectives: list[C.Collective]) -> tuple:
    """A hashable key equal only for the same collectives: names, kinds, calls, group sizes
    and exact payloads (_exact_key)."""
    return tuple((c.name, c.kind, c.num_calls, c.num_ranks, _exact_key(c.num_bytes))
                 for c in collectives)


def _batch_rows(model: ModelSpec, sw: Sweep, params: ParamCounts, phases: tuple,
                table: dict, fwd_bwd: dict) -> None:
    """Fill table[b] for the sweep's micro-batches not yet there with (batch_bytes, the bytes
    memory_breakdown counts beyond phase_peak): the terms held in both phases that grow with
    the micro-batch (KV cache, expert kernel caches, any term added to memory_breakdown
    later), so the composition stays equal to memory_breakdown. They are non-negative and grow
    with b: when memory_breakdown adds nothing at the largest new b, it adds nothing at the
    smaller ones either (one memory_breakdown per structure, usually). batch_bytes (the
    micro-batch's activations, logits, dequantised weight) is shared by the structures that
    differ only in the optimizer (`fwd_bwd`)."""
    if table.keys() >= {b for g in sw.groups for b in g.batches.tolist()}:
        return
    new: dict[int, tuple[int, int]] = {}  # b -> (a, index of the group that has it)
    for j, g in enumerate(sw.groups):
        for b, a in zip(g.batches.tolist(), g.accums.tolist(), strict=True):
            if b not in table and b not in new:
                new[b] = (a, j)
    if not new:
        return
    mate = (*sw.structure[:3], *sw.structure[4:], sw.split)
    for b in new:
        if (mate, b) not in fwd_bwd:
            fwd_bwd[mate, b] = micro_batch_bytes(model, _at(sw.setup, b), sw.rank.backend)

    def beyond(b: int) -> int:
        a, j = new[b]
        exact = memory_breakdown(model, _at(sw.groups[j].setup, b, a), sw.rank,
                                 params).total_bytes
        at_j = tuple(t[j] if np.ndim(t) else t for t in phases)
        return exact - int(phase_peak(at_j, fwd_bwd[mate, b], a))

    largest = max(new)
    top = beyond(largest)
    for b in new:
        table[b] = (fwd_bwd[mate, b],
                    top if b == largest else (0 if top == 0 else beyond(b)))


def _exact_scores(model: ModelSpec, groups: list[Group], device: Device,
                  profile: CalibrationProfile | None) -> tuple[np.ndarray, np.ndarray]:
    """(peak bytes, step seconds) by memory_breakdown and step_throughput per candidate."""
    peak, step = [], []
    for g in groups:
        s = g.setup
        rank, p = rank_device(device, s), count_params(model, s)
        peak += [memory_breakdown(model, _at(s, b, a), rank, p).total_bytes
                 for b, a in zip(g.batches, g.accums, strict=True)]
        step.append(_exact_steps(model, g, device, profile))
    return np.array(peak, dtype=float), np.concatenate(step)


def _exact_steps(model: ModelSpec, g: Group, device: Device,
                 profile: CalibrationProfile | None) -> np.ndarray:
    return np.array([_exact_seconds(model, g.setup, device, profile, b, a)
                     for b, a in zip(g.batches, g.accums, strict=True)])


def score(model: ModelSpec, base: TrainSetup, device: Device,
          profile: CalibrationProfile | None, c: Constraints, *, exact: bool = False) -> Scored:
    """Memory and step time of every candidate of the space, in arrays (or evaluated one by
    one when `exact`)."""
    precisions = list(c.precisions) or device_precisions(device, profile)
    groups = search_space(base, precisions, c)
    peak, step = score_groups(model, groups, device, profile, exact=exact)
    sizes = [len(g.batches) for g in groups]
    return Scored(groups=groups, group=np.repeat(np.arange(len(groups)), sizes),
                  batch=np.concatenate([g.batches for g in groups]),
                  accum=np.concatenate([g.accums for g in groups]),
                  num_devices=np.repeat([g.num_devices for g in groups], sizes),
                  peak_bytes=peak, step_seconds=step)


# ------------------------------------------------------------------ ranking


def num_steps(num_tokens: int, global_batch: int, seq_len: int) -> int:
    """Optimizer steps that cover the token budget (count)."""
    return max(1, math.ceil(num_tokens / (global_batch * seq_len)))


def search(model: ModelSpec, base: TrainSetup, device: Device,
           profile: CalibrationProfile | None, c: Constraints) -> SearchResult:
    """Score every candidate, rank the ones that fit and meet the budgets, re-score the best
    `c.top` exactly with estimate(), and say why each lost."""
    if base.num_tokens is None:
        raise SetupError("the planner needs a token budget (--tokens, or --data to count)")
    started = time.perf_counter()
    result = _search(model, base, device, profile, c, exact=False)
    if not result[1]:  # the array scores disagreed with estimate(): score exactly
        result = _search(model, base, device, profile, c, exact=True)
    candidates, _, num_candidates, num_fitting, limit, steps = result
    return SearchResult(candidates=candidates, num_candidates=num_candidates,
                        num_fitting=num_fitting, memory_limit_bytes=limit, max_steps=steps,
                        search_seconds=time.perf_counter() - started)


def _search(model: ModelSpec, base: TrainSetup, device: Device,
            profile: CalibrationProfile | None, c: Constraints, *, exact: bool) -> tuple:
    """(ranked exact candidates, whether the scores of the top ones equal estimate(),
    number scored, number fitting, memory limit, steps)."""
    scored = score(model, base, device, profile, c, exact=exact)
    peak, step = scored.peak_bytes, scored.step_seconds
    steps = num_steps(base.num_tokens, c.global_batch, base.seq_len)
    limit = c.memory_limit_bytes or _capacity(model, base, device)
    total = step * steps
    cost = _cost(total, device, scored.num_devices)
    fits = upper_bytes(peak, base, device) <= limit  # the band's upper end (uncertainty.py)
    ok = fits & _within(total, c.max_seconds) & _within(cost, c.max_cost_usd)
    key = cost if c.objective == "cost" and device.price_per_hour_usd is not None else total
    order = np.lexsort((peak, key, ~ok))[: c.top]
    rows = _exact(model, [scored.setup(i) for i in order], device, profile, steps, limit)
    agree = all(abs(r.step_seconds - step[i]) <= AFFINE_TOLERANCE * step[i]
                and abs(r.peak_bytes - peak[i]) <= 1 for r, i in zip(rows, order, strict=True))
    rows.sort(key=lambda r: (not _meets(r, c, limit), _key(r, c), r.peak_bytes))
    ranked = [replace_verdict(r, rows[0], c, limit) for r in rows]
    return ranked, agree, len(peak), int(fits.sum()), limit, steps


def _within(values: np.ndarray, limit: float | None) -> np.ndarray:
    return np.ones(len(values), bool) if limit is None else values <= limit


def _cost(total_seconds: np.ndarray, device: Device, num_devices) -> np.ndarray:
    """USD of each candidate: hours × price × devices (NaN without a price)."""
    price = device.price_per_hour_usd
    if price is None:
        return np.full(len(total_seconds), np.nan)
    return total_seconds / SECONDS_PER_HOUR * price * num_devices


def _capacity(model: ModelSpec, base: TrainSetup, device: Device) -> int:
    return memory_breakdown(model, base, device, count_params(model, base)).capacity_bytes


def _exact(model: ModelSpec, setups: list[TrainSetup], device: Device,
           profile: CalibrationProfile | None, steps: int, limit: int) -> list[Candidate]:
    """The memory and step time estimate() reports for the setups, in their order, by the
    functions it composes (check_setup, memory_breakdown on the rank device, step_throughput;
    not its advice, which the plan does not use). Verdicts are filled in by the caller."""
    from estimator.api import check_setup, step_throughput

    rows = []
    for setup in setups:
        check_setup(model, setup)
        peak = memory_breakdown(model, setup, rank_device(device, setup),
                                count_params(model, setup))
        seconds = step_throughput(model, setup.model_copy(update={"num_tokens": None}), device,
                                  profile, peak).step_seconds
        cost = _cost(np.array([seconds * steps]), device, setup.num_devices)[0]
        rows.append(Candidate(
            setup=setup, peak_bytes=peak.total_bytes, step_seconds=seconds,
            total_seconds=seconds * steps, cost_usd=None if np.isnan(cost) else float(cost),
            fits=peak.upper_bytes <= limit, verdict=""))
    return rows


def _meets(r: Candidate, c: Constraints, limit: int) -> bool:
    return (r.fits and (c.max_seconds is None or r.total_seconds <= c.max_seconds)
            and (c.max_cost_usd is None or (r.cost_usd or 0) <= c.max_cost_usd))


def _key(r: Candidate, c: Constraints) -> float:
    if c.objective == "cost" and r.cost_usd is not None:
        return r.cost_usd
    return r.total_seconds


def replace_verdict(r: Candidate, best: Candidate, c: Constraints, limit: int) -> Candidate:
    """One line on why a candidate won or lost against the best."""
    if r.peak_bytes > limit:
        why = f"does not fit: {r.peak_bytes / 2**30:.2f} GiB > {limit / 2**30:.2f} GiB"
    elif c.max_seconds is not None and r.total_seconds > c.max_seconds:
        why = "over the time budget"
    elif c.max_cost_usd is not None and (r.cost_usd or 0) > c.max_cost_usd:
        why = "over the cost budget"
    elif r is best:
        why = "chosen: " + ("cheapest" if c.objective == "cost" else "fastest") + " that fits"
    else:
        ratio = _key(r, c) / _key(best, c)
        why = f"{ratio:.2f}× {'dearer' if c.objective == 'cost' else 'slower'} than the chosen"
    return r.model_copy(update={"verdict": why})


def plan_setup(candidate: Candidate, num_tokens: int) -> TrainSetup:
    """The chosen setup with the token budget recorded."""
    return candidate.setup.model_copy(update={"num_tokens": num_tokens})


__all__ = ["Constraints", "SearchResult", "devices_up_to", "plan_setup", "search"]
