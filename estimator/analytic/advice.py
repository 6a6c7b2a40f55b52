"""Verdict and advice: which concrete changes make a setup fit, and what each one does.

Each candidate is a changed TrainSetup (or a device count) re-estimated with the same memory
model; single changes first, then the cheapest combination that fits, found greedily in the
order a practitioner would try them (fused chunked loss, checkpointing, smaller micro-batch with
more accumulation, 8-bit optimizer, LoRA, QLoRA)."""

from collections.abc import Callable

from estimator.specs import Advice, MemoryBreakdown, TrainSetup

MemoryFn = Callable[[TrainSetup], MemoryBreakdown]


def candidate_changes(setup: TrainSetup) -> list[tuple[str, dict]]:
    """(flag text, TrainSetup update) for every change that could reduce memory."""
    if setup.method == "inference":
        out = []
        if setup.batch_size > 1:
            out.append(("--batch-size 1", {"batch_size": 1}))
        for bits in (8, 4):
            if setup.weight_bits > bits:
                out.append((f"--bits {bits}", {"weight_bits": bits}))
        return out
    changes: list[tuple[str, dict]] = []
    if not setup.fused_loss:
        changes.append(("--fused-loss", {"fused_loss": True}))
    if not setup.checkpointing:
        changes.append(("--checkpointing", {"checkpointing": True}))
    if setup.batch_size > 1:
        accum = setup.grad_accum * setup.batch_size
        changes.append((f"--batch-size 1 --grad-accum {accum}",
                        {"batch_size": 1, "grad_accum": accum}))
    if setup.optimizer == "adamw" and setup.method == "full":
        changes.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if setup.method == "full":
        changes.append(("--method lora", {"method": "lora", "weight_bits": 16}))
    if setup.method in ("full", "lora"):
        changes.append(("--method qlora --bits 4", {"method": "qlora", "weight_bits": 4}))
    return changes


def advise(setup: TrainSetup, memory_of: MemoryFn, capacity_bytes: int) -> list[Advice]:
    """Single changes, then a greedy combination until it fits (if it does not already)."""
    advice = []
    for flag, update in candidate_changes(setup):
        total = memory_of(setup.model_copy(update=update)).total_bytes
        advice.append(Advice(change=flag, total_bytes=total, fits=total <= capacity_bytes))
    advice.sort(key=lambda a: a.total_bytes)
    combined, flags = setup, []
    for flag, update in candidate_changes(setup):
        if memory_of(combined).total_bytes <= capacity_bytes:
            break
        combined = combined.model_copy(update=update)
        flags.append(flag)
    if len(flags) > 1:
        total = memory_of(combined).total_bytes
        advice.insert(0, Advice(change=" ".join(flags), total_bytes=total,
                                fits=total <= capacity_bytes))
    return advice


def devices_needed(sharded_bytes: int, replicated_bytes: int, capacity_bytes: int,
                   max_devices: int = 4096) -> int | None:
    """Fewest devices N with sharded/N + replicated ≤ capacity (ZeRO-3/FSDP shards weights,
    gradients and optimizer states; activations, logits and runtime stay per device;
    Rajbhandari et al. 2020). None if even max_devices do not suffice."""
    room = capacity_bytes - replicated_bytes
    if room <= 0:
        return None
    n = max(1, -(-sharded_bytes // room))
    return n if n <= max_devices else None
