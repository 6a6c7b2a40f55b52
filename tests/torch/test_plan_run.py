"""The default plan-then-run pipeline end to end (short version), resume of a plan's run, and
one validation case in a fresh process."""

import json
from pathlib import Path

import pytest

from estimator.cli.app import main
from estimator.specs import RunReport
from estimator.validation import Case, case_result, run_case

pytestmark = pytest.mark.torch

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "tie_word_embeddings": True}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_plan_then_run_then_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY))
    plan = tmp_path / "plan.json"
    code, _, err = cli(capsys, "plan", "--model", str(config), "--seq-len", "32",
                       "--global-batch", "2", "--tokens", "256", "--method", "lora",
                       "-o", str(plan))
    assert code == 0, err
    assert "measuring one (calibrate --quick)" in err  # no profile yet: the plan calibrates
    data = json.loads(plan.read_text())
    steps = data["max_steps"]
    # a busy machine (other jobs on the cores) refuses the disturbed profile, and says so
    stored = "calibration not stored" not in err
    assert steps == 4 and (data["profile_id"] is not None) == stored
    out_dir = tmp_path / "run"
    code, out, err = cli(capsys, "run", str(plan), "-o", str(out_dir), "--json")
    assert code == 0, err
    report = RunReport.model_validate_json(out)
    assert report.num_steps == steps and report.setup.method == "lora"
    assert report.predicted_step_seconds is not None and report.peak_bytes > 0
    assert (out_dir / "run_report.json").exists()
    code, out, err = cli(capsys, "run", str(plan), "-o", str(out_dir), "--json")
    assert code == 0 and "resuming" in err
    assert RunReport.model_validate_json(out).num_steps == steps


def test_one_validation_case_in_a_subprocess(tmp_path: Path) -> None:
    case = Case("tiny-lora", "small-vocab", ("--method", "lora", "--dtype", "fp32", "-b", "1",
                                             "-s", "32"), max_steps=3)
    outcome = run_case(case, tmp_path)
    assert isinstance(outcome, RunReport), outcome
    row = case_result(case, outcome, lambda r: {"matmul.fp32": 1.0})
    assert row.measured_peak_bytes and row.predicted_peak_bytes and row.peak_error is not None
    assert row.measured_step_seconds and row.predicted_step_seconds
