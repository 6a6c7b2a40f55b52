"""planner.compare: sorting, devices needed, cost, alternatives, free tiers, inference rates."""

import pytest

from estimator.analytic.inference import (
    decode_read_bytes,
    decode_tokens_per_second,
    experts_touched_fraction,
    prefill_flops_per_token,
)
from estimator.api import estimate
from estimator.catalog import load_device, load_model
from estimator.errors import SetupError, UnknownDeviceError
from estimator.planner.compare import AUTO_METHODS, SECONDS_PER_HOUR, compare, smallest_fit
from estimator.specs import TrainSetup

QLORA = TrainSetup(method="qlora", weight_bits=4, num_tokens=10**8)
GPUS = ["mi300x", "h100-sxm", "rtx-4090", "gaudi3", "l4"]


@pytest.fixture(scope="module")
def llama8b():
    return load_model("llama-3.1-8b")


def test_sorted_by_time_then_by_cost(llama8b) -> None:
    by_time = compare(llama8b, QLORA, GPUS, alternatives=False)
    times = [o.total_seconds for o in by_time.options]
    assert None not in times and times == sorted(times)
    by_cost = compare(llama8b, QLORA, GPUS, objective="cost", alternatives=False)
    costs = [o.cost_usd for o in by_cost.options]
    known = [c for c in costs if c is not None]
    assert known == sorted(known) and costs[:len(known)] == known  # unknown cost last
    assert {o.device for o in by_time.options} == set(GPUS)


def test_unknown_price_gives_no_cost_and_says_so(llama8b) -> None:
    result = compare(llama8b, QLORA, ["gaudi3", "mi300x"], alternatives=False)
    options = {o.device: o for o in result.options}
    assert options["gaudi3"].price_per_hour_usd is None and options["gaudi3"].cost_usd is None
    assert any("price" in u for u in options["gaudi3"].unknowns)
    mi = options["mi300x"]
    assert mi.cost_usd == pytest.approx(
        mi.num_devices * mi.price_per_hour_usd * mi.total_seconds / SECONDS_PER_HOUR)


def test_devices_needed_never_grows_with_device_memory(llama8b) -> None:
    """Fewest devices for a full fine-tune of an 8B model: monotone in the memory per device,
    and every count found really fits while one fewer does not."""
    setup = TrainSetup(method="full", checkpointing=True)
    base = load_device("h100-sxm")
    counts = []
    for gib in (24, 40, 80, 141, 192):
        device = base.model_copy(update={"memory_bytes": gib * 1024**3})
        sizing = smallest_fit(llama8b, setup, device, None, max_devices=64)
        assert sizing.num_devices is not None and sizing.modelled
        n = sizing.num_devices
        assert sizing.est.memory.fits  # the band's upper end fits
        if n > 1:
            fewer = estimate(llama8b, setup.model_copy(update={
                "num_devices": n - 1, "zero_stage": 3}), device)
            assert not fewer.memory.fits
        counts.append(n)
    assert counts == sorted(counts, reverse=True) and counts[0] > 1 and counts[-1] == 1


def test_auto_method_prefers_fewer_devices(llama8b) -> None:
    """On a 24 GB card a full fine-tune of 8B needs several cards; LoRA/QLoRA need one."""
    result = compare(llama8b, TrainSetup(num_tokens=10**7), ["rtx-4090"],
                     methods=AUTO_METHODS, alternatives=False)
    option = result.options[0]
    assert option.fits_on_one and option.min_devices == 1
    assert option.method in ("lora", "qlora")
    assert "fewest devices" in result.method_rule


def test_alternatives_when_it_does_not_fit() -> None:
    longcat = load_model("longcat-flash")
    result = compare(longcat, QLORA, ["rtx-4090"], max_devices=1, methods=AUTO_METHODS)
    assert result.options[0].num_devices is None and not result.options[0].within_limits
    assert result.smaller_models
    sizes = [m.total_params for m in result.smaller_models]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < result.total_params
    assert all(m.option.fits_on_one and m.option.within_limits for m in result.smaller_models)
    assert {t.offer for t in result.free_tiers} >= {"kaggle-gpu-t4x2", "kaggle-tpu-v3-8"}


def test_limits_mark_options_and_free_tier_quota(llama8b) -> None:
    result = compare(llama8b, QLORA, ["h100-sxm", "ryzen-9-7950x"], max_hours=24)
    options = {o.device: o for o in result.options}
    assert options["h100-sxm"].within_limits and not options["ryzen-9-7950x"].within_limits
    assert result.options[0].device == "h100-sxm"
    priced = compare(llama8b, QLORA, ["h100-sxm", "gaudi3"], max_cost_usd=1e6,
                     alternatives=False)
    unpriced = next(o for o in priced.options if o.device == "gaudi3")
    assert not unpriced.within_limits and any("--max-cost" in u for u in unpriced.unknowns)
    assert priced.options[0].device == "h100-sxm"
    kaggle = next(t for t in result.free_tiers if t.offer == "kaggle-gpu-t4x2")
    assert kaggle.fits and kaggle.num_devices == 2
    assert kaggle.weeks_of_quota == pytest.approx(kaggle.total_seconds / 3600 / 30)


def test_errors_are_typed(llama8b) -> None:
    with pytest.raises(UnknownDeviceError):
        compare(llama8b, QLORA, ["no-such-gpu"])
    with pytest.raises(SetupError):
        compare(llama8b, QLORA, ["h100-sxm"], objective="speed")


# ------------------------------------------------------------------------------ inference


def inference_estimate(model_name: str, device: str, batch: int = 1):
    setup = TrainSetup(method="inference", weight_bits=4, batch_size=batch, seq_len=2048)
    est = estimate(load_model(model_name), setup, device)
    weights = est.memory.components["weights"] + est.memory.components["quant_scales"]
    return est, weights, est.memory.components["kv_cache"]


def test_dense_decode_is_bandwidth_over_bytes_read() -> None:
    """Bandwidth-bound decode (Pope et al. 2022): 0.7 · peak bandwidth / bytes per step, and
    the bytes are all stored weights but the untouched input-embedding rows, plus the KV."""
    est, weights, kv = inference_estimate("llama-3.1-8b", "ryzen-9-7950x")
    model, device = est.model, est.device
    read = decode_read_bytes(model, est.setup, est.params, weights, kv)
    embedding_bytes = (est.params.embedding - model.hidden_size) * 2
    assert read == weights - embedding_bytes + kv
    rate = decode_tokens_per_second(model, est.setup, device, est.params, weights, kv)
    assert rate == pytest.approx(0.7 * device.memory_bandwidth_bytes_per_second / read)
    assert 5 < rate < 20  # hardware.md (d): 6-10 tok/s on DDR4 desktops, more on DDR5


def test_moe_decode_reads_only_touched_experts() -> None:
    est, weights, kv = inference_estimate("qwen3-30b-a3b", "ryzen-9-7950x")
    one = decode_read_bytes(est.model, est.setup, est.params, weights, kv)
    assert one < 0.3 * (weights + kv)  # 8 of 128 experts per token
    assert experts_touched_fraction(est.model, 1) == pytest.approx(8 / 128)
    assert experts_touched_fraction(est.model, 64) > experts_touched_fraction(est.model, 8)


def test_prefill_counts_forward_flops_only() -> None:
    """The per-op prefill step (method inference) is forward only: 2·N per token + causal
    attention, less the lm_head of all but the last position."""
    est, _, _ = inference_estimate("llama-3.1-8b", "h100-sxm")
    tokens = est.setup.tokens_per_micro_batch
    reference = prefill_flops_per_token(est.model, est.params, est.setup.seq_len) * tokens
    lm_head = 2 * est.params.lm_head * (tokens - est.setup.batch_size)
    assert est.throughput.step_flops == pytest.approx(reference - lm_head, rel=0.01)


def test_compare_inference_reports_both_rates(llama8b) -> None:
    setup = TrainSetup(method="inference", weight_bits=4, num_tokens=10**6)
    result = compare(llama8b, setup, ["rtx-4090", "ryzen-9-7950x"], alternatives=False)
    for o in result.options:
        assert o.tokens_per_second > o.decode_tokens_per_second > 0
        assert o.decode_bound == "bandwidth"
        assert o.total_seconds == pytest.approx(10**6 / o.decode_tokens_per_second)


def test_multi_device_option_is_estimate_at_that_count(llama8b) -> None:
    """Time and cost of an N-device option are `estimate` at that N and ZeRO stage."""
    setup = TrainSetup(method="full", num_tokens=10**7)
    option = compare(llama8b, setup, ["h100-sxm"], alternatives=False).options[0]
    assert option.num_devices > 1 and option.multi_device_modelled
    est = estimate(llama8b, setup.model_copy(update={
        "num_devices": option.num_devices, "zero_stage": option.zero_stage,
        "checkpointing": option.checkpointing, "batch_size": option.batch_size,
        "grad_accum": option.grad_accum, "num_nodes": max(1, option.num_devices // 8)}),
        "h100-sxm")
    assert option.tokens_per_second == pytest.approx(est.throughput.tokens_per_second)
    assert option.cost_usd == pytest.approx(est.throughput.cost_usd)
    assert option.peak_memory_bytes == est.memory.total_bytes <= est.memory.capacity_bytes
