"""Fuzz `nvfree run` with plan files mutated field by field (issue 21): every mutated file either
passes the checks (and would train: the trainer and torchrun are replaced by a marker here) or
ends with exit code 2 and one line on stderr — no traceback, in bounded time, and never a model
built first.

Budget: 100 examples in CI; NVFREE_FUZZ_EXAMPLES=10000 for a long run (benchmarks/ may set it).
"""

import json
import os
import time

import pytest
from fuzz_values import mutated_json, paths_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.torch

EXAMPLES = int(os.environ.get("NVFREE_FUZZ_EXAMPLES", "100"))
SECONDS_PER_RUN = 30.0
"""Generous bound on one refused or accepted run (the checks take well under a second alone)."""


class WouldTrain(Exception):
    """Raised where the trainer would build the model: the plan passed every check."""


@pytest.fixture(scope="module")
def base_plan(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A valid plan for this machine (a tiny LoRA run), as JSON."""
    from estimator.hardware import detect, fingerprint, local_device
    from estimator.planfile import make_plan
    from estimator.planner import Constraints, search
    from estimator.specs import ModelSpec, TrainSetup

    spec = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176,
                     num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
    machine = detect()
    device = local_device(machine)
    result = search(spec, TrainSetup(framework="nvfree", seq_len=32, num_tokens=256), device,
                    None, Constraints(global_batch=2, methods=("lora",),
                                      precisions=(("fp32", False),), optimizers=("adamw",),
                                      checkpointing=(False,), top=2))
    plan = make_plan(result, model=spec, model_source="tiny", data=None, text_field="text",
                     device=device, device_key="local", torch_device="cpu",
                     fingerprint=fingerprint(machine), profile=None, num_tokens=256,
                     objective="time")
    return json.loads(plan.model_dump_json())


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_run_of_a_mutated_plan_is_exit_2_and_one_line_or_would_train(
        data, base_plan, tmp_path_factory, monkeypatch, capsys):
    from estimator.cli.app import main
    from estimator.executor import launcher
    from estimator.executor import train as executor_train

    def would_train(*args, **kwargs):
        raise WouldTrain

    monkeypatch.setattr(executor_train, "train_with_config", would_train)
    monkeypatch.setattr(launcher, "launch", would_train)
    root = tmp_path_factory.mktemp("fuzz")
    plan = root / "plan.json"
    plan.write_bytes(data.draw(mutated_json(base_plan)))
    capsys.readouterr()
    started = time.monotonic()
    code: object = None
    try:
        main(["run", str(plan), "-o", str(root / "run")])
    except SystemExit as exc:
        code = exc.code
    except WouldTrain:
        code = "would train"
    elapsed = time.monotonic() - started
    _, err = capsys.readouterr()
    assert elapsed < SECONDS_PER_RUN, (elapsed, plan.read_bytes()[:300])
    assert code in (2, "would train"), (code, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("nvfree: error:"), err
        assert "Traceback" not in err
    assert not (root / "run" / "checkpoints").exists()


def test_the_unmutated_plan_would_train(base_plan, tmp_path, monkeypatch):
    """The fuzz's base is a plan that passes: mutations are what gets refused."""
    from estimator.cli.app import main
    from estimator.executor import train as executor_train

    def would_train(*args, **kwargs):
        raise WouldTrain

    monkeypatch.setattr(executor_train, "train_with_config", would_train)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(base_plan))
    with pytest.raises(WouldTrain):
        main(["run", str(plan), "-o", str(tmp_path / "run")])


def test_mutations_cover_every_field(base_plan):
    """Every top-level field and every field of model and setup can be drawn."""
    found = {p for p in paths_of(base_plan) if len(p) <= 2}
    assert {("model", "vocab_size"), ("setup", "batch_size"), ("max_steps",)} <= found
