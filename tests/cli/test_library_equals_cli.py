"""The library equals the CLI: for each command, the estimator.<command> call with the same
arguments returns what `nvfree <command> --json` prints, over a matrix of setups and devices
(this machine, 'local', included; uncalibrated here: conftest keeps the profile cache private)."""

import json
from pathlib import Path

import pytest

import estimator
from estimator.cli.app import main


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--json"])
    out, err = capsys.readouterr()
    assert int(exc.value.code or 0) == 0, err
    return json.loads(out)


ESTIMATES = [
    (["--model", "gpt2", "--seq-len", "512"], {"model": "gpt2", "seq_len": 512}, "local"),
    (["--params", "7e9"], {"params": 7e9}, "local"),
    (["--model", "llama-3.1-8b", "--method", "qlora", "--seq-len", "4096"],
     {"model": "llama-3.1-8b", "method": "qlora", "seq_len": 4096}, "h100-sxm"),
    (["--model", "llama-3.1-8b", "--bits", "4", "--framework", "nvfree", "--batch-size", "4"],
     {"model": "llama-3.1-8b", "bits": 4, "framework": "nvfree", "batch_size": 4}, "rtx-4090"),
    (["--model", "mixtral-8x7b", "--method", "lora", "--num-devices", "4", "--zero", "3"],
     {"model": "mixtral-8x7b", "method": "lora", "num_devices": 4, "zero": 3}, "mi300x"),
    (["--model", "llama-3.1-70b", "--checkpointing", "--dtype", "bf16", "--tokens", "1e9"],
     {"model": "llama-3.1-70b", "checkpointing": True, "dtype": "bf16", "tokens": 1e9},
     "h100-sxm"),
    (["--params", "1e9", "--method", "inference", "--batch-size", "8"],
     {"params": 1e9, "method": "inference", "batch_size": 8}, "m4-max"),
]


@pytest.mark.parametrize(("args", "kwargs", "device"), ESTIMATES,
                         ids=[f"{d}-{'-'.join(a[1:2])}" for a, _, d in ESTIMATES])
def test_estimate(capsys: pytest.CaptureFixture[str], args: list[str], kwargs: dict,
                  device: str) -> None:
    printed = cli_json(capsys, "estimate", *args, "--device", device)
    assert json.loads(estimator.estimate(device=device, **kwargs).model_dump_json()) == printed


COMPARES = [
    (["--model", "gpt2", "--seq-len", "1024", "--devices",
      "h100-sxm,rtx-4090,xeon-platinum-8480plus"],
     {"model": "gpt2", "seq_len": 1024, "devices": "h100-sxm,rtx-4090,xeon-platinum-8480plus"}),
    (["--model", "llama-3.1-8b", "--method", "qlora", "--devices", "rtx-4090,mi300x",
      "--objective", "cost", "--tokens", "1e8"],
     {"model": "llama-3.1-8b", "method": "qlora", "devices": ["rtx-4090", "mi300x"],
      "objective": "cost", "tokens": 1e8}),
    (["--params", "70e9", "--devices", "h100-sxm,a100-80gb", "--max-devices", "8",
      "--max-cost", "1e5", "--seq-len", "1024"],
     {"params": 70e9, "devices": "h100-sxm,a100-80gb", "max_devices": 8, "max_cost": 1e5,
      "seq_len": 1024}),
]


@pytest.mark.parametrize(("args", "kwargs"), COMPARES, ids=["gpt2", "qlora-cost", "70b"])
def test_compare(capsys: pytest.CaptureFixture[str], args: list[str], kwargs: dict) -> None:
    printed = cli_json(capsys, "compare", *args)
    assert json.loads(estimator.compare(**kwargs).model_dump_json()) == printed


PLANS = [
    (["--tokens", "1e4"], {"tokens": 1e4}, "local"),
    (["--model", "gpt2", "--method", "lora", "--seq-len", "128", "--global-batch", "4",
      "--tokens", "2e4"],
     {"model": "gpt2", "method": "lora", "seq_len": 128, "global_batch": 4, "tokens": 2e4},
     "local"),
    (["--model", "llama-3.1-8b", "--method", "qlora", "--dtype", "bf16", "--tokens", "1e6",
      "--objective", "cost"],
     {"model": "llama-3.1-8b", "method": "qlora", "dtype": "bf16", "tokens": 1e6,
      "objective": "cost"}, "mi300x"),
    (["--params", "7e9", "--tokens", "1e8", "--max-devices", "4"],
     {"params": 7e9, "tokens": 1e8, "max_devices": 4}, "h100-sxm"),
]


@pytest.mark.parametrize(("args", "kwargs", "device"), PLANS,
                         ids=["local-default", "local-gpt2", "mi300x-qlora", "h100-7b"])
def test_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str],
              kwargs: dict, device: str) -> None:
    printed = cli_json(capsys, "plan", *args, "--device", device, "--no-calibrate",
                       "--output", str(tmp_path / "plan.json"))
    made = json.loads(estimator.plan(device=device, calibrate=False, **kwargs)
                      .model_dump_json())
    for one in (printed, made):
        one.pop("created_at")
    assert made == printed


def test_plan_writes_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    made = estimator.plan("gpt2", device="h100-sxm", tokens=1e6, output=path)
    assert json.loads(path.read_text())["predicted_step_seconds"] == made.predicted_step_seconds


def test_validate_takes_the_command_arguments() -> None:
    """validate runs the trainer (tests/torch): here, that it takes the command's arguments."""
    import inspect

    from estimator.cli.validate import validate as command

    library = set(inspect.signature(estimator.validate).parameters)
    assert set(inspect.signature(command).parameters) - {"json"} <= library


@pytest.fixture
def calibrated() -> None:
    """A calibration profile for this machine in the test's private cache."""
    from estimator.allocator import active_allocator
    from estimator.hardware import detect, fingerprint, training_threads
    from estimator.hardware.profiles import save_profile
    from estimator.specs.calibration import CalibrationProfile, EfficiencyCurve

    machine = detect()
    if machine.torch_version is None:
        pytest.skip("profiles are keyed by the torch version; torch is not installed")
    curves = {c: EfficiencyCurve(op_class=c, unit="flops", log10_work=(6.0, 9.0),
                                 rates=(1e9, 5e10), overhead_seconds=5e-6, num_samples=4)
              for c in ("matmul.fp32", "matmul.bf16")}
    save_profile(CalibrationProfile(
        fingerprint=fingerprint(machine), torch_version=machine.torch_version,
        num_threads=training_threads(machine), allocator=active_allocator(), backend="cpu",
        device_name=machine.cpu_brand, created_at="2026-12-01T00:00:00Z", curves=curves))


def test_local_with_its_profile(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                calibrated: None) -> None:
    printed = cli_json(capsys, "estimate", "--model", "gpt2", "--seq-len", "512")
    made = estimator.estimate("gpt2", seq_len=512)
    assert any(a.startswith("calibration: calibrated") for a in made.assumptions)
    assert json.loads(made.model_dump_json()) == printed
    printed = cli_json(capsys, "plan", "--tokens", "1e4", "--output", str(tmp_path / "p.json"))
    planned = json.loads(estimator.plan(tokens=1e4).model_dump_json())
    assert planned["profile_id"] is not None
    assert {**planned, "created_at": 0} == {**printed, "created_at": 0}


def test_public_names_are_not_shadowed_by_submodules() -> None:
    """Importing a submodule sets it as an attribute of the package: a module named like a
    public function (estimator/validate.py once) would replace `estimator.validate`."""
    root = Path(estimator.__file__).parent
    clashes = [n for n in estimator.__all__
               if (root / f"{n}.py").exists() or (root / n / "__init__.py").exists()]
    assert not clashes
