"""data/software.toml → which software stack runs a method on a device family, with its status
(supported, experimental, unsupported, unknown) and the nearest method that runs there.

A method is `unsupported` on a family only where a source says no stack exists (e.g. QLoRA /
bitsandbytes NF4 on TPU/XLA and Trainium/Neuron: no bitsandbytes backend in its 0.43–0.50
installation guides); `unknown` means no source was read — not a no (docs/sources_issue17.md).
"""

from dataclasses import dataclass
from typing import Any

METHOD_KEYS = {"full": "full", "lora": "lora", "qlora": "qlora_4bit"}
"""TrainSetup.method → the method key of data/software.toml."""
NEAREST = {"qlora": ("lora", "full"), "lora": ("full",), "full": ("lora",)}
"""Methods to offer instead, nearest first: QLoRA → LoRA in 16-bit → full fine-tuning."""


@dataclass(frozen=True)
class SoftwarePath:
    """What runs one method on one device family."""

    family: str
    method: str
    status: str
    """supported, experimental, unsupported or unknown."""
    stack: str
    source: str
    alternative: str | None = None


def family_of(device_key: str, table: dict[str, Any]) -> str | None:
    """The software family (data/software.toml [families]) that lists the device."""
    for family, entry in table.get("families", {}).items():
        if device_key in entry.get("devices", ()):
            return family
    return None


def software_path(device_key: str, method: str, table: dict[str, Any]) -> SoftwarePath | None:
    """The stack for a method on the device's family; None for inference, a device in no
    family or a cell the file does not have."""
    family = family_of(device_key, table)
    key = METHOD_KEYS.get(method)
    if family is None or key is None:
        return None
    cell = table.get("software", {}).get(family, {}).get(key)
    if cell is None:
        return None
    return SoftwarePath(family=family, method=method, status=cell.get("status", "unknown"),
                        stack=cell.get("stack", "n/a"), source=cell.get("source", "n/a"),
                        alternative=cell.get("alternative"))


def runs(device_key: str, method: str, table: dict[str, Any]) -> bool:
    """False only where the file says no stack runs the method on the device."""
    path = software_path(device_key, method, table)
    return path is None or path.status != "unsupported"


def nearest_method(device_key: str, method: str, table: dict[str, Any]) -> str | None:
    """The nearest method (NEAREST) that has a stack on the device, or None."""
    return next((m for m in NEAREST.get(method, ()) if runs(device_key, m, table)), None)


def software_note(device_key: str, method: str, table: dict[str, Any]) -> str | None:
    """One line for an estimate or a compare row: the stack when it is not plainly
    supported (experimental, unknown or unsupported), None when it is (or nothing is known
    for an inference run or a device outside the file)."""
    path = software_path(device_key, method, table)
    if path is None or path.status == "supported":
        return None
    if path.status == "unsupported":
        near = nearest_method(device_key, method, table)
        offer = f"; nearest that runs: --method {near}" if near else ""
        return (f"software: no stack runs {method} on {path.family} ({path.stack}){offer}")
    return f"software: {method} on {path.family} is {path.status} ({path.stack})"
