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
    for this framework on this device class (fractions of the estimate). A framework never
    measured on this device class (configs = 0) gets the widest band measured for any
    framework there (unmeasured_band), and says so."""
    table = read_toml("uncertainty.toml")
    entry = table[setup.framework][device_class(device)]
    if int(entry["configs"]) == 0:
        return unmeasured_band(table, device_class(device), setup.framework)
    return float(entry["over"]), float(entry["under"]), str(entry["source"])


def unmeasured_band(table: dict, cls: str, framework: str) -> tuple[float, float, str]:
    """The widest over and under fractions measured for any framework on device class `cls`:
    no measurement of `framework` there, so no narrower claim."""
    measured = {name: entry[cls] for name, entry in table.items()
                if int(entry[cls]["configs"]) > 0}
    over = max(float(e["over"]) for e in measured.values())
    under = max(float(e["under"]) for e in measured.values())
    return over, under, (f"{framework} unmeasured on a {cls}: the widest band measured there "
                         f"({', '.join(sorted(measured))})")


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
