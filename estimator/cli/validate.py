"""`nvfree validate`: run a suite of training configs, each in a fresh process, and print the
predicted-vs-measured error table."""

import tempfile
from pathlib import Path
from typing import Annotated, Literal

import typer

from estimator.cli.options import JsonOpt

SuiteOpt = Annotated[Literal["quick", "full"], typer.Option(
    "--suite", help="quick: 3 small runs (~1 min); full: 19 runs (dense/MoE, full/LoRA/QLoRA, "
                    "fp32/bf16, checkpointing, vocabularies, batch/sequence; ~10 min).")]
WorkdirOpt = Annotated[Path | None, typer.Option(
    "--workdir", help="Where the runs and model configs go  [default: a temporary directory]")]
UpdateOpt = Annotated[bool, typer.Option(
    "--update-profile", help="Fit one correction per op class from these runs and store it in "
                             "this machine's calibration profile.")]


def validate(suite: SuiteOpt = "quick", workdir: WorkdirOpt = None,
             update_profile: UpdateOpt = False, json: JsonOpt = False) -> None:
    """Check the calibrated prediction against real runs of the bundled trainer."""
    from rich.console import Console

    from estimator import validate as V
    from estimator.errors import ProfileError
    from estimator.hardware import detect, local_device
    from estimator.profiles import lookup_profile, save_profile

    console = Console(stderr=True)
    machine = detect()
    found = lookup_profile(machine)
    profile = found.profile if found else None
    if update_profile and profile is None:
        raise ProfileError("--update-profile needs a calibration profile: run `nvfree calibrate`")
    device = local_device(machine, profile)
    cases = V.suite(suite)
    with tempfile.TemporaryDirectory(prefix="nvfree-validate-") as tmp:
        root = workdir or Path(tmp)
        rows = []
        for i, case in enumerate(cases, 1):
            console.print(f"[{i}/{len(cases)}] {case.case_id} …")
            outcome = V.run_case(case, root)
            rows.append(V.case_result(case, outcome, _by_class(device, profile)))
    report = V.summarize(rows, suite, profile.profile_id if profile else None)
    if update_profile:
        corrections = V.fit_corrections(rows)
        loo = [abs(e) for e in V.leave_one_out_errors(rows)]
        report = report.model_copy(update={
            "corrections": corrections,
            "corrected_step_median_error": V.statistics.median(loo) if loo else None,
            "corrected_step_max_error": max(loo) if loo else None})
        path = save_profile(profile.model_copy(update={"corrections": corrections}))
        console.print(f"stored {len(corrections)} corrections in {path}")
    if json:
        typer.echo(report.model_dump_json(indent=2))
        return
    from estimator.report.validate import render_validation

    render_validation(report, Console())


def _by_class(device, profile):
    """Predicted step seconds per op class for a run's model and setup (without the run's
    own corrections, so a refit starts from the uncorrected model)."""
    from estimator.api import estimate

    base = profile.model_copy(update={"corrections": {}}) if profile else None

    def by_class(report) -> dict[str, float]:
        out: dict[str, float] = {}
        for op in estimate(report.model, report.setup, device, base).throughput.ops:
            out[op.op_class] = out.get(op.op_class, 0.0) + op.seconds
        return out

    return by_class


def register(app: typer.Typer) -> None:
    """Add `validate` to the app."""
    app.command()(validate)
