"""Choose the training plan that fits and finishes soonest (or cheapest).

Pure (no torch). The search space is method × precision × optimizer × checkpointing (× ZeRO
stage) × micro-batch, with the accumulation that keeps the global batch. For each structural
choice (everything but the micro-batch) the op list of the analytic model is built at
(micro-batch, accumulation) = (1, 1), (2, 1) and (1, 2): per-call work is affine in the
micro-batch at a fixed sequence length (GEMM rows and elementwise work scale with b·s; weight
casts and the optimizer step do not) and call counts are affine in the accumulation, so every
micro-batch is timed at once with numpy through the same efficiency curves as `estimate()`.
Peak memory is memory_breakdown itself per micro-batch (a max of two phases, not affine). The
best candidates are re-scored with `estimator.api.estimate` and those exact numbers are what the
plan records; if they differ from the vectorised scores, the whole space is scored exactly.
"""

import math
import time
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from estimator.analytic.efficiency import default_seconds, profile_curve
from estimator.analytic.memory import memory_breakdown
from estimator.analytic.parallel import rank_device
from estimator.analytic.params import count_params
from estimator.analytic.throughput import correction, op_class_key, timed_ops
from estimator.errors import SetupError
from estimator.specs import CalibrationProfile, Device, ModelSpec, TrainSetup
from estimator.specs.plan import Candidate, Objective

Precision = tuple[str, bool]
"""(compute dtype, mixed precision)."""

AFFINE_TOLERANCE = 1e-6
"""Relative mismatch above which a structure is scored exactly per micro-batch."""
SECONDS_PER_HOUR = 3600


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
    objective: Objective = "time"
    top: int = 5
    """Candidates re-scored exactly and kept in the plan."""


@dataclass
class Scored:
    """All candidates as parallel arrays (one row per candidate)."""

    setups: list[TrainSetup] = field(default_factory=list)
    peak_bytes: list[np.ndarray] = field(default_factory=list)
    step_seconds: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class SearchResult:
    """Ranked candidates (exact numbers for the first `top`) and search statistics."""

    candidates: list[Candidate]
    num_candidates: int
    num_fitting: int
    memory_limit_bytes: int
    max_steps: int
    search_seconds: float


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
    devices), at micro-batch 1 (validated)."""
    out = []
    stages = c.zero_stages if base.num_devices > 1 else (base.zero_stage,)
    for method, (dtype, mixed), optim, ckpt, stage in product(
            c.methods, precisions, c.optimizers, c.checkpointing, stages):
        bits = 4 if method == "qlora" else (32 if dtype == "fp32" else 16)
        update = {"method": method, "weight_bits": bits, "compute_dtype": dtype,
                  "mixed_precision": mixed, "optimizer": optim, "checkpointing": ckpt,
                  "zero_stage": stage, "batch_size": 1, "grad_accum": 1}
        out.append(TrainSetup.model_validate({**base.model_dump(), **update}))
    return out


def micro_batches(global_batch: int, num_devices: int) -> np.ndarray:
    """Micro-batches b that divide the per-device batch (so accumulation is whole)."""
    if global_batch % num_devices:
        raise SetupError(f"global batch {global_batch} is not divisible by "
                         f"{num_devices} devices")
    per_device = global_batch // num_devices
    return np.array([b for b in range(1, per_device + 1) if per_device % b == 0])


def _at(setup: TrainSetup, batch: int, accum: int = 1) -> TrainSetup:
    return setup.model_copy(update={"batch_size": int(batch), "grad_accum": int(accum)})


def memory_totals(model: ModelSpec, setup: TrainSetup, device: Device,
                  batches: np.ndarray, accums: np.ndarray) -> np.ndarray:
    """Peak bytes per device at each micro-batch, by memory_breakdown itself: the peak is
    the larger of two phases (forward/backward or optimizer step), so it is not affine in b,
    and one breakdown costs ~0.1 ms."""
    params = count_params(model, setup)
    rank = rank_device(device, setup)
    return np.array([memory_breakdown(model, _at(setup, b, a), rank, params).total_bytes
                     for b, a in zip(batches, accums, strict=True)], dtype=float)


def seconds_per_call(device: Device, profile: CalibrationProfile | None, dtype: str,
                     op_class: str, flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """efficiency.call_seconds over arrays of per-call work: a measured curve interpolated in
    log10(work) (np.interp clamps at the end knots exactly as curve_rate does), else the
    roofline default call by call."""
    curve = profile_curve(profile, op_class, dtype)
    if curve is None:
        return np.array([default_seconds(device, dtype, op_class, f, b)
                         for f, b in zip(flops, nbytes, strict=True)])
    work = flops if curve.unit == "flops" else nbytes
    rate = np.interp(np.log10(np.maximum(work, 1.0)), curve.log10_work, curve.rates)
    return curve.overhead_seconds + np.where(work > 0, work / rate, 0.0)


def step_seconds(model: ModelSpec, setup: TrainSetup, device: Device,
                 profile: CalibrationProfile | None, batches: np.ndarray,
                 accums: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Step time at each (micro-batch b, accumulation a). One device: the op lists of
    throughput.timed_ops at (b, a) = (1, 1), (2, 1) and (1, 2) give each op's per-call work,
    affine in b, and its number of calls, affine in a (calls that repeat per micro-batch plus
    per-step ones such as the optimizer); every (b, a) is then timed with numpy. Several
    devices (communication, sharded optimizer step), or when `exact`: the exact model per
    (b, a)."""
    params = count_params(model, setup)
    lists = [timed_ops(model, _at(setup, b, a), params, device, profile)
             for b, a in ((1, 1), (2, 1), (1, 2))]
    names = [[o.name for o in ops] for ops in lists]
    same_calls = all(o.num_calls == q.num_calls for o, q in zip(lists[0], lists[1], strict=False))
    if (exact or setup.num_devices > 1 or setup.offload != "none" or not same_calls
            or not names[0] == names[1] == names[2]):
        return np.array([_exact_seconds(model, setup, device, profile, b, a)
                         for b, a in zip(batches, accums, strict=True)])
    total = np.zeros(len(batches))
    for o1, ob, oa in zip(*lists, strict=True):
        flops = o1.flops_per_call + (ob.flops_per_call - o1.flops_per_call) * (batches - 1)
        nbytes = o1.bytes_per_call + (ob.bytes_per_call - o1.bytes_per_call) * (batches - 1)
        calls = o1.num_calls + (oa.num_calls - o1.num_calls) * (accums - 1)
        fix = correction(profile, op_class_key(o1.op_class, setup.compute_dtype))
        total += calls * fix * seconds_per_call(device, profile, setup.compute_dtype,
                                                o1.op_class, flops, nbytes)
    return total


def _exact_seconds(model: ModelSpec, setup: TrainSetup, device: Device,
                   profile: CalibrationProfile | None, batch: int, accum: int) -> float:
    from estimator.api import step_throughput

    return step_throughput(model, _at(setup, batch, accum), device, profile).step_seconds


def score(model: ModelSpec, base: TrainSetup, device: Device,
          profile: CalibrationProfile | None, c: Constraints, *, exact: bool = False) -> Scored:
    """Memory and step time of every candidate, vectorised over the micro-batch (or
    evaluated one by one when `exact`)."""
    precisions = list(c.precisions) or device_precisions(device, profile)
    batches = micro_batches(c.global_batch, base.num_devices)
    accums = (c.global_batch // base.num_devices) // batches
    scored = Scored()
    for setup in structural_setups(base, precisions, c):
        scored.setups += [_at(setup, b, a) for b, a in zip(batches, accums, strict=True)]
        scored.peak_bytes.append(memory_totals(model, setup, device, batches, accums))
        scored.step_seconds.append(step_seconds(model, setup, device, profile, batches, accums,
                                                exact=exact))
    return scored


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
    if not result[1]:  # the affine scores disagreed with estimate(): score exactly
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
    peak = np.concatenate(scored.peak_bytes)
    step = np.concatenate(scored.step_seconds)
    steps = num_steps(base.num_tokens, c.global_batch, base.seq_len)
    limit = c.memory_limit_bytes or _capacity(model, base, device)
    total = step * steps
    cost = _cost(total, device, base.num_devices)
    ok = (peak <= limit) & _within(total, c.max_seconds) & _within(cost, c.max_cost_usd)
    key = cost if c.objective == "cost" and device.price_per_hour_usd is not None else total
    order = np.lexsort((peak, key, ~ok))[: c.top]
    rows = _exact(model, [scored.setups[i] for i in order], device, profile, steps, limit)
    agree = all(abs(r.step_seconds - step[i]) <= AFFINE_TOLERANCE * step[i]
                and abs(r.peak_bytes - peak[i]) <= 1 for r, i in zip(rows, order, strict=True))
    rows.sort(key=lambda r: (not _meets(r, c, limit), _key(r, c), r.peak_bytes))
    ranked = [replace_verdict(r, rows[0], c, limit) for r in rows]
    return ranked, agree, len(scored.setups), int((peak <= limit).sum()), limit, steps


def _within(values: np.ndarray, limit: float | None) -> np.ndarray:
    return np.ones(len(values), bool) if limit is None else values <= limit


def _cost(total_seconds: np.ndarray, device: Device, num_devices: int) -> np.ndarray:
    price = device.price_per_hour_usd
    if price is None:
        return np.full(len(total_seconds), np.nan)
    return total_seconds / SECONDS_PER_HOUR * price * num_devices


def _capacity(model: ModelSpec, base: TrainSetup, device: Device) -> int:
    return memory_breakdown(model, base, device, count_params(model, base)).capacity_bytes


def _exact(model: ModelSpec, setups: list[TrainSetup], device: Device,
           profile: CalibrationProfile | None, steps: int, limit: int) -> list[Candidate]:
    """estimate() of the setups, in their order (verdicts are filled in by the caller)."""
    from estimator.api import estimate

    rows = []
    for setup in setups:
        est = estimate(model, setup.model_copy(update={"num_tokens": None}), device, profile)
        seconds = est.throughput.step_seconds
        cost = _cost(np.array([seconds * steps]), device, setup.num_devices)[0]
        rows.append(Candidate(
            setup=setup, peak_bytes=est.memory.total_bytes, step_seconds=seconds,
            total_seconds=seconds * steps, cost_usd=None if np.isnan(cost) else float(cost),
            fits=est.memory.total_bytes <= limit, verdict=""))
    return rows


def _meets(r: Candidate, c: Constraints, limit: int) -> bool:
    return (r.peak_bytes <= limit and (c.max_seconds is None or r.total_seconds <= c.max_seconds)
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


__all__ = ["Constraints", "SearchResult", "plan_setup", "search"]
