"""Calibrated prediction vs measurement: forward + backward of ONE real decoder layer.

For each layer size and dtype this builds the executor's Llama block (estimator.executor.model),
times forward + backward on random activations (fp32, or bf16 under torch.autocast with fp32
weights — the executor's mixed-precision recipe), and prints next to it the time the lead's
analytic model predicts for the same ops (estimator.analytic.throughput.step_ops/ops_seconds on
a 1-layer ModelSpec, keeping only the block's ops: linears, attention core, elementwise — not
embedding, lm_head, loss or optimizer) with this machine's calibration profile, and without it.

    PYTHONPATH=. python benchmarks/bench_layer_step.py [--calibrate quick|full] [--reps 5]

Uses the stored profile of this machine (nvfree calibrate) unless --calibrate is given or none
exists (then it runs a full calibration first and stores it). Timings are medians of --reps
steps after one warm-up step; the error is (predicted − measured) / measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from estimator.analytic.params import count_params
from estimator.analytic.throughput import ops_seconds, step_ops
from estimator.calibrate.run import calibrate
from estimator.calibrate.timing import cpu_snapshot, others_busy_fraction, wait_until_idle
from estimator.errors import ProfileError
from estimator.executor.model import build_model
from estimator.hardware import detect, local_device, training_threads
from estimator.hardware.profiles import find_profile
from estimator.specs import CalibrationProfile, ModelSpec, TrainSetup

# name: (hidden, intermediate, heads, kv_heads, head_dim, batch, seq)
LAYERS = {
    "smollm2-135m b4 s512": (576, 1536, 9, 3, 64, 4, 512),
    "h1024 s512": (1024, 2816, 16, 4, 64, 1, 512),
    "tinyllama b1 s512": (2048, 5632, 32, 4, 64, 1, 512),
    "tinyllama b1 s1024": (2048, 5632, 32, 4, 64, 1, 1024),
    "llama2-7b b1 s256": (4096, 11008, 32, 32, 128, 1, 256),
}
BLOCK_OP_PREFIXES = ("linear.", "attention.", "elementwise", "autocast.", "gradients.")


def layer_spec(name: str, dims: tuple[int, ...]) -> tuple[ModelSpec, int, int]:
    hidden, inter, heads, kv, head_dim, batch, seq = dims
    spec = ModelSpec(name=name, num_layers=1, hidden_size=hidden, intermediate_size=inter,
                     num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=256,
                     max_seq_len=max(seq, 256))
    return spec, batch, seq


def measure_layer_undisturbed(spec: ModelSpec, batch: int, seq: int, dtype: str, reps: int,
                              wait_seconds: float) -> tuple[list[float], float]:
    """measure_layer, repeated (up to 3 tries, waiting for idle CPUs first) until other
    processes used ≤ 20 % of the CPUs meanwhile; returns the times and that share."""
    best: tuple[list[float], float] | None = None
    for _ in range(3):
        if wait_seconds:
            wait_until_idle(wait_seconds)
        before = cpu_snapshot()
        times = measure_layer(spec, batch, seq, dtype, reps)
        disturbed = others_busy_fraction(before, cpu_snapshot())
        if best is None or disturbed < best[1]:
            best = (times, disturbed)
        if disturbed <= 0.2 or not wait_seconds:
            break
    assert best is not None
    return best


CLOCK = time.perf_counter
"""Clock of the layer timings; --cpu-clock switches to time.process_time (1 thread only)."""


def measure_layer(spec: ModelSpec, batch: int, seq: int, dtype: str, reps: int) -> list[float]:
    """Seconds of forward + backward of the block, one value per timed rep."""
    model = build_model(spec)
    block = model.layers[0]
    rope = model.rope(seq, torch.device("cpu"))
    x = torch.randn(batch, seq, spec.hidden_size, requires_grad=True)
    grad = torch.randn(batch, seq, spec.hidden_size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    times = []
    for i in range(reps + 1):
        block.zero_grad(set_to_none=True)
        x.grad = None
        start = CLOCK()
        with autocast:
            y = block(x, rope)
        y.float().backward(grad)
        if i > 0:  # the first step is the warm-up
            times.append(CLOCK() - start)
    return times


def _op_family(name: str) -> str:
    """Op class the analytic model would charge an aten op to."""
    if "scaled_dot_product" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return "matmul"
    return "elementwise+other"


def profile_layer(spec: ModelSpec, batch: int, seq: int, dtype: str) -> dict[str, float]:
    """Self CPU seconds per op family of one fwd+bwd step (torch.profiler, after a warm-up);
    shows which term of the prediction is off."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(spec)
    block, rope = model.layers[0], model.rope(seq, torch.device("cpu"))
    x = torch.randn(batch, seq, spec.hidden_size, requires_grad=True)
    grad = torch.randn(batch, seq, spec.hidden_size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        block.zero_grad(set_to_none=True)
        with autocast:
            y = block(x, rope)
        y.float().backward(grad)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            family = _op_family(event.key)
            totals[family] = totals.get(family, 0.0) + event.self_cpu_time_total / 1e6
    return totals


def predict_layer(spec: ModelSpec, batch: int, seq: int, dtype: str,
                  profile: CalibrationProfile | None) -> tuple[float, list]:
    """Predicted seconds of the block's ops (and the per-op breakdown)."""
    setup = TrainSetup(method="full", compute_dtype=dtype, mixed_precision=True,
                       weight_bits=32 if dtype == "fp32" else 16, batch_size=batch, seq_len=seq)
    ops = [op for op in step_ops(spec, setup, count_params(spec, setup))
           if op.name.startswith(BLOCK_OP_PREFIXES)]
    device = local_device(detect(), profile)
    times, _ = ops_seconds(ops, device, profile, dtype)
    return sum(t.seconds for t in times), times


def load_or_calibrate(mode: str | None, patience: float | None,
                      cpu_clock: bool = False) -> CalibrationProfile:
    if mode is None:
        try:
            profile = find_profile(detect())
        except ProfileError as exc:
            print(f"stored profile unusable ({exc}); calibrating (full)", file=sys.stderr)
            profile = None
        if profile is not None:
            return profile
        mode = "full"
    print(f"calibrating ({mode}) …", file=sys.stderr)
    result = calibrate("cpu", mode, patience_seconds=None if cpu_clock else patience,  # type: ignore[arg-type]
                       cpu_clock=cpu_clock)
    print(f"calibrated in {result.wall_seconds:.0f} s; {result.num_disturbed} of "
          f"{len(result.measurements)} measurements disturbed by other processes",
          file=sys.stderr)
    return result.profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", choices=["quick", "full"], default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--only", default=None, help="comma-separated layer names")
    parser.add_argument("--breakdown", action="store_true", help="profile and compare op families")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="wait up to this many seconds for idle CPUs before each timing")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="one thread, timed in process CPU time (calibration too): immune to "
                             "other processes sharing the cores")
    args = parser.parse_args()
    if args.cpu_clock:
        global CLOCK
        if os.environ.get("OMP_NUM_THREADS") != "1":
            sys.exit("--cpu-clock needs OMP_NUM_THREADS=1")
        CLOCK = time.process_time
    torch.manual_seed(0)
    torch.set_num_threads(training_threads(detect()))
    if args.wait_quiet:
        wait_until_idle(args.wait_quiet)
    profile = load_or_calibrate(args.calibrate, args.wait_quiet * 10 or None, args.cpu_clock)
    print(f"profile {profile.profile_id} ({'quick' if profile.quick else 'full'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    header = (f"{'layer':22s} {'dtype':5s} {'tokens':>6s} {'measured ms':>12s} {'p20–p80':>15s} "
              f"{'calibrated ms':>13s} {'error':>7s} {'uncalibr. ms':>12s} {'error':>7s} "
              f"{'disturbed':>9s}")
    print(header)
    print("-" * len(header))
    errors, raw_errors = [], []
    names = args.only.split(",") if args.only else list(LAYERS)
    for name in names:
        spec, batch, seq = layer_spec(name, LAYERS[name])
        for dtype in args.dtypes.split(","):
            times, disturbed = measure_layer_undisturbed(
                spec, batch, seq, dtype, args.reps, 0.0 if args.cpu_clock else args.wait_quiet)
            times = sorted(times)
            measured = statistics.median(times)
            lo, hi = times[round(0.2 * (len(times) - 1))], times[round(0.8 * (len(times) - 1))]
            predicted, breakdown = predict_layer(spec, batch, seq, dtype, profile)
            uncalibrated, _ = predict_layer(spec, batch, seq, dtype, None)
            err = (predicted - measured) / measured
            raw = (uncalibrated - measured) / measured
            errors.append(abs(err))
            raw_errors.append(abs(raw))
            print(f"{name:22s} {dtype:5s} {batch * seq:6d} {measured * 1e3:12.1f} "
                  f"{lo * 1e3:7.1f}–{hi * 1e3:<7.1f} {predicted * 1e3:13.1f} {err:+7.1%} "
                  f"{uncalibrated * 1e3:12.1f} {raw:+7.1%} "
                  + ("        –" if args.cpu_clock else f"{disturbed:9.0%}"))
            if args.breakdown:
                predicted_family: dict[str, float] = {}
                for t in breakdown:
                    family = t.op_class.split(".")[0]
                    family = family if family in ("matmul", "attention") else "elementwise+other"
                    predicted_family[family] = predicted_family.get(family, 0.0) + t.seconds
                if args.wait_quiet:
                    wait_until_idle(args.wait_quiet)
                measured_family = profile_layer(spec, batch, seq, dtype)
                for family in ("matmul", "attention", "elementwise+other"):
                    got = measured_family.get(family, 0.0) * 1e3
                    want = predicted_family.get(family, 0.0) * 1e3
                    print(f"    {family:18s} profiled {got:9.1f} ms   predicted {want:9.1f} ms")
    print(f"median |error| calibrated {statistics.median(errors):.1%} "
          f"(max {max(errors):.1%}); uncalibrated {statistics.median(raw_errors):.1%} "
          f"over {len(errors)} layer steps")


if __name__ == "__main__":
    main()
