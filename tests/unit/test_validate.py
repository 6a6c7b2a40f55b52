"""The validation suite's composition, summary and per-op-class correction fit."""

import pytest

from estimator.errors import ConfigError
from estimator.specs import TrainSetup
from estimator.specs.validation import CaseResult
from estimator.validation import (
    Budget,
    fit_corrections,
    leave_one_out_errors,
    random_suite,
    suite,
    summarize,
)


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


# ----------------------------------------------------------------------------- random suite

def _fake_predict(model, setup):
    """Peak and step time that grow with the configuration (deterministic, no machine)."""
    tokens = setup.tokens_per_micro_batch
    size = model.hidden_size * model.num_layers * (model.vocab_size / 1e4)
    return int(size * tokens * 50), size * tokens * 2e-8


BUDGET = Budget(memory_bytes=4 * 2**30, case_seconds=60.0)


def test_random_suite_is_deterministic_per_seed() -> None:
    first, skipped_first = random_suite(7, 6, BUDGET, _fake_predict)
    again, skipped_again = random_suite(7, 6, BUDGET, _fake_predict)
    other, _ = random_suite(8, 6, BUDGET, _fake_predict)
    assert [c.case_id for c in first] == [c.case_id for c in again] and len(first) == 6
    assert [c.config for c in first] == [c.config for c in again]
    assert skipped_first == skipped_again
    assert [c.case_id for c in first] != [c.case_id for c in other]


def test_random_draws_stay_within_bounds() -> None:
    import random

    from estimator.catalog.hf import spec_from_hf_dict
    from estimator.validation_suites import BOUNDS, draw_model, draw_setup

    rng = random.Random(0)
    kinds, methods, dtypes = set(), set(), set()
    for _ in range(300):
        config = draw_model(rng)
        model = spec_from_hf_dict(config, source="test", name="t")
        setup = draw_setup(rng, model)
        assert BOUNDS.hidden[0] <= model.hidden_size <= BOUNDS.hidden[1]
        assert model.hidden_size % 64 == 0 and model.intermediate_size % 64 == 0
        assert BOUNDS.layers[0] <= model.num_layers <= BOUNDS.layers[1]
        assert BOUNDS.vocab[0] <= model.vocab_size <= BOUNDS.vocab[1]
        assert model.num_heads % model.num_kv_heads == 0
        assert model.num_heads * model.head_dim == model.hidden_size
        assert setup.batch_size in BOUNDS.batches and setup.seq_len in BOUNDS.seqs
        assert setup.lora_targets and setup.lora_rank <= model.hidden_size
        assert setup.weight_bits == (4 if setup.method == "qlora" else
                                     32 if setup.compute_dtype == "fp32" else 16)
        kinds.add((model.moe is not None, model.tied_embeddings))
        methods.add(setup.method)
        dtypes.add((setup.compute_dtype, setup.mixed_precision))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}
    assert methods == {"full", "lora", "qlora"}
    assert dtypes == {("fp32", False), ("bf16", True), ("bf16", False)}


def test_random_suite_skips_what_its_own_prediction_says_is_too_big_or_slow() -> None:
    tight = Budget(memory_bytes=300 * 2**20, case_seconds=20.0)
    cases, skipped = random_suite(3, 5, tight, _fake_predict)
    assert len(cases) == 5 and skipped
    for case in cases:
        from estimator.catalog.hf import spec_from_hf_dict

        model = spec_from_hf_dict(case.config, source="t", name="t")
        batch, seq = int(case.flags[case.flags.index("-b") + 1]), int(
            case.flags[case.flags.index("-s") + 1])
        size = model.hidden_size * model.num_layers * model.vocab_size / 1e4
        assert size * batch * seq * 50 <= tight.memory_bytes
        assert tight.startup_seconds + case.max_steps * size * batch * seq * 2e-8 <= 20.0
    assert any("over the budget" in line for line in skipped)


def test_random_suite_draws_only_what_the_trainer_runs() -> None:
    """Every drawn case passes the trainer's own limits (a lion draw was refused by the
    trainer after its model was built, 5 of 40 cases of a real suite); lion is estimated
    only, reported by trainer_limits and refused before anything is built."""
    from estimator.catalog.hf import spec_from_hf_dict
    from estimator.checks import trainer_limits
    from estimator.errors import SetupError
    from estimator.executor.checks import check_method

    cases, _ = random_suite(8, 12, BUDGET, _fake_predict)
    for case in cases:
        assert "lion" not in case.flags
    model = spec_from_hf_dict(cases[0].config, source="t", name="t")
    lion = TrainSetup(optimizer="lion")
    assert any("lion" in line for line in trainer_limits(model, lion))
    with pytest.raises(SetupError, match="no lion optimizer"):
        check_method(model, lion)


def test_drawn_flags_build_the_drawn_setup() -> None:
    """What `nvfree train` builds from a case's flags is the setup the budget was checked
    on (cli/options.resolve_setup)."""
    import random

    from estimator.catalog.hf import spec_from_hf_dict
    from estimator.cli.options import resolve_setup
    from estimator.validation_suites import draw_model, draw_setup, setup_flags

    rng = random.Random(11)
    for _ in range(40):
        model = spec_from_hf_dict(draw_model(rng), source="t", name="t")
        setup = draw_setup(rng, model)
        flags = dict(zip(setup_flags(setup)[::2], setup_flags(setup)[1::2], strict=False))
        rebuilt = resolve_setup(
            method=setup.method, bits=None, dtype=setup.compute_dtype, device=None,
            profile=None, lora_targets=",".join(setup.lora_targets), tokens=None,
            mixed_precision="--no-mixed-precision" not in setup_flags(setup),
            framework="nvfree", optimizer=setup.optimizer, batch_size=setup.batch_size,
            seq_len=setup.seq_len, checkpointing="--checkpointing" in setup_flags(setup),
            lora_rank=setup.lora_rank, lora_alpha=setup.lora_alpha)
        assert rebuilt == setup, flags


def test_random_suite_with_the_real_estimate() -> None:
    """Every draw is estimable on a catalogue CPU (kept or skipped with a reason)."""
    from estimator.catalog import load_device
    from estimator.validation import predictor

    cases, skipped = random_suite(0, 4, BUDGET, predictor(load_device("epyc-9654"), None))
    assert len(cases) == 4
    assert all(" over the budget" in s or s.startswith("draw ") for s in skipped)


def test_summary_quartiles_and_signed_median() -> None:
    rows = [CaseResult(case_id=str(i), peak_error=e, step_error=-2 * e)
            for i, e in enumerate([0.01, -0.02, 0.03, -0.04, 0.05])]
    report = summarize(rows, "random", None)
    assert report.memory_quartiles == pytest.approx((0.02, 0.03, 0.04))
    assert report.step_quartiles == pytest.approx((0.04, 0.06, 0.08))
    assert report.memory_median_signed_error == pytest.approx(0.01)
    assert report.step_median_signed_error == pytest.approx(-0.02)
