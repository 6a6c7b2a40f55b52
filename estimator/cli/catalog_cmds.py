"""`nvfree models` and `nvfree devices`: list the catalogue."""

import typer

from estimator.cli.options import JsonOpt


def models(json: JsonOpt = False) -> None:
    """List the model presets with parameter counts and sources."""
    from estimator.analytic.params import count_params
    from estimator.catalog import list_models

    specs = list_models()
    if json:
        typer.echo("[" + ",\n".join(s.model_dump_json() for s in specs) + "]")
        return
    from rich.console import Console

    from estimator.report.catalog import render_models

    render_models([(s, count_params(s)) for s in specs], Console())


def devices(json: JsonOpt = False) -> None:
    """List the catalogue devices with memory, bandwidth, peaks and price."""
    from estimator.catalog import list_devices

    devs = list_devices()
    if json:
        typer.echo("[" + ",\n".join(d.model_dump_json() for d in devs) + "]")
        return
    from rich.console import Console

    from estimator.report.catalog import render_devices

    render_devices(devs, Console())


def register(app: typer.Typer) -> None:
    """Add `models` and `devices` to the app."""
    app.command()(models)
    app.command()(devices)
