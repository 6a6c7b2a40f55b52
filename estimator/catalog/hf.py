"""Hugging Face config.json → ModelSpec, for every model_type in hf_types.ARCHITECTURES.

The fields every decoder shares are read here; what a model_type's modelling code builds
differently (biases, norms, MLP kind, MoE, MLA, fused modules, its PEFT names) comes from its
entry in hf_types. The parameter count of the spec equals `sum(p.numel())` of the transformers
model built from the same config (tests/torch/test_hf_param_counts.py).
"""

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from estimator.catalog.hf_types import ARCHITECTURES, Arch, HFConfig
from estimator.errors import ConfigError
from estimator.specs import ModelSpec

HF_MODEL_TYPES = tuple(sorted(ARCHITECTURES))
"""Every config.json model_type nvfree reads."""


def read_hf_config(path: Path) -> dict[str, Any]:
    """Load config.json from a file or a model directory, with one-line errors."""
    from estimator.inputs import read_json  # bounded size and nesting, strict UTF-8

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}")
    config = read_json(file, what="config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return config


def unsupported_type(model_type: str, where: str) -> ConfigError:
    """The one-line refusal of a model_type nvfree does not model."""
    what = f"unsupported model_type {model_type!r}" if model_type else "no model_type"
    return ConfigError(
        f"{what} in {where}; supported: {', '.join(HF_MODEL_TYPES)}. For another architecture "
        "try `nvfree estimate --trace` (a FakeTensor trace of the real transformers code) or "
        "--params.")


def rotary_fraction(cfg: HFConfig, default: float) -> float:
    """partial_rotary_factor (transformers 5 rope_parameters, or top-level in older files),
    GPT-NeoX's rotary_pct, or the model_type's default."""
    rope = cfg.get("rope_parameters")
    for value in ((rope or {}).get("partial_rotary_factor") if isinstance(rope, dict) else None,
                  cfg.get("partial_rotary_factor"), cfg.get("rotary_pct")):
        if isinstance(value, int | float) and 0 < value <= 1:
            return float(value)
    return default


def common_fields(cfg: HFConfig, arch: Arch) -> dict[str, Any]:
    """The fields every decoder config shares (the type's reader may override any)."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    for key, value in (("num_attention_heads", heads), ("hidden_size", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**20:
            raise ConfigError(f"config.json: {key} must be an integer in [1, {2**20}], "
                              f"got {value!r}")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return {
        "num_layers": cfg.get("num_hidden_layers"), "hidden_size": hidden,
        "intermediate_size": cfg.get("intermediate_size") or 4 * hidden,
        "num_heads": heads, "num_kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or hidden // heads, "vocab_size": cfg["vocab_size"],
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "max_seq_len": cfg.get("max_position_embeddings") or 4096,
        "sliding_window": window or None,
        "rotary_fraction": rotary_fraction(cfg, arch.rotary_fraction),
    }


def decoder_config(config: dict[str, Any], arch: Arch) -> tuple[dict[str, Any], str | None]:
    """The dict that holds the decoder's fields, and a note when part of the model is left
    out (multimodal Gemma-3: the text_config decoder, without the vision tower)."""
    if not arch.text_config:
        return config, None
    text = dict(config.get("text_config") or {})
    if "tie_word_embeddings" in config:
        text.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
    return text, (f"{config['model_type']}: the text decoder only (text_config); the vision "
                  "tower and projector are not counted")


def spec_from_hf_dict(config: dict[str, Any], *, source: str, name: str) -> ModelSpec:
    """A ModelSpec from a parsed config.json; ConfigError (one line) for an unsupported
    model_type, a missing required field or inconsistent values."""
    model_type = str(config.get("model_type") or "")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise unsupported_type(model_type, source)
    raw, note = decoder_config(config, arch)
    cfg = HFConfig(raw, arch.defaults, arch.aliases)
    try:
        fields = common_fields(cfg, arch) | arch.read(cfg)
        if fields["num_layers"] is None:
            raise KeyError("num_hidden_layers")
        return ModelSpec(
            name=name, **fields, lora_module_names=arch.lora_names,
            fused_linears=arch.fused, hf_model_type=model_type, inferred_from=note,
            source=source)
    except KeyError as exc:
        raise ConfigError(f"{source}: config.json lacks the field {exc}") from None
    except (ValidationError, TypeError, ValueError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"msg": str(exc)}
        raise ConfigError(f"{source}: invalid config.json ({first['msg']})") from None


def model_from_hf_config(path: Path) -> ModelSpec:
    """A ModelSpec from a config.json file or model directory of any model_type in
    HF_MODEL_TYPES."""
    config = read_hf_config(path)
    name = config.get("_name_or_path") or path.resolve().name
    return spec_from_hf_dict(config, source=str(path), name=str(name))
