"""The beam gate: a pure state machine from estimate, interlocks and operator to a decision.

Gating modes (``GateSettings.mode``):

- ``amplitude``: the target (the position predicted one system latency ahead, or the
  current surrogate if ``source = "surrogate"``) on one axis inside centre +/- width/2;
- ``phase``: the breathing phase inside ``phase_window`` ([start, end), wrapping through
  0 = end-exhale, e.g. [0.8, 0.2] gates around end-exhale); with ``source = "predicted"``
  the phase one horizon ahead (the current phase plus horizon / period: without it the
  beam follows the window a system latency late), with ``"surrogate"`` the phase now;
- ``breath_hold``: the held level (spirometer volume, or the predicted position on the
  axis) within a tolerance of the reference the operator captured at the start of the
  hold, and stable there for ``min_stable_s`` before the beam may come on.

Where the gate uses the predicted position (amplitude with ``source = "predicted"``,
breath-hold on position) it holds with ``prediction_learning`` while the predictor is still
learning the breathing (after the start, a gap or a divergence): its output is then the
current position, a system latency late, and a beam gated on it would lag every window edge
(``hold_while_prediction_learns = false`` gates on it all the same).

The beam is enabled only while the operator has enabled it, no interlock is active, and
the window condition holds. Debounce is asymmetric: the beam goes off at once, and on only
after ``debounce_samples`` consecutive samples in the window. The transitions are the
explicit table ``TRANSITIONS``. Every decision carries the reasons for a hold.

The dwell rule (as KIM-guided liver treatments use): ``DwellMonitor`` says when the target
has been more than ``dwell_mm`` off the window centre for longer than ``dwell_s``; the
controller raises it as an interlock that needs the operator's acknowledgement.

Pure and clock-injected: no clock reads, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from motionctl.types import AXES, GateDecision, MotionEstimate


class GateState(StrEnum):
    HOLD = "hold"
    ARMING = "arming"  # in the window, counting samples before the beam may come on
    BEAM_ON = "beam_on"


# (state, every condition holds) -> next state. ARMING -> BEAM_ON happens when the count of
# consecutive good samples reaches the debounce; that count is the table's only memory.
TRANSITIONS: dict[tuple[GateState, bool], GateState] = {
    (GateState.HOLD, False): GateState.HOLD,
    (GateState.HOLD, True): GateState.ARMING,
    (GateState.ARMING, False): GateState.HOLD,
    (GateState.ARMING, True): GateState.ARMING,  # -> BEAM_ON once the count is reached
    (GateState.BEAM_ON, False): GateState.HOLD,
    (GateState.BEAM_ON, True): GateState.BEAM_ON,
}

MODES = ("amplitude", "phase", "breath_hold")


@dataclass(frozen=True)
class GateSettings:
    mode: str = "amplitude"
    source: str = "predicted"  # amplitude mode: "predicted" internal position or "surrogate"
    axis: str = "SI"
    center_mm: float = -2.0
    window_mm: float = 5.0
    phase_window: tuple[float, float] = (0.8, 0.2)
    breath_hold_signal: str = "volume"  # "volume" (spirometer) or "position"
    breath_hold_tolerance_l: float = 0.1
    breath_hold_tolerance_mm: float = 2.0
    min_stable_s: float = 1.0
    debounce_samples: int = 1
    hold_while_prediction_learns: bool = True
    dwell_mm: float = 0.0  # 0 = dwell rule off
    dwell_s: float = 5.0


@dataclass(frozen=True, slots=True)
class GateInputs:
    estimate: MotionEstimate | None
    interlocks: tuple[str, ...] = ()
    operator_enabled: bool = False
    volume_l: float = math.nan  # latest breath-hold spirometer volume


class Gate:
    def __init__(self, settings: GateSettings):
        if settings.mode not in MODES:
            raise ValueError(f"gating mode {settings.mode!r}: expected one of {MODES}")
        self.settings = settings
        self._axis = AXES.index(settings.axis)
        self.set_window(settings.center_mm, settings.window_mm)
        self.state = GateState.HOLD
        self._good_count = 0
        self.reference: float | None = None  # breath-hold reference level
        self._stable_since: float | None = None

    # -- operator settings (the controller validates and logs them) -----------------------
    def set_window(self, center_mm: float, window_mm: float) -> None:
        if not (math.isfinite(center_mm) and math.isfinite(window_mm) and window_mm > 0):
            raise ValueError(f"gating window must be finite and > 0 mm, got {window_mm!r}")
        self.center_mm = center_mm
        self.window_mm = window_mm
        self.lower_mm = center_mm - window_mm / 2
        self.upper_mm = center_mm + window_mm / 2

    def capture_reference(self, value: float) -> None:
        """Breath-hold reference: the level (litres or mm) the patient should hold."""
        if not math.isfinite(value):
            raise ValueError(f"breath-hold reference must be finite, got {value!r}")
        self.reference = value
        self._stable_since = None

    def breath_hold_level(self, inputs: GateInputs) -> float:
        if self.settings.breath_hold_signal == "volume":
            return inputs.volume_l
        est = inputs.estimate
        return est.predicted_mm[self._axis] if est is not None else math.nan

    def inside(self, position_mm: float) -> bool:
        return self.lower_mm <= position_mm <= self.upper_mm

    # -- the decision ---------------------------------------------------------------------
    def update(self, t: float, inputs: GateInputs, new_sample: bool = True) -> GateDecision:
        """The decision at ``t``. Debounce counts new samples only, each taken while every
        condition holds: a re-evaluation between samples (an event, a deadline, an
        interlock clearing) can end the count but never add to it, so a sample received
        while something was wrong never counts towards beam-on."""
        reasons: list[str] = []
        if not inputs.operator_enabled:
            reasons.append("operator_not_enabled")
        reasons.extend(inputs.interlocks)
        window_reason = self._window_reason(t, inputs)
        if window_reason is not None and window_reason not in reasons:
            reasons.append(window_reason)
        ok = not reasons
        state = TRANSITIONS[(self.state, ok)]
        if state is GateState.ARMING:
            self._good_count += 1 if new_sample else 0
            if self._good_count >= self.settings.debounce_samples:
                state = GateState.BEAM_ON
            else:
                reasons.append("debounce")
        elif state is GateState.HOLD:
            self._good_count = 0
        self.state = state
        return GateDecision(t, state is GateState.BEAM_ON, tuple(reasons))

    def _window_reason(self, t: float, inputs: GateInputs) -> str | None:
        mode = self.settings.mode
        est = inputs.estimate
        if mode == "breath_hold":
            return self._breath_hold_reason(t, inputs)
        if est is None or not est.valid:
            return "estimate_invalid"
        if mode == "phase":
            start, end = self.settings.phase_window
            # as in amplitude mode: where the breath will be when the beam responds
            phase = est.predicted_phase if self.settings.source == "predicted" else est.phase
            if not math.isfinite(phase):
                return "phase_unknown"
            inside = start <= phase < end if start <= end else (phase >= start or phase < end)
            return None if inside else "outside_phase_window"
        if self.settings.source == "surrogate":
            value = est.surrogate_mm
        elif self._waiting_for_prediction(est):
            return "prediction_learning"
        else:
            value = est.predicted_mm[self._axis]
        return None if self.inside(value) else "outside_window"

    def _waiting_for_prediction(self, est: MotionEstimate | None) -> bool:
        """Hold while the predictor learns: its output is the current position until then."""
        return (
            self.settings.hold_while_prediction_learns
            and est is not None
            and not est.prediction_ready
        )

    def _breath_hold_reason(self, t: float, inputs: GateInputs) -> str | None:
        if self.reference is None:
            return "no_breath_hold_reference"
        level = self.breath_hold_level(inputs)
        if self.settings.breath_hold_signal == "position" and self._waiting_for_prediction(
            inputs.estimate
        ):
            self._stable_since = None
            return "prediction_learning"
        if not math.isfinite(level):
            self._stable_since = None  # an unknown level is not a stable one
            return "breath_hold_level_unknown"
        tolerance = (
            self.settings.breath_hold_tolerance_l
            if self.settings.breath_hold_signal == "volume"
            else self.settings.breath_hold_tolerance_mm
        )
        if abs(level - self.reference) > tolerance:
            self._stable_since = None
            return "outside_breath_hold_tolerance"
        if self._stable_since is None:
            self._stable_since = t
        if t - self._stable_since < self.settings.min_stable_s:
            return "breath_hold_not_stable"
        return None


class DwellMonitor:
    """True once the target has been more than ``dwell_mm`` off the window centre (on the
    gated axis) for longer than ``dwell_s``; off when ``dwell_mm`` is 0."""

    def __init__(self, axis: str, dwell_mm: float, dwell_s: float):
        self._axis = AXES.index(axis)
        self.dwell_mm, self.dwell_s = dwell_mm, dwell_s
        self._off_since: float | None = None

    def update(self, t: float, estimate: MotionEstimate | None, center_mm: float) -> bool:
        if self.dwell_mm <= 0 or estimate is None or not estimate.valid:
            return False
        off = abs(estimate.position_mm[self._axis] - center_mm) > self.dwell_mm
        if not off:
            self._off_since = None
            return False
        if self._off_since is None:
            self._off_since = t
        return t - self._off_since > self.dwell_s
