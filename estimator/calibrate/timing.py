"""Timing harness: warm-up by time, repeats until a time budget, median and p20/p80.

Each sample times `inner` back-to-back calls and divides, so microsecond ops are not dominated
by the timer; accelerators are synchronised before the clock is read (torch.accelerator where
torch has it, else the backend's own synchronize).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from estimator.calibrate.contention import (  # noqa: F401  (re-exported)
    CpuSnapshot,
    cpu_snapshot,
    others_busy_fraction,
    wait_until_idle,
)


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of one benchmarked op."""

    median_seconds: float
    """Median over samples of the per-call time (seconds)."""
    p20_seconds: float
    """20th percentile (seconds)."""
    p80_seconds: float
    """80th percentile (seconds)."""
    num_samples: int
    """Samples taken (count)."""
    num_calls: int
    """Calls per sample (count)."""


def synchronize(device: str) -> None:
    """Wait for queued work on `device` ('cpu', 'cuda', 'mps', 'xpu'); a no-op on CPU."""
    if device == "cpu":
        return
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize()
        return
    getattr(torch, device).synchronize()


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def time_call(
    fn: Callable[[], object],
    *,
    device: str = "cpu",
    warmup_seconds: float = 0.02,
    min_run_seconds: float = 0.05,
    min_samples: int = 3,
    max_samples: int = 25,
    clock: Callable[[], float] = time.perf_counter,
    max_seconds: float = float("inf"),
) -> Timing:
    """Time `fn`: warm up for warmup_seconds (at least one call), pick calls per sample so a
    sample lasts ≥ ~1 ms, then take samples until min_run_seconds and min_samples are reached.

    `clock` reads the time of a sample: wall time by default; `time.process_time` measures a
    single-threaded CPU run without the time other processes took from it (shared machines).
    `max_seconds` caps the whole timing (warm-up included): once it is spent, sampling stops
    after the first sample, so a case far slower than projected (bf16 GEMMs emulated on an
    AVX2-only CPU: 4.5 s per 3-GFLOP call here) cannot stall the run."""
    start = time.perf_counter()
    num_warm = 0
    while num_warm == 0 or time.perf_counter() - start < warmup_seconds:
        fn()
        synchronize(device)
        num_warm += 1
    per_call = (time.perf_counter() - start) / num_warm
    inner = max(1, min(1000, int(1e-3 / max(per_call, 1e-9))))
    samples: list[float] = []
    run_start = time.perf_counter()
    while len(samples) < max_samples and (
        len(samples) < min_samples or time.perf_counter() - run_start < min_run_seconds
    ) and not (samples and time.perf_counter() - start > max_seconds):
        t0 = clock()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((clock() - t0) / inner)
    samples.sort()
    return Timing(
        median_seconds=statistics.median(samples),
        p20_seconds=_percentile(samples, 0.2),
        p80_seconds=_percentile(samples, 0.8),
        num_samples=len(samples),
        num_calls=inner,
    )
