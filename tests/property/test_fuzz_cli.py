"""Fuzz the commands a user types (issue 21): estimate, compare, plan and train with 0–6 of
their own flags, each given a value drawn from plausible and hostile text (numbers out of range
or not numbers, garbage words, paths to a directory, a FIFO, a garbage or deeply nested file, a
valid tiny config.json). Every invocation ends with exit 0 (strict JSON under --json, no
negative or non-finite quantity) or exit 2 with one line on stderr — no traceback, in bounded
time. Where train would start training (every check passed), the trainer is replaced by a
marker; plan's quick calibration of this machine is replaced by a no-op.

Budget: 60 invocations per command in CI; benchmarks/fuzz_large.py runs 10,000 in all."""

import json
import os
import time

import pytest
import typer.main
from fuzz_values import (
    DEVICES,
    EXAMPLES,
    NUMBERS_TEXT,
    PRESETS,
    TYPICAL,
    WORDS,
    bad_numbers,
    strict_json,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from estimator.cli.app import app, main

pytestmark = pytest.mark.torch  # train's checks import the executor

COMMANDS = ("estimate", "compare", "plan", "train")
SECONDS_PER_RUN = 30.0
"""Generous bound on one invocation (estimate takes milliseconds, plan a few seconds)."""


class WouldTrain(Exception):
    """Raised where train would build the model: the command passed every check."""


def options(command: str) -> list[tuple[str, bool]]:
    """(flag, takes no value) of every option of a command, read from the app itself."""
    params = typer.main.get_command(app).commands[command].params
    out = []
    for p in params:
        for opt in [*p.opts, *getattr(p, "secondary_opts", [])]:
            if opt.startswith("--"):
                out.append((opt, bool(getattr(p, "is_flag", False))))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Paths a user may point a flag at, good and bad."""
    root = tmp_path_factory.mktemp("fuzz-files")
    (root / "dir").mkdir()
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 8)
    (root / "nested.json").write_text("[" * 10_000 + "]" * 10_000)
    (root / "empty.txt").write_text("")
    (root / "text.txt").write_text("hello world\n" * 200)
    (root / "data.jsonl").write_bytes(b'{"text": "ok"}\n{"text": 5}\n\xff\xfe\n[1,2]\n')
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 258, "max_position_embeddings": 256}
    (root / "config.json").write_text(json.dumps(config))
    os.mkfifo(root / "fifo")
    names = ["dir", "garbage.bin", "nested.json", "empty.txt", "text.txt", "data.jsonl",
             "config.json", "fifo", "missing.json"]
    return [str(root / n) for n in names]


@st.composite
def command_line(draw, files: list[str]) -> list[str]:
    """One command with 0–6 of its options, each with a value where it takes one."""
    command = draw(st.sampled_from(COMMANDS))
    anything = st.sampled_from(NUMBERS_TEXT + WORDS + PRESETS + DEVICES + files)
    args = [command]
    for flag, is_flag in draw(st.lists(st.sampled_from(options(command)), max_size=6)):
        typical = TYPICAL.get(flag.removeprefix("--").replace("-", "_"))
        if flag in ("--model", "--data"):
            typical = PRESETS[:3] + files if flag == "--model" else files
        value = anything if not typical or draw(st.integers(0, 3)) == 3 else \
            st.sampled_from([str(v) for v in typical])
        args += [flag] if is_flag else [flag, draw(value)]
    if command == "compare" and "--devices" not in args:  # not every device for a 560B
        args += ["--devices", draw(st.sampled_from(["mi300x", "m4-max,h100-sxm", "x,,y"]))]
    if command in ("estimate", "compare", "plan") and draw(st.booleans()):
        args.append("--json")
    return args


def invoke(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """Run the command in this process: (exit code or 'would train', stdout, stderr)."""
    capsys.readouterr()
    code: object = None
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    except WouldTrain:
        code = "would train"
    out, err = capsys.readouterr()
    return code, out, err


@settings(max_examples=EXAMPLES or 240, deadline=None, derandomize=EXAMPLES is None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_command_line_exits_0_or_2_with_one_line(data, files, tmp_path_factory,
                                                     monkeypatch, capsys) -> None:
    from estimator import api
    from estimator.executor import launcher
    from estimator.executor import train as executor_train

    def would_train(*args, **kwargs):
        raise WouldTrain

    monkeypatch.setattr(executor_train, "train_with_config", would_train)
    monkeypatch.setattr(launcher, "launch", would_train)
    monkeypatch.setattr(api, "quick_calibration", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    args = data.draw(command_line(files))
    started = time.monotonic()
    code, out, err = invoke(args, capsys)
    elapsed = time.monotonic() - started
    event(f"{args[0]}: {code}")  # --hypothesis-show-statistics counts the outcomes
    assert elapsed < SECONDS_PER_RUN, (elapsed, args)
    assert "Traceback" not in out + err, (args, err)
    assert code in (0, 2, "would train"), (code, args, err)
    if code == 2:
        assert err.startswith("nvfree: error:") and err.count("\n") == 1, (args, err)
    elif code == 0 and "--json" in args and args[0] != "train":
        answer = strict_json(out)
        assert not bad_numbers(answer), (args, bad_numbers(answer)[:3])


def test_every_fuzzed_command_has_options() -> None:
    """The fuzz reads the flags from the app: a renamed command would fuzz nothing."""
    for command in COMMANDS:
        assert len(options(command)) >= 10, command
