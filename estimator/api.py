"""The library entry points, one per command: estimate, plan, compare, validate. Each takes what
the command takes, by its flag names, and returns the object the command renders (its --json
output), so that a notebook gets exactly what `nvfree <command>` prints
(tests/cli/test_library_equals_cli.py). The work lives below (planner/, planfile.py,
validation.py); this module only names it, and is the one library module above the torch zone:
plan's quick calibration of this machine imports calibrate/ (torch) when it runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from estimator.arguments import library_arguments
from estimator.planner.estimate import estimate as estimate_setup

if TYPE_CHECKING:  # `nvfree estimate` imports this module: only what estimate needs at run time
    from estimator.specs import (
        CalibrationProfile,
        Comparison,
        Device,
        Estimate,
        ModelSpec,
        TrainSetup,
    )
    from estimator.specs.plan import Plan
    from estimator.specs.validation import ValidationReport

__all__ = ["compare", "estimate", "plan", "quick_calibration", "validate"]


def quick_calibration(say: Callable[[str], object] | None = None) -> None:
    """`nvfree calibrate --quick` on the CPU (~25 s), its profile stored; nothing without torch.
    `say` receives the progress lines."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return
    from estimator.calibrate.run import calibrate as run_calibration

    say = say or (lambda _: None)
    say("no calibration profile for this machine: measuring one (calibrate --quick)")
    result = run_calibration("cpu", "quick")
    if result.path is None:
        say(f"calibration not stored ({result.wall_seconds:.0f} s): "
            f"{result.refusal or 'not saved'}; planning uncalibrated")
    else:
        say(f"stored {result.path} ({result.wall_seconds:.0f} s)")


def estimate(model: ModelSpec | str | None = None, setup: TrainSetup | None = None,
             device: Device | str = "local", profile: CalibrationProfile | None = None,
             **flags) -> Estimate:
    """What `nvfree estimate` prints (planner.estimate.estimate, whose docstring lists the
    arguments), its arguments checked first (arguments.library_arguments)."""
    return estimate_setup(**library_arguments("estimate", {
        "model": model, "setup": setup, "device": device, "profile": profile, **flags}))


def plan(model: str | ModelSpec | None = None, *, output: Path | str | None = None,
         calibrate: bool = True, **flags) -> Plan:
    """What `nvfree plan` writes: the setup that fits and finishes soonest (or cheapest), as a
    Plan. Takes the command's flags by name (planfile.plan_request: method, dtype, seq_len,
    global_batch, tokens, data, device='local', max_devices, memory_limit in GiB, max_hours,
    max_cost, objective, top, …); request.PLAN_DEFAULTS for the model, sequence length, global
    batch and token budget left out. Unlike the command it writes the plan file only when
    `output` is given. `calibrate`: for device 'local' without a profile, measure one first."""
    from estimator.planfile import plan_request

    given = library_arguments("plan", {"model": model, "output": output,
                                       "calibrate": calibrate, **flags})
    calibrate = given.pop("calibrate")
    return plan_request(**given, calibrate=quick_calibration if calibrate else None)[0]


def compare(model: str | ModelSpec | None = None, *, devices: str | list[str] | None = None,
            max_cost: float | None = None, **flags) -> Comparison:
    """What `nvfree compare` shows: one model + setup on every catalogue device (or `devices`,
    a list or the command's comma-separated text). The other arguments are the command's flags
    by name (params, objective, max_hours, max_devices, and the setup flags of
    request.SETUP_DEFAULTS); no method or bits lets each device pick full, LoRA or QLoRA."""
    from estimator.planner.compare import compare_request

    given = library_arguments("compare", {"model": model, "devices": devices,
                                          "max_cost": max_cost, **flags})
    devices, max_cost = given.pop("devices"), given.pop("max_cost")
    if isinstance(devices, str):
        devices = [n.strip() for n in devices.split(",") if n.strip()]
    return compare_request(devices=devices, max_cost_usd=max_cost, **given)


def validate(suite: str = "quick", *, seed: int = 0, count: int = 10,
             case_seconds: float = 60.0, workdir: Path | str | None = None,
             update_profile: bool = False, progress=None) -> ValidationReport:
    """What `nvfree validate` prints: the suite run through the bundled trainer on this
    machine (needs torch), measured against the calibrated prediction (validation.validate)."""
    from estimator.validation import validate as run_validation

    return run_validation(suite, seed=seed, count=count, case_seconds=case_seconds,
                          workdir=None if workdir is None else Path(workdir),
                          update_profile=update_profile, progress=progress)
