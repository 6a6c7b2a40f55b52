"""aten-level recording: a TorchDispatchMode base that does not import torch._dynamo, the
bytes one aten call reads and writes, per-phase byte records of a training step, and the
count of aten calls a function dispatches. Used by the calibration's executor recordings
(block_rates) and by the recorded tables of the analytic model (benchmarks/record_block_bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from estimator.specs import ModelSpec, TrainSetup


def dispatch_mode() -> type:
    """TorchDispatchMode without its dynamo guard. torch wraps every subclass's
    __torch_dispatch__ in torch._disable_dynamo, whose first call imports torch._dynamo:
    2.3 s of CPU time here, a quarter of the quick calibration's budget. Nothing is compiled
    inside these modes, so the guard is not needed (`_should_skip_dynamo` is torch's switch
    for it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False

    return _Mode


def count_aten_calls(fn: Callable[[], object]) -> int:
    """aten calls one run of `fn` dispatches (TorchDispatchMode; backward included)."""
    class _Count(dispatch_mode()):
        num_calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.num_calls += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.num_calls


# ----------------------------------------------------------------------------- op bytes

GEMM_OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "addmv", "mv", "dot")
"""aten ops the matmul/lora curves time (excluded from the memory-bound record)."""
ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention_for_cpu_backward",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_flash_attention_forward", "_flash_attention_backward",
                 "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention_backward")
"""Fused attention kernels (timed by the attention curve; excluded)."""
TIMED_ELSEWHERE = frozenset(GEMM_OPS + ATTENTION_OPS)
T = TypeVar("T")


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


INDEXED_ARGUMENTS = {"gather": ("self", "index"), "scatter": ("self", "index"),
                     "scatter_": ("self", "index"), "scatter_add": ("self", "index"),
                     "scatter_add_": ("self", "index"), "embedding": ("weight", "indices"),
                     "nll_loss_forward": ("self", "target"), "index_put_": ("self", "values")}
"""aten ops that touch only the elements an index selects of one large argument: (that
argument, the index argument; index_put_ writes one element per value). The loss head's
gather/scatter_add_/index_put_ into [C, V] logits touch C elements, an embedding lookup reads
b·s rows of the V·D table; counting the whole tensor charged the 151,936-vocabulary loss head
107 ms per step of work that takes 0.5 ms."""


def _selected_bytes(name: str, value: torch.Tensor, index: torch.Tensor) -> int:
    """Bytes of `value` an indexed op touches: one element per index entry (gather, scatter),
    one row per index entry (embedding)."""
    row = value.shape[-1] if name == "embedding" else 1
    return index.numel() * row * value.element_size()


def aten_call_bytes(func, args: tuple, kwargs: dict, out: object) -> int:
    """Bytes one aten call reads + writes: every tensor argument read once, every tensor it
    returns written once; an argument the schema marks as written (in-place `copy_`, `out=`) is
    counted as written only, and a returned alias of an input is not counted again. View ops
    move nothing (0). An indexed op's large argument counts only the elements its index
    selects (INDEXED_ARGUMENTS)."""
    if func.is_view:
        return 0
    schema = func._schema
    values = {arg.name: args[i] if i < len(args) else kwargs.get(arg.name)
              for i, arg in enumerate(schema.arguments)}
    indexed = INDEXED_ARGUMENTS.get(func.overloadpacket.__name__)
    total = 0
    written_ids: set[int] = set()
    for arg in schema.arguments:
        value = values[arg.name]
        if value is None:
            continue
        size = _tensor_bytes(value)
        if indexed is not None and arg.name == indexed[0]:
            size = _selected_bytes(func.overloadpacket.__name__, value, values[indexed[1]])
        if arg.alias_info is not None and arg.alias_info.is_write:
            total += size  # written
            if isinstance(value, torch.Tensor):
                written_ids.add(id(value))
            continue
        total += size
    outs = out if isinstance(out, (list, tuple)) else (out,)
    for value in outs:
        if isinstance(value, torch.Tensor) and id(value) not in written_ids:
            total += _tensor_bytes(value)
    return total


def memory_bound_call(func) -> bool:
    """Whether an aten call is memory-bound work the `elementwise` term covers: not a GEMM,
    not fused attention (their own curves time them), not a view (moves nothing)."""
    return not (func.is_view or func.overloadpacket.__name__ in TIMED_ELSEWHERE)


def record_op_bytes(fn: Callable[[], object]) -> dict[str, dict[str, float]]:
    """Run `fn` under a TorchDispatchMode and sum, per phase, the bytes read + written and the
    number of aten calls that no GEMM or attention curve times (views excluded).

    Phases: 'forward' until the autograd engine runs its first node, 'backward' while it runs
    nodes (a checkpointed block's recompute included), 'after' from then on (clipping,
    optimizer, zero_grad). Returns {phase: {"bytes": …, "calls": …, "gemm_calls": …,
    "aten_calls": …}}, "aten_calls" counting every call (views, GEMMs and attention included:
    what the dispatch term charges)."""
    phases = {p: {"bytes": 0.0, "calls": 0.0, "gemm_calls": 0.0, "aten_calls": 0.0}
              for p in ("forward", "backward", "after")}
    state = {"phase": "forward"}

    class _Record(dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            in_backward = torch._C._current_autograd_node() is not None
            if in_backward:
                state["phase"] = "backward"
            elif state["phase"] == "backward":
                state["phase"] = "after"
            rec = phases[state["phase"]]
            rec["aten_calls"] += 1
            if func.overloadpacket.__name__ in TIMED_ELSEWHERE:
                rec["gemm_calls"] += 1
            elif memory_bound_call(func):
                rec["bytes"] += aten_call_bytes(func, args, kwargs, out)
                rec["calls"] += 1
            return out

    with _Record():
        fn()
    return phases


StepRecords = dict[tuple[int, int], dict[str, dict[str, float]]]
"""record_op_bytes of a training step per (layers, batch size) ∈ {1, 2}²."""


def per_layer_per_token(rec: StepRecords, phase: str, seq: int, key: str = "bytes") -> float:
    """One layer's per-token share of a phase's `key` (bytes …): the double difference of
    2 − 1 layers at batch 2 less 2 − 1 layers at batch 1, per token of a `seq`-token
    sequence. The embedding, loss and optimizer drop out with the layer difference, the
    weight-sized work of a layer (casts, dequantisation) with the batch difference."""
    return ((rec[2, 2][phase][key] - rec[1, 2][phase][key])
            - (rec[2, 1][phase][key] - rec[1, 1][phase][key])) / seq


SYNTHETIC_TEXT = "".join(chr(32 + (i * 7919) % 95) for i in range(4096))
"""Printable filler for runs whose data does not matter (the calibration's recordings):
tokenising the default corpus (the Python standard library's sources) took 3–6 s of CPU."""


def record_train_steps(spec: ModelSpec, setup: TrainSetup, recorder: Callable[[Callable], T],
                       *, steps: int = 1, lr: float = 1e-3, synthetic_data: bool = False,
                       ) -> list[T]:
    """`recorder(step)` for each of `steps` train_steps of a fresh executor run of spec/setup
    (seed 0) in a temporary directory, after one unrecorded step (it builds the optimizer
    states and kernel caches). synthetic_data: train on SYNTHETIC_TEXT repeated instead of the
    default corpus (for timings that do not depend on the tokens)."""
    import tempfile
    from pathlib import Path

    from estimator.executor.train import TrainConfig, prepare_run, train_step

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        data = None
        if synthetic_data:
            data = Path(out) / "synthetic.txt"
            repeats = 1 + 4 * (steps + 1) * setup.tokens_per_micro_batch // 4096
            data.write_text(SYNTHETIC_TEXT * repeats)
        run, *_ = prepare_run(spec, setup, TrainConfig(max_steps=steps + 1, data=data,
                                                        output_dir=Path(out), predict=False))
        train_step(run, 0, lr)
        return [recorder(lambda step=step: train_step(run, step, lr))
                for step in range(1, steps + 1)]


def record_train_step_bytes(spec: ModelSpec, setup: TrainSetup) -> dict[str, dict[str, float]]:
    """record_op_bytes of the second train_step of a fresh executor run of spec/setup (the
    first step builds states and caches; seed 0)."""
    return record_train_steps(spec, setup, record_op_bytes)[0]
