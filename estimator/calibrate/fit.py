"""Fit an EfficiencyCurve per op class from measured (work, seconds) pairs. Pure Python.

Model (Calculon-style, anchors.md Part 2 §1.3): seconds(W) = t0 + W / rate(log10 W), rate
monotone non-decreasing in W, piecewise linear in log10 W between knots, constant outside them.

Fit:
1. t0 (overhead_seconds) = the time of the class's tiny overhead probe (an op of ~no work),
   capped at half the fastest measured op so every knot keeps a positive, finite rate.
2. Each measurement gives an achieved rate r_i = W_i / (t_i − t0). Measurements with the same
   work are pooled (ΣW / Σ(t − t0)).
3. Compute-bound classes (FLOPs): isotonic regression (pool-adjacent-violators) of r over
   log10 W; a pooled block gets the rate ΣW / Σ(t − t0) of its members — i.e. the block's total
   time is reproduced, and large ops (which dominate a training step) weigh most. Knots stay at
   every measured work, so where the measured rates are already monotone the curve passes
   through every measured point. Memory-bound classes (`monotone=False`) keep every pooled
   rate as measured: their rate rises while the per-call overhead amortises and falls again
   once the operands leave the caches (measured on this 2-core Xeon: fp32 add 46 GB/s on 1 MiB
   operands, ~8 GB/s on 100 MiB), so forcing it monotone pools everything into the DRAM rate
   and makes cache-resident training ops 3–5× too slow.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from estimator.specs.calibration import EfficiencyCurve

OVERHEAD_CAP_FRACTION = 0.5
"""t0 may be at most this fraction of the fastest measured op of the class."""


def _pool_equal_work(points: Sequence[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(log10 W, ΣW, Σt) per distinct work value, sorted by work."""
    groups: dict[float, list[float]] = {}  # rounded log10 W → [exact log10 W, ΣW, Σt]
    for work, seconds in points:
        x = math.log10(work)
        acc = groups.setdefault(round(x, 9), [x, 0.0, 0.0])
        acc[1] += work
        acc[2] += seconds
    return [(x, w, t) for _, (x, w, t) in sorted(groups.items())]


def isotonic_rates(works: Sequence[float], times: Sequence[float]) -> list[float]:
    """Pool-adjacent-violators on rates works[i]/times[i] (sorted by work): returns one rate per
    point, non-decreasing, each pooled block at ΣW/Σt of its members."""
    blocks: list[list[float]] = []  # [ΣW, Σt, count]
    for w, t in zip(works, times, strict=True):
        blocks.append([w, t, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            w2, t2, n2 = blocks.pop()
            blocks[-1][0] += w2
            blocks[-1][1] += t2
            blocks[-1][2] += n2
    rates: list[float] = []
    for w, t, n in blocks:
        rates += [w / t] * int(n)
    return rates


def fit_curve(
    op_class: str,
    unit: str,
    points: Sequence[tuple[float, float]],
    overhead_seconds: float = 0.0,
    *,
    monotone: bool = True,
) -> EfficiencyCurve:
    """EfficiencyCurve from (work, seconds) measurements and the class's overhead probe time;
    rates isotonic in work when `monotone`, else as measured (pooled at equal work)."""
    if not points:
        raise ValueError(f"no measurements for {op_class}")
    fastest = min(t for _, t in points)
    t0 = max(0.0, min(overhead_seconds, OVERHEAD_CAP_FRACTION * fastest))
    pooled = _pool_equal_work([(w, t - t0) for w, t in points])
    works, times = [w for _, w, _ in pooled], [t for _, _, t in pooled]
    rates = (isotonic_rates(works, times) if monotone
             else [w / t for w, t in zip(works, times, strict=True)])
    return EfficiencyCurve(
        op_class=op_class,
        unit=unit,  # type: ignore[arg-type]
        log10_work=tuple(x for x, _, _ in pooled),
        rates=tuple(rates),
        overhead_seconds=t0,
        num_samples=len(points),
    )


def overhead_curve(op_class: str, seconds: float) -> EfficiencyCurve:
    """A curve that only carries a per-op overhead (the `dispatch` class): one knot, rate 1."""
    return EfficiencyCurve(op_class=op_class, unit="flops", log10_work=(0.0,), rates=(1.0,),
                           overhead_seconds=max(0.0, seconds), num_samples=1)


def curve_rate(curve: EfficiencyCurve, work: float) -> float:
    """rate(log10 W): linear between knots in log10 W, clamped to the end knots outside."""
    x, xs, rs = math.log10(max(work, 1e-300)), curve.log10_work, curve.rates
    if x <= xs[0]:
        return rs[0]
    if x >= xs[-1]:
        return rs[-1]
    i = bisect_right(xs, x) - 1
    frac = (x - xs[i]) / (xs[i + 1] - xs[i])
    return rs[i] + frac * (rs[i + 1] - rs[i])


def curve_seconds(curve: EfficiencyCurve, work: float) -> float:
    """Predicted seconds of one op of `work` units: overhead + W / rate(W)."""
    if work <= 0:
        return curve.overhead_seconds
    return curve.overhead_seconds + work / curve_rate(curve, work)
