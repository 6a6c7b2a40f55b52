"""`nvfree calibrate`: measure this device with torch and store a calibration profile."""

from typing import Literal

import typer

from estimator.cli.options import JsonOpt


def calibrate(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and repeats (≤ 10 s)."),
    device: Literal["cpu", "cuda", "mps", "xpu"] = typer.Option(
        "cpu", "--device", help="Device to measure: cpu | cuda (also ROCm) | mps | xpu."),
    force: bool = typer.Option(
        False, "--force", help="Store the profile even if other processes disturbed the "
                               "timings (it is then marked disturbed and every estimate says so)."),
    json: JsonOpt = False,
) -> None:
    """Microbenchmark GEMMs, attention, bandwidth, norms, NF4 dequant, AdamW and dispatch,
    fit efficiency curves and store the profile that `nvfree estimate` then uses. Timings that
    other processes disturbed are re-timed, or replaced by the previous profile's; a profile
    that stays disturbed is not stored (exit code 2) unless --force."""
    import importlib.util
    import json as json_lib

    from estimator.errors import NvfreeError, ProfileError

    if importlib.util.find_spec("torch") is None:
        raise NvfreeError("calibration needs torch: pip install 'nvfree[torch]'")
    from rich.console import Console

    from estimator.calibrate.run import calibrate as run_calibration
    from estimator.report.hardware import calibration_progress, render_calibration

    mode = "quick" if quick else "full"
    console = Console(stderr=json)
    with calibration_progress(console) as progress:
        result = run_calibration(device, mode, progress=progress, force=force)
    if json:
        payload = {"path": str(result.path) if result.path else None, "stored": result.stored,
                   "refusal": result.refusal, "wall_seconds": result.wall_seconds,
                   "skipped": [{"case": c, "reason": r} for c, r in result.skipped],
                   "profile": result.profile.model_dump(mode="json")}
        typer.echo(json_lib.dumps(payload, indent=2))
    else:
        from estimator.hardware import detect, local_device

        dev = local_device(detect(probe_torch=device != "cpu"))
        render_calibration(result, console, dev)
        if result.profile.quality is not None and result.refusal is None:
            console.print(result.profile.quality.note)
    if result.refusal is not None:
        raise ProfileError(result.refusal)


def register(app: typer.Typer) -> None:
    """Add `calibrate` to the app."""
    app.command()(calibrate)
