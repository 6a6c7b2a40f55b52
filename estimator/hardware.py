"""Detect the local machine and turn it into a Device.

`detect()` reads /proc/cpuinfo and psutil (py-cpuinfo only where /proc/cpuinfo is missing) and never
imports torch; `detect(probe_torch=True)` also imports torch, lazily, to list CUDA / ROCm / MPS /
XPU devices. `local_device()` builds the Device the estimate uses for this machine: the CPU with
its peak from the documented formula (reference/hardware.md §1c), or the first accelerator, matched
to the catalogue by name where possible.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re

import psutil

from estimator.specs.calibration import CalibrationProfile
from estimator.specs.device import Device
from estimator.specs.machine import AcceleratorInfo, MachineInfo

# Flags we report, as /proc/cpuinfo spells them (x86 'flags', aarch64 'Features').
X86_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)
ARM_FLAGS = ("asimd", "asimdhp", "sve", "sve2", "sme", "sme2", "bf16", "i8mm")

GIB = 1024**3

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


def fp32_flops_per_cycle_per_core(machine: MachineInfo) -> tuple[int, str]:
    """FP32 FLOPs per cycle per core from the widest FMA ISA, with the assumption made.

    FLOPs/cycle/core = FMA pipes × (vector bits / 32) × 2 (reference/hardware.md §1c).
    - Intel AVX-512: 2 FMA units assumed (Xeon Gold/Platinum, SPR/EMR/GNR) → 64; parts with
      one unit (client Ice/Tiger Lake, some Silver/Bronze) reach 32 — we cannot tell from CPUID.
    - AMD AVX-512 on Zen 4 (family 25) is double-pumped over 2×256-bit pipes → 32; Zen 5
      (family 26) has full 512-bit pipes → 64.
    - AVX2 + FMA (2×256-bit FMA) → 32; AVX without FMA → 16 (separate mul/add, 256-bit).
    - Arm: 4×128-bit NEON pipes assumed (Neoverse V2, Apple P-core) → 32; SVE 2×256 (V1) is also 32.
    - Anything else: 8 (SSE, 128-bit mul + add).
    """
    isa = set(machine.isa)
    if "avx512f" in isa:
        if machine.cpu_vendor == "AuthenticAMD" and (machine.cpu_family or 0) < 26:
            return 32, "AVX-512 double-pumped on 2×256-bit pipes (AMD Zen 4): 32 FP32 FLOP/cycle"
        return 64, "AVX-512 with 2 FMA units assumed: 64 FP32 FLOP/cycle (32 with one unit)"
    if "avx2" in isa and "fma" in isa:
        return 32, "AVX2 + FMA, 2×256-bit FMA pipes: 32 FP32 FLOP/cycle"
    if "neon" in isa:
        return 32, "Arm NEON, 4×128-bit FMA pipes assumed: 32 FP32 FLOP/cycle"
    if "avx" in isa:
        return 16, "AVX without FMA: 16 FP32 FLOP/cycle"
    return 8, "no AVX: SSE 128-bit mul + add, 8 FP32 FLOP/cycle"


def cpu_clock_hz(machine: MachineInfo) -> tuple[float, str]:
    """Clock used for the peak: the OS-reported current clock (in a VM the host's nominal clock;
    wide-vector code runs at or below it on servers), else max, else a 2.0 GHz default."""
    if machine.current_frequency_hz:
        return machine.current_frequency_hz, "OS-reported current clock"
    if machine.max_frequency_hz:
        return machine.max_frequency_hz, "OS-reported max clock (turbo; optimistic)"
    return DEFAULT_CLOCK_HZ, "no clock reported; 2.0 GHz assumed"


def cpu_peak_flops_per_second(machine: MachineInfo) -> tuple[dict[str, float], list[str]]:
    """Peak FLOP/s per dtype: cores × clock × FLOPs/cycle/core (reference/hardware.md §1c).

    fp32 from the widest FMA ISA; bf16 = AMX 1024 FLOP/cycle/core when amx_bf16, else
    avx512_bf16 at 2× the fp32 rate (VDPBF16PS), else ABSENT (bf16 without hardware support is
    emulated and slow, not fast); fp16 = AMX-FP16 1024 when amx_fp16, else the fp32 rate with
    avx512_fp16 (torch promotes CPU fp16 GEMMs to SGEMM), else absent; int8 = AMX 2048 ops when
    amx_int8. Cores = physical cores usable by this process.
    """
    clock, clock_note = cpu_clock_hz(machine)
    per_core, fp32_note = fp32_flops_per_cycle_per_core(machine)
    cores = min(machine.num_physical_cores, machine.num_usable_cores)
    isa = set(machine.isa)
    rate = cores * clock
    peaks: dict[str, float] = {"fp32": rate * per_core}
    notes = [f"{cores} cores × {clock / 1e9:.2f} GHz ({clock_note})", fp32_note]
    if "amx_bf16" in isa:
        peaks["bf16"] = rate * 1024
        notes.append("bf16 via AMX: 1024 FLOP/cycle/core")
    elif "avx512_bf16" in isa:
        peaks["bf16"] = 2 * peaks["fp32"]
        notes.append("bf16 via AVX512_BF16: 2× the fp32 rate")
    else:
        notes.append("no bf16 hardware: bf16 is emulated (slow), peak left out")
    if "amx_fp16" in isa:
        peaks["fp16"] = rate * 1024
        notes.append("fp16 via AMX-FP16: 1024 FLOP/cycle/core")
    elif "avx512_fp16" in isa:
        # The ISA could do 2× fp32, but torch's CPU fp16 GEMM runs at the fp32 (SGEMM) rate:
        # measured 291 vs 289 GFLOP/s at 2048³ on a 2-core SPR-class VM (torch 2.13).
        peaks["fp16"] = peaks["fp32"]
        notes.append("fp16 GEMMs run at the fp32 rate in torch (AVX512_FP16 unused)")
    if "amx_int8" in isa:
        peaks["int8"] = rate * 2048
    return peaks, notes


# ----------------------------------------------------------------------------- Device


def local_device(
    machine: MachineInfo | None = None, profile: CalibrationProfile | None = None
) -> Device:
    """The Device for this machine: its first accelerator if torch found one, else the CPU.

    With a CalibrationProfile of this machine the measured memory bandwidth (the `memory`
    curve's best rate) replaces the documented estimate.
    """
    machine = machine or detect()
    if machine.accelerators:
        return accelerator_device(machine.accelerators[0])
    return cpu_device(machine, profile)


def cpu_device(machine: MachineInfo, profile: CalibrationProfile | None = None) -> Device:
    """The CPU as a Device named 'local': memory = RAM total, peak from the §1c formula,
    bandwidth from the catalogue (matched by CPU brand), the profile, or the default estimate."""
    peaks, notes = cpu_peak_flops_per_second(machine)
    bandwidth, bw_note = _cpu_bandwidth(machine, profile)
    notes.append(bw_note)
    return Device(
        name="local",
        display_name=machine.cpu_brand,
        vendor=_vendor_name(machine.cpu_vendor, machine.cpu_brand),
        kind="cpu",
        backend="cpu",
        memory_bytes=machine.memory_total_bytes,
        memory_bandwidth_bytes_per_second=bandwidth,
        peak_flops_per_second=peaks,  # type: ignore[arg-type]
        unified_memory=True,
        num_cores=min(machine.num_physical_cores, machine.num_usable_cores),
        isa=machine.isa,
        sources=("detected: /proc/cpuinfo + psutil; peak formula reference/hardware.md §1c",),
        notes="; ".join(notes),
    )


def _cpu_bandwidth(
    machine: MachineInfo, profile: CalibrationProfile | None
) -> tuple[float, str]:
    """Memory bandwidth (bytes/s) and how it was obtained."""
    if profile is not None and "memory" in profile.curves:
        measured = max(profile.curves["memory"].rates)
        return measured, f"bandwidth measured by nvfree calibrate ({profile.created_at})"
    match = _catalogue_cpu(machine.cpu_brand)
    if match is not None:
        return match.memory_bandwidth_bytes_per_second, f"bandwidth from catalogue '{match.name}'"
    cores = min(machine.num_physical_cores, machine.num_usable_cores)
    estimate = min(cores * DEFAULT_BANDWIDTH_PER_CORE_BYTES_PER_SECOND,
                   DEFAULT_BANDWIDTH_CAP_BYTES_PER_SECOND)
    return estimate, (
        "bandwidth ESTIMATED (10 GB/s per core, at most 51.2 GB/s; DRAM channels are not "
        "visible from here): run `nvfree calibrate` to measure it"
    )


def _vendor_name(vendor_id: str, brand: str) -> str:
    """Readable vendor from the CPUID vendor string or the brand."""
    known = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
    if vendor_id in known:
        return known[vendor_id]
    return "Apple" if brand.startswith("Apple") else (vendor_id or "unknown")


# ----------------------------------------------------------------------------- catalogue match

_VENDOR_WORDS = {"nvidia", "amd", "intel", "apple", "geforce", "radeon", "instinct", "tesla",
                 "r", "tm", "processor", "cpu", "gpu", "graphics", "data", "center", "core"}


def _tokens(text: str) -> set[str]:
    """Lower-case alphanumeric tokens minus vendor words ('NVIDIA H100 80GB' → {h100, 80gb})."""
    return set(re.findall(r"[a-z0-9+]+", text.lower())) - _VENDOR_WORDS


def _catalogue_devices() -> list[Device]:
    """All catalogue devices, or [] while estimator.catalog is missing or fails to load."""
    try:
        from estimator import catalog
    except ImportError:
        return []
    try:
        listed = catalog.list_devices()
    except Exception:  # a broken catalogue must not break detection
        return []
    devices = []
    for item in listed:
        if isinstance(item, Device):
            devices.append(item)
        else:
            try:
                devices.append(catalog.load_device(str(item)))
            except Exception:
                continue
    return devices


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
