"""Detected names matched to catalogue devices; a Device for a detected accelerator."""

from __future__ import annotations

import re

from estimator import catalog
from estimator.specs.device import Device
from estimator.specs.machine import AcceleratorInfo

# ----------------------------------------------------------------------------- catalogue match

_VENDOR_WORDS = {"nvidia", "amd", "intel", "apple", "geforce", "radeon", "instinct", "tesla",
                 "r", "tm", "processor", "cpu", "gpu", "graphics", "data", "center", "core"}


def _tokens(text: str) -> set[str]:
    """Lower-case alphanumeric tokens minus vendor words ('NVIDIA H100 80GB' → {h100, 80gb})."""
    return set(re.findall(r"[a-z0-9+]+", text.lower())) - _VENDOR_WORDS


def _catalogue_devices() -> list[Device]:
    """All catalogue devices."""
    return catalog.list_devices()


def match_catalogue(name: str, kind: str) -> Device | None:
    """The catalogue device whose model token (first token of its key, e.g. 'h100' of 'h100-sxm',
    '8480+' of 'xeon-8480+') appears in `name`, preferring the most shared tokens. None if none."""
    have = _tokens(name)
    best, best_score = None, 0
    for device in _catalogue_devices():
        if (device.kind == "cpu") != (kind == "cpu"):
            continue
        key_tokens = [t for t in re.split(r"[-_ ]", device.name.lower()) if t]
        model_tokens = [t for t in key_tokens if any(c.isdigit() for c in t)]
        if not model_tokens or not all(t in have for t in model_tokens):
            continue
        score = len(have & (_tokens(device.display_name) | set(key_tokens)))
        if score > best_score:
            best, best_score = device, score
    return best


def _catalogue_cpu(brand: str) -> Device | None:
    return match_catalogue(brand, "cpu")


def accelerator_device(acc: AcceleratorInfo) -> Device:
    """A Device for a detected accelerator: the catalogue entry matched by name with the memory
    torch reports, else a device built from what torch says (peaks unknown)."""
    match = match_catalogue(acc.name, "gpu")
    if match is not None:
        update: dict[str, object] = {"name": "local", "display_name": acc.name}
        if acc.memory_bytes:
            update["memory_bytes"] = acc.memory_bytes
        note = f"matched catalogue '{match.name}'" + (f"; {match.notes}" if match.notes else "")
        update["notes"] = note
        return match.model_copy(update=update)
    bandwidth = acc.memory_bandwidth_bytes_per_second
    return Device(
        name="local",
        display_name=acc.name,
        vendor=acc.name.split()[0] if acc.name else "unknown",
        kind="gpu",
        backend=acc.backend,
        memory_bytes=acc.memory_bytes or 1,
        memory_bandwidth_bytes_per_second=bandwidth or 100e9,
        peak_flops_per_second={},
        unified_memory=acc.backend == "mps",
        sources=("detected via torch",),
        notes=(
            "not in the catalogue: peak FLOP/s unknown"
            + ("" if bandwidth else ", bandwidth unknown (100 GB/s placeholder)")
            + "; run `nvfree calibrate --device "
            + ("cuda" if acc.backend == "rocm" else acc.backend)
            + "`"
        ),
    )
