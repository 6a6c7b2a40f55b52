"""`nvfree estimate`: memory, time, cost and a verdict for a model + setup + device."""

import typer

from estimator.cli.options import (
    ActiveParamsOpt,
    ActiveRatioOpt,
    DeviceMemoryOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    ParamsOpt,
    PriceOpt,
    with_setup_options,
)


@with_setup_options()
def estimate(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, device: DeviceOpt = "local",
    device_memory: DeviceMemoryOpt = None, json: JsonOpt = False,
    use_profile: bool = typer.Option(True, "--profile/--no-profile",
                                     help="Use this machine's calibration profile if present."),
    price: PriceOpt = None,
    link: float | None = typer.Option(
        None, "--link", help="Network between machines, Gb/s per device  [default: catalogue; "
                             "10 GbE between desktop machines; 400 Gb/s per accelerator]"),
    setup_flags: dict | None = None,
) -> None:
    """Estimate peak memory, step time, tokens/s, wall time and cost; say whether it fits."""
    from estimator.api import estimate as run_estimate
    from estimator.cli.options import parse_prices

    result = run_estimate(model, params=params, active_params=active_params,
                          active_ratio=active_ratio, device=device, use_profile=use_profile,
                          device_memory=device_memory, prices=parse_prices(price),
                          link_gbit_per_second=link,
                          **(setup_flags or {}))
    if json:
        typer.echo(result.model_dump_json(indent=2))
        return
    from rich.console import Console

    from estimator.report.estimate import render_estimate

    render_estimate(result, Console())


def register(app: typer.Typer) -> None:
    """Add `estimate` to the app."""
    app.command()(estimate)
