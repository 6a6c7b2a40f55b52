"""Verdict and advice: which concrete changes make a setup fit, and what each one does.

Each candidate is a changed TrainSetup (or a device count) re-estimated with the same memory
model; single changes first, then the cheapest combination that fits, found greedily in the
order a practitioner would try them (fused chunked loss, checkpointing, smaller micro-batch with
more accumulation, the optimizer step in backward, 8-bit optimizer, a 16-bit LoRA base, LoRA,
QLoRA), skipping a
change that conflicts with one already chosen."""

import math
from collections.abc import Callable

from estimator.specs import Advice, MemoryBreakdown, TrainSetup

MemoryFn = Callable[[TrainSetup], MemoryBreakdown]


FLAG_OF = {"fused_loss": "--fused-loss", "checkpointing": "--checkpointing",
           "optimizer_in_backward": "--optimizer-in-backward", "batch_size": "--batch-size",
           "grad_accum": "--grad-accum", "optimizer": "--optimizer", "method": "--method",
           "weight_bits": "--bits", "num_devices": "--num-devices", "num_nodes": "--nodes",
           "zero_stage": "--zero"}
"""The nvfree flag of each TrainSetup field an advised change sets."""


def flags_for(update: dict) -> str:
    """An advised TrainSetup change as the flags a user types, each field once: on/off fields
    as the bare flag, others as '--flag value' (no '--bits' where --method qlora implies 4;
    no '--nodes 1')."""
    parts, without = [], []
    for field, value in update.items():
        if field == "weight_bits" and update.get("method") in ("qlora", "lora", "full") and (
                value == {"qlora": 4}.get(update["method"], 16)):
            continue
        if field == "num_nodes" and value == 1:
            continue
        flag = FLAG_OF[field]
        if value is False:
            without.append(flag)
        else:
            parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts + [f"(without {flag})" for flag in without])


def candidate_changes(setup: TrainSetup) -> list[dict]:
    """Every TrainSetup change that could reduce memory, in the order a practitioner tries
    them. The optimizer step in backward is the bundled trainer's (HF Trainer has none)."""
    if setup.method == "inference":
        out: list[dict] = [{"batch_size": 1}] if setup.batch_size > 1 else []
        return out + [{"weight_bits": bits} for bits in (8, 4) if setup.weight_bits > bits]
    changes: list[dict] = []
    if setup.framework == "nvfree" and not setup.fused_loss:
        changes.append({"fused_loss": True})
    if not setup.checkpointing:
        changes.append({"checkpointing": True})
    if setup.batch_size > 1:
        changes.append({"batch_size": 1, "grad_accum": setup.grad_accum * setup.batch_size})
    if setup.framework == "nvfree" and not setup.optimizer_in_backward:
        changes.append({"optimizer_in_backward": True})  # advise() drops it where invalid
    if setup.optimizer == "adamw" and setup.method == "full":
        changes.append({"optimizer": "adamw8bit"})
    if setup.framework == "nvfree" and setup.method == "lora" and setup.weight_bits == 32:
        changes.append({"weight_bits": 16})  # fp32 compute: a bf16 base upcast per matmul
    if setup.method == "full":
        changes.append({"method": "lora", "weight_bits": 16})
    if setup.method in ("full", "lora"):
        changes.append({"method": "qlora", "weight_bits": 4})
    return changes


def advise(setup: TrainSetup, memory_of: MemoryFn) -> list[Advice]:
    """Single changes that lower the peak, then a greedy combination in the practitioner's
    order until it fits (the band's upper end: MemoryBreakdown.fits) if it does not already,
    without the earlier changes the later ones make unneeded; shown when it needs more than
    one change. Each Advice carries its TrainSetup change (`update`) and the flags for it."""
    current = memory_of(setup).total_bytes
    advice = []
    changes = [c for c in candidate_changes(setup) if _valid(_apply(setup, [c]))]
    for update in changes:
        memory = memory_of(setup.model_copy(update=update))
        if memory.total_bytes < current:
            advice.append(_advice(update, memory))
    advice.sort(key=lambda a: a.total_bytes)
    chosen: list[dict] = []
    for update in changes:
        if memory_of(_apply(setup, chosen)).fits:
            break
        if _valid(_apply(setup, [*chosen, update])):  # skip what conflicts
            chosen.append(update)
    for change in list(chosen[:-1]):  # drop an earlier change the later ones make unneeded
        rest = [c for c in chosen if c is not change]
        if memory_of(_apply(setup, rest)).fits:
            chosen = rest
    if len(chosen) > 1:
        merged = _merged(chosen)
        advice.insert(0, _advice(merged, memory_of(setup.model_copy(update=merged))))
    return advice


def _advice(update: dict, memory: MemoryBreakdown, step_seconds: float | None = None
            ) -> Advice:
    return Advice(change=flags_for(update), update=update, total_bytes=memory.total_bytes,
                  fits=memory.fits, step_seconds=step_seconds)


def _merged(changes: list[dict]) -> dict:
    """Several changes as one TrainSetup update (a later value of a field wins)."""
    out: dict = {}
    for update in changes:
        out.update(update)
    return out


def _valid(setup: TrainSetup) -> bool:
    """Whether the changed setup is one TrainSetup accepts (model_copy does not validate):
    the optimizer step in backward, for one, cannot accumulate micro-batches."""
    try:
        TrainSetup.model_validate(setup.model_dump())
    except ValueError:
        return False
    return True


def _apply(setup: TrainSetup, changes: list[dict]) -> TrainSetup:
    return setup.model_copy(update=_merged(changes))


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
