"""Files a user hands nvfree, read safely: one place for "text decoded strictly, size and nesting
bounded, the kind of file checked", so that a plan, a model directory's JSON files, a checkpoint's
state or a data path never reach the code that uses them as a traceback or a hang.

Pure (no torch, no specs). Every failure is a ConfigError with one line naming the file.
"""

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from estimator.errors import ConfigError, SetupError

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (bytes): plans, configs and indexes are kilobytes to a few MB."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted (levels); real files use under 10."""


RANGES = {
    "--params": (1e3, 1e14), "--active-params": (1e3, 1e14), "--tokens": (1.0, 1e16),
    "--device-memory": (0.01, 1e6), "--global-batch": (1, 2**20),
    "--max-hours": (0.0, 1e9), "--max-cost": (0.0, 1e15), "--memory-limit": (0.001, 1e6),
    "--max-devices": (1, 2**20), "--top": (1, 10_000),
}
"""Ranges of the numbers users type (inclusive): --params and --active-params in parameters
(a thousand to a hundred trillion), --tokens in tokens, --device-memory in GiB per device,
--global-batch in sequences per optimizer step (DeepSeek-V3's pre-training batch was 15,360
sequences, arXiv:2412.19437 §4.2; 2^20 leaves ~70× beyond it and bounds plan's search);
the budgets --max-hours (hours) and --max-cost (USD) from 0, --memory-limit in GiB per device,
--max-devices as TrainSetup.num_devices, --top candidates kept in a plan."""

MAX_SEED = 2**32 - 1
"""Largest seed of a run (`nvfree train --seed`, a plan's seed): the trainer seeds the data
order with seed · 1,000,003 + epoch, in 64 bits."""


def checked(flag: str, value: float | None) -> float | None:
    """The one check of a typed number: finite and inside RANGES[flag], else one SetupError line
    naming the flag, the value and the range (no arithmetic on unchecked input)."""
    if value is None:
        return None
    lo, hi = RANGES[flag]
    try:
        ok = math.isfinite(value) and lo <= value <= hi
    except (TypeError, OverflowError):
        ok = False
    if not ok:
        shown = [f"{x:,}" if isinstance(x, int) else f"{x:g}" for x in (lo, hi)]
        raise SetupError(f"{flag} must be a finite number in [{shown[0]}, {shown[1]}], got "
                         f"{value!r}")
    return value


def json_depth(value: Any) -> int:
    """Levels of nested arrays/objects in a parsed JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(raw: bytes, where: str) -> Any:
    """JSON from bytes: strict UTF-8, nesting at most MAX_JSON_DEPTH; ConfigError otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") \
            from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ConfigError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json(path: Path, *, what: str = "", max_bytes: int = MAX_JSON_BYTES,
              expect_object: bool = True) -> Any:
    """A JSON file (an object unless expect_object=False), read with the bounds above.
    FileNotFoundError passes through (callers word "missing" themselves)."""
    path = Path(path)
    where = f"{what} {path}".strip()
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if info.st_size > max_bytes:
            raise ConfigError(f"{where}: {info.st_size:,} bytes, more than a JSON file of this "
                              f"kind can be ({max_bytes:,})")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({os.strerror(exc.errno or 0).lower()})") \
            from None
    value = parse_json(raw, where)
    if expect_object and not isinstance(value, dict):
        raise ConfigError(f"{where}: a JSON object is expected")
    return value


def check_data_path(path: Path, flag: str = "--data") -> Path:
    """A data path that exists and is a regular file or a directory (not a FIFO, device or
    socket, which would block or never end); ConfigError otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file or directory") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot be read ({os.strerror(exc.errno or 0).lower()})"
                          ) from None
    except ValueError:  # a NUL in the name
        raise ConfigError(f"{flag} {str(path)!r}: not a valid path") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or \
            stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise ConfigError(f"{flag} {path}: {kind}, not a text file or directory")
    return path


def decode_line(raw: bytes, where: str) -> str:
    """One line of a text file as strict UTF-8; ConfigError naming file:line otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None


def jsonl_object(raw: bytes, where: str) -> dict | None:
    """One JSONL line as an object (None for a blank line); ConfigError naming file:line."""
    line = decode_line(raw, where)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: not a JSON object")
    return record


def _hub_blobs(directory: Path) -> Path | None:
    """The blobs/ directory of a Hugging Face hub cache snapshot (models--*/snapshots/<rev>),
    which the snapshot's files are symlinks into; None for any other directory."""
    resolved = directory.resolve()
    blobs = resolved.parent.parent / "blobs"
    if resolved.parent.name == "snapshots" and blobs.is_dir():
        return blobs.resolve()
    return None


def model_file(directory: Path, name: object, what: str = "file") -> Path:
    """The file `name` of a model directory, refused (ConfigError) when the name is not a plain
    relative path or the file resolves outside the directory (symlinks followed; a hub cache
    snapshot may point into its repository's blobs/)."""
    directory = Path(directory)
    parts = Path(name).parts if isinstance(name, str) and name and "\0" not in name else ()
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ConfigError(f"{directory}: the {what} {name!r} is not a file name inside the "
                          "model directory")
    target = (directory / name).resolve()
    roots = [directory.resolve(), _hub_blobs(directory)]
    if not any(root is not None and target.is_relative_to(root) for root in roots):
        raise ConfigError(f"{directory}: the {what} {name} resolves outside the model "
                          f"directory ({target})")
    return directory / name
