"""Whole-run step time: `nvfree train` (measured median step) against its own prediction.

Runs each config in a subprocess (`nvfree train ... --json`, then `nvfree estimate ... --json`
for the per-class breakdown of the prediction) and prints predicted / measured / error, the
load average before each run, and where the predicted time goes (hot GEMMs, cold GEMMs,
attention, memory-bound, dispatch). Uses the calibration profile of $NVFREE_CACHE_DIR (run
`nvfree calibrate` first; without one the prediction is uncalibrated).

    NVFREE_CACHE_DIR=/tmp/nvc python benchmarks/steptime_table.py [--reps 2] [--steps 12]
        [--only lora-bf16,moe-lora-bf16] [--cpu-clock] [--predict-only]

--cpu-clock: for a machine shared with other jobs. Each config runs in a subprocess with
OMP_NUM_THREADS=1 that builds the run with the executor (prepare_run) and times every step with
time.process_time (the CPU time the process itself got, immune to time-sharing); the
prediction is the one `nvfree train` makes (executor.measure.predict), so it needs a
one-thread profile: `OMP_NUM_THREADS=1` + `calibrate(..., cpu_clock=True)`.

--predict-only: print the (one-thread, with --cpu-clock) prediction and its breakdown without
training (seconds per config), e.g. to compare two versions of the model against step times
measured earlier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SMOL = ["--model", "smollm2-135m", "--seq-len", "256", "--batch-size", "2"]
TINY_MOE_CONFIG = {  # Mixtral-style, 8 experts top-2: ~60 M parameters
    "model_type": "mixtral", "hidden_size": 384, "intermediate_size": 768,
    "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
    "vocab_size": 8192, "num_local_experts": 8, "num_experts_per_tok": 2,
    "max_position_embeddings": 1024, "tie_word_embeddings": False,
}
CONFIGS: dict[str, list[str]] = {
    "full-fp32": [*SMOL, "--method", "full", "--dtype", "fp32"],
    "full-bf16": [*SMOL, "--method", "full", "--dtype", "bf16"],
    "lora-fp32": [*SMOL, "--method", "lora", "--dtype", "fp32"],
    "lora-bf16": [*SMOL, "--method", "lora", "--dtype", "bf16"],
    "qlora-bf16": [*SMOL, "--method", "qlora", "--bits", "4", "--dtype", "bf16"],
    "lora-bf16-ckpt": [*SMOL, "--method", "lora", "--dtype", "bf16", "--checkpointing"],
    "full-bf16-ckpt": [*SMOL, "--method", "full", "--dtype", "bf16", "--checkpointing"],
    "moe-lora-bf16": ["--model", "{moe}", "--seq-len", "256", "--batch-size", "2",
                      "--method", "lora", "--dtype", "bf16"],
    "moe-full-bf16": ["--model", "{moe}", "--seq-len", "256", "--batch-size", "2",
                      "--method", "full", "--dtype", "bf16"],
}
GROUPS = {"matmul": "hot GEMM", "matmul_cold": "cold GEMM", "lora": "LoRA GEMM",
          "attention": "attention", "dispatch.autograd": "dispatch"}


def _nvfree() -> list[str]:
    exe = Path(sys.executable).with_name("nvfree")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "estimator.cli.app"]


def _load() -> float:
    return os.getloadavg()[0]


def _train(args: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [*_nvfree(), "train", *args, "--max-steps", str(steps), "--output", out, "--json"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads((Path(out) / "run_report.json").read_text())


def _breakdown(args: list[str], one_thread: bool) -> dict[str, float]:
    cmd = [*_nvfree(), "estimate", *args, "--json"]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {})}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    est = json.loads(out)
    groups: dict[str, float] = {}
    for op in est["throughput"]["ops"]:
        klass = op["op_class"].rsplit(".", 1)[0] if op["op_class"].endswith(
            (".fp32", ".bf16", ".fp16")) else op["op_class"]
        key = GROUPS.get(klass, "memory-bound")
        groups[key] = groups.get(key, 0.0) + op["seconds"]
    return groups


def _child(args: list[str], steps: int) -> dict:
    """Time `steps` optimizer steps with process CPU time (after 2 warm-up steps) in this
    process, and predict the same config as `nvfree train` does."""
    import time

    import torch

    from estimator.catalog import load_model
    from estimator.executor.measure import predict
    from estimator.executor.train import TrainConfig, prepare_run, train_step
    from estimator.specs import TrainSetup

    opts = dict(zip(args[::2], args[1::2], strict=False))
    setup = TrainSetup(method=opts["--method"], compute_dtype=opts["--dtype"],
                       weight_bits=int(opts.get("--bits", 16)), seq_len=int(opts["--seq-len"]),
                       batch_size=int(opts["--batch-size"]),
                       checkpointing="--checkpointing" in args)
    spec = load_model(opts["--model"])
    if steps == 0:  # --predict-only
        estimate, _ = predict(spec, setup, torch.device("cpu"))
        return {"step_seconds": None, "predicted_step_seconds": estimate.throughput.step_seconds}
    with tempfile.TemporaryDirectory() as out:
        run, *_ = prepare_run(spec, setup, TrainConfig(max_steps=steps + 2, output_dir=Path(out),
                                                        predict=False))
        seconds = []
        for step in range(steps + 2):
            start = time.process_time()
            train_step(run, step, 1e-4)
            seconds.append(time.process_time() - start)
    estimate, _ = predict(spec, setup, torch.device("cpu"))
    return {"step_seconds": statistics.median(seconds[2:]),
            "predicted_step_seconds": estimate.throughput.step_seconds}


def _child_run(args: list[str], steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", json.dumps(args), "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="runs per config")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--only", default="", help="comma-separated config names")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="one thread, process CPU time (shared machines)")
    parser.add_argument("--predict-only", action="store_true",
                        help="print predictions and breakdowns, train nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(_child(json.loads(opts.child), opts.steps)))
        return
    names = [n for n in CONFIGS if not opts.only or n in opts.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        moe = Path(tmp) / "config.json"
        moe.write_text(json.dumps(TINY_MOE_CONFIG))
        header = (f"{'config':16s} {'load':>5s} {'predicted ms':>12s} {'measured ms (runs)':>26s}"
                  f" {'error':>7s} {'vs fastest':>10s}  predicted breakdown (ms)")
        print(header)
        errors = []
        for name in names:
            args = [a.replace("{moe}", str(moe)) for a in CONFIGS[name]]
            if opts.predict_only:
                predicted = _child_run(args, 0)["predicted_step_seconds"]
                parts = _breakdown(args, True)
                detail = " ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(parts.items()))
                print(f"{name:16s} {'':5s} {predicted * 1e3:12.0f}  {detail}", flush=True)
                continue
            loads, measured, predicted = [], [], None
            for _ in range(opts.reps):
                loads.append(_load())
                report = (_child_run if opts.cpu_clock else _train)(args, opts.steps)
                measured.append(report["step_seconds"])
                predicted = report["predicted_step_seconds"]
            median = statistics.median(measured)
            error = (predicted - median) / median
            errors.append(abs(error))
            parts = _breakdown(args, opts.cpu_clock)
            runs = "/".join(f"{m * 1e3:.0f}" for m in measured)
            detail = " ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(parts.items()))
            fastest = (predicted - min(measured)) / min(measured)  # load only ever slows a run
            print(f"{name:16s} {max(loads):5.2f} {predicted * 1e3:12.0f} "
                  f"{median * 1e3:9.0f} ({runs:>14s}) {error:+7.1%} {fastest:+10.1%}  {detail}",
                  flush=True)
        if errors:
            print(f"median |error| {statistics.median(errors):.1%}, max {max(errors):.1%} "
                  f"over {len(errors)} configs")


if __name__ == "__main__":
    main()
