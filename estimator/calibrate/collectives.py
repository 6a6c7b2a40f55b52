"""Collective microbenchmark: gloo all-reduce between 2 local processes, fitted into the
`collective.all_reduce` EfficiencyCurve (unit bytes: W = payload bytes per rank;
seconds = overhead + W / rate(W), fit.fit_curve as for the other classes).

What it measures: the wall time of one synchronous `dist.all_reduce` (sum, fp32) of W bytes per
rank, as DDP's gradient reduction on this machine's CPU would run it: the slowest rank's time
per call (max over ranks), median over samples of `reps` back-to-back calls each, after a
barrier. The overhead probe is a 4-byte all-reduce. Two plain subprocesses (not
multiprocessing.spawn, which would re-run `python -m estimator`'s __main__) join a gloo group
through a TCP store on 127.0.0.1.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

from estimator.calibrate.fit import fit_curve
from estimator.specs.calibration import EfficiencyCurve

OP_CLASS = "collective.all_reduce"
FULL_SIZES = [4096 * 4**i for i in range(9)]
"""Payload bytes per rank: 4 KiB, 16 KiB, … 256 MiB (factors of 4)."""
QUICK_SIZES = [4096 * 16**i for i in range(5)]
"""Quick run: 4 KiB, 64 KiB, 1 MiB, 16 MiB, 256 MiB."""
NUM_RANKS = 2
TARGET_SAMPLE_SECONDS = 0.05
"""Aim of one sample's duration; calls per sample come from the size (no timing-based counts:
both ranks must make the same calls)."""
ASSUMED_BYTES_PER_SECOND = 1e9
"""Used only to choose the calls per sample before anything is measured."""
PROBE_BYTES = 4


def calls_per_sample(num_bytes: int) -> int:
    """Back-to-back calls in one sample: ~TARGET_SAMPLE_SECONDS at ~1 GB/s, 1 … 200."""
    return max(1, min(200, round(TARGET_SAMPLE_SECONDS * ASSUMED_BYTES_PER_SECOND / num_bytes)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_all_reduce(num_bytes: int, num_samples: int) -> float:
    """Median per-call seconds of an fp32 all-reduce of num_bytes, max over ranks (worker)."""
    import torch
    import torch.distributed as dist

    buffer = torch.ones(max(1, num_bytes // 4), dtype=torch.float32)
    reps = calls_per_sample(num_bytes)
    dist.all_reduce(buffer)  # warm-up: connections, gloo buffers, first touch
    samples = []
    for _ in range(num_samples):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(buffer)
        seconds = torch.tensor([(time.perf_counter() - start) / reps], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        samples.append(float(seconds))
    return statistics.median(samples)


def _worker(sizes: list[int], num_samples: int) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): rank 0 prints
    {"probe": seconds, "points": [[bytes, seconds], …]} as JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        probe = _time_all_reduce(PROBE_BYTES, num_samples)
        points = [[size, _time_all_reduce(size, num_samples)] for size in sizes]
        if dist.get_rank() == 0:
            sys.stdout.write(json.dumps({"probe": probe, "points": points}) + "\n")
    finally:
        dist.destroy_process_group()


def measure_all_reduce(sizes: list[int], num_samples: int = 5,
                       timeout_seconds: float = 600) -> tuple[float, list[tuple[int, float]]]:
    """Run the benchmark over NUM_RANKS local processes: (probe seconds, [(bytes, seconds)])."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(NUM_RANKS), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "estimator.calibrate.collectives", json.dumps(sizes),
               str(num_samples)]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(NUM_RANKS)]
    outputs = [p.communicate(timeout=timeout_seconds) for p in ranks]
    for p, (_, err) in zip(ranks, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"all-reduce benchmark rank failed: {err.strip()[-500:]}")
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    return result["probe"], [(int(w), float(t)) for w, t in result["points"]]


def collective_curves(quick: bool, sizes: list[int] | None = None,
                      num_samples: int | None = None) -> dict[str, EfficiencyCurve]:
    """{'collective.all_reduce': curve} from a gloo all-reduce over 2 local processes.
    quick: 5 sizes and 3 samples each (~10 s on 2 cores); else 9 sizes, 5 samples."""
    chosen = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    probe, points = measure_all_reduce(chosen, num_samples or (3 if quick else 5))
    return {OP_CLASS: fit_curve(OP_CLASS, "bytes", points, overhead_seconds=probe)}


def collective_points(quick: bool) -> list[tuple[str, float, float, bool]]:
    """The benchmark as calibration points: (label, bytes, seconds, is the probe)."""
    probe, points = measure_all_reduce(QUICK_SIZES if quick else FULL_SIZES,
                                       3 if quick else 5)
    return [(f"all_reduce {PROBE_BYTES} B", float(PROBE_BYTES), probe, True)] + [
        (f"all_reduce {w} B", float(w), t, False) for w, t in points]


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]), int(sys.argv[2]))
