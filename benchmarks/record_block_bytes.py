"""Memory-bound bytes per token of one executor block, recorded with a TorchDispatchMode, and
the least-squares coefficients flops.MEMORY_BOUND_BYTES / MOE_ROUTING_BYTES are taken from.

For each regime (method × precision × checkpointing) and shape, one training step (the second:
optimizer state exists) of 1- and 2-block models at batch 1 and 2 (× 32 tokens) is recorded
with calibrate.benches.record_op_bytes; per block per token = the double difference, so the
embedding, loss, optimizer and weight-sized ops (casts of weights, dequantisation, gradient
accumulation) drop out. Coefficients: bytes per unit of h, i, H·d, K·d, r·7 (LoRA on all seven
linears); recompute = backward(checkpointed) − backward(plain).

    python benchmarks/record_block_bytes.py [--regimes lora-mixed,full-fp32] [--moe]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from estimator.calibrate.aten_ops import per_layer_per_token
from estimator.calibrate.benches import record_train_step_bytes
from estimator.specs import ModelSpec, MoESpec, TrainSetup

REGIMES = {
    "lora-mixed": {"method": "lora", "compute_dtype": "bf16"},
    "qlora-mixed": {"method": "qlora", "weight_bits": 4, "compute_dtype": "bf16"},
    "full-mixed": {"method": "full", "compute_dtype": "bf16"},
    "full-fp32": {"method": "full", "compute_dtype": "fp32", "weight_bits": 32},
    "lora-fp32": {"method": "lora", "compute_dtype": "fp32", "weight_bits": 32},
    "lora-mixed-ckpt": {"method": "lora", "compute_dtype": "bf16", "checkpointing": True},
    "full-mixed-ckpt": {"method": "full", "compute_dtype": "bf16", "checkpointing": True},
    "qlora-mixed-ckpt": {"method": "qlora", "weight_bits": 4, "compute_dtype": "bf16",
                             "checkpointing": True},
    "full-pure": {"method": "full", "compute_dtype": "bf16", "mixed_precision": False},
    "lora-pure": {"method": "lora", "compute_dtype": "bf16", "mixed_precision": False},
    "full-fp32-ckpt": {"method": "full", "compute_dtype": "fp32", "weight_bits": 32,
                           "checkpointing": True},
}
SHAPES = [(64, 128, 4, 2, 16, 4), (96, 128, 4, 2, 16, 4), (64, 192, 4, 2, 16, 4),
          (64, 128, 8, 2, 16, 4), (64, 128, 4, 4, 16, 4), (64, 128, 4, 2, 16, 8)]
"""(h, i, H, K, d, r): the base shape and one dimension changed at a time."""
MOE_SHAPES = [(64, 32, 4, 2), (96, 32, 4, 2), (64, 48, 4, 2), (64, 32, 8, 2), (64, 32, 4, 1)]
"""(h, expert width, experts, experts per token)."""
SEQ = 32


def block_bytes(spec: ModelSpec, setup: TrainSetup) -> dict[str, dict[str, float]]:
    """Per phase: bytes per token of one block ('per_token'), the weight-sized rest
    ('fixed', bytes per block) and the non-GEMM aten calls of one block ('calls')."""
    res = {(n, b): record_train_step_bytes(spec.model_copy(update={"num_layers": n}),
                               setup.model_copy(update={"batch_size": b, "seq_len": SEQ}))
           for n in (1, 2) for b in (1, 2)}
    out = {}
    for phase in ("forward", "backward"):
        one = res[2, 1][phase]["bytes"] - res[1, 1][phase]["bytes"]
        per_token = per_layer_per_token(res, phase, SEQ)
        out[phase] = {"per_token": per_token, "fixed": one - per_token * SEQ,
                      "calls": res[2, 2][phase]["calls"] - res[1, 2][phase]["calls"]}
    return out


def dense_spec(h: int, i: int, heads: int, kv: int, d: int) -> ModelSpec:
    return ModelSpec(name="t", num_layers=1, hidden_size=h, intermediate_size=i, num_heads=heads,
                     num_kv_heads=kv, head_dim=d, vocab_size=258, max_seq_len=256)


def record_moe() -> None:
    """Record the MoE block (whole expert groups: the CPU padding of adapted experts is
    moe_routing_ops' own term) and fit MOE_ROUTING_BYTES: the recording minus the dense
    coefficients at the activated width k·i_expert, least squares on (h·k, h) per phase."""
    import estimator.executor.model as model_module
    from estimator.analytic.elementwise import block_token_bytes

    model_module._reuses_shapes = lambda x: False
    for name in ("lora-mixed", "full-mixed"):
        rows, ys, calls = [], {"forward": [], "backward": []}, {"forward": [], "backward": []}
        for h, width, experts, k in MOE_SHAPES:
            spec = dense_spec(h, 128, 4, 2, 16).model_copy(update={"moe": MoESpec(
                num_experts=experts, num_experts_per_token=k, expert_intermediate_size=width)})
            setup = TrainSetup(framework="nvfree", lora_rank=4, **REGIMES[name])
            rec = block_bytes(spec, setup)
            print(json.dumps({"regime": name, "shape": [h, width, experts, k], **rec}),
                  flush=True)
            table = block_token_bytes(setup)
            rows.append([h * k, h])
            for phase in ys:
                dense = table[phase].per_token(spec, k * width, 4 * 7 * setup.trains_adapters)
                ys[phase].append(rec[phase]["per_token"] - dense)
                calls[phase].append(rec[phase]["calls"] - table[phase].calls)
        for phase, y in ys.items():
            coef, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(y), rcond=None)
            print(f"{name} MoE routing {phase}: per h·k, per h = "
                  f"{', '.join(f'{c:.1f}' for c in coef)}; extra calls "
                  f"{min(calls[phase]):.0f}–{max(calls[phase]):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--moe", action="store_true", help="record the MoE block instead")
    opts = parser.parse_args()
    if opts.moe:
        record_moe()
        return
    for name in opts.regimes.split(","):
        lora = "lora" in name
        rows, ys = [], {"forward": [], "backward": []}
        for h, i, heads, kv, d, r in SHAPES if lora else SHAPES[:5]:
            rec = block_bytes(dense_spec(h, i, heads, kv, d),
                              TrainSetup(framework="nvfree", lora_rank=r, **REGIMES[name]))
            print(json.dumps({"regime": name, "shape": [h, i, heads, kv, d, r], **rec}),
                  flush=True)
            rows.append([h, i, heads * d, kv * d, 7 * r * lora])
            for phase in ys:
                ys[phase].append(rec[phase]["per_token"])
        x = np.array(rows, dtype=float)
        for phase, y in ys.items():
            coef, *_ = np.linalg.lstsq(x, np.array(y), rcond=None)
            resid = float(np.max(np.abs(x @ coef - np.array(y)) / np.array(y)))
            print(f"{name} {phase}: hidden, ffn, q, kv, rank = "
                  f"{', '.join(f'{c:.2f}' for c in coef)}  (max residual {resid:.2%})")


if __name__ == "__main__":
    main()
