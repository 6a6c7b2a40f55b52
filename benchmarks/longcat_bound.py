"""LongCat-Flash fine-tuning time against a peak × MFU bound (issue 17, goal 1).

For QLoRA and full fine-tuning of LongCat-Flash on 10^8 tokens on MI300X, TPU v5p and Gaudi 3:
the plan `nvfree compare` chooses (devices N, setup, time T) next to the time a well-tuned stack
would need on the same N devices,

    T_bound = k · N_active · tokens / (N · peak_bf16 · MFU_ref)

k = 6 for full fine-tuning (forward 2 + backward 4 FLOPs per active parameter and token,
Kaplan et al. 2020 §2.1), k = 4 for LoRA/QLoRA (the frozen base's weight gradients are skipped:
forward 2 + input gradients 2). Model FLOPs only: checkpoint recomputation and attention are
left out, as MFU does (Chowdhery et al. 2022, PaLM, Appendix B). MFU_ref = MFU_REFERENCE, the
lowest MFU published for an MoE in data/published_throughput.toml. The ratio T / T_bound is
how far nvfree's time lies above that bound (goal: within 2×).

    python benchmarks/longcat_bound.py [--markdown]
"""

import argparse

from estimator.analytic.params import count_params
from estimator.catalog import load_device, load_model
from estimator.planner.compare import compare_request
from estimator.units import SECONDS_PER_HOUR

MODEL = "longcat-flash"
TOKENS = 1e8
DEVICES = ("mi300x", "tpu-v5p", "gaudi3")
METHODS = ("qlora", "full")
MFU_REFERENCE = 0.3523
"""Mixtral-8x7B full training on 256 TPU v6e chips with MaxText: 35.23 % MFU (MaxText tiering
table, data/published_throughput.toml) — the lowest MoE MFU there; Mixtral on v5p reaches
52.56 %."""
FLOPS_PER_PARAM_TOKEN = {"full": 6, "lora": 4, "qlora": 4}


def bound_seconds(method: str, active: int, num_devices: int, peak: float) -> float:
    """T_bound of the module docstring (seconds)."""
    return FLOPS_PER_PARAM_TOKEN[method] * active * TOKENS / (num_devices * peak * MFU_REFERENCE)


def rows() -> list[dict]:
    model = load_model(MODEL)
    active = count_params(model).active_per_token
    out = []
    for name in DEVICES:
        device = load_device(name)
        peak = device.peak_for("bf16")
        for method in METHODS:
            o = compare_request(MODEL, tokens=TOKENS, devices=[name], method=method).options[0]
            if o.num_devices is None:
                out.append({"device": name, "asked": method, "fits": False})
                continue
            bound = bound_seconds(o.method, active, o.num_devices, peak)
            setup = (f"{o.num_devices}× z{o.zero_stage} b{o.batch_size}×{o.grad_accum}"
                     f" ep{o.expert_parallel}{' ckpt' if o.checkpointing else ''}"
                     f"{' attn-LoRA' if len(o.lora_targets) == 4 else ''}")
            out.append({"device": name, "asked": method, "method": o.method, "setup": setup,
                        "hours": o.total_seconds / SECONDS_PER_HOUR,
                        "bound_hours": bound / SECONDS_PER_HOUR,
                        "ratio": o.total_seconds / bound, "cost": o.cost_usd, "fits": True})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| device | asked | ran | nvfree's plan | nvfree time | bound | ratio | cost |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in table:
        if not r["fits"]:
            lines.append(f"| {r['device']} | {r['asked']} | – | no fit | – | – | – | – |")
            continue
        cost = "n/a" if r["cost"] is None else f"${r['cost']:,.0f}"
        lines.append(f"| {r['device']} | {r['asked']} | {r['method']} | {r['setup']} | "
                     f"{r['hours']:.2f} h | {r['bound_hours']:.2f} h | {r['ratio']:.1f}× | "
                     f"{cost} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.parse_args()
    print(markdown(rows()))


if __name__ == "__main__":
    main()
