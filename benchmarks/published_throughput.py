"""nvfree's training throughput against published runs (data/published_throughput.toml).

For every row that states a decoder-LLM training throughput on a catalogue device (tokens/s or
sequences/s; time-to-train rows need the tokens to convergence and BERT is not a decoder, so
those are listed as skipped), nvfree predicts tokens/s per device for the same model, device
count, sequence length and method: the planner's search at exactly that device count
(planner.fit.best_at: ZeRO stage, checkpointing, micro-batch × accumulation for the published
global batch where it is stated, else nvfree's default of 64 sequences or one per device),
bf16 mixed precision (fp8 rows are predicted in bf16 and flagged), the LoRA rank and target
modules where the row states them. Error = predicted /
published − 1 (positive: nvfree predicts faster than published).

    python benchmarks/published_throughput.py [--markdown]
"""

import argparse
import statistics
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimator.analytic.infer import infer_model  # noqa: E402
from estimator.catalog import load_device, load_model  # noqa: E402
from estimator.errors import NvfreeError  # noqa: E402
from estimator.planner.fit import Fixed, best_at  # noqa: E402
from estimator.request import build_setup  # noqa: E402

MODELS = {
    "Llama-2-7b": "llama-2-7b", "Llama-2-13b": "llama-2-13b", "Llama-3.1-8B": "llama-3.1-8b",
    "Llama-3.1-70B": "llama-3.1-70b", "Mixtral-8x7B": "mixtral-8x7b", "Llama 7B": "llama-2-7b",
}
"""Published model name (substring) → preset."""
INFERRED = {"Llama-2-70b": 69e9, "Llama-3.1-405B": 405e9}
"""Published models without a preset → --params (a Llama-style dense decoder of that size)."""


def model_for(name: str):
    for key, params in INFERRED.items():
        if key in name:
            return infer_model(params), f"--params {params:g}"
    for key, preset in MODELS.items():
        if key in name:
            return load_model(preset), preset
    return None, None


def published_per_device(row: dict) -> float | None:
    """Published tokens/s per device, or None for a figure that is not a rate."""
    unit, value, n = row["metric_unit"], row["metric_value"], row["num_devices"]
    if unit == "tokens/s per device":
        return value
    if unit.startswith("tokens/s (whole") or unit == "tokens/s":
        return value / n
    if unit.startswith("sequences/s") and isinstance(row["seq_len"], int):
        return value * row["seq_len"] / n
    return None


def skip_reason(row: dict, model) -> str | None:
    if "BERT" in row["model"]:
        return "BERT is an encoder: nvfree models decoders"
    if published_per_device(row) is None:
        return f"{row['metric_unit']}: needs the tokens to convergence"
    if model is None:
        return "model not in the catalogue"
    try:
        load_device(row["device"])
    except NvfreeError:
        return "device not in the catalogue"
    if not isinstance(row["seq_len"], int):
        return "sequence length not published"
    return None


def predict(row: dict, model) -> tuple[float | None, str]:
    """(nvfree tokens/s per device, the setup it chose) at the row's configuration."""
    device = load_device(row["device"])
    n = row["num_devices"]
    method = "lora" if row["method"].startswith("lora") else "full"
    lora = {k: row[k] for k in ("lora_rank", "lora_targets") if k in row}
    setup = build_setup(device, None, method=method, seq_len=row["seq_len"], dtype="bf16",
                        tokens=1e9, **lora)
    gb = row["global_batch"]
    fixed = Fixed(global_batch=gb) if isinstance(gb, int) else Fixed()
    found = best_at(model, [setup], device, None, n, fixed)
    if found is None:
        return None, "no fit"
    s = found.setup
    tokens = s.global_tokens_per_step / found.step_seconds / n
    return tokens, (f"z{s.zero_stage} b{s.batch_size}×{s.grad_accum}"
                    f"{' ckpt' if s.checkpointing else ''}")


def rows() -> list[dict]:
    table = tomllib.loads((ROOT / "data" / "published_throughput.toml").read_text())["rows"]
    out = []
    for row in table:
        model, label = model_for(row["model"])
        reason = skip_reason(row, model)
        entry = {"row": row, "model": label, "skip": reason}
        if reason is None:
            entry["published"] = published_per_device(row)
            entry["predicted"], entry["setup"] = predict(row, model)
            if entry["predicted"] is not None:
                entry["error"] = entry["predicted"] / entry["published"] - 1
        out.append(entry)
    return out


def markdown(entries: list[dict]) -> str:
    lines = ["| source | date | device × N | model | method, precision | seq | published "
             "tok/s/device | nvfree tok/s/device (setup) | error |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for e in entries:
        if e["skip"] is not None:
            continue
        r = e["row"]
        fp8 = " (published fp8, nvfree bf16)" if "fp8" in str(r["precision"]).lower() else ""
        pred = ("no fit" if e["predicted"] is None
                else f"{e['predicted']:,.0f} ({e['setup']})")
        err = "–" if e["predicted"] is None else f"{e['error']:+.0%}"
        lines.append(f"| {r['source_name']} | {r['date'][:10]} | {r['device']} × "
                     f"{r['num_devices']} | {e['model']} | {r['method'].split(' ')[0]}, "
                     f"{str(r['precision'])[:12]}{fp8} | {r['seq_len']} | "
                     f"{e['published']:,.0f} | {pred} | {err} |")
    return "\n".join(lines)


def summary(entries: list[dict]) -> str:
    def stats(errors: list[float]) -> str:
        if not errors:
            return "none"
        ratios = [max(1 + e, 1 / (1 + e)) for e in errors]
        median = statistics.median(abs(e) for e in errors)
        return (f"{len(errors)} rows, median |error| {median:.0%}, "
                f"max ratio {max(ratios):.1f}×")

    compared = [e for e in entries if e["skip"] is None and e["predicted"] is not None]
    bf16 = [e for e in compared if "fp8" not in str(e["row"]["precision"]).lower()]
    skipped = [e for e in entries if e["skip"] is not None]
    lines = [f"- all compared rows: {stats([e['error'] for e in compared])}",
             f"- without the fp8 rows: {stats([e['error'] for e in bf16])}",
             f"- skipped: {len(skipped)} rows ("
             + "; ".join(sorted({e['skip'] for e in skipped})) + ")"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.parse_args()
    entries = rows()
    print(markdown(entries))
    print()
    print(summary(entries))


if __name__ == "__main__":
    main()
