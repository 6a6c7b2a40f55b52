"""data/ → specs: model presets, Hugging Face config.json files and catalogue devices.

The data directory ships inside the wheel as `estimator/data` (pyproject force-include); in a
source checkout it is the top-level `data/`.
"""

import difflib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from estimator.errors import ConfigError, UnknownDeviceError, UnknownModelError
from estimator.specs import Device, MLASpec, ModelSpec, MoESpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GIB = 1024**3
GB = 1000**3
TERA = 1e12


def data_dir() -> Path:
    """The catalogue directory: packaged copy first, then the source checkout's data/."""
    packaged = Path(__file__).parent / "data"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "data"


@functools.cache
def read_toml(name: str) -> dict[str, Any]:
    """Parse one catalogue file (cached)."""
    with open(data_dir() / name, "rb") as f:
        return tomllib.load(f)


def suggestion(name: str, known: list[str]) -> str:
    """' Did you mean: a, b?' for the closest known names, or ''."""
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


# ------------------------------------------------------------------------------ devices


def device_from_entry(key: str, entry: dict[str, Any]) -> Device:
    """One [devices.<key>] table (human units) → Device (SI base units)."""
    fields = dict(entry)
    if "memory_gib" in fields:
        memory = fields.pop("memory_gib") * GIB
    else:
        memory = fields.pop("memory_gb") * GB
    bandwidth = fields.pop("bandwidth_gb_per_s") * GB
    peaks = {k: v * TERA for k, v in fields.pop("peak_tflops", {}).items()}
    interconnect = fields.pop("interconnect_gb_per_s", None)
    network = fields.pop("network_gb_per_s", None)
    return Device(name=key, memory_bytes=round(memory), memory_bandwidth_bytes_per_second=bandwidth,
                  peak_flops_per_second=peaks,
                  interconnect_bytes_per_second=interconnect * GB if interconnect else None,
                  network_bytes_per_second=network * GB if network else None,
                  **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def list_devices() -> list[Device]:
    """Every catalogue device, in file order."""
    return [device_from_entry(k, v) for k, v in read_toml("devices.toml")["devices"].items()]


def load_device(name: str) -> Device:
    """A catalogue device by key (case-insensitive), or 'local' for this machine's CPU."""
    key = name.strip().lower()
    if key == "local":
        from estimator.hardware import detect, local_device

        return local_device(detect())
    entries = read_toml("devices.toml")["devices"]
    if key not in entries:
        raise UnknownDeviceError(
            f"unknown device '{name}'.{suggestion(key, [*entries, 'local'])} "
            "See `nvfree devices`.")
    return device_from_entry(key, entries[key])


# ------------------------------------------------------------------------------- models


def model_from_entry(key: str, entry: dict[str, Any]) -> ModelSpec:
    """One [models.<key>] table → ModelSpec (aliases dropped)."""
    fields = {k: v for k, v in entry.items() if k != "aliases"}
    fields.setdefault("name", key)
    return ModelSpec.model_validate(fields)


@functools.lru_cache(maxsize=1)
def model_aliases() -> dict[str, str]:
    """Lower-case key or alias → preset key."""
    table: dict[str, str] = {}
    for key, entry in read_toml("models.toml")["models"].items():
        table[key.lower()] = key
        for alias in entry.get("aliases", []):
            table[alias.lower()] = key
    return table


def list_models() -> list[ModelSpec]:
    """Every preset, in file order."""
    return [model_from_entry(k, v) for k, v in read_toml("models.toml")["models"].items()]


def load_model(name_or_path: str) -> ModelSpec:
    """A preset (key, alias or HF id), or a local config.json / model directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or path.suffix == ".json" or path.exists():
        return model_from_hf_config(path)
    aliases = model_aliases()
    key = aliases.get(name_or_path.strip().lower())
    if key is None:
        raise UnknownModelError(
            f"unknown model '{name_or_path}'.{suggestion(name_or_path, list(aliases))} "
            "See `nvfree models`, or pass a config.json path or --params.")
    return model_from_entry(key, read_toml("models.toml")["models"][key])


# --------------------------------------------------------------- Hugging Face config.json

HF_DENSE = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "smollm3"}
HF_MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"}


def read_hf_config(path: Path) -> dict[str, Any]:
    """Load config.json from a file or a model directory, with one-line errors."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return config


def hf_moe(config: dict[str, Any], model_type: str) -> MoESpec | None:
    """The MoE part of a HF config (Mixtral / Qwen-MoE / DeepSeek / gpt-oss names)."""
    num_experts = (config.get("num_local_experts") or config.get("num_experts")
                   or config.get("n_routed_experts"))
    if not num_experts or model_type not in HF_MOE:
        return None
    shared = config.get("n_shared_experts") or (1 if config.get(
        "shared_expert_intermediate_size") else 0)
    return MoESpec(
        num_experts=num_experts,
        num_experts_per_token=config.get("num_experts_per_tok") or config["experts_per_token"],
        expert_intermediate_size=(config.get("moe_intermediate_size")
                                  or config["intermediate_size"]),
        num_shared_experts=shared,
        shared_expert_intermediate_size=config.get("shared_expert_intermediate_size"),
        num_dense_layers=config.get("first_k_dense_replace", 0),
        expert_bias=model_type == "gpt_oss",
    )


def hf_mla(config: dict[str, Any]) -> MLASpec | None:
    """The MLA part of a DeepSeek-style config."""
    if "kv_lora_rank" not in config:
        return None
    return MLASpec(q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=config["kv_lora_rank"],
                   qk_nope_head_dim=config["qk_nope_head_dim"],
                   qk_rope_head_dim=config["qk_rope_head_dim"], v_head_dim=config["v_head_dim"])


def model_from_hf_config(path: Path) -> ModelSpec:
    """A ModelSpec from a Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen-MoE/DeepSeek/gpt-oss config."""
    config = read_hf_config(path)
    model_type = str(config.get("model_type", ""))
    if model_type not in HF_DENSE | HF_MOE:
        raise ConfigError(
            f"unsupported model_type '{model_type}' in {path}; supported: "
            f"{', '.join(sorted(HF_DENSE | HF_MOE))}")
    try:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        moe = hf_moe(config, model_type)
        mla = hf_mla(config)
        head_dim = config.get("head_dim") or (
            mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla else hidden // heads)
        spec = ModelSpec(
            name=config.get("_name_or_path") or path.resolve().name,
            num_layers=config["num_hidden_layers"], hidden_size=hidden,
            intermediate_size=config.get("intermediate_size") or 4 * hidden,
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=config.get("max_position_embeddings", 4096),
            qkv_bias=model_type in ("qwen2", "qwen2_moe"),
            attention_bias=bool(config.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            attention_sinks=model_type == "gpt_oss",
            sliding_window=config.get("sliding_window") if config.get(
                "use_sliding_window", True) else None,
            moe=moe, mla=mla, source=str(path),
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: config.json lacks the field {exc}") from None
    except (ValidationError, TypeError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"msg": str(exc)}
        raise ConfigError(f"{path}: invalid config.json ({first['msg']})") from None
    return spec
