"""Detect this machine: CPU identity, ISA flags, cores, clocks, RAM and (with probe_torch) the
accelerators torch can drive; its fingerprint. Never imports torch unless asked."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform

import psutil

from estimator.specs.machine import AcceleratorInfo, MachineInfo
from estimator.units import GIB

# Flags we report, as /proc/cpuinfo spells them (x86 'flags', aarch64 'Features').
X86_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)
ARM_FLAGS = ("asimd", "asimdhp", "sve", "sve2", "sme", "sme2", "bf16", "i8mm")


# Memory bandwidth without a catalogue match: nobody can read DIMM channels × speed from inside
# a VM or without root (dmidecode). We assume what one core can pull from DRAM on a current
# server or desktop (≈10 GB/s per core, STREAM triad; e.g. SPR/Zen 4 single-core STREAM is
# 10–20 GB/s), capped at a dual-channel DDR4-3200 desktop (2 × 25.6 GB/s = 51.2 GB/s).
# Deliberately conservative; `nvfree calibrate` replaces it with the measured triad bandwidth.
DEFAULT_BANDWIDTH_PER_CORE_BYTES_PER_SECOND = 10e9
DEFAULT_BANDWIDTH_CAP_BYTES_PER_SECOND = 51.2e9
# Clock when the OS reports none (some VMs, Apple silicon under psutil): a conservative 2.0 GHz,
# the all-core AVX-512 clock class of current Xeons (hardware.md 1b: 8480+ base 2.0 GHz).
DEFAULT_CLOCK_HZ = 2.0e9


# ----------------------------------------------------------------------------- CPU detection


def _read_proc_cpuinfo() -> dict[str, str] | None:
    """First processor block of /proc/cpuinfo as key → value, or None off Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields or None


@functools.lru_cache(maxsize=1)
def _py_cpuinfo() -> dict:
    """py-cpuinfo's answer (slow: ~1 s, may spawn a subprocess); cached, fallback only."""
    import cpuinfo

    return cpuinfo.get_cpu_info()


def _cpu_identity() -> tuple[str, str, int | None, int | None, set[str]]:
    """(brand, vendor, family, model, raw flag set) from /proc/cpuinfo, else py-cpuinfo."""
    proc = _read_proc_cpuinfo()
    if proc is not None and ("flags" in proc or "Features" in proc):
        brand = proc.get("model name") or proc.get("Hardware") or proc.get("CPU part", "")
        vendor = proc.get("vendor_id") or ("ARM" if "Features" in proc else "")
        flags = set((proc.get("flags") or proc.get("Features") or "").split())
        return brand, vendor, _int_or_none(proc.get("cpu family")), _int_or_none(
            proc.get("model")
        ), flags
    info = _py_cpuinfo()
    return (
        info.get("brand_raw", "") or platform.processor(),
        info.get("vendor_id_raw", ""),
        info.get("family"),
        info.get("model"),
        {f.lower() for f in info.get("flags", [])},
    )


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _isa(raw_flags: set[str], arch: str) -> tuple[str, ...]:
    """Normalised ISA features that matter: x86 names as Linux spells them; on Arm 'neon' for
    Advanced SIMD (always present on aarch64) plus sve/sme/bf16/i8mm."""
    found = [f for f in X86_FLAGS if f in raw_flags]
    if arch.lower() in ("aarch64", "arm64"):
        found.append("neon")
        found += [f for f in ARM_FLAGS if f in raw_flags and f != "asimd"]
    return tuple(found)


def _frequencies() -> tuple[float | None, float | None]:
    """(max Hz, current Hz) from psutil, else the 'cpu MHz' of /proc/cpuinfo as current."""
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError):
        freq = None
    max_hz = freq.max * 1e6 if freq and freq.max > 0 else None
    cur_hz = freq.current * 1e6 if freq and freq.current > 0 else None
    if cur_hz is None:
        proc = _read_proc_cpuinfo() or {}
        mhz = proc.get("cpu MHz")
        cur_hz = float(mhz) * 1e6 if mhz else None
    return max_hz, cur_hz


def _usable_cores(num_logical: int) -> int:
    """Logical CPUs this process may use: sched affinity, further limited by a cgroup v2 quota."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = num_logical
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            usable = min(usable, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, usable)


def _torch_version() -> str | None:
    """Installed torch version from package metadata, without importing torch."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def detect(probe_torch: bool = False) -> MachineInfo:
    """Detect CPU, RAM and (with probe_torch=True) the accelerators torch can drive.

    Without probe_torch this never imports torch and takes a few milliseconds on Linux.
    """
    arch = platform.machine()
    brand, vendor, family, model, raw_flags = _cpu_identity()
    num_logical = psutil.cpu_count(logical=True) or 1
    num_physical = psutil.cpu_count(logical=False) or num_logical
    max_hz, cur_hz = _frequencies()
    memory = psutil.virtual_memory()
    torch_version = _torch_version()
    accelerators: tuple[AcceleratorInfo, ...] = ()
    cpu_capability = None
    probed = False
    if probe_torch and torch_version is not None:
        try:
            accelerators, cpu_capability = _probe_torch()
            probed = True
        except (ImportError, OSError):  # a broken torch install: report the CPU only
            pass
    return MachineInfo(
        os=platform.system(),
        arch=arch,
        cpu_brand=brand or "unknown CPU",
        cpu_vendor=vendor,
        cpu_family=family,
        cpu_model=model,
        num_physical_cores=num_physical,
        num_logical_cores=num_logical,
        num_usable_cores=_usable_cores(num_logical),
        max_frequency_hz=max_hz,
        current_frequency_hz=cur_hz,
        isa=_isa(raw_flags, arch),
        virtualized="hypervisor" in raw_flags,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        torch_version=torch_version,
        torch_probed=probed,
        torch_cpu_capability=cpu_capability,
        accelerators=accelerators,
    )


def training_threads(machine: MachineInfo) -> int:
    """Intra-op threads a torch training run will use: $OMP_NUM_THREADS if set, else torch's
    default of one thread per physical core, limited to the CPUs this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(machine.num_physical_cores, machine.num_usable_cores))


# ----------------------------------------------------------------------------- torch probing


def _probe_torch() -> tuple[tuple[AcceleratorInfo, ...], str | None]:
    """Accelerators visible to torch and torch's CPU capability. Imports torch (lazily)."""
    import torch

    found: list[AcceleratorInfo] = []
    if torch.cuda.is_available():
        backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        runtime = torch.version.hip if backend == "rocm" else torch.version.cuda
        for i in range(torch.cuda.device_count()):
            found.append(_gpu_info(backend, i, torch.cuda.get_device_properties(i), runtime))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        for i in range(xpu.device_count()):
            found.append(_gpu_info("xpu", i, xpu.get_device_properties(i), None))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(_mps_info(torch))
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return tuple(found), capability


def _gpu_info(backend: str, index: int, props: object, runtime: str | None) -> AcceleratorInfo:
    """AcceleratorInfo from torch device properties (CUDA, ROCm and XPU share the shape)."""
    total = getattr(props, "total_memory", 0) or None
    units = getattr(props, "multi_processor_count", 0) or getattr(props, "gpu_eu_count", 0)
    return AcceleratorInfo(
        backend=backend,  # type: ignore[arg-type]
        index=index,
        name=str(getattr(props, "name", f"{backend}:{index}")),
        memory_bytes=total,
        memory_bandwidth_bytes_per_second=_bandwidth_from_props(props),
        num_compute_units=units or None,
        runtime_version=runtime,
    )


def _bandwidth_from_props(props: object) -> float | None:
    """Peak DRAM bandwidth = 2 (DDR) × memory clock × bus width / 8 (bytes/s), when torch exposes
    memory_clock_rate (kHz) and memory_bus_width (bits) (CUDA device properties, torch ≥ 2.5).
    The DDR factor 2 matches cudaDeviceProp's documented peak-bandwidth example (CUDA
    'bandwidthTest'/'deviceQuery'); HBM and GDDR6X clocks are reported so that it holds."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def _mps_info(torch: object) -> AcceleratorInfo:
    """The Apple GPU: name from the CPU brand (the SoC), memory = recommended max working set."""
    mps = torch.mps  # type: ignore[attr-defined]
    try:
        memory = int(mps.recommended_max_memory())
    except (AttributeError, RuntimeError):
        memory = None
    brand, *_ = _cpu_identity()
    return AcceleratorInfo(backend="mps", index=0, name=f"{brand} GPU".strip(), memory_bytes=memory)


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(machine: MachineInfo, backend: str = "cpu") -> str:
    """Stable hash of what makes calibration numbers transferable: CPU brand, family/model, ISA,
    core counts, RAM total rounded to whole GiB and, for an accelerator backend, the names and
    memory of that backend's devices.

    A CPU profile deliberately ignores accelerators, so it matches whether or not torch was
    probed (`detect()` vs `detect(probe_torch=True)`). Clocks and free memory are left out: they
    change from run to run. Returns 24 hex characters of SHA-256.
    """
    key: dict[str, object] = {
        "cpu": machine.cpu_brand,
        "family": machine.cpu_family,
        "model": machine.cpu_model,
        "isa": sorted(machine.isa),
        "physical": machine.num_physical_cores,
        "logical": machine.num_logical_cores,
        "ram_gib": round(machine.memory_total_bytes / GIB),
        "backend": backend,
    }
    if backend != "cpu":
        key["accelerators"] = sorted(
            (a.name, round((a.memory_bytes or 0) / GIB))
            for a in machine.accelerators
            if a.backend == backend
        )
    blob = json.dumps(key, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# ----------------------------------------------------------------------------- CPU peak
