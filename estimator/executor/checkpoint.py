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
the previous checkpoints are deleted only after the new one is in place (the new one and the
`keep_last` − 1 before it are kept; a checkpoint of a later step, left by a run that went back
to an older one, is never pruned, and the one just written never is), each first renamed out of
the `step_*` namespace. A crash (even SIGKILL) leaves at worst a `.tmp-*` or `.old-*`
directory, removed at the start of the next run (remove_debris) and on the next save.

Reading is defensive: a checkpoint whose state.json is not valid UTF-8 JSON of the expected
shape, whose files are missing, truncated, outside its directory or not safetensors, or whose
tensors do not fit the model and optimizer, raises ConfigError naming it (scan_checkpoints
collects these reasons for every checkpoint, newest first).
"""

import base64
import binascii
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from estimator.errors import ConfigError

CHECKPOINT_FORMAT_VERSION = 1
"""Version of the checkpoint layout written in state.json."""
CHECKPOINTS_DIR = "checkpoints"
"""Sub-directory of the output directory that holds the checkpoints."""
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_NAME = re.compile(r"step_(\d{8,})")
MAX_STATE_BYTES = 256 * 2**20
"""Largest state.json read (bytes): losses and RNG states of a long run fit many times over."""


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
    """Inverse of encode_rng_state; ConfigError for text that is not base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ConfigError("a checkpoint's RNG state is not base64") from None
    if not raw:
        raise ConfigError("a checkpoint's RNG state is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def rng_states(device: torch.device) -> dict[str, str]:
    """The RNG states a resumed run needs to replay dropout exactly: CPU, and the device's."""
    states = {"cpu": encode_rng_state(torch.get_rng_state())}
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "get_rng_state"):
        states[device.type] = encode_rng_state(backend.get_rng_state())
    return states


def restore_rng_states(states: dict[str, str], device: torch.device) -> None:
    """Inverse of rng_states; ConfigError when a state is missing or not one torch takes."""
    if not isinstance(states, dict) or "cpu" not in states:
        raise ConfigError("a checkpoint has no CPU RNG state")
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    try:
        torch.set_rng_state(decode_rng_state(states["cpu"]))
        if device.type in states and backend is not None:
            backend.set_rng_state(decode_rng_state(states[device.type]))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"a checkpoint's RNG state is not torch's ({str(e)[:80]})") from None


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
    write_state(tmp, {**state, "trainable_only": trainable_only, "optimizer": opt_json})


def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    trainable_only: bool, write_adapter: Callable[[Path], None] | None = None,
                    keep_last: int = 2) -> Path:
    """Write the checkpoint of `step` atomically under `root` and return its directory.
    `state` (JSON-serialisable) is stored in state.json beside step; older checkpoints beyond
    the newest `keep_last` are removed once the new one is complete."""
    tmp = temp_dir(root, step)
    tmp.mkdir()
    _write(tmp, model, optimizer, {**state, "step": step}, trainable_only=trainable_only,
           write_adapter=write_adapter)
    return publish(root, tmp, step, keep_last=keep_last)


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    """Write state.json (with format_version and the size of every file already in tmp)
    and fsync the tree: the last step before publish."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
             if p.is_file()}
    full_state = {"format_version": CHECKPOINT_FORMAT_VERSION, **state, "files": files}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
    _fsync_tree(tmp)


def temp_dir(root: Path, step: int) -> Path:
    """The hidden directory a checkpoint of `step` is written into (root prepared: created,
    debris removed)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_debris(root)
    return root / f"{_TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}"


def publish(root: Path, tmp: Path, step: int, *, keep_last: int) -> Path:
    """Rename a complete temp checkpoint of `step` into place atomically and prune older
    ones (see save_checkpoint); returns its directory."""
    final = root / checkpoint_name(step)
    if final.exists():  # re-saving a step (resume then interrupt): swap, never delete first
        old = root / f"{_OLD_PREFIX}{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(root)
    older = [p for p in list_checkpoints(root) if checkpoint_step(p) < step]
    for stale in older[:max(0, len(older) - (keep_last - 1))]:
        _discard(stale)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: renamed out of the step_* namespace first (atomic), so
    a crash mid-deletion leaves debris, never a half-deleted step_* directory."""
    doomed = path.with_name(f"{_OLD_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_debris(root: Path) -> list[str]:
    """Delete the temp and swapped-out directories a killed save or prune left under root
    (`.tmp-step_*`, `.old-step_*`); returns their names. Call with the output's lock held."""
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return sorted(removed)



def discard_checkpoints(root: Path) -> int:
    """Delete every checkpoint under root (a run restarted on purpose); returns how many."""
    doomed = list_checkpoints(root)
    for path in doomed:
        _discard(path)
    return len(doomed)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory's name records (-1 for a name that is not one)."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root, oldest step first (by the step in the name)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def _read_state(path: Path) -> dict[str, Any]:
    file = path / "state.json"
    try:
        if file.stat().st_size > MAX_STATE_BYTES:
            raise ConfigError(f"checkpoint {path} is unreadable: state.json is larger than "
                              f"{MAX_STATE_BYTES // 2**20} MiB")
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {path} is unreadable: {reason}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} is unreadable: state.json is not an object")
    return state


def _check_files(path: Path, files: object) -> None:
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"checkpoint {path} is unreadable: state.json lists no files")
    root = path.resolve()
    for name, size in files.items():
        file = path / name
        inside = isinstance(name, str) and file.resolve().is_relative_to(root)
        if not inside or isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"checkpoint {path} is unreadable: bad file entry {name!r}")
        if not file.is_file() or file.stat().st_size != size:
            raise ConfigError(f"checkpoint {path} is incomplete: {name} missing or truncated")


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read and validate a checkpoint's state.json (format version, the step its name records,
    every listed file present inside it with its recorded size). Raises ConfigError if the
    checkpoint is unreadable, incomplete or from another format version."""
    state = _read_state(path)
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path} has format {state.get('format_version')!r}, "
                          f"this nvfree reads {CHECKPOINT_FORMAT_VERSION}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step != checkpoint_step(path):
        raise ConfigError(f"checkpoint {path} is unreadable: its step {step!r} does not match "
                          "its name")
    _check_files(path, state.get("files"))
    return LoadedCheckpoint(path=path, state=state)


def scan_checkpoints(root: Path) -> list[tuple[Path, LoadedCheckpoint | None, str]]:
    """Every checkpoint under root, newest first: (directory, the loaded checkpoint or None,
    why it does not load as 'step_… is unreadable: …', or '')."""
    rows: list[tuple[Path, LoadedCheckpoint | None, str]] = []
    for path in reversed(list_checkpoints(root)):
        try:
            rows.append((path, load_checkpoint(path), ""))
        except ConfigError as e:
            rows.append((path, None, problem(path, e)))
    return rows


def problem(path: Path, error: ConfigError) -> str:
    """A checkpoint's ConfigError as 'step_… <what is wrong>' (for a list of them)."""
    text = str(error)
    rest = text.removeprefix(f"checkpoint {path}")
    return path.name + (rest if rest != text else f": {text}")


def latest_checkpoint(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint under root that loads; None if there is none."""
    return next((loaded for _, loaded, _ in scan_checkpoints(root) if loaded), None)


def load_tensors(checkpoint: LoadedCheckpoint, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of the checkpoint; ConfigError when it does not read."""
    try:
        return load_file(checkpoint.path / name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {checkpoint.path}: {name} is not readable "
                          f"safetensors ({reason})") from None


def restore_model(checkpoint: LoadedCheckpoint, model: torch.nn.Module) -> None:
    """Copy the checkpoint's stored parameters into the model (names and shapes must match;
    every trainable parameter must be there)."""
    tensors = load_tensors(checkpoint, "model.safetensors")
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if unknown or missing:
        raise ConfigError(f"checkpoint {checkpoint.path} does not match the model: unexpected "
                          f"{unknown[:3]}, missing {missing[:3]}")
    bad = [n for n, v in tensors.items() if v.shape != params[n].shape]
    if bad:
        raise ConfigError(f"checkpoint {checkpoint.path}: {bad[0]} has shape "
                          f"{tuple(tensors[bad[0]].shape)}, the model's is "
                          f"{tuple(params[bad[0]].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def restore_optimizer(checkpoint: LoadedCheckpoint, optimizer: torch.optim.Optimizer) -> None:
    """Put the checkpoint's optimizer state back, tensors in their saved dtypes (no casts:
    8-bit codes stay uint8), 'step' counters on the CPU as torch keeps them. ConfigError when
    the stored state does not fit the optimizer's parameters."""
    tensors = load_tensors(checkpoint, "optimizer.safetensors")
    try:
        _restore_optimizer(checkpoint.state["optimizer"], tensors, optimizer)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        optimizer.state.clear()
        raise ConfigError(f"checkpoint {checkpoint.path}: the optimizer state does not fit "
                          f"this optimizer ({type(e).__name__}: {str(e)[:120]})") from None


_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
"""Optimizer states torch keeps in the parameter's shape and a floating dtype."""


def _hyper_parameters(group: dict, saved_group: dict) -> dict:
    """The saved group's hyper-parameters, each of the type the optimizer's own has (None
    matches anything; keys this torch does not know are left out)."""
    update = {}
    for key, value in saved_group.items():
        if key == "params" or key not in group:
            continue
        value = tuple(value) if isinstance(value, list) else value
        ours = group[key]
        numbers = (int, float)
        same = value is None or ours is None or type(value) is type(ours) or (
            isinstance(value, numbers) and isinstance(ours, numbers)
            and not isinstance(value, bool) and not isinstance(ours, bool))
        if not same:
            raise ValueError(f"param_groups: {key}={value!r}")
        update[key] = value
    return update


def _check_state(key: str, value: torch.Tensor, name: str, param: torch.Tensor) -> None:
    """torch's own states in the parameter's shape (other optimizers' blocked or quantised
    states are laid out their own way: AdamW8bit pads its codes to whole blocks)."""
    if name in _PARAM_SHAPED and (value.shape != param.shape or not value.is_floating_point()):
        raise ValueError(f"state {key} has shape {tuple(value.shape)} and dtype {value.dtype}")


def _restore_optimizer(saved: dict, tensors: dict[str, torch.Tensor],
                       optimizer: torch.optim.Optimizer) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    updates = [_hyper_parameters(group, saved_group) for group, saved_group
               in zip(optimizer.param_groups, saved["param_groups"], strict=True)]
    optimizer.state.clear()
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        param = params[int(index)]
        _check_state(key, value, name, param)
        device = "cpu" if name == "step" else param.device
        optimizer.state[param][name] = value.to(device)
    for key, value in saved["scalars"].items():
        index, name = key.split(".", 1)
        optimizer.state[params[int(index)]][name] = value
    for group, update in zip(optimizer.param_groups, updates, strict=True):
        group.update(update)
