"""Cold wall time of `nvfree estimate --params 56e9 --bits 4` next to `python -c pass`.

Runs both alternately in fresh processes (same interpreter), prints medians, the difference
(what nvfree itself costs) and the ratio. Goal (issue 2): the estimate itself ≤ 0.3 s.
Usage: python benchmarks/bench_cold_start.py [repeats]
"""

import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "nvfree estimate --params 56e9 --bits 4": [sys.executable, "-m", "estimator", "estimate",
                                               "--params", "56e9", "--bits", "4"],
    "  … --json": [sys.executable, "-m", "estimator", "estimate", "--params", "56e9", "--bits",
                   "4", "--json"],
}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(repeats: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    base = statistics.median(times["python -c pass"])
    print(f"{'command':42} {'median s':>9} {'p90 s':>7} {'minus python':>13} {'ratio':>6}")
    for name, samples in times.items():
        med = statistics.median(samples)
        p90 = sorted(samples)[int(0.9 * (len(samples) - 1))]
        print(f"{name:42} {med:9.3f} {p90:7.3f} {med - base:13.3f} {med / base:6.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
