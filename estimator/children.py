"""Child processes that do not outlive nvfree: Linux's parent-death signal (torch-free, used by
the launcher's torchrun and by `nvfree validate`'s training runs)."""

from __future__ import annotations

import sys

_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends this process when its parent thread exits
(linux/prctl.h)."""


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent exits (prctl); False where
    that does not exist."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
