"""Is the planner's choice the measured-fastest of its top candidates?

For a few plans on this machine, run each of the top-K candidates for a few steps (each in a
fresh `nvfree run` process, one after another) and report the measured step times, whether the
chosen candidate was the fastest, and how far the prediction was off.

    python benchmarks/planner_choice.py [--top 3] [--steps 6]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from estimator.specs import RunReport
from estimator.specs.plan import Plan
from estimator.validation import model_argument

CLOSE = 0.05
"""A chosen candidate within this fraction of the measured fastest counts as 'close': top
candidates often differ by less than run-to-run noise."""

PLANS = [
    ("smollm2-135m", ["--seq-len", "256", "--global-batch", "8"]),
    ("smollm2-135m", ["--seq-len", "256", "--global-batch", "8", "--method", "full"]),
    ("small-vocab", ["--seq-len", "256", "--global-batch", "8"]),
    ("tiny-moe", ["--seq-len", "256", "--global-batch", "8"]),
]


def nvfree(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "estimator", *args], capture_output=True,
                          text=True, check=False)


def measure(plan: Plan, index: int, steps: int, workdir: Path) -> RunReport | None:
    """Run candidate `index` of the plan as its own plan for `steps` steps in a fresh
    directory under `workdir`."""
    cand = plan.candidates[index]
    one = plan.model_copy(update={"setup": cand.setup, "max_steps": steps,
                                  "predicted_peak_bytes": cand.peak_bytes,
                                  "predicted_step_seconds": cand.step_seconds})
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"cand{index}.json"
    path.write_text(one.model_dump_json())
    done = nvfree("run", str(path), "-o", str(workdir / f"run{index}"), "--json", "--force")
    if done.returncode != 0:
        print(f"    candidate {index} failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return RunReport.model_validate_json(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    wins = close = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for number, (model, flags) in enumerate(PLANS):
            plan_path = root / f"plan{number}.json"
            done = nvfree("plan", "--model", model_argument(model, root), *flags, "--top",
                          str(args.top), "-o", str(plan_path), "--json")
            if done.returncode != 0:
                print(f"{model}: plan failed: {done.stderr.strip()}")
                continue
            plan = Plan.model_validate(json.loads(done.stdout))
            print(f"{model} {' '.join(flags)}")
            measured = []
            for i, cand in enumerate(plan.candidates[: args.top]):
                report = measure(plan, i, args.steps, root / f"plan{number}")
                step = report.step_seconds if report else None
                measured.append(step)
                s = cand.setup
                label = (f"{s.method} {s.compute_dtype}{'' if s.mixed_precision else ' pure'} "
                         f"{s.optimizer} b{s.batch_size}x{s.grad_accum}"
                         f"{' ckpt' if s.checkpointing else ''}")
                err = f"{(cand.step_seconds - step) / step:+.0%}" if step else "–"
                print(f"  {'*' if i == 0 else ' '} {label:42s} predicted {cand.step_seconds:7.3f}"
                      f" s  measured {step if step else float('nan'):7.3f} s  ({err})")
            if all(m is not None for m in measured):
                total += 1
                won = measured[0] == min(measured)
                wins += won
                ratio = measured[0] / min(measured)
                close += ratio <= 1 + CLOSE
                print(f"  chosen fastest: {'yes' if won else f'no ({ratio:.2f}× the fastest)'}")
    print(f"chosen was the measured-fastest in {wins} of {total} plans, within "
          f"{CLOSE:.0%} of it in {close}")


if __name__ == "__main__":
    main()
