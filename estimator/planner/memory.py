"""Peak memory of every candidate in arrays, from memory.py's own terms (memory_phases,
micro_batch_bytes, memory_breakdown for what the phases leave out)."""


import numpy as np

from estimator.analytic.memory import HOST_TERMS, memory_breakdown, model_state_terms
from estimator.analytic.micro_batch import micro_batch_bytes
from estimator.analytic.runtime import runtime_overhead_bytes, step_runtime_bytes
from estimator.planner.space import Group, Space, Sweep, _at
from estimator.specs import (
    Device,
    ModelSpec,
    ParamCounts,
    TrainSetup,
)

# ------------------------------------------------------------------ peak memory


def memory_phases(model: ModelSpec, setup: TrainSetup, device: Device,
                  params: ParamCounts, num_devices=None) -> tuple[int, int, int, int]:
    """The memory_breakdown terms that do not depend on the micro-batch, from memory.py's own
    term functions: (bytes held all step: weights, states, runtime; forward/backward bytes
    besides the micro-batch's (ZeRO-3's gathered block, autocast's weight copies); gradient
    bytes, held through forward/backward when accumulating; the optimizer-step phase:
    gradients + optimizer transients). `num_devices`: an array of device counts on the same
    side of 1 as the setup's (model_state_terms), each term then an array."""
    state = model_state_terms(model, setup, device, params, num_devices=num_devices)
    for name in HOST_TERMS.get(setup.offload, ()):
        state.pop(name)
    grads = state.get("gradients", 0)
    held = (state.get("weights", 0) + state.get("quant_scales", 0)
            + state.get("master_weights", 0) + state.get("adapter_weights", 0)
            + state.get("optimizer_states", 0) + runtime_overhead_bytes(device, setup)
            + _step_runtime(setup, device, grads))
    return (held, state["gathered_params"] + state["autocast_copies"], grads,
            grads + state.get("optimizer_transient", 0))


def _step_runtime(setup: TrainSetup, device: Device, grads) -> int:
    """memory.step_runtime_bytes summed, per element of an array of gradient bytes."""
    if np.ndim(grads) == 0:
        return sum(step_runtime_bytes(setup, device, grads).values())
    return np.array([sum(step_runtime_bytes(setup, device, g).values())
                     for g in grads.tolist()])


def phase_peak(phases: tuple, fwd_bwd, accums):
    """memory_breakdown's peak from its phases: held + max(forward/backward + gathered block
    (+ gradients when accumulating), optimizer step); scalars or arrays."""
    held, gathered, grads, optimizer_phase = phases
    forward = fwd_bwd + gathered + np.where(np.asarray(accums) > 1, grads, 0)
    return held + np.maximum(forward, optimizer_phase)


def group_peaks(model: ModelSpec, groups: list[Group], device: Device,
                params: dict[str, ParamCounts], space: Space) -> np.ndarray:
    """Peak bytes per device of every candidate: memory_phases per sweep (over the array of
    its device counts), batch rows per structure and micro-batch (_batch_rows), phase_peak over
    all candidates at once."""
    phases = np.empty((4, len(groups)))
    tables: list[dict] = [{} for _ in space.keys]
    fwd_bwd: dict[tuple, int] = {}
    for sw in space.sweeps:
        p = params[sw.setup.method]
        terms = memory_phases(model, sw.setup, sw.rank, p, sw.counts)
        for k, term in enumerate(terms):
            phases[k, sw.members] = term
        _batch_rows(model, sw, p, terms, tables[space.key[sw.members[0]]], fwd_bwd)
    rows = np.zeros((2, len(space.keys), len(space.batch_values)))
    for k, table in enumerate(tables):
        at = np.searchsorted(space.batch_values, list(table))
        rows[:, k, at] = np.array(list(table.values()), dtype=float).T
    g, key, b = space.group, space.key[space.group], space.batch_index
    return rows[1, key, b] + phase_peak(phases[:, g], rows[0, key, b], space.accum)


def _batch_rows(model: ModelSpec, sw: Sweep, params: ParamCounts, phases: tuple,
                table: dict, fwd_bwd: dict) -> None:
    """Fill table[b] for the sweep's micro-batches not yet there with (batch_bytes, the bytes
    memory_breakdown counts beyond phase_peak): the terms held in both phases that grow with
    the micro-batch (KV cache, expert kernel caches, any term added to memory_breakdown
    later), so the composition stays equal to memory_breakdown. They are non-negative and grow
    with b: when memory_breakdown adds nothing at the largest new b, it adds nothing at the
    smaller ones either (one memory_breakdown per structure, usually). batch_bytes (the
    micro-batch's activations, logits, dequantised weight) is shared by the structures that
    differ only in the optimizer (`fwd_bwd`)."""
    if table.keys() >= {b for g in sw.groups for b in g.batches.tolist()}:
        return
    new: dict[int, tuple[int, int]] = {}  # b -> (a, index of the group that has it)
    for j, g in enumerate(sw.groups):
        for b, a in zip(g.batches.tolist(), g.accums.tolist(), strict=True):
            if b not in table and b not in new:
                new[b] = (a, j)
    if not new:
        return
    mate = (*sw.structure[:3], *sw.structure[4:], sw.split)
    for b in new:
        if (mate, b) not in fwd_bwd:
            fwd_bwd[mate, b] = micro_batch_bytes(model, _at(sw.setup, b), sw.rank.backend)

    def beyond(b: int) -> int:
        a, j = new[b]
        exact = memory_breakdown(model, _at(sw.groups[j].setup, b, a), sw.rank,
                                 params).total_bytes
        at_j = tuple(t[j] if np.ndim(t) else t for t in phases)
        return exact - int(phase_peak(at_j, fwd_bwd[mate, b], a))

    largest = max(new)
    top = beyond(largest)
    for b in new:
        table[b] = (fwd_bwd[mate, b],
                    top if b == largest else (0 if top == 0 else beyond(b)))
