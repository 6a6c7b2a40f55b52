"""Choose the training plan that fits and finishes soonest (or cheapest).

Pure (no torch). The search space is method × precision × optimizer × checkpointing × number
of devices × ZeRO stage × micro-batch, with the accumulation that keeps the global batch. A
*structure* is one method × precision × optimizer × checkpointing; a *group* is a structure at
one device count and stage, over its micro-batches; a *sweep* is the groups of one structure
and stage (on one rank device, on the same side of one device) over all device counts, which
the analytic model's branches treat alike, so its functions take the device counts as an
array (memory.model_state_terms, parallel.step_collectives / optimizer_share, comms.py). The
space is scored in arrays, every term taken from the analytic model of `estimate()`, and
assembled in one gather from per-sweep, per-structure × micro-batch and per-candidate terms
(index_space):

- Compute time: per structure, throughput.timed_ops at (micro-batch, accumulation) = (1, 1),
  (2, 1) and (1, 2) (OpTable): per-call work is affine in the micro-batch b at a fixed sequence
  length (GEMM rows and elementwise work scale with b·s; weight casts and the optimizer step do
  not), call counts are affine in the accumulation a. The lists do not depend on the device
  count or stage (a rank computes as one device; only a CPU split between ranks changes the
  rates), so one table serves every group of the structure. Per-call times are evaluated once
  per distinct micro-batch, each op class with one numpy call for all structures on one rank
  device (compute_sums), and summed in the affine form in a. The second optimizer of a
  structure needs only the list at (1, 1). A structure whose probes disagree with the affine
  form (other op names; calls that change with b: MoE dispatch on a CPU) is scored exactly.
- Several devices (parallel.compose_throughput's terms), per sweep: the optimizer ops scaled
  to each rank's shard (parallel.optimizer_share), the host optimizer step of offload, and the
  collectives of parallel.step_collectives at the same probes (payload affine in b, calls
  affine in a), one call of each timed by comms.collective_seconds over the array of node
  layouts, once per distinct payload and layout (_call_seconds); sweeps that differ only in
  the optimizer or checkpointing share the terms when their collectives at (1, 1) are equal.
- Peak memory: memory_breakdown's two phases, held + max(forward/backward, optimizer step)
  (phase_peak), from memory.py's own terms: memory_phases per sweep, micro_batch_bytes per structure
  and micro-batch (evaluated per b, not extrapolated: chunked logits are not affine in b), and
  memory_breakdown itself at the largest micro-batch of each structure for any term the phases
  leave out (KV cache, expert kernel caches, a term added later), per b where there is one.

The best candidates are re-scored exactly with the functions `estimator.planner.estimate` composes
(memory_breakdown, step_throughput; not its advice) and those numbers are what the plan
records; if they differ from the array scores, the whole space is scored exactly.
"""

_PUBLIC = {
    "memory_totals": "scoring", "score": "scoring", "score_groups": "scoring",
    "step_seconds": "scoring", "plan_setup": "ranking", "search": "ranking",
    "Constraints": "space", "SearchResult": "space", "devices_up_to": "space",
    "micro_batches": "space", "nodes_for": "space", "search_space": "space",
    "setups_at_device_counts": "space", "structural_setups": "space",
}
"""Public name → submodule. Loaded on first use, so that `estimator.planner.advice` (which
`estimate` imports) does not import numpy: `nvfree estimate` never needs it."""

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"estimator.planner.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'estimator.planner' has no attribute {name!r}")
