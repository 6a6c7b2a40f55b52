"""data/ → specs: model presets, Hugging Face config.json files (catalog.hf) and catalogue
devices.

The data directory ships inside the wheel as `estimator/data` (pyproject force-include); in a
source checkout it is the top-level `data/`.
"""

import difflib
import functools
import sys
from pathlib import Path
from typing import Any

from estimator.catalog.hf import HF_MODEL_TYPES, model_from_hf_config, read_hf_config
from estimator.catalog.prices import PriceRule, hourly_price
from estimator.errors import SetupError, UnknownDeviceError, UnknownModelError
from estimator.specs import Device, ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "GB",
    "GIB",
    "HF_MODEL_TYPES",
    "TERA",
    "data_dir",
    "device_from_entry",
    "linked",
    "list_devices",
    "list_models",
    "load_device",
    "load_model",
    "model_aliases",
    "model_from_entry",
    "model_from_hf_config",
    "priced",
    "read_hf_config",
    "read_toml",
    "suggestion",
]

from estimator.units import GB, GIB, TERA


def data_dir() -> Path:
    """The catalogue directory: packaged copy first, then the source checkout's data/."""
    package = Path(__file__).resolve().parent.parent  # estimator/
    packaged = package / "data"
    return packaged if packaged.is_dir() else package.parent / "data"


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
    price = hourly_price(key, read_toml("prices.toml"), fields.pop("price_per_hour_usd", None),
                         fields.pop("price_source", None))
    fields["price_per_hour_usd"] = None if price is None else price.usd_per_hour
    fields["price_source"] = None if price is None else price.source
    return Device(name=key, memory_bytes=round(memory), memory_bandwidth_bytes_per_second=bandwidth,
                  peak_flops_per_second=peaks,
                  interconnect_bytes_per_second=interconnect * GB if interconnect else None,
                  network_bytes_per_second=network * GB if network else None,
                  **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def priced(device: Device, usd_per_hour: float | None = None,
           rule: PriceRule | None = None) -> Device:
    """The device with a user's price (`--price DEVICE=USD/h`), or its catalogue price
    re-derived under another amortisation rule (catalog.prices)."""
    if usd_per_hour is not None:
        if usd_per_hour < 0:
            raise UnknownDeviceError(f"--price {device.name}: a price must be >= 0")
        return device.model_copy(update={"price_per_hour_usd": usd_per_hour,
                                         "price_source": "given with --price"})
    if rule is None or device.name not in read_toml("devices.toml")["devices"]:
        return device
    entry = read_toml("devices.toml")["devices"][device.name]
    price = hourly_price(device.name, read_toml("prices.toml"), entry.get("price_per_hour_usd"),
                         entry.get("price_source"), rule)
    return device.model_copy(update={
        "price_per_hour_usd": None if price is None else price.usd_per_hour,
        "price_source": None if price is None else price.source})


def linked(device: Device, gbit_per_second: float) -> Device:
    """The device with the user's network between machines (--link, Gb/s per device)."""
    if not gbit_per_second > 0:
        raise SetupError(f"--link must be positive (Gb/s), got {gbit_per_second:g}")
    return device.model_copy(update={"network_bytes_per_second": gbit_per_second * 1e9 / 8})


def list_devices() -> list[Device]:
    """Every catalogue device, in file order."""
    return [device_from_entry(k, v) for k, v in read_toml("devices.toml")["devices"].items()]


def load_device(name: str) -> Device:
    """A catalogue device by key (case-insensitive). This machine ('local') is detected, not
    catalogued: estimator.hardware.resolve_device resolves every name, 'local' included."""
    key = name.strip().lower()
    if key == "local":
        raise UnknownDeviceError("'local' is this machine, not a catalogue device: resolve it "
                                 "with estimator.hardware.resolve_device")
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
    try:
        local = path.is_dir() or path.suffix == ".json" or path.exists()
    except OSError:  # a name no file system takes (too long, …): not a path, maybe a preset
        local = False
    if local:
        return model_from_hf_config(path)
    aliases = model_aliases()
    key = aliases.get(name_or_path.strip().lower())
    if key is None:
        raise UnknownModelError(
            f"unknown model '{name_or_path}'.{suggestion(name_or_path, list(aliases))} "
            "See `nvfree models`, or pass a config.json path or --params.")
    return model_from_entry(key, read_toml("models.toml")["models"][key])
