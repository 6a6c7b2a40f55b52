"""Rich rendering of `nvfree hardware` and `nvfree calibrate`, and the calibration progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from estimator.report.units import fmt_bandwidth, fmt_bytes, fmt_rate, fmt_seconds
from estimator.specs import CalibrationProfile, Device, MachineInfo

if TYPE_CHECKING:
    from estimator.calibrate.run import CalibrationResult
    from estimator.hardware.profiles import ProfileLookup

FLOPS_CLASSES = ("matmul", "matmul_dgrad", "matmul_cold", "matmul_cold_dgrad", "matmul_wgrad",
                 "lora", "attention")


def _isa_line(isa: tuple[str, ...]) -> str:
    return " ".join(isa) if isa else "–"


def render_machine(machine: MachineInfo, device: Device, lookup: ProfileLookup | None,
                   console: Console) -> None:
    """The detected machine, the Device the estimate will use, and the profile status."""
    table = Table(title="This machine", title_justify="left", show_header=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value")
    clock = machine.max_frequency_hz or machine.current_frequency_hz
    table.add_row("CPU", f"{machine.cpu_brand} ({machine.arch}, {machine.os})")
    table.add_row("cores", f"{machine.num_physical_cores} physical, {machine.num_logical_cores} "
                  f"logical, {machine.num_usable_cores} usable by this process")
    table.add_row("clock", "unknown" if clock is None else f"{clock / 1e9:.2f} GHz"
                  + (" (virtual machine)" if machine.virtualized else ""))
    table.add_row("ISA", _isa_line(machine.isa))
    table.add_row("RAM", f"{fmt_bytes(machine.memory_total_bytes)} total, "
                  f"{fmt_bytes(machine.memory_available_bytes)} available")
    torch_line = machine.torch_version or "not installed"
    if machine.torch_cpu_capability:
        torch_line += f" (CPU kernels: {machine.torch_cpu_capability})"
    table.add_row("torch", torch_line)
    table.add_row("malloc", _malloc_line())
    for acc in machine.accelerators:
        mem = fmt_bytes(acc.memory_bytes) if acc.memory_bytes else "memory unknown"
        table.add_row(f"{acc.backend}:{acc.index}", f"{acc.name}, {mem}")
    if machine.torch_probed and not machine.accelerators:
        table.add_row("accelerators", "none visible to torch")
    console.print(table)
    render_device(device, console)
    if lookup is not None:
        style = "green" if lookup.profile is not None else "yellow"
        console.print(f"[{style}]calibration:[/] {lookup.reason}")


def render_device(device: Device, console: Console) -> None:
    """The Device `nvfree estimate --device local` uses."""
    table = Table(title="Device used by `nvfree estimate --device local`", title_justify="left",
                  show_header=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value")
    table.add_row("device", f"{device.display_name} [{device.kind}, {device.backend}]")
    table.add_row("memory", fmt_bytes(device.memory_bytes)
                  + (" (shared with the OS)" if device.unified_memory else ""))
    table.add_row("bandwidth", fmt_bandwidth(device.memory_bandwidth_bytes_per_second))
    for dtype, peak in device.peak_flops_per_second.items():
        table.add_row(f"peak {dtype}", fmt_rate(peak))
    if device.notes:
        table.add_row("notes", device.notes)
    console.print(table)


@contextmanager
def calibration_progress(console: Console) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar; yields the callback `calibrate(progress=...)` expects."""
    bar = Progress(TextColumn("[bold]calibrating[/]"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                   transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        yield update


def _rate(unit_of_work: str, rate: float) -> str:
    """GFLOP/s for curves over FLOPs, GB/s for curves over bytes (3 significant digits)."""
    unit = "GF/s" if unit_of_work == "flops" else "GB/s"
    value = rate / 1e9
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def _micro(seconds: float) -> str:
    micro = seconds * 1e6
    return f"{micro:,.0f} µs" if micro >= 100 else f"{micro:.3g} µs"


def render_profile(profile: CalibrationProfile, console: Console,
                   device: Device | None = None) -> None:
    """One row per fitted curve: overhead, rate at the smallest and largest knot, and the
    largest measured rate as a share of the device peak where one is known."""
    table = Table(title=f"Calibration profile {profile.profile_id} ({profile.device_name}, "
                  f"torch {profile.torch_version}, {profile.num_threads} threads"
                  + (", quick" if profile.quick else "") + ")", title_justify="left")
    for col in ("op class", "overhead", "rate small", "rate large", "of peak", "n"):
        table.add_column(col, justify="left" if col == "op class" else "right", no_wrap=True)
    for name, curve in sorted(profile.curves.items()):
        if name in ("dispatch", "dispatch.autograd"):  # a per-call cost, no rate
            table.add_row(name, _micro(curve.overhead_seconds), "–", "–", "–", "1")
            continue
        share = "–"
        if device is not None:
            peak = _peak(device, name)
            if peak and device.kind == "cpu" and device.num_cores and name.split(".")[0] in (
                    FLOPS_CLASSES):
                peak *= min(1.0, profile.num_threads / device.num_cores)  # peak of the threads
            if peak:
                share = f"{curve.rates[-1] / peak:.0%}"
        table.add_row(name, _micro(curve.overhead_seconds), _rate(curve.unit, curve.rates[0]),
                      _rate(curve.unit, curve.rates[-1]), share, str(curve.num_samples))
    console.print(table)
    console.print(f"preferred compute dtype (fastest large GEMMs here): "
                  f"[bold]{profile.preferred_dtype}[/]")


def _peak(device: Device, op_class: str) -> float | None:
    """Peak the curve is compared with: FLOP/s of the dtype, or the memory bandwidth."""
    family, dtype = op_class.split(".")[0], op_class.rsplit(".", 1)[-1]
    if family in FLOPS_CLASSES:
        return device.peak_for(dtype)
    if family in ("memory", "alloc", "elementwise", "norm", "optimizer", "dequant"):
        return device.memory_bandwidth_bytes_per_second
    return None


def render_calibration(result: CalibrationResult, console: Console,
                       device: Device | None = None) -> None:
    """Profile table, where it was stored, what was skipped, and how long it took."""
    render_profile(result.profile, console, device)
    if result.num_disturbed:
        console.print(f"[yellow]warning:[/] other programs kept > 20% of the CPUs busy during "
                      f"{result.num_disturbed} of {len(result.measurements)} measurements (after "
                      "retries); those rates are low — rerun `nvfree calibrate` on an idle machine")
    elif result.busy_percent > 25:
        console.print(f"[yellow]warning:[/] the CPUs were {result.busy_percent:.0f}% busy before "
                      "measuring; other programs depress these numbers — rerun on an idle machine")
    for label, reason in result.skipped:
        console.print(f"[yellow]skipped[/] {label}: {reason}")
    where = f"stored in {result.path}" if result.path else "not stored"
    console.print(f"{len(result.measurements)} measurements in "
                  f"{fmt_seconds(result.wall_seconds)}; {where}")


def _malloc_line() -> str:
    """The malloc this process runs, and what it would take to change it (estimator/allocator)."""
    from estimator.allocator import ENV, SYSTEM, active_allocator, find_library

    active = active_allocator()
    if active != SYSTEM:
        return f"{active} (preloaded; {ENV}=system keeps the system malloc)"
    if find_library("tcmalloc") is not None:
        return f"system ({ENV}=system, or not run as the nvfree command)"
    return "system (install tcmalloc, Debian: libtcmalloc-minimal4, for faster CPU training)"
