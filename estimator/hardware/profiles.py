"""The calibration profile store: JSON files in the user cache directory. Pure (no torch).

One file per machine fingerprint + backend + torch version + threads (+ allocator, when not
the system malloc: estimator/allocator.py):
`<cache>/profiles/<backend>-<fingerprint>-torch<version>-t<threads>[-<allocator>].json`, where
<cache> is `$NVFREE_CACHE_DIR`, else `$XDG_CACHE_HOME/nvfree`, else `~/.cache/nvfree`. Saving is
atomic (temporary file in the same directory + os.replace), so a crash never leaves half a
profile.

`find_profile(machine)` returns this machine's profile, None when there is none, and raises
ProfileError (one line) when the one there cannot be used: corrupt, written for another machine,
an old schema, measured with another torch version, thread count or allocator. `lookup_profile`
returns the same decision with its reason instead of raising, for reports that go on
uncalibrated.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from estimator.allocator import SYSTEM, active_allocator
from estimator.errors import ConfigError, ProfileError
from estimator.hardware.detect import fingerprint, training_threads
from estimator.inputs import read_json
from estimator.specs.calibration import (
    CALIBRATION_SCHEMA_VERSION,
    CalibrationProfile,
    ProfileQuality,
)
from estimator.specs.machine import MachineInfo

RECALIBRATE = "rerun `nvfree calibrate`"


def cache_dir() -> Path:
    """nvfree's cache directory: $NVFREE_CACHE_DIR, $XDG_CACHE_HOME/nvfree or ~/.cache/nvfree."""
    if os.environ.get("NVFREE_CACHE_DIR"):
        return Path(os.environ["NVFREE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nvfree"
    return Path.home() / ".cache" / "nvfree"


def profiles_dir() -> Path:
    """Directory holding the profile files."""
    return cache_dir() / "profiles"


def _safe(text: str) -> str:
    """File-name-safe version string ('2.13.0+cpu' → '2.13.0+cpu', '/' and spaces → '_')."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def profile_filename(fingerprint_: str, backend: str, torch_version: str, num_threads: int,
                     allocator: str = SYSTEM) -> str:
    """File name that keys a profile by backend, machine fingerprint, torch version, threads
    and (when not the system malloc) allocator."""
    suffix = "" if allocator == SYSTEM else f"-{_safe(allocator)}"
    return f"{backend}-{fingerprint_}-torch{_safe(torch_version)}-t{num_threads}{suffix}.json"


def profile_path(profile: CalibrationProfile) -> Path:
    """Where `profile` is (or would be) stored."""
    name = profile_filename(profile.fingerprint, profile.backend, profile.torch_version,
                            profile.num_threads, profile.allocator)
    return profiles_dir() / name


def save_profile(profile: CalibrationProfile) -> Path:
    """Write the profile atomically (temp file + fsync + rename); return its path."""
    path = profile_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(profile.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_profile(path: Path | str) -> CalibrationProfile:
    """Read and validate one profile file; ProfileError (one line) if unreadable or corrupt."""
    path = Path(path)
    try:  # size, UTF-8, nesting and kind of file bounded (inputs.read_json)
        raw = read_json(path, what="calibration profile", expect_object=False)
    except FileNotFoundError:
        raise ProfileError(f"no calibration profile at {path}; run `nvfree calibrate`") from None
    except ConfigError as exc:
        raise ProfileError(f"{exc} (corrupt); {RECALIBRATE}") from None
    if isinstance(raw, dict) and raw.get("schema_version") != CALIBRATION_SCHEMA_VERSION:
        raise ProfileError(
            f"calibration profile {path} has schema version {raw.get('schema_version')}, "
            f"this nvfree reads {CALIBRATION_SCHEMA_VERSION}; {RECALIBRATE}"
        )
    try:
        return CalibrationProfile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise ProfileError(
            f"calibration profile {path} is corrupt ({where}: {first['msg']}); {RECALIBRATE}"
        ) from None


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def validate_profile(
    profile: CalibrationProfile,
    machine: MachineInfo,
    *,
    backend: str = "cpu",
    num_threads: int | None = None,
) -> None:
    """Raise ProfileError if the profile does not describe this machine, backend, installed torch
    version and thread count. A missing torch (estimate-only install) does not make it stale."""
    expected = fingerprint(machine, backend)
    if profile.fingerprint != expected:
        raise ProfileError(
            f"calibration profile {profile.profile_id} was measured on another machine "
            f"(fingerprint {profile.fingerprint[:12]}, this one {expected[:12]}); {RECALIBRATE}"
        )
    if profile.backend != backend:
        raise ProfileError(
            f"calibration profile {profile.profile_id} is for backend {profile.backend}, "
            f"not {backend}; run `nvfree calibrate --device {backend}`"
        )
    if machine.torch_version is not None and profile.torch_version != machine.torch_version:
        raise ProfileError(
            f"calibration profile is stale: measured with torch {profile.torch_version}, "
            f"torch {machine.torch_version} is installed; {RECALIBRATE}"
        )
    threads = num_threads if num_threads is not None else training_threads(machine)
    if profile.num_threads != threads:
        raise ProfileError(
            f"calibration profile was measured with {profile.num_threads} threads, training "
            f"uses {threads}; {RECALIBRATE} (or set OMP_NUM_THREADS={profile.num_threads})"
        )
    allocator = active_allocator() if backend == "cpu" else profile.allocator
    if profile.allocator != allocator:
        raise ProfileError(
            f"calibration profile was measured under the {profile.allocator} malloc, this "
            f"process runs {allocator}; {RECALIBRATE}"
        )


@dataclass(frozen=True)
class ProfileLookup:
    """Outcome of looking for this machine's profile: the profile (or None) and why."""

    profile: CalibrationProfile | None
    """The usable profile, or None."""
    path: Path | None
    """File the decision is about (None when no file was found)."""
    reason: str
    """One line: which profile is used, or why none is."""


def lookup_profile(
    machine: MachineInfo, backend: str = "cpu", num_threads: int | None = None
) -> ProfileLookup:
    """Find the newest usable profile for this machine; never raises for a bad profile."""
    fp = fingerprint(machine, backend)
    candidates = sorted(
        profiles_dir().glob(f"{backend}-{fp}-*.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not candidates:
        return ProfileLookup(None, None, f"no calibration profile for this machine ({backend}); "
                             "run `nvfree calibrate` to measure it")
    errors: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            profile = load_profile(path)
            validate_profile(profile, machine, backend=backend, num_threads=num_threads)
        except ProfileError as exc:
            errors.append((path, str(exc)))
            continue
        return ProfileLookup(profile, path, f"calibrated: profile {path.name} "
                             f"({'quick, ' if profile.quick else ''}{profile.created_at})")
    path, reason = errors[0]
    return ProfileLookup(None, path, reason)


def find_profile(
    machine: MachineInfo, backend: str = "cpu", num_threads: int | None = None
) -> CalibrationProfile | None:
    """This machine's newest usable profile; None if it has none; ProfileError (one line, the
    newest file's problem) if every one there is corrupt, foreign, stale or for other threads."""
    found = lookup_profile(machine, backend, num_threads)
    if found.profile is None and found.path is not None:
        raise ProfileError(found.reason)
    return found.profile


def quality_note(quality: ProfileQuality) -> str:
    """One line: how trustworthy a profile with this quality is."""
    share = f"other processes used {quality.mean_others_fraction:.0%} of the CPUs on average"
    if quality.level == "quiet":
        return (f"calibration quiet: none of its {quality.num_points} timings was disturbed by "
                "other processes")
    if quality.level == "merged":
        return (f"calibration quiet after merging: {quality.num_from_previous} of "
                f"{quality.num_points} timings kept from the previous calibration because this "
                f"run's were disturbed ({share})")
    return (f"calibration DISTURBED: {quality.num_disturbed} of {quality.num_points} timings "
            f"were slowed by other processes ({share}); step times may be too long — rerun "
            "`nvfree calibrate` on a quiet machine")


def profile_quality_note(profile: CalibrationProfile | None) -> str | None:
    """The line an estimate states about its profile's trustworthiness; None without a
    profile. Profiles stored before disturbance checks say that their quality is unknown."""
    if profile is None:
        return None
    if profile.quality is None:
        return ("calibration quality unknown (profile stored before disturbance checks); "
                "rerun `nvfree calibrate` on a quiet machine to check it")
    return profile.quality.note or quality_note(profile.quality)
