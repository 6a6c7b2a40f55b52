"""Shared fixtures and the --update-golden switch."""

import pytest

from estimator.specs import ModelSpec, MoESpec


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.json from the current estimator")


@pytest.fixture(autouse=True)
def private_profile_cache(tmp_path_factory: pytest.TempPathFactory,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees (or writes) the user's calibration profiles: a stored profile would change
    what `--device local` predicts."""
    monkeypatch.setenv("NVFREE_CACHE_DIR", str(tmp_path_factory.mktemp("nvfree-cache")))


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture
def tiny_dense() -> ModelSpec:
    """2 layers, h=64, 4 heads of 16 with 2 KV heads, SwiGLU 128, vocab 100."""
    return ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=128,
                     num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=100)


@pytest.fixture
def tiny_moe(tiny_dense: ModelSpec) -> ModelSpec:
    """tiny_dense with 4 experts of width 32, top-2, one leading dense layer."""
    return tiny_dense.model_copy(update={"num_layers": 3, "moe": MoESpec(
        num_experts=4, num_experts_per_token=2, expert_intermediate_size=32,
        num_dense_layers=1)})


@pytest.fixture
def assert_planner_equals_estimate():
    """Check that the planner's array step times (planner.step_seconds) equal the exact
    per-setup path (planner.timing._exact_seconds) at each (micro-batch, accumulation)."""
    import numpy as np

    from estimator.planner import step_seconds
    from estimator.planner.timing import _exact_seconds

    def check(model, setup, device, batches, accums, profile=None) -> None:
        batches, accums = np.asarray(batches), np.asarray(accums)
        fast = step_seconds(model, setup, device, profile, batches, accums)
        exact = [_exact_seconds(model, setup, device, profile, b, a)
                 for b, a in zip(batches, accums, strict=True)]
        np.testing.assert_allclose(fast, exact, rtol=1e-9)

    return check

