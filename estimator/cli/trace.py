"""`nvfree trace`: one training step of the framework's real model code on fake tensors, its
peak tensor memory by phase, module and category, beside the analytic estimate."""

from typing import Annotated, Literal

import typer

from estimator.cli.options import (
    AttentionOpt,
    BatchOpt,
    BitsOpt,
    CkptOpt,
    DoubleQuantOpt,
    DtypeOpt,
    JsonOpt,
    LoraAlphaOpt,
    LoraRankOpt,
    LoraTargetsOpt,
    MethodOpt,
    MixedOpt,
    OptimizerOpt,
    SeqOpt,
)

TraceModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Preset name (see `nvfree models`), or a config.json / model "
                          "directory of a model type transformers ships (no remote code).")]
FrameworkOpt = Annotated[Literal["hf"], typer.Option(
    "--framework", help="Whose training code to trace: hf = transformers + PEFT + bitsandbytes "
                        "+ torch AdamW (HF Trainer).")]
ExpertsOpt = Annotated[Literal["grouped_mm", "eager"], typer.Option(
    "--experts", help="MoE experts path: grouped_mm (transformers' default) or eager (the "
                      "per-expert loop, traced with balanced routing).")]
EstimateDeviceOpt = Annotated[str, typer.Option(
    "--device", "-d", help="Catalogue device of the analytic estimate shown beside the trace.")]
TopOpt = Annotated[int, typer.Option("--top", min=1, help="Modules to list.")]


def trace(
    model: TraceModelOpt, method: MethodOpt = None, bits: BitsOpt = None, dtype: DtypeOpt = "auto",
    lora_rank: LoraRankOpt = 16, lora_alpha: LoraAlphaOpt = 32.0,
    lora_targets: LoraTargetsOpt = "all-linear", batch_size: BatchOpt = 1,
    seq_len: SeqOpt = 2048, checkpointing: CkptOpt = False, optimizer: OptimizerOpt = "adamw",
    mixed_precision: MixedOpt = True, attention: AttentionOpt = "sdpa",
    double_quant: DoubleQuantOpt = True, framework: FrameworkOpt = "hf",
    experts: ExpertsOpt = "grouped_mm", device: EstimateDeviceOpt = "h100-sxm",
    top: TopOpt = 10, json: JsonOpt = False,
) -> None:
    """Trace one training step of the real model code (transformers + PEFT + bitsandbytes) on
    fake tensors: exact tensor memory at any model size, beside the analytic estimate."""
    from estimator.cli.options import resolve_device, resolve_setup
    from estimator.trace import trace_report

    dev, profile, _ = resolve_device(device)
    setup = resolve_setup(method=method, bits=bits, dtype=dtype, device=dev, profile=profile,
                          lora_targets=lora_targets, tokens=None,
                          mixed_precision=mixed_precision, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, batch_size=batch_size, seq_len=seq_len,
                          checkpointing=checkpointing, optimizer=optimizer,
                          attention=attention, double_quant=double_quant, fused_loss=False)
    report = trace_report(model, setup, device=device, framework=framework, experts=experts)
    if json:
        typer.echo(report.model_dump_json(indent=2))
        return
    from rich.console import Console

    from estimator.report.trace import render_trace

    render_trace(report, Console(), top=top)


def register(app: typer.Typer) -> None:
    """Add `trace` to the app."""
    app.command()(trace)
