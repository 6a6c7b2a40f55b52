"""Rich rendering of a validation report: the error table and its summary."""

from rich.console import Console
from rich.table import Table

from estimator.report.units import fmt_bytes, fmt_seconds
from estimator.specs.validation import ValidationReport


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1%}"


def validation_table(report: ValidationReport) -> Table:
    """One row per run: peak memory and step time, predicted / measured / error."""
    seed = f" --seed {report.seed}" if report.seed is not None else ""
    table = Table(title=f"nvfree validate --suite {report.suite}{seed}")
    for col in ("case", "peak pred.", "peak meas.", "error", "step pred.", "step meas.",
                "error"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in report.cases:
        if r.error:
            table.add_row(r.case_id, f"[red]failed: {r.error}[/]", "", "", "", "", "")
            continue
        table.add_row(r.case_id, fmt_bytes(r.predicted_peak_bytes or 0),
                      fmt_bytes(r.measured_peak_bytes or 0), _pct(r.peak_error),
                      fmt_seconds(r.predicted_step_seconds), fmt_seconds(r.measured_step_seconds),
                      _pct(r.step_error))
    return table


def summary_lines(report: ValidationReport) -> list[str]:
    """Median and max |error| against the goals."""
    g = report.goals
    out = []
    for label, med, mx, gm, gx, quartiles, signed in (
            ("peak memory", report.memory_median_error, report.memory_max_error,
             g["memory_median"], g["memory_max"], report.memory_quartiles,
             report.memory_median_signed_error),
            ("step time", report.step_median_error, report.step_max_error,
             g["step_median"], g["step_max"], report.step_quartiles,
             report.step_median_signed_error)):
        if med is None or mx is None:
            out.append(f"{label}: no measurements")
            continue
        ok = med <= gm and mx <= gx
        spread = "" if quartiles is None else (
            f"; quartiles {quartiles[0]:.1%} / {quartiles[1]:.1%} / {quartiles[2]:.1%}")
        bias = "" if signed is None else f", median signed {signed:+.1%}"
        out.append(f"{label}: median |error| {med:.1%}, max {mx:.1%}{spread}{bias} (goal "
                   f"≤{gm:.0%} / ≤{gx:.0%}: {'[green]met[/]' if ok else '[red]not met[/]'})")
    if report.skipped_draws:
        out.append(f"{len(report.skipped_draws)} drawn configurations not run (over this "
                   "machine's memory or time budget by their own prediction; --json lists them)")
    if report.profile_quality:
        out.append(report.profile_quality)
    if report.corrections:
        factors = ", ".join(f"{k} ×{v:.2f}" for k, v in sorted(report.corrections.items()))
        out.append(f"fitted corrections per op class: {factors}")
    if report.corrected_step_median_error is not None:
        out.append(f"step time with corrections fitted on the other runs (leave one out): "
                   f"median |error| {report.corrected_step_median_error:.1%}, max "
                   f"{report.corrected_step_max_error or 0:.1%}")
    return out


def render_validation(report: ValidationReport, console: Console) -> None:
    """The table, then the summary."""
    console.print(validation_table(report))
    for line in summary_lines(report):
        console.print(line)
