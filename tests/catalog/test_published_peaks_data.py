"""data/published_peaks.toml: every row has its fields, and every usable row maps to a model, a
device and valid TrainSetup kwargs (benchmarks/published_peaks.py --check)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "published_peaks.py"


def load_script():
    spec = importlib.util.spec_from_file_location("published_peaks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_validate_and_map(capsys):
    assert load_script().main(["--check"]) == 0, capsys.readouterr().err


def test_enough_usable_measurements_from_several_projects():
    script = load_script()
    rows, _ = script.load()
    usable = [r for r in rows if r["usable"]]
    assert len(usable) >= 40
    assert len({r["project"] for r in usable}) >= 4
    assert all(r["kind"] == "measured" for r in usable)
