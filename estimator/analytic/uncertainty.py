"""The measured spread of the memory estimate: the band every estimate carries.

An estimate is one number; the runs it is checked against (benchmarks/bench_hf_memory.py for
HF Transformers on a CPU, `nvfree validate` for the bundled trainer, published GPU tables in
benchmarks/published_peaks.py) put the measured peak within a band around it. The band is
data (data/uncertainty.toml, one entry per framework and device class, each naming its
measurements), not a correction: the estimate itself is not moved by it. The verdict uses its
upper end, so FITS means the largest under-prediction seen still fits.
"""

import math

from estimator.catalog import read_toml
from estimator.specs import Device, TrainSetup


def device_class(device: Device) -> str:
    """'cpu' for host memory (resident set size), 'accelerator' for device memory."""
    return "cpu" if device.backend == "cpu" else "accelerator"


def band_fractions(setup: TrainSetup, device: Device) -> tuple[float, float, str]:
    """(over, under, source): how far below and above the estimate measured peaks were seen
    for this framework on this device class (fractions of the estimate)."""
    entry = read_toml("uncertainty.toml")[setup.framework][device_class(device)]
    return float(entry["over"]), float(entry["under"]), str(entry["source"])


def upper_bytes(total_bytes, setup: TrainSetup, device: Device):
    """The band's upper end: total × (1 + under), rounded up (a scalar, or an array of totals:
    the planner's fast path)."""
    _, under, _ = band_fractions(setup, device)
    if getattr(total_bytes, "shape", ()):
        import numpy as np

        return np.ceil(total_bytes * (1 + under))
    return math.ceil(total_bytes * (1 + under))


def lower_bytes(total_bytes: int, setup: TrainSetup, device: Device) -> int:
    """The band's lower end: total × (1 − over), rounded down."""
    over, _, _ = band_fractions(setup, device)
    return math.floor(total_bytes * (1 - over))
