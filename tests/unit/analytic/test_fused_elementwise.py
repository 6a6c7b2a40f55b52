"""elementwise.fused_token_bytes: a compiling stack (TPU/XLA, Trainium/Neuron, Gaudi graph
mode) moves fewer block bytes than eager PyTorch in every pass and regime, only those stacks
get it, and the planner's arrays still equal estimate() there."""

import pytest

from estimator.analytic import elementwise as EW
from estimator.catalog import load_device, load_model
from estimator.planner.estimate import estimate
from estimator.specs import TrainSetup


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("dtype,mixed", [("bf16", True), ("bf16", False), ("fp32", False)])
def test_fused_moves_fewer_bytes_than_eager(method: str, dtype: str, mixed: bool) -> None:
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(method=method, compute_dtype=dtype, mixed_precision=mixed,
                       checkpointing=True, weight_bits=4 if method == "qlora" else 16)
    eager, fused = EW.block_token_bytes(setup), EW.fused_token_bytes(setup)
    for phase in ("forward", "backward", "recompute"):
        width = model.intermediate_size
        assert 0 < fused[phase].per_token(model, width, 64) < eager[phase].per_token(
            model, width, 64)
        assert fused[phase].calls <= eager[phase].calls


def test_only_compiling_stacks_fuse() -> None:
    assert {b for b in ("xla", "neuron", "hpu", "cuda", "rocm", "cpu", "mps", "xpu")
            if EW.fuses_elementwise(b)} == {"xla", "neuron", "hpu"}
    model = load_model("llama-3.1-8b")
    setup = TrainSetup(method="lora", seq_len=1024)
    names = {d: {op.name for op in estimate(model, setup, d).throughput.ops}
             for d in ("tpu-v5p", "h100-sxm")}
    assert "elementwise.fused" in names["tpu-v5p"] and "elementwise" not in names["tpu-v5p"]
    assert "elementwise" in names["h100-sxm"] and "elementwise.fused" not in names["h100-sxm"]


def test_planner_equals_estimate_on_a_tpu(assert_planner_equals_estimate) -> None:
    model = load_model("llama-3.1-8b")
    device = load_device("tpu-v5p")
    setup = TrainSetup(method="full", seq_len=1024, num_devices=16, num_nodes=2,
                       zero_stage=3, checkpointing=True)
    assert_planner_equals_estimate(model, setup, device, [1, 2], [2, 1])
