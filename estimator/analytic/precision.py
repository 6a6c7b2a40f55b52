"""Storage formats: bits per element, and bytes derived from bits (never `bits // 8`)."""

import math

DTYPE_BITS = {"fp32": 32, "tf32": 32, "bf16": 16, "fp16": 16, "int8": 8, "fp8": 8}
"""Bits per element of each dense dtype."""

NF4_BLOCK_SIZE = 64
"""Weights per NF4 absmax block (Dettmers et al. 2023, QLoRA §3)."""
NF4_DQ_BLOCK_SIZE = 256
"""Absmax values per second-level block under double quantisation (QLoRA §3)."""
INT8_ROW_SCALE_BITS = 32
"""LLM.int8 keeps one fp32 scale per output row (Dettmers et al. 2022, vector-wise quantisation)."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dense dtype (fp32 → 4, bf16 → 2)."""
    return DTYPE_BITS[dtype] // 8


def bits_dtype(bits: int, compute_dtype: str) -> str:
    """The dense dtype that stores `bits` ≥ 16: 32 → fp32, 16 → the 16-bit compute dtype."""
    return "fp32" if bits == 32 else (compute_dtype if compute_dtype != "fp32" else "bf16")


def nf4_bits_per_param(*, double_quant: bool) -> float:
    """Average storage bits per NF4 weight including block scales.

    Without double quantisation: 4 + 32/64 = 4.5 bits (one fp32 absmax per 64 weights).
    With it: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits (8-bit absmax per 64 weights, one fp32
    scale per 256 absmax values). Source: Dettmers et al. 2023, QLoRA, §3 "Double
    Quantization" (0.5 → 0.127 bits/param).
    """
    if double_quant:
        return 4 + 8 / NF4_BLOCK_SIZE + 32 / (NF4_BLOCK_SIZE * NF4_DQ_BLOCK_SIZE)
    return 4 + 32 / NF4_BLOCK_SIZE


def nf4_bytes(num_params: int, *, double_quant: bool) -> dict[str, int]:
    """Packed 4-bit codes and block scales of `num_params` NF4 weights (bytes, each rounded up
    per tensor group)."""
    codes = math.ceil(num_params / 2)
    num_blocks = math.ceil(num_params / NF4_BLOCK_SIZE)
    if double_quant:
        scales = num_blocks + 4 * math.ceil(num_blocks / NF4_DQ_BLOCK_SIZE)
    else:
        scales = 4 * num_blocks
    return {"codes": codes, "scales": scales}


def int8_bytes(num_params: int, num_rows: int) -> dict[str, int]:
    """LLM.int8 storage: one byte per weight + one fp32 scale per output row (bytes)."""
    return {"codes": num_params, "scales": num_rows * INT8_ROW_SCALE_BITS // 8}
