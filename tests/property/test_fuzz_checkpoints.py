"""Fuzz resuming from a checkpoint directory with one file of one checkpoint damaged (issue 21):
truncated, extended, emptied, deleted, replaced by a directory, its first bytes overwritten, or
(state.json, adapter_config.json) a field mutated as fuzz_values.mutated_json does. `train
--resume` either resumes from a checkpoint that loads — never from step 0 while a good one is
there — and, when the damage is one a loader can see, continues the uninterrupted run's loss
curve exactly; or stops with one line naming the checkpoints. Never a traceback.

A byte changed inside a tensor's data, or a field of state.json changed to another valid value
(a data position, an RNG state), is not detectable: checkpoints carry sizes, not checksums
(docs/training.md, "Checkpoints and resume"). Those mutations are checked for the first
property only.

Budget: 12 resumes in CI (each trains a tiny model for 1–3 steps); benchmarks/fuzz_large.py
sets more."""

import json
import shutil
from pathlib import Path

import pytest
from fuzz_values import EXAMPLES, mutated_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimator.errors import NvfreeError

pytestmark = pytest.mark.torch

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
MUTATIONS = ["truncate", "extend", "empty", "delete", "directory", "header", "json"]
VISIBLE = {"truncate", "extend", "empty", "delete", "directory", "header"}
"""Damage a loader sees (sizes, safetensors headers, JSON): the curve must stay exact."""


def _train(out: Path, data: Path, **changes):
    from estimator.executor import runner
    from estimator.executor.config import TrainConfig
    from estimator.specs import ModelSpec, TrainSetup

    tiny = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176,
                     num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
    setup = TrainSetup(framework="nvfree", method="lora", compute_dtype="fp32", weight_bits=32,
                       batch_size=2, seq_len=32, lora_rank=4)
    config = TrainConfig(**{"max_steps": 3, "output_dir": out, "data": data, "lr": 3e-3,
                            "predict": False, "checkpoint_every": 1, "keep_checkpoints": 3,
                            **changes})
    return runner.train(tiny, setup, config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[float, ...]]:
    """(a 4-step run's checkpoints at steps 1–3 — as if killed before step 4 was saved —, its
    data, its losses): a resume to step 4 from any of them continues the same schedule."""
    root = tmp_path_factory.mktemp("ckpt-fuzz")
    data = root / "words.txt"
    data.write_text("\n".join(" ".join(WORDS[(i * 7 + j * 3) % 10] for j in range(12))
                              for i in range(300)))
    straight = _train(root / "base", data, max_steps=4, keep_checkpoints=4).report.losses
    shutil.rmtree(root / "base" / "checkpoints" / "step_00000004")
    return root / "base", data, straight


def damage(path: Path, kind: str, draw) -> None:
    """One mutation of one file."""
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[:draw(st.integers(0, max(0, path.stat().st_size - 1)))])
    elif kind == "extend":
        path.write_bytes(path.read_bytes() + b"\0" * draw(st.integers(1, 64)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "delete":
        path.unlink()
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    elif kind == "header":
        raw = path.read_bytes()
        n = min(len(raw), draw(st.integers(1, 64)))
        path.write_bytes(b"\xff" * n + raw[n:])
    elif path.suffix == ".json":
        path.write_bytes(draw(mutated_json(json.loads(path.read_text()))))
    else:  # a byte inside the file (a tensor's data, most likely)
        raw = bytearray(path.read_bytes())
        raw[draw(st.integers(0, len(raw) - 1))] ^= 0x5A
        path.write_bytes(bytes(raw))


@settings(max_examples=EXAMPLES or 12, deadline=None, derandomize=EXAMPLES is None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_resume_with_one_damaged_file_resumes_from_a_good_checkpoint_or_says_so(
        data, runs, tmp_path_factory) -> None:
    base, corpus, straight = runs
    out = tmp_path_factory.mktemp("resume") / "run"
    shutil.copytree(base, out)
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    target = data.draw(st.sampled_from(checkpoints))
    files = sorted(p for p in target.rglob("*") if p.is_file())
    file = data.draw(st.sampled_from(files))
    kind = data.draw(st.sampled_from(MUTATIONS))
    damage(file, kind, data.draw)
    try:
        report = _train(out, corpus, max_steps=4, resume=True).report
    except NvfreeError as exc:  # only when nothing loads: here two good checkpoints remain
        pytest.fail(f"{kind} of {file.relative_to(out)} stopped the resume: {exc}")
    assert report.start_step >= 1, (kind, file)
    if kind in VISIBLE:
        assert report.losses == straight, (kind, file.relative_to(out), report.message)


def test_a_damaged_newest_checkpoint_is_named_and_skipped(runs, tmp_path) -> None:
    """The fuzz's property on one fixed case: the newest weights truncated."""
    base, corpus, straight = runs
    out = tmp_path / "run"
    shutil.copytree(base, out)
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    weights = next(newest.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    report = _train(out, corpus, max_steps=4, resume=True).report
    assert report.start_step == 2 and report.losses == straight
    assert newest.name in report.message
