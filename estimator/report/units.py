"""Display units. Memory in binary GiB/MiB (what `free -g` and torch report); vendor rates in
decimal GB/s and TFLOP/s (what datasheets print)."""

from estimator.units import GIB, MIB


def fmt_bytes(num_bytes: float) -> str:
    """1.23 GiB / 456 MiB / 12 KiB."""
    if abs(num_bytes) >= GIB:
        return f"{num_bytes / GIB:,.2f} GiB"
    if abs(num_bytes) >= MIB:
        return f"{num_bytes / MIB:,.0f} MiB"
    return f"{num_bytes / 1024:,.0f} KiB"


def fmt_rate(flops_per_second: float | None) -> str:
    """TFLOP/s (or GFLOP/s below one teraflop)."""
    if flops_per_second is None:
        return "–"
    if flops_per_second >= 1e12:
        return f"{flops_per_second / 1e12:,.1f} TFLOP/s"
    return f"{flops_per_second / 1e9:,.0f} GFLOP/s"


def fmt_bandwidth(bytes_per_second: float) -> str:
    """GB/s (decimal)."""
    return f"{bytes_per_second / 1e9:,.0f} GB/s"


def fmt_seconds(seconds: float | None) -> str:
    """12.3 ms / 4.56 s / 7.8 min / 9.1 h / 3.2 days."""
    if seconds is None:
        return "–"
    for limit, div, unit in ((1, 1e-3, "ms"), (120, 1, "s"), (7200, 60, "min"),
                             (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:,.3g} {unit}"
    return f"{seconds / 86400:,.3g} days"


def fmt_count(n: float) -> str:
    """1.23B / 456M / 7.8K."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:,.3g}{unit}"
    return f"{n:,.0f}"


def fmt_usd(usd: float | None) -> str:
    """$1,234.56; 'n/a' when unknown (never $0 for a missing price)."""
    return "n/a" if usd is None else f"${usd:,.2f}"
