"""Microbenchmark cases in the shapes training uses. Each Case builds its tensors only when run,
returns a zero-argument callable to time, and states its op class and work (FLOPs or bytes).

Work accounting (what each op class's `work` counts — the throughput model must count the same):
- matmul.<dtype> / lora.<dtype>: 2·m·n·k FLOPs of one GEMM. Linear forward y = x·Wᵀ
  (tokens×hidden @ hidden×out), input gradient dx = dy·W, weight gradient dW = dyᵀ·x; lora = the
  skinny rank-r GEMMs of an adapter (x·Aᵀ, z·Bᵀ, dAᵀ = xᵀ·dz).
- attention.<dtype>: causal SDPA forward + backward together, 6·b·h·s²·d FLOPs (forward
  4·b·h·s²·d halved by causality, backward twice the forward).
- memory: bytes read + written by copy (2 × 4 B per element) and triad a = b + s·c (3 × 4 B).
- elementwise.<dtype>: bytes every aten kernel reads + writes, as flops.MEMORY_BOUND_BYTES
  counts a block's memory-bound work: SiLU·mul + residual add is three kernels (silu: read 1,
  write 1; mul: read 2, write 1; add: read 2, write 1 = 8 tensors); fp32 and bf16 apart (a
  bf16 kernel converts every element to fp32 and back, so its bytes/s differ).
- norm: nominal bytes of RMSNorm forward (read x, write y, in x's dtype) — the executor's
  composition in fp32 (7 small kernels), hence its own class with its own overhead.
- alloc: bytes of a freshly allocated tensor written once (allocation + first-touch faults).
- optimizer: torch.optim.AdamW step, 28 B per fp32 parameter (read p, g, m, v = 16 B; write p, m,
  v = 12 B); overhead_seconds is per parameter tensor.
- dequant.nf4: bytes of the 16-bit output of NF4 dequantisation (2 B per weight).
- dispatch: one tiny op's wall time (overhead only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from estimator.calibrate.aten_ops import (  # noqa: F401  (re-exported: the recording API)
    ATTENTION_OPS,
    GEMM_OPS,
    INDEXED_ARGUMENTS,
    TIMED_ELSEWHERE,
    aten_call_bytes,
    count_aten_calls,
    memory_bound_call,
    record_op_bytes,
    record_train_step_bytes,
    record_train_steps,
)
from estimator.calibrate.pools import (  # noqa: F401  (re-exported)
    _POOLS,
    _rotating,
    cold_pool_bytes,
    last_level_cache_bytes,
    operand_pool,
    private_cache_bytes,
    release_pools,
)
from estimator.specs import ModelSpec, TrainSetup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

NF4_BLOCK = 64


@dataclass(frozen=True)
class Case:
    """One benchmark: `build(device)` makes tensors and returns the callable to time."""

    op_class: str
    """Efficiency-curve class the measurement feeds (matmul.fp32, memory …)."""
    label: str
    """Human description (shape, orientation)."""
    work: float
    """FLOPs or bytes of one call (count)."""
    build: Callable[[str], Callable[[], object]]
    """device → zero-argument callable running the op once."""
    tiny: bool = False
    """True for the overhead probe of the class (not a curve knot)."""


# ----------------------------------------------------------------------------- GEMMs


def _rand(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Uniform values in [-1, 1) (an RNG pass cheaper than randn's; GEMM and elementwise
    times do not depend on the values)."""
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-1, 1)


def gemm_cases(dtype: str, shapes: list[tuple[int, int, int]], op_class: str,
               dgrad_class: str | None = None) -> list[Case]:
    """Forward, input-gradient and weight-gradient GEMMs of a linear tokens×hidden → out; the
    input gradient dy·W (W not transposed: autograd's grad of F.linear) in `dgrad_class` when
    given — its own layout, which CPUs without native bf16 run far slower (2-core AMD EPYC
    Zen 3, one thread, bf16: dy·W 0.7–1.3 GFLOP/s where F.linear ran 7–10 and dyᵀ·x 6–18;
    fp32 alike at 44–61)."""
    dt = DTYPES[dtype]
    cases = []
    for tokens, hidden, out in shapes:
        work = 2.0 * tokens * hidden * out
        dims = f"{tokens}x{hidden}->{out}"

        def fwd(device: str, t=tokens, h=hidden, o=out) -> Callable[[], object]:
            x, w = _rand((t, h), dt, device), _rand((o, h), dt, device)
            return lambda: F.linear(x, w)

        def dgrad(device: str, t=tokens, h=hidden, o=out) -> Callable[[], object]:
            dy, w = _rand((t, o), dt, device), _rand((o, h), dt, device)
            return lambda: dy @ w

        def wgrad(device: str, t=tokens, h=hidden, o=out) -> Callable[[], object]:
            dy, x = _rand((t, o), dt, device), _rand((t, h), dt, device)
            return lambda: dy.t() @ x

        cases += [
            Case(op_class, f"{op_class} fwd {dims}", work, fwd),
            Case(dgrad_class or op_class, f"{dgrad_class or op_class} dgrad {dims}", work,
                 dgrad),
            Case(op_class, f"{op_class} wgrad {dims}", work, wgrad),
        ]
    return cases


def lora_rank(label: str) -> int | None:
    """The rank of a lora_cases label ('lora.fp32 down 512x1024 r=8' → 8; None otherwise)."""
    _, sep, rank = label.rpartition(" r=")
    return int(rank) if sep and rank.isdigit() else None


def lora_cases(dtype: str, shapes: list[tuple[int, int, int]], pool_bytes: int) -> list[Case]:
    """Skinny adapter GEMMs (tokens, hidden, rank) as the executor runs them (executor/lora.py):
    down x·Aᵀ, the update added in place y += z·Bᵀ, and the weight gradients dzᵀ·x (A) and
    dyᵀ·z (B). Their large operand is a [tokens, hidden] activation that the step last touched
    several kernels ago, so every call reads operands last touched pool_bytes ago (as
    cold_gemm_cases). Timed on the same operands in a loop, the [512, 1536] ones stay in the
    private cache: dyᵀ·z ran in 109 µs there and 236 µs after a 6 MB elementwise op (bf16, 2
    threads); in the step these GEMMs ran at 2.2–3.3× the loop-timed curve."""
    dt, op_class = DTYPES[dtype], f"lora.{dtype}"
    cases = []
    for tokens, hidden, rank in shapes:
        work = 2.0 * tokens * hidden * rank
        dims = f"{tokens}x{hidden} r={rank}"
        t, h, r = tokens, hidden, rank

        def down(device: str, t=t, h=h, r=r) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, h), (r, h)), F.linear)

        def up(device: str, t=t, h=h, r=r) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, h), (t, r), (h, r)),
                             lambda y, z, b: y.addmm_(z, b.t(), alpha=1e-3))

        def grad_a(device: str, t=t, h=h, r=r) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, r), (t, h)),
                             lambda dz, x: dz.t() @ x)

        def grad_b(device: str, t=t, h=h, r=r) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, h), (t, r)),
                             lambda dy, z: dy.t() @ z)

        cases += [
            Case(op_class, f"{op_class} down {dims}", work, down),
            Case(op_class, f"{op_class} up {dims}", work, up),
            Case(op_class, f"{op_class} gradA {dims}", work, grad_a),
            Case(op_class, f"{op_class} gradB {dims}", work, grad_b),
        ]
    return cases


def gemm_overhead_case(dtype: str, op_class: str) -> Case:
    """A 1×8 @ 8×8 linear: per-call overhead of the GEMM path."""
    dt = DTYPES[dtype]

    def build(device: str) -> Callable[[], object]:
        x, w = _rand((1, 8), dt, device), _rand((8, 8), dt, device)
        return lambda: F.linear(x, w)

    return Case(op_class, f"{op_class} overhead 1x8->8", 2.0 * 64, build, tiny=True)


# ----------------------------------------------------------------------------- attention


def attention_cases(dtype: str, shapes: list[tuple[int, int, int]]) -> list[Case]:
    """Causal SDPA forward + backward for (heads, seq, head_dim), batch 1."""
    dt, op_class = DTYPES[dtype], f"attention.{dtype}"
    cases = []
    for heads, seq, head_dim in shapes:

        def build(device: str, h=heads, s=seq, d=head_dim) -> Callable[[], object]:
            q, k, v = (_rand((1, h, s, d), dt, device).requires_grad_() for _ in range(3))
            grad = _rand((1, h, s, d), dt, device)

            def step() -> None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(grad)
                q.grad = k.grad = v.grad = None

            return step

        work = 6.0 * heads * seq * seq * head_dim
        tiny = seq <= 8
        cases.append(Case(op_class, f"{op_class} fwd+bwd h={heads} s={seq} d={head_dim}",
                          work, build, tiny=tiny))
    return cases


# ----------------------------------------------------------------------------- memory-bound


def memory_cases(sizes: list[int]) -> list[Case]:
    """STREAM-style copy (dst ← src) and triad (a ← b + 2·c) over fp32 arrays of n elements
    (constant values: a memset-speed fill instead of an RNG pass; the time does not depend on
    them)."""
    cases = []
    for n in sizes:

        def copy(device: str, n=n) -> Callable[[], object]:
            src, dst = torch.full((n,), 0.5, device=device), torch.empty(n, device=device)
            return lambda: dst.copy_(src)

        def triad(device: str, n=n) -> Callable[[], object]:
            b, c, a = (torch.full((n,), 0.5, device=device) for _ in range(3))
            return lambda: torch.add(b, c, alpha=2.0, out=a)

        tiny = n <= 64
        cases.append(Case("memory", f"copy {n * 4} B", 8.0 * n, copy, tiny=tiny))
        if not tiny:
            cases.append(Case("memory", f"triad {n * 4} B", 12.0 * n, triad))
    return cases


def alloc_cases(sizes: list[int]) -> list[Case]:
    """A freshly allocated fp32 tensor of n elements written once (torch.empty + fill_): what
    a new gradient or activation costs. Above glibc's mmap threshold (≤ 32 MiB) every such
    tensor comes fresh from the kernel and its first touch page-faults (~3 GB/s here vs
    ~25 GB/s for a copy into existing memory)."""
    cases = []
    for n in sizes:

        def build(device: str, n=n) -> Callable[[], object]:
            return lambda: torch.empty(n, device=device).fill_(1.0)

        cases.append(Case("alloc", f"alloc+fill {n * 4} B", 4.0 * n, build, tiny=n <= 64))
    return cases


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The executor's RMSNorm (estimator/executor/model.py), computed in fp32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def elementwise_cases(shapes: list[tuple[int, int]], dtypes: list[str]) -> list[Case]:
    """'elementwise.<dtype>': SiLU·mul then a residual add over tokens×hidden activations, one
    case per shape (a block's mix of a heavier and a lighter kernel: timed apart, their
    different bytes/s at interleaved sizes made the curve zig-zag), 8 tensors of aten traffic;
    the tiny probe is the add alone. RMSNorm, a 7-kernel composition, is its own class 'norm'
    (read x, write y)."""
    cases = []
    for dtype in dtypes:
        dt, esize = DTYPES[dtype], DTYPES[dtype].itemsize
        for tokens, hidden in shapes:
            n = tokens * hidden

            def norm(device: str, t=tokens, h=hidden, dt=dt) -> Callable[[], object]:
                x, w = _rand((t, h), dt, device), torch.ones(h, dtype=dt, device=device)
                return lambda: rms_norm(x, w)

            def swiglu_add(device: str, t=tokens, h=hidden, dt=dt) -> Callable[[], object]:
                g, u, x = (_rand((t, h), dt, device) for _ in range(3))
                return lambda: F.silu(g) * u + x

            def residual(device: str, t=tokens, h=hidden, dt=dt) -> Callable[[], object]:
                x, y = _rand((t, h), dt, device), _rand((t, h), dt, device)
                return lambda: x + y

            tiny = n <= 64
            dims = f"{dtype} {tokens}x{hidden}"
            cases.append(Case("norm", f"rmsnorm {dims}", 2.0 * n * esize, norm, tiny))
            if tiny:
                cases.append(Case(f"elementwise.{dtype}", f"add {dims}", 3.0 * n * esize,
                                  residual, tiny))
            else:
                cases.append(Case(f"elementwise.{dtype}", f"silu*mul+add {dims}",
                                  8.0 * n * esize, swiglu_add))
    return cases


ADAMW_BYTES_PER_PARAM = 28
"""AdamW fp32 traffic per parameter: read p, g, m, v (16 B) + write p, m, v (12 B)."""


ADAMW8BIT_BYTES_PER_PARAM = 16
"""8-bit AdamW traffic per fp32 parameter: p, g read and p written (12 B) + m, v read and
written at 1 B each (4 B); flops.optimizer_bytes_per_param."""


def optimizer_cases(sizes: list[int], optimizer: str = "adamw") -> list[Case]:
    """One optimizer step of the executor's own optimizer over a single fp32 parameter tensor
    of n elements: AdamW (executor.optim.adamw: torch's, fused where available; class
    'optimizer') or our 8-bit AdamW (a per-tensor PyTorch loop; class 'optimizer.adamw8bit')."""
    cases = []
    per_param = ADAMW_BYTES_PER_PARAM if optimizer == "adamw" else ADAMW8BIT_BYTES_PER_PARAM
    op_class = "optimizer" if optimizer == "adamw" else f"optimizer.{optimizer}"
    for n in sizes:

        def build(device: str, n=n) -> Callable[[], object]:
            from estimator.executor.optim import AdamW8bit, adamw

            param = torch.nn.Parameter(torch.randn(n, device=device))
            param.grad = torch.randn(n, device=device)
            opt = adamw([param], lr=1e-4) if optimizer == "adamw" else AdamW8bit([param], lr=1e-4)
            return opt.step

        tiny = n <= 64
        cases.append(Case(op_class, f"{optimizer} {n} params", float(per_param * n), build,
                          tiny))
    return cases


def dequant_cases(sizes: list[int], dtype: str = "bf16") -> list[Case]:
    """NF4 dequantisation of n weights to a 16-bit dtype (work = 2·n output bytes), with the
    executor's own kernel (estimator.executor.nf4, double quantisation as QLoRA trains)."""
    from estimator.executor.nf4 import dequantize_nf4, quantize_nf4

    cases = []
    for n in sizes:

        def build(device: str, n=n) -> Callable[[], object]:
            weight = quantize_nf4(torch.randn(n // NF4_BLOCK, NF4_BLOCK, device=device),
                                  double_quant=True)
            return lambda: dequantize_nf4(weight, DTYPES[dtype])

        tiny = n <= NF4_BLOCK
        cases.append(Case("dequant.nf4", f"nf4->{dtype} {n} weights", 2.0 * n, build, tiny))
    return cases


def dispatch_case() -> Case:
    """Wall time of one tiny eager op (8-element add): the per-op framework overhead."""

    def build(device: str) -> Callable[[], object]:
        a, b = torch.randn(8, device=device), torch.randn(8, device=device)
        return lambda: a + b

    return Case("dispatch", "add 8 elements", 1.0, build, tiny=True)


# ----------------------------------------------------------------------------- cold GEMMs

def cold_gemm_cases(dtype: str, shapes: list[tuple[int, int, int]], op_class: str,
                    wgrad_class: str, pool_bytes: int, dgrad_class: str | None = None,
                    ) -> list[Case]:
    """gemm_cases with cold operands: every call reads operands (x and W, dy and W, dy and x)
    that were last touched pool_bytes ago, as every weight is in one pass of a model whose
    weights exceed the cache (in-model GEMMs ran 1.4–2.3× slower than the hot curve,
    docs/calibration.md §4). The weight gradient dyᵀ·x (both operands transposed-in, the
    tokens the reduction) is its own class `wgrad_class`: in the trainer it ran at 1.5–2.1×
    the curve pooled with the forward and input gradient, which ran at 0.74–0.89× it
    (smollm2-135m pure bf16, b8 s256). The input gradient dy·W goes to `dgrad_class` when
    given (as gemm_cases)."""
    dt = DTYPES[dtype]
    cases = []
    for tokens, hidden, out in shapes:
        work = 2.0 * tokens * hidden * out
        dims = f"{tokens}x{hidden}->{out}"

        def fwd(device: str, t=tokens, h=hidden, o=out) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, h), (o, h)), F.linear)

        def dgrad(device: str, t=tokens, h=hidden, o=out) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, o), (o, h)),
                             torch.matmul)

        def wgrad(device: str, t=tokens, h=hidden, o=out) -> Callable[[], object]:
            return _rotating(operand_pool(device, dt, pool_bytes), ((t, o), (t, h)),
                             lambda dy, x: dy.t() @ x)

        cases += [
            Case(op_class, f"{op_class} fwd {dims}", work, fwd),
            Case(dgrad_class or op_class, f"{dgrad_class or op_class} dgrad {dims}", work,
                 dgrad),
            Case(wgrad_class, f"{wgrad_class} {dims}", work, wgrad),
        ]
    return cases


# ----------------------------------------------------------------------------- autograd ops

AUTOGRAD_CHAIN = 32
"""Ops in the dispatch.autograd chain."""


def autograd_dispatch_case() -> Case:
    """Forward + backward of a chain of AUTOGRAD_CHAIN tiny (8-element) autograd-tracked
    multiplies: wall time per aten call (the case's work is the number of aten calls one run
    dispatches, counted once with a TorchDispatchMode, so the fitted overhead is per aten call
    — the unit flops.dispatch_op_count counts)."""
    def chain(x: torch.Tensor) -> None:
        y = x
        for _ in range(AUTOGRAD_CHAIN):
            y = y * 1.0001
        y.backward(torch.ones_like(y))
        x.grad = None

    def build(device: str) -> Callable[[], object]:
        x = torch.randn(8, device=device, requires_grad=True)
        return lambda: chain(x)

    x0 = torch.randn(8, requires_grad=True)
    calls = count_aten_calls(lambda: chain(x0))
    return Case("dispatch.autograd", f"autograd chain of {AUTOGRAD_CHAIN} ({calls} aten calls)",
                float(calls), build, tiny=True)


def executor_dispatch_case() -> Case:
    """One training step of a tiny executor model (4 blocks of width 16, 8 tokens, LoRA r=4,
    bf16 autocast — compute negligible): wall time per aten call, the work being the aten
    calls of one step (flops.dispatch_op_count, within 1 % of a TorchDispatchMode count). This
    is the per-op cost of the executor's real ops — nn.Module calls, composite ops (linear,
    to, matmul) above the dispatch level, autocast, autograd nodes, the optimizer's
    per-tensor loop — which the bare multiply chain of `autograd_dispatch_case` misses
    (4.6 µs per call there vs 14–19 µs in tiny executor steps, one thread, CPU time)."""
    from pathlib import Path

    from estimator.executor.data import PackedDataset
    from estimator.executor.optim import build_optimizer
    from estimator.executor.train import Run, TrainConfig, build_training_model, train_step
    spec = ModelSpec(name="dispatch-probe", num_layers=4, hidden_size=16, intermediate_size=32,
                     num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=258, max_seq_len=64)
    setup = TrainSetup(framework="nvfree", method="lora", compute_dtype="bf16", batch_size=1,
                       seq_len=8, lora_rank=4)

    def build(device: str) -> Callable[[], object]:
        config = TrainConfig(max_steps=10**9, output_dir=Path("."), device=device,
                             predict=False)
        tdev = torch.device(device)
        _, model = build_training_model(spec, setup, config, tdev)
        trainable = [p for p in model.parameters() if p.requires_grad]
        tokens = torch.randint(0, spec.vocab_size, (4096,), generator=torch.Generator()
                               .manual_seed(0))
        run = Run(config=config, spec=spec, setup=setup, device=tdev,
                  dataset=PackedDataset(tokens, setup.seq_len), model=model,
                  optimizer=build_optimizer(trainable, setup, lr=1e-4), trainable=trainable)
        steps = iter(range(10**9))
        train_step(run, next(steps), 1e-4)  # optimizer state exists from the second step on
        return lambda: train_step(run, next(steps), 1e-4)

    from estimator.analytic.dispatch import dispatch_op_count
    from estimator.analytic.throughput import num_trainable_tensors

    # the analytic count equals a TorchDispatchMode count of this step (test_dispatch_count)
    calls = dispatch_op_count(spec, setup, num_trainable_tensors(spec, setup))
    return Case("dispatch.autograd", f"tiny executor LoRA step ({calls:.0f} aten calls)",
                float(calls), build, tiny=True)
