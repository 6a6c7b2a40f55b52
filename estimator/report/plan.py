"""Rich rendering of a plan: the chosen setup and the candidates it beat, with why."""

from rich.console import Console
from rich.table import Table

from estimator.report.units import fmt_bytes, fmt_seconds, fmt_usd
from estimator.specs import RunReport, TrainSetup
from estimator.specs.plan import Plan


def setup_label(s: TrainSetup) -> str:
    """One short line: method, bits, precision, optimizer, batch × accumulation, checkpointing."""
    precision = s.compute_dtype if s.compute_dtype == "fp32" else (
        f"{s.compute_dtype} {'mixed' if s.mixed_precision else 'pure'}")
    bits = f" {s.weight_bits}-bit" if s.method != "full" else ""
    devices = f" ×{s.num_devices} ZeRO-{s.zero_stage}" if s.num_devices > 1 else ""
    return (f"{s.method}{bits} {precision} {s.optimizer} b{s.batch_size}×{s.grad_accum}"
            f"{' ckpt' if s.checkpointing else ''}{devices}")


def candidates_table(plan: Plan) -> Table:
    """The best candidates, the chosen one first."""
    table = Table(title=f"Best of {plan.num_candidates} candidates "
                        f"({plan.num_fitting} fit {fmt_bytes(plan.memory_limit_bytes)})")
    for col in ("setup", "peak memory", "step", "total", "cost", "why"):
        table.add_column(col, justify="left" if col in ("setup", "why") else "right")
    for c in plan.candidates:
        table.add_row(setup_label(c.setup), fmt_bytes(c.peak_bytes), fmt_seconds(c.step_seconds),
                      fmt_seconds(c.total_seconds), fmt_usd(c.cost_usd), c.verdict,
                      style="bold green" if c is plan.candidates[0] else None)
    return table


def render_plan(plan: Plan, console: Console, *, path: str, calibration_note: str) -> None:
    """The plan in a few lines, the candidates table, and how to run it."""
    s = plan.setup
    console.print(f"[bold]{plan.model.name}[/] on {plan.device.display_name}: "
                  f"{s.num_tokens:,} tokens = {plan.max_steps} steps × "
                  f"{s.global_tokens_per_step:,} tokens (seq {s.seq_len})")
    console.print(f"calibration: {calibration_note}")
    console.print(candidates_table(plan))
    console.print(f"plan: [bold]{setup_label(s)}[/] — predicted peak "
                  f"{fmt_bytes(plan.predicted_peak_bytes)}, "
                  f"{fmt_seconds(plan.predicted_step_seconds)}/step, "
                  f"{fmt_seconds(plan.predicted_total_seconds)} in total")
    console.print(f"wrote {path}; run it with: [bold]nvfree run {path}[/]")


def render_plan_outcome(plan: Plan, report: RunReport, console: Console) -> None:
    """The plan's prediction beside what the run measured."""
    table = Table(title="Plan: predicted vs measured")
    for col in ("", "predicted (plan)", "measured", "error"):
        table.add_column(col, justify="right")
    rows = [("peak memory", plan.predicted_peak_bytes, report.peak_bytes, fmt_bytes),
            ("step time", plan.predicted_step_seconds, report.step_seconds, fmt_seconds)]
    for name, predicted, measured, fmt in rows:
        error = "—" if not measured else f"{(predicted - measured) / measured:+.1%}"
        table.add_row(name, fmt(predicted), fmt(measured) if measured else "—", error)
    console.print(table)
