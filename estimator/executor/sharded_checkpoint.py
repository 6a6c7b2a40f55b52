"""Sharded checkpoints of a ZeRO-3 (FSDP2) run with torch.distributed.checkpoint (DCP).

Layout of OUTPUT/checkpoints/step_00000100/ (the single-process layout of checkpoint.py, with
the weights and optimizer in DCP instead of safetensors):
    dcp/                   DCP: `.metadata` + one `__<rank>_0.distcp` file per rank; the keys
                           'model.<parameter name>' (trainable parameters only for LoRA) and
                           'optimizer.state.<parameter name>.<key>' / 'optimizer.param_groups'
                           by parameter name (torch's get_state_dict), so any number of ranks
                           — or one process without a process group — loads it (DCP reshards)
    adapter/               LoRA only: the PEFT adapter (full tensors, gathered to rank 0)
    state.json             as in checkpoint.py, with "sharded": {"world_size": N}

Atomic as checkpoint.py: every rank writes its shard into the same hidden temp directory
(rank 0 names it), rank 0 writes state.json last, fsyncs the tree and renames it into place;
the ranks wait for that before training on. A killed save leaves only a `.tmp-*` directory.
Several machines need --output on a shared file system (as for resume in general).
"""

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from estimator.errors import ConfigError
from estimator.executor import checkpoint as ckpt

DCP_DIR = "dcp"
"""Sub-directory of a sharded checkpoint that holds the DCP files."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _temp_dir(root: Path, step: int, is_main: bool) -> Path:
    """Rank 0 prepares root and names the temp directory; every rank gets the name."""
    name = [ckpt.temp_dir(root, step).name if is_main else None]
    if _distributed():
        dist.broadcast_object_list(name, src=0)
    return root / str(name[0])


def save_sharded_checkpoint(root: Path, step: int, *, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict[str, Any],
                            trainable_only: bool, is_main: bool,
                            write_adapter: Callable[[Path, dict], None] | None = None,
                            keep_last: int = 2) -> Path:
    """Every rank calls this (collective): write the checkpoint of `step` as described in the
    module docstring; returns its directory (on every rank)."""
    tmp = _temp_dir(root, step, is_main)
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / DCP_DIR)
    adapter = None
    if write_adapter is not None:
        adapter = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    final = root / ckpt.checkpoint_name(step)
    if is_main:
        if write_adapter is not None:
            write_adapter(tmp / "adapter", adapter)
        world = dist.get_world_size() if _distributed() else 1
        ckpt.write_state(tmp, {**state, "step": step, "trainable_only": trainable_only,
                               "sharded": {"world_size": world}})
        final = ckpt.publish(root, tmp, step, keep_last=keep_last)
    if _distributed():
        dist.barrier()
    return final


def is_sharded(checkpoint: ckpt.LoadedCheckpoint) -> bool:
    """Whether a checkpoint holds its weights and optimizer in DCP."""
    return bool(checkpoint.state.get("sharded"))


def restore_sharded(checkpoint: ckpt.LoadedCheckpoint, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's weights and optimizer into the model (sharded or not, on
    any number of ranks; collective under a process group). ConfigError when it does not fit."""
    trainable_only = bool(checkpoint.state.get("trainable_only"))
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    loaded = {"model": model_state, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():  # one process: loading without a group is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(loaded, checkpoint_id=checkpoint.path / DCP_DIR)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"], options=options)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError,
            CheckpointException) as e:
        optimizer.state.clear()
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {checkpoint.path}: the sharded weights or optimizer "
                          f"state do not fit this run ({reason})") from None


def _full_optimizer_state(checkpoint: ckpt.LoadedCheckpoint, names: list[str]) -> dict:
    """A single-process checkpoint's optimizer (keyed by parameter index, checkpoint.py) as
    torch's full optimizer state dict keyed by parameter name: index i is the i-th trainable
    parameter, the order both runs build their optimizer in."""
    saved = checkpoint.state["optimizer"]
    state: dict[str, dict] = {}
    for key, value in ckpt.load_tensors(checkpoint, "optimizer.safetensors").items():
        _, index, name = key.split(".", 2)
        state.setdefault(names[int(index)], {})[name] = value
    for key, value in saved["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(names[int(index)], {})[name] = value
    groups, start = [], 0
    for group in saved["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": names[start:start + count]})
        start += count
    return {"state": state, "param_groups": groups}


def restore_full_into_sharded(checkpoint: ckpt.LoadedCheckpoint, model: torch.nn.Module,
                              optimizer: torch.optim.Optimizer) -> None:
    """Load a single-process checkpoint (safetensors, checkpoint.py) into a sharded model and
    its optimizer: every rank reads the full tensors and keeps its shard (collective).
    ConfigError when it does not fit."""
    trainable_only = bool(checkpoint.state.get("trainable_only"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    options = StateDictOptions(full_state_dict=True, strict=not trainable_only)
    try:
        tensors = ckpt.load_tensors(checkpoint, "model.safetensors")
        set_state_dict(model, optimizer, model_state_dict=tensors,
                       optim_state_dict=_full_optimizer_state(checkpoint, names),
                       options=options)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        optimizer.state.clear()
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {checkpoint.path}: its weights or optimizer state do "
                          f"not fit this sharded run ({reason})") from None
