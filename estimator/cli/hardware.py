"""`nvfree hardware`: what this machine is, and the Device the estimate uses for it."""

import typer

from estimator.cli.options import JsonOpt


def hardware(
    json: JsonOpt = False,
    probe_torch: bool = typer.Option(
        True, "--torch/--no-torch",
        help="Import torch (if installed) to list CUDA/ROCm/MPS/XPU devices; slower."),
) -> None:
    """Detect CPU, cores, ISA (AVX-512, AMX, NEON …), RAM and torch accelerators."""
    import json as json_lib

    from estimator.allocator import active_allocator
    from estimator.hardware import detect, fingerprint, local_device
    from estimator.hardware.profiles import lookup_profile

    machine = detect(probe_torch=probe_torch)
    lookup = lookup_profile(machine)
    device = local_device(machine, lookup.profile)
    if json:
        payload = {
            "machine": machine.model_dump(mode="json"),
            "fingerprint": fingerprint(machine),
            "device": device.model_dump(mode="json"),
            "calibration": {"profile": str(lookup.path) if lookup.profile else None,
                            "reason": lookup.reason},
            "malloc": active_allocator(),
        }
        typer.echo(json_lib.dumps(payload, indent=2))
        return
    from rich.console import Console

    from estimator.report.hardware import render_machine

    render_machine(machine, device, lookup, Console())


def register(app: typer.Typer) -> None:
    """Add `hardware` to the app."""
    app.command()(hardware)
