"""This machine's CPU as a Device: peak FLOP/s from ISA and clocks, memory bandwidth."""

from __future__ import annotations

from estimator.hardware.detect import (
    DEFAULT_BANDWIDTH_CAP_BYTES_PER_SECOND,
    DEFAULT_BANDWIDTH_PER_CORE_BYTES_PER_SECOND,
    DEFAULT_CLOCK_HZ,
)
from estimator.hardware.match import _catalogue_cpu
from estimator.specs.calibration import CalibrationProfile
from estimator.specs.device import Device
from estimator.specs.machine import MachineInfo


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
