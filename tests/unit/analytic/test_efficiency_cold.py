"""Cold vs hot GEMM curve choice and the dispatch term, on synthetic profiles (no torch)."""

import pytest

from estimator.analytic import dispatch as DP
from estimator.analytic.efficiency import call_seconds, cold_gemms, profile_curve
from estimator.analytic.params import count_params
from estimator.analytic.throughput import ops_seconds, step_ops, timed_ops
from estimator.catalog import load_device, load_model
from estimator.specs import CalibrationProfile, EfficiencyCurve, TrainSetup

MIB = 2**20


def curve(op_class: str, rate: float, unit: str = "flops",
          overhead: float = 1e-6) -> EfficiencyCurve:
    return EfficiencyCurve(op_class=op_class, unit=unit, log10_work=(6.0, 10.0),
                           rates=(rate / 2, rate), overhead_seconds=overhead)


def profile(*, cold: bool = True, cache: int | None = 4 * MIB,
            autograd: bool = True) -> CalibrationProfile:
    curves = {"matmul.bf16": curve("matmul.bf16", 1e12), "memory": curve("memory", 2e10, "bytes"),
              "dispatch": curve("dispatch", 1.0, overhead=2e-6)}
    if cold:
        curves["matmul_cold.bf16"] = curve("matmul_cold.bf16", 5e11)
    if autograd:
        curves["dispatch.autograd"] = curve("dispatch.autograd", 1.0, overhead=7e-6)
    return CalibrationProfile(fingerprint="t", torch_version="x", num_threads=2, backend="cpu",
                              device_name="t", created_at="2026-01-01T00:00:00Z",
                              curves=curves, private_cache_bytes=cache)


@pytest.mark.parametrize(("prof", "weights", "expected"), [
    (profile(), 8 * MIB, True),                    # weight set > private cache: cold
    (profile(), 2 * MIB, False),                   # fits: hot
    (profile(cold=False), 8 * MIB, False),         # old profile without the cold curve
    (profile(cache=None), 8 * MIB, False),         # cache unknown: hot
    (None, 8 * MIB, False),                        # uncalibrated
])
def test_cold_curve_is_chosen_only_when_measured_and_the_weights_exceed_the_cache(
        prof, weights, expected):
    assert cold_gemms(prof, "bf16", weights) is expected


def test_cold_class_falls_back_to_hot_then_to_the_roofline_default():
    device = load_device("xeon-platinum-8480plus")
    work = 2e8
    cold, hot = profile(), profile(cold=False)
    assert profile_curve(cold, "matmul_cold", "bf16").op_class == "matmul_cold.bf16"
    assert profile_curve(hot, "matmul_cold", "bf16").op_class == "matmul.bf16"
    t_cold, measured_cold = call_seconds(device, cold, "bf16", "matmul_cold", work, 0)
    t_hot, measured_hot = call_seconds(device, hot, "bf16", "matmul_cold", work, 0)
    t_default, measured = call_seconds(device, None, "bf16", "matmul_cold", work, 0)
    assert measured_cold and measured_hot and not measured
    assert t_cold > t_hot
    assert t_default == call_seconds(device, None, "bf16", "matmul", work, 0)[0]


def _classes(method: str, **kw) -> dict[str, str]:
    model = load_model("smollm2-135m")
    setup = TrainSetup(method=method, compute_dtype="bf16", seq_len=256, batch_size=2, **kw)
    ops = timed_ops(model, setup, count_params(model, setup), load_device("xeon-platinum-8480plus"),
                    profile())
    return {op.name: op.op_class for op in ops}


def test_which_gemms_read_cold_operands():
    lora = _classes("lora")  # bf16 base weights read from storage: all cold; adapters hot
    assert lora["linear.forward"] == "matmul_cold"
    assert lora["linear.backward_input"] == "matmul_cold_dgrad"  # dy·W: its own layout
    assert lora["lora.forward"] == "lora.r16"  # the rank's curve (flops.lora_class)
    full = _classes("full")  # autocast casts the fp32 weight right before the forward GEMM
    assert full["linear.forward"] == "matmul"
    assert full["linear.backward_input"] == "matmul_cold_dgrad"
    assert full["linear.backward_weight"] == "matmul_wgrad"  # its own cold curve
    qlora = _classes("qlora", weight_bits=4)  # NF4 dequantised fresh in forward and backward
    assert qlora["linear.forward"] == "matmul"
    assert qlora["linear.backward_input"] == "matmul_dgrad"  # hot, the input-gradient layout


def test_input_gradient_gemms_read_their_own_curve_or_fall_back():
    """A profile with matmul_dgrad / matmul_cold_dgrad times dy·W on them; one without (older
    profiles, GPUs) on matmul / matmul_cold (efficiency.FALLBACK_CLASS)."""
    hot = profile()
    assert profile_curve(hot, "matmul_dgrad", "bf16").op_class == "matmul.bf16"
    slow = hot.model_copy(update={"curves": {**hot.curves,
                                             "matmul_dgrad.bf16": curve("matmul_dgrad.bf16",
                                                                        1e9)}})
    assert profile_curve(slow, "matmul_dgrad", "bf16").op_class == "matmul_dgrad.bf16"
    assert profile_curve(slow, "matmul_cold_dgrad", "bf16").op_class == "matmul_cold.bf16"


def test_dispatch_term_on_cpu_only_and_net_of_timed_ops():
    model = load_model("smollm2-135m")
    setup = TrainSetup(method="lora", compute_dtype="bf16", seq_len=256, batch_size=2)
    params = count_params(model, setup)
    cpu_ops = timed_ops(model, setup, params, load_device("xeon-platinum-8480plus"), profile())
    gpu_ops = timed_ops(model, setup, params, load_device("h100-sxm"), profile())
    dispatch = [op for op in cpu_ops if op.op_class == "dispatch.autograd"]
    assert len(dispatch) == 1 and not any(op.op_class == "dispatch.autograd" for op in gpu_ops)
    timed = sum(op.num_calls for op in step_ops(model, setup, params))
    tensors = 30 * 7 * 2
    assert dispatch[0].num_calls == pytest.approx(
        DP.dispatch_op_count(model, setup, tensors) - timed)
    # ~10.4 k with fused AdamW and in-place adapters (+3.8 k with the per-tensor loop, 9 ops
    # per tensor: calibration.md)
    assert 9_500 < DP.dispatch_op_count(model, setup, tensors) < 11_500


def test_dispatch_count_grows_with_recompute_and_accumulation():
    model = load_model("smollm2-135m")
    base = TrainSetup(method="lora", compute_dtype="bf16", seq_len=256)
    count = DP.dispatch_op_count(model, base, 420)
    assert DP.dispatch_op_count(model, base.model_copy(update={"checkpointing": True}), 420) > count
    twice = DP.dispatch_op_count(model, base.model_copy(update={"grad_accum": 2}), 420)
    assert twice == pytest.approx(2 * count - DP.DISPATCH.fused_adamw)
    eight = base.model_copy(update={"optimizer": "adamw8bit"})  # a per-tensor optimizer
    assert DP.dispatch_op_count(model, eight, 420) == pytest.approx(
        count - DP.DISPATCH.fused_adamw + 9 * 420 + DP.DISPATCH.optimizer_fixed)


def test_attention_rate_is_read_at_one_sequence_and_kept_under_accumulation():
    """The attention curve is measured at batch 1: b sequences take b times one sequence's
    kernel time (the rate read at one sequence's FLOPs), also with gradient accumulation."""
    prof = profile()
    prof = prof.model_copy(update={"curves": {**prof.curves, "attention.bf16": curve(
        "attention.bf16", 2e11, overhead=0.0)}})
    model, device = load_model("smollm2-135m"), load_device("xeon-platinum-8480plus")

    def attention_seconds(**kw) -> float:
        setup = TrainSetup(method="lora", compute_dtype="bf16", seq_len=256, **kw)
        ops = [op for op in step_ops(model, setup, count_params(model, setup))
               if op.op_class == "attention"]
        return sum(t.seconds for t in ops_seconds(ops, device, prof, "bf16")[0])

    one = attention_seconds(batch_size=1)
    assert attention_seconds(batch_size=4) == pytest.approx(4 * one)
    assert attention_seconds(batch_size=4, grad_accum=2) == pytest.approx(8 * one)


def test_adapter_gemms_read_the_curve_of_the_nearest_measured_rank():
    """A skinny GEMM's rate follows its rank: 'lora.r<rank>' reads the nearest rank's curve
    (log scale), then the all-rank 'lora' curve (older profiles), then the hot matmul one."""
    base = profile()
    curves = {**base.curves, "lora.bf16": curve("lora.bf16", 5e10),
              "lora.r8.bf16": curve("lora.r8.bf16", 1e10),
              "lora.r64.bf16": curve("lora.r64.bf16", 8e10)}
    prof = base.model_copy(update={"curves": curves})
    assert profile_curve(prof, "lora.r8", "bf16").op_class == "lora.r8.bf16"
    assert profile_curve(prof, "lora.r16", "bf16").op_class == "lora.r8.bf16"  # log: 16 ~ 8
    assert profile_curve(prof, "lora.r32", "bf16").op_class == "lora.r64.bf16"
    assert profile_curve(prof, "lora.r16", "fp32") is None  # no fp32 curve, no matmul.fp32
    older = base.model_copy(update={"curves": {**base.curves, "lora.bf16": curves["lora.bf16"]}})
    assert profile_curve(older, "lora.r16", "bf16").op_class == "lora.bf16"
    assert profile_curve(base, "lora.r16", "bf16").op_class == "matmul.bf16"


def test_adapter_ops_carry_their_rank_and_report_under_lora():
    from estimator.analytic.throughput import op_class_key

    model = load_model("smollm2-135m")
    setup = TrainSetup(method="lora", lora_rank=32, compute_dtype="bf16")
    ops = [op for op in step_ops(model, setup, count_params(model, setup))
           if op.name.startswith("lora.")]
    assert ops and {op.op_class for op in ops} == {"lora.r32"}
    assert op_class_key("lora.r32", "bf16") == "lora.bf16"
