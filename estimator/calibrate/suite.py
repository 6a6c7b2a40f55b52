"""What a calibration run measures, per mode: the cases, their shapes and the timing effort.

Modes: 'full' (≤ 90 s on a 2-core CPU), 'quick' (≤ 10 s), 'tiny' (tests only: toy sizes).
The quick run measures what `nvfree plan` needs for the model it plans (by default the
default model, smollm2-135m) at the plan's micro-batches: its own GEMM shapes at 256 and
2048 tokens, its attention heads, LoRA rank 16 — every curve then has a knot where the plan
reads it, so fewer points suffice than the full run's size sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from estimator.calibrate import benches
from estimator.calibrate.benches import Case
from estimator.specs import ModelSpec

Mode = Literal["full", "quick", "tiny"]

BYTES_CLASSES = ("memory", "alloc", "elementwise", "norm", "optimizer", "optimizer.adamw8bit",
                 "dequant.nf4", "collective")
"""Memory-bound op classes (work in bytes; per-dtype variants such as 'elementwise.bf16'
included): their curves keep the measured rates (fit.fit_curve monotone=False)."""


@dataclass(frozen=True)
class ModeSettings:
    """Timing effort of a mode."""

    warmup_seconds: float
    min_run_seconds: float
    min_samples: int
    max_samples: int
    max_call_seconds: float
    """Skip a case projected to take longer than this per call (seconds)."""
    max_case_seconds: float = float("inf")
    """Stop sampling a case after this long (seconds): one far slower than projected."""
    max_retries: int = 0
    """Re-time a case disturbed by other processes up to this many times (count)."""
    max_wait_seconds: float = 0.0
    """Total time the run may wait for other processes to go idle before retrying (seconds)."""
    retry_until_seconds: float = 0.0
    """No retries once the run has taken this long, so load cannot blow the time budget."""
    wait_first: bool = False
    """Wait for idle CPUs before the first timing of every case too (patient mode)."""
    cpu_clock: bool = False
    """Time samples with process CPU time instead of wall time (single-threaded CPU only)."""
    second_pass_seconds: float = 0.0
    """Time left for re-timing, at the end of the run, the points still disturbed (seconds)."""
    abort_disturbed_share: float = 1.1
    """Stop the run once this share of its first ABORT_AFTER points is disturbed (a busy
    machine: the profile would be refused anyway); > 1 never stops."""


ABORT_AFTER = 12
"""Points measured before a run may give up on a busy machine (count)."""

SETTINGS: dict[str, ModeSettings] = {
    "full": ModeSettings(0.03, 0.12, 3, 30, 1.0, max_case_seconds=2.5, max_retries=2,
                         max_wait_seconds=15.0, retry_until_seconds=60.0,
                         second_pass_seconds=15.0),
    "quick": ModeSettings(0.01, 0.02, 3, 10, 0.15, max_case_seconds=0.4, max_retries=1,
                          max_wait_seconds=0.5, retry_until_seconds=3.0,
                          second_pass_seconds=1.0, abort_disturbed_share=0.7),
    "tiny": ModeSettings(0.001, 0.003, 2, 5, 0.05),
}

GEMM_SHAPES = {  # (tokens, hidden, out): 2·T·h·o from ~1e6 to ~7e10 FLOPs on CPU
    "full": [(32, 128, 128), (128, 256, 256), (256, 512, 512), (512, 512, 1408),
             (512, 1024, 1024), (1024, 1024, 2816), (2048, 1024, 1024), (1024, 2048, 2048),
             (2048, 2048, 5632), (2048, 4096, 4096)],
    "tiny": [(16, 32, 32), (32, 64, 64)],
}
COLD_GEMM_SHAPES = {  # the hot shapes up to ~1e10 FLOPs: above that GEMMs are compute-bound
    "full": GEMM_SHAPES["full"][:8],
    "tiny": [(16, 32, 32)],
}
COLD_POOL_TINY_BYTES = 4 * 2**20
"""Operand pool of the tiny (test) mode: no cold guarantee, just the code path (bytes)."""
GPU_EXTRA_GEMM_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (8192, 8192, 28672)]
FP16_CPU_SHAPES = [(64, 256, 256), (256, 512, 1024), (512, 1024, 2816), (512, 2048, 2048)]
"""fp16 on a CPU (not a training dtype there: measured at 4 shapes by the full run only)."""
LORA_SHAPES = {  # (tokens, hidden, rank)
    "full": [(512, 1024, 8), (512, 1024, 64), (2048, 4096, 8), (2048, 4096, 16),
             (2048, 4096, 64)],
    "tiny": [(32, 64, 8)],
}
ATTENTION_SHAPES = {  # (heads, seq, head_dim); the first (seq ≤ 8) is the overhead probe
    "full": [(1, 8, 8), (8, 128, 64), (8, 256, 64), (8, 512, 64), (8, 1024, 64), (8, 2048, 64),
             (8, 512, 128), (8, 1024, 128)],
    "tiny": [(1, 8, 8), (2, 32, 16)],
}
MEMORY_SIZES = {  # fp32 elements; 2**26 = 256 MiB per array
    "full": [16, 2**12, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26],
    "quick": [16, 2**14, 2**18, 2**22, 2**23],
    "tiny": [16, 1024, 16384],
}
ALLOC_SIZES = {  # fp32 elements: 16 (overhead probe) … 256 MiB
    "full": [16, 2**16, 2**20, 2**24, 2**26],
    "quick": [16, 2**20, 2**24],
    "tiny": [16, 4096],
}
"""No case at glibc's 32 MiB mmap ceiling itself: 2^23 fp32 elements came from the heap in
one calibration (51.6 GB/s) and fresh from the kernel in the next (4.7 GB/s), and every loss-
head buffer above the ceiling is charged at the rate interpolated next to it. 64 and 256 MiB
are always fresh."""
ELEMENTWISE_SHAPES = {
    "full": [(1, 16), (64, 256), (256, 1024), (1024, 2048), (2048, 4096)],
    "quick": [(1, 16), (256, 1024), (2048, 2048)],
    "tiny": [(1, 16), (16, 64)],
}
OPTIMIZER_SIZES = {
    "full": [16, 10_000, 100_000, 1_000_000, 4_000_000, 16_000_000],
    "quick": [16, 100_000, 4_000_000],
    "tiny": [16, 1000],
}
DEQUANT_SIZES = {
    "full": [64, 65_536, 1_048_576, 16_777_216],
    "quick": [64, 1_048_576],
    "tiny": [64, 4096],
}

QUICK_MODEL = "smollm2-135m"
"""The model the quick run takes its shapes from unless told another: `nvfree plan`'s
default model (request.PLAN_DEFAULTS)."""
QUICK_TOKENS = (256, 2048)
"""Tokens per micro-batch the quick run measures at: the plan's default sequence (256) at
batch 1 and 8 (the plan's global batch)."""
QUICK_LORA_RANK = 16
QUICK_MAX_GEMM_FLOPS = 8e9
"""A quick GEMM shape above this has its tokens halved until it fits (~60 ms at fp32 on 2
cores): a large model's FFN at 2048 tokens would cost seconds per call."""


def quick_model() -> ModelSpec:
    """QUICK_MODEL from the catalogue."""
    from estimator.catalog import load_model

    return load_model(QUICK_MODEL)


def _fit_tokens(tokens: int, hidden: int, out: int) -> tuple[int, int, int]:
    while tokens > 16 and 2.0 * tokens * hidden * out > QUICK_MAX_GEMM_FLOPS:
        tokens //= 2
    return tokens, hidden, out


def model_shapes(model: ModelSpec, tokens: tuple[int, ...] = QUICK_TOKENS,
                 ) -> dict[str, list[tuple[int, int, int]]]:
    """The model's own GEMM, cold-GEMM, LoRA and attention shapes at the plan's token counts:
    hot GEMMs at the smallest (K/V projection), mid (FFN, few tokens) and largest work (FFN,
    many tokens); cold GEMMs (its stored weights, read once per pass) at the FFN; LoRA at
    rank 16 on the hidden input; attention at the plan's sequence and 4× it."""
    h, few, many = model.hidden_size, min(tokens), max(tokens)
    kv = model.num_kv_heads * model.head_dim
    ffn = model.moe.expert_intermediate_size if model.moe is not None else (
        model.intermediate_size)
    ffn_few, ffn_many = _fit_tokens(few, h, ffn), _fit_tokens(many, h, ffn)
    return {
        "gemm": sorted({_fit_tokens(few, h, kv), ffn_few, ffn_many},
                       key=lambda s: s[0] * s[1] * s[2]),
        "cold": sorted({ffn_few, ffn_many}, key=lambda s: s[0] * s[1] * s[2]),
        "lora": [(few, h, QUICK_LORA_RANK), (many, h, QUICK_LORA_RANK)],
        "attention": [(1, 8, 8), (model.num_heads, few, model.head_dim),
                      (model.num_heads, 4 * few, model.head_dim)],
    }


def shapes(mode: Mode, model: ModelSpec | None = None) -> dict[str, list[tuple[int, int, int]]]:
    """GEMM, cold-GEMM, LoRA and attention shapes of a mode (quick: the model's own)."""
    if mode == "quick":
        return model_shapes(model or quick_model())
    return {"gemm": GEMM_SHAPES[mode], "cold": COLD_GEMM_SHAPES[mode],
            "lora": LORA_SHAPES[mode], "attention": ATTENTION_SHAPES[mode]}


def executor_elementwise(mode: Mode, device: str) -> bool:
    """Whether `elementwise.*` is measured on the executor's own calls (block_rates) rather
    than on the generic elementwise cases: full and quick runs on a CPU (docs/calibration.md)."""
    return mode in ("full", "quick") and device == "cpu"


def compute_cases(mode: Mode, device: str, model: ModelSpec | None = None) -> list[Case]:
    """Dispatch probes, then per dtype the GEMM (hot, cold, weight-gradient), LoRA and
    attention cases, each class small → large."""
    # fp16 on a CPU is not a training dtype (CPU autocast uses bf16) and torch promotes its
    # GEMMs to fp32: skipped by --quick there, and measured at 4 shapes by a full run.
    dtypes = ["fp32", "bf16"] if device == "cpu" and mode == "quick" else ["fp32", "bf16", "fp16"]
    # per-op framework cost: a tiny executor training step (full); the cheaper multiply chain
    # (quick/tiny: ~3× lower, docs/calibration.md §5) where the step's start-up (2–7 s) would
    # break the time budget
    probe = benches.executor_dispatch_case() if mode == "full" else (
        benches.autograd_dispatch_case())
    cases: list[Case] = [benches.dispatch_case(), probe]
    pool = COLD_POOL_TINY_BYTES if mode == "tiny" else benches.cold_pool_bytes()
    sized = shapes(mode, model)
    for dtype in dtypes:
        cpu_fp16 = device == "cpu" and dtype == "fp16" and mode != "tiny"
        gemm = FP16_CPU_SHAPES if cpu_fp16 else list(sized["gemm"])
        if device != "cpu" and mode == "full":
            gemm += GPU_EXTRA_GEMM_SHAPES
        cases.append(benches.gemm_overhead_case(dtype, f"matmul.{dtype}"))
        cases.append(benches.gemm_overhead_case(dtype, f"matmul_dgrad.{dtype}"))
        cases += benches.gemm_cases(dtype, gemm, f"matmul.{dtype}", f"matmul_dgrad.{dtype}")
        if dtype != "fp16":  # fp16 is not a CPU training dtype; on GPUs rare next to bf16
            for kind in ("matmul_cold", "matmul_cold_dgrad", "matmul_wgrad"):
                cases.append(benches.gemm_overhead_case(dtype, f"{kind}.{dtype}"))
            cases += benches.cold_gemm_cases(dtype, sized["cold"], f"matmul_cold.{dtype}",
                                             f"matmul_wgrad.{dtype}", pool,
                                             f"matmul_cold_dgrad.{dtype}")
        cases.append(benches.gemm_overhead_case(dtype, f"lora.{dtype}"))
        lora = [s for s in LORA_SHAPES["full"] if s[0] <= 512] if cpu_fp16 else sized["lora"]
        cases += benches.lora_cases(dtype, lora, pool)
        attention = ATTENTION_SHAPES["full"][:3] if cpu_fp16 else sized["attention"]
        cases += benches.attention_cases(dtype, attention)
    return cases


def memory_cases(mode: Mode, device: str) -> list[Case]:
    """Bandwidth, fresh allocation, optimizer and NF4 dequantisation cases (and the generic
    elementwise ones where the executor's calls are not recorded)."""
    cases = benches.memory_cases(MEMORY_SIZES[mode]) + benches.alloc_cases(ALLOC_SIZES[mode])
    if not executor_elementwise(mode, device):  # else measured on the executor's step
        cases += benches.elementwise_cases(ELEMENTWISE_SHAPES[mode], ["fp32", "bf16"])
    cases += benches.optimizer_cases(OPTIMIZER_SIZES[mode])
    cases += benches.optimizer_cases(OPTIMIZER_SIZES[mode], "adamw8bit")
    cases += benches.dequant_cases(DEQUANT_SIZES[mode])
    return cases


def plan(mode: Mode, device: str, model: ModelSpec | None = None) -> list[Case]:
    """Every timed case of the suite for a mode and torch device type, each class small →
    large (the executor-recorded elementwise curves and collectives come after them)."""
    return compute_cases(mode, device, model) + memory_cases(mode, device)
