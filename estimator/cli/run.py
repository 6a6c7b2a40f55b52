"""`nvfree run PLAN`: check this machine against a plan, run it with the bundled trainer, and
compare the prediction with the measurement. Re-running an interrupted plan resumes it."""

from pathlib import Path
from typing import Annotated

import typer

from estimator.cli.options import JsonOpt

PlanArg = Annotated[Path, typer.Argument(help="Plan file written by `nvfree plan`.")]
RunOutputOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Run directory (checkpoints, run_report.json)  [default: "
                           "runs/<plan file name>]")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Run even if the plan is predicted not to fit or was made elsewhere.")]
NodeRankOpt = Annotated[int | None, typer.Option(
    "--node-rank", min=0, help="Multi-node plans: this machine's rank (torchrun).")]
RdzvOpt = Annotated[str | None, typer.Option(
    "--rdzv-endpoint", help="Multi-node plans: HOST:PORT every node reaches (torchrun c10d).")]


def run(plan_path: PlanArg, output: RunOutputOpt = None, force: ForceOpt = False,
        node_rank: NodeRankOpt = None, rdzv_endpoint: RdzvOpt = None,
        json: JsonOpt = False) -> None:
    """Run a plan on this machine (resuming it if it was interrupted) and report predicted vs
    measured peak memory and step time. A plan for N devices runs N data-parallel processes
    under torchrun (num_devices / num_nodes per machine)."""
    import sys

    import psutil

    from estimator.errors import SetupError
    from estimator.executor.distributed import context_from_env, in_worker, launch
    from estimator.hardware import detect, fingerprint
    from estimator.planfile import load_plan, machine_problems
    from estimator.profiles import lookup_profile
    from estimator.specs import RunReport

    the_plan = load_plan(plan_path)
    machine = detect()
    found = lookup_profile(machine)
    refuse, notes = machine_problems(
        the_plan, fingerprint=fingerprint(machine),
        available_bytes=psutil.virtual_memory().available,
        profile=found.profile if found else None)
    if refuse and not force:
        raise SetupError(f"{plan_path}: {'; '.join(refuse)} (--force runs it anyway)")
    out = output or Path("runs") / plan_path.stem
    from rich.console import Console

    worker = in_worker()
    console = Console(stderr=json or worker, quiet=worker and context_from_env().rank > 0)
    for line in [*notes, *(f"forced: {r}" for r in refuse if force)]:
        console.print(f"[yellow]note:[/] {line}")
    s = the_plan.setup
    if s.num_devices > 1 and not worker:
        code = launch(sys.argv[1:], s.num_devices // s.num_nodes, s.num_nodes,
                      node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        report_path = out / "run_report.json"
        if code != 0 or not report_path.is_file():
            raise typer.Exit(code or 1)
        report = RunReport.model_validate_json(report_path.read_text())
    else:
        report = _execute(the_plan, out, console)
        if worker:  # the launcher renders rank 0's report
            raise typer.Exit(0)
    if json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        from estimator.report.plan import render_plan_outcome
        from estimator.report.train import render_run_report

        render_run_report(report, console, report_path=str(out / "run_report.json"))
        render_plan_outcome(the_plan, report, console)
    from estimator.cli.train import _exit_code

    raise typer.Exit(_exit_code(report.stop_reason, report.message))


def _execute(the_plan, out: Path, console):
    """Train the plan's setup for its steps in `out`, resuming a checkpoint found there."""
    from estimator.cli.train import _model_dir
    from estimator.executor import checkpoint as ckpt
    from estimator.executor.train import TrainConfig, train_with_config
    from estimator.report.train import TrainProgress

    resume = bool(ckpt.list_checkpoints(out / ckpt.CHECKPOINTS_DIR))
    if resume:
        console.print(f"resuming the interrupted run in {out}")
    config = TrainConfig(max_steps=the_plan.max_steps, output_dir=out,
                         data=None if the_plan.data is None else Path(the_plan.data),
                         text_field=the_plan.text_field,
                         model_path=_model_dir(the_plan.model_source), resume=resume,
                         device=the_plan.torch_device, seed=the_plan.seed)
    with TrainProgress(console, max_steps=the_plan.max_steps) as bar:
        return train_with_config(the_plan.model, the_plan.setup, config, on_progress=bar.update)


def register(app: typer.Typer) -> None:
    """Add `run` to the app."""
    app.command()(run)
