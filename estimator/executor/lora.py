"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a transform of a built model, PEFT-compatible.

``apply_lora`` freezes every base parameter (embeddings and norms included) and replaces each
targeted ``nn.Linear`` by a ``LoRALinear`` that keeps the same ``weight``/``bias`` parameters (so
base state-dict keys do not change) and adds ``lora_A`` (r × in, kaiming-uniform) and ``lora_B``
(out × r, zeros), scaled by alpha / r — PEFT's defaults, so an adapter saved here loads in PEFT.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from estimator.errors import SetupError
from estimator.specs.setup import LINEAR_TARGETS

ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """y = x·Wᵀ + b + (alpha/r) · B·A·dropout(x), with W and b frozen."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float,
                 adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=√5), B = 0: the adapter starts as a no-op (as PEFT)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base projection."""
        return frozen_linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_forward(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}"


class _UpcastLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen 16-bit W (and b) and an input of a wider dtype: W is upcast to
    x's dtype for this call only and the GEMM runs in that dtype. Saves only the 16-bit W and
    upcasts it again for the input gradient (W is frozen: no weight gradient), so the wide copy
    never outlives the call — unlike F.linear(x, W.to(x.dtype)), whose autograd would keep it
    until backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (w,) = ctx.saved_tensors
        return grad_y @ w.to(grad_y.dtype), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b for a frozen W: F.linear when the dtypes agree (or autocast casts them), else
    the 16-bit-storage / fp32-compute path (_UpcastLinear): a LoRA base stored in bf16 under
    fp32 compute (`--bits 16 --dtype fp32`, executor/build.py storage_dtype)."""
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    return _UpcastLinear.apply(x, weight, bias)


class FrozenLinear(nn.Linear):
    """A frozen nn.Linear that multiplies through frozen_linear (its 16-bit weight with inputs
    of the compute dtype). Same parameters and state-dict keys as the nn.Linear it was."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


def upcast_frozen_base(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """A LoRA model whose frozen base is stored in 16 bits but computes in `compute_dtype`
    (fp32): the norms to the compute dtype (the residual stream then runs in it: the model
    casts the embedding output to the final norm's dtype), every plain frozen nn.Linear to a
    FrozenLinear. The LoRALinear bases already multiply through frozen_linear; the fused loss
    head upcasts lm_head's weight itself (kernels/loss.py)."""
    from estimator.executor.model import RMSNorm

    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.to(compute_dtype)
        elif type(module) is nn.Linear and not module.weight.requires_grad:
            module.__class__ = FrozenLinear


def lora_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) + adapter(x) on the tokens flattened to rows, so the adapter is added into the
    base output in place (add_lora) rather than into a view of it (autograd would then copy
    the whole gradient in backward)."""
    x_ND = x.reshape(-1, x.shape[-1])
    y_ND = add_lora(module, x_ND, module.base_forward(x_ND))
    return y_ND.view(*x.shape[:-1], y_ND.shape[-1])


def add_lora(module: nn.Module, x_ND: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
    """y + (alpha/r)·B·A·dropout(x) for rows x_ND and the base output y_ND (2-D, not a view).
    y_ND.addmm_ in place (alpha/r folded into the r×out weight, cast to y's dtype as autocast
    would) when the dtypes agree or autocast runs: no second [N, out] tensor, and none of the
    fresh pages and heap holes an out-of-place sum leaves per adapted linear (docs/training.md,
    'Heap'). Otherwise, as PEFT does, the adapter runs in its own dtype (fp32 adapters on a
    16-bit base) and is cast back."""
    a_w = module.lora_A.weight
    if not torch.is_autocast_enabled(x_ND.device.type) and a_w.dtype != y_ND.dtype:
        update = module.lora_B(module.lora_A(module.lora_dropout(x_ND.to(a_w.dtype))))
        return y_ND + (update * module.scaling).to(y_ND.dtype)
    a_NR = module.lora_A(module.lora_dropout(x_ND))
    b_w = (module.lora_B.weight * module.scaling).to(y_ND.dtype)
    return y_ND.addmm_(a_NR.to(y_ND.dtype), b_w.T)


def matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule: a module matches a target when its name equals it or ends with '.target'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def target_linears(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Names of the nn.Linear modules that get adapters. 'all-linear' = every linear except
    lm_head (as PEFT) and the MoE routers (``mlp.gate``; tiny, and not a PEFT target by default)."""
    if isinstance(targets, str):
        targets = (targets,)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if ALL_LINEAR in targets:
        return [n for n in names if n != "lm_head" and not n.endswith("mlp.gate")]
    return [n for n in names if matches(n, tuple(targets))]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] | str = LINEAR_TARGETS,
               adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze every parameter, then wrap the targeted linears with LoRA adapters (in place).

    ``adapter_dtype``: dtype of A and B (None = the base weight's dtype; PEFT keeps fp32 adapters
    on a 16-bit base, pass torch.float32 for that).
    """
    if rank <= 0:
        raise SetupError(f"LoRA rank must be positive, got {rank}")
    names = target_linears(model, targets)
    if not names:
        raise SetupError(f"no linear layer matches the LoRA targets {targets!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout,
                                            adapter_dtype=adapter_dtype))
    return model


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-wrapped module (LoRALinear and its NF4 variant) by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``….lora_A.weight``, ``….lora_B.weight``), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if ".lora_" in k}


def peft_state_dict(model: nn.Module, *, model_type: str = "llama",
                    tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's keys: ``base_model.model.<HF module name>.lora_A.weight``.
    `tensors`: the adapters by the model's names, gathered already (a sharded run's full
    state dict); by default the model's own."""
    from estimator.executor.hf import hf_param_name

    source = lora_state_dict(model) if tensors is None else {
        k: v for k, v in tensors.items() if ".lora_" in k}
    return {
        "base_model.model." + hf_param_name(k, model_type=model_type): v.contiguous()
        for k, v in source.items()
    }


def save_peft_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name: str, rank: int,
                      alpha: float, dropout: float, targets: tuple[str, ...] | str,
                      model_type: str = "llama",
                      tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` (each written to a temp
    file and renamed, so a crash never leaves a half-written file). Returns out_dir.
    `tensors`: see peft_state_dict."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in peft_state_dict(model, model_type=model_type,
                                                                 tensors=tensors).items()}
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "adapter_model.safetensors")
    config = peft_adapter_config(base_model_name=base_model_name, rank=rank, alpha=alpha,
                                 dropout=dropout, targets=targets)
    tmp = out / "adapter_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "adapter_config.json")
    return out


def peft_adapter_config(*, base_model_name: str, rank: int, alpha: float, dropout: float,
                        targets: tuple[str, ...] | str) -> dict:
    """The adapter_config.json fields PEFT's LoraConfig reads."""
    target_modules = ALL_LINEAR if targets == ALL_LINEAR else sorted(
        set((targets,) if isinstance(targets, str) else targets)
    )
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base: W ← W + (alpha/r)·B·A, back to a plain nn.Linear.
    NF4 bases are dequantised first, so the merged linear is 16/32-bit."""
    for name, module in lora_modules(model).items():
        base_weight = module.dequantized_weight() if hasattr(module, "dequantized_weight") \
            else module.weight
        delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.scaling
        merged = (base_weight.float() + delta).to(base_weight.dtype)
        _set_module(model, name, _frozen_linear(merged, module.bias))
    frozen = {n: m for n, m in model.named_modules() if hasattr(m, "dequantized_weight")}
    for name, module in frozen.items():  # QLoRA's non-adapted NF4 bases: plain linears again
        _set_module(model, name, _frozen_linear(module.dequantized_weight(), module.bias))
    return model


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding `weight` (frozen) and the module's own bias."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias
    return linear
