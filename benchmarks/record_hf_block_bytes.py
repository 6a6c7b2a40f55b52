"""Memory-bound bytes and aten calls per token of one Hugging Face decoder layer (transformers +
PEFT + bitsandbytes), recorded with a TorchDispatchMode, and the least-squares coefficients
frameworks/hf.py HF_BLOCK_BYTES is taken from (the aten call counts are printed, not used:
docs/frameworks.md "Step time").

For each regime (method × precision × checkpointing) and shape, one HF Trainer optimizer step
(tests/torch/hf_build.record_hf_step: autocast forward with labels, backward, clipping, fused
AdamW) of 1- and 2-layer Llama models at batch 1 and 2 (× 32 tokens) is recorded with
calibrate.aten_ops.record_op_bytes; per layer per token = the double difference, so the
embedding, loss, optimizer and weight-sized ops drop out. Coefficients: bytes per unit of h,
i, H·d, K·d, r·7 (LoRA on all seven linears); recompute = backward(checkpointed) −
backward(plain). Calls: per layer (2 − 1 layers), per phase, and the rest of a step (1 layer
less one layer's calls).

    PYTHONPATH=.:tests/torch python benchmarks/record_hf_block_bytes.py [--regimes full-fp32,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "torch"))

from hf_build import record_hf_step

from estimator.calibrate.aten_ops import per_layer_per_token
from estimator.specs import ModelSpec, TrainSetup

REGIMES = {
    "full-fp32": {"method": "full", "compute_dtype": "fp32", "weight_bits": 32},
    "lora-fp32": {"method": "lora", "compute_dtype": "fp32", "weight_bits": 32},
    "qlora-fp32": {"method": "qlora", "compute_dtype": "fp32", "weight_bits": 4},
    "full-mixed": {"method": "full", "compute_dtype": "bf16"},
    "lora-mixed": {"method": "lora", "compute_dtype": "bf16"},
    "qlora-mixed": {"method": "qlora", "compute_dtype": "bf16", "weight_bits": 4},
}
SHAPES = [(64, 128, 4, 2, 16, 4), (96, 128, 4, 2, 16, 4), (64, 192, 4, 2, 16, 4),
          (64, 128, 8, 2, 16, 4), (64, 128, 4, 4, 16, 4), (64, 128, 4, 2, 16, 8)]
"""(h, i, H, K, d, r): the base shape and one dimension changed at a time."""
SEQ = 32
PHASES = ("forward", "backward", "after")


def dense_spec(h: int, i: int, heads: int, kv: int, d: int, layers: int) -> ModelSpec:
    return ModelSpec(name="t", num_layers=layers, hidden_size=h, intermediate_size=i,
                     num_heads=heads, num_kv_heads=kv, head_dim=d, vocab_size=258,
                     max_seq_len=256)


def layer_record(shape: tuple, setup: TrainSetup) -> dict[str, dict[str, float]]:
    """Per phase: bytes per token of one layer ('per_token'), memory-bound and all aten
    calls of one layer at batch 2 ('calls', 'aten_calls'), and all aten calls of the rest of
    the step at batch 2 ('rest_aten_calls')."""
    h, i, heads, kv, d, r = shape
    setup = setup.model_copy(update={"lora_rank": r, "seq_len": SEQ})
    rec = {(n, b): r for n in (1, 2)
           for b, r in record_hf_step(dense_spec(h, i, heads, kv, d, n), setup).items()}
    out = {}
    for phase in PHASES:
        def layer(key, phase=phase):  # one layer's count at batch 2
            return rec[2, 2][phase][key] - rec[1, 2][phase][key]
        out[phase] = {"per_token": per_layer_per_token(rec, phase, SEQ),
                      "calls": layer("calls"), "aten_calls": layer("aten_calls"),
                      "rest_aten_calls": rec[1, 2][phase]["aten_calls"] - layer("aten_calls")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--checkpointing", action="store_true",
                        help="also record each regime checkpointed (the recompute pass)")
    opts = parser.parse_args()
    for name in opts.regimes.split(","):
        lora = "lora" in name
        setup = TrainSetup(**REGIMES[name])
        rows, ys, recs = [], {p: [] for p in ("forward", "backward", "recompute")}, []
        for shape in SHAPES if lora else SHAPES[:5]:
            rec = layer_record(shape, setup)
            if opts.checkpointing:
                ckpt = layer_record(shape, setup.model_copy(update={"checkpointing": True}))
                rec["recompute"] = {k: ckpt["backward"][k] - rec["backward"][k]
                                    for k in rec["backward"]}
            print(json.dumps({"regime": name, "shape": shape, **rec}), flush=True)
            h, i, heads, kv, d, r = shape
            rows.append([h, i, heads * d, kv * d, 7 * r * lora])
            recs.append(rec)
            for phase in ys:
                if phase in rec:
                    ys[phase].append(rec[phase]["per_token"])
        x = np.array(rows, dtype=float)
        for phase, y in ys.items():
            if not y:
                continue
            coef, *_ = np.linalg.lstsq(x, np.array(y), rcond=None)
            resid = float(np.max(np.abs(x @ coef - np.array(y)) / np.abs(np.array(y))))
            calls = sorted({int(r[phase]["calls"]) for r in recs})
            aten = sorted({int(r[phase]["aten_calls"]) for r in recs})
            rest = sorted({int(r[phase]["rest_aten_calls"]) for r in recs})
            print(f"{name} {phase}: hidden, ffn, q, kv, rank = "
                  f"{', '.join(f'{c:.2f}' for c in coef)}  (max residual {resid:.2%}); "
                  f"memory-bound calls {calls}; aten calls per layer {aten}, rest {rest}",
                  flush=True)


if __name__ == "__main__":
    main()
