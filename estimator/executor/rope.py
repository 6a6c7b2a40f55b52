"""Rotary position embeddings (Su et al. 2021): inverse frequencies with Llama-3 scaling, the
rotation the attention applies, and HF's rope_scaling dict read into hashable items.

Shape-suffix legend: B batch, T sequence, H heads, C head dim (C2 = C / 2).
"""

import math

import torch

from estimator.errors import ConfigError, SetupError

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The numbers of HF's llama3 rope_scaling (modeling_rope_utils._compute_llama3_parameters)."""
LLAMA3 = 3.0
"""rope_type 'llama3' as stored in the hashable items (floats only)."""


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: tuple[tuple[str, float], ...] | None) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/C), with Llama-3 frequency scaling if configured."""
    exponent_C2 = torch.arange(0, head_dim, 2).float() / head_dim
    inv_freq = 1.0 / (theta**exponent_C2)
    items = dict(scaling or ())
    if items.get("rope_type") == LLAMA3:
        inv_freq = _llama3_scaling(inv_freq, items)
    return inv_freq.float()


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 RoPE scaling (HF modeling_rope_utils._compute_llama3_parameters)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


def apply_rope(x_BTHC: torch.Tensor, cos_TC2: torch.Tensor, sin_TC2: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF rotate_half convention): [x1, x2] → [x1·cos − x2·sin, x2·cos + x1·sin],
    on [batch, seq, heads, head_dim] (the projection's layout)."""
    x1, x2 = x_BTHC.chunk(2, dim=-1)
    cos_T1C2 = cos_TC2.to(x_BTHC.dtype)[:, None]
    sin_T1C2 = sin_TC2.to(x_BTHC.dtype)[:, None]
    return torch.cat((x1 * cos_T1C2 - x2 * sin_T1C2, x2 * cos_T1C2 + x1 * sin_T1C2), dim=-1)


def rope_scaling_items(rope_scaling: dict | None) -> tuple[tuple[str, float], ...] | None:
    """HF rope_scaling dict → hashable items; SetupError for scaling types the executor lacks,
    ConfigError for a llama3 entry whose numbers are missing, not positive or not finite
    (low_freq_factor must stay below high_freq_factor: the scaling divides by their gap)."""
    if not rope_scaling:
        return None
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"rope_scaling {rope_scaling!r}: expected an object")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise SetupError(f"RoPE scaling type {kind!r} is not supported by the bundled executor")
    values = {}
    for key in LLAMA3_KEYS:
        value = rope_scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"rope_scaling.{key} = {value!r}: expected a positive number")
        values[key] = float(value)
    if values["low_freq_factor"] >= values["high_freq_factor"]:
        raise ConfigError("rope_scaling: low_freq_factor must be below high_freq_factor")
    return (("rope_type", LLAMA3), *values.items())
