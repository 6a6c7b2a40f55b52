"""Rendering of `nvfree train`: a live progress bar while training, then the run report with
the prediction beside the measurement."""

from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from estimator.report.units import fmt_bytes, fmt_count, fmt_seconds
from estimator.specs.run import RunReport

if TYPE_CHECKING:  # the executor imports torch; rendering must not
    from estimator.executor.train import StepProgress


class TrainProgress:
    """A rich progress bar fed by the executor's StepProgress callback: step, loss, tokens/s,
    ETA and peak memory. Use as a context manager; pass `update` as on_progress."""

    def __init__(self, console: Console, *, max_steps: int, start_step: int = 0) -> None:
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("mem {task.fields[memory]}"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self._task = self._progress.add_task("train", total=max_steps, completed=start_step,
                                             loss="–", speed="–", eta="–", memory="–")

    def __enter__(self) -> "TrainProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, progress: "StepProgress") -> None:
        """Show one StepProgress."""
        self._progress.update(
            self._task, completed=progress.step, loss=f"{progress.loss:.4f}",
            speed=f"{fmt_count(progress.tokens_per_second)} tok/s",
            eta=fmt_seconds(progress.eta_seconds), memory=fmt_bytes(progress.memory_bytes),
        )


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.0%}"


def _bytes_or_dash(value: int | None) -> str:
    return "–" if value is None else fmt_bytes(value)


def memory_table(report: RunReport) -> Table:
    """Predicted vs measured memory, term by term."""
    table = Table(title="Memory: predicted vs measured", title_justify="left")
    for name, justify in (("term", "left"), ("predicted", "right"), ("measured", "right"),
                          ("error", "right")):
        table.add_column(name, justify=justify)
    for term in report.memory_terms:
        table.add_row(term.name, _bytes_or_dash(term.predicted_bytes),
                      _bytes_or_dash(term.measured_bytes), _pct(term.relative_error))
    return table


def summary_table(report: RunReport) -> Table:
    """Steps, loss, time and speed of the run."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    losses = report.losses
    first = f"{losses[report.start_step]:.4f}" if len(losses) > report.start_step else "–"
    last = f"{losses[-1]:.4f}" if losses else "–"
    rows = [
        ("model", f"{report.model.name} · {report.setup.method} · {report.setup.compute_dtype}"
                  f"{' (mixed)' if report.setup.mixed_precision else ''} · "
                  f"{report.setup.optimizer}"),
        ("device", f"{report.device_display_name} ({report.device_name}, "
                   f"{report.num_threads} threads)"),
        ("data", f"{report.data_source} ({fmt_count(report.num_data_tokens)} tokens)"),
        ("steps", f"{report.start_step} → {report.num_steps} of {report.max_steps}"),
        ("loss", f"{first} → {last}"),
        ("step time", f"{fmt_seconds(report.step_seconds)} measured"
                      f"{' (compiled)' if report.compiled else ''}, "
                      f"{fmt_seconds(report.predicted_step_seconds)} predicted "
                      f"({_pct(report.step_seconds_relative_error)})"),
        ("tokens/s", fmt_count(report.tokens_per_second) if report.tokens_per_second else "–"),
        ("peak memory", f"{fmt_bytes(report.peak_bytes)} ({report.memory_method}); "
                        f"after model build {fmt_bytes(report.baseline_bytes)}"),
    ]
    if report.world_size > 1:
        per_rank = ", ".join(fmt_bytes(b) for b in report.peak_bytes_per_rank)
        layout = "ZeRO-3, FSDP2" if report.setup.zero_stage == 3 else "DDP"
        if report.setup.offload != "none":
            layout += ", CPU offload"
        rows += [("ranks", f"{report.world_size} ({layout}); peak per rank: {per_rank or '–'}"),
                 ("communication", f"{fmt_seconds(report.communication_seconds)} measured, "
                                   f"{fmt_seconds(report.predicted_communication_seconds)} "
                                   "predicted per step")]
    if report.prediction_note:
        rows.append(("prediction", report.prediction_note))
    for key, value in rows:
        table.add_row(key, value)
    return table


def render_run_report(report: RunReport, console: Console, *, report_path: str) -> None:
    """The end-of-run summary: how it ended, what it measured, predicted vs measured."""
    colour = {"max_steps": "green", "interrupted": "yellow", "nonfinite_loss": "red"}
    console.print(f"[{colour[report.stop_reason]}]{report.message}")
    console.print(summary_table(report))
    console.print(memory_table(report))
    console.print(f"report: {report_path}")
