"""4-bit NormalFloat (NF4) storage of frozen base weights, QLoRA-style (Dettmers et al. 2023,
arXiv 2305.14314), in plain PyTorch so it runs on every torch device.

Storage per weight of n elements (block size 64, double-quantisation block 256):
    packed codes   n/2 bytes (two 4-bit codebook indices per byte, first one in the high nibble)
    absmax         fp32 per 64-block                      → n·32/64 bits
    with double quantisation: int8 per 64-block (absmax − mean, scaled per 256 blocks)
                   + fp32 scale per 256 blocks + one fp32 mean → n·(8/64 + 32/(64·256)) bits + 32
The forward dequantises (one 256-entry byte→pair lookup, times the block absmax) and runs a plain
matmul; the custom autograd Function saves only the packed weight, never a dequantised copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from estimator.errors import SetupError

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA §3,
# Appendix E; the same table as bitsandbytes' get_4bit_type("nf4")).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DQ_BLOCK_SIZE = 256
_CHUNK_BLOCKS = 1 << 16  # quantise 4M elements at a time to bound the temporary memory


@dataclass
class NF4Weight:
    """A quantised weight: packed codes plus either fp32 absmax or double-quantised absmax."""

    packed: torch.Tensor  # uint8 [ceil(n/64)·32]
    shape: tuple[int, ...]
    block_size: int
    absmax: torch.Tensor | None = None  # fp32 [num_blocks], without double quantisation
    absmax_q: torch.Tensor | None = None  # int8 [num_blocks], with double quantisation
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(num_blocks/256)]
    absmax_mean: torch.Tensor | None = None  # fp32 scalar

    @property
    def num_bytes(self) -> int:
        """Bytes of every stored tensor (codes + scales)."""
        parts = (self.packed, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per 64-block (undoing the double quantisation if any)."""
        if self.absmax is not None:
            return self.absmax
        q = _pad_to(self.absmax_q.float(), DQ_BLOCK_SIZE).view(-1, DQ_BLOCK_SIZE) / 127.0
        num_blocks = self.absmax_q.numel()
        return (q * self.absmax_scale[:, None]).flatten()[:num_blocks] + self.absmax_mean


def _codebook(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(x, (0, -x.numel() % multiple))


def _quantize_codes(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax and nearest-codebook 4-bit codes of a flat, padded fp32 tensor."""
    code = _codebook(w.device)
    midpoints = (code[1:] + code[:-1]) / 2
    blocks = w.view(-1, block_size)
    packed, absmax = [], []
    for chunk in blocks.split(_CHUNK_BLOCKS):
        amax = chunk.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        idx = torch.bucketize(chunk / amax[:, None], midpoints).to(torch.uint8).flatten()
        packed.append((idx[0::2] << 4) | idx[1::2])
        absmax.append(amax)
    return torch.cat(packed), torch.cat(absmax)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64,
                 double_quant: bool = True) -> NF4Weight:
    """Quantise a weight to NF4: absmax per block of ``block_size``, nearest of the 16 codes."""
    if block_size % 2:
        raise SetupError(f"NF4 block size must be even, got {block_size}")
    w = _pad_to(weight.detach().float().flatten(), block_size)
    packed, absmax = _quantize_codes(w, block_size)
    out = NF4Weight(packed=packed, shape=tuple(weight.shape), block_size=block_size)
    if not double_quant:
        out.absmax = absmax
        return out
    mean = absmax.mean()
    centred = _pad_to(absmax - mean, DQ_BLOCK_SIZE).view(-1, DQ_BLOCK_SIZE)
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(centred / scale[:, None] * 127.0).to(torch.int8).flatten()[: absmax.numel()]
    out.absmax_q, out.absmax_scale, out.absmax_mean = q, scale, mean
    return out


_LUT_CACHE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_PAIR_INT = {2: torch.int32, 4: torch.int64}
"""Integer dtype that holds a pair of 2- or 4-byte floats."""


def _pair_lut(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[256] integers whose bytes are the pair (code[b >> 4], code[b & 15]) in ``dtype`` for
    byte b: the gather then moves one scalar per byte instead of a two-element row (measured,
    one thread, a [2048, 768] weight in bf16: 0.56 ms against 1.40 ms for a [256, 2] table;
    the whole dequantisation 1.00 against 1.99 ms)."""
    key = (str(device), dtype)
    if key not in _LUT_CACHE:
        code = _codebook(device)
        byte = torch.arange(256, device=device)
        pairs = torch.stack((code[byte >> 4], code[byte & 15]), dim=1).to(dtype)
        _LUT_CACHE[key] = pairs.view(_PAIR_INT[pairs.element_size()]).view(256)
    return _LUT_CACHE[key]


def dequantize_nf4(nf4: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back in ``dtype``: code[index] · block absmax, reshaped to the original shape.

    One gather from a 256-entry byte → pair table and one in-place scale, both directly in
    ``dtype`` (for bf16/fp16 the code and absmax are rounded to ``dtype`` before the product:
    at most one unit in the last place from the fp32 product, half the memory traffic)."""
    lut = _pair_lut(nf4.packed.device, dtype)
    values = lut.index_select(0, nf4.packed.int()).view(dtype).view(-1, nf4.block_size)
    values.mul_(nf4.block_absmax().to(dtype)[:, None])
    numel = 1
    for dim in nf4.shape:
        numel *= dim
    return values.view(-1)[:numel].view(nf4.shape)


class _NF4Linear(torch.autograd.Function):
    """y = x·dequant(W)ᵀ; saves only the packed NF4 weight, dequantises again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
        ctx.nf4 = nf4
        return F.linear(x, dequantize_nf4(nf4, x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_y @ dequantize_nf4(ctx.nf4, grad_y.dtype), None


def nf4_linear(x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
    """x·dequant(W)ᵀ through the custom autograd Function (autocast dtype applied first)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return _NF4Linear.apply(x, nf4)


def _as_int32(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 stored bit-for-bit as int32, so model.to(bfloat16) never rounds the scales."""
    return None if t is None else t.reshape(-1).view(torch.int32)


def _as_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(torch.float32)


class NF4Frozen(nn.Module):
    """A frozen linear whose weight is stored in NF4: codes, block scales (double-quantised or
    not), the bias as it was. QLoRA stores every base linear of the blocks so, adapted or not
    (Dettmers et al. 2023 §3; bitsandbytes replaces each nn.Linear but lm_head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, double_quant: bool,
                 compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.compute_dtype = compute_dtype
        nf4 = quantize_nf4(weight, double_quant=double_quant)
        self.shape, self.block_size = nf4.shape, nf4.block_size
        # Not state (persistent=False): the codes are rebuilt from the base weights at every
        # build, so no checkpoint — single-process or FSDP2's DCP — stores or loads them.
        for name, value in (("weight_packed", nf4.packed),
                            ("weight_absmax", _as_int32(nf4.absmax)),
                            ("weight_absmax_q", nf4.absmax_q),
                            ("weight_absmax_scale", _as_int32(nf4.absmax_scale)),
                            ("weight_absmax_mean", _as_int32(nf4.absmax_mean))):
            self.register_buffer(name, value, persistent=False)

    def nf4_weight(self) -> NF4Weight:
        """The stored buffers as an NF4Weight (views, no copies)."""
        mean = _as_fp32(self.weight_absmax_mean)
        return NF4Weight(
            packed=self.weight_packed, shape=self.shape, block_size=self.block_size,
            absmax=_as_fp32(self.weight_absmax), absmax_q=self.weight_absmax_q,
            absmax_scale=_as_fp32(self.weight_absmax_scale),
            absmax_mean=None if mean is None else mean[0],
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight in ``dtype`` (default: the compute dtype, else fp32)."""
        return dequantize_nf4(self.nf4_weight(), dtype or self.compute_dtype or torch.float32)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·dequant(W)ᵀ + b, in the compute dtype, cast back to the input dtype."""
        x_c = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        y = nf4_linear(x_c, self.nf4_weight())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if self.compute_dtype is None else y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)


class NF4LoRALinear(NF4Frozen):
    """A LoRALinear whose frozen base weight is stored in NF4 (the adapters stay as they were)."""

    def __init__(self, lora: nn.Module, *, double_quant: bool,
                 compute_dtype: torch.dtype | None) -> None:
        super().__init__(lora.weight, lora.bias, double_quant=double_quant,
                         compute_dtype=compute_dtype)
        self.rank, self.alpha, self.scaling = lora.rank, lora.alpha, lora.scaling
        self.lora_A, self.lora_B, self.lora_dropout = lora.lora_A, lora.lora_B, lora.lora_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from estimator.executor.lora import lora_forward

        return lora_forward(self, x)


def nf4_buffer_bytes(model: nn.Module) -> int:
    """Bytes of every NF4 base weight stored in the model (codes + scales)."""
    return sum(m.nf4_weight().num_bytes for m in model.modules() if isinstance(m, NF4Frozen))


def apply_nf4(model: nn.Module, *, double_quant: bool = True,
              compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Store every frozen base linear of the blocks in NF4 (in place), as QLoRA does: the
    LoRA-wrapped ones keep their adapters (NF4LoRALinear), the others become NF4Frozen; the
    embeddings, norms, MoE routers and lm_head keep their dtype (the analytic model's
    quantized_linear_params counts the same set). Call after ``lora.apply_lora``."""
    from estimator.executor.lora import LoRALinear, _set_module

    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not names:
        raise SetupError("apply_nf4 quantises LoRA-wrapped linears: call apply_lora first")
    for name in names:
        _set_module(model, name, NF4LoRALinear(model.get_submodule(name),
                                               double_quant=double_quant,
                                               compute_dtype=compute_dtype))
    for name in [n for n, m in model.named_modules()
                 if type(m) is nn.Linear and quantised_base(n)]:
        linear = model.get_submodule(name)
        _set_module(model, name, NF4Frozen(linear.weight.detach(), linear.bias,
                                           double_quant=double_quant,
                                           compute_dtype=compute_dtype))
    device = model.get_submodule(names[0]).nf4_weight().packed.device
    for dtype in {compute_dtype or torch.float32, torch.float32}:
        _pair_lut(device, dtype)  # filled now: a table added later makes torch.compile recompile
    return model


def quantised_base(name: str) -> bool:
    """Whether QLoRA stores this plain linear in NF4: inside the blocks, not an adapter
    (`…lora_A`, `…lora_B`), not an MoE router (`…mlp.gate`, whose logits pick the experts),
    not lm_head."""
    last = name.rsplit(".", 1)[-1]
    return (".layers." in f".{name}" and not last.startswith("lora_") and last != "gate"
            and "lm_head" not in name)
