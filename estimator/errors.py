"""Typed errors a user can cause. Each message is one actionable line; the CLI maps every
NvfreeError to exit code 2 without a traceback."""


class NvfreeError(ValueError):
    """Base class of user-caused errors."""


class UnknownModelError(NvfreeError):
    """A model preset name that is not in the catalogue."""


class UnknownDeviceError(NvfreeError):
    """A device name that is not in the catalogue."""


class ConfigError(NvfreeError):
    """A config.json (or other input file) that is malformed or unsupported."""


class SetupError(NvfreeError):
    """An inconsistent or impossible training setup (bits, rank, active params …)."""


class ProfileError(NvfreeError):
    """A calibration profile that is corrupt, stale or from another machine."""


class MissingDependencyError(NvfreeError):
    """An optional dependency (an extra such as nvfree[trace]) that is not installed."""
