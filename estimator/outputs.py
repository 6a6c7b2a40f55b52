"""Where nvfree writes: checked before any work, and held by one run at a time.

Pure (no torch, no specs): `nvfree train` / `nvfree run` check their --output directory, the
planner its plan file, before a model is built or a search starts, so a read-only, full or
mistyped destination costs one line and no work.

- check_output_dir(path, flag): a directory (created if missing) this process can write into;
  ConfigError (one line) when it is a file, cannot be created, or refuses a probe file.
- check_free_space(path, need_bytes, what): ConfigError when the file system holding `path`
  has less free space than `need_bytes`.
- check_writable_file(path, flag, accept): a file path that can be (re)written: not a
  directory, its directory writable, and an existing file only if `accept(text)` says it may
  be replaced (a plan file over a plan file, not over someone's notes).
- OutputLock: an exclusive lock per output directory (flock on OUTPUT/.nvfree.lock, which
  holds the owner's PID and host); a second run gets ConfigError naming that PID.
  Re-entrant within a process; a launcher that holds it tells its torchrun workers through
  LOCK_ENV, so rank 0 of its own run does not wait for itself.
"""

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from estimator.errors import ConfigError

LOCK_FILE = ".nvfree.lock"
"""Name of the lock file inside an output directory."""
LOCK_ENV = "NVFREE_OUTPUT_LOCK"
"""Environment variable a launcher sets to the output directory whose lock it holds."""
_HELD: dict[Path, tuple[int, int]] = {}
"""Locks this process holds: resolved directory → (file descriptor, depth)."""


def _why(exc: OSError) -> str:
    """An OSError as a few words: 'read-only file system', 'permission denied' …"""
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def gib(num_bytes: int) -> str:
    """Bytes as GiB with two decimals, for messages."""
    return f"{num_bytes / 2**30:.2f} GiB"


def _kind(path: Path, flag: str) -> str | None:
    """'directory', 'file', 'other' or None (nothing there); ConfigError when the path cannot
    even be looked up (a name over the file system's limit, a component that is a file,
    permissions)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)[:80]}: cannot be used ({_why(exc)})") from None
    except ValueError:  # a NUL in the name (as inputs.check_data_path)
        raise ConfigError(f"{flag} {str(path)[:80]!r}: not a valid path") from None
    return "directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def check_output_dir(path: Path, flag: str = "--output") -> Path:
    """`path` as a directory this process can write into (created with its parents when
    missing); ConfigError naming the flag when it is a file or cannot be written."""
    path = Path(path)
    if _kind(path, flag) not in (None, "directory"):
        raise ConfigError(f"{flag} {path}: a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nvfree-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({_why(exc)})") from None
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(path: Path, need_bytes: int, what: str, flag: str = "--output") -> None:
    """ConfigError when `path`'s file system has less than `need_bytes` free (`what` names
    what needs them, e.g. 'one checkpoint')."""
    try:
        free = free_bytes(path)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read the free space ({_why(exc)})") from None
    if free < need_bytes:
        raise ConfigError(f"{flag} {path}: {gib(free)} free on its disk; {what} needs about "
                          f"{gib(need_bytes)} (free space or choose another {flag})")


def check_writable_file(path: Path, flag: str, accept: Callable[[bytes], bool] | None = None
                        ) -> Path:
    """`path` as a file that can be written: not a directory or special file, its directory
    creatable and writable, and an existing file replaced only when `accept(first bytes)`."""
    path = Path(path)
    kind = _kind(path, flag)
    if kind == "directory":
        raise ConfigError(f"{flag} {path}: a directory; give a file name")
    if kind is not None:
        if kind != "file":
            raise ConfigError(f"{flag} {path}: not a regular file")
        try:
            with path.open("rb") as f:
                head = f.read(4096)
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot read the existing file ({_why(exc)})") \
                from None
        if accept is not None and not accept(head):
            raise ConfigError(f"{flag} {path}: an existing file that is not one nvfree wrote; "
                              "choose another name or remove it")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(errors="replace").split()
    except OSError:
        return "another process"
    return f"PID {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else \
        "another process"


def _acquire(directory: Path) -> int:
    import fcntl

    lock_path = directory / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"--output {directory}: cannot create its lock file ({_why(exc)})") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"--output {directory} is in use by another nvfree run "
                              f"({_holder(lock_path)}); wait for it or choose another --output") \
                from None
        raise ConfigError(f"--output {directory}: cannot lock it ({_why(exc)})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def output_lock(directory: Path) -> Iterator[Path]:
    """Hold the exclusive lock of an output directory (which must exist) for the block.
    Re-entrant in one process; skipped where LOCK_ENV names this directory (the launcher that
    started this torchrun worker holds it)."""
    key = Path(directory).resolve()
    if os.environ.get(LOCK_ENV) == str(key):
        yield key
        return
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
    else:
        _HELD[key] = (_acquire(key), 1)
    try:
        yield key
    finally:
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
        else:
            del _HELD[key]
            os.close(fd)  # closing the last descriptor releases the flock


def lock_env(directory: Path) -> dict[str, str]:
    """The environment entry that tells child processes this process holds the lock."""
    return {LOCK_ENV: str(Path(directory).resolve())}
