"""Rich rendering of an Estimate: memory vs capacity, time and cost, verdict, advice."""

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from estimator.report.units import fmt_bytes, fmt_count, fmt_rate, fmt_seconds, fmt_usd
from estimator.specs import Estimate

VERDICT_STYLE = {"fits": ("FITS", "bold green"),
                 "tight": ("TIGHT", "bold yellow"),
                 "fits_with_changes": ("FITS ONLY WITH CHANGES", "bold yellow"),
                 "does_not_fit": ("DOES NOT FIT", "bold red")}


def model_line(est: Estimate) -> str:
    """'llama-3.1-8b: 8.03B params (8.03B active), qlora r=16 …'."""
    p, s = est.params, est.setup
    active = f", {fmt_count(p.active_per_token)} active" if p.active_per_token != p.total else ""
    if s.method == "inference":
        return (f"{est.model.name}: {fmt_count(p.total)} params{active} · inference, "
                f"{s.weight_bits}-bit weights, {s.compute_dtype}, batch {s.batch_size}×"
                f"{s.seq_len} context{parallel_text(est)}")
    method = s.method + (f" r={s.lora_rank}" if s.trains_adapters else "")
    return (f"{est.model.name}: {fmt_count(p.total)} params{active}, {fmt_count(p.trainable)} "
            f"trainable · {method}, {s.weight_bits}-bit base, {s.compute_dtype}"
            f"{' mixed' if s.mixed_precision else ''}, {s.optimizer}, batch {s.batch_size}×"
            f"{s.seq_len}{f' ×{s.grad_accum} accum' if s.grad_accum > 1 else ''}"
            f"{', checkpointing' if s.checkpointing else ''}{parallel_text(est)}")


FRAMEWORK_NAMES = {"hf": "HF Transformers + PEFT", "nvfree": "nvfree's trainer",
                   "torchtune": "torchtune", "litgpt": "LitGPT"}


def framework_line(est: Estimate) -> str:
    """'For HF Transformers + PEFT; nvfree's trainer: 7.2 GiB (−38 %)'."""
    total = est.memory.total_bytes
    others = "; ".join(f"{FRAMEWORK_NAMES[f]}: {fmt_bytes(b)} ({b / total - 1:+.0%})"
                       for f, b in est.other_frameworks.items())
    return f"For {FRAMEWORK_NAMES[est.setup.framework]}" + (f"; {others}" if others else "")


def parallel_text(est: Estimate) -> str:
    """', 8 devices over 2 nodes, ZeRO-3, offload optimizer, expert-parallel 4' (or '')."""
    s = est.setup
    parts = []
    if s.num_devices > 1:
        nodes = f" over {s.num_nodes} nodes" if s.num_nodes > 1 else ""
        parts.append(f"{s.num_devices} devices{nodes}, "
                     + (f"ZeRO-{s.zero_stage}" if s.zero_stage else "DDP"))
    if s.offload != "none":
        parts.append(f"offload {s.offload.replace('_', ' ')}")
    if s.expert_parallel > 1:
        parts.append(f"expert-parallel {s.expert_parallel}")
    return "".join(f" · {p}" for p in parts)


def memory_table(est: Estimate) -> Table:
    """Non-zero memory terms, total, capacity."""
    mem = est.memory
    per = " per device" if est.setup.num_devices > 1 else ""
    phase = "" if est.setup.method == "inference" else f" ({mem.notes.get('peak_phase')})"
    table = Table(title=f"Peak memory{per} on {est.device.display_name}{phase}",
                  title_justify="left", show_edge=False)
    table.add_column("term")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for name, value in sorted(mem.components.items(), key=lambda kv: -kv[1]):
        if value:
            table.add_row(name, fmt_bytes(value), f"{value / mem.total_bytes:.0%}")
    table.add_section()
    table.add_row("total", fmt_bytes(mem.total_bytes), "", style="bold")
    table.add_row("measured band", f"{fmt_bytes(mem.lower_bytes)} … "
                  f"{fmt_bytes(mem.upper_bytes)}", "")
    table.add_row("available on device", fmt_bytes(mem.capacity_bytes), "")
    if mem.host_components:
        table.add_section()
        for name, value in mem.host_components.items():
            if value:
                table.add_row(f"host: {name}", fmt_bytes(value), "")
        table.add_row("host memory per device", fmt_bytes(mem.host_total_bytes), "",
                      style="bold")
    return table


def time_table(est: Estimate) -> Table:
    """Step time, throughput, total time and cost."""
    t = est.throughput
    table = Table(title="Time" + (" (calibrated)" if t.calibrated else " (uncalibrated)"),
                  title_justify="left", show_edge=False, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("prefill of the batch" if est.setup.method == "inference" else "step",
                  fmt_seconds(t.step_seconds))
    if t.num_devices > 1 or t.communication_seconds:
        table.add_row("  of which communication", f"{fmt_seconds(t.communication_seconds)} "
                      f"({t.communication_seconds / t.step_seconds:.0%}, not hidden by compute)")
    devices = f" ({t.num_devices} devices)" if t.num_devices > 1 else ""
    rate = "prefill tokens/s" if est.setup.method == "inference" else "tokens/s"
    table.add_row(f"{rate}{devices}", f"{t.tokens_per_second:,.1f}")
    if t.decode_tokens_per_second is not None:
        table.add_row("decode tokens/s", f"{t.decode_tokens_per_second:,.1f}")
    achieved = t.model_flops_per_token * t.tokens_per_second / t.num_devices
    peak = est.device.peak_for(t.compute_dtype) or est.device.peak_for("fp32")
    ceiling = f"of {fmt_rate(peak)}" if peak and achieved <= peak else (
        "(above the catalogue peak: the measured rates are the ceiling)" if peak else "")
    table.add_row("model FLOP/s" + (" per device" if t.num_devices > 1 else ""),
                  f"{fmt_rate(achieved)} {ceiling}".strip())
    if t.total_seconds is not None:
        tokens = fmt_count(est.setup.num_tokens or 0)
        table.add_row(f"{tokens} tokens", fmt_seconds(t.total_seconds))
        table.add_row("cost", fmt_usd(t.cost_usd) if t.cost_usd is not None
                      else "– (no price for this device)")
    slowest = sorted(t.ops, key=lambda o: -o.seconds)[:4]
    table.add_row("largest ops", ", ".join(f"{o.name} {o.seconds / t.step_seconds:.0%}"
                                           for o in slowest))
    return table


def advice_table(est: Estimate) -> Table | None:
    """The changes and their peak memory."""
    if not est.advice:
        return None
    table = Table(title="Changes", title_justify="left", show_edge=False)
    table.add_column("change")
    table.add_column("peak", justify="right")
    table.add_column("fits", justify="center")
    for a in est.advice:
        table.add_row(a.change, fmt_bytes(a.total_bytes), "yes" if a.fits else "no")
    return table


def render_estimate(est: Estimate, console: Console, calibration_note: str | None = None) -> None:
    """Print the whole estimate."""
    label, style = VERDICT_STYLE[est.verdict]
    head = Text.assemble((label, style), f"  needs {fmt_bytes(est.memory.total_bytes)} of "
                         f"{fmt_bytes(est.memory.capacity_bytes)}; minimum with changes "
                         f"{fmt_bytes(est.minimum_memory_bytes)}")
    parts = [Text(model_line(est)), *(Text(f"Hint: {h}", style="bold cyan") for h in est.hints),
             head, Text(framework_line(est)), memory_table(est), time_table(est)]
    advice = advice_table(est)
    if advice is not None:
        parts.append(advice)
    notes = list(est.assumptions) + ([calibration_note] if calibration_note else [])
    parts.append(Text("Assumptions:\n" + "\n".join(f"  • {a}" for a in notes), style="dim"))
    console.print(Panel(Group(*parts), title="nvfree estimate", expand=False))
