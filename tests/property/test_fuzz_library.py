"""Fuzz the library's entry points (issue 21): estimate, compare and plan called with any mix of
their arguments — right names with values of the wrong kind, non-finite and out-of-range
numbers, unknown names — either answer (strict JSON, no negative or non-finite quantity) or
raise an estimator.errors type with one line; never a TypeError, AttributeError or pydantic
ValidationError, never a hang.

Budget: 200 calls in CI; benchmarks/fuzz_large.py runs 10,000."""

import time

import pytest
from fuzz_values import EXAMPLES, PRESETS, any_value, bad_numbers, strict_json, value_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from estimator import api
from estimator.arguments import accepted
from estimator.errors import NvfreeError

SECONDS_PER_CALL = 30.0
"""Generous bound on one call (estimate takes milliseconds; a compare of every device ~1 s)."""

KINDS = {"estimate": ("params", "device", "method", "bits", "seq_len", "batch_size"),
         "compare": ("devices", "method", "tokens", "max_devices"),
         "plan": ("method", "seq_len", "global_batch", "tokens")}
"""Arguments drawn more often per entry point, so that more calls get past the first check."""


@st.composite
def call(draw):
    """(entry point, model, arguments): 0–5 arguments of that entry point, or an unknown one."""
    command = draw(st.sampled_from(sorted(KINDS)))
    names = sorted(set(accepted(command)) - {"model", "calibrate", "output", "setup", "profile"})
    chosen = draw(st.lists(st.sampled_from(names), max_size=5, unique=True))
    args = {name: draw(value_for(name)) for name in chosen}
    if draw(st.integers(0, 9)) == 9:  # hypothesis draws 0 (the simplest) most often
        args["no_such_arg"] = 1
    model = draw(st.sampled_from(PRESETS[:3]) if draw(st.integers(0, 3)) < 3 else
                 st.one_of(st.sampled_from([None, *PRESETS]), any_value))
    if command == "plan":
        args["calibrate"] = False  # the quick calibration measures this machine for ~25 s
    if command == "compare" and "devices" not in args:
        args["devices"] = draw(st.sampled_from(["mi300x", "m4-max,h100-sxm", "tpu-v5e"]))
    return command, model, args


def answer_or_typed_error(command: str, model, args: dict) -> None:
    """The properties of one call."""
    started = time.monotonic()
    try:
        result = getattr(api, command)(model, **args)
    except NvfreeError as exc:
        event(f"{command}: {type(exc).__name__}")  # --hypothesis-show-statistics counts them
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)
        return
    finally:
        assert time.monotonic() - started < SECONDS_PER_CALL, (command, model, args)
    event(f"{command}: answered")
    answer = strict_json(result.model_dump_json())
    assert not bad_numbers(answer), (command, model, args, bad_numbers(answer)[:3])


@settings(max_examples=EXAMPLES or 200, deadline=None, derandomize=EXAMPLES is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(call())
def test_any_library_call_answers_or_raises_a_typed_error(drawn) -> None:
    answer_or_typed_error(*drawn)


@pytest.mark.parametrize(("command", "args", "says"), [
    ("estimate", {"bits": "q_proj"}, "bits='q_proj'"),
    ("estimate", {"lora_rank": 3.7}, "lora_rank=3.7"),
    ("estimate", {"tokens": float("nan")}, "finite"),
    ("estimate", {"device": {}}, "device={}"),
    ("estimate", {"prices": "mi300x"}, "prices="),
    ("estimate", {"link_gbit_per_second": "fast"}, "link_gbit_per_second="),
    ("estimate", {"no_such_arg": 1}, "no argument no_such_arg"),
    ("plan", {"framework": "hf", "calibrate": False}, "no argument framework"),
    ("plan", {"method": 10**60, "calibrate": False}, "method="),
    ("compare", {"devices": 5}, "devices=5"),
    ("plan", {"output": "a\x00b", "calibrate": False}, "not a valid path"),
])
def test_the_reported_library_escapes_are_typed_errors(command, args, says) -> None:
    """The untyped exceptions found before this boundary (TypeError for an unknown argument,
    AttributeError for a dict as device or a string as prices, pydantic's ValidationError from
    plan, ValueError from int('q_proj')) are SetupErrors naming the argument."""
    with pytest.raises(NvfreeError, match=says.replace("(", r"\(").replace("[", r"\[")):
        getattr(api, command)("smollm2-135m", **args)
