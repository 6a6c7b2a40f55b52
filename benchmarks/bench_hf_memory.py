"""Peak memory of real Hugging Face Trainer + PEFT (+ bitsandbytes) runs on this CPU against
`nvfree estimate --framework hf` for the same setup.

Every configuration runs in a fresh subprocess that does what a user's script does: build
the model with transformers (from_pretrained of a random checkpoint this script saved, in the
storage dtype; 4-bit: BitsAndBytesConfig NF4), wrap it with PEFT, and train it with
`transformers.Trainer` (TrainingArguments defaults: adamw_torch_fused, max_grad_norm 1.0;
bf16=True for 16-bit compute; gradient_checkpointing with transformers' default
use_reentrant=False) for a few optimizer steps on packed sequences of random tokens. Peak RSS
is VmHWM, reset through /proc/self/clear_refs at `on_train_begin` (model and optimizer built,
no step run yet), so it covers every training step, the first one's optimizer-state
allocation included. The estimate is `estimator.api.estimate` on this machine's CPU (memory
terms do not depend on calibration).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf_memory.py                 # every config
    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf_memory.py --only tiny-full-fp32
    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf_memory.py --json out.json

Prints per configuration: measured peak, predicted peak (and the band the estimate states),
error, and the measured baseline (RSS after the imports, after the model build).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = {
    # Llama, 110M: the shape of bench_vs_hf's dense model
    "llama110m": ("LlamaConfig", {"vocab_size": 32000, "hidden_size": 768,
                                  "intermediate_size": 2048, "num_hidden_layers": 12,
                                  "num_attention_heads": 12, "num_key_value_heads": 4}),
    # Qwen2, 360M with a 152k vocabulary, tied (Qwen2.5-0.5B's vocabulary, narrower)
    "qwen360m": ("Qwen2Config", {"vocab_size": 151936, "hidden_size": 896,
                                 "intermediate_size": 2432, "num_hidden_layers": 12,
                                 "num_attention_heads": 14, "num_key_value_heads": 2,
                                 "tie_word_embeddings": True}),
    # Qwen3 (per-head q/k norms), 250M
    "qwen3-250m": ("Qwen3Config", {"vocab_size": 50000, "hidden_size": 1024,
                                   "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 16, "num_key_value_heads": 8,
                                   "head_dim": 64, "tie_word_embeddings": True}),
    # TinyLlama-1.1B's shape
    "llama1b": ("LlamaConfig", {"vocab_size": 32000, "hidden_size": 2048,
                                "intermediate_size": 5632, "num_hidden_layers": 22,
                                "num_attention_heads": 32, "num_key_value_heads": 4}),
    # Mixtral, 8 experts top-2, 270M total
    "mixtral270m": ("MixtralConfig", {"vocab_size": 32000, "hidden_size": 768,
                                      "intermediate_size": 1536, "num_hidden_layers": 8,
                                      "num_attention_heads": 12, "num_key_value_heads": 4,
                                      "num_local_experts": 8, "num_experts_per_tok": 2}),
}

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def config(arch: str, method: str, dtype: str, batch: int, seq: int, **extra) -> dict:
    """One matrix row: TrainSetup fields plus the architecture."""
    row = {"arch": arch, "method": method, "compute_dtype": dtype, "batch_size": batch,
           "seq_len": seq, "weight_bits": 4 if method == "qlora" else (
               32 if dtype == "fp32" else 16),
           "lora_targets": ALL_LINEAR}
    row.update(extra)
    row["name"] = "-".join([arch, method, dtype, f"b{batch}s{seq}"] + [
        k.replace("_", "") + ("" if v is True else str(v).replace(",", "").replace(" ", ""))
        for k, v in extra.items() if k not in ("lora_targets",)])
    return row


MATRIX = [
    config("llama110m", "full", "fp32", 4, 256),
    config("llama110m", "full", "fp32", 8, 512, checkpointing=True),
    config("llama110m", "full", "bf16", 2, 256),
    config("llama110m", "lora", "fp32", 1, 1024),
    config("llama110m", "lora", "bf16", 2, 512, checkpointing=True),
    config("llama110m", "lora", "fp32", 2, 1024, lora_dropout=0.05),
    config("llama110m", "qlora", "bf16", 1, 512),
    config("qwen360m", "full", "fp32", 1, 256),
    config("qwen360m", "lora", "fp32", 2, 512),
    config("qwen360m", "lora", "bf16", 1, 1024, checkpointing=True),
    config("qwen360m", "qlora", "bf16", 1, 256),
    config("qwen3-250m", "lora", "bf16", 1, 512, attention="eager"),
    config("qwen3-250m", "full", "fp32", 2, 512, grad_accum=2),
    config("llama1b", "lora", "fp32", 1, 512, lora_targets=("q_proj", "v_proj")),
    config("llama1b", "qlora", "fp32", 2, 1024, checkpointing=True),
    config("mixtral270m", "full", "fp32", 2, 512),
    config("mixtral270m", "full", "bf16", 1, 256),
    config("mixtral270m", "lora", "fp32", 4, 1024, checkpointing=True,
           lora_targets=ATTENTION),
    config("mixtral270m", "qlora", "bf16", 1, 512, lora_targets=ATTENTION),
]
SETUP_FIELDS = ("method", "compute_dtype", "batch_size", "seq_len", "weight_bits",
                "lora_targets", "checkpointing", "lora_dropout", "attention", "grad_accum")


# ---------------------------------------------------------------- worker (one fresh process)

def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h), every field a size_t."""

    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def heap_mib() -> list[int]:
    """glibc's heap: [arena bytes, bytes in use] in MiB (mallinfo2, every arena)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return [info.arena >> 20, info.uordblks >> 20]


def worker(row: dict, ckpt: Path, steps: int) -> dict:
    start_kib = vm_kib("VmRSS")
    import torch
    import transformers

    imports_kib = vm_kib("VmRSS")
    bf16 = row["compute_dtype"] == "bf16"
    dtype = torch.bfloat16 if bf16 and row["method"] != "full" else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": row.get("attention", "sdpa")}
    if row["method"] == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        kwargs["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    if row["method"] != "full":
        import peft

        from estimator.specs.setup import LINEAR_TARGETS

        if row["method"] == "qlora":  # the QLoRA recipe PEFT documents
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(row.get("checkpointing")),
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=row.get("lora_dropout", 0.0),
            target_modules=("all-linear" if set(LINEAR_TARGETS) <= set(row["lora_targets"])
                            else list(row["lora_targets"])), task_type="CAUSAL_LM"))
    built_kib = vm_kib("VmRSS")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    n = row["batch_size"] * row.get("grad_accum", 1) * steps
    ids = torch.randint(0, vocab, (n, row["seq_len"]), generator=gen)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    peaks: dict[str, int] = {}
    step_seconds: list[float] = []

    class Peak(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            peaks["train_begin_kib"] = vm_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")

        def on_step_begin(self, args, state, control, **kw):
            step_seconds.append(-time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            step_seconds[-1] += time.perf_counter()
            peaks[f"step{state.global_step}_kib"] = vm_kib("VmHWM")
            peaks[f"step{state.global_step}_heap_mib"] = heap_mib()

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=row["batch_size"],
        gradient_accumulation_steps=row.get("grad_accum", 1), max_steps=steps,
        learning_rate=1e-5, bf16=bf16, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
        gradient_checkpointing=bool(row.get("checkpointing")))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[Peak()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"peak_kib": vm_kib("VmHWM"), "start_kib": start_kib, "imports_kib": imports_kib,
            "built_kib": built_kib, "seconds": seconds, "optimizer": str(args.optim),
            "step_seconds": step_seconds, "threads": torch.get_num_threads(), **peaks}


# ---------------------------------------------------------------- parent

def save_checkpoint(root: Path, arch: str) -> Path:
    path = root / arch
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    config_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, max_position_embeddings=4096)
    # in bf16, as models are published: from_pretrained converts it where the run needs fp32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def predict(row: dict, ckpt: Path) -> dict:
    """nvfree's estimate for the row: framework hf, this machine's CPU."""
    from estimator.api import estimate
    from estimator.catalog import load_model
    from estimator.specs import TrainSetup

    spec = load_model(str(ckpt / "config.json"))
    fields = {k: row[k] for k in SETUP_FIELDS if k in row}
    fields["mixed_precision"] = row["compute_dtype"] != "fp32"
    setup = TrainSetup(framework="hf", lora_rank=16, lora_alpha=32, **fields)
    est = estimate(spec, setup, "local")
    return {"total_bytes": est.memory.total_bytes, "components": est.memory.components,
            "upper_bytes": est.memory.upper_bytes,
            "step_seconds": est.throughput.step_seconds,
            "calibrated": est.throughput.calibrated,
            "ops": {op.name: op.seconds for op in est.throughput.ops}}


def measure(row: dict, args: argparse.Namespace) -> dict | None:
    """One training run in a fresh process; its measurements, or None if it failed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, __file__, "--worker", row["name"], "--steps",
                          str(args.steps), "--ckpt-dir", args.ckpt_dir],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        print(f"{row['name']}: worker failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def steady_step_seconds(measured: dict) -> float | None:
    """The measured step time: the median of the steps after the first (the first allocates
    the optimizer state and warms the allocator); None for runs saved without step times."""
    steps = measured.get("step_seconds", [])[1:]
    return statistics.median(steps) if steps else None


def time_markdown(results: list[dict]) -> str:
    """Step time: measured (median of steps 2…) vs `estimate --framework hf` on this machine's
    profile, and the prediction's largest op groups."""
    lines = ["| configuration | measured s | predicted s | error | largest predicted ops |",
             "|---|---|---|---|---|"]
    for r in results:
        if r.get("time_error") is None:
            continue
        ops = sorted(r["predicted"]["ops"].items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{name} {sec:.2f}" for name, sec in ops)
        lines.append(f"| {r['config']} | {steady_step_seconds(r['measured']):.2f} | "
                     f"{r['predicted']['step_seconds']:.2f} | {r['time_error']:+.1%} | {top} |")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    """The matrix as docs/accuracy.md shows it: measured VmHWM, predicted, error, and the
    run's tensor terms vs the CPU process terms of the prediction."""
    lines = ["| configuration | measured MiB | predicted MiB | error | heap term MiB |",
             "|---|---|---|---|---|"]
    for r in results:
        heap = r["predicted"]["components"].get("heap_retention", 0)
        lines.append(f"| {r['config']} | {r['measured']['peak_kib'] / 1024:.0f} | "
                     f"{r['predicted']['total_bytes'] / 2**20:.0f} | {r['error']:+.1%} | "
                     f"{heap / 2**20:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated config names")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ckpt-dir",
                    default=str(Path(tempfile.gettempdir()) / "nvfree-hf-ckpt-bf16"))
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument("--measured", default="",
                    help="re-predict the measurements saved by an earlier --json run "
                         "(no training)")
    ap.add_argument("--measure-missing", action="store_true",
                    help="with --measured: also run the configs the file lacks")
    ap.add_argument("--markdown", action="store_true",
                    help="print the table of docs/accuracy.md at the end")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = {r["name"]: r for r in MATRIX}
    saved = {r["config"]: r["measured"] for r in json.loads(Path(args.measured).read_text())
             } if args.measured else {}
    if args.worker:
        row = rows[args.worker]
        print(json.dumps(worker(row, Path(args.ckpt_dir) / row["arch"], args.steps)))
        return
    chosen = [rows[n] for n in args.only.split(",")] if args.only else MATRIX
    if saved and not args.measure_missing:
        chosen = [r for r in chosen if r["name"] in saved]
    # saved rows first, then fp32 before bf16 (bf16 GEMMs are slow on CPUs without AVX-512 BF16)
    chosen.sort(key=lambda r: (r["name"] not in saved, r["compute_dtype"] != "fp32"))
    results = []
    for row in chosen:
        ckpt = save_checkpoint(Path(args.ckpt_dir), row["arch"])
        measured = saved.get(row["name"]) or measure(row, args)
        if measured is None:
            continue
        pred = predict(row, ckpt)
        peak = measured["peak_kib"] * 1024
        err = (pred["total_bytes"] - peak) / peak
        step = steady_step_seconds(measured)
        time_err = None if step is None else (pred["step_seconds"] - step) / step
        results.append({"config": row["name"], "measured": measured, "predicted": pred,
                        "error": err, "time_error": time_err})
        if args.json:  # after every run: a long matrix keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"{row['name']:48} measured {peak / 2**20:8.0f} MiB  predicted "
              f"{pred['total_bytes'] / 2**20:8.0f} MiB  {err:+7.1%}   imports "
              f"{measured['imports_kib'] / 1024:.0f} built {measured['built_kib'] / 1024:.0f} "
              f"MiB  {measured['seconds']:.0f} s", flush=True)
        if step is not None:
            print(f"{'':48} step {step:8.2f} s  predicted {pred['step_seconds']:8.2f} s  "
                  f"{time_err:+7.1%}{'' if pred['calibrated'] else '  (uncalibrated)'}",
                  flush=True)
    if results and args.markdown:
        print(markdown(results))
        print(time_markdown(results))
    if results:
        errors = [abs(r["error"]) for r in results]
        print(f"\n{len(results)} configs: |error| median {statistics.median(errors):.1%}, max "
              f"{max(errors):.1%}; under-predicted by > 5 %: "
              f"{sum(r['error'] < -0.05 for r in results)}")
        timed = [abs(r["time_error"]) for r in results if r["time_error"] is not None]
        if timed:
            print(f"step time, {len(timed)} configs: |error| median "
                  f"{statistics.median(timed):.1%}, max {max(timed):.1%}")


if __name__ == "__main__":
    main()
