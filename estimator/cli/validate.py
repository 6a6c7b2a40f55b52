"""`nvfree validate`: run a suite of training configs, each in a fresh process, and print the
predicted-vs-measured error table (the workflow is estimator.validation.validate)."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from estimator.cli.options import JsonOpt

SuiteOpt = Annotated[Literal["quick", "full", "random"], typer.Option(
    "--suite", help="quick: 3 small runs (~1 min); full: 20 runs (dense/MoE, full/LoRA/QLoRA, "
                    "fp32/bf16, checkpointing, vocabularies, batch/sequence; ~10 min); random: "
                    "--count configurations drawn from --seed within this machine's memory "
                    "and --case-seconds.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random suite's draws.")]
CountOpt = Annotated[int, typer.Option("--count", min=1, help="Configurations the random "
                                                              "suite runs.")]
CaseSecondsOpt = Annotated[float, typer.Option(
    "--case-seconds", min=1.0, help="Random suite: skip draws whose predicted run (start-up + "
                                    "steps) takes longer than this (seconds).")]
WorkdirOpt = Annotated[Path | None, typer.Option(
    "--workdir", help="Where the runs and model configs go  [default: a temporary directory]")]
UpdateOpt = Annotated[bool, typer.Option(
    "--update-profile", help="Fit one correction per op class from these runs and store it in "
                             "this machine's calibration profile.")]


def validate(suite: SuiteOpt = "quick", seed: SeedOpt = 0, count: CountOpt = 10,
             case_seconds: CaseSecondsOpt = 60.0, workdir: WorkdirOpt = None,
             update_profile: UpdateOpt = False, json: JsonOpt = False) -> None:
    """Check the calibrated prediction against real runs of the bundled trainer."""
    from rich.console import Console

    from estimator.validation import validate as run_validation

    console = Console(stderr=True)

    def progress(i: int, n: int, case_id: str) -> None:
        console.print(f"[{i + 1}/{n}] {case_id} …")

    report = run_validation(suite, seed=seed, count=count, case_seconds=case_seconds,
                            workdir=workdir, update_profile=update_profile, progress=progress)
    if json:
        typer.echo(report.model_dump_json(indent=2))
        return
    from estimator.report.validate import render_validation

    render_validation(report, Console())


def register(app: typer.Typer) -> None:
    """Add `validate` to the app."""
    app.command()(validate)
