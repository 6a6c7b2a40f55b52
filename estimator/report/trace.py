"""Rich rendering of a TraceReport: the traced peak, its phase and module, the categories live
at the peak, the top modules, and the analytic estimate of the same setup beside it."""

from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from estimator.report.units import fmt_bytes, fmt_count
from estimator.specs.trace import NON_TENSOR_TERMS, TraceReport, TraceResult


def setup_line(result: TraceResult) -> str:
    """'llama-3.1-8b (llama) · hf · qlora r=16, 4-bit base, bf16 mixed, adamw, batch 1×2048'."""
    s = result.setup
    method = s.method + (f" r={s.lora_rank}" if s.trains_adapters else "")
    return (f"{result.model_name} ({result.model_type}) · {result.framework} · {method}, "
            f"{s.weight_bits}-bit base, {s.compute_dtype}{' mixed' if s.mixed_precision else ''}"
            f", {s.optimizer}, batch {s.batch_size}×{s.seq_len}, {s.attention}"
            f"{', checkpointing' if s.checkpointing else ''} · "
            f"{fmt_count(result.num_parameters)} params, "
            f"{fmt_count(result.num_trainable_parameters)} trainable")


def peak_line(result: TraceResult) -> Text:
    """'Traced peak 12.3 GiB in backward, inside model.layers.0.mlp (fake tensors, 4.2 s)'."""
    where = f", inside {result.peak_module}" if result.peak_module else ", at top level"
    kind = "fake tensors" if result.fake else "real tensors"
    return Text.assemble(("Traced peak ", "bold"), (fmt_bytes(result.peak_bytes), "bold cyan"),
                         f" in {result.peak_phase}{where} ({kind}, traced in "
                         f"{result.trace_seconds:.1f} s)")


def category_table(result: TraceResult) -> Table:
    """Live tensor bytes at the peak, by category."""
    table = Table(title="Trace: live at the peak", title_justify="left", show_edge=False)
    table.add_column("category")
    table.add_column("bytes", justify="right")
    for name, value in sorted(result.peak_components.items(), key=lambda kv: -kv[1]):
        if value:
            table.add_row(name, fmt_bytes(value))
    table.add_section()
    table.add_row("peak", fmt_bytes(result.peak_bytes), style="bold")
    for phase, value in result.phase_peaks.items():
        table.add_row(f"  most in {phase}", fmt_bytes(value), style="dim")
    return table


def analytic_table(report: TraceReport) -> Table | None:
    """The analytic terms, total, and total without the non-tensor terms."""
    side = report.estimate
    if side is None:
        return None
    table = Table(title=f"Analytic estimate ({side.device_name}, {side.peak_phase})",
                  title_justify="left", show_edge=False)
    table.add_column("term")
    table.add_column("bytes", justify="right")
    for name, value in sorted(side.components.items(), key=lambda kv: -kv[1]):
        if value:
            style = "dim" if name in NON_TENSOR_TERMS else ""
            table.add_row(name, fmt_bytes(value), style=style)
    table.add_section()
    table.add_row("total", fmt_bytes(side.total_bytes), style="bold")
    table.add_row("tensors only (− dim terms)", fmt_bytes(side.tensor_bytes), style="bold")
    return table


def module_table(result: TraceResult, top: int) -> Table:
    """The modules with the highest peaks."""
    table = Table(title="Modules with the highest peaks", title_justify="left", show_edge=False)
    table.add_column("module")
    table.add_column("forward peak", justify="right")
    table.add_column("backward peak", justify="right")
    for peak in result.top_modules[:top]:
        table.add_row(peak.name, fmt_bytes(peak.forward_peak_bytes),
                      fmt_bytes(peak.backward_peak_bytes))
    return table


def comparison_line(report: TraceReport) -> Text:
    """'analytic tensors / traced peak = 1.07' (or why there is no estimate)."""
    if report.ratio is None:
        return Text(report.estimate_note or "no analytic estimate", style="yellow")
    text = f"analytic tensor bytes / traced peak = {report.ratio:.3f}"
    return Text(text + (f"  ({report.estimate_note})" if report.estimate_note else ""),
                style="bold")


def render_trace(report: TraceReport, console: Console, top: int = 10) -> None:
    """Print the whole report."""
    result = report.trace
    tables = [category_table(result)]
    analytic = analytic_table(report)
    if analytic is not None:
        tables.append(analytic)
    parts = [Text(setup_line(result)), peak_line(result), Columns(tables, padding=(0, 4)),
             module_table(result, top), comparison_line(report),
             Text("Assumptions:\n" + "\n".join(f"  • {a}" for a in result.assumptions),
                  style="dim")]
    console.print(Panel(Group(*parts), title="nvfree trace", expand=False))
