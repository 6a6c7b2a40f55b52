"""Step time of every candidate in arrays: op tables at the probes, per-call times per op class,
collectives over the device-count axis."""

from dataclasses import dataclass, replace

import numpy as np

from estimator.analytic import comms as C
from estimator.analytic import overlap as O
from estimator.analytic.efficiency import default_seconds_array, profile_curve
from estimator.analytic.parallel import (
    host_optimizer_op,
    optimizer_share,
    rank_profile,
    step_collectives,
)
from estimator.analytic.throughput import correction, op_class_key, timed_ops
from estimator.planner.space import PROBES, Group, Space, Sweep, _at
from estimator.specs import (
    CalibrationProfile,
    Device,
    EfficiencyCurve,
    ModelSpec,
    ParamCounts,
    TrainSetup,
)

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
    their device count, in affine form per overlap slot (overlap.SLOTS, the leading axis):
    seconds = fixed + per_micro_batch · (a − 1), one column per group (+ grows, per
    candidate, for payloads that grow with b: MoE all-to-all); `tails` the share of each slot
    that cannot overlap (overlap.tails, slots × groups)."""

    fixed: np.ndarray
    per_micro_batch: np.ndarray
    tails: np.ndarray
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
    slots = len(O.SLOTS)
    if not first:
        zeros = np.zeros((slots, len(counts)))
        return CommTerms(zeros, zeros.copy(), np.ones((slots, len(counts))))
    lists = [first] + [step_collectives(model, _at(setup, b, a), params, num_devices=counts)
                       for b, a in PROBES[1:]]
    if not [c.name for c in lists[0]] == [c.name for c in lists[1]] == [c.name for c in lists[2]]:
        return None
    nodes = np.array([g.num_nodes for g in sw.groups])
    links = replace(C.links_for(sw.rank, setup), devices_per_node=counts // nodes,
                    num_nodes=nodes)
    curves = C.measured_curves(sw.rank, profile)
    gi = np.repeat(np.arange(len(sw.groups)), [len(g.batches) for g in sw.groups])
    batches = np.concatenate([g.batches for g in sw.groups])
    accums = np.concatenate([g.accums for g in sw.groups])
    fixed, per_micro_batch = np.zeros((slots, len(counts))), np.zeros((slots, len(counts)))
    grows = None
    for one, at_b, at_a in zip(*lists, strict=True):
        if at_b.num_calls != one.num_calls or np.any(at_a.num_bytes != one.num_bytes):
            return None
        extra_calls = at_a.num_calls - one.num_calls
        weights = np.array(O.slot_weights(one, setup))[:, None]
        if np.all(at_b.num_bytes == one.num_bytes):  # the payload does not grow with b
            each = _call_seconds(one, links, curves, timed)
            fixed = fixed + weights * (one.num_calls * each)
            per_micro_batch = per_micro_batch + weights * (extra_calls * each)
            continue
        slope = np.broadcast_to(at_b.num_bytes - one.num_bytes, counts.shape)[gi]
        payload = np.broadcast_to(one.num_bytes, counts.shape)[gi] + slope * (batches - 1.0)
        each = _call_seconds(
            replace(one, num_bytes=payload),
            replace(links, devices_per_node=links.devices_per_node[gi], num_nodes=nodes[gi]),
            curves, timed)
        grows = (0.0 if grows is None else grows) + weights * (
            (one.num_calls + extra_calls * (accums - 1.0)) * each)
    tails = np.array([np.broadcast_to(t, counts.shape)  # a sweep: one side of one device
                      for t in O.tails(model, setup, sw.rank, first)])
    return CommTerms(fixed, per_micro_batch, tails, grows)


def _call_seconds(c: C.Collective, links: C.Links, curves: dict[str, EfficiencyCurve],
                  timed: dict) -> np.ndarray:
    """comms.collective_seconds of one call of `c`, computed once per distinct kind, group
    size, payload, links and curve in `timed` (sweeps of other ZeRO stages and methods move
    the same payloads: ZeRO-1/2/3's gradient reduce-scatter, the MoE all-to-all). Arrays are
    keyed by their exact values."""
    key = (c.kind, c.num_ranks, _exact_key(c.num_bytes), links.intra_bytes_per_second,
           links.inter_bytes_per_second, links.intra_latency_seconds,
           links.inter_latency_seconds, _exact_key(links.devices_per_node),
           _exact_key(links.num_nodes),
           tuple(sorted((k, id(v)) for k, v in curves.items())))  # the profile's: alive all search
    if key not in timed:
        timed[key] = C.collective_seconds(replace(c, num_calls=1), links, curves)
    return timed[key]


def _exact_key(value) -> tuple:
    """A hashable key equal only for equal scalars or arrays (dtype, shape and bytes)."""
    a = np.asarray(value)
    return a.dtype.str, a.shape, a.tobytes()


def group_seconds(model: ModelSpec, groups: list[Group], device: Device,
                  profile: CalibrationProfile | None, params: dict[str, ParamCounts],
                  space: Space) -> np.ndarray:
    """Step seconds of every candidate: one OpTable per structure and rank device, its
    compute time per distinct micro-batch (compute_sums; the optimizer ops scaled to each
    group's shard); collectives and the host optimizer step per sweep over its device counts
    (_sweep_comm). A sweep whose probes disagree with the affine forms is scored by
    step_throughput per candidate."""
    slots = len(O.SLOTS)
    fixed, per_micro_batch = np.zeros((slots, len(groups))), np.zeros((slots, len(groups)))
    tails, share = np.ones((slots, len(groups))), np.ones(len(groups))
    scale = np.zeros(len(groups))
    grows = np.zeros((slots, space.starts[-1]))
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
        fixed[:, sw.members] = terms.fixed
        per_micro_batch[:, sw.members] = terms.per_micro_batch
        tails[:, sw.members] = terms.tails
        share[sw.members] = O.forward_share(s)
        if terms.grows is not None:
            grows[:, space.candidates(sw.members)] = terms.grows
        scale[sw.members] = 0.0 if s.offload != "none" else optimizer_share(
            model, s, p, num_devices=sw.counts)
    for rank, rprofile, dtype, keys in timing.values():
        found = compute_sums([tables[k] for k in keys], rank, rprofile, dtype,
                             space.batch_values)
        for k, values in zip(keys, found, strict=True):
            sums[:, k] = values
    g, key, b, extra = space.group, space.key[space.group], space.batch_index, space.accum - 1.0
    comm = fixed[:, g] + per_micro_batch[:, g] * extra + grows
    compute = sums[0, key, b] + sums[1, key, b] * extra
    hidden = O.hidden_seconds(comm, tails[:, g], compute, space.accum, share[g])
    step = (comm.sum(axis=0) - np.sum(hidden, axis=0) + compute
            + (sums[2, key, b] + sums[3, key, b] * extra) * scale[g])
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
    return replace(terms, fixed=terms.fixed + np.outer(np.eye(len(O.SLOTS))[0], host))


def _collectives_key(collectives: list[C.Collective]) -> tuple:
    """A hashable key equal only for the same collectives: names, kinds, calls, group sizes
    and exact payloads (_exact_key)."""
    return tuple((c.name, c.kind, c.num_calls, c.num_ranks, _exact_key(c.num_bytes))
                 for c in collectives)


def _exact_steps(model: ModelSpec, g: Group, device: Device,
                 profile: CalibrationProfile | None) -> np.ndarray:
    return np.array([_exact_seconds(model, g.setup, device, profile, b, a)
                     for b, a in zip(g.batches, g.accums, strict=True)])


def _exact_seconds(model: ModelSpec, setup: TrainSetup, device: Device,
                   profile: CalibrationProfile | None, batch: int, accum: int) -> float:
    from estimator.analytic.step import step_throughput

    return step_throughput(model, _at(setup, batch, accum), device, profile).step_seconds
