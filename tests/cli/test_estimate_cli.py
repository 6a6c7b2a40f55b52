"""`nvfree estimate`, `models`, `devices`: output, JSON contract, one-line errors with exit 2."""

import json
import subprocess
import sys

import pytest

from estimator.cli.app import main

NO_PROFILE = ["--no-profile"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_seed_example_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "estimate", "--params", "56e9", "--bits", "4", "--json",
                       *NO_PROFILE)
    assert code == 0
    data = json.loads(out)
    assert data["setup"]["method"] == "qlora" and data["setup"]["weight_bits"] == 4
    assert data["memory"]["total_bytes"] == sum(data["memory"]["components"].values())
    assert data["throughput"]["step_seconds"] > 0
    assert data["throughput"]["tokens_per_second"] > 0
    assert data["verdict"] in ("fits", "fits_with_changes", "does_not_fit")
    assert any("inferred from --params" in a for a in data["assumptions"])


def test_rich_output_names_verdict_and_terms(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "estimate", "--model", "llama-3.1-8b", "--method", "qlora",
                       "--device", "rtx-4090", "--tokens", "1e7")
    assert code == 0
    assert "FITS" in out and "weights" in out and "activations" in out and "cost" in out


@pytest.mark.parametrize("args,needle", [
    (["--params", "-5"], "--params must be a finite number"),
    (["--params", "0"], "--params must be a finite number"),
    (["--params", "7e9", "--bits", "3"], "--bits"),
    (["--params", "7e9", "--active-params", "8e9"], "at most the total"),
    (["--model", "llama-3.1-8b", "--method", "lora", "--lora-rank", "5000"], "exceeds the hidden"),
    (["--model", "lama-3.1-8b"], "Did you mean"),
    (["--model", "llama-3.1-8b", "--device", "mi301"], "Did you mean: mi300x"),
    (["--model", "llama-3.1-8b", "--method", "qlora", "--bits", "16"], "4-bit"),
    (["--model", "llama-3.1-8b", "--lora-targets", "q,v", "--method", "lora"], "unknown LoRA"),
    ([], "say which model"),
], ids=["negative-params", "zero-params", "bits-3", "active-gt-total", "rank-gt-hidden",
        "unknown-preset", "unknown-device", "qlora-16bit", "bad-targets", "no-model"])
def test_bad_input_one_line_exit_2(capsys: pytest.CaptureFixture[str], args: list[str],
                                   needle: str) -> None:
    code, _, err = run(capsys, "estimate", *args, *NO_PROFILE)
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "bert", "hidden_size": 8}', "unsupported model_type 'bert'"),
    # missing fields take transformers' defaults; DeepSeek-V2's num_experts_per_tok has none
    ('{"model_type": "deepseek_v2", "hidden_size": 64}', "lacks the field"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3, '
     '"num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 10, '
     '"intermediate_size": 8}', "multiple of num_kv_heads"),
], ids=["malformed", "unsupported", "missing-field", "inconsistent"])
def test_bad_config_json(tmp_path, capsys: pytest.CaptureFixture[str], content: str,
                         needle: str) -> None:
    (tmp_path / "config.json").write_text(content)
    code, _, err = run(capsys, "estimate", "--model", str(tmp_path), *NO_PROFILE)
    assert code == 2 and needle in err and err.count("\n") == 1


def test_config_json_directory(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
              "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
              "intermediate_size": 4864, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "estimate", "--model", str(tmp_path), "--json", *NO_PROFILE)
    data = json.loads(out)
    assert code == 0 and data["model"]["qkv_bias"] and data["model"]["tied_embeddings"]
    assert abs(data["params"]["total"] - 494_032_768) / 494_032_768 < 1e-6  # Qwen2.5-0.5B


def test_device_memory_override(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "estimate", "--model", "gpt2", "--seq-len", "1024", "--device",
                       "xeon-platinum-8480plus", "--device-memory", "64", "--json")
    data = json.loads(out)
    assert code == 0 and data["device"]["memory_bytes"] == 64 * 1024**3
    assert data["memory"]["capacity_bytes"] == 64 * 1024**3 - 64 * 1024**3 // 10


def test_models_and_devices_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and any(m["name"] == "longcat-flash" for m in json.loads(out))
    code, out, _ = run(capsys, "devices", "--json")
    assert code == 0 and any(d["name"] == "mi300x" for d in json.loads(out))


def test_estimate_never_imports_torch() -> None:
    """The estimate path stays torch-free (DESIGN.md: specs/catalog/analytic never import it)."""
    code = ("import sys\nfrom estimator.cli.app import main\n"
            "try:\n    main(['estimate', '--params', '56e9', '--bits', '4', '--json'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'estimator.executor' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_estimate_refuses_what_train_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    """One setup check: a sequence longer than GPT-2's learned positions is refused by
    estimate as by train, not called FITS."""
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--seq-len", "4096", "--device",
                       "h100-sxm")
    assert code == 2 and "1024 learned positions" in err


def test_estimate_says_what_the_trainer_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    """estimate keeps its answer and names what `nvfree train` could not run."""
    code, out, _ = run(capsys, "estimate", "--model", "longcat-flash", "--method", "qlora",
                       "--device", "mi300x", "--json")
    assumptions = json.loads(out)["assumptions"]
    assert code == 0 and any("bundled trainer" in a and "MLA" in a for a in assumptions)
