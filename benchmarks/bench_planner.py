"""Planner search speed: candidate configurations scored per second, end to end.

Every candidate is scored with the same analytic model as `nvfree estimate` (tests/unit/
test_planner.py checks equality): per structural choice (method × precision × optimizer ×
checkpointing) the op lists are built three times and timed in arrays for every device count,
ZeRO stage and micro-batch; memory and collectives are evaluated per sweep (one structure and
ZeRO stage over an array of device counts). `search` is timed whole, with the exact re-score
of the best `top` (estimate()'s memory and step time); `score` (the space without ranking and
re-score) beside it shows the fixed cost. Best of --repeat runs; the load average is printed
because the timings are only comparable on a quiet machine.

    python benchmarks/bench_planner.py [--repeat 3] [--case 3]
"""

import argparse
import os
import time
from functools import partial

from estimator.catalog import load_device, load_model
from estimator.planner import Constraints, devices_up_to, score, search
from estimator.specs import TrainSetup

ZERO = (0, 1, 2, 3)
CASES = [
    ("smollm2-135m on xeon-platinum-8480plus, global batch 8 (the `nvfree plan` default)",
     "smollm2-135m", "xeon-platinum-8480plus", TrainSetup(seq_len=256, num_tokens=65536),
     Constraints(global_batch=8)),
    ("smollm2-135m on xeon-platinum-8480plus, global batch 256",
     "smollm2-135m", "xeon-platinum-8480plus", TrainSetup(seq_len=256, num_tokens=10**7),
     Constraints(global_batch=256)),
    ("llama-3.1-8b on 8 × mi300x, ZeRO 0–3, global batch 64",
     "llama-3.1-8b", "mi300x", TrainSetup(seq_len=2048, num_tokens=10**8, num_devices=8),
     Constraints(global_batch=64, zero_stages=ZERO)),
    ("llama-3.1-8b on 1–64 mi300x (8 per node), ZeRO 0–3, global batch 512",
     "llama-3.1-8b", "mi300x",
     TrainSetup(seq_len=2048, num_tokens=10**9, num_devices=64, num_nodes=8),
     Constraints(global_batch=512, zero_stages=ZERO, device_counts=devices_up_to(64))),
    ("qwen3-30b-a3b on 8–64 h100-sxm (8 per node, expert parallel 8), ZeRO 0–3, global batch 512",
     "qwen3-30b-a3b", "h100-sxm",
     TrainSetup(seq_len=2048, num_tokens=10**9, num_devices=64, num_nodes=8, expert_parallel=8),
     Constraints(global_batch=512, zero_stages=ZERO, device_counts=devices_up_to(64))),
]


def best_of(repeat: int, fn) -> tuple[float, object]:
    """(fastest wall time in seconds, last result) of `repeat` calls."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", type=int, action="append",
                        help="index into CASES (repeatable); default all")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for index in args.case or range(len(CASES)):
        label, model_name, device_name, base, c = CASES[index]
        model, device = load_model(model_name), load_device(device_name)
        search(model, base, device, None, c)  # warm caches and imports
        seconds, result = best_of(args.repeat, partial(search, model, base, device, None, c))
        scoring, _ = best_of(args.repeat, partial(score, model, base, device, None, c))
        n = result.num_candidates
        print(f"{label}:\n  search {n:,} candidates in {seconds * 1e3:.0f} ms = "
              f"{n / seconds:,.0f} candidates/s; score alone {scoring * 1e3:.0f} ms = "
              f"{n / scoring:,.0f}/s (ranking + exact re-score of the best {c.top}: "
              f"{(seconds - scoring) * 1e3:.0f} ms)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
