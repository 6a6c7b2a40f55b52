"""Resident memory of the training process before any model tensor exists.

This is the CPU `runtime_overhead` term (estimator/analytic/memory.py): Python + torch + the
executor's imports + torch's CPU allocator warm-up (one small matmul and one autograd pass), read
from /proc/self/status (VmRSS) in a fresh process, median of several runs.
Usage: python benchmarks/bench_runtime_rss.py [repeats]
"""

import statistics
import subprocess
import sys

PROBE = """
import torch, estimator.executor.train, estimator.executor.model
a = torch.randn(64, 64, requires_grad=True)
(a @ a).sum().backward()
with torch.autocast("cpu", dtype=torch.bfloat16):
    (a @ a).float().sum().backward()
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) * 1024)
"""


def main(repeats: int) -> None:
    samples = [int(subprocess.run([sys.executable, "-c", PROBE], check=True, text=True,
                                  capture_output=True).stdout) for _ in range(repeats)]
    med = statistics.median(samples)
    print(f"runtime RSS over {repeats} fresh processes: median {med / 2**20:.0f} MiB "
          f"(min {min(samples) / 2**20:.0f}, max {max(samples) / 2**20:.0f}); "
          f"torch {__import__('torch').__version__}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
