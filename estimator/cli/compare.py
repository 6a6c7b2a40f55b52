"""`nvfree compare`: one model + setup on every catalogue device — fits, how many, hours, cost."""

from typing import Annotated, Literal

import typer

from estimator.cli.options import (
    ActiveParamsOpt,
    ActiveRatioOpt,
    JsonOpt,
    ModelOpt,
    ParamsOpt,
    PriceOpt,
    with_setup_options,
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


@with_setup_options("method", "bits", "dtype", "framework", "lora_rank", "lora_alpha",
                    "lora_targets", "lora_dropout", "batch_size", "seq_len", "grad_accum",
                    "checkpointing", "optimizer_in_backward", "optimizer", "mixed_precision",
                    "attention", "double_quant", "fused_loss", "tokens")
def compare(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, devices: DevicesOpt = None,
    objective: ObjectiveOpt = "time", max_hours: MaxHoursOpt = None,
    max_cost: MaxCostOpt = None, max_devices: MaxDevicesOpt = 1024, json: JsonOpt = False,
    plot: PlotOpt = None, price: PriceOpt = None,
    amortise_years: float = typer.Option(
        3.0, "--amortise-years", min=0.01,
        help="Bought hardware: years of use its purchase price is spread over."),
    usd_per_kwh: float = typer.Option(
        0.165, "--usd-per-kwh", min=0.0,
        help="Bought hardware: electricity price (USD/kWh) for its power draw."),
    link: float | None = typer.Option(
        None, "--link", min=0.001,
        help="Network between machines, Gb/s per device  [default: catalogue; 10 GbE between "
             "desktop machines; 400 Gb/s per accelerator]"),
    setup_flags: dict | None = None,
) -> None:
    """Compare every catalogue device (or --devices): fits on one? how many? hours, cost, and
    the recommended method; smaller models and free tiers when it does not fit."""
    from estimator.catalog.prices import PriceRule
    from estimator.cli.options import parse_prices
    from estimator.planner.compare import compare_request

    if plot is not None:
        from estimator.report.compare import check_plot_path

        check_plot_path(plot)  # before the search: a wrong suffix is one line, exit 2
    names = [n.strip() for n in devices.split(",") if n.strip()] if devices is not None else None
    result = compare_request(model, params=params, active_params=active_params,
                             active_ratio=active_ratio, devices=names, objective=objective,
                             max_hours=max_hours, max_cost_usd=max_cost,
                             max_devices=max_devices, prices=parse_prices(price),
                             price_rule=PriceRule(amortise_years, usd_per_kwh),
                             link_gbit_per_second=link,
                             **(setup_flags or {}))
    if json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        from rich.console import Console

        from estimator.report.compare import render_compare

        render_compare(result, Console())
    if plot is not None:
        from estimator.report.compare import PLOT_EXTRA_HINT, plot_available, plot_compare

        if plot_available():
            typer.echo(f"plot saved to {plot_compare(result, plot)}", err=json)
        else:  # the answer above stands; only the picture is missing
            typer.echo(f"plot skipped: {PLOT_EXTRA_HINT}", err=True)


def register(app: typer.Typer) -> None:
    """Add `compare` to the app."""
    app.command()(compare)
