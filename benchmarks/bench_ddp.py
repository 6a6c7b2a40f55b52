"""Data parallel on this CPU: 1 process × accumulation 2 vs 2 processes (DDP, gloo) ×
accumulation 1 — the same global batch — measured side by side, with the analytic prediction.
A third run, 1 process × accumulation 2 on ONE thread, separates the cost of the collective from
the thread scaling of one process.

    PYTHONPATH=. python benchmarks/bench_ddp.py [--steps 8] [--method full] [--no-curve]

Both runs go through `nvfree train` (the 2-process one with --nproc 2, i.e. torchrun) on the same
~32M-parameter Llama (8 layers, hidden 512, vocab 8192; byte-level data from the embedded
corpus), seq 256, batch 1, fp32. The single process uses all cores; each of the 2 ranks gets
cores // 2 threads. Printed per run: median step time, tokens/s, largest per-rank peak, the
measured gradient all-reduce per step (DDP comm hook: bucket launch → completion, union over
buckets) and the predicted step and all-reduce time from the run report (estimator.api.estimate
with num_devices=2, this machine's calibration profile if one is stored). Unless --no-curve, a
gloo all-reduce curve is measured (estimator.calibrate.collectives, quick) and the all-reduce of
the run's gradient bytes is also predicted from it.

Timings on a shared machine are noisy: compare the rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "num_hidden_layers": 8, "hidden_size": 512,
          "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4,
          "vocab_size": 8192, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def run_train(config: Path, out: Path, *, nproc: int, grad_accum: int, steps: int,
              method: str, threads: int | None = None) -> dict:
    """One `nvfree train --json` run; returns its RunReport as a dict."""
    command = [sys.executable, "-m", "estimator", "train", "--model", str(config),
               "--method", method, "--dtype", "fp32", "--seq-len", "256", "--batch-size", "1",
               "--grad-accum", str(grad_accum), "--max-steps", str(steps), "-o", str(out),
               "--nproc", str(nproc), "--json"]
    if method == "lora":
        command += ["--bits", "16"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"nvfree train failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def grad_allreduce_bytes(report: dict) -> int | None:
    """Payload of the predicted gradient all-reduce (bytes), from a 2-device estimate."""
    from estimator.api import estimate
    from estimator.hardware import cpu_device, detect
    from estimator.specs import ModelSpec, TrainSetup

    result = estimate(ModelSpec.model_validate(report["model"]),
                      TrainSetup.model_validate(report["setup"]), cpu_device(detect()), None)
    ops = [op for op in result.throughput.ops if op.name == "comm.grad.all_reduce"]
    return ops[0].bytes_moved if ops else None


def fmt(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:9.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--no-curve", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(CONFIG))
        single = run_train(config, Path(tmp) / "one", nproc=1, grad_accum=2, steps=args.steps,
                           method=args.method)
        ddp = run_train(config, Path(tmp) / "two", nproc=2, grad_accum=1, steps=args.steps,
                        method=args.method)
        one_thread = run_train(config, Path(tmp) / "one1", nproc=1, grad_accum=2,
                               steps=args.steps, method=args.method, threads=1)
    curve_seconds = None
    payload = grad_allreduce_bytes(ddp)
    if not args.no_curve and payload:
        from estimator.analytic.comms import measured_seconds
        from estimator.calibrate.collectives import collective_curves

        curve = collective_curves(quick=True)["collective.all_reduce"]
        curve_seconds = measured_seconds(curve, payload, 1.0)

    print(f"model: {single['model']['name']} ({args.method}), seq 256, global batch 2 "
          f"sequences/step, {args.steps} steps; {os.cpu_count()} cores; "
          f"prediction: {ddp.get('prediction_note') or 'calibrated'}")
    print(f"{'run':<28}{'step':>12}{'pred step':>12}{'tok/s':>9}{'peak/rank':>11}"
          f"{'all-reduce':>12}{'pred a-r':>12}")
    rows = (("1 proc × accum 2", single), ("1 proc × accum 2, 1 thread", one_thread),
            ("2 procs × accum 1 (DDP)", ddp))
    for name, r in rows:
        peak = max(r["peak_bytes_per_rank"] or [r["peak_bytes"]]) / 2**20
        print(f"{name:<28}{fmt(r['step_seconds']):>12}{fmt(r['predicted_step_seconds']):>12}"
              f"{r['tokens_per_second']:9.0f}{peak:9.0f} MiB{fmt(r['communication_seconds']):>12}"
              f"{fmt(r['predicted_communication_seconds']):>12}")
    print(f"threads: {single['num_threads']} (1 proc) vs {ddp['num_threads']} per rank; "
          f"step-time ratio 1 proc / 2 procs: {single['step_seconds'] / ddp['step_seconds']:.2f}× "
          f"({one_thread['step_seconds'] / ddp['step_seconds']:.2f}× against 1 thread)")
    if payload:
        print(f"gradient all-reduce payload {payload / 2**20:.1f} MiB per rank per step; "
              f"predicted from a measured gloo curve: {fmt(curve_seconds).strip()}")
    print(f"final losses: {single['losses'][-1]:.4f} (1 proc) vs {ddp['losses'][-1]:.4f} (DDP)")


if __name__ == "__main__":
    main()
