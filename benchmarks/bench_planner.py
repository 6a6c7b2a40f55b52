"""Planner search speed: candidate configurations scored per second, for a few plans.

Every candidate is scored with the same analytic model as `nvfree estimate` (tests/unit/
test_planner.py checks equality); the micro-batch axis is vectorised with numpy, the structural
choices (method × precision × optimizer × checkpointing × ZeRO stage) are evaluated one by one.

    python benchmarks/bench_planner.py [--repeat 3]
"""

import argparse
import time

from estimator.catalog import load_device, load_model
from estimator.planner import Constraints, search
from estimator.specs import TrainSetup

CASES = [
    ("smollm2-135m on xeon-platinum-8480plus, global batch 8",
     "smollm2-135m", "xeon-platinum-8480plus", TrainSetup(seq_len=256, num_tokens=65536),
     Constraints(global_batch=8)),
    ("smollm2-135m on xeon-platinum-8480plus, global batch 256",
     "smollm2-135m", "xeon-platinum-8480plus", TrainSetup(seq_len=256, num_tokens=10**7),
     Constraints(global_batch=256)),
    ("llama-3.1-8b on 8 × mi300x, ZeRO 0–3, global batch 64",
     "llama-3.1-8b", "mi300x", TrainSetup(seq_len=2048, num_tokens=10**8, num_devices=8),
     Constraints(global_batch=64, zero_stages=(0, 1, 2, 3))),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for label, model_name, device_name, base, c in CASES:
        model, device = load_model(model_name), load_device(device_name)
        search(model, base, device, None, c)  # warm caches and imports
        best = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = search(model, base, device, None, c)
            best = min(best, time.perf_counter() - started)
        print(f"{label}: {result.num_candidates} candidates in {best * 1e3:.0f} ms = "
              f"{result.num_candidates / best:,.0f} candidates/s")


if __name__ == "__main__":
    main()
