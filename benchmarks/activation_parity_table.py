"""Print analytic vs measured saved-for-backward bytes for the parity test's 24 configurations
(dense/MoE × full/LoRA/QLoRA × mixed/pure × checkpointing), with the error of each and the
median and max. The assertion (3 %) lives in tests/torch/test_activation_parity.py; this prints
the numbers for docs/accuracy.md.  Usage: python benchmarks/activation_parity_table.py
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "torch"))
import test_activation_parity as parity

from estimator.executor.train import TrainConfig, build_training_model


def main() -> None:
    errors = []
    print(f"{'configuration':24} {'predicted B':>12} {'measured B':>12} {'error':>7}")
    for spec, setup in parity.CASES:
        torch.manual_seed(0)
        _, model = build_training_model(spec, setup, TrainConfig(max_steps=1,
                                        output_dir=Path("/tmp/nvfree-parity")),
                                        torch.device("cpu"))
        measured = parity.saved_storage_bytes(model, setup, spec.vocab_size)
        predicted = parity.analytic_saved_bytes(spec, setup)
        errors.append(predicted / measured - 1)
        name = (f"{'moe' if spec.moe else 'dense'}-{setup.method}-"
                f"{'mixed' if setup.mixed_precision else 'pure'}"
                f"{'-ckpt' if setup.checkpointing else ''}")
        print(f"{name:24} {predicted:12,} {measured:12,} {errors[-1]:+7.2%}")
    print(f"median |error| {statistics.median(map(abs, errors)):.2%}, "
          f"max {max(map(abs, errors)):.2%}")


if __name__ == "__main__":
    main()
