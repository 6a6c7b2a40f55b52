"""Time of one op call from an efficiency curve: measured (CalibrationProfile) or the
catalogue default.

seconds(W) = overhead + W / rate(W). A measured curve interpolates its knots linearly in
log10(W) and clamps outside them. The default (no calibration) is a saturating curve
rate(W) = peak · fraction · W / (W + W_half): small ops reach a small share of the peak, large
ops approach `fraction` of it. Defaults are stated, not measured: fraction = the device's
measured large-GEMM share where the catalogue has one (stas00 MAMF), else DEFAULT_MATMUL_FRACTION;
memory-bound ops reach DEFAULT_BANDWIDTH_FRACTION of peak bandwidth (STREAM triad typically
reaches 70–85 % of the vendor peak).
"""

import bisect
import math

from estimator.specs import CalibrationProfile, Device, EfficiencyCurve

DEFAULT_MATMUL_FRACTION = 0.6
DEFAULT_ATTENTION_SHARE = 0.5
"""Fused attention reaches about half the GEMM rate (FlashAttention-2 paper: 50–73 % of A100
peak forward, lower backward); used only without calibration."""
DEFAULT_BANDWIDTH_FRACTION = 0.7
DEFAULT_HALF_RATE_FLOPS = {"cpu": 2e7, "gpu": 2e9, "tpu": 2e9, "accelerator": 2e9}
"""GEMM size (FLOPs) at which the default curve reaches half its asymptote: ~a 200³ GEMM on a
CPU core set, ~a 1000³ GEMM on a large accelerator."""
DEFAULT_HALF_RATE_BYTES = {"cpu": 2e5, "gpu": 2e7, "tpu": 2e7, "accelerator": 2e7}
DEFAULT_OVERHEAD_SECONDS = {"cpu": 5e-6, "gpu": 8e-6, "tpu": 8e-6, "accelerator": 8e-6}
"""Per-call dispatch/launch cost without calibration (eager PyTorch on CPU ~5 µs, a CUDA
kernel launch ~5–10 µs)."""


def curve_rate(curve: EfficiencyCurve, work: float) -> float:
    """Measured rate at `work`: piecewise-linear in log10(work), clamped to the end knots."""
    import math

    x = math.log10(max(work, 1.0))
    xs, ys = curve.log10_work, curve.rates
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


def curve_seconds(curve: EfficiencyCurve, work: float, rate_work: float = 0.0) -> float:
    """overhead + work / rate(rate_work or work) for one call."""
    if work <= 0:
        return curve.overhead_seconds
    return curve.overhead_seconds + work / curve_rate(curve, rate_work or work)


def default_flops_rate(device: Device, dtype: str, op_class: str, flops: float) -> float:
    """Uncalibrated compute rate of one call (FLOP/s)."""
    peak = device.peak_for(dtype) or device.peak_for("fp32") or device.peak_for("bf16")
    assert peak, f"device {device.name} has no peak FLOP/s"
    fraction = device.achievable_matmul_fraction or DEFAULT_MATMUL_FRACTION
    if op_class == "attention":
        fraction *= DEFAULT_ATTENTION_SHARE
    half = DEFAULT_HALF_RATE_FLOPS[device.kind]
    return peak * fraction * flops / (flops + half)


def default_bytes_rate(device: Device, num_bytes: float) -> float:
    """Uncalibrated memory-bound rate of one call (bytes/s)."""
    half = DEFAULT_HALF_RATE_BYTES[device.kind]
    bandwidth = device.memory_bandwidth_bytes_per_second * DEFAULT_BANDWIDTH_FRACTION
    return bandwidth * num_bytes / (num_bytes + half)


def default_seconds(device: Device, dtype: str, op_class: str, flops: float,
                    num_bytes: float) -> float:
    """Roofline time of one call with default curves: overhead + max(compute, memory)."""
    compute = flops / default_flops_rate(device, dtype, op_class, flops) if flops > 0 else 0.0
    memory = num_bytes / default_bytes_rate(device, num_bytes) if num_bytes > 0 else 0.0
    return DEFAULT_OVERHEAD_SECONDS[device.kind] + max(compute, memory)


def default_seconds_array(device: Device, dtype: str, op_class: str, flops, num_bytes):
    """default_seconds elementwise over numpy arrays of per-call FLOPs and bytes (the planner
    times thousands of calls at once): the same rates (default_flops_rate, default_bytes_rate,
    which take arrays as they are) and the same roofline, overhead + max(compute, memory),
    zero work taking no time. numpy is imported here, not with the module: `nvfree estimate`
    never needs it."""
    import numpy as np

    flops, num_bytes = np.asarray(flops, dtype=float), np.asarray(num_bytes, dtype=float)
    compute, memory = np.zeros(flops.shape), np.zeros(num_bytes.shape)
    busy, moved = flops > 0, num_bytes > 0
    compute[busy] = flops[busy] / default_flops_rate(device, dtype, op_class, flops[busy])
    memory[moved] = num_bytes[moved] / default_bytes_rate(device, num_bytes[moved])
    return DEFAULT_OVERHEAD_SECONDS[device.kind] + np.maximum(compute, memory)


FALLBACK_CLASS = {"lora": "matmul", "alloc": "memory", "matmul_cold": "matmul",
                  "matmul_wgrad": "matmul_cold", "matmul_dgrad": "matmul",
                  "matmul_cold_dgrad": "matmul_cold",
                  "dispatch.autograd": "dispatch", "optimizer.adamw8bit": "optimizer"}
"""A class a profile may lack (older profiles, quick runs) and the class measured instead."""


LORA_RANK_PREFIX = "lora.r"
"""Op classes of adapter GEMMs carry their rank: 'lora.r16' (flops.lora_class)."""


def nearest_rank_curve(profile: CalibrationProfile, rank: int,
                       dtype: str) -> EfficiencyCurve | None:
    """The profile's adapter-GEMM curve of the rank nearest `rank` in log scale
    ('lora.r<k>.<dtype>', calibrate/run.fit_all); None when it has none (older profiles)."""
    found = []
    for name, curve in profile.curves.items():
        head, _, tail = name.rpartition(".")
        digits = head[len(LORA_RANK_PREFIX):]
        if tail == dtype and head.startswith(LORA_RANK_PREFIX) and digits.isdigit():
            k = max(1, int(digits))
            found.append((abs(math.log(k / rank)), k, curve))
    return min(found, key=lambda f: (f[0], f[1]))[2] if found else None


def profile_curve(profile: CalibrationProfile | None, op_class: str,
                  dtype: str) -> EfficiencyCurve | None:
    """The measured curve for an op: '<class>.<dtype>' for compute classes, else '<class>',
    else the fallback class's curve; an adapter GEMM ('lora.r<rank>') the curve of the
    nearest measured rank, else the 'lora' one."""
    if profile is None:
        return None
    if op_class.startswith(LORA_RANK_PREFIX):
        curve = nearest_rank_curve(profile, int(op_class[len(LORA_RANK_PREFIX):]), dtype)
        if curve is not None:
            return curve
        op_class = "lora"
    curve = profile.curves.get(f"{op_class}.{dtype}") or profile.curves.get(op_class)
    if curve is None and op_class in FALLBACK_CLASS:
        return profile_curve(profile, FALLBACK_CLASS[op_class], dtype)
    return curve


def call_seconds(device: Device, profile: CalibrationProfile | None, dtype: str,
                 op_class: str, flops: float, num_bytes: float,
                 rate_flops: float = 0.0) -> tuple[float, bool]:
    """(seconds of one call, whether a measured curve gave it); a FLOP curve's rate read at
    `rate_flops` when given (flops.Op.rate_flops)."""
    curve = profile_curve(profile, op_class, dtype)
    if curve is None:
        return default_seconds(device, dtype, op_class, flops, num_bytes), False
    if curve.unit == "flops":
        return curve_seconds(curve, flops, rate_flops), True
    return curve_seconds(curve, num_bytes), True


def cold_gemms(profile: CalibrationProfile | None, dtype: str, weight_set_bytes: float) -> bool:
    """Whether the step's GEMMs that read stored weights or saved activations use the
    `matmul_cold.<dtype>` curve: the profile has that curve and the step's matmul weight set
    exceeds the cache private to the training cores (profile.private_cache_bytes; None →
    False, the hot curve).

    Rule from measurement (docs/calibration.md §4–5): every weight is read once per pass, so
    between two reads of the same weight the whole weight set streams through the caches. A
    rotating operand pool of 16 MiB (4× this machine's 2 × 2 MiB L2, far below the 480 MiB L3
    the VM reports) already cuts bf16 rates at T = 256 by 10–30 %; the hot curve is measured
    with operands that stay in L1/L2. The shared L3 is left out: it is shared with other
    tenants and processes and its reported size is the host's."""
    if profile is None or profile.private_cache_bytes is None:
        return False
    if f"matmul_cold.{dtype}" not in profile.curves:
        return False
    return weight_set_bytes > profile.private_cache_bytes
