"""Detect the local machine and turn it into a Device.

`detect()` reads /proc/cpuinfo and psutil (py-cpuinfo only where /proc/cpuinfo is missing) and never
imports torch; `detect(probe_torch=True)` also imports torch, lazily, to list CUDA / ROCm / MPS /
XPU devices. `local_device()` builds the Device the estimate uses for this machine: the CPU with
its peak from the documented formula (reference/hardware.md §1c), or the first accelerator, matched
to the catalogue by name where possible.
"""

from estimator.hardware.cpu import (
    cpu_clock_hz,
    cpu_device,
    cpu_peak_flops_per_second,
    fp32_flops_per_cycle_per_core,
)
from estimator.hardware.detect import detect, fingerprint, training_threads
from estimator.hardware.match import accelerator_device, match_catalogue
from estimator.hardware.resolve import local_device, resolve_device

__all__ = ["accelerator_device", "cpu_clock_hz", "cpu_device", "cpu_peak_flops_per_second",
           "detect", "fingerprint", "fp32_flops_per_cycle_per_core", "local_device",
           "match_catalogue", "resolve_device", "training_threads"]
