"""The one resolver of a device name: 'local' (this machine, with its calibration profile) or
a catalogue key; --device-memory overrides."""

from __future__ import annotations

from estimator.errors import UnknownDeviceError
from estimator.hardware.cpu import cpu_device
from estimator.hardware.detect import detect
from estimator.hardware.match import accelerator_device
from estimator.specs.calibration import CalibrationProfile
from estimator.specs.device import Device
from estimator.specs.machine import MachineInfo
from estimator.units import GIB

CATALOGUE_NOTE = "catalogue device: uncalibrated"


def local_device(
    machine: MachineInfo | None = None, profile: CalibrationProfile | None = None
) -> Device:
    """The Device for this machine: its first accelerator if torch found one, else the CPU.

    With a CalibrationProfile of this machine the measured memory bandwidth (the `memory`
    curve's best rate) replaces the documented estimate.
    """
    machine = machine or detect()
    if machine.accelerators:
        return accelerator_device(machine.accelerators[0])
    return cpu_device(machine, profile)


def resolve_device(name: str = "local", *, use_profile: bool = True,
                   memory_gib: float | None = None
                   ) -> tuple[Device, CalibrationProfile | None, str]:
    """(Device, calibration profile or None, one line on where the numbers come from) for a
    device name: 'local' is this machine with its stored calibration profile (unless
    use_profile is False), anything else a catalogue key (uncalibrated). `memory_gib`
    replaces the device's memory (e.g. a CPU server's installed RAM)."""
    from estimator.catalog import load_device

    key = name.strip().lower()
    if key != "local":
        if key in ("cpu", "this", "here", "localhost"):
            raise UnknownDeviceError(f"unknown device '{name}': this machine is 'local' "
                                     "(see `nvfree devices` for the catalogue)")
        device, profile, note = load_device(key), None, CATALOGUE_NOTE
    else:
        from estimator.hardware.profiles import lookup_profile

        machine = detect()
        found = lookup_profile(machine) if use_profile else None
        profile = found.profile if found else None
        note = found.reason if found else "calibration profile not used (--no-profile)"
        device = local_device(machine, profile)
    if memory_gib is not None:
        from estimator.inputs import checked

        memory_gib = checked("--device-memory", memory_gib)
        device = device.model_copy(update={"memory_bytes": round(memory_gib * GIB)})
    return device, profile, note
