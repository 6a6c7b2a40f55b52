"""Whole `nvfree estimate --json` scenarios against reviewed golden files.

Regenerate after an intended model change with `pytest tests/golden --update-golden` and review
the diff (torchtitan/llm-analysis practice). Catalogue devices only: `local` differs per machine.
"""

import json
import math
from pathlib import Path

import pytest

from estimator.cli.app import main

GOLDEN = Path(__file__).parent
SCENARIOS = {
    "llama-3.1-8b_qlora_rtx-4090": ["--model", "llama-3.1-8b", "--method", "qlora",
                                    "--device", "rtx-4090", "--tokens", "1e8"],
    "mixtral-8x7b_lora_mi300x": ["--model", "mixtral-8x7b", "--method", "lora", "--device",
                                 "mi300x", "--batch-size", "4", "--checkpointing"],
    "dense-56b_bits4_m4-max": ["--params", "56e9", "--bits", "4", "--device", "m4-max"],
    "longcat-flash_qlora_mi300x": ["--model", "longcat-flash", "--method", "qlora",
                                   "--device", "mi300x", "--seq-len", "4096"],
    "gpt2_full_fp32_xeon": ["--model", "gpt2", "--dtype", "fp32", "--seq-len", "1024",
                            "--batch-size", "8", "--device", "xeon-platinum-8480plus"],
    "llama-3.1-8b_inference_int4_ryzen": ["--model", "llama-3.1-8b", "--method", "inference",
                                          "--bits", "4", "--device", "ryzen-9-7950x"],
    "qwen3-30b-a3b_full_8bit-adam_tpu": ["--model", "qwen3-30b-a3b", "--optimizer",
                                         "adamw8bit", "--device", "tpu-v5p", "--grad-accum", "4"],
}


def assert_close(actual, expected, path: str = "") -> None:
    """Equal structure; numbers within 1e-9 relative."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert math.isclose(actual, expected, rel_tol=1e-9), f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_golden_scenario(name: str, capsys: pytest.CaptureFixture[str],
                         update_golden: bool) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["estimate", *SCENARIOS[name], "--json"])
    assert exc.value.code == 0
    actual = json.loads(capsys.readouterr().out)
    file = GOLDEN / f"{name}.json"
    if update_golden:
        file.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    assert_close(actual, json.loads(file.read_text()))
