"""Verdict and advice: which concrete changes make a setup fit, and what each one does.

Each candidate is a changed TrainSetup (or a device count) re-estimated with the same memory
model; single changes first, then the cheapest combination that fits, found greedily in the
order a practitioner would try them (fused chunked loss, checkpointing, smaller micro-batch with
more accumulation, the optimizer step in backward, 8-bit optimizer, LoRA, QLoRA), skipping a
change that conflicts with one already chosen."""

import math
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
    if setup.framework == "nvfree" and not setup.fused_loss:
        changes.append(("--fused-loss", {"fused_loss": True}))
    if not setup.checkpointing:
        changes.append(("--checkpointing", {"checkpointing": True}))
    if setup.batch_size > 1:
        accum = setup.grad_accum * setup.batch_size
        changes.append((f"--batch-size 1 --grad-accum {accum}",
                        {"batch_size": 1, "grad_accum": accum}))
    if not setup.optimizer_in_backward:  # advise() drops it where the setup cannot take it
        changes.append(("--optimizer-in-backward", {"optimizer_in_backward": True}))
    if setup.optimizer == "adamw" and setup.method == "full":
        changes.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if setup.method == "full":
        changes.append(("--method lora", {"method": "lora", "weight_bits": 16}))
    if setup.method in ("full", "lora"):
        changes.append(("--method qlora --bits 4", {"method": "qlora", "weight_bits": 4}))
    return changes


def advise(setup: TrainSetup, memory_of: MemoryFn) -> list[Advice]:
    """Single changes, then a greedy combination in the practitioner's order until it fits
    (the band's upper end: MemoryBreakdown.fits) if it does not already, without the earlier
    changes the later ones make unneeded; shown when it needs more than one change."""
    advice = []
    changes = [c for c in candidate_changes(setup) if _valid(_apply(setup, [c]))]
    for flag, update in changes:
        memory = memory_of(setup.model_copy(update=update))
        advice.append(Advice(change=flag, total_bytes=memory.total_bytes, fits=memory.fits))
    advice.sort(key=lambda a: a.total_bytes)
    chosen: list[tuple[str, dict]] = []
    for flag, update in changes:
        if memory_of(_apply(setup, chosen)).fits:
            break
        if _valid(_apply(setup, [*chosen, (flag, update)])):  # skip what conflicts
            chosen.append((flag, update))
    for change in list(chosen[:-1]):  # drop an earlier change the later ones make unneeded
        rest = [c for c in chosen if c is not change]
        if memory_of(_apply(setup, rest)).fits:
            chosen = rest
    flags = [flag for flag, _ in chosen]
    combined = _apply(setup, chosen)
    if len(flags) > 1:
        memory = memory_of(combined)
        advice.insert(0, Advice(change=" ".join(flags), total_bytes=memory.total_bytes,
                                fits=memory.fits))
    return advice


def _valid(setup: TrainSetup) -> bool:
    """Whether the changed setup is one TrainSetup accepts (model_copy does not validate):
    the optimizer step in backward, for one, cannot accumulate micro-batches."""
    try:
        TrainSetup.model_validate(setup.model_dump())
    except ValueError:
        return False
    return True


def _apply(setup: TrainSetup, changes: list[tuple[str, dict]]) -> TrainSetup:
    for _, update in changes:
        setup = setup.model_copy(update=update)
    return setup


def fewest_devices(setup: TrainSetup, memory_of: MemoryFn, stage: int, max_devices: int,
                   one_per_node: bool = False) -> tuple[int, int] | None:
    """(N, peak bytes per device) of the fewest devices that fit at one ZeRO stage, searched
    over multiples of the node count and expert-parallel degree (per-device memory never grows
    with N, so a binary search over the multiples is exact). one_per_node: each device is a
    whole machine (CPUs), so N devices are N nodes."""
    step = setup.expert_parallel if one_per_node else math.lcm(setup.num_nodes,
                                                               setup.expert_parallel)

    def memory(k: int):
        n = k * step
        update = {"num_devices": n, "zero_stage": stage}
        if one_per_node:
            update["num_nodes"] = n
        return memory_of(setup.model_copy(update=update))

    def fits(k: int) -> bool:
        return memory(k).fits

    lo, hi = max(1, -(-setup.num_devices // step)), max_devices // step
    if hi < lo or not fits(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo * step, memory(lo).total_bytes


def devices_needed(setup: TrainSetup, memory_of: MemoryFn, max_devices: int = 4096,
                   one_per_node: bool = False) -> tuple[int, int, int] | None:
    """(N, ZeRO stage, peak bytes per device) of the smallest data-parallel group that fits
    (peak ≤ the capacity memory_of reports), from the per-device memory model
    (memory.model_state_terms: ZeRO-1 shards optimizer states, 2 adds gradients, 3 parameters;
    Rajbhandari et al. 2020). Ties go to the lowest stage (least communication). None if even
    max_devices do not suffice."""
    best = None
    for stage in (1, 2, 3):
        if stage < setup.zero_stage:
            continue
        found = fewest_devices(setup, memory_of, stage, max_devices, one_per_node)
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], stage, found[1])
    return best
