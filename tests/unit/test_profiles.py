"""Profile store: round-trip, atomic save, rejection of corrupt / foreign / stale profiles."""

import json

import pytest

from estimator.errors import ProfileError
from estimator.hardware import fingerprint
from estimator.hardware.profiles import (
    cache_dir,
    find_profile,
    load_profile,
    lookup_profile,
    profile_path,
    save_profile,
)
from estimator.specs.calibration import CalibrationProfile, EfficiencyCurve
from estimator.specs.machine import MachineInfo

GIB = 1024**3


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFREE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def _machine(**overrides) -> MachineInfo:
    base = {
        "os": "Linux", "arch": "x86_64", "cpu_brand": "Test CPU", "cpu_vendor": "GenuineIntel",
        "num_physical_cores": 2, "num_logical_cores": 2, "num_usable_cores": 2,
        "isa": ("avx2", "fma"), "memory_total_bytes": 24 * GIB,
        "memory_available_bytes": 20 * GIB, "torch_version": "2.13.0+cpu",
    }
    base.update(overrides)
    return MachineInfo(**base)


def _profile(machine: MachineInfo, **overrides) -> CalibrationProfile:
    curve = EfficiencyCurve(op_class="matmul.fp32", unit="flops", log10_work=(6.0, 9.0),
                            rates=(1e9, 1e11), overhead_seconds=5e-6, num_samples=4)
    fields = {
        "fingerprint": fingerprint(machine), "torch_version": "2.13.0+cpu", "num_threads": 2,
        "backend": "cpu", "device_name": machine.cpu_brand, "created_at": "2026-11-27T20:00:00Z",
        "curves": {"matmul.fp32": curve},
    }
    fields.update(overrides)
    return CalibrationProfile(**fields)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path
    monkeypatch.delenv("NVFREE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "nvfree"


def test_round_trip():
    machine = _machine()
    profile = _profile(machine)
    path = save_profile(profile)
    assert path == profile_path(profile) and path.exists()
    assert load_profile(path) == profile
    assert find_profile(machine) == profile
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_no_profile_is_none_with_reason():
    assert find_profile(_machine()) is None
    assert "nvfree calibrate" in lookup_profile(_machine()).reason


@pytest.mark.parametrize("content", ["{not json", '{"schema_version": 1, "fingerprint": 3}', "[]"])
def test_corrupt_profile_is_rejected(content):
    machine = _machine()
    path = save_profile(_profile(machine))
    path.write_text(content)
    with pytest.raises(ProfileError, match="corrupt"):
        find_profile(machine)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_old_schema_is_rejected():
    machine = _machine()
    path = save_profile(_profile(machine))
    raw = json.loads(path.read_text())
    raw["schema_version"] = 0
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="schema version 0"):
        find_profile(machine)


def test_profile_from_another_machine_is_rejected():
    machine, other = _machine(), _machine(cpu_brand="Other CPU")
    path = save_profile(_profile(machine))
    foreign = _profile(other)
    # a file copied from another machine under this machine's name
    path.write_text(foreign.model_dump_json())
    with pytest.raises(ProfileError, match="another machine"):
        find_profile(machine)


def test_other_machines_profiles_are_ignored():
    save_profile(_profile(_machine(cpu_brand="Other CPU")))
    assert find_profile(_machine()) is None


def test_stale_torch_version_is_reported():
    machine = _machine()
    save_profile(_profile(machine, torch_version="2.12.0+cpu"))
    with pytest.raises(ProfileError, match=r"stale: measured with torch 2\.12\.0\+cpu"):
        find_profile(machine)


def test_no_torch_installed_still_uses_profile():
    machine = _machine()
    save_profile(_profile(machine))
    assert find_profile(machine.model_copy(update={"torch_version": None})) is not None


def test_thread_mismatch_is_reported(monkeypatch):
    machine = _machine()
    save_profile(_profile(machine))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(ProfileError, match="2 threads, training uses 1"):
        find_profile(machine)


def test_newest_valid_profile_wins():
    machine = _machine()
    save_profile(_profile(machine, torch_version="2.12.0+cpu"))
    good = _profile(machine)
    save_profile(good)
    assert find_profile(machine) == good


def test_profiles_are_keyed_by_allocator(monkeypatch):
    """A profile measured under tcmalloc has its own file; each process finds the one for the
    malloc it runs, and a profile for another malloc alone is reported."""
    import estimator.hardware.profiles as profiles

    machine = _machine()
    system, tcmalloc = _profile(machine), _profile(machine, allocator="tcmalloc")
    assert profile_path(system).name.endswith("-t2.json")
    assert profile_path(tcmalloc).name.endswith("-t2-tcmalloc.json")
    save_profile(tcmalloc)
    monkeypatch.setattr(profiles, "active_allocator", lambda: "system")
    with pytest.raises(ProfileError, match="under the tcmalloc malloc, this process runs system"):
        find_profile(machine)
    save_profile(system)
    assert find_profile(machine) == system
    monkeypatch.setattr(profiles, "active_allocator", lambda: "tcmalloc")
    assert find_profile(machine) == tcmalloc
