"""The analytic framework-op count (flops.dispatch_op_count) against a TorchDispatchMode count
of one executor training step."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from estimator.analytic.dispatch import dispatch_op_count
from estimator.analytic.throughput import num_trainable_tensors
from estimator.executor.train import TrainConfig, prepare_run, train_step
from estimator.specs import ModelSpec, MoESpec, TrainSetup

pytestmark = pytest.mark.torch

SPEC = ModelSpec(name="t", num_layers=3, hidden_size=64, intermediate_size=128, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
MOE = SPEC.model_copy(update={"moe": MoESpec(num_experts=4, num_experts_per_token=2,
                                             expert_intermediate_size=32, num_dense_layers=1)})


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.num_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.num_ops += 1
        return func(*args, **(kwargs or {}))


def _measured(spec: ModelSpec, setup: TrainSetup, tmp_path: Path) -> tuple[int, int]:
    run, *_ = prepare_run(spec, setup, TrainConfig(max_steps=2, output_dir=tmp_path,
                                                   predict=False))
    train_step(run, 0, 1e-3)  # optimizer state exists from the second step on
    counter = _Count()
    with counter:
        train_step(run, 1, 1e-3)
    return counter.num_ops, len(run.trainable)


CASES = {
    "full-bf16-ckpt": (SPEC, {"checkpointing": True}, 0.02),
    "lora-qv-fp32-ckpt": (SPEC, {"method": "lora", "compute_dtype": "fp32", "weight_bits": 32,
                                 "lora_targets": ("q_proj", "v_proj"), "checkpointing": True},
                          0.02),  # a 16-bit base under fp32 (upcast per matmul) is not counted
    "qlora-bf16": (SPEC, {"method": "qlora", "weight_bits": 4}, 0.02),
    "lora-bf16-accum2": (SPEC, {"method": "lora", "grad_accum": 2}, 0.02),
    "moe-lora-bf16": (MOE, {"method": "lora"}, 0.1),
}


@pytest.mark.parametrize("name", CASES)
def test_dispatch_count_matches_the_executor(name, tmp_path):
    spec, overrides, tolerance = CASES[name]
    setup = TrainSetup(**{"compute_dtype": "bf16", "batch_size": 2, "seq_len": 32,
                          "lora_rank": 4, **overrides})
    torch.manual_seed(0)
    measured, tensors = _measured(spec, setup, tmp_path)
    assert num_trainable_tensors(spec, setup) == tensors
    predicted = dispatch_op_count(spec, setup, tensors)
    assert predicted == pytest.approx(measured, rel=tolerance), (predicted, measured)
