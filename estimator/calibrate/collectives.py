"""Collective microbenchmarks: gloo all-reduce, all-gather and reduce-scatter between 2 local
processes, each fitted into its own EfficiencyCurve (`collective.all_reduce`,
`collective.all_gather`, `collective.reduce_scatter`; unit bytes: W = bytes of the whole,
unsharded buffer per rank — what DDP reduces, what FSDP2 gathers a block into or
reduce-scatters a block's gradients from; seconds = overhead + W / rate(W), fit.fit_curve as
for the other classes).

What it measures: the wall time of one synchronous call (fp32; sum for the reductions) as DDP
and FSDP2 on this machine's CPU would run it: `dist.all_reduce` of W bytes,
`dist.all_gather_into_tensor` of W / 2 bytes into W, `dist.reduce_scatter_tensor` of W into
W / 2; the slowest rank's time per call (max over ranks), median over samples of `reps`
back-to-back calls each, after a barrier. The overhead probe is the same call on 4 bytes per
rank. Measured separately because gloo's are not the ring's halves of an all-reduce: here
(2-core AMD EPYC, torch 2.13) a reduce-scatter took 1.5–1.9× the all-reduce of the same
buffer and an all-gather 0.65× at 1–16 MiB but 1.6× at 64 MiB. Two plain subprocesses (not
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

KINDS = ("all_reduce", "all_gather", "reduce_scatter")
FULL_SIZES = [4096 * 4**i for i in range(9)]
"""Payload bytes per rank: 4 KiB, 16 KiB, … 256 MiB (factors of 4)."""
QUICK_SIZES = [4096 * 16**i for i in range(5)]
"""Quick run: 4 KiB, 64 KiB, 1 MiB, 16 MiB, 256 MiB."""
LARGEST_BLOCK_BYTES = 64 * 2**20
"""All-gathers and reduce-scatters stop at 64 MiB (FSDP2 moves one block at a time; larger
blocks read the last rate: 0.46 vs 0.53 GB/s at 64 vs 256 MiB all-gather here), which saves
~8 s of a full calibration; the all-reduce (DDP: the whole gradient) goes to 256 MiB."""
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


def sizes_for(kind: str, quick: bool) -> list[int]:
    """The payloads a kind is measured at (bytes of the whole buffer)."""
    sizes = QUICK_SIZES if quick else FULL_SIZES
    return sizes if kind == "all_reduce" else [s for s in sizes if s <= LARGEST_BLOCK_BYTES]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective(kind: str, num_bytes: int):
    """A call of `kind` on a W-byte whole buffer (fp32; rank shards of W / world size)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    whole = torch.ones(max(world, num_bytes // 4), dtype=torch.float32)
    shard = torch.ones(whole.numel() // world, dtype=torch.float32)
    whole = whole[:shard.numel() * world]
    if kind == "all_reduce":
        return lambda: dist.all_reduce(whole)
    if kind == "all_gather":
        return lambda: dist.all_gather_into_tensor(whole, shard)
    return lambda: dist.reduce_scatter_tensor(shard, whole)


def _time_collective(kind: str, num_bytes: int, num_samples: int) -> float:
    """Median per-call seconds of `kind` on a num_bytes buffer, max over ranks (worker)."""
    import torch
    import torch.distributed as dist

    call = _collective(kind, num_bytes)
    reps = calls_per_sample(num_bytes)
    call()  # warm-up: connections, gloo buffers, first touch
    samples = []
    for _ in range(num_samples):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        seconds = torch.tensor([(time.perf_counter() - start) / reps], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        samples.append(float(seconds))
    return statistics.median(samples)


def _worker(kind: str, sizes: list[int], num_samples: int) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): rank 0 prints
    {"probe": seconds, "points": [[bytes, seconds], …]} as JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        probe = _time_collective(kind, PROBE_BYTES * NUM_RANKS, num_samples)
        points = [[size, _time_collective(kind, size, num_samples)] for size in sizes]
        if dist.get_rank() == 0:
            sys.stdout.write(json.dumps({"probe": probe, "points": points}) + "\n")
    finally:
        dist.destroy_process_group()


def measure_collective(kind: str, sizes: list[int], num_samples: int = 5,
                       timeout_seconds: float = 600) -> tuple[float, list[tuple[int, float]]]:
    """Run the `kind` benchmark over NUM_RANKS local processes: (probe seconds,
    [(bytes, seconds)])."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(NUM_RANKS), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "estimator.calibrate.collectives", kind,
               json.dumps(sizes), str(num_samples)]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(NUM_RANKS)]
    outputs = [p.communicate(timeout=timeout_seconds) for p in ranks]
    for p, (_, err) in zip(ranks, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{kind} benchmark rank failed: {err.strip()[-500:]}")
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    return result["probe"], [(int(w), float(t)) for w, t in result["points"]]


def collective_curves(quick: bool, sizes: list[int] | None = None,
                      num_samples: int | None = None) -> dict[str, EfficiencyCurve]:
    """{'collective.<kind>': curve} for every kind of KINDS, from gloo over 2 local
    processes. quick: up to 5 sizes and 3 samples each; else up to 9 sizes, 5 samples
    (sizes_for)."""
    curves = {}
    for kind in KINDS:
        probe, points = measure_collective(kind, sizes or sizes_for(kind, quick),
                                           num_samples or (3 if quick else 5))
        curves[f"collective.{kind}"] = fit_curve(f"collective.{kind}", "bytes", points,
                                                 overhead_seconds=probe)
    return curves


def collective_points(kind: str, quick: bool) -> list[tuple[str, float, float, bool]]:
    """One kind's benchmark as calibration points: (label, bytes, seconds, is the probe)."""
    probe, points = measure_collective(kind, sizes_for(kind, quick), 3 if quick else 5)
    return [(f"{kind} {PROBE_BYTES * NUM_RANKS} B", float(PROBE_BYTES * NUM_RANKS), probe,
             True)] + [(f"{kind} {w} B", float(w), t, False) for w, t in points]


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
