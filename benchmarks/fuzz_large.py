"""The large fuzz budget of issue 21: every fuzz test of tests/property run with
NVFREE_FUZZ_EXAMPLES examples each (default 10,000; the checkpoint resumes, which train a tiny
model each, at a tenth), hypothesis's statistics kept, and one line per test: examples run,
outcomes (answered / refused per command), failures.

    PYTHONPATH=. .venv/bin/python benchmarks/fuzz_large.py                  # 10,000 each
    PYTHONPATH=. .venv/bin/python benchmarks/fuzz_large.py --examples 2000 --only library

Every example asserts what its test's docstring says (exit 0 or 2 with one line, no traceback,
bounded time, strict JSON, no negative or non-finite quantity, typed library errors); a passing
test therefore means 0 failures among the examples it ran. The CI budget is each test's
default (a few hundred in all).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = {
    "library": "tests/property/test_fuzz_library.py",
    "cli": "tests/property/test_fuzz_cli.py",
    "files": "tests/property/test_fuzz_files.py",
    "plans": "tests/property/test_fuzz_run.py",
    "checkpoints": "tests/property/test_fuzz_checkpoints.py",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--only", default=",".join(TESTS), help="comma-separated: " +
                        ", ".join(TESTS))
    args = parser.parse_args()
    for name in args.only.split(","):
        examples = args.examples // 10 if name == "checkpoints" else args.examples
        env = {**os.environ, "NVFREE_FUZZ_EXAMPLES": str(examples),
               "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--hypothesis-show-statistics", TESTS[name]],
                              cwd=REPO, env=env, capture_output=True, text=True)
        minutes = (time.monotonic() - started) / 60
        passing = [int(n) for n in re.findall(r"(\d+) passing", done.stdout)]
        failing = [int(n) for n in re.findall(r"(\d+) failing", done.stdout)]
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
        print(f"{name}: {sum(passing):,} examples passed, {sum(failing)} failing, "
              f"{minutes:.1f} min — {summary}")
        for event in re.findall(r"\* ([\d.]+%), (.+)", done.stdout):
            print(f"    {event[0]:>7}  {event[1]}")
        if done.returncode:
            print(done.stdout[-4000:])


if __name__ == "__main__":
    main()
