"""Where the trainer trims glibc's heap (malloc_trim) and what it costs, side by side in one
process: step time, minor page faults and VmHWM per mode, in blocks of 6 steps (the last 4
measured), two rounds.

Modes: 'loss-head' (the trainer: one trim before each micro-batch's loss head), 'and-step'
(also after every optimizer step, the trainer before 2026-11-28), 'none'.

    PYTHONPATH=. python benchmarks/bench_heap_trim.py [--method lora] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from estimator.catalog import load_model
from estimator.executor import measure
from estimator.executor import train as T
from estimator.specs import TrainSetup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--model", default="smollm2-135m")
    opts = p.parse_args()
    torch.set_num_threads(2)
    fp32 = opts.dtype == "fp32"
    setup = TrainSetup(method=opts.method, compute_dtype=opts.dtype, batch_size=2, seq_len=256,
                       weight_bits=32 if fp32 else (4 if opts.method == "qlora" else 16),
                       mixed_precision=not fp32)
    trim = measure.release_freed_memory
    state = {"head": True}
    measure.release_freed_memory = lambda: trim() if state["head"] else None
    run, *_ = T.prepare_run(load_model(opts.model), setup,
                            T.TrainConfig(max_steps=6, output_dir=Path("/tmp/bench_heap_trim")))
    modes = {"loss-head": (True, False), "and-step": (True, True), "none": (False, False)}
    rows: dict[str, list[tuple[float, int, int]]] = {m: [] for m in modes}
    step = 0
    for _ in range(2):
        for mode, (head, after_step) in modes.items():
            state["head"] = head
            for i in range(6):
                measure.reset_vmhwm()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                T.train_step(run, step, 1e-4)
                if after_step:
                    trim()
                seconds = time.perf_counter() - start
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                step += 1
                if i >= 2:
                    rows[mode].append((seconds, faults, measure.read_vmhwm_bytes() or 0))
    print(f"{opts.model} {opts.method} {opts.dtype} b2 s256")
    for mode, r in rows.items():
        print(f"  {mode:9s}: step {statistics.median(x[0] for x in r) * 1e3:5.0f} ms, "
              f"page faults {statistics.median(x[1] for x in r):7.0f}, "
              f"VmHWM {max(x[2] for x in r) / 2**20:5.0f} MiB")


if __name__ == "__main__":
    main()
