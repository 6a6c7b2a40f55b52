"""`nvfree compare`: one model + setup on every catalogue device — fits, how many, hours, cost."""

from typing import Annotated, Literal

import typer

from estimator.cli.options import (
    AccumOpt,
    ActiveParamsOpt,
    ActiveRatioOpt,
    AttentionOpt,
    BackwardStepOpt,
    BatchOpt,
    BitsOpt,
    CkptOpt,
    DoubleQuantOpt,
    DtypeOpt,
    FrameworkOpt,
    FusedLossOpt,
    JsonOpt,
    LoraAlphaOpt,
    LoraRankOpt,
    LoraTargetsOpt,
    MethodOpt,
    MixedOpt,
    ModelOpt,
    OptimizerOpt,
    ParamsOpt,
    SeqOpt,
    TokensOpt,
)

DevicesOpt = Annotated[str | None, typer.Option(
    "--devices", help="Catalogue devices, comma-separated (see `nvfree devices`) [default: all].")]
ObjectiveOpt = Annotated[Literal["time", "cost"], typer.Option(
    "--objective", help="Sort by wall time or by cost.")]
MaxHoursOpt = Annotated[float | None, typer.Option(
    "--max-hours", min=0.0, help="Wall-time limit for the token budget (hours).")]
MaxCostOpt = Annotated[float | None, typer.Option(
    "--max-cost", min=0.0, help="Cost limit for the token budget (USD).")]
MaxDevicesOpt = Annotated[int, typer.Option(
    "--max-devices", min=1, help="Largest device count to consider per device kind.")]
PlotOpt = Annotated[str | None, typer.Option(
    "--plot", help="Also save memory, time and cost charts to PATH.png or PATH.svg "
                   "(needs matplotlib: pip install 'nvfree[plot]').")]


def compare(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, method: MethodOpt = None, bits: BitsOpt = None,
    dtype: DtypeOpt = "auto", lora_rank: LoraRankOpt = 16, lora_alpha: LoraAlphaOpt = 32.0,
    lora_targets: LoraTargetsOpt = "all-linear", batch_size: BatchOpt = 1,
    seq_len: SeqOpt = 2048, grad_accum: AccumOpt = 1, checkpointing: CkptOpt = False,
    optimizer_in_backward: BackwardStepOpt = False,
    optimizer: OptimizerOpt = "adamw", mixed_precision: MixedOpt = True,
    attention: AttentionOpt = "sdpa", double_quant: DoubleQuantOpt = True,
    fused_loss: FusedLossOpt = True, framework: FrameworkOpt = "hf", tokens: TokensOpt = None,
    devices: DevicesOpt = None, objective: ObjectiveOpt = "time", max_hours: MaxHoursOpt = None,
    max_cost: MaxCostOpt = None, max_devices: MaxDevicesOpt = 1024, json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """Compare every catalogue device (or --devices): fits on one? how many? hours, cost, and
    the recommended method; smaller models and free tiers when it does not fit."""
    from estimator.cli.options import resolve_model, resolve_setup
    from estimator.planner.compare import AUTO_METHODS, resolve_devices
    from estimator.planner.compare import compare as run_compare

    spec = resolve_model(model, params, active_params, active_ratio)
    names = [n.strip() for n in devices.split(",") if n.strip()] if devices is not None else None
    first = resolve_devices(names)[0]
    setup = resolve_setup(method=method, bits=bits, dtype="bf16" if dtype == "auto" else dtype,
                          device=first, profile=None, lora_targets=lora_targets, tokens=tokens,
                          mixed_precision=mixed_precision, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, batch_size=batch_size, seq_len=seq_len,
                          grad_accum=grad_accum, checkpointing=checkpointing,
                          optimizer_in_backward=optimizer_in_backward,
                          optimizer=optimizer, attention=attention, double_quant=double_quant,
                          fused_loss=fused_loss, framework=framework)
    auto_methods = method is None and bits is None
    result = run_compare(spec, setup, names, None,
                         methods=AUTO_METHODS if auto_methods else None,
                         auto_dtype_per_device=dtype == "auto", objective=objective,
                         max_hours=max_hours, max_cost_usd=max_cost, max_devices=max_devices)
    if plot is not None:
        from estimator.report.compare import plot_compare

        plot_compare(result, plot)
    if json:
        typer.echo(result.model_dump_json(indent=2))
        return
    from rich.console import Console

    from estimator.report.compare import render_compare

    render_compare(result, Console())
    if plot is not None:
        typer.echo(f"plot saved to {plot}")


def register(app: typer.Typer) -> None:
    """Add `compare` to the app."""
    app.command()(compare)
