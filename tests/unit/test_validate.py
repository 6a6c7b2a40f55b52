"""The validation suite's composition, summary and per-op-class correction fit."""

import pytest

from estimator.errors import ConfigError
from estimator.specs.validation import CaseResult
from estimator.validate import fit_corrections, leave_one_out_errors, suite, summarize


def test_full_suite_covers_the_issue_matrix() -> None:
    ids = [c.case_id for c in suite("full")]
    assert len(ids) == len(set(ids)) == 20
    for part in ("tiny-moe", "smollm2", "small-vocab", "large-vocab", "-full-", "-lora-",
                 "-qlora-", "fp32", "bf16", "checkpointing", "no-mixed-precision",
                 "b4s128", "b1s512"):
        assert any(part in i for i in ids), part
    assert len(suite("quick")) == 3
    with pytest.raises(ConfigError):
        suite("huge")


def test_corrections_recover_per_class_factors() -> None:
    truth = {"matmul.bf16": 1.8, "memory": 1.2, "optimizer": 0.9}
    rows = []
    for i, (a, b, c) in enumerate([(1, 1, 1), (2, 1, 0.5), (1, 3, 1), (0.5, 1, 2), (3, 2, 1)]):
        pred = {"matmul.bf16": a, "memory": b, "optimizer": c, "tiny": 0.001}
        measured = sum(truth.get(k, 1.0) * v for k, v in pred.items())
        rows.append(CaseResult(case_id=str(i), measured_step_seconds=measured,
                               predicted_seconds_by_class=pred))
    fitted = fit_corrections(rows, ridge=0.0)
    assert set(fitted) == set(truth)  # 'tiny' is under 2 % everywhere: not fitted
    for k, v in truth.items():
        assert fitted[k] == pytest.approx(v, rel=1e-3)
    assert fit_corrections(rows[:3]) == {}
    shrunk = fit_corrections(rows)  # the ridge prior pulls every factor towards 1
    assert sum((shrunk[k] - 1) ** 2 for k in truth) < sum((v - 1) ** 2 for v in truth.values())
    assert all(abs(e) < 1e-3 for e in leave_one_out_errors(rows + rows[:2], ridge=0.0))


def test_summary_median_and_max() -> None:
    rows = [CaseResult(case_id="a", peak_error=0.02, step_error=-0.3),
            CaseResult(case_id="b", peak_error=-0.06, step_error=0.1),
            CaseResult(case_id="c", error="exit code 1")]
    report = summarize(rows, "quick", None)
    assert report.memory_median_error == pytest.approx(0.04)
    assert report.memory_max_error == pytest.approx(0.06)
    assert report.step_max_error == pytest.approx(0.3)
