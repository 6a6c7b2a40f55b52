"""Scoring: peak bytes and step seconds of every candidate (arrays, or exactly with
memory_breakdown and step_throughput)."""


import numpy as np

from estimator.analytic.memory import (
    memory_breakdown,
)
from estimator.analytic.parallel import (
    rank_device,
)
from estimator.analytic.params import count_params
from estimator.planner.memory import group_peaks
from estimator.planner.space import (
    Constraints,
    Group,
    Scored,
    _at,
    device_precisions,
    index_space,
    search_space,
)
from estimator.planner.timing import _exact_steps, group_seconds
from estimator.specs import (
    CalibrationProfile,
    Device,
    ModelSpec,
    ParamCounts,
    TrainSetup,
)


def memory_totals(model: ModelSpec, setup: TrainSetup, device: Device,
                  batches: np.ndarray, accums: np.ndarray) -> np.ndarray:
    """Peak bytes per device of one structure at each (b, a): score_groups on one group."""
    return score_groups(model, [Group.of(setup, batches, accums)], device, None)[0]


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
