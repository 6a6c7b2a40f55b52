"""The FakeTensorMode the model is built and stepped in: tensors with shapes, dtypes and
storages but no memory and no data, so a 560B model costs what its metadata costs."""

from __future__ import annotations

import contextlib

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode


def fake_mode() -> FakeTensorMode:
    """A FakeTensorMode whose results hold no weak reference from the converter's memo.

    nn.Module.to() (PEFT moves each new adapter to its base layer's dtype) swaps FakeTensor
    parameters with torch.utils.swap_tensors, which refuses a tensor that has a weak reference;
    the converter memoises every fake it wraps from a meta result in a WeakValueDictionary.
    Those memo entries are never looked up again (the meta results are fresh), so this mode's
    converter wraps without memoising.
    """
    mode = FakeTensorMode()

    def wrap(fake_mode, t, device, pytype=None, dispatch_keys=None):
        return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)

    mode.fake_tensor_converter.from_meta_and_device = wrap
    return mode


def tensor_mode(fake: bool):
    """A context in which new tensors are fake (or real, for a reference run)."""
    return fake_mode() if fake else contextlib.nullcontext()
