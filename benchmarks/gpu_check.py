"""Calibrate every accelerator backend torch sees (CUDA, ROCm, XPU, MPS) and print the profile
next to the catalogue peak: how much of its datasheet a device really reaches here.

    PYTHONPATH=. python benchmarks/gpu_check.py [--quick] [--no-save]

Prints, per op class, the largest measured rate and its share of the catalogue peak (FLOP/s for
matmul/attention by dtype, memory bandwidth for memory-bound classes), the per-op overhead, and
the preferred dtype. Exits 0 with a message when no accelerator is present.
"""

from __future__ import annotations

import argparse
import sys

from estimator.calibrate.run import calibrate
from estimator.hardware import accelerator_device, detect
from estimator.specs import Device

COMPUTE = ("matmul", "lora", "attention")


def summary_rows(profile, device: Device) -> list[tuple[str, str, str, str]]:
    """(op class, overhead µs, best rate, share of the catalogue peak) per curve."""
    rows = []
    for name, curve in sorted(profile.curves.items()):
        family, _, dtype = name.partition(".")
        best = curve.rates[-1]
        if family in COMPUTE:
            peak = device.peak_for(dtype)
            rate = f"{best / 1e12:8.2f} TFLOP/s"
        elif name == "dispatch":
            peak, rate = None, "–"
        else:
            peak = device.memory_bandwidth_bytes_per_second
            rate = f"{best / 1e9:8.1f} GB/s"
        share = f"{best / peak:6.1%}" if peak else "–"
        rows.append((name, f"{curve.overhead_seconds * 1e6:8.1f}", rate, share))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    machine = detect(probe_torch=True)
    if not machine.accelerators:
        print("no CUDA/ROCm/XPU/MPS device visible to torch: nothing to check")
        return 0
    seen = set()
    for acc in machine.accelerators:
        if acc.backend in seen:
            continue  # device 0 of each backend
        seen.add(acc.backend)
        device = accelerator_device(acc)
        cli_device = "cuda" if acc.backend == "rocm" else acc.backend
        print(f"== {acc.backend}:{acc.index} {acc.name} "
              f"({(acc.memory_bytes or 0) / 2**30:.1f} GiB; catalogue: {device.notes or '–'})")
        result = calibrate(cli_device, "quick" if args.quick else "full", save=not args.no_save,
                           machine=machine)
        profile = result.profile
        print(f"profile {profile.profile_id}, torch {profile.torch_version}, "
              f"{len(result.measurements)} measurements in {result.wall_seconds:.1f} s, "
              f"preferred dtype {profile.preferred_dtype}")
        print(f"{'op class':18s} {'overhead µs':>11s} {'best rate':>16s} {'of peak':>8s}")
        for row in summary_rows(profile, device):
            print(f"{row[0]:18s} {row[1]:>11s} {row[2]:>16s} {row[3]:>8s}")
        for label, reason in result.skipped:
            print(f"  skipped {label}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
