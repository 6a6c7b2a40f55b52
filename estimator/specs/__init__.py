"""Pydantic specs: the one vocabulary shared by the analytic model, planner and executor."""

from estimator.specs.calibration import (
    CALIBRATION_SCHEMA_VERSION,
    CalibrationProfile,
    EfficiencyCurve,
)
from estimator.specs.compare import Comparison, DeviceOption, FreeTier, SmallerModel
from estimator.specs.device import Device
from estimator.specs.estimate import (
    Advice,
    Estimate,
    MemoryBreakdown,
    OpTime,
    ParamCounts,
    Throughput,
    Verdict,
)
from estimator.specs.machine import AcceleratorInfo, MachineInfo
from estimator.specs.model import MLASpec, ModelSpec, MoESpec
from estimator.specs.run import RunReport, TermComparison
from estimator.specs.setup import LINEAR_TARGETS, TrainSetup

__all__ = [
    "CALIBRATION_SCHEMA_VERSION",
    "LINEAR_TARGETS",
    "AcceleratorInfo",
    "Advice",
    "CalibrationProfile",
    "Comparison",
    "Device",
    "DeviceOption",
    "EfficiencyCurve",
    "Estimate",
    "FreeTier",
    "MLASpec",
    "MachineInfo",
    "MemoryBreakdown",
    "MoESpec",
    "ModelSpec",
    "OpTime",
    "ParamCounts",
    "RunReport",
    "SmallerModel",
    "TermComparison",
    "Throughput",
    "TrainSetup",
    "Verdict",
]
