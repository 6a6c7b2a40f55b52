"""The notebook conveniences on the specs: TrainSetup.tokens_per_micro_batch,
ModelSpec.num_params / num_active_params, Estimate.summary()."""

from estimator.analytic.params import count_params
from estimator.api import estimate
from estimator.catalog import load_model
from estimator.specs import TrainSetup


def test_tokens_per_micro_batch() -> None:
    setup = TrainSetup(batch_size=3, seq_len=512, grad_accum=4)
    assert setup.tokens_per_micro_batch == 1536
    assert setup.tokens_per_step == 4 * 1536


def test_num_params_is_count_params() -> None:
    for name in ("gpt2", "llama-3.1-8b", "mixtral-8x7b"):
        model = load_model(name)
        counts = count_params(model)
        assert model.num_params == counts.total
        assert model.num_active_params == counts.active_per_token
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.num_active_params < mixtral.num_params
    assert 46e9 < mixtral.num_params < 47.5e9  # published 46.7 B


def test_summary_is_flat_and_matches() -> None:
    est = estimate("llama-3.1-8b", device="h100-sxm", method="qlora", seq_len=1024)
    row = est.summary()
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in row.values())
    assert row["peak_bytes"] == est.memory.total_bytes
    assert row["step_seconds"] == est.throughput.step_seconds
    assert row["total_params"] == est.model.num_params == est.params.total
    assert (row["model"], row["device"], row["method"], row["seq_len"]) == (
        "llama-3.1-8b", "h100-sxm", "qlora", 1024)
    assert row["verdict"] == est.verdict and row["fits"] == est.memory.fits
