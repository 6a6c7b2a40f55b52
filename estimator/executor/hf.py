"""Load a local Hugging Face checkpoint (config.json + safetensors, sharded or not) into the
executor's Transformer, for Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen-MoE-style models.

Our module names are HF's without the leading ``model.``; Mixtral's ``block_sparse_moe`` +
``experts.{j}.w1/w2/w3`` map to our ``mlp`` + ``experts.{j}.gate_proj/down_proj/up_proj``, and
transformers-5 fused expert tensors (``experts.gate_up_proj`` [E, 2I, D], ``experts.down_proj``
[E, D, I]) are split per expert.

The directory is untrusted input: every file read from it (config.json, the weights, the shards a
model.safetensors.index.json names, the tokenizer) must resolve inside it, symlinks included,
or, for a Hugging Face hub cache snapshot (models--*/snapshots/<rev>), inside that repository's
blobs/ directory the snapshot's symlinks point to (estimator.inputs.model_file). Garbage JSON,
safetensors or tensor shapes give a ConfigError naming the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from estimator.errors import ConfigError
from estimator.executor.model import Transformer, build_model
from estimator.inputs import model_file, read_json
from estimator.specs.model import ModelSpec

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
_MIXTRAL_TO_OURS = (("block_sparse_moe.", "mlp."),)
_MIXTRAL_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_OURS_W = {v: k for k, v in _MIXTRAL_W.items()}


def hf_param_name(name: str, *, model_type: str = "llama") -> str:
    """Our parameter name → the name in the HF checkpoint (``model.`` prefix, Mixtral names)."""
    if name.startswith("lm_head."):
        return name
    if model_type == "mixtral" and (".mlp.gate." in name or ".mlp.experts." in name):
        name = name.replace(".mlp.", ".block_sparse_moe.")
        name = re.sub(r"experts\.(\d+)\.(\w+_proj)",
                      lambda m: f"experts.{m.group(1)}.{_OURS_W[m.group(2)]}", name)
    return "model." + name


def our_param_name(hf_name: str) -> str:
    """HF checkpoint name → our parameter name (inverse of hf_param_name)."""
    name = hf_name.removeprefix("model.")
    for old, new in _MIXTRAL_TO_OURS:
        name = name.replace(old, new)
    name = re.sub(r"experts\.(\d+)\.(w[123])\.",
                  lambda m: f"experts.{m.group(1)}.{_MIXTRAL_W[m.group(2)]}.", name)
    return name.replace("mlp.shared_expert.", "mlp.shared_experts.")


def read_config(path: Path) -> dict:
    """config.json as a dict; ConfigError when missing, outside the directory or malformed."""
    try:
        return read_json(model_file(path, "config.json"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)") \
            from None


def _number(config: dict, key: str, default: float, *, low: float, high: float) -> float:
    """config[key] (or nested rope default) as a finite float in [low, high]; ConfigError."""
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ConfigError(f"config.json: {key} = {value!r}; expected a number in "
                          f"[{low:g}, {high:g}]")
    return float(value)


def build_kwargs(config: dict) -> dict:
    """The build_model options HF's config carries beyond the ModelSpec: RoPE base and scaling
    (transformers 5 ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``), norm eps,
    top-k renormalisation. ConfigError for values outside what a model can have."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("config.json: rope_parameters is not an object")
    theta_default = _number(config, "rope_theta", 10000.0, low=1e-6, high=1e30)
    scaling = config.get("rope_scaling") or (params if params.get("rope_type") else None)
    return {
        "rope_theta": _number(params, "rope_theta", theta_default, low=1e-6, high=1e30),
        "rope_scaling": scaling,
        "norm_eps": _number(config, "rms_norm_eps", 1e-6, low=0.0, high=1.0),
        "norm_topk_prob": bool(config.get("norm_topk_prob", True)),
    }


def safetensors_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json (each a file
    inside the directory: model_file)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(model_file(path, index.name)).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map object")
        shards = [model_file(path, s, "shard") for s in sorted(set(map(str, weight_map.values())))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ConfigError(f"{index}: names missing shard(s) {', '.join(missing[:3])}")
        return shards
    single = path / "model.safetensors"
    if single.exists():
        return [model_file(path, single.name)]
    raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _split_fused_experts(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers-5 fused experts → per-expert gate/up/down weights."""
    prefix = name.rsplit("experts.", 1)[0] + "experts."
    if tensor.dim() != 3 or (name.endswith("gate_up_proj") and tensor.shape[1] % 2):
        raise ConfigError(f"{name}: fused experts of shape {tuple(tensor.shape)}; expected "
                          "[experts, rows, columns]")
    if name.endswith("gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)  # [E, 2I, D] → 2 × [E, I, D]
        return {**{f"{prefix}{e}.gate_proj.weight": g for e, g in enumerate(gate)},
                **{f"{prefix}{e}.up_proj.weight": u for e, u in enumerate(up)}}
    return {f"{prefix}{e}.down_proj.weight": d for e, d in enumerate(tensor)}


def _file_tensors(file: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in dtype) of one safetensors file; ConfigError when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 — safe_open is not a dict
                yield key, f.get_tensor(key).to(dtype)
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{file}: not a readable safetensors file ({reason[:160]})") from None


def iter_checkpoint(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor in ``dtype``) for every tensor of the checkpoint, one at a time, so
    loading never holds a second copy of the model."""
    for file in safetensors_files(path):
        for key, tensor in _file_tensors(file, dtype):
            name = our_param_name(key)
            if re.search(r"experts\.(gate_up_proj|down_proj)$", name):
                yield from _split_fused_experts(name, tensor).items()
            else:
                yield name, tensor


def load_state(model: Transformer, path: Path, dtype: torch.dtype) -> None:
    """Copy the checkpoint tensors into the model; ConfigError on missing/extra/mis-shaped ones."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if model.args.tied_embeddings:
        params.pop("lm_head.weight")
    seen, extra = set(), []
    with torch.no_grad():
        for name, tensor in iter_checkpoint(path, dtype):
            if name not in params:
                if not (name == "lm_head.weight" and model.args.tied_embeddings):
                    extra.append(name)
                continue
            if params[name].shape != tensor.shape:
                raise ConfigError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the config implies {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing or extra:
        raise ConfigError(f"{path}: checkpoint does not match the config: missing {missing[:3]}"
                          f"{'…' if len(missing) > 3 else ''}, unexpected {sorted(extra)[:3]}"
                          f"{'…' if len(extra) > 3 else ''}")


def load_hf_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu",
                  spec: ModelSpec | None = None) -> tuple[ModelSpec, Transformer]:
    """(ModelSpec, Transformer with the checkpoint's weights) from a local HF model directory.

    ``spec``: the parsed config (default: ``estimator.catalog.load_model(path)``).
    """
    path = Path(path)
    config = read_config(path)
    model_type = config.get("model_type", "")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported by the bundled "
                          f"executor (supported: {', '.join(SUPPORTED_TYPES)})")
    if spec is None:
        from estimator.catalog import load_model

        spec = load_model(str(path))
    model = build_model(spec, dtype=dtype, device=device, init=False, **build_kwargs(config))
    load_state(model, path, dtype)
    return spec, model
