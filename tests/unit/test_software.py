"""Software paths (issue 17, item 5): a method with no stack on a device is refused there and
the nearest one that runs is offered."""

from estimator.api import estimate
from estimator.catalog import read_toml
from estimator.catalog.software import nearest_method, runs, software_note
from estimator.planner.compare import compare_request


def test_qlora_has_no_stack_on_tpu_or_trainium() -> None:
    table = read_toml("software.toml")
    assert not runs("tpu-v5p", "qlora", table) and not runs("trainium2", "qlora", table)
    assert runs("mi300x", "qlora", table) and runs("tpu-v5p", "full", table)
    assert nearest_method("tpu-v5p", "qlora", table) == "lora"
    assert "nearest that runs: --method lora" in software_note("tpu-v5p", "qlora", table)


def test_compare_offers_the_nearest_method_in_the_row() -> None:
    option = compare_request("llama-3.1-8b", method="qlora", tokens=1e7,
                             devices=["tpu-v5e"]).options[0]
    assert option.method == "lora" and option.software is not None
    assert any("no stack runs qlora" in u for u in option.unknowns)


def test_estimate_says_so() -> None:
    est = estimate("llama-3.1-8b", device="tpu-v5e", method="qlora")
    assert any("no stack runs qlora" in a for a in est.assumptions)
