"""The beam gate: a pure state machine from estimate and health to a beam decision.

The beam is enabled only while every condition holds: the operator has enabled it, the
required surrogate data are fresh, the estimate is valid, the beam interface is healthy,
the session log is being written, and the target (on the gated axis, predicted position)
is inside the amplitude window. Every condition that fails adds its reason code, so a hold
always says why. Time is passed in; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from motionctl.types import AXES, GateDecision, HoldReason, MotionEstimate


@dataclass(frozen=True, slots=True)
class GateHealth:
    """What the controller knows about the inputs at the moment of a decision."""

    operator_enabled: bool
    stale_devices: tuple[str, ...] = ()
    missing_devices: tuple[str, ...] = ()
    beam_fault: str | None = None
    log_failed: bool = False


class AmplitudeGate:
    """Amplitude gating on one target axis: window = centre +/- width/2 (mm)."""

    def __init__(self, axis: str, center_mm: float, window_mm: float):
        self._axis = AXES.index(axis)
        self.set_window(center_mm, window_mm)

    def set_window(self, center_mm: float, window_mm: float) -> None:
        if not (math.isfinite(center_mm) and math.isfinite(window_mm) and window_mm > 0):
            raise ValueError(f"gating window must be finite and > 0 mm, got {window_mm!r}")
        self.center_mm = center_mm
        self.window_mm = window_mm
        self.lower_mm = center_mm - window_mm / 2
        self.upper_mm = center_mm + window_mm / 2

    def inside(self, position_mm: float) -> bool:
        return self.lower_mm <= position_mm <= self.upper_mm

    def update(self, t: float, estimate: MotionEstimate | None, health: GateHealth) -> GateDecision:
        reasons: list[str] = []
        if not health.operator_enabled:
            reasons.append(HoldReason.OPERATOR_NOT_ENABLED)
        for device in health.missing_devices:
            reasons.append(f"{HoldReason.NO_DATA}:{device}")
        for device in health.stale_devices:
            reasons.append(f"{HoldReason.STALE_DATA}:{device}")
        if health.beam_fault is not None:
            reasons.append(f"{HoldReason.BEAM_INTERFACE_FAULT}:{health.beam_fault}")
        if health.log_failed:
            reasons.append(HoldReason.LOG_WRITE_FAILURE)
        if estimate is None:
            if not health.missing_devices:
                reasons.append(HoldReason.ESTIMATE_INVALID)
        elif not estimate.valid:
            reasons.append(HoldReason.ESTIMATE_INVALID)
        elif not self.inside(estimate.predicted_mm[self._axis]):
            reasons.append(HoldReason.OUTSIDE_WINDOW)
        return GateDecision(t, not reasons, tuple(str(r) for r in reasons))
