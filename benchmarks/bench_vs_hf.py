"""The bundled executor vs Hugging Face transformers + PEFT (+ bitsandbytes NF4) on this machine.

Same random checkpoint (saved once by transformers, loaded by both), same batch, sequence,
method, optimizer (torch's AdamW, fused: each side's default, see build_optimizer) and
precision; every (implementation, config) runs in a fresh
subprocess, one after the other, so peak RSS (VmHWM, reset through /proc/self/clear_refs after
the model and optimizer are built) is per run. Prints, per config: tokens/s of each and the ratio,
peak RSS of each and the ratio, model-FLOPs rate as a share of the GEMM peak measured in this run
at the training shapes, and the first-step loss of each (equal weights ⇒ equal loss).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_vs_hf.py            # all configs
    PYTHONPATH=. .venv/bin/python benchmarks/bench_vs_hf.py --only dense-lora-bf16 --steps 2
    PYTHONPATH=. .venv/bin/python benchmarks/bench_vs_hf.py --threads 1 --rounds 2   # shared box
    PYTHONPATH=. .venv/bin/python benchmarks/bench_vs_hf.py --compile --warmup 2 --only ...

--ours-as-shipped runs our side under the malloc the `nvfree` command picks (tcmalloc where it
is installed) and HF under this process's (glibc unless preloaded); without it both run under
this process's malloc.

--profile profiles one more step per run and splits it into the kernels both sides share (GEMM,
SDPA, optimizer) and the rest; it prints the speed ratio ours would reach if the rest took no
time (HF's step over our shared kernels) and the GEMM-peak share if only our GEMMs and attention
ran — the ceilings these kernels set on the goals.

--compile adds a third side, ours with compile_blocks (what `nvfree train --compile` runs), in the
same alternating rounds: each config then prints the eager row, the compiled row (both against
the same HF runs) and compiled / eager. The compile runs in the untimed warm-up steps; the peak
RSS covers it (inductor's memory included), "steady MiB" is the peak of the timed steps alone
(VmHWM reset after the warm-up, so it still counts what the compiler left resident).

Needs transformers and peft; QLoRA on the HF side needs bitsandbytes ≥ 0.48 (CPU backend).
Model FLOPs per token (PaLM appendix B convention, no recompute counted):
    full: 6·N_matmul + 12·L·H·C·T        LoRA/QLoRA: 4·N_matmul + 6·N_lora + 12·L·H·C·T
N_matmul = weights of every matmul a token passes (active experts only, lm_head included,
input embedding excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from estimator.allocator import active_allocator, find_library, preload_env

DENSE = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
         "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4}
MOE = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1024,
       "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
       "num_local_experts": 8, "num_experts_per_tok": 2}
ARCHS = {"dense": ("LlamaConfig", "LlamaForCausalLM", DENSE),
         "moe": ("MixtralConfig", "MixtralForCausalLM", MOE)}
LORA_RANK, LORA_ALPHA = 16, 32.0
TARGETS = {"dense": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           # transformers 5 stores Mixtral experts as fused 3-D tensors PEFT cannot wrap as
           # linears: both sides adapt attention only, so the comparison stays like for like.
           "moe": ("q_proj", "k_proj", "v_proj", "o_proj")}
CONFIGS = [f"{a}-{m}-{p}" for a in ARCHS for m in ("full", "lora") for p in ("fp32", "bf16")]
CONFIGS += [f"{a}-qlora-bf16" for a in ARCHS]
CONFIGS += [f"{a}-lora-bf16base" for a in ARCHS]
"""bf16base: LoRA on a bf16 base, both sides holding the same 16-bit weights. Ours computes in
fp32, upcasting each weight per matmul (`nvfree train --bits 16 --dtype fp32`,
executor/lora.upcast_frozen_base); HF has no such path, so it runs the bf16 base as its bf16
config does (bf16 autocast). On a CPU without bf16 matrix units this is the memory-for-speed
choice a user faces."""
GEMM_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16base": "fp32"}
"""The dtype our side's GEMMs run in, by config precision (the peak its rate is a share of)."""


# ---------------------------------------------------------------- worker (one fresh process)

def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def spec_for(arch: str):
    from estimator.specs import ModelSpec, MoESpec

    c = ARCHS[arch][2]
    moe = None
    if "num_local_experts" in c:
        moe = MoESpec(num_experts=c["num_local_experts"],
                      num_experts_per_token=c["num_experts_per_tok"],
                      expert_intermediate_size=c["intermediate_size"])
    return ModelSpec(name=f"bench-{arch}", num_layers=c["num_hidden_layers"],
                     hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                     num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                     head_dim=c["hidden_size"] // c["num_attention_heads"],
                     vocab_size=c["vocab_size"], moe=moe)


def build_ours(ckpt: Path, arch: str, method: str, precision: str, compile_: bool = False):
    """The executor's model as `nvfree train` builds it (LoRA, NF4, then compile_blocks)."""
    import torch

    from estimator.executor.hf import load_hf_model
    from estimator.executor.lora import apply_lora
    from estimator.executor.nf4 import apply_nf4

    bf16 = precision in ("bf16", "bf16base")
    storage = torch.bfloat16 if bf16 and method != "full" else torch.float32
    _, model = load_hf_model(ckpt, dtype=storage, spec=spec_for(arch))
    if method != "full":
        apply_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=TARGETS[arch],
                   adapter_dtype=torch.float32)
    if precision == "bf16base":
        from estimator.executor.lora import upcast_frozen_base

        upcast_frozen_base(model, torch.float32)
    if method == "qlora":
        apply_nf4(model, double_quant=True, compute_dtype=torch.bfloat16)
    if compile_:
        from estimator.executor.checkpointing import compile_blocks

        compile_blocks(model)

    def loss_fn(tokens):  # the executor's fused lm_head + cross-entropy (no B·T·V logits)
        return model.loss(tokens[:, :-1], tokens[:, 1:])

    return model, loss_fn


def build_hf(ckpt: Path, arch: str, method: str, precision: str):
    import torch
    import transformers

    bf16 = precision in ("bf16", "bf16base")
    kwargs = {"dtype": torch.bfloat16 if bf16 and method != "full" else torch.float32,
              "attn_implementation": "sdpa"}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    if method != "full":
        import peft

        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=list(TARGETS[arch]), task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)  # fp32 adapters on a 16-bit base (default)
    model.train()

    def loss_fn(tokens):  # the upcast + cross-entropy of HF's ForCausalLMLoss, on the same T
        logits = model(input_ids=tokens[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 tokens[:, 1:].flatten())

    return model, loss_fn


def build_optimizer(args: argparse.Namespace, model, params: list, precision: str):
    """Each side's own default: ours the trainer's (executor/optim.py: torch AdamW, fused on
    CPU) with its heap trim before the loss head; HF the optimizer TrainingArguments picks by
    default (`adamw_torch_fused` for torch ≥ 2.8: the same fused AdamW; `adamw_torch`, the
    foreach loop, before), at lr 1e-5 and no weight decay on both sides."""
    import torch

    if args.impl == "hf":
        import transformers

        default = transformers.TrainingArguments(output_dir=tempfile.gettempdir()).optim
        fused = getattr(default, "value", default) == "adamw_torch_fused"
        return torch.optim.AdamW(params, lr=1e-5, fused=True if fused else None)
    from estimator.executor.optim import adamw
    from estimator.executor.train import trim_heap_before_loss_head

    trim_heap_before_loss_head(model)
    return adamw(params, lr=1e-5)


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch, method, precision = args.config.split("-")
    rss_start = vm_kib("VmRSS")
    if args.impl in ("ours", "ours-compiled"):
        model, loss_fn = build_ours(Path(args.ckpt), arch, method, precision,
                                    args.impl == "ours-compiled")
    else:
        model, loss_fn = build_hf(Path(args.ckpt), arch, method, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(args, model, params, precision)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARCHS[arch][2]["vocab_size"], (args.batch, args.seq + 1),
                           generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16" or (
        precision == "bf16base" and args.impl == "hf"))
    backward_step = args.impl != "hf" and method == "full" and args.optimizer_in_backward
    if backward_step:
        from estimator.executor.optim import BackwardStep

        BackwardStep(opt, params)
    rss_built = vm_kib("VmRSS")
    reset_peak()
    times, losses = [], []
    warmup_peak_kib = 0

    def train_step() -> float:
        with autocast:
            loss = loss_fn(tokens)
        loss.backward()
        if not backward_step:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # the timed steps' own peak from here (compile excluded)
            warmup_peak_kib = vm_kib("VmHWM")
            reset_peak()
        t0 = time.perf_counter()
        loss = train_step()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    peak_kib, steady_peak_kib = max(warmup_peak_kib, vm_kib("VmHWM")), vm_kib("VmHWM")
    profile = None
    if args.profile:  # one more step, untimed, under the profiler (after the peaks are read)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_step()
        profile = kernel_seconds(prof.key_averages())
    # best timed step: robust to other processes on a shared machine (median also reported)
    step_seconds = min(times[args.warmup:])
    return {"tokens_per_second": args.batch * args.seq / step_seconds,
            "step_seconds": step_seconds,
            "median_step_seconds": statistics.median(times[args.warmup:]),
            "peak_kib": peak_kib, "steady_peak_kib": steady_peak_kib, "profile": profile,
            "built_kib": rss_built, "start_kib": rss_start, "first_loss": losses[0],
            "num_trainable": sum(p.numel() for p in params),
            "optimizer": "fused AdamW" if opt.defaults.get("fused") else "AdamW (foreach)",
            "malloc": active_allocator()}


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
            "mkldnn::_linear_pointwise"}


def kernel_seconds(events) -> dict[str, float]:
    """Self CPU seconds of one profiled step by the kernels both sides share — GEMMs, SDPA
    (forward and backward) and the optimizer step — and in all. Whatever else a step does
    (casts, elementwise, norms, the loss, dequantisation, autograd bookkeeping) is the part an
    implementation can remove; the shared kernels bound how far it can get ahead."""
    out = {"gemm": 0.0, "attention": 0.0, "optimizer": 0.0, "total": 0.0}
    for e in events:
        seconds = e.self_cpu_time_total / 1e6
        out["total"] += seconds
        name = e.key.lower()
        if e.key in GEMM_OPS:
            out["gemm"] += seconds
        elif "scaled_dot_product" in name or "flash_attention" in name:
            out["attention"] += seconds
        elif "adam" in name or name.startswith("aten::_foreach_"):
            out["optimizer"] += seconds
    return out


# ---------------------------------------------------------------- parent

def save_checkpoints(root: Path) -> dict[str, Path]:
    import torch
    import transformers

    paths = {}
    for arch, (config_cls, model_cls, kwargs) in ARCHS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs, max_position_embeddings=4096)
        getattr(transformers, model_cls)(config).save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


def gemm_peak(shapes: list[tuple[int, int, int]], dtype) -> float:
    """Best matmul FLOP/s over the training GEMM shapes (M×K @ K×N): fastest of 10 timings per
    shape after 3 warm-ups, so a busy moment on a shared machine does not lower the peak."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        for _ in range(10):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


def model_flops_per_token(arch: str, method: str, seq: int) -> float:
    from estimator.analytic.params import count_params
    from estimator.specs import TrainSetup

    spec = spec_for(arch)
    counts = count_params(spec, TrainSetup())
    n_matmul = counts.active_per_token - counts.embedding - (
        sum(counts.components[k] for k in ("norms",)))
    attention = 12 * spec.num_layers * spec.num_heads * spec.head_dim * seq
    if method == "full":
        return 6 * n_matmul + attention
    lora = sum(LORA_RANK * 2 * spec.hidden_size for _ in TARGETS[arch]) * spec.num_layers
    return 4 * n_matmul + 6 * lora + attention


def predicted_peak_bytes(arch: str, method: str, precision: str,
                         args: argparse.Namespace) -> int | None:
    """The analytic model's peak for the same run (estimator.estimate on the local device)."""
    from estimator import estimate
    from estimator.specs import TrainSetup

    bits = {"full": 32, "lora": 16 if precision != "fp32" else 32, "qlora": 4}[method]
    compute = "fp32" if precision == "bf16base" else precision
    setup = TrainSetup(method=method, weight_bits=bits, compute_dtype=compute,
                       framework="nvfree" if precision == "bf16base" else "hf",
                       mixed_precision=precision == "bf16", optimizer="adamw",
                       lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_targets=TARGETS[arch],
                       batch_size=args.batch, seq_len=args.seq,
                       optimizer_in_backward=method == "full" and args.optimizer_in_backward)
    try:
        return estimate(spec_for(arch), setup, device="local").memory.total_bytes
    except Exception:  # the benchmark reports what it can; the estimate is advisory here
        return None


def run_one(impl: str, config: str, ckpt: Path, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--config", config,
           "--ckpt", str(ckpt), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (
               ["--optimizer-in-backward"] if args.optimizer_in_backward else []) + (
               ["--profile"] if args.profile else [])
    env = os.environ.copy()
    if args.ours_as_shipped and impl.startswith("ours"):  # the malloc `nvfree` would run
        env = preload_env(env, find_library("tcmalloc")) or env
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of_rounds(config: str, ckpt: Path, args: argparse.Namespace) -> tuple:
    """Alternate ours (eager, and compiled with --compile) / HF for ``args.rounds`` rounds; keep
    each side's fastest run and its lowest peak memory, so a busy spell on a shared machine
    hits every side alike. Returns one result (or failure line) per side: ours, HF, compiled."""
    runs: dict[str, list] = {"ours": [], "hf": []}
    if args.compile:
        runs["ours-compiled"] = []
    for _ in range(args.rounds):
        for impl in runs:
            runs[impl].append(run_one(impl, config, ckpt, args))
    best = []
    for results in runs.values():
        ok = [r for r in results if not isinstance(r, str)]
        best.append(max(ok, key=lambda r: r["tokens_per_second"]) if ok else results[0])
        if ok:
            for key in ("peak_kib", "steady_peak_kib"):
                best[-1][key] = min(r[key] for r in ok)
    return tuple(best)


def main(args: argparse.Namespace) -> None:
    import torch

    configs = args.only.split(",") if args.only else CONFIGS
    n = args.batch * args.seq
    shapes = {a: [(n, c["hidden_size"], c["intermediate_size"]),
                  (n, c["hidden_size"], c["vocab_size"])] for a, (_, _, c) in ARCHS.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} × "
          f"seq {args.seq}, {args.warmup} warm-up + {args.steps} timed steps (best step), "
          f"best of {args.rounds} alternating rounds per side")
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = save_checkpoints(Path(tmp))
        wanted = {(c.split("-")[0], GEMM_DTYPE[c.split("-")[2]]) for c in configs}
        peaks = {(a, p): gemm_peak(shapes[a], torch.bfloat16 if p == "bf16" else torch.float32)
                 for a, p in sorted(wanted)}
        for (a, p), v in peaks.items():
            print(f"GEMM peak {a} {p}: {v / 1e9:.0f} GFLOP/s (best of the training shapes)")
        header = (f"{'config':<29}{'ours tok/s':>11}{'HF tok/s':>10}{'ratio':>7}"
                  f"{'ours MiB':>10}{'HF MiB':>9}{'mem':>6}{'ours %pk':>9}{'HF %pk':>8}"
                  f"{'loss ours/HF':>16}{'steady MiB':>11}{'pred MiB':>10}")
        print(header)
        results = []
        for config in configs:
            arch, method, precision = config.split("-")
            ours, hf, *compiled = best_of_rounds(config, ckpts[arch], args)
            predicted = predicted_peak_bytes(arch, method, precision, args)
            flops = model_flops_per_token(arch, method, args.seq)
            for name, mine in ((config, ours), *((f"{config} compiled", c) for c in compiled)):
                row = format_row(name, mine, hf, peaks[(arch, GEMM_DTYPE[precision])], flops)
                print(row + (f"{predicted / 2**20:>10.0f}" if predicted else "         -"),
                      flush=True)
            if compiled:
                print(compiled_vs_eager(compiled[0], ours), flush=True)
            if not isinstance(ours, str) and not isinstance(hf, str):
                print(f"  optimizer: ours {ours['optimizer']}, HF {hf['optimizer']}; malloc: "
                      f"ours {ours['malloc']}, HF {hf['malloc']}", flush=True)
                for name, mine in (("ours", ours), *(("compiled", c) for c in compiled)):
                    if args.profile and not isinstance(mine, str):
                        print(ceiling_line(name, mine, hf, peaks[(arch, GEMM_DTYPE[precision])],
                                           flops * n), flush=True)
            results.append({"config": config, "ours": ours, "hf": hf,
                            "ours_compiled": compiled[0] if compiled else None,
                            "predicted_peak_bytes": predicted})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


def format_row(config: str, ours, hf, peak: float, flops_per_token: float) -> str:
    if isinstance(ours, str) or isinstance(hf, str):
        return f"{config:<29} ours: {ours if isinstance(ours, str) else 'ok'} | HF: " \
               f"{hf if isinstance(hf, str) else 'ok'}"
    share = [r["tokens_per_second"] * flops_per_token / peak * 100 for r in (ours, hf)]
    return (f"{config:<29}{ours['tokens_per_second']:>11.0f}{hf['tokens_per_second']:>10.0f}"
            f"{ours['tokens_per_second'] / hf['tokens_per_second']:>6.2f}×"
            f"{ours['peak_kib'] / 1024:>10.0f}{hf['peak_kib'] / 1024:>9.0f}"
            f"{ours['peak_kib'] / hf['peak_kib']:>5.2f}×{share[0]:>8.0f}%{share[1]:>7.0f}%"
            f"{ours['first_loss']:>9.3f}/{hf['first_loss']:.3f}"
            f"{ours['steady_peak_kib'] / 1024:>11.0f}")


def ceiling_line(name: str, mine: dict, hf: dict, peak: float, flops_per_step: float) -> str:
    """The profiled step split into shared kernels and the rest, per side; the speed ratio ours
    would reach if everything but the shared kernels took no time (HF's step over our shared
    kernels' time), and the share of the GEMM peak the model FLOPs would reach if only our GEMMs
    and attention ran."""
    a, b = mine["profile"], hf["profile"]
    shared = a["gemm"] + a["attention"] + a["optimizer"]
    parts = " · ".join(f"{k} {a[k]:.2f}/{b[k]:.2f}" for k in ("gemm", "attention", "optimizer"))
    rest = [p["total"] - p["gemm"] - p["attention"] - p["optimizer"] for p in (a, b)]
    return (f"  profile {name}/HF (s): {parts} · rest {rest[0]:.2f}/{rest[1]:.2f} · step "
            f"{a['total']:.2f}/{b['total']:.2f}; ceiling {hf['step_seconds'] / shared:.2f}× "
            f"(HF step / our shared kernels), "
            f"{flops_per_step / (a['gemm'] + a['attention']) / peak * 100:.0f} % of peak "
            f"(model FLOPs / our GEMM + attention time)")


def compiled_vs_eager(compiled, eager) -> str:
    """One line: the compiled run's speed and memory relative to the eager one."""
    if isinstance(compiled, str) or isinstance(eager, str):
        return "  compiled / eager: -"
    speed = compiled["tokens_per_second"] / eager["tokens_per_second"]
    peak = compiled["peak_kib"] / eager["peak_kib"]
    steady = compiled["steady_peak_kib"] / eager["steady_peak_kib"]
    return (f"  compiled / eager: tokens/s {speed:.2f}×, median step "
            f"{compiled['median_step_seconds']:.2f} / {eager['median_step_seconds']:.2f} s, "
            f"peak {peak:.2f}×, steady peak {steady:.2f}×, first loss "
            f"{compiled['first_loss']:.4f} / {eager['first_loss']:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated configs: " + ",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default="", help="also write every measurement to this file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side")
    parser.add_argument("--compile", action="store_true",
                        help="also ours with compile_blocks, side by side with eager ours and HF "
                             "(use --warmup 2: the compile is untimed)")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="ours: full fine-tunes step the optimizer inside backward "
                             "(`nvfree train --optimizer-in-backward`)")
    parser.add_argument("--ours-as-shipped", action="store_true",
                        help="run our side under the malloc the nvfree command picks (tcmalloc "
                             "where installed: estimator/allocator.py), HF under this process's")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step per run: time in the kernels both sides "
                             "share (GEMM, SDPA, optimizer) and the ceilings they set")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("ours", "ours-compiled", "hf"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(cli)))
    else:
        main(cli)
