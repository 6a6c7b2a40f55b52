"""Atomic checkpoints: round trip, pruning, validation, and SIGKILL during a write."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from estimator.errors import ConfigError
from estimator.executor import checkpoint as ckpt
from estimator.executor.optim import AdamW8bit

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]


def _module_and_optimizer(optimizer_cls=torch.optim.AdamW, width: int = 128):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 4))
    optimizer = optimizer_cls(module.parameters(), lr=1e-2)
    module(torch.randn(3, width)).square().mean().backward()
    optimizer.step()
    return module, optimizer


def _save(root, step, module, optimizer, **kwargs):
    return ckpt.save_checkpoint(root, step, model=module, optimizer=optimizer,
                                state={"losses": [1.0] * step}, trainable_only=False, **kwargs)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, AdamW8bit], ids=["adamw", "8bit"])
def test_round_trip_restores_weights_and_optimizer_state_in_their_dtypes(tmp_path, optimizer_cls):
    module, optimizer = _module_and_optimizer(optimizer_cls)
    path = _save(tmp_path, 1, module, optimizer)
    fresh, fresh_opt = _module_and_optimizer(optimizer_cls)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    loaded = ckpt.load_checkpoint(path)
    ckpt.restore_model(loaded, fresh)
    ckpt.restore_optimizer(loaded, fresh_opt)
    for a, b in zip(module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            assert fresh_opt.state[q][key].dtype == value.dtype, key
            assert torch.equal(fresh_opt.state[q][key], value), key
    if optimizer_cls is AdamW8bit:
        assert any(v.dtype == torch.uint8 for s in fresh_opt.state.values() for v in s.values())


def test_rng_state_round_trip():
    states = ckpt.rng_states(torch.device("cpu"))
    expected = torch.rand(5)
    torch.rand(100)
    ckpt.restore_rng_states(json.loads(json.dumps(states)), torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_keeps_the_last_checkpoints_and_removes_debris(tmp_path):
    module, optimizer = _module_and_optimizer()
    (tmp_path / ".tmp-step_00000009-123").mkdir(parents=True)
    for step in (1, 2, 3):
        _save(tmp_path, step, module, optimizer, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    _save(tmp_path, 3, module, optimizer, keep_last=2)  # re-saving a step swaps it in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).step == 3


def test_a_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    module, optimizer = _module_and_optimizer()
    _save(tmp_path, 1, module, optimizer)
    newest = _save(tmp_path, 2, module, optimizer)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="incomplete"):
        ckpt.load_checkpoint(newest)
    assert ckpt.latest_checkpoint(tmp_path).step == 1


_WRITER = """
import sys, torch
from pathlib import Path
from torch import nn
from estimator.executor import checkpoint as ckpt
module = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
optimizer = torch.optim.AdamW(module.parameters())
module(torch.randn(2, 512)).sum().backward()
optimizer.step()
root = Path(sys.argv[1])
start = (ckpt.latest_checkpoint(root).step + 1) if ckpt.latest_checkpoint(root) else 1
for step in range(start, 10**6):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(step)
    ckpt.save_checkpoint(root, step, model=module, optimizer=optimizer,
                         state={"value": step}, trainable_only=False)
    if step == start:
        print("saved", flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_broken_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    debris_seen = 0
    for attempt in range(8):  # at least 4 kills, more until one lands inside a save
        if attempt >= 4 and debris_seen:
            break
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "saved"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        debris_seen += any(p.name.startswith((".tmp-", ".old-")) for p in root.iterdir())
        loaded = ckpt.latest_checkpoint(root)
        assert loaded is not None
        assert all(ckpt.load_checkpoint(p) for p in ckpt.list_checkpoints(root))
        module = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
        ckpt.restore_model(loaded, module)
        assert all(bool((p == loaded.state["value"]).all()) for p in module.parameters())
        ckpt.restore_optimizer(loaded, torch.optim.AdamW(module.parameters()))
    assert debris_seen >= 1, "no kill landed inside a save; the test did not exercise it"
