"""Plan files: round trip, one-line refusals of bad files, machine checks, data token counts."""

import json
from pathlib import Path

import pytest

from estimator.catalog import load_device
from estimator.errors import ConfigError
from estimator.planfile import count_data_tokens, load_plan, machine_problems, make_plan, save_plan
from estimator.planner import Constraints, search
from estimator.specs import ModelSpec, TrainSetup
from estimator.specs.plan import Plan


@pytest.fixture
def plan(tiny_dense: ModelSpec) -> Plan:
    device = load_device("xeon-platinum-8480plus")
    base = TrainSetup(framework="nvfree", seq_len=64, num_tokens=4096)
    result = search(tiny_dense, base, device, None, Constraints(global_batch=4))
    return make_plan(result, model=tiny_dense, model_source="tiny", data=None,
                     text_field="text", device=device, device_key="local", torch_device="cpu",
                     fingerprint="abc", profile=None, num_tokens=4096, objective="time")


def test_round_trip(plan: Plan, tmp_path: Path) -> None:
    path = save_plan(plan, tmp_path / "p.json")
    assert load_plan(path) == plan
    assert plan.setup.num_tokens == 4096 and plan.max_steps == 4096 // (4 * 64)
    assert plan.predicted_step_seconds == plan.candidates[0].step_seconds


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(surprise=1), "field 'surprise': Extra inputs are not permitted"),
    (lambda d: d["setup"].update(batch_size=-1), "field 'setup.batch_size'"),
    (lambda d: d.pop("model"), "field 'model': Field required"),
    (lambda d: d.update(schema_version=99), "plan schema version 99"),
])
def test_bad_fields_are_refused_in_one_line(plan: Plan, tmp_path: Path, edit, message) -> None:
    data = json.loads(plan.model_dump_json())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as exc:
        load_plan(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("content", ["{not json", "[]", ""])
def test_corrupted_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="not a plan file"):
        load_plan(path)
    with pytest.raises(ConfigError, match="no such plan file"):
        load_plan(tmp_path / "missing.json")


def test_machine_checks(plan: Plan) -> None:
    ok, notes = machine_problems(plan, fingerprint="abc", available_bytes=2**40, profile=None)
    assert ok == [] and notes == []
    too_big = plan.model_copy(update={"predicted_peak_bytes": plan.memory_limit_bytes + 1})
    refuse, _ = machine_problems(too_big, fingerprint="abc", available_bytes=2**50,
                                 profile=None)
    assert any("predicted not to fit" in r for r in refuse)
    refuse, _ = machine_problems(plan, fingerprint="other", available_bytes=1, profile=None)
    assert any("another machine" in r for r in refuse)
    assert any("available now" in r for r in refuse)


def test_count_data_tokens(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "abc"}\n\n{"text": "é"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\0" * 100)
    assert count_data_tokens(tmp_path) == (5 + 1) + (3 + 1) + (2 + 1)
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"c\.jsonl:1: no 'text' field"):
        count_data_tokens(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        count_data_tokens(tmp_path / "nope")


def test_check_writable_refuses_directories_foreign_files_and_full_disks(
        plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan --output` is checked before the search (issue 21): a directory, an existing file
    that is not a plan, an unwritable place or a full disk give one line; a plan is replaced."""
    import shutil

    import estimator.outputs as outputs
    from estimator.planfile import check_writable

    with pytest.raises(ConfigError, match="a directory; give a file name"):
        check_writable(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(ConfigError, match="not one nvfree wrote"):
        check_writable(notes)
    with pytest.raises(ConfigError, match="cannot write there"):
        check_writable(Path("/proc/nvfree-test/plan.json"))
    existing = save_plan(plan, tmp_path / "p.json")
    assert check_writable(existing) == existing
    assert check_writable(tmp_path / "new" / "p.json").parent.is_dir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage._replace(free=10))
    with pytest.raises(ConfigError, match="free on its disk"):
        check_writable(tmp_path / "q.json")


def test_plan_files_that_are_not_utf8_deep_or_special_are_one_line(tmp_path: Path) -> None:
    import os

    cases = {"bytes.json": b"\xff\xfe{}", "deep.json": b"[" * 5000 + b"]" * 5000,
             "deep2.json": b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match="not a plan file") as err:
            load_plan(tmp_path / name)
        assert "\n" not in str(err.value)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_plan(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="a FIFO"):
        count_data_tokens(tmp_path / "fifo")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: not UTF-8"):
        count_data_tokens(tmp_path / "bad.jsonl")
