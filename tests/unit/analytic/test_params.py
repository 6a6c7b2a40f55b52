"""Parameter counts against hand-computed values."""

import pytest

from estimator.analytic.params import count_params
from estimator.specs import MLASpec, ModelSpec, TrainSetup


def test_tiny_dense_by_hand(tiny_dense: ModelSpec) -> None:
    h, i, v, layers = 64, 128, 100, 2
    attention = h * 64 + 2 * h * 32 + 64 * h  # q 4·16, k/v 2·16, o
    mlp = 3 * h * i
    norms = (2 * layers + 1) * h
    expected = 2 * v * h + layers * (attention + mlp) + norms
    counts = count_params(tiny_dense)
    assert counts.total == expected
    assert counts.active_per_token == expected
    assert counts.trainable == expected
    assert counts.components["lm_head"] == v * h


def test_tied_embeddings_drop_lm_head(tiny_dense: ModelSpec) -> None:
    tied = tiny_dense.model_copy(update={"tied_embeddings": True})
    assert count_params(tiny_dense).total - count_params(tied).total == 100 * 64


def test_moe_total_and_active(tiny_moe: ModelSpec) -> None:
    h = 64
    expert = 3 * h * 32
    dense_layer = h * 64 + 2 * h * 32 + 64 * h + 3 * h * 128
    moe_layer = h * 64 + 2 * h * 32 + 64 * h + 4 * expert + h * 4  # 4 experts + router
    counts = count_params(tiny_moe)
    assert counts.total == 2 * 100 * h + dense_layer + 2 * moe_layer + 7 * h
    assert counts.total - counts.active_per_token == 2 * 2 * expert  # 2 unused experts × 2 layers


def test_lora_counts_targets(tiny_dense: ModelSpec) -> None:
    setup = TrainSetup(method="lora", lora_rank=4, lora_targets=("q_proj", "v_proj"))
    counts = count_params(tiny_dense, setup)
    assert counts.trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # per layer q + v


def test_mla_attention_by_hand() -> None:
    mla = MLASpec(q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2,
                  v_head_dim=4)
    spec = ModelSpec(name="mla", num_layers=1, hidden_size=32, intermediate_size=64,
                     num_heads=2, num_kv_heads=2, head_dim=6, vocab_size=10, mla=mla)
    attention = 32 * 8 + 8 * 2 * 6 + 32 * (6 + 2) + 6 * 2 * (4 + 4) + 2 * 4 * 32 + 8 + 6
    assert count_params(spec).components["attention"] == attention


@pytest.mark.parametrize("method,trainable", [("inference", 0), ("full", None)])
def test_trainable_by_method(tiny_dense: ModelSpec, method: str, trainable: int | None) -> None:
    counts = count_params(tiny_dense, TrainSetup(method=method))
    assert counts.trainable == (counts.total if trainable is None else trainable)
