"""Memory-bound rates measured on the executor's own training step (full CPU calibration).

The analytic model charges a block's memory-bound work as recorded bytes per token
(`flops.MEMORY_BOUND_BYTES`, every non-GEMM, non-attention aten call of the executor) at the
`elementwise.<dtype>` rate. A synthetic kernel (SiLU·mul + add) measures one kind of kernel; a
step's mix is wider: dtype casts (`copy_`), the fp32 RMSNorm composition, RoPE, SiLU and their
gradients, the loss. So the full calibration times those calls themselves: a TorchDispatchMode
around one executor training step records, for every call no GEMM or attention curve times, its
aten bytes (`benches.aten_call_bytes`, the unit of the recorded table) and its wall time
(perf_counter around the kernel only: the Python/autograd cost per call is the
`dispatch.autograd` class). Calls are pooled in bins of a quarter decade of bytes (ΣW / Σt per
bin, so each bin's total time is reproduced) and fitted with the measured rates kept
(fit.fit_curve monotone=False). The times exclude the per-call Python/autograd cost, so the
analytic model charges these calls' dispatch to `dispatch.autograd` (throughput.timed_ops).

Regimes: fp32 = a full fp32 fine-tune, bf16 = a LoRA step under bf16 autocast (the planner's
usual choice), of a 2-block Llama at 256, 1024 and 4096 tokens per micro-batch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from estimator.calibrate.aten_ops import aten_call_bytes, memory_bound_call, record_train_steps
from estimator.calibrate.fit import fit_curve
from estimator.specs import EfficiencyCurve, ModelSpec, TrainSetup

PROBE_MODEL = ModelSpec(name="elementwise-probe", num_layers=2, hidden_size=576,
                        intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                        vocab_size=1024, max_seq_len=4096)
"""smollm2-135m's block shapes, 2 blocks, a vocabulary small enough that every buffer of
its loss head stays under glibc's 32 MiB mmap ceiling (4096 × 1024 fp32 logits = 16 MiB):
the curve is the rate on reused memory, and the first touch of larger buffers is its own
term (flops.loss_head_fresh_ops). With 4096 words the 64 MiB fp32 logits were mapped afresh
each step and the curve's 10^8-byte bin fell to 7.9 GB/s, against 19–26 GB/s below it."""
REGIMES: dict[str, dict[str, object]] = {
    "fp32": {"method": "full", "compute_dtype": "fp32", "weight_bits": 32,
             "mixed_precision": False},
    "bf16": {"method": "lora", "compute_dtype": "bf16", "weight_bits": 16,
             "mixed_precision": True},
}
TOKENS = (256, 1024, 4096)
"""Tokens per micro-batch (batch 1): activation tensors from 0.3 to 36 MiB."""
QUICK_TOKENS = (1024,)
"""The quick run's one recording (2 timed steps): the plan's micro-batches are 256–2048
tokens, and the curve is constant beyond its end bins."""
QUICK_PROBE_MODEL = PROBE_MODEL.model_copy(update={"name": "elementwise-probe-1",
                                                   "num_layers": 1})
"""One block (the quick run): the same calls per block at half the GEMM time."""
BINS_PER_DECADE = 4


def time_calls(fn: Callable[[], object]) -> list[tuple[float, float]]:
    """(bytes, seconds) of every aten call of the forward and backward passes `fn` makes that
    no GEMM or attention curve times (views excluded; after backward, clipping and the
    optimizer step have their own terms), phases as in benches.record_op_bytes."""
    from estimator.calibrate.aten_ops import dispatch_mode

    points: list[tuple[float, float]] = []
    state = {"backward_seen": False}

    class _Timed(dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            in_backward = torch._C._current_autograd_node() is not None
            state["backward_seen"] |= in_backward
            after = state["backward_seen"] and not in_backward
            if after or not memory_bound_call(func):
                return func(*args, **kwargs)
            start = time.perf_counter()
            out = func(*args, **kwargs)
            seconds = time.perf_counter() - start
            points.append((float(aten_call_bytes(func, args, kwargs, out)), seconds))
            return out

    with _Timed():
        fn()
    return points


def step_points(dtype: str, tokens: int, steps: int = 3,
                model: ModelSpec = PROBE_MODEL) -> list[tuple[float, float]]:
    """time_calls over `steps` executor training steps of PROBE_MODEL in the dtype's regime,
    after one untimed step that builds the optimizer states and kernel caches. The steps make
    the same calls in the same order, so each call keeps its median time over the steps (the
    statistic a run's step time is): one call that another process or a late OpenMP thread
    delayed does not set the rate."""
    setup = TrainSetup(framework="nvfree", batch_size=1, seq_len=tokens, **REGIMES[dtype])  # type: ignore[arg-type]
    runs = record_train_steps(model, setup, time_calls, steps=steps, lr=1e-4,
                              synthetic_data=True)
    if any(len(r) != len(runs[0]) for r in runs):
        return [p for r in runs for p in r]
    return [(calls[0][0], statistics.median(t for _, t in calls))
            for calls in zip(*runs, strict=True)]


def binned_counts(points: list[tuple[float, float, int]]) -> list[tuple[int, float, float, int]]:
    """(bin, mean bytes, mean seconds, calls) per quarter decade of bytes from (bytes, seconds,
    calls) means (zero-byte calls dropped): bins of several recordings pool by their calls."""
    bins: dict[int, list[float]] = {}
    for work, seconds, calls in points:
        if work > 0 and seconds > 0:
            acc = bins.setdefault(math.floor(math.log10(work) * BINS_PER_DECADE), [0.0, 0.0, 0])
            acc[0] += work * calls
            acc[1] += seconds * calls
            acc[2] += calls
    return [(k, w / n, t / n, int(n)) for k, (w, t, n) in sorted(bins.items())]


def binned(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Mean (bytes, seconds) per quarter decade of bytes (zero-byte calls dropped)."""
    return [(w, t) for _, w, t, _ in binned_counts([(w, t, 1) for w, t in points])]


def recorded_points(dtype: str, tokens: int, steps: int = 3, model: ModelSpec = PROBE_MODEL,
                    ) -> list[tuple[str, float, float, int]]:
    """One recording as calibration points: (label, mean bytes, mean seconds, calls) per bin
    of step_points(dtype, tokens, steps); the label names the recording and the bin, so a
    later calibration's recording of the same bin replaces it point by point."""
    bins = binned_counts([(w, t, 1) for w, t in step_points(dtype, tokens, steps, model)])
    return [(f"elementwise.{dtype} executor t={tokens} bin {k}", w, t, n)
            for k, w, t, n in bins]


def elementwise_curves() -> dict[str, EfficiencyCurve]:
    """'elementwise.fp32' and 'elementwise.bf16' from the executor's own memory-bound calls
    (no disturbance checks: `calibrate.run` records through `recorded_points`)."""
    curves = {}
    for dtype in REGIMES:
        points = [p for tokens in TOKENS for p in step_points(dtype, tokens)]
        curves[f"elementwise.{dtype}"] = fit_curve(f"elementwise.{dtype}", "bytes",
                                                   binned(points), monotone=False)
    return curves
