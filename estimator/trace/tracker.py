"""Live-tensor accounting of one training step: torch's MemTracker, with three changes.

torch.distributed._tools.mem_tracker.MemTracker (torch ≥ 2.5) is a TorchDispatchMode that
tracks every tensor storage created or registered, categorised as parameter, buffer, gradient,
activation, temporary (backward) or optimizer state, and snapshots each module's peak in forward
and backward. On fake tensors it sees the same storages a real run allocates (storage sizes;
no caching-allocator rounding on the CPU device the trace uses). Changes (torch 2.13):

- gradient hooks go only on parameters that require grad (MemTracker registers a hook on every
  parameter, which raises on the frozen base of LoRA/QLoRA);
- peak bookkeeping walks only the active modules (upstream walks every module ever seen on
  every op: quadratic on a 560B MoE);
- the global peak remembers its phase (set by the step runner: forward / backward /
  optimizer, recompute inside checkpointed backward) and the innermost active module.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _ModState

from estimator.specs.trace import ModulePeak

CATEGORY = {_MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers",
            _MemRefType.GRAD: "gradients", _MemRefType.ACT: "activations",
            _MemRefType.TEMP: "temporaries", _MemRefType.OPT: "optimizer_states",
            _MemRefType.OTH: "other"}


class PeakTracker(MemTracker):
    """MemTracker that also records where (phase, module) the step's peak happened."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = "setup"
        self.peak_phase = "setup"
        self.peak_module = ""
        self.phase_peaks: dict[str, int] = {}
        self._stats_by_name: dict[str, object] = {}

    def track_as_parameters(self, tensors) -> None:
        """Count tensors that belong to the model but are no Parameter (bitsandbytes quant
        states: absmax, nested absmax, code) as parameters."""
        for tensor in tensors:
            self._update_and_maybe_create_winfos(tensor, _MemRefType.PARAM)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = self._grad_hooks(param)
        return memory

    def _grad_hooks(self, param):
        def on_grad(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        return (param.register_hook(on_grad),
                param.register_post_accumulate_grad_hook(lambda p: on_grad(p.grad)))

    def _pre_fw_hook(self, module, inputs) -> None:
        super()._pre_fw_hook(module, inputs)
        stats = self.memory_tracking[module]
        self._stats_by_name[stats.mod_fqn] = stats

    def _update_peak_stats(self, peak_state) -> None:
        current = self._curr_mem_snap
        for name in self._mod_tracker.parents:
            stats = self._stats_by_name.get(name)
            if stats is None or peak_state not in stats.snapshots:
                continue
            for dev, snap in current.items():
                if stats.local_peak.get(dev, 0) < snap[_TOTAL_KEY]:
                    stats.local_peak[dev] = snap[_TOTAL_KEY]
                    stats.snapshots[peak_state][-1][dev] = deepcopy(snap)
        self._update_global_peak(current)

    def _update_global_peak(self, current) -> None:
        phase = "recompute" if self.stage == "backward" and self._in_ac else self.stage
        for dev, snap in current.items():
            total = snap[_TOTAL_KEY]
            if self.phase_peaks.get(phase, 0) < total:
                self.phase_peaks[phase] = total
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = deepcopy(snap)
                self.peak_phase = phase
                self.peak_module = innermost(self._mod_tracker.parents)


def innermost(active: set[str]) -> str:
    """The deepest active module path ('' when only the global scope is active)."""
    names = [n for n in active if n != "Global"]
    return max(names, key=lambda n: (n.count("."), len(n)), default="")


def peak_components(tracker: PeakTracker) -> dict[str, int]:
    """Category → bytes at the step's peak (all devices summed; the trace uses one)."""
    totals: dict[str, int] = dict.fromkeys(CATEGORY.values(), 0)
    for snap in tracker.get_tracker_snapshot("peak").values():
        for key, value in snap.items():
            if key in CATEGORY:
                totals[CATEGORY[key]] += value
    return totals


def peak_bytes(tracker: PeakTracker) -> int:
    """The step's peak total (bytes)."""
    return sum(tracker._peak_mem.values())


def module_peaks(tracker: PeakTracker, prefix: str) -> list[ModulePeak]:
    """Every module's forward and backward peaks (root, wrappers and PEFT's adapter internals
    left out: an adapted linear is listed under its own name)."""
    peaks = []
    for stats in tracker.memory_tracking.values():
        name = display_name(stats.mod_fqn, prefix)
        if not name or any(part.startswith("lora_") or part == "base_layer"
                           for part in name.split(".")):
            continue
        peaks.append(ModulePeak(
            name=name,
            forward_peak_bytes=state_peak(stats, _ModState.PEAK_FW),
            backward_peak_bytes=state_peak(stats, _ModState.PEAK_BW)))
    return peaks


def display_name(fqn: str, prefix: str) -> str:
    """A MemTracker module path without the root's class name and the wrapper prefix (PEFT's
    'base_model.model.'); '' for the root and the wrappers themselves."""
    name = fqn.split(".", 1)[1] if "." in fqn else ""
    if not name or prefix.startswith(name + "."):
        return ""
    return name.removeprefix(prefix)


def state_peak(stats, state) -> int:
    """The highest total in a module's peak snapshots of one kind (bytes)."""
    totals = [snap[_TOTAL_KEY] for call in stats.snapshots.get(state, [])
              for snap in call.values()]
    return max(totals, default=0)


def top_modules(peaks: list[ModulePeak], count: int) -> list[ModulePeak]:
    """The `count` modules with the highest peaks, deepest first among equal peaks; a module
    whose peak equals that of a listed descendant is left out (its whole ancestor chain shares
    the peak of the innermost module running at that moment)."""
    ranked = sorted(peaks, key=lambda p: (-p.peak_bytes, -p.name.count("."), p.name))
    chosen: list[ModulePeak] = []
    for peak in ranked:
        if any(c.name.startswith(peak.name + ".") and c.peak_bytes == peak.peak_bytes
               for c in chosen):
            continue
        chosen.append(peak)
        if len(chosen) == count:
            break
    return chosen
