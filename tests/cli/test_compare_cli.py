"""`nvfree compare`: table, JSON contract, one-line errors with exit 2, --plot."""

import json
import sys

import pytest

from estimator.cli.app import main

DEVICES = ["--devices", "h100-sxm,mi300x,rtx-4090,ryzen-9-7950x"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_table_names_devices_time_and_cost(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--model", "llama-3.1-8b", "--method", "qlora",
                       "--tokens", "1e8", *DEVICES)
    assert code == 0
    for name in ("h100-sxm", "mi300x", "rtx-4090", "ryzen-9-7950x", "Free tiers", "Kaggle"):
        assert name in out
    assert "$" in out and "qlora4" in out


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--model", "llama-3.1-8b", "--tokens", "1e7",
                       "--objective", "cost", "--json", *DEVICES)
    assert code == 0
    data = json.loads(out)
    assert data["objective"] == "cost" and len(data["options"]) == 4
    assert "fewest devices" in data["method_rule"]  # no --method: recommended per device
    first = data["options"][0]
    assert first["cost_usd"] is not None and first["num_devices"] >= 1
    assert {"total_seconds", "unknowns", "sources", "memory_components"} <= set(first)


def test_inference_reports_prefill_and_decode(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--model", "llama-3.1-8b", "--method", "inference",
                       "--bits", "4", "--json", "--devices", "ryzen-9-7950x")
    assert code == 0
    option = json.loads(out)["options"][0]
    assert option["tokens_per_second"] > option["decode_tokens_per_second"] > 0


def test_bad_device_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "compare", "--model", "llama-3.1-8b", "--devices",
                         "h100-sxm,h100-pcie-x")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "unknown device 'h100-pcie-x'" in err


def test_plot_without_matplotlib_prints_the_answer_and_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    code, out, err = run(capsys, "compare", "--model", "llama-3.1-8b", "--devices", "h100-sxm",
                         "--plot", str(tmp_path / "c.png"))
    assert code == 0 and "h100-sxm" in out  # the table still prints
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("plot skipped: ") and "pip install" in err and "matplotlib" in err
    assert not (tmp_path / "c.png").exists()


def test_plot_with_a_wrong_suffix_is_one_line_exit_2(capsys: pytest.CaptureFixture[str],
                                                      tmp_path) -> None:
    code, out, err = run(capsys, "compare", "--model", "llama-3.1-8b", "--devices", "h100-sxm",
                         "--plot", str(tmp_path / "c.pdf"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and ".png" in err


def test_plot_rows_name_devices_sharding_method_and_missing_prices() -> None:
    """What a reader needs on each row of the plot, without matplotlib: N, ZeRO, expert
    parallelism and the method chosen per device; the title says which method ran where."""
    from estimator.planner.compare import compare_request
    from estimator.report.compare import memory_groups, plot_label, plot_title

    cmp = compare_request("longcat-flash", devices=["mi300x", "tpu-v5p", "gaudi3"],
                          tokens=1e8)
    labels = {o.device: plot_label(o) for o in cmp.options}
    assert labels["mi300x"].startswith("mi300x ×") and "qlora4" in labels["mi300x"]
    assert "lora" in labels["tpu-v5p"] and "ep" in labels["tpu-v5p"]  # no QLoRA stack on XLA
    assert "lora on tpu-v5p" in plot_title(cmp) and "qlora on" in plot_title(cmp)
    gaudi = next(o for o in cmp.options if o.device == "gaudi3")
    assert gaudi.price_per_hour_usd is None  # drawn as 'n/a (no price)', never $0
    for o in cmp.options:
        assert sum(memory_groups(o).values()) == sum(o.memory_components.values())


def test_plot_writes_a_file(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.svg"
    code, _, _ = run(capsys, "compare", "--model", "llama-3.1-8b", "--tokens", "1e7",
                     "--plot", str(path), *DEVICES)
    assert code == 0 and path.stat().st_size > 1000


def test_compare_json_does_not_import_torch() -> None:
    """specs, catalog, analytic and compare stay torch-free (DESIGN: import direction)."""
    import subprocess

    code = ("import sys; from estimator.cli.app import main\n"
            "try:\n main(['compare', '--model', 'gpt2', '--devices', 'l4', '--json'])\n"
            "except SystemExit:\n pass\n"
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bad_price_and_link_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--price", "mi300x=cheap"], ["--price", "nosuch=1"], ["--link", "0"]):
        code, _, err = run(capsys, "compare", "--model", "llama-3.1-8b", "--devices", "mi300x",
                           *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
