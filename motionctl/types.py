"""Typed samples, estimates and decisions that flow from the drivers through the core.

Units and frames: millimetres and seconds; positions in IEC 61217 patient coordinates,
ordered (LR, SI, AP) with x = LR (+left), y = SI (+superior), z = AP (+anterior).
Times named ``t_rx`` or ``t`` are on the controller's monotonic clock (seconds); ``t_device``
is the device's own timestamp as it sent it, kept for the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

AXES = ("LR", "SI", "AP")


@dataclass(frozen=True, slots=True)
class SurrogateSample:
    """One external-surrogate reading (surface or IR-marker point), as received."""

    device: str
    seq: int
    t_device: float
    t_rx: float
    position_mm: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something a driver noticed that is not a sample: connect, disconnect, malformed data."""

    device: str
    t: float
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MotionEstimate:
    """The tracker's estimate of the internal target at time ``t`` and ``horizon_s`` ahead."""

    t: float
    position_mm: tuple[float, float, float]
    predicted_mm: tuple[float, float, float]
    horizon_s: float
    valid: bool
    reasons: tuple[str, ...] = ()
    phase: float = math.nan  # breathing phase [0, 1), 0 = end-exhale
    amplitude_mm: float = math.nan  # recent peak-to-peak of the surrogate
    uncertainty_mm: float = math.nan  # 1-sigma 3-D uncertainty of predicted_mm
    model: str = "none"  # which correlation model produced it ("prior" before X-rays)


class HoldReason(StrEnum):
    """Why the gate holds the beam. Each code is logged and shown to the operator."""

    NO_DATA = "no_data"  # no surrogate sample received yet
    STALE_DATA = "stale_data"  # surrogate older than its device's timeout
    ESTIMATE_INVALID = "estimate_invalid"  # the tracker could not vouch for its estimate
    OUTSIDE_WINDOW = "outside_window"  # target outside the gating window
    OPERATOR_NOT_ENABLED = "operator_not_enabled"  # the operator has not enabled the beam
    BEAM_INTERFACE_FAULT = "beam_interface_fault"  # link to the linac's gating box in doubt
    LOG_WRITE_FAILURE = "log_write_failure"  # the session record is not being kept


@dataclass(frozen=True, slots=True)
class GateDecision:
    """The gate's output at time ``t``: beam enabled only when ``reasons`` is empty."""

    t: float
    beam_enabled: bool
    reasons: tuple[str, ...] = field(default=())

    @property
    def reason_text(self) -> str:
        return ",".join(self.reasons)
