"""`nvfree train --compile`: compiled blocks train like eager ones, the report says compiled,
resume works, and a missing or failing C++ compiler is one line with exit code 2.

The first compile of the tiny model takes 10–60 s on 2 shared cores with a cold inductor cache
(a few seconds warm); the later compiled runs in this module reuse it in-process."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.executor import measure
from estimator.executor.train import train
from estimator.specs import ModelSpec, TrainSetup

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]

TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
SETUP = TrainSetup(method="lora", compute_dtype="fp32", batch_size=2, seq_len=32, lora_rank=4)
COMMON = {"lr": 3e-3, "predict": False}
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 258, "max_position_embeddings": 256}


@pytest.mark.slow
def test_compiled_lora_trains_like_eager_and_the_report_says_compiled(text_file, tmp_path):
    eager = train(TINY, SETUP, max_steps=3, output_dir=tmp_path / "eager", data=text_file,
                  **COMMON)
    compiled = train(TINY, SETUP, max_steps=3, output_dir=tmp_path / "compiled",
                     data=text_file, compile=True, **COMMON)
    assert all(math.isfinite(x) for x in compiled.losses)
    assert compiled.losses[-1] < compiled.losses[0]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert compiled.compiled and not eager.compiled
    assert "predicted for eager execution" in compiled.prediction_note
    assert "step 1 compiled (left out of the step time)" in compiled.prediction_note
    saved = json.loads((tmp_path / "compiled" / "run_report.json").read_text())
    assert saved["compiled"] is True


def test_step_time_median_leaves_out_compiling_steps():
    seconds = [60.0, 30.0, 1.0, 20.0, 2.0, 3.0]  # steps 1–2 warm up, step 4 recompiled
    assert measure.median_step_seconds(seconds, skip={3}) == 2.0
    assert measure.median_step_seconds([60.0], skip={0}) == 60.0  # nothing else to time


def _interrupt_at(step_to_stop: int):
    def on_progress(progress):
        if progress.step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
    return on_progress


@pytest.mark.slow
def test_compiled_resume_reproduces_the_compiled_loss_curve(text_file, tmp_path):
    common = {"max_steps": 4, "data": text_file, "compile": True, **COMMON}
    straight = train(TINY, SETUP, output_dir=tmp_path / "a", **common)
    stopped = train(TINY, SETUP, output_dir=tmp_path / "b", on_progress=_interrupt_at(2),
                    **common)
    assert stopped.stop_reason == "interrupted" and stopped.num_steps == 2
    resumed = train(TINY, SETUP, output_dir=tmp_path / "b", resume=True, **common)
    assert resumed.start_step == 2 and resumed.compiled
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)


def _nvfree_compiled(tmp_path: Path, text_file: Path, env: dict[str, str]
                     ) -> subprocess.CompletedProcess:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    args = ["train", "--model", str(config), "--dtype", "fp32", "--batch-size", "2",
            "--seq-len", "32", "--max-steps", "2", "--data", str(text_file), "--output",
            str(tmp_path / "run"), "--compile"]
    return subprocess.run([sys.executable, "-m", "estimator", *args], text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_cli_compile_without_a_cpp_compiler_is_one_line_exit_2(text_file, tmp_path):
    # inductor reads $CXX when it is imported: a path that does not exist is a missing compiler
    done = _nvfree_compiled(tmp_path, text_file, {"CXX": str(tmp_path / "no-such-g++")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "--compile needs a C++ compiler" in done.stderr


@pytest.mark.slow
def test_cli_compile_with_a_failing_cpp_compiler_is_one_line_exit_2(text_file, tmp_path):
    # a compiler that answers --version but fails every build: the compile fails inside the
    # first step (a fresh inductor cache, so no cached kernel hides it)
    fake = tmp_path / "fake-g++"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (fake) 12.2.0"; '
                    'exit 0; fi\necho "fake: cannot compile" >&2\nexit 1\n')
    fake.chmod(0o755)
    done = _nvfree_compiled(tmp_path, text_file, {
        "CXX": str(fake), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "torch.compile failed" in done.stderr and "fake: cannot compile" in done.stderr
