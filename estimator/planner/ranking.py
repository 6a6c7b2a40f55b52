"""Ranking: the candidates that fit and meet the budgets, re-scored exactly, with why each lost."""

import math
import time

import numpy as np

from estimator.analytic.memory import (
    memory_breakdown,
)
from estimator.analytic.parallel import (
    rank_device,
)
from estimator.analytic.params import count_params
from estimator.analytic.uncertainty import upper_bytes
from estimator.checks import check, trainer_limits
from estimator.errors import SetupError
from estimator.planner.scoring import score
from estimator.planner.space import AFFINE_TOLERANCE, Constraints, SearchResult
from estimator.specs import (
    CalibrationProfile,
    Device,
    ModelSpec,
    TrainSetup,
)
from estimator.specs.plan import Candidate
from estimator.units import SECONDS_PER_HOUR

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
    base = check(model, base, device)
    limits = trainer_limits(model, base) if base.framework == "nvfree" else []
    if limits:
        raise SetupError(f"the bundled trainer (what a plan runs) cannot run this: "
                         f"{'; '.join(limits)}")
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
    functions it composes (checks.check, memory_breakdown on the rank device, step_throughput;
    not its advice, which the plan does not use). Verdicts are filled in by the caller."""
    from estimator.analytic.step import step_throughput
    from estimator.checks import check

    rows = []
    for setup in setups:
        setup = check(model, setup)
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
    if not r.fits:  # the band's upper end is over the limit, maybe the estimate too
        why = (f"does not fit: {r.peak_bytes / 2**30:.2f} GiB estimated, its measured band "
               f"over the {limit / 2**30:.2f} GiB limit")
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


