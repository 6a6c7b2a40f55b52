"""The headline hint (issue 17, item 7): --params near a preset names it."""

from estimator.api import estimate
from estimator.request import preset_hints


def test_the_seed_56b_names_longcat() -> None:
    hints = preset_hints(56e9)
    assert hints and hints[0].startswith("longcat-flash has 560B total / ~27B active")
    assert "--model longcat-flash" in hints[0]


def test_active_count_matches_and_nothing_far_away() -> None:
    assert any("longcat-flash" in h for h in preset_hints(27e9))
    assert preset_hints(1e13) == []


def test_estimate_carries_the_hints() -> None:
    est = estimate(params=56e9, bits="4", device="mi300x")
    assert any("longcat-flash" in h for h in est.hints)
    assert not any("this machine" in h for h in est.hints)


def test_a_16_bit_lora_on_a_cpu_with_slow_bf16_gemms_is_pointed_at_the_upcast_path() -> None:
    """The calibrated bf16 GEMM curve below the fp32 one on a CPU: a bf16 LoRA estimate names
    `--bits 16 --dtype fp32`; not when bf16 measured faster, nor for fp32 or a full fine-tune."""
    from estimator.catalog import load_device
    from estimator.planner.estimate import upcast_hint
    from estimator.specs import CalibrationProfile, EfficiencyCurve, TrainSetup

    def profile(bf16_rate: float) -> CalibrationProfile:
        curves = {f"matmul.{d}": EfficiencyCurve(op_class=f"matmul.{d}", unit="flops",
                                                 log10_work=(6.0, 9.0), rates=(r / 10, r))
                  for d, r in (("fp32", 8e10), ("bf16", bf16_rate))}
        return CalibrationProfile(fingerprint="f", torch_version="2", num_threads=2,
                                  backend="cpu", device_name="cpu", created_at="now",
                                  curves=curves)

    cpu = load_device("ryzen-9-7950x")
    lora = TrainSetup(framework="nvfree", method="lora", compute_dtype="bf16")
    (hint,) = upcast_hint(lora, cpu, profile(1.6e10))
    assert "5.0× slower than fp32" in hint and "--bits 16 --dtype fp32" in hint
    assert upcast_hint(lora, cpu, profile(2e11)) == []
    assert upcast_hint(lora.model_copy(update={"compute_dtype": "fp32"}), cpu,
                       profile(1.6e10)) == []
    assert upcast_hint(lora.model_copy(update={"method": "full"}), cpu, profile(1.6e10)) == []
    assert upcast_hint(lora, cpu, None) == []
