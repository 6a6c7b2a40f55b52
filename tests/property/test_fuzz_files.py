"""Fuzz the files a user hands nvfree (issue 21), each mutated field by field as
fuzz_values.mutated_json does (a wrong type, a value out of range or non-finite, deep nesting,
a key removed or added, invalid UTF-8): a model's config.json (`estimate --model PATH`), this
machine's calibration profile (`estimate --device local`), and a JSONL data file (`plan --data`,
which reads it for the token budget). Every invocation exits 0 (strict JSON, no negative or
non-finite quantity) or 2 with one line — no traceback, in bounded time.

Budget: 60 examples per file kind in CI; benchmarks/fuzz_large.py sets more."""

import json
import time
from pathlib import Path

import pytest
from fuzz_values import EXAMPLES, bad_numbers, mutated_json, strict_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimator.cli.app import main

SECONDS_PER_RUN = 30.0
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
          "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}
MOE = {**CONFIG, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
       "num_local_experts": 8, "num_experts_per_tok": 2}
SETTINGS = settings(max_examples=EXAMPLES or 60, deadline=None, derandomize=EXAMPLES is None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


def answered_or_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> object:
    """Run the command; assert the properties; return its exit code."""
    capsys.readouterr()
    started, code = time.monotonic(), None
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert time.monotonic() - started < SECONDS_PER_RUN, args
    assert "Traceback" not in out + err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("nvfree: error:") and err.count("\n") == 1, err
    elif "--json" in args:
        assert not bad_numbers(strict_json(out)), bad_numbers(strict_json(out))[:3]
    return code


@pytest.fixture(scope="module")
def profile_json() -> dict:
    """A profile this machine accepts (its fingerprint, torch, threads and allocator)."""
    pytest.importorskip("torch")
    import torch

    from estimator.allocator import active_allocator
    from estimator.hardware.detect import detect, fingerprint, training_threads
    from estimator.specs.calibration import CalibrationProfile, EfficiencyCurve

    machine = detect()
    curve = EfficiencyCurve(op_class="matmul.fp32", unit="flops", log10_work=(6.0, 9.0),
                            rates=(1e9, 5e10), overhead_seconds=5e-6, num_samples=4)
    profile = CalibrationProfile(
        fingerprint=fingerprint(machine), torch_version=torch.__version__,
        num_threads=training_threads(machine), backend="cpu", device_name=machine.cpu_brand,
        created_at="2026-12-07T00:00:00Z", curves={"matmul.fp32": curve},
        allocator=active_allocator())
    return json.loads(profile.model_dump_json())


@SETTINGS
@given(data=st.data(), base=st.sampled_from([CONFIG, MOE]))
def test_a_mutated_config_json_is_answered_or_refused(data, base, tmp_path_factory,
                                                      capsys) -> None:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_bytes(data.draw(mutated_json(base)))
    answered_or_one_line(["estimate", "--model", str(path), "--json"], capsys)


@SETTINGS
@given(data=st.data())
def test_a_mutated_profile_is_answered_or_refused(data, profile_json, capsys) -> None:
    from estimator.hardware.profiles import profile_path
    from estimator.specs.calibration import CalibrationProfile

    path = profile_path(CalibrationProfile.model_validate(profile_json))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.draw(mutated_json(profile_json)))
    answered_or_one_line(["estimate", "--params", "1e8", "--device", "local", "--json"], capsys)


def test_the_unmutated_profile_is_used(profile_json, capsys) -> None:
    """The fuzz's base profile is one this machine takes: mutations are what is tested."""
    from estimator.hardware.profiles import profile_path
    from estimator.specs.calibration import CalibrationProfile

    path = profile_path(CalibrationProfile.model_validate(profile_json))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile_json))
    assert answered_or_one_line(["estimate", "--params", "1e8", "--device", "local", "--json"],
                                capsys) == 0
    assert "uncalibrated" not in capsys.readouterr().out


ROWS = [{"text": "the quick brown fox " * 20}, {"text": "jumps over the lazy dog " * 30},
        {"text": "ok"}]


@SETTINGS
@given(data=st.data())
def test_a_mutated_data_file_is_read_or_refused(data, tmp_path_factory, monkeypatch,
                                                capsys) -> None:
    from estimator import api

    monkeypatch.setattr(api, "quick_calibration", lambda *a, **k: None)
    root = tmp_path_factory.mktemp("data")
    lines = [json.dumps(r).encode() for r in ROWS]
    index = data.draw(st.integers(0, len(lines) - 1))
    lines[index] = data.draw(mutated_json(ROWS[index]))
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    answered_or_one_line(["plan", "--data", str(path), "-o", str(root / "plan.json"), "--json"],
                         capsys)


def test_config_bases_are_answered(tmp_path: Path, capsys) -> None:
    for base in (CONFIG, MOE):
        path = tmp_path / f"{base['model_type']}.json"
        path.write_text(json.dumps(base))
        assert answered_or_one_line(["estimate", "--model", str(path), "--json"], capsys) == 0


@pytest.mark.parametrize("change", [
    {"corrections": {"matmul.fp32": float("inf")}}, {"corrections": {"matmul.fp32": -2.0}},
    {"corrections": {"matmul.fp32": 0.0}}, {"corrections": {"no.such.class": 1e300}},
    {"curves": {"matmul.fp32": {"op_class": "matmul.fp32", "unit": "flops",
                                "log10_work": [6.0, 9.0], "rates": [-1.0, 0.0],
                                "overhead_seconds": -1.0, "num_samples": 4}}},
    {"curves": {"matmul.fp32": {"op_class": "matmul.fp32", "unit": "flops",
                                "log10_work": [9.0, 6.0], "rates": [1e300, 1e-300],
                                "overhead_seconds": 1e300, "num_samples": 4}}},
], ids=["correction-inf", "correction-negative", "correction-zero", "correction-unknown",
        "rates-negative", "rates-extreme"])
def test_a_profile_with_impossible_numbers_is_refused_or_gives_finite_times(
        change, profile_json, capsys) -> None:
    """Issue 21's report: a profile with infinite or negative corrections gave a null or
    negative step time."""
    from estimator.hardware.profiles import profile_path
    from estimator.specs.calibration import CalibrationProfile

    path = profile_path(CalibrationProfile.model_validate(profile_json))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**profile_json, **change}).replace("Infinity", "1e999"))
    answered_or_one_line(["estimate", "--params", "1e8", "--device", "local", "--json"], capsys)
