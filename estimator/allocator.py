"""Which malloc a process runs, and running nvfree under tcmalloc where it is installed. Pure.

On Linux the CPU trainer spends a large share of a step in glibc malloc's page faults and keeps
freed activation-sized blocks resident (docs/training.md, "Heap" and "Another allocator").
gperftools' tcmalloc, preloaded for the whole process (the PyTorch CPU tuning guide, Intel's
IPEX and AMD's ZenDNN guides recommend it), measured here 20–35 % shorter steps and lower peaks
(smollm2-135m LoRA bf16, micro-batch 8 × 256: 2.21–2.32 s and 1911–1920 MiB against
3.06–3.22 s and 2022–2067 MiB). The console entry (`cli.app.main`) re-executes itself once with
the library preloaded when it is installed; `NVFREE_ALLOCATOR=system` keeps glibc. Profiles are
keyed by the allocator they were measured under (profiles.profile_filename).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

SYSTEM = "system"
LIBRARIES = {  # preferred first; the names Debian/Ubuntu (libtcmalloc-minimal4) and RHEL ship
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")
ENV = "NVFREE_ALLOCATOR"
"""'system' keeps the platform malloc; set by the re-executed process to the one it preloads."""


def active_allocator(maps: str | None = None) -> str:
    """'tcmalloc' or 'jemalloc' when that library is mapped into this process (preloaded),
    else 'system'. `maps`: the text of /proc/self/maps (read when None; 'system' off Linux)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return SYSTEM
    for name in LIBRARIES:
        if f"/lib{name}" in maps:
            return name
    return SYSTEM


def find_library(name: str = "tcmalloc", dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """Path of the first installed library file for allocator `name`, None when none is."""
    for directory in dirs:
        for file in LIBRARIES[name]:
            path = Path(directory) / file
            if path.is_file():
                return str(path)
    return None


def preload_env(env: Mapping[str, str], library: str | None, platform: str = sys.platform
                ) -> dict[str, str] | None:
    """The environment to re-execute nvfree with under tcmalloc, or None to run as it is: off
    Linux, when `library` is None (not installed), when NVFREE_ALLOCATOR is set (the user's
    choice, or this is the re-executed process) or when LD_PRELOAD already names an allocator."""
    if platform != "linux" or library is None or env.get(ENV):
        return None
    preload = env.get("LD_PRELOAD", "")
    if any(f"lib{name}" in preload for name in LIBRARIES):
        return None
    return {**env, "LD_PRELOAD": f"{library}:{preload}" if preload else library,
            ENV: "tcmalloc"}


def reexec_under_tcmalloc(argv: list[str]) -> None:
    """Replace this process by `python -m estimator <argv>` with tcmalloc preloaded, where
    preload_env says so; return (and run as is) otherwise or if the exec fails."""
    env = preload_env(os.environ, find_library("tcmalloc"))
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, "-m", "estimator", *argv], env)
    except OSError:
        return
