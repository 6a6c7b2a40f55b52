"""Compare the analytic activation term with the tensors autograd really saves.

For each configuration, builds the executor's model exactly as `nvfree train` does, runs one
forward + loss under torch.autograd.graph.saved_tensors_hooks, and sums the unique storages
saved for backward, split into parameters (skipped: counted as weights), autocast weight
copies, vocab-sized loss tensors and activations. Prints analytic vs measured per config.
Usage: python benchmarks/probe_saved_tensors.py
"""

import torch
import torch.nn.functional as F

from estimator.analytic.activations import activation_bytes
from estimator.executor.train import TrainConfig, autocast_context, build_training_model
from estimator.specs import ModelSpec, MoESpec, TrainSetup


def saved_bytes(model: torch.nn.Module, spec: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Unique saved storages of one forward + loss, by kind (bytes)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in params or ptr in seen or storage.nbytes() == 0:
            return t
        if tuple(t.shape) in shapes and not t.requires_grad and t.dim() == 2 and (
                t.shape[0] != setup.batch_size * setup.seq_len):
            kind = "weight_copies"
        elif t.dim() and t.shape[-1] == spec.vocab_size:
            kind = "loss"
        elif t.numel() <= setup.seq_len * spec.head_dim:  # rope cos/sin, small stats
            kind = "small"
        else:
            kind = "activations"
        seen[ptr] = (kind, storage.nbytes())
        return t

    tokens = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_context(setup, torch.device("cpu")):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    del loss, logits
    out: dict[str, int] = {}
    for kind, nbytes in seen.values():
        out[kind] = out.get(kind, 0) + nbytes
    return out


def main() -> None:
    dense = ModelSpec(name="probe", num_layers=4, hidden_size=256, intermediate_size=688,
                      num_heads=8, num_kv_heads=2, head_dim=32, vocab_size=512)
    moe = dense.model_copy(update={"moe": MoESpec(num_experts=8, num_experts_per_token=2,
                                                  expert_intermediate_size=256)})
    configs = []
    for spec in (dense, moe):
        for method in ("full", "lora", "qlora"):
            for mixed in (True, False):
                for ckpt in (False, True):
                    bits = 4 if method == "qlora" else 16
                    configs.append((spec, TrainSetup(
                        method=method, weight_bits=bits, mixed_precision=mixed,
                        compute_dtype="bf16", batch_size=2, seq_len=128, checkpointing=ckpt)))
    print(f"{'model':5} {'method':6} {'mixed':5} {'ckpt':5} {'analytic':>10} {'measured':>10} "
          f"{'err':>7}  other saved")
    for spec, setup in configs:
        torch.manual_seed(0)
        _, model = build_training_model(spec, setup, TrainConfig(max_steps=1, output_dir="/tmp/probe"), torch.device("cpu"))
        measured = saved_bytes(model, spec, setup)
        acts = activation_bytes(spec, setup)
        analytic = acts["layers"] + acts["head"]
        got = measured.get("activations", 0)
        print(f"{'moe' if spec.moe else 'dense':5} {setup.method:6} {setup.mixed_precision!s:5} "
              f"{setup.checkpointing!s:5} {analytic:10,} {got:10,} {got / analytic - 1:+7.1%}  "
              f"{ {k: v for k, v in measured.items() if k != 'activations'} }")


if __name__ == "__main__":
    main()
