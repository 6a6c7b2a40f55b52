"""data/devices.toml: every entry loads into a Device, carries sources, and uses dense figures.

Spot values are from shared/reference/hardware.md Part 1 (its citations are in each entry).
"""

import pytest

from estimator.catalog import GIB, load_device, read_toml
from estimator.specs import Device

ENTRIES = read_toml("devices.toml")["devices"]
KEYS = list(ENTRIES)
TERA = 1e12

# hardware.md Part 1a + 1b, one key per row (the A100 80GB row also yields its PCIe variant).
EXPECTED_KEYS = {
    "mi300x", "mi325x", "mi250x", "mi210", "rx-7900-xtx", "rx-9070-xt", "radeon-pro-w7900",
    "gaudi2", "gaudi3", "max-1550", "arc-a770", "arc-b580",
    "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "trainium1", "trainium2",
    "m2-ultra", "m3-max", "m4-max", "m3-ultra",
    "a100-40gb", "a100-80gb", "a100-80gb-pcie", "h100-sxm", "h200", "l4", "rtx-3090",
    "rtx-4090", "t4",
    "rtx-a6000", "a10g",  # added for the published peak-memory rows (data/published_peaks.toml)
    "xeon-platinum-8480plus", "xeon-platinum-8592plus", "xeon-6980p", "epyc-9654",
    "epyc-9965", "graviton3", "graviton4", "ryzen-9-7950x", "core-i9-14900k", "m4-max-cpu",
}

ALLOWED_FIELDS = {
    "display_name", "vendor", "kind", "backend", "memory_gib", "memory_gb",
    "bandwidth_gb_per_s", "peak_tflops", "achievable_matmul_fraction", "unified_memory",
    "num_cores", "isa", "interconnect_gb_per_s", "network_gb_per_s", "devices_per_node",
    "tdp_watts", "desktop",
    "price_per_hour_usd", "price_source", "sources", "notes",
}


@pytest.fixture(scope="module", params=KEYS, ids=KEYS)
def device(request) -> Device:
    return load_device(request.param)


def test_catalogue_covers_hardware_reference():
    assert set(KEYS) == EXPECTED_KEYS


@pytest.mark.parametrize("key", KEYS, ids=KEYS)
def test_entry_uses_only_known_fields(key):
    entry = ENTRIES[key]
    assert set(entry) <= ALLOWED_FIELDS, set(entry) - ALLOWED_FIELDS
    assert ("memory_gib" in entry) != ("memory_gb" in entry), "exactly one memory unit"
    assert key == key.lower() and " " not in key


def test_device_is_valid(device):
    assert device.name in KEYS
    assert device.sources, "every entry needs at least one source"
    assert device.memory_bytes > 0
    assert device.memory_bandwidth_bytes_per_second > 0
    assert device.peak_flops_per_second, "at least one peak rate"
    assert all(rate > 0 for rate in device.peak_flops_per_second.values())
    assert device.notes


def test_sixteen_bit_rate_not_below_fp32(device):
    peaks = device.peak_flops_per_second
    for dtype in ("bf16", "fp16", "tf32"):
        if dtype in peaks and "fp32" in peaks:
            assert peaks[dtype] >= peaks["fp32"], dtype


def test_int8_not_below_bf16(device):
    peaks = device.peak_flops_per_second
    if "int8" in peaks and "bf16" in peaks:
        assert peaks["int8"] >= peaks["bf16"]


def test_backend_matches_hardware_family(device):
    family = {"tpu": "xla"}.get(device.kind)
    if device.kind == "cpu":
        family = "cpu"
    elif device.vendor == "NVIDIA":
        family = "cuda"
    elif device.vendor == "AMD":
        family = "rocm"
    elif device.vendor == "Apple":
        family = "mps"
    elif device.vendor == "AWS":
        family = "neuron"
    elif device.vendor == "Intel":
        family = "hpu" if "Gaudi" in device.display_name else "xpu"
    assert device.backend == family


def test_cpu_only_fields(device):
    if device.kind == "cpu":
        assert device.num_cores and device.isa
        assert device.unified_memory
        assert "--device-memory" in (device.notes or "") or device.vendor == "Apple"
    else:
        assert device.num_cores is None and not device.isa
    if device.backend == "mps":
        assert device.unified_memory


def test_price_has_source(device):
    assert (device.price_per_hour_usd is None) == (device.price_source is None)


@pytest.mark.parametrize(("key", "dtype", "tflops"), [
    ("rx-9070-xt", "int8", 389.0),       # AMD's 779 TOPS is with sparsity
    ("rtx-4090", "bf16", 165.2),         # FP32-accumulate, not the 330 FP16-accumulate headline
    ("rtx-3090", "bf16", 71.0),
    ("mi300x", "bf16", 1307.4),
    ("mi250x", "bf16", 191.5),           # one GCD = half the package
    ("gaudi3", "bf16", 1677.0),          # shipping clock, not the 1835 spec figure
    ("h100-sxm", "bf16", 989.5),         # datasheet 1979 is sparse
    ("h100-sxm", "fp32", 67.0),          # TF32 off by default
    ("xeon-platinum-8480plus", "bf16", 114.7),  # 56 × 2.0 GHz × 1024 (AMX)
])
def test_dense_spot_values(key, dtype, tflops):
    assert load_device(key).peak_for(dtype) == pytest.approx(tflops * TERA, rel=1e-3)


def test_sparse_headlines_absent():
    assert load_device("rx-9070-xt").peak_for("int8") < 700 * TERA
    assert load_device("gaudi3").peak_for("bf16") < 1800 * TERA
    assert load_device("t4").peak_for("bf16") is None  # Turing has no bf16 tensor cores


def test_units_are_converted():
    mi300x = load_device("mi300x")
    assert mi300x.memory_bytes == 192 * GIB
    assert mi300x.memory_bandwidth_bytes_per_second == pytest.approx(5.3e12)
    assert mi300x.achievable_matmul_fraction == pytest.approx(0.514)
    assert load_device("tpu-v5e").memory_bandwidth_bytes_per_second == pytest.approx(819e9)
