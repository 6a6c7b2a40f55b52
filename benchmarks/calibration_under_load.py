"""Issue 19's calibration goals on this machine: how many points a quiet calibration counts
as disturbed, how long it takes, and what a calibration does while a second process keeps
every core busy — refused with a reason, or stored with predictions within 10 % of the quiet
profile's.

For each mode (quick, full): a quiet run stored in a fresh cache directory, then a run under
load (one CPU-burning process per CPU, started before and stopped after it) into another
fresh directory (no previous profile to fall back on). Predictions compared: step time of
`estimate` for a few setups on each stored profile (analytic.step.step_throughput).

    PYTHONPATH=. .venv/bin/python benchmarks/calibration_under_load.py [--modes quick,full]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

BURN = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"
SETUPS = [("smollm2-135m", {"method": "lora", "compute_dtype": "fp32", "weight_bits": 32}),
          ("smollm2-135m", {"method": "full", "compute_dtype": "fp32", "weight_bits": 32}),
          ("qwen2.5-0.5b", {"method": "qlora", "weight_bits": 4, "compute_dtype": "fp32"}),
          ("smollm2-135m", {"method": "lora", "compute_dtype": "bf16"})]


def run(mode: str, loaded: bool) -> dict:
    """One calibration into a fresh cache directory; what it did."""
    os.environ["NVFREE_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"nvc-{mode}-")
    from estimator.calibrate.run import calibrate

    burners = [subprocess.Popen([sys.executable, "-c", BURN])
               for _ in range(os.cpu_count() or 1)] if loaded else []
    try:
        time.sleep(0.5 if loaded else 0.0)
        result = calibrate("cpu", mode)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    return {"mode": mode, "loaded": loaded, "seconds": result.wall_seconds,
            "points": len(result.measurements), "disturbed": result.num_disturbed,
            "stored": result.path is not None, "refusal": result.refusal,
            "profile": result.profile if result.path is not None else None}


def step_seconds(profile) -> list[float]:
    from estimator.analytic.step import step_throughput
    from estimator.catalog import load_model
    from estimator.hardware import local_device
    from estimator.specs import TrainSetup

    device = local_device()
    return [step_throughput(load_model(m), TrainSetup(framework="nvfree", batch_size=2,
                                                      seq_len=512, **kw), device,
                            profile).step_seconds for m, kw in SETUPS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="quick,full")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        quiet, busy = run(mode, False), run(mode, True)
        for r in (quiet, busy):
            what = "stored" if r["stored"] else f"not stored: {r['refusal']}"
            print(f"{mode:5} {'under load' if r['loaded'] else 'quiet':10} {r['seconds']:6.1f} s "
                  f"{r['disturbed']:3d} of {r['points']:3d} points disturbed; {what}",
                  flush=True)
        if quiet["stored"] and busy["stored"]:
            a, b = step_seconds(quiet["profile"]), step_seconds(busy["profile"])
            moves = [y / x - 1 for x, y in zip(a, b, strict=True)]
            print(f"{mode:5} predictions under load vs quiet: "
                  + ", ".join(f"{m:+.1%}" for m in moves), flush=True)


if __name__ == "__main__":
    main()
