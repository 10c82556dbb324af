"""Typed samples, estimates and decisions that flow from the drivers through the core.

Units and frames: millimetres and seconds; positions in IEC 61217 patient coordinates,
ordered (LR, SI, AP) with x = LR (+left), y = SI (+superior), z = AP (+anterior).
Times named ``t_rx`` or ``t`` are on the controller's monotonic clock (seconds); ``t_device``
is the device's own timestamp as it sent it, kept for the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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
    surrogate_mm: float = math.nan  # the processed surrogate (breathing axis, inhale +)
    predicted_phase: float = math.nan  # the phase at t + horizon (phase + horizon / period)
    # False while the predictor is still learning (after the start, a gap or a divergence):
    # predicted_mm is then the current position, one system latency late.
    prediction_ready: bool = True


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
    reasons: tuple[str, ...] = ()

    @property
    def reason_text(self) -> str:
        return ",".join(self.reasons)


@dataclass(frozen=True, slots=True)
class ProjectionGeometry:
    """Where one X-ray projection was taken: a point source and a flat panel, in IEC 61217
    patient coordinates with the isocentre at the origin (mm).

    Pixel (i, j) -- column i, row j, pixel centres -- lies at
    ``panel_origin_mm + i * panel_u_mm + j * panel_v_mm``; ``panel_u_mm`` and ``panel_v_mm``
    are the steps of one pixel along a row and down a column (their length is the pixel
    pitch at the panel).
    """

    imager: str
    source_mm: tuple[float, float, float]
    panel_origin_mm: tuple[float, float, float]
    panel_u_mm: tuple[float, float, float]
    panel_v_mm: tuple[float, float, float]
    width_px: int
    height_px: int


@dataclass(frozen=True, slots=True)
class XrayFrame:
    """One kV projection image as received, with its geometry and acquisition time."""

    device: str
    frame_id: int  # the imaging system's frame counter; the two views of a stereo pair share it
    t_device: float  # mid-exposure acquisition time, device clock (s)
    t_rx: float
    image: Any  # numpy array (height_px, width_px), uint16
    geometry: ProjectionGeometry
    exposure_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SpirometerSample:
    """One breath-hold spirometer reading (Active Breathing Coordinator style), as received."""

    device: str
    seq: int
    t_device: float
    t_rx: float
    volume_l: float  # lung volume relative to the device's zero (end-exhale at calibration)
    flow_l_s: float  # + inhale
    valve_closed: bool  # the breath-hold valve is closed (patient holding)
    feedback_level: float  # the level shown to the patient on their feedback display, litres


@dataclass(frozen=True, slots=True)
class FiducialMeasurement:
    """The 3-D target position localised from one X-ray frame (stereo pair or single view),
    or the reason there is none. ``t_acq`` is the mid-exposure time on the controller's
    clock; a rejected frame has NaN position and never reaches a model."""

    device: str
    frame_id: int
    t_acq: float
    t_rx: float
    mode: str  # "stereo" or "mono"
    accepted: bool
    reason: str  # "" when accepted
    position_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    n_seeds: int
    residual_mm: float
    uncertainty_mm: float
