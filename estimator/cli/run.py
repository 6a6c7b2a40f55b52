"""`nvfree run PLAN`: check this machine against a plan, run it with the bundled trainer, and
compare the prediction with the measurement. Re-running an interrupted plan resumes it.

Parse → estimator.executor.runner.run_plan → render (the runner re-checks the plan here,
resumes, launches torchrun for multi-device plans and sets the exit code)."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from estimator.cli.options import JsonOpt

PlanArg = Annotated[Path, typer.Argument(help="Plan file written by `nvfree plan`.")]
RunOutputOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Run directory (checkpoints, run_report.json)  [default: "
                           "runs/<plan file name>]")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Run even if the plan is predicted not to fit, was made elsewhere, or "
                    "disagrees with its own setup recomputed here.")]
RestartOpt = Annotated[bool, typer.Option(
    "--restart", help="Delete the run directory's checkpoints and report and start over.")]
NodeRankOpt = Annotated[int | None, typer.Option(
    "--node-rank", min=0, help="Multi-node plans: this machine's rank (torchrun).")]
RdzvOpt = Annotated[str | None, typer.Option(
    "--rdzv-endpoint", help="Multi-node plans: HOST:PORT every node reaches (torchrun c10d).")]


def run(plan_path: PlanArg, output: RunOutputOpt = None, force: ForceOpt = False,
        restart: RestartOpt = False, node_rank: NodeRankOpt = None,
        rdzv_endpoint: RdzvOpt = None, json: JsonOpt = False) -> None:
    """Run a plan on this machine (resuming it if it was interrupted) and report predicted vs
    measured peak memory and step time. A plan for N devices runs N data-parallel processes
    under torchrun (num_devices / num_nodes per machine)."""
    from rich.markup import escape

    from estimator.cli.train import progress_bars, render_outcome, run_console
    from estimator.executor import runner

    console = run_console(json)
    the_plan, outcome = runner.run_plan(
        plan_path, output=output, force=force, restart=restart, node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint, argv=sys.argv[1:], progress=progress_bars(console),
        on_note=lambda line: console.print(f"[yellow]note:[/] {escape(line)}", highlight=False))

    def plan_outcome(report) -> None:
        from estimator.report.plan import render_plan_outcome

        render_plan_outcome(the_plan, report, console)

    render_outcome(outcome, console, json, extra=plan_outcome)


def register(app: typer.Typer) -> None:
    """Add `run` to the app."""
    app.command()(run)
