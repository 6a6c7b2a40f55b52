"""`nvfree plan` / `run` / `validate` at the command line: files, JSON, one-line refusals."""

import json
from pathlib import Path

import pytest

from estimator.cli.app import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_default_plan_writes_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    code, out, _ = run(capsys, "plan", "--no-calibrate", "--output", str(path))
    assert code == 0 and path.exists()
    data = json.loads(path.read_text())
    assert data["model"]["name"] == "smollm2-135m"
    assert data["setup"]["num_tokens"] == 32_768 and data["max_steps"] == 16
    assert "chosen" in out and f"nvfree run {path}" in out.replace("\n", "")


def test_plan_json_and_fixed_choices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "plan", "--no-calibrate", "--method", "qlora", "--dtype", "bf16",
                       "--no-checkpointing", "--tokens", "1e4", "--device", "mi300x",
                       "--objective", "cost", "-o", str(tmp_path / "p.json"), "--json")
    assert code == 0
    data = json.loads(out)
    assert {c["setup"]["method"] for c in data["candidates"]} == {"qlora"}
    assert data["device_key"] == "mi300x" and data["predicted_cost_usd"] > 0
    assert not any(c["setup"]["checkpointing"] for c in data["candidates"])


def test_plan_searches_device_counts(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    """--max-devices 16 on an 8-GPU node type: 1, 2, 4, 8, 16 devices are searched; a model
    that needs several devices gets a plan for several."""
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--device", "mi300x",
                       "--method", "full", "--max-devices", "16", "--nodes", "2",
                       "--global-batch", "64", "--seq-len", "4096", "--tokens", "1e7",
                       "--memory-limit", "100", "--top", "8", "-o", str(tmp_path / "p.json"),
                       "--json")
    assert code == 0
    data = json.loads(out)
    counts = {c["setup"]["num_devices"] for c in data["candidates"]}
    assert counts <= {1, 2, 4, 8, 16} and min(counts) > 1
    assert data["setup"]["num_devices"] in counts


@pytest.mark.parametrize(("args", "message"), [
    (("--memory-limit", "0.01"), "no candidate meets the constraints"),
    (("--global-batch", "3", "--tokens", "0"), "--tokens must be a finite number in [1, "),
    (("--data", "/nonexistent/corpus"), "no such file or directory"),
])
def test_plan_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    args: tuple[str, ...], message: str) -> None:
    code, _, err = run(capsys, "plan", "--no-calibrate", "-o", str(tmp_path / "p.json"), *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_run_refuses_bad_and_unfit_plans(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 2, "oops": true}')
    code, _, err = run(capsys, "run", str(bad))
    assert code == 2 and "bad.json: field" in err
    path = tmp_path / "p.json"
    assert run(capsys, "plan", "--no-calibrate", "-o", str(path), "--tokens", "1000")[0] == 0
    data = json.loads(path.read_text())
    data["predicted_peak_bytes"] = data["memory_limit_bytes"] + 1
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, "run", str(path), "-o", str(tmp_path / "out"))
    assert code == 2 and "predicted not to fit" in err and "--force" in err
    assert not (tmp_path / "out").exists()


def test_validate_rejects_unknown_suite(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "validate", "--suite", "huge")
    assert code == 2 and "huge" in err
