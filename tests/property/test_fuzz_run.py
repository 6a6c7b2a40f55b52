"""Fuzz `nvfree run` with plan files mutated field by field (issue 21): every mutated file either
passes the checks (and would train: the trainer and torchrun are replaced by a marker here) or
ends with exit code 2 and one line on stderr — no traceback, in bounded time, and never a model
built first.

Budget: 100 examples in CI; NVFREE_FUZZ_EXAMPLES=10000 for a long run (benchmarks/ may set it).
"""

import copy
import json
import os
import time

import pytest
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


def paths_of(value, prefix=()) -> list[tuple]:
    """Every key path into a JSON value (objects and arrays, the root excluded)."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out += paths_of(child, (*prefix, key))
    return out


WRONG_TYPES = [None, True, False, "x", "", [], {}, [1, 2], {"a": 1}, 1.5, 0, -1]
OUT_OF_RANGE = [-1, 0, -(10**30), 10**30, 2**63, 2**64, 10**400, 1e308, -1e308,
                float("inf"), float("-inf"), float("nan"), 1e-320]
MUTATIONS = ["type", "range", "nesting", "delete", "extra", "non_utf8", "string"]


def _set(data, path, value) -> None:
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(data, path) -> None:
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


@st.composite
def mutated_plan(draw, base: dict) -> bytes:
    """The plan with one field changed: a wrong type, a value out of range, deep nesting, the
    key removed, an unknown key beside it, or its text made invalid UTF-8."""
    data = copy.deepcopy(base)
    path = draw(st.sampled_from(paths_of(data)))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "type":
        _set(data, path, draw(st.sampled_from(WRONG_TYPES)))
    elif kind == "range":
        _set(data, path, draw(st.sampled_from(OUT_OF_RANGE)))
    elif kind == "nesting":
        depth = draw(st.sampled_from([2, 50, 65, 200, 5000, 100_000]))
        _set(data, path, "\u0000NEST\u0000")
    elif kind == "delete":
        _delete(data, path)
    elif kind == "extra":
        _set(data, (*path[:-1], "unexpected_field"), 1) if isinstance(path[-1], str) else \
            _set(data, path, {"unexpected_field": 1})
    elif kind == "string":
        _set(data, path, draw(st.text(max_size=300)))
    else:
        _set(data, path, "\u0000MARK\u0000")
    raw = json.dumps(data, indent=1).encode()  # NaN/Infinity as the non-strict tokens
    if kind == "nesting":
        raw = raw.replace(b'"\\u0000NEST\\u0000"', b"[" * depth + b"1" + b"]" * depth)
    return raw.replace(b'"\\u0000MARK\\u0000"', b'"\xff\xfe\xc3"')


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
    plan.write_bytes(data.draw(mutated_plan(base_plan)))
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
