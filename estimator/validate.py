"""`nvfree validate`: run a suite of configurations through the bundled trainer, each in a fresh
process, and compare measured peak memory and step time with the calibrated prediction.

Pure orchestration (no torch here): every case is `python -m estimator train … --json` in a
subprocess, whose RunReport carries both the measurement and the prediction for the same config
(estimator.executor.measure). Small models are written as Hugging Face config.json files so the
suite needs no download. Measured runs can feed back into the calibration profile as one
correction factor per op class (`fit_corrections`), never one global factor.
"""

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from estimator.errors import ConfigError
from estimator.specs import RunReport
from estimator.specs.validation import CaseResult, ValidationReport

CASE_TIMEOUT_SECONDS = 900
GOALS = {"memory_median": 0.05, "memory_max": 0.10, "step_median": 0.10, "step_max": 0.25}
"""Accuracy goals (|relative error|) of issue 5."""

TINY_MODELS: dict[str, dict] = {
    "small-vocab": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408,
                    "num_hidden_layers": 8, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "vocab_size": 8192,
                    "tie_word_embeddings": True},
    "large-vocab": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704,
                    "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 151936,
                    "tie_word_embeddings": True},
    "tiny-moe": {"model_type": "mixtral", "hidden_size": 384, "intermediate_size": 768,
                 "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "vocab_size": 8192, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "tie_word_embeddings": False},
}
"""Models written as config.json for the suite: small and large vocabularies, and an MoE."""


MOE_STEPS = 12
"""MoE runs take more steps: oneDNN compiles a kernel the first time an expert receives a new
(padded or cut) row count, which happens through the first ~6 steps (all 16 row counts of the
tiny MoE appeared within 6 steps); the median of 10 measured steps is then a steady step.
Measured: tiny-moe LoRA bf16 0.29–0.32 s per step after 4 warm-up steps, 0.47 s as the median
of steps 3–5."""


@dataclass(frozen=True)
class Case:
    """One validation run: a model and the `nvfree train` flags of its setup."""

    case_id: str
    model: str
    """Preset name or a TINY_MODELS key."""
    flags: tuple[str, ...]
    max_steps: int = 6


def _case(model: str, method: str, dtype: str, *extra: str, steps: int = 6,
          batch: int = 2, seq: int = 256) -> Case:
    flags = ("--method", method, "--dtype", dtype, "-b", str(batch), "-s", str(seq), *extra)
    name = "-".join([model, method, dtype, f"b{batch}s{seq}",
                     *(e.strip("-") for e in extra)])
    return Case(name, model, flags, steps)


def suite(name: str) -> list[Case]:
    """The quick suite (3 small runs, about a minute) or the full one (dense and MoE; full,
    LoRA, QLoRA; fp32, bf16 mixed and pure; checkpointing; vocabularies; batch/sequence)."""
    quick = [_case("small-vocab", "full", "fp32", steps=5),
             _case("small-vocab", "lora", "bf16", steps=5),
             _case("tiny-moe", "lora", "bf16", steps=MOE_STEPS)]
    if name == "quick":
        return quick
    if name != "full":
        raise ConfigError(f"unknown suite '{name}': quick or full")
    dense = "smollm2-135m"
    return [
        *quick,
        _case(dense, "full", "fp32"),
        _case(dense, "full", "bf16"),
        _case(dense, "full", "bf16", "--no-mixed-precision"),
        _case(dense, "full", "bf16", "--checkpointing"),
        _case(dense, "full", "bf16", "--optimizer-in-backward"),
        _case(dense, "lora", "fp32"),
        _case(dense, "lora", "bf16"),
        _case(dense, "lora", "bf16", "--checkpointing"),
        _case(dense, "lora", "bf16", batch=4, seq=128),
        _case(dense, "lora", "bf16", batch=1, seq=512),
        _case(dense, "qlora", "bf16"),
        _case("small-vocab", "full", "bf16", "--optimizer", "adamw8bit"),
        _case("large-vocab", "full", "bf16"),
        _case("large-vocab", "lora", "fp32"),
        _case("tiny-moe", "full", "fp32", steps=MOE_STEPS),
        _case("tiny-moe", "full", "bf16", steps=MOE_STEPS),
        _case("tiny-moe", "qlora", "bf16", steps=MOE_STEPS),
    ]


def model_argument(model: str, workdir: Path) -> str:
    """--model for a case: the preset name, or a config.json written under workdir."""
    if model not in TINY_MODELS:
        return model
    path = workdir / "models" / model / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"_name_or_path": model, **TINY_MODELS[model]}, indent=1))
    return str(path)


def run_case(case: Case, workdir: Path) -> RunReport | str:
    """Train the case in a fresh process; its RunReport, or the error line it died with."""
    out = workdir / "runs" / case.case_id
    cmd = [sys.executable, "-m", "estimator", "train", "--model",
           model_argument(case.model, workdir), *case.flags, "--max-steps",
           str(case.max_steps), "--output", str(out), "--json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=CASE_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {CASE_TIMEOUT_SECONDS} s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit code {done.returncode}"
    return RunReport.model_validate_json(done.stdout)


def case_result(case: Case, outcome: RunReport | str,
                predicted_by_class: Callable[[RunReport], dict[str, float]]) -> CaseResult:
    """One row of the error table from a run's report (or its failure)."""
    if isinstance(outcome, str):
        return CaseResult(case_id=case.case_id, error=outcome)
    total = next(t for t in outcome.memory_terms if t.name == "total_peak")
    return CaseResult(
        case_id=case.case_id, predicted_peak_bytes=total.predicted_bytes,
        measured_peak_bytes=total.measured_bytes, peak_error=total.relative_error,
        predicted_step_seconds=outcome.predicted_step_seconds,
        measured_step_seconds=outcome.step_seconds,
        step_error=outcome.step_seconds_relative_error, memory_terms=outcome.memory_terms,
        predicted_seconds_by_class=predicted_by_class(outcome))


def summarize(rows: list[CaseResult], suite_name: str, profile_id: str | None) -> ValidationReport:
    """Median and max |error| of memory and step time over the cases that ran."""
    mem = [abs(r.peak_error) for r in rows if r.peak_error is not None]
    step = [abs(r.step_error) for r in rows if r.step_error is not None]

    def stat(values: list[float], f: Callable) -> float | None:
        return float(f(values)) if values else None

    return ValidationReport(
        suite=suite_name, profile_id=profile_id, cases=tuple(rows),
        memory_median_error=stat(mem, statistics.median), memory_max_error=stat(mem, max),
        step_median_error=stat(step, statistics.median), step_max_error=stat(step, max),
        goals=GOALS)


RIDGE = 0.1
"""Weight of the prior 'no correction' (k = 1) per class in the fit. Without it the fit is
ill-conditioned (classes that always occur together trade off freely): on the 19-run suite it
returned matmul.bf16 ×0 and dispatch ×30 with no better out-of-sample error (docs/accuracy.md)."""


def fit_corrections(rows: list[CaseResult], *, min_cases: int = 4,
                    ridge: float = RIDGE) -> dict[str, float]:
    """One multiplicative correction per op class: non-negative least squares on relative
    errors with a ridge prior towards 1, minimise Σ_runs ((Σ_c k_c·p_rc − m_r) / m_r)²
    + ridge · Σ_c (k_c − 1)², k_c ≥ 0, where p_rc is the predicted seconds of op class c in run
    r and m_r the measured step time (Lawson & Hanson 1974 NNLS on the augmented system, solved
    by projected coordinate descent). Classes that carry under 2 % of every run's predicted
    time are left at 1 (the data cannot determine them)."""
    runs = [r for r in rows if r.measured_step_seconds and r.predicted_seconds_by_class]
    if len(runs) < min_cases:
        return {}
    classes = sorted({c for r in runs for c in r.predicted_seconds_by_class})
    p = np.array([[r.predicted_seconds_by_class.get(c, 0.0) for c in classes] for r in runs])
    m = np.array([r.measured_step_seconds for r in runs])
    share = p / p.sum(axis=1, keepdims=True)
    free = share.max(axis=0) >= 0.02
    a = p[:, free] / m[:, None]
    b = 1.0 - (p[:, ~free].sum(axis=1) / m)
    prior = np.sqrt(ridge) * np.eye(int(free.sum()))
    k = _nnls(np.vstack([a, prior]), np.concatenate([b, np.sqrt(ridge) * np.ones(len(prior))]))
    return {str(c): float(v) for c, v in zip(np.array(classes)[free], k, strict=True)}


def corrected_seconds(row: CaseResult, corrections: dict[str, float]) -> float:
    """The row's predicted step time with each op class scaled by its correction."""
    return sum(v * corrections.get(c, 1.0) for c, v in row.predicted_seconds_by_class.items())


def leave_one_out_errors(rows: list[CaseResult], *, ridge: float = RIDGE) -> list[float]:
    """Out-of-sample check of the corrections: each run predicted with corrections fitted on
    the other runs only; relative step-time errors (fraction)."""
    runs = [r for r in rows if r.measured_step_seconds and r.predicted_seconds_by_class]
    errors = []
    for i, row in enumerate(runs):
        k = fit_corrections(runs[:i] + runs[i + 1:], ridge=ridge)
        if k:
            m = row.measured_step_seconds or 0.0
            errors.append((corrected_seconds(row, k) - m) / m)
    return errors


def _nnls(a: np.ndarray, b: np.ndarray, iterations: int = 2000) -> np.ndarray:
    """min ‖a·k − b‖², k ≥ 0, by projected coordinate descent (exact per coordinate)."""
    k = np.ones(a.shape[1])
    norms = (a * a).sum(axis=0)
    for _ in range(iterations):
        for j in range(a.shape[1]):
            if norms[j] == 0:
                continue
            residual = b - a @ k + a[:, j] * k[j]
            k[j] = max(0.0, float(a[:, j] @ residual) / norms[j])
    return k
