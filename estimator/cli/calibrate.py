"""`nvfree calibrate`: measure this device with torch and store a calibration profile."""

from typing import Literal

import typer

from estimator.cli.options import JsonOpt


def calibrate(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and repeats (≤ 10 s)."),
    device: Literal["cpu", "cuda", "mps", "xpu"] = typer.Option(
        "cpu", "--device", help="Device to measure: cpu | cuda (also ROCm) | mps | xpu."),
    json: JsonOpt = False,
) -> None:
    """Microbenchmark GEMMs, attention, bandwidth, norms, NF4 dequant, AdamW and dispatch,
    fit efficiency curves and store the profile that `nvfree estimate` then uses."""
    import importlib.util
    import json as json_lib

    from estimator.errors import NvfreeError

    if importlib.util.find_spec("torch") is None:
        raise NvfreeError("calibration needs torch: pip install 'nvfree[torch]'")
    from rich.console import Console

    from estimator.calibrate.run import calibrate as run_calibration
    from estimator.report.hardware import calibration_progress, render_calibration

    mode = "quick" if quick else "full"
    console = Console(stderr=json)
    with calibration_progress(console) as progress:
        result = run_calibration(device, mode, progress=progress)
    if json:
        payload = {"path": str(result.path), "wall_seconds": result.wall_seconds,
                   "skipped": [{"case": c, "reason": r} for c, r in result.skipped],
                   "profile": result.profile.model_dump(mode="json")}
        typer.echo(json_lib.dumps(payload, indent=2))
        return
    from estimator.hardware import detect, local_device

    dev = local_device(detect(probe_torch=device != "cpu"))
    render_calibration(result, console, dev)


def register(app: typer.Typer) -> None:
    """Add `calibrate` to the app."""
    app.command()(calibrate)
