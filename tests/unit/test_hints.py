"""The headline hint (issue 17, item 7): --params near a preset names it."""

from estimator.api import estimate
from estimator.request import preset_hints


def test_the_seed_56b_names_longcat() -> None:
    hints = preset_hints(56e9)
    assert hints and hints[0].startswith("longcat-flash has 560B total / ~27B active")
    assert "--model longcat-flash" in hints[0]


def test_active_count_matches_and_nothing_far_away() -> None:
    assert any("longcat-flash" in h for h in preset_hints(27e9))
    assert preset_hints(1e13) == []


def test_estimate_carries_the_hints() -> None:
    est = estimate(params=56e9, bits="4", device="mi300x")
    assert any("longcat-flash" in h for h in est.hints)
    assert not any("this machine" in h for h in est.hints)
