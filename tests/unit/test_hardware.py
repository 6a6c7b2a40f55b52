"""Hardware detection: real detection on this machine, the CPU peak formula on made-up machines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.hardware import (
    cpu_peak_flops_per_second,
    detect,
    fingerprint,
    local_device,
    match_catalogue,
)
from estimator.specs.machine import AcceleratorInfo, MachineInfo

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def _machine(**overrides) -> MachineInfo:
    base = {
        "os": "Linux", "arch": "x86_64", "cpu_brand": "Test CPU", "cpu_vendor": "GenuineIntel",
        "cpu_family": 6, "cpu_model": 143, "num_physical_cores": 4, "num_logical_cores": 8,
        "num_usable_cores": 8, "current_frequency_hz": 2.0e9, "isa": ("avx2", "fma"),
        "memory_total_bytes": 32 * GIB, "memory_available_bytes": 30 * GIB,
    }
    base.update(overrides)
    return MachineInfo(**base)


def test_detect_reports_cores_ram_and_isa():
    machine = detect()
    assert machine.num_logical_cores >= machine.num_physical_cores >= 1
    assert machine.memory_total_bytes >= machine.memory_available_bytes > 0
    assert not machine.torch_probed and machine.accelerators == ()
    if machine.arch == "x86_64" and Path("/proc/cpuinfo").exists():
        flags = set(Path("/proc/cpuinfo").read_text().split())
        assert ("avx2" in machine.isa) == ("avx2" in flags)


def test_detect_does_not_import_torch():
    code = (
        "import sys; from estimator.hardware import detect, local_device; "
        "local_device(detect()); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_fp32_peak_avx2_is_cores_clock_32():
    peaks, _ = cpu_peak_flops_per_second(_machine())
    assert peaks["fp32"] == 4 * 2.0e9 * 32
    assert "bf16" not in peaks  # no bf16 hardware: absent, never "fast"


def test_avx512_amx_peaks():
    isa = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    peaks, notes = cpu_peak_flops_per_second(_machine(isa=isa))
    assert peaks["fp32"] == 4 * 2.0e9 * 64
    assert peaks["bf16"] == 4 * 2.0e9 * 1024
    assert peaks["int8"] == 4 * 2.0e9 * 2048
    assert any("2 FMA units" in n for n in notes)


def test_avx512_bf16_without_amx_is_twice_fp32():
    peaks, _ = cpu_peak_flops_per_second(_machine(isa=("avx2", "fma", "avx512f", "avx512_bf16")))
    assert peaks["bf16"] == 2 * peaks["fp32"]


def test_zen4_avx512_is_double_pumped():
    zen4 = _machine(cpu_vendor="AuthenticAMD", cpu_family=25, isa=("avx2", "fma", "avx512f"))
    zen5 = _machine(cpu_vendor="AuthenticAMD", cpu_family=26, isa=("avx2", "fma", "avx512f"))
    assert cpu_peak_flops_per_second(zen4)[0]["fp32"] * 2 == cpu_peak_flops_per_second(zen5)[0][
        "fp32"
    ]


def test_peak_uses_usable_cores_only():
    peaks, _ = cpu_peak_flops_per_second(_machine(num_usable_cores=2))
    assert peaks["fp32"] == 2 * 2.0e9 * 32


def test_local_device_is_the_cpu_with_ram():
    machine = detect()
    device = local_device(machine)
    assert device.name == "local" and device.kind == "cpu" and device.backend == "cpu"
    assert device.unified_memory and device.memory_bytes == machine.memory_total_bytes
    assert device.peak_flops_per_second["fp32"] > 0
    assert device.memory_bandwidth_bytes_per_second > 0 and device.notes


def test_fingerprint_stable_and_sensitive():
    machine = _machine()
    same = machine.model_copy(update={"memory_available_bytes": 1, "current_frequency_hz": 3e9})
    assert fingerprint(machine) == fingerprint(same)
    assert fingerprint(machine) != fingerprint(_machine(num_physical_cores=8))
    assert fingerprint(machine) != fingerprint(_machine(memory_total_bytes=64 * GIB))
    gpu = AcceleratorInfo(backend="cuda", index=0, name="NVIDIA H100 80GB HBM3")
    with_gpu = machine.model_copy(update={"accelerators": (gpu,)})
    assert fingerprint(with_gpu) == fingerprint(machine)  # CPU profiles ignore accelerators
    assert fingerprint(with_gpu, "cuda") != fingerprint(machine, "cuda")


def test_accelerator_becomes_the_local_device():
    gpu = AcceleratorInfo(backend="rocm", index=0, name="Some Unknown GPU 9000",
                          memory_bytes=16 * GIB)
    device = local_device(_machine(accelerators=(gpu,)))
    assert device.kind == "gpu" and device.backend == "rocm" and device.memory_bytes == 16 * GIB


def test_no_catalogue_match_for_generic_brand():
    assert match_catalogue("Intel(R) Xeon(R) Processor", "cpu") is None


def _run_cli(*args: str, block_torch: bool = False) -> subprocess.CompletedProcess:
    blocker = (
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch blocked for this test')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    ) if block_torch else ""
    code = blocker + "from estimator.cli.app import main; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_cli_hardware_json_reports_this_machine():
    out = _run_cli("hardware", "--json", "--no-torch")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    machine = payload["machine"]
    flags = set(Path("/proc/cpuinfo").read_text().split())
    for flag in ("avx512f", "avx512_bf16"):
        assert (flag in machine["isa"]) == (flag in flags)
    assert machine["num_physical_cores"] == detect().num_physical_cores
    assert machine["memory_total_bytes"] == detect().memory_total_bytes
    assert payload["device"]["name"] == "local" and payload["calibration"]["reason"]


def test_hardware_and_profiles_work_without_torch():
    out = _run_cli("hardware", "--json", block_torch=True)  # --torch, but torch "missing"
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["machine"]["accelerators"] == []
