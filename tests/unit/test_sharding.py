"""Per-device memory on several devices: ZeRO stages, expert parallelism, offload, the fewest
devices that fit, and the CLI's one-line errors for bad combinations."""

import itertools
import math

import pytest

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.params import count_params
from estimator.analytic.sharding import zero_model_state_bytes
from estimator.catalog import load_device, load_model
from estimator.cli.app import main
from estimator.errors import SetupError
from estimator.planner.advice import devices_needed
from estimator.specs import TrainSetup

MODEL_STATES = ("weights", "master_weights", "gradients", "optimizer_states")


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_7p5b_example_rajbhandari2020_figure1(stage: int, expected_gb: float) -> None:
    # Ψ = 7.5B, K = 12, N_d = 64: 2Ψ fp16 params, 2Ψ fp16 grads, KΨ optimizer states
    psi = 7.5e9
    per_device = zero_model_state_bytes(2 * psi, 2 * psi, 12 * psi, stage, 64)
    assert round(sum(per_device.values()) / 1e9, 1) == expected_gb


def breakdown(model_name: str, device: str = "h100-sxm", **update):
    model = load_model(model_name)
    setup = TrainSetup(**update)
    return memory_breakdown(model, setup, load_device(device), count_params(model, setup))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_real_model_states_follow_the_zero_paper_layout(stage: int) -> None:
    # mixed-precision AdamW, sharded: 2 + 2 + K (K = 4 master + 8 Adam) bytes per parameter
    psi = count_params(load_model("llama-3.1-8b")).total
    mem = breakdown("llama-3.1-8b", num_devices=8, zero_stage=stage, grad_accum=2)
    expected = sum(zero_model_state_bytes(2 * psi, 2 * psi, 12 * psi, stage, 8).values())
    states = sum(mem.components[k] for k in MODEL_STATES)
    assert math.isclose(states, expected, rel_tol=1e-6)


def test_stage3_adds_the_gathered_layer() -> None:
    mem = breakdown("llama-3.1-8b", num_devices=8, zero_stage=3)
    assert mem.components["gathered_params"] > 0
    assert breakdown("llama-3.1-8b", num_devices=8, zero_stage=2).components[
        "gathered_params"] == 0


def test_stage3_more_devices_never_more_memory_per_device() -> None:
    totals = [breakdown("llama-3.1-8b", num_devices=n, zero_stage=3).total_bytes
              for n in (1, 2, 3, 4, 8, 16, 64, 256)]
    assert all(b <= a for a, b in itertools.pairwise(totals))


def test_single_device_zero_stage_changes_nothing() -> None:
    assert (breakdown("llama-3.1-8b", zero_stage=3).total_bytes
            == breakdown("llama-3.1-8b").total_bytes)


def test_expert_parallel_splits_routed_experts() -> None:
    plain = breakdown("mixtral-8x7b", method="lora", num_devices=8)
    ep = breakdown("mixtral-8x7b", method="lora", num_devices=8, expert_parallel=8)
    model = load_model("mixtral-8x7b")
    assert ep.components["weights"] < plain.components["weights"] / 3
    assert ep.components["weights"] > plain.components["weights"] / model.moe.num_experts


def test_offload_reports_host_bytes_not_device_bytes() -> None:
    on_device = breakdown("llama-3.1-8b", num_devices=8, zero_stage=2)
    off = breakdown("llama-3.1-8b", num_devices=8, zero_stage=2, offload="optimizer")
    assert off.components["optimizer_states"] == 0 and off.components["master_weights"] == 0
    assert off.host_components["optimizer_states"] == on_device.components["optimizer_states"]
    assert off.host_total_bytes == sum(off.host_components.values())
    assert off.total_bytes < on_device.total_bytes


def test_cpu_offloading_to_itself_is_an_error() -> None:
    from estimator.checks import check

    with pytest.raises(SetupError, match="host memory"):
        check(load_model("gpt2"), TrainSetup(offload="optimizer", seq_len=1024),
              load_device("xeon-platinum-8480plus"))


def test_devices_needed_is_the_smallest_that_fits() -> None:
    model, device = load_model("llama-3.1-70b"), load_device("h100-sxm")
    setup = TrainSetup(checkpointing=True)

    def memory_of(s: TrainSetup):
        return memory_breakdown(model, s, device, count_params(model, s))

    n, stage, total = devices_needed(setup, memory_of)
    found = memory_of(setup.model_copy(update={"num_devices": n, "zero_stage": stage}))
    assert found.fits and found.total_bytes == total  # fits with the band's upper end
    fewer = setup.model_copy(update={"num_devices": n - 1, "zero_stage": 3})
    assert not memory_of(fewer).fits
    assert stage in (1, 2, 3)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["estimate", *args, "--json"])
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ("--model", "llama-3.1-8b", "--device", "h100-sxm", "--nodes", "3", "--num-devices", "4"),
    ("--model", "llama-3.1-8b", "--device", "h100-sxm", "--expert-parallel", "2",
     "--num-devices", "2"),
    ("--model", "gpt2", "--device", "xeon-platinum-8480plus", "--offload", "optimizer"),
    ("--model", "llama-3.1-8b", "--device", "h100-sxm", "--offload", "optimizer_and_params",
     "--num-devices", "2", "--zero", "1"),
])
def test_cli_bad_combinations_exit_2_with_one_line(capsys, args) -> None:
    code, err = run(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_multi_device_json(capsys) -> None:
    code, _ = run(capsys, "--model", "llama-3.1-8b", "--device", "h100-sxm", "--num-devices",
                  "16", "--nodes", "2", "--zero", "3")
    assert code == 0
