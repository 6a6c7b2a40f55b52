"""Predicted vs measured peak memory of whole training runs, term by term.

Every config runs `python -m estimator train … --json` in a fresh process (as `nvfree validate`
does); its RunReport carries the measurement (VmHWM of the training steps, storage of weights,
gradients and optimizer states, the process baseline) and the analytic prediction for the same
setup on this machine. Prints one row per term: predicted, measured, error. The source of the
numbers in docs/accuracy.md §2 and of the measured constants in estimator/analytic/memory.py.

Usage: python benchmarks/memory_table.py [quick|doc|all] [--steps N]
  quick: the three configs of `nvfree validate --suite quick` (small models, about a minute each
         on 2 busy cores); doc: smollm2-135m full / LoRA / QLoRA, bf16, b2 s256 (docs/accuracy.md);
  all: both, plus dense and MoE full fp32/bf16 and QLoRA.
Timings of other processes on the machine do not change the memory numbers; the runs are
sequential.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from estimator.specs import RunReport
from estimator.validation import model_argument

MIB = 2**20
CONFIGS = {
    "quick": [("small-vocab", "full", "fp32", ()), ("small-vocab", "lora", "bf16", ()),
              ("tiny-moe", "lora", "bf16", ())],
    "doc": [("smollm2-135m", "full", "bf16", ()), ("smollm2-135m", "lora", "bf16", ()),
            ("smollm2-135m", "qlora", "bf16", ())],
    "more": [("small-vocab", "full", "bf16", ()), ("tiny-moe", "full", "fp32", ()),
             ("tiny-moe", "qlora", "bf16", ()), ("small-vocab", "lora", "bf16",
                                                  ("--checkpointing",))],
}


def run_config(model: str, method: str, dtype: str, extra: tuple[str, ...], steps: int,
               workdir: Path) -> RunReport | str:
    """Train one config in a fresh process; its RunReport or the error line."""
    name = "-".join([Path(model).stem, method, dtype, *(e.strip("-") for e in extra)])
    cmd = [sys.executable, "-m", "estimator", "train", "--model", model_argument(model, workdir),
           "--method", method, "--dtype", dtype, "-b", "2", "-s", "256", *extra,
           "--max-steps", str(steps), "--output", str(workdir / "runs" / name), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit code {done.returncode}"
    return RunReport.model_validate_json(done.stdout)


def fmt(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:8.1f}"


def print_report(label: str, report: RunReport) -> float | None:
    """Rows of one run; returns the total's relative error."""
    print(f"\n{label}  ({report.num_steps} steps, {report.memory_method}, "
          f"{report.step_seconds or 0:.2f} s/step)")
    print(f"  {'term':28s} {'predicted':>9s} {'measured':>9s}  error (MiB)")
    total_error = None
    for term in report.memory_terms:
        err = "—" if term.relative_error is None else f"{term.relative_error:+6.1%}"
        print(f"  {term.name:28s} {fmt(term.predicted_bytes)} {fmt(term.measured_bytes)}  {err}")
        if term.name == "total_peak":
            total_error = term.relative_error
    return total_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="quick", choices=["quick", "doc", "all"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    groups = ["quick", "doc", "more"] if args.which == "all" else [args.which]
    errors: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="nvfree-memtable-") as tmp:
        for group in groups:
            for model, method, dtype, extra in CONFIGS[group]:
                label = " ".join([model, method, dtype, *extra])
                outcome = run_config(model, method, dtype, extra, args.steps, Path(tmp))
                if isinstance(outcome, str):
                    print(f"\n{label}: failed: {outcome}")
                    continue
                error = print_report(label, outcome)
                if error is not None:
                    errors.append((label, error))
    if errors:
        abs_errors = [abs(e) for _, e in errors]
        print(f"\ntotal peak |error| over {len(errors)} runs: median "
              f"{statistics.median(abs_errors):.1%}, max {max(abs_errors):.1%}")
        for label, e in errors:
            print(f"  {e:+6.1%}  {label}")


if __name__ == "__main__":
    main()
