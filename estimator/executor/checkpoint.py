"""Atomic training checkpoints: weights and optimizer state in safetensors, run state in JSON.

Layout of OUTPUT/checkpoints/step_00000100/:
    model.safetensors      trainable parameters (all parameters for a full fine-tune), by name
    optimizer.safetensors  optimizer state tensors, keys 'state.<param index>.<key>'
    adapter/               LoRA/QLoRA only: the adapter in PEFT format (adapter_model.safetensors
                           + adapter_config.json), loadable with peft.PeftModel.from_pretrained
    state.json             step, data position, RNG states, losses, setup, model spec,
                           optimizer hyper-parameters, and the size of every file above

Atomicity: a checkpoint is written into a hidden temp directory next to its final place, every
file and the directory are fsync'ed, then the directory is renamed into place with os.replace
and the parent fsync'ed. A `step_*` directory therefore either exists complete or not at all;
the previous checkpoints are deleted only after the new one is in place (the last `keep_last`
are kept), each first renamed out of the `step_*` namespace. A crash (even SIGKILL) leaves at
worst a `.tmp-*` or `.old-*` directory, removed on the next save.
"""

import base64
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from estimator.errors import ConfigError

CHECKPOINT_FORMAT_VERSION = 1
"""Version of the checkpoint layout written in state.json."""
CHECKPOINTS_DIR = "checkpoints"
"""Sub-directory of the output directory that holds the checkpoints."""
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What load_checkpoint read: the directory and its JSON state."""

    path: Path
    """The checkpoint directory."""
    state: dict[str, Any]
    """Contents of state.json."""

    @property
    def step(self) -> int:
        """Optimizer steps done when the checkpoint was written (count)."""
        return int(self.state["step"])


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        _fsync_path(path)
    _fsync_path(root)


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint at `step`."""
    return f"{_PREFIX}{step:08d}"


def encode_rng_state(state: torch.Tensor) -> str:
    """A torch RNG state (uint8 tensor) as base64 text for JSON."""
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def decode_rng_state(text: str) -> torch.Tensor:
    """Inverse of encode_rng_state."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_states(device: torch.device) -> dict[str, str]:
    """The RNG states a resumed run needs to replay dropout exactly: CPU, and the device's."""
    states = {"cpu": encode_rng_state(torch.get_rng_state())}
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "get_rng_state"):
        states[device.type] = encode_rng_state(backend.get_rng_state())
    return states


def restore_rng_states(states: dict[str, str], device: torch.device) -> None:
    """Inverse of rng_states."""
    torch.set_rng_state(decode_rng_state(states["cpu"]))
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type in states and backend is not None:
        backend.set_rng_state(decode_rng_state(states[device.type]))


def model_tensors(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The parameters a checkpoint stores, by name (tied weights once), contiguous on the CPU."""
    return {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    }


def optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(state tensors by 'state.<index>.<key>', JSON part: hyper-parameters and scalars)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _write(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           state: dict[str, Any], *, trainable_only: bool,
           write_adapter: Callable[[Path], None] | None) -> None:
    save_file(model_tensors(model, trainable_only=trainable_only), tmp / "model.safetensors")
    opt_tensors, opt_json = optimizer_payload(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
             if p.is_file()}
    full_state = {"format_version": CHECKPOINT_FORMAT_VERSION, **state,
                  "trainable_only": trainable_only, "optimizer": opt_json, "files": files}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
    _fsync_tree(tmp)


def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    trainable_only: bool, write_adapter: Callable[[Path], None] | None = None,
                    keep_last: int = 2) -> Path:
    """Write the checkpoint of `step` atomically under `root` and return its directory.
    `state` (JSON-serialisable) is stored in state.json beside step; older checkpoints beyond
    the newest `keep_last` are removed once the new one is complete."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_debris(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    _write(tmp, model, optimizer, {**state, "step": step}, trainable_only=trainable_only,
           write_adapter=write_adapter)
    if final.exists():  # re-saving a step (resume then interrupt): swap, never delete first
        old = root / f"{_OLD_PREFIX}{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(root)
    for stale in list_checkpoints(root)[:-keep_last]:
        _discard(stale)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: renamed out of the step_* namespace first (atomic), so
    a crash mid-deletion leaves debris, never a half-deleted step_* directory."""
    doomed = path.with_name(f"{_OLD_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_debris(root: Path) -> None:
    """Delete temp and swapped-out directories left by an interrupted save."""
    for path in root.iterdir():
        if path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root, oldest step first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read and validate a checkpoint's state.json (every listed file present, sizes equal).
    Raises ConfigError if the checkpoint is incomplete or from another format version."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable: {e}") from None
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path} has format {state.get('format_version')}, "
                          f"this nvfree reads {CHECKPOINT_FORMAT_VERSION}")
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise ConfigError(f"checkpoint {path} is incomplete: {name} missing or truncated")
    return LoadedCheckpoint(path=path, state=state)


def latest_checkpoint(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint under root that loads; None if there is none."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except ConfigError:
            continue
    return None


def restore_model(checkpoint: LoadedCheckpoint, model: torch.nn.Module) -> None:
    """Copy the checkpoint's stored parameters into the model (names must match)."""
    tensors = load_file(checkpoint.path / "model.safetensors")
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"checkpoint {checkpoint.path} holds parameters this model lacks: "
                          f"{', '.join(unknown[:3])}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def restore_optimizer(checkpoint: LoadedCheckpoint, optimizer: torch.optim.Optimizer) -> None:
    """Put the checkpoint's optimizer state back, tensors in their saved dtypes (no casts:
    8-bit codes stay uint8), 'step' counters on the CPU as torch keeps them."""
    saved = checkpoint.state["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: tuple(v) if isinstance(v, list) else v
                      for k, v in saved_group.items() if k != "params"})
    optimizer.state.clear()
    tensors = load_file(checkpoint.path / "optimizer.safetensors")
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        param = params[int(index)]
        device = "cpu" if name == "step" else param.device
        optimizer.state[param][name] = value.to(device)
    for key, value in saved["scalars"].items():
        index, name = key.split(".", 1)
        optimizer.state[params[int(index)]][name] = value
