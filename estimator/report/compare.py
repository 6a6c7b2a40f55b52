"""Rich rendering of a Comparison (table, terminal bars) and optional matplotlib plots."""

from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from estimator.errors import SetupError
from estimator.report.units import GIB, fmt_count, fmt_seconds, fmt_usd
from estimator.specs import Comparison, DeviceOption

BAR_WIDTH = 24
PLOT_EXTRA_HINT = "--plot needs matplotlib: pip install 'nvfree[plot]' (or pip install matplotlib)"


def devices_cell(o: DeviceOption) -> str:
    """'1', '16 z3', or 'no fit'."""
    if o.num_devices is None:
        return "no fit"
    zero = f" z{o.zero_stage}" if o.num_devices > 1 and o.zero_stage else ""
    approx = "*" if not o.multi_device_modelled else ""
    return f"{o.num_devices}{zero}{approx}"


ATTENTION_ONLY = ("q_proj", "k_proj", "v_proj", "o_proj")


def setup_cell(o: DeviceOption) -> str:
    """The chosen setup: 'b8×2 ep8 attn' (micro-batch × accumulation, expert parallelism,
    LoRA on attention only)."""
    if o.num_devices is None:
        return "–"
    parts = [f"b{o.batch_size}×{o.grad_accum}"]
    if o.expert_parallel > 1:
        parts.append(f"ep{o.expert_parallel}")
    if o.lora_targets and tuple(o.lora_targets) == ATTENTION_ONLY:
        parts.append("attn")
    return " ".join(parts)


def method_cell(o: DeviceOption) -> str:
    """'qlora4 bf16 ckpt'."""
    return (f"{o.method}{o.weight_bits if o.weight_bits < 16 else ''} {o.compute_dtype}"
            f"{' ckpt' if o.checkpointing else ''}")


UNKNOWN_TAGS = (("no on-demand price", "price n/a"), ("purchase amortised", "bought price"),
                ("network between machines", "network assumed"), ("peak:", "dtype peak"),
                ("large-GEMM", "GEMM eff."), ("interconnect", "link"),
                ("software:", "software"),
                ("confirm --max-hours", "hours limit"), ("confirm --max-cost", "cost limit"))


def unknown_cell(o: DeviceOption) -> str:
    """Short tags for the option's unknowns (the JSON has the full lines)."""
    return ", ".join(tag for key, tag in UNKNOWN_TAGS if any(key in u for u in o.unknowns))


def rate_cell(o: DeviceOption) -> str:
    """tokens/s, with decode for inference."""
    if o.tokens_per_second is None:
        return "–"
    if o.decode_tokens_per_second is None:
        return f"{o.tokens_per_second:,.0f}"
    return f"{o.tokens_per_second:,.0f} / {o.decode_tokens_per_second:,.1f}"


def options_table(cmp: Comparison) -> Table:
    """One row per device, best first."""
    inference = cmp.setup.method == "inference"
    table = Table(title=f"{cmp.model} on each device (sorted by {cmp.objective})",
                  title_justify="left", show_edge=False)
    for name, justify in (("device", "left"), ("method, setup", "left"), ("N", "right"),
                          ("GiB peak / cap.", "right"),
                          ("prefill / decode tok/s" if inference else "tok/s", "right"),
                          ("time", "right"), ("$/h", "right"), ("cost", "right"),
                          ("unknown", "left")):
        table.add_column(name, justify=justify,
                         min_width=6 if name.startswith("method") else None)
    for o in cmp.options:
        style = None if o.within_limits else "dim"
        table.add_row(o.device, f"{method_cell(o)} {setup_cell(o)}".removesuffix(" –"),
                      devices_cell(o),
                      f"{o.peak_memory_bytes / GIB:,.1f} / {o.capacity_bytes / GIB:,.0f}",
                      rate_cell(o), fmt_seconds(o.total_seconds),
                      fmt_usd(o.price_per_hour_usd), fmt_usd(o.cost_usd), unknown_cell(o),
                      style=style)
    return table


def bar(value: float, largest: float) -> str:
    """A bar of BAR_WIDTH cells at most, on a log-free linear scale."""
    cells = max(1, round(BAR_WIDTH * value / largest)) if largest > 0 else 1
    return "█" * cells


def bars_table(cmp: Comparison) -> Table | None:
    """Terminal bars of time (and cost) per fitting device."""
    rows = [o for o in cmp.options if o.num_devices is not None]
    if not rows:
        return None
    use_total = all(o.total_seconds is not None for o in rows)
    times = [o.total_seconds if use_total else o.device_hours_per_million_tokens
             for o in rows]
    costs = [o.cost_usd for o in rows]
    known = [c for c in costs if c is not None]
    table = Table(title="Time" + (" and cost" if known else "") + " per device",
                  title_justify="left", show_edge=False, show_header=False)
    table.add_column("device")
    table.add_column("time")
    table.add_column("cost")
    for o, t, c in zip(rows, times, costs, strict=True):
        label = fmt_seconds(t) if use_total else f"{t:,.3g} dev-h/M tok"
        cost = f"[yellow]{bar(c, max(known))}[/] {fmt_usd(c)}" if c is not None else "–"
        table.add_row(o.device, f"[cyan]{bar(t or 0, max(times))}[/] {label}", cost)
    return table


def alternatives_parts(cmp: Comparison) -> list:
    """Smaller models and free tiers."""
    parts: list = []
    if cmp.smaller_models:
        table = Table(title="Smaller models that fit one device within the limits",
                      title_justify="left", show_edge=False)
        for col in ("model", "params", "best device", "method", "time", "cost"):
            table.add_column(col)
        for m in cmp.smaller_models:
            o = m.option
            table.add_row(m.model, fmt_count(m.total_params), o.display_name, method_cell(o),
                          fmt_seconds(o.total_seconds), fmt_usd(o.cost_usd))
        parts.append(table)
    if cmp.free_tiers:
        table = Table(title="Free tiers", title_justify="left", show_edge=False)
        for col in ("offer", "devices", "fits", "method", "time", "quota", "weeks of quota"):
            table.add_column(col)
        for f in cmp.free_tiers:
            quota = " · ".join(q for q in (
                f"{f.weekly_hours:g} h/week" if f.weekly_hours else "weekly quota unpublished",
                f"{f.session_hours:g} h/session" if f.session_hours else "") if q)
            weeks = f"{f.weeks_of_quota:,.2f}" if f.weeks_of_quota is not None else "–"
            table.add_row(f.display_name, f"{f.num_devices}× {f.device}",
                          "yes" if f.fits else "no", f.method if f.fits else "–",
                          fmt_seconds(f.total_seconds), quota, weeks)
        parts.append(table)
    return parts


def render_compare(cmp: Comparison, console: Console) -> None:
    """Print the whole comparison."""
    method = "method per device" if cmp.method_rule.startswith("method per device") else (
        cmp.setup.method)
    batch = ("batch searched per device" if cmp.setup.method != "inference"
             else f"batch {cmp.setup.batch_size}")
    head = (f"{cmp.model}: {fmt_count(cmp.total_params)} params, "
            f"{fmt_count(cmp.active_params)} active · {method}, {batch} × "
            f"{cmp.setup.seq_len} tokens"
            + (f" · {fmt_count(cmp.setup.num_tokens)} tokens" if cmp.setup.num_tokens else ""))
    limits = [f"max {cmp.max_hours:g} h" if cmp.max_hours is not None else "",
              f"max {fmt_usd(cmp.max_cost_usd)}" if cmp.max_cost_usd is not None else ""]
    parts: list = [Text(head), Text(f"Method: {cmp.method_rule}", style="dim"),
                   options_table(cmp)]
    if any(limits):
        parts.insert(1, Text("Limits: " + ", ".join(x for x in limits if x)
                             + " (dim rows miss them)"))
    bars = bars_table(cmp)
    if bars is not None:
        parts.append(bars)
    parts += alternatives_parts(cmp)
    notes = [*cmp.notes,
             "N = devices of the chosen plan (zK = ZeRO stage K); setup: bM×A = micro-batch "
             "× accumulation, epK = expert parallelism over K devices, attn = LoRA on "
             "attention only; unknown: what the catalogue lacks for that device (price, dtype "
             "peak, GEMM efficiency, interconnect link), see --json"]
    if any(not o.multi_device_modelled for o in cmp.options):
        notes.append("* device count from ideal ZeRO-3 sharding without communication time "
                     "(the multi-device model does not cover this setup)")
    parts.append(Text("Assumptions:\n" + "\n".join(f"  • {n}" for n in notes), style="dim"))
    console.print(Panel(Group(*parts), title="nvfree compare", expand=False))


MEMORY_GROUPS = {
    "weights": ("weights", "quant_scales", "master_weights", "adapter_weights",
                "gathered_params", "autocast_copies", "dequant_transient"),
    "gradients": ("gradients",),
    "optimizer": ("optimizer_states", "optimizer_transient"),
    "activations": ("activations", "recompute"),
    "logits + loss": ("logits",),
    "KV cache": ("kv_cache",),
}
"""Memory terms drawn as one colour each; every other term (runtime, heap, kernel caches,
the step's transients) is 'runtime + other'."""
GROUP_COLOURS = {"weights": "#4477AA", "gradients": "#EE6677", "optimizer": "#228833",
                 "activations": "#CCBB44", "logits + loss": "#66CCEE", "KV cache": "#AA3377",
                 "runtime + other": "#BBBBBB"}
"""Paul Tol's 'bright' scheme: distinct for colour-blind readers and in greyscale."""


MEMORY_AXIS_MAX = 1.5
"""Longest memory bar (share of the device's memory): a job that needs 145× one device's
memory is drawn at this length with its ratio written beside it."""


def check_plot_path(path: str | Path) -> Path:
    """The --plot path, refused (one line) unless it ends in .png or .svg."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise SetupError(f"--plot must end in .png or .svg, got '{path.name}'")
    return path


def plot_available() -> bool:
    """Whether matplotlib can be imported (the plot is skipped with a note otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def memory_groups(option: DeviceOption) -> dict[str, int]:
    """The option's memory terms summed into MEMORY_GROUPS (bytes per group)."""
    named = {term: group for group, terms in MEMORY_GROUPS.items() for term in terms}
    out = dict.fromkeys(GROUP_COLOURS, 0)
    for term, nbytes in option.memory_components.items():
        out[named.get(term, "runtime + other")] += nbytes
    return out


def plot_label(o: DeviceOption) -> str:
    """'mi300x ×8 z3 · qlora4 bf16 b8×1 ep8 attn', or 'rx-7900-xtx · does not fit'."""
    if o.num_devices is None:
        return f"{o.device} · does not fit"
    zero = f" z{o.zero_stage}" if o.num_devices > 1 and o.zero_stage else ""
    return f"{o.device} ×{o.num_devices}{zero} · {method_cell(o)} {setup_cell(o)}"


def plot_title(cmp: Comparison) -> str:
    """The model, the method each device ended up with, and the sort key."""
    methods: dict[str, list[str]] = {}
    for o in cmp.options:
        if o.num_devices is not None:
            methods.setdefault(o.method, []).append(o.device)
    chosen = "; ".join(f"{m} on {', '.join(devs)}" if len(methods) > 1 else m
                       for m, devs in methods.items()) or "nothing fits"
    budget = f" · {fmt_count(cmp.setup.num_tokens)} tokens" if cmp.setup.num_tokens else ""
    return f"{cmp.model} · {chosen}{budget} · sorted by {cmp.objective}"


def plot_compare(cmp: Comparison, path: str | Path) -> Path:
    """Save three panels — memory per device (stacked term groups as a share of the device's
    memory, so a 24 GiB card and a 192 GiB one read alike; GiB written beside), time (log
    axis) and cost (n/a where no price is known) — one row per device option with its N,
    ZeRO stage, expert parallelism and method, then the free tiers. Needs matplotlib,
    imported here only (plot_available)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    rows = cmp.options
    tiers = cmp.free_tiers
    names = [plot_label(o) for o in rows] + [
        f"free: {t.display_name}" + ("" if t.fits else " · does not fit") for t in tiers]
    y = list(range(len(names)))
    fig, (ax_mem, ax_time, ax_cost) = plt.subplots(
        1, 3, figsize=(16, max(3.0, 0.35 * len(names) + 1.5)), sharey=True)
    groups = [memory_groups(o) for o in rows]
    shares = [sum(g.values()) / max(o.capacity_bytes, 1) for g, o in zip(groups, rows,
                                                                        strict=True)]
    squeeze = [min(1.0, MEMORY_AXIS_MAX / t) if t else 1.0 for t in shares]  # no-fit rows
    left = [0.0] * len(rows)
    for group, colour in GROUP_COLOURS.items():
        share = [g[group] / max(o.capacity_bytes, 1) * k
                 for g, o, k in zip(groups, rows, squeeze, strict=True)]
        if any(share):
            ax_mem.barh(y[:len(rows)], share, left=left, color=colour, label=group)
            left = [a + b for a, b in zip(left, share, strict=True)]
    for i, o in enumerate(rows):
        over = f" (×{shares[i]:,.1f})" if squeeze[i] < 1.0 else ""
        ax_mem.text(left[i] + 0.02, i, f"{o.peak_memory_bytes / GIB:,.0f} / "
                    f"{o.capacity_bytes / GIB:,.0f} GiB{over}", va="center",
                    fontsize="x-small")
    ax_mem.axvline(1.0, color="black", linewidth=1)
    ax_mem.set_xlim(0, MEMORY_AXIS_MAX + 0.8)
    ax_mem.set_xlabel("peak memory per device (share of its memory; line = full)")
    ax_mem.legend(fontsize="x-small", loc="lower right")
    budget = cmp.setup.num_tokens
    hours = [(o.total_seconds / 3600 if o.total_seconds is not None and budget
              else (o.device_hours_per_million_tokens / o.num_devices
                    if o.device_hours_per_million_tokens is not None and o.num_devices
                    else None)) for o in rows]
    hours += [t.total_seconds / 3600 if t.total_seconds is not None and budget else None
              for t in tiers]
    for i, h in enumerate(hours):
        if h:
            ax_time.barh(i, h, color="tab:blue" if i < len(rows) else "tab:green")
        else:
            ax_time.text(0.01, i, "no fit", va="center", fontsize="x-small",
                         transform=ax_time.get_yaxis_transform())
    if any(hours):
        ax_time.set_xscale("log")
    ax_time.set_xlabel("hours for the budget (log)" if cmp.setup.num_tokens
                       else "hours per 1M tokens (log)")
    for i, o in enumerate(rows):
        if o.cost_usd is not None:
            ax_cost.barh(i, o.cost_usd, color="tab:orange")
            ax_cost.text(o.cost_usd, i, f" {fmt_usd(o.cost_usd)}", va="center",
                         fontsize="x-small")
        else:
            why = "n/a (no price)" if o.price_per_hour_usd is None else "n/a"
            ax_cost.text(0.01, i, why, va="center", fontsize="x-small",
                         transform=ax_cost.get_yaxis_transform())
    for j in range(len(tiers)):
        ax_cost.text(0.01, len(rows) + j, "free", va="center", fontsize="x-small",
                     transform=ax_cost.get_yaxis_transform())
    ax_cost.set_xlabel("cost (USD)")
    ax_mem.set_yticks(y, names, fontsize="small")
    ax_mem.invert_yaxis()
    fig.suptitle(plot_title(cmp))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
