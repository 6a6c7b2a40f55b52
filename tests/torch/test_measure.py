"""Measurement: VmHWM reset per phase, sampled RSS, tensor storage by role, step times."""

import sys
import time

import pytest
import torch
from torch import nn

from estimator.executor import measure
from estimator.executor.optim import AdamW8bit

pytestmark = pytest.mark.torch
MIB = 1024**2


def _touch(num_bytes: int) -> torch.Tensor:
    return torch.ones(num_bytes // 4, dtype=torch.float32)  # written, so resident


@pytest.mark.skipif(not sys.platform.startswith("linux") or not measure.reset_vmhwm(),
                    reason="needs Linux /proc/self/clear_refs")
def test_vmhwm_reset_isolates_the_peak_of_a_phase():
    big = _touch(300 * MIB)
    del big
    peak = measure.PeakMemory(torch.device("cpu"))
    assert peak.method == "vmhwm"
    peak.reset()
    after_reset = peak.peak_bytes()
    assert after_reset < measure.current_rss_bytes() + 100 * MIB  # the 300 MiB spike is gone
    spike = _touch(120 * MIB)
    del spike
    assert peak.peak_bytes() >= after_reset + 110 * MIB


def test_rss_sampler_sees_a_spike_that_is_gone_by_the_end():
    sampler = measure._RssSampler()
    sampler.start()
    start = measure.current_rss_bytes()
    spike = _touch(150 * MIB)
    time.sleep(0.05)
    del spike
    assert sampler.stop() >= start + 140 * MIB


def test_storage_bytes_count_shared_and_viewed_storage_once():
    embedding = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = embedding.weight  # tied
    model = nn.ModuleDict({"embed": embedding, "head": head})
    assert measure.weights_bytes(model) == 100 * 8 * 4
    base = torch.zeros(10, 10)
    assert measure.tensor_storage_bytes([base, base[2:], base.T]) == 400


def test_gradient_and_optimizer_state_bytes():
    model = nn.Linear(128, 64)  # 8192 + 64 params
    model(torch.randn(2, 128)).sum().backward()
    assert measure.gradient_bytes(model) == (8192 + 64) * 4
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    steps = 2 * 4  # one fp32 'step' scalar per parameter tensor
    assert measure.optimizer_state_bytes(adamw) == 2 * (8192 + 64) * 4 + steps
    eight_bit = AdamW8bit(model.parameters())
    eight_bit.step()
    # weight: 2 × 1 B codes + 2 fp32 absmax per 256-block; bias (< 4096): fp32 m, v
    expected = 2 * 8192 + 2 * 4 * (8192 // 256) + 2 * 64 * 4 + steps
    assert measure.optimizer_state_bytes(eight_bit) == expected


def test_median_step_time_drops_warmup_steps():
    assert measure.median_step_seconds([5.0, 4.0, 1.0, 2.0, 3.0]) == 2.0
    assert measure.median_step_seconds([5.0]) == 5.0
    assert measure.median_step_seconds([]) is None


def test_terms_compare_prediction_and_measurement():
    rows = {t.name: t for t in measure.memory_terms(
        None, method="vmhwm", baseline_bytes=300, peak_bytes=1000, weights=200, gradients=50,
        optimizer_states=300)}
    assert rows["runtime"].measured_bytes == 300 - 200
    assert rows["activations_and_transients"].measured_bytes == 1000 - 300 - 300
    assert rows["total_peak"].predicted_bytes is None and rows["total_peak"].relative_error is None
    assert measure.relative_error(110, 100) == pytest.approx(0.1)
    assert measure.relative_error(1, 0) is None


def test_a_data_parallel_cpu_rank_is_predicted_from_the_machine_profile(tiny_dense):
    """Two local ranks with 1 thread each: the rank's prediction uses the machine's 2-thread
    profile, split per rank by the estimate (parallel.rank_profile), not the catalogue."""
    from estimator.calibrate.fit import fit_curve
    from estimator.hardware import detect, fingerprint
    from estimator.hardware.profiles import save_profile
    from estimator.specs import CalibrationProfile, TrainSetup

    machine = detect()
    curve = fit_curve("matmul.fp32", "flops", [(1e6, 1e-3), (1e9, 0.1)])
    save_profile(CalibrationProfile(
        fingerprint=fingerprint(machine, "cpu"), torch_version=torch.__version__,
        num_threads=2, backend="cpu", device_name="cpu", created_at="2026-01-01T00:00:00Z",
        preferred_dtype="fp32", curves={"matmul.fp32": curve}))
    setup = TrainSetup(method="full", weight_bits=32, compute_dtype="fp32",
                       mixed_precision=False, seq_len=16, num_devices=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        estimate, note = measure.predict(tiny_dense, setup, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert estimate is not None and note.startswith("calibrated"), note
