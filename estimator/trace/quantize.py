"""QLoRA's frozen base as transformers + bitsandbytes build it: every nn.Linear (Conv1D) but the
output embedding becomes a bitsandbytes Linear4bit holding NF4 codes and block scales.

This is what `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, …))`
does (transformers/integrations/bitsandbytes.py `replace_with_bnb_linear`, then each weight
quantized by `Params4bit._quantize` as it is loaded). Fused MoE expert tensors are no
nn.Linear and stay in the compute dtype, as they do in transformers.

On a real tensor the weight is a bitsandbytes Params4bit. A Params4bit cannot wrap a FakeTensor
(both are tensor subclasses), so on fake tensors the weight is a plain frozen Parameter holding
the same packed uint8 codes, with the same quant_state (absmax, nested absmax, code: made by
bitsandbytes.functional.quantize_4bit's fake kernels) and the Params4bit attributes that
Linear4bit.forward, PEFT and MatMul4Bit read. Same storage bytes, same autograd function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

BLOCKSIZE = 64
"""NF4 block size (elements per absmax), bitsandbytes' default for Params4bit."""


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules replace_with_bnb_linear converts, by name (before conversion)."""
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear or isinstance(m, Conv1D)}


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype, double_quant: bool,
                  fake: bool) -> None:
    """Replace the model's linears by NF4 Linear4bit in place (transformers' rule for which)."""
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype)
    originals = linear_layers(model)
    with unset_fake_temporarily():  # the new modules are built on meta: no FakeTensor inside
        replace_with_bnb_linear(model, modules_to_not_convert=skipped_modules(model),
                                quantization_config=config)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            load_4bit(module, originals[name], compute_dtype, double_quant, fake)
    model.is_loaded_in_4bit = True
    model.is_quantized = True


def skipped_modules(model: nn.Module) -> list[str]:
    """transformers' modules_to_not_convert: output embedding, tied and last modules, and
    `_keep_in_fp32_modules`. transformers 5.25 passes the latter as written ('classifier.weight'
    for LongCat's router), which matches no module name: its router would be quantized and its
    fp32 router matmul (classifier.weight.type(float32)) would fail. Here the '.weight' suffix is
    dropped, so those modules stay unquantized, as their models intend."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return [*get_keys_to_not_convert(model), *(k.removesuffix(".weight") for k in keep)]


def load_4bit(module, original: nn.Module, compute_dtype: torch.dtype, double_quant: bool,
              fake: bool) -> None:
    """Quantize the original layer's weight into the Linear4bit (and copy its bias)."""
    from transformers.pytorch_utils import Conv1D

    weight = original.weight.detach()
    if isinstance(original, Conv1D):
        weight = weight.t().contiguous()
    weight = weight.to(compute_dtype)
    if fake:
        set_fake_4bit_weight(module, weight, double_quant)
    else:
        set_real_4bit_weight(module, weight, double_quant)
    if original.bias is not None:
        module.bias = nn.Parameter(original.bias.detach().to(compute_dtype), requires_grad=False)


def set_real_4bit_weight(module, weight: torch.Tensor, double_quant: bool) -> None:
    """A bitsandbytes Params4bit, quantized on the weight's device as loading does."""
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                              quant_type="nf4", quant_storage=torch.uint8, module=module,
                              blocksize=BLOCKSIZE)
    module.weight = param._quantize(weight.device)


def set_fake_4bit_weight(module, weight: torch.Tensor, double_quant: bool) -> None:
    """A plain frozen Parameter with Params4bit's storage and attributes (see module doc)."""
    import bitsandbytes as bnb

    with fake_dynamic_map():
        packed, state = bnb.functional.quantize_4bit(
            weight, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4",
            quant_storage=torch.uint8)
    param = nn.Parameter(packed, requires_grad=False)
    attributes = {"quant_state": state, "blocksize": BLOCKSIZE, "quant_type": "nf4",
                  "compress_statistics": double_quant, "quant_storage": torch.uint8,
                  "bnb_quantized": True, "module": module}
    for key, value in attributes.items():
        setattr(param, key, value)
    module.weight = param
    module.quant_state = state


@contextlib.contextmanager
def fake_dynamic_map():
    """bitsandbytes builds its 8-bit 'dynamic' code (nested absmax quantization) from Python
    lists (.tolist(): no value on a fake tensor) and caches it in functional.name2qmap. Build
    it for real, hand quantize_4bit a fake copy for the duration, then restore the cache."""
    import bitsandbytes.functional as bnbf
    from torch._guards import active_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = active_fake_mode()
    with unset_fake_temporarily():
        code = bnbf.create_dynamic_map()
    saved = bnbf.name2qmap.get("dynamic")
    bnbf.name2qmap["dynamic"] = mode.from_tensor(code)
    try:
        yield
    finally:
        if saved is None:
            bnbf.name2qmap.pop("dynamic", None)
        else:
            bnbf.name2qmap["dynamic"] = saved


def quant_state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor of every Linear4bit's quant state (block absmax, nested absmax and code,
    offset, NF4 code): model memory that is no Parameter or buffer."""
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)
