"""`nvfree train` and `nvfree run`: what a careless or hostile user can get wrong ends as one line
on stderr and exit code 2, before any model is built (issue 21)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.cli.app import main

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 258, "max_position_embeddings": 256}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("nvfree: error:"), err
    assert fragment in err, err


def _train(capsys, model: Path, out: Path, *args: str) -> tuple[int, str, str]:
    return cli(capsys, "train", "--model", str(model), "--dtype", "fp32", "--seq-len", "32",
               "--batch-size", "2", "--max-steps", "2", "-o", str(out), *args)


@pytest.mark.parametrize(("args", "fragment"), [
    (("--batch-size", str(10**18)), "batch_size"),
    (("--lr", "nan"), "--lr"),
    (("--seed", str(10**30)), "--seed"),
    (("--resume", "--restart"), "choose one"),
    (("--data", "/dev/zero"), "a device"),
], ids=["batch-1e18", "lr-nan", "seed-huge", "resume-and-restart", "data-device"])
def test_train_refuses_before_any_work(capsys, tmp_path, model, args, fragment):
    code, _, err = _train(capsys, model, tmp_path / "run", *args)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_into_a_file_or_a_fifo_is_one_line(capsys, tmp_path, model):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(*_train(capsys, model, a_file)[::2], "a file, not a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(*_train(capsys, model, tmp_path / "run", "--data", str(fifo))[::2],
                   "a FIFO")


def test_non_utf8_jsonl_data_is_one_line_with_no_progress_bar(capsys, tmp_path, model):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "\xff"}\n')
    code, _, err = _train(capsys, model, tmp_path / "run", "--data", str(data), "--json")
    one_line_error(code, err, "d.jsonl:1: not UTF-8 text")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 3000 + b"]" * 3000, "nested deeper"),
    (b'{"schema_version": 2, "model": 3}', "field 'created_at'"),
], ids=["not-utf8", "deep", "wrong-fields"])
def test_run_of_a_broken_plan_file_is_one_line(capsys, tmp_path, content, fragment):
    plan = tmp_path / "plan.json"
    plan.write_bytes(content)
    one_line_error(*cli(capsys, "run", str(plan), "-o", str(tmp_path / "run"))[::2], fragment)


def test_absurd_batch_in_a_fresh_process_has_no_traceback(tmp_path, model):
    done = subprocess.run(
        [sys.executable, "-m", "estimator", "train", "--model", str(model), "--batch-size",
         str(10**18), "-o", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    one_line_error(done.returncode, done.stderr, "batch_size")
