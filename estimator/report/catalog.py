"""Rich tables of the catalogue (units in the headers to keep rows narrow)."""

from rich.console import Console
from rich.table import Table

from estimator.report.units import GIB, fmt_count
from estimator.specs import Device, ModelSpec, ParamCounts


def render_models(rows: list[tuple[ModelSpec, ParamCounts]], console: Console) -> None:
    """One row per preset."""
    table = Table(title="Model presets (nvfree estimate --model NAME)", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("params", "active", "layers", "hidden", "heads/kv", "vocab"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    for spec, counts in rows:
        kind = "dense"
        if spec.moe is not None:
            kind = f"MoE {spec.moe.num_experts}/{spec.moe.num_experts_per_token}"
        kind += " MLA" if spec.mla is not None else ""
        table.add_row(spec.name, fmt_count(counts.total), fmt_count(counts.active_per_token),
                      str(spec.num_layers), str(spec.hidden_size),
                      f"{spec.num_heads}/{spec.num_kv_heads}", fmt_count(spec.vocab_size), kind)
    console.print(table)


def tflops(device: Device, dtype: str) -> str:
    """Peak in TFLOP/s without the unit, or '–'."""
    peak = device.peak_for(dtype)
    if peak is None:
        return "–"
    return f"{peak / 1e12:,.0f}" if peak >= 1e14 else f"{peak / 1e12:.3g}"


def render_devices(devices: list[Device], console: Console) -> None:
    """One row per device."""
    table = Table(title="Devices (nvfree estimate --device NAME); memory GiB, bandwidth GB/s, "
                  "dense peaks TFLOP/s, USD per hour", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("GiB", "GB/s", "fp32", "bf16", "$/h"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("device")
    for d in devices:
        price = "–" if d.price_per_hour_usd is None else f"{d.price_per_hour_usd:.2f}"
        table.add_row(d.name, f"{d.memory_bytes / GIB:,.0f}",
                      f"{d.memory_bandwidth_bytes_per_second / 1e9:,.0f}", tflops(d, "fp32"),
                      tflops(d, "bf16"), price, d.display_name)
    console.print(table)
