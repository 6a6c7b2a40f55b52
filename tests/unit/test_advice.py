"""advise(): the greedy combination drops earlier changes that later ones make unneeded."""

from estimator.analytic.advice import advise
from estimator.specs import MemoryBreakdown, TrainSetup

GIB = 2**30


def memory_of(setup: TrainSetup) -> MemoryBreakdown:
    """A toy memory model: 100 GiB, checkpointing −10, 8-bit AdamW −50, LoRA −60."""
    total = 100 - 10 * setup.checkpointing - 50 * (setup.optimizer == "adamw8bit") - 60 * (
        setup.method != "full")
    return MemoryBreakdown(components={"weights": total * GIB}, total_bytes=total * GIB,
                           capacity_bytes=80 * GIB, notes={})


def test_a_single_change_that_fits_is_not_repeated_as_a_combination():
    advice = advise(TrainSetup(method="full"), memory_of, 80 * GIB)
    changes = [a.change for a in advice]
    assert "--checkpointing --optimizer adamw8bit" not in changes
    assert "--optimizer adamw8bit" in changes and "--checkpointing" in changes


def test_a_needed_combination_is_kept():
    advice = advise(TrainSetup(method="full"), memory_of, 45 * GIB)
    assert advice[0].change == "--checkpointing --optimizer adamw8bit" and advice[0].fits
