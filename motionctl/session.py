"""The session core: everything between the drivers and the beam, pure and in session time.

``SessionCore`` holds the estimator, the gate, the dwell rule, the interlock monitor and the
operator's settings. The live controller feeds it what the drivers deliver (with times
converted to session seconds), asks it for a decision, and carries the decision to the
beam; log replay feeds it the same inputs from a session log. Because the core reads no
clock and does no I/O, both runs make identical decisions.

Everything the core consumes or concludes is recorded through ``record(table, row)``:
samples, estimates, interlock changes, operator actions and the beam interface's fault
state. Gate decisions are recorded by the caller, which alone knows when the beam command
went out (the decision latency).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from motionctl.correlation import CorrelationModel
from motionctl.estimator import MotionEstimator
from motionctl.gating import DwellMonitor, Gate, GateInputs
from motionctl.interlocks import InterlockMonitor
from motionctl.settings import (
    correlation_params,
    estimator_settings,
    gate_settings,
    interlock_specs,
)
from motionctl.types import (
    DeviceEvent,
    FiducialMeasurement,
    GateDecision,
    MotionEstimate,
    SpirometerSample,
    SurrogateSample,
)

Record = Callable[[str, tuple], None]

# Estimate reasons that are interlocks of their own (the rest: estimate_invalid).
_ESTIMATE_INTERLOCKS = {
    "surrogate_not_finite": "not_finite",
    "surrogate_out_of_range": "out_of_range",
    "surrogate_jump": "out_of_range",
    "target_out_of_range": "out_of_range",
    "time_not_finite": "not_finite",
    "predictor_diverged": "predictor_diverged",
    "correlation_model_invalid": "correlation_model_invalid",
    "fiducial_disagreement": "fiducial_disagreement",
}
_PER_SAMPLE_INTERLOCKS = sorted(set(_ESTIMATE_INTERLOCKS.values()) | {"estimate_invalid"})
_DEVICE_SUBJECT = ("not_finite", "out_of_range")

# How far a device's clock may move against ours before its timestamps are distrusted
# (transport jitter is milliseconds; a stepped or skewed device clock is much more).
CLOCK_SKEW_TOLERANCE_S = 0.25

OPERATOR_COMMANDS = (
    "enable",
    "disable",
    "window",
    "hold",
    "release",
    "acknowledge",
    "capture_reference",
)


# What an X-ray position whose time cannot be trusted was used for (the model_point event).
UNTIMED_REASON = (
    "time not trusted: checked against the model's range and the recent estimates, "
    "not a model point"
)


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    """enable, disable, hold, release, window (value = (centre, width) mm), acknowledge
    (value = interlock key), capture_reference."""

    kind: str
    value: Any = None
    who: str = "operator"


@dataclass
class SessionStatus:
    """The latest state, for the status line and the console: replaced field by field by the
    one thread that drives the core, read (never written) by others."""

    t: float = 0.0
    decision: GateDecision | None = None
    estimate: MotionEstimate | None = None
    operator_enabled: bool = False
    interlocks: tuple[str, ...] = ()
    awaiting_ack: tuple[str, ...] = ()
    samples: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    connected: dict[str, bool] = field(default_factory=dict)
    last_rx: dict[str, float] = field(default_factory=dict)
    last_refusal: str = ""  # why the last operator command was refused
    valve_closed: bool = False  # the breath-hold spirometer's valve
    volume_l: float = math.nan  # its latest volume
    beam_fault: str | None = None


class SessionCore:
    def __init__(self, cfg: dict[str, Any], record: Record, *, stale_timeout_s: dict[str, float]):
        """``stale_timeout_s``: the required devices and how long each may stay silent."""
        self.cfg = cfg
        self._record = record
        self.surrogate_device = cfg["tracking"]["surrogate_device"]
        self.stale_timeout_s = dict(stale_timeout_s)
        xray = cfg["devices"].get("xray", {})
        if xray.get("enabled") and xray.get("stale_timeout_s", 0.0) > 0:
            # No accepted X-ray image for this long holds (freshness from on_fiducial).
            self.stale_timeout_s.setdefault("xray", xray["stale_timeout_s"])
        self.estimator = MotionEstimator(
            estimator_settings(cfg), CorrelationModel(correlation_params(cfg))
        )
        settings = gate_settings(cfg)
        self.gate = Gate(settings)
        self.dwell = DwellMonitor(settings.axis, settings.dwell_mm, settings.dwell_s)
        self.interlocks = InterlockMonitor(specs=interlock_specs(cfg))
        self._per_sample_keys = tuple(
            (code, self.surrogate_device if code in _DEVICE_SUBJECT else None)
            for code in _PER_SAMPLE_INTERLOCKS
        )
        self._per_sample_key_set = {InterlockMonitor.key(c, d) for c, d in self._per_sample_keys}
        self._max_window_mm = cfg["gating"]["max_window_mm"]
        self.status = SessionStatus()
        self._estimate: MotionEstimate | None = None
        self._last_t_device: dict[str, float] = {}
        self._inputs_seen: set[str] = set()  # devices that have delivered an input
        self._clock_offset: dict[str, float] = {}  # device clock - session clock, per device
        self._last_decision: GateDecision | None = None
        # X-ray positions wait here until the surrogate history covers their acquisition
        # time (a model point must never use a surrogate sample from after the image).
        self._pending_fiducials: list[FiducialMeasurement] = []
        self.last_fiducial: FiducialMeasurement | None = None

    # -- inputs ---------------------------------------------------------------------------
    def on_surrogate(self, sample: SurrogateSample) -> None:
        """A surrogate sample, ``t_rx`` in session time."""
        self._count(sample.device, sample.t_rx)
        x, y, z = sample.position_mm
        self._record("samples", (sample.device, sample.seq, sample.t_rx, sample.t_device, x, y, z))
        self._check_device_clock(sample.device, sample.t_rx, sample.t_device)
        if sample.device != self.surrogate_device:
            return
        estimate = self.estimator.step(sample)
        self._estimate = estimate
        self.status.estimate = estimate
        p, q = estimate.position_mm, estimate.predicted_mm
        self._record(
            "estimates",
            (
                estimate.t,
                *p,
                *q,
                estimate.horizon_s,
                int(estimate.valid),
                ",".join(estimate.reasons),
                estimate.phase,
                estimate.amplitude_mm,
                estimate.uncertainty_mm,
                estimate.model,
                estimate.surrogate_mm,
            ),
        )
        self._report_estimate(sample.t_rx, estimate)
        if self._pending_fiducials:
            self._apply_fiducials(sample.t_rx)

    def on_fiducial(self, measurement: FiducialMeasurement) -> None:
        """A localised X-ray frame, times in session seconds (``t_rx`` received, ``t_acq``
        mid-exposure). Accepted positions become model points and checks of the estimate
        once the surrogate history covers ``t_acq``; rejected frames are only recorded."""
        m = measurement
        self.last_fiducial = m
        self._record(
            "fiducials",
            (
                m.device,
                m.frame_id,
                m.t_rx,
                m.t_acq,
                m.mode,
                int(m.accepted),
                m.reason,
                *m.position_mm,
                *m.rotation_deg,
                m.n_seeds,
                m.residual_mm,
                m.uncertainty_mm,
            ),
        )
        # The imager's clock (mid-exposure) against ours, as for every device. An image is
        # fresh data (the X-ray stale timeout) and a model point only if it was localised
        # and its time can be trusted: a stepped or reordered time would check the estimate,
        # and fit the model, at the wrong moment of the breath.
        trusted = self._check_device_clock(m.device, m.t_rx, m.t_acq)
        if m.accepted and trusted:
            self._count(m.device, m.t_rx)
            # Bounded: if the surrogate stops for good, old images are of no use anyway.
            self._pending_fiducials = [*self._pending_fiducials[-9:], m]
            self._apply_fiducials(m.t_rx)
        elif m.accepted:
            # Still a look at the target: checked against where it could be at any moment
            # of the breath (a target far from all of that holds whenever it was imaged).
            self.estimator.check_untimed(m.position_mm)
            self._report_fiducial_check(m.t_rx, m, None)

    def _apply_fiducials(self, t: float) -> None:
        history = self.estimator.history
        waiting = []
        for m in self._pending_fiducials:
            if not (history.t_newest >= m.t_acq):  # also while the history is empty
                waiting.append(m)
                continue
            result = self.estimator.add_fiducial(m.t_acq, m.position_mm)
            self._report_fiducial_check(t, m, result)
        self._pending_fiducials = waiting

    def _report_fiducial_check(self, t: float, m: FiducialMeasurement, result) -> None:
        """Record what an X-ray position did (``result`` None: checked without a time, not a
        model point) and hold now, not at the next surrogate sample: raise what the next
        estimate will carry (its per-sample report clears them as before)."""
        estimator = self.estimator
        detail = {
            "frame_id": m.frame_id,
            "t_acq": m.t_acq,
            "residual_mm": None if result is None else result.residual_mm,
            "estimate_miss_mm": estimator.last_check_mm,
            "accepted": False if result is None else result.accepted,
            "model_valid": estimator.correlation.valid,
            "model": estimator.correlation.kind,
            "reason": UNTIMED_REASON if result is None else result.reason,
        }
        self._record("events", (t, "correlation", "model_point", json.dumps(detail)))
        if estimator.correlation.state == "rebuilding":
            self._interlock(t, "correlation_model_invalid", None, True, "correlation_model_invalid")
        if estimator.fiducial_reason == "fiducial_disagreement":
            self._interlock(t, "fiducial_disagreement", None, True, "fiducial_disagreement")

    def on_spirometer(self, sample: SpirometerSample) -> None:
        self._count(sample.device, sample.t_rx)
        self.status.volume_l = sample.volume_l
        self.status.valve_closed = sample.valve_closed
        self._record(
            "spirometer_samples",
            (
                sample.device,
                sample.seq,
                sample.t_rx,
                sample.t_device,
                sample.volume_l,
                sample.flow_l_s,
                int(sample.valve_closed),
                sample.feedback_level,
            ),
        )
        self._check_device_clock(sample.device, sample.t_rx, sample.t_device)

    def on_device_event(self, event: DeviceEvent) -> None:
        """A driver's event, ``t`` in session time."""
        t = event.t
        if event.kind == "malformed":
            self.status.malformed[event.device] = self.status.malformed.get(event.device, 0) + 1
            # Present until the device's next well-formed input (``_check_device_clock``),
            # then the clean period: an imager at 1 Hz must show a good image before the
            # beam returns, not merely 0.2 s without another bad one. A device whose inputs
            # the core never sees (the gating box) has no next input: momentary.
            self._interlock(t, "malformed_data", event.device, True, event.detail)
            if event.device not in self._inputs_seen:
                self._interlock(t, "malformed_data", event.device, False)
        elif event.kind in ("connected", "disconnected", "port_error"):
            up = event.kind == "connected"
            self.status.connected[event.device] = up
            self._interlock(t, "disconnected", event.device, not up, event.detail)
        elif event.device == "session_log" and event.kind == "write_failure":
            self._interlock(t, "log_write_failure", None, True, event.detail)
        self._record("events", (t, event.device, event.kind, event.detail))

    def set_beam_fault(self, t: float, fault: str | None) -> None:
        """The beam interface's fault state as the driver reports it at time ``t``."""
        if fault != self.status.beam_fault:
            self.status.beam_fault = fault
            self._record("events", (t, "beam", "fault", fault or ""))
        # Reporting the absence of a fault that is neither present nor holding changes
        # nothing: skip it (this runs before every decision).
        if fault is not None or "beam_interface" in self.interlocks.live:
            self._interlock(t, "beam_interface", None, fault is not None, fault or "")

    def on_command(self, t: float, command: OperatorCommand) -> str:
        """An operator action; returns why it was refused ("" if carried out)."""
        refusal = ""
        old: Any = None
        if command.kind in ("enable", "disable"):
            old = self.status.operator_enabled
            self.status.operator_enabled = command.kind == "enable"
        elif command.kind == "window":
            old = (self.gate.center_mm, self.gate.window_mm)
            refusal = self.window_refusal(command.value)
            if not refusal:
                self.gate.set_window(*command.value)
        elif command.kind == "hold":
            self._interlock(t, "operator_hold", None, True, command.who)
        elif command.kind == "release":
            self._interlock(t, "operator_hold", None, False)
            _, refusal = self.interlocks.acknowledge(t, "operator_hold")
        elif command.kind == "acknowledge":
            _, refusal = self.interlocks.acknowledge(t, str(command.value))
            if not refusal:
                self._record("events", (t, "interlock", "acknowledged", str(command.value)))
        elif command.kind == "capture_reference":
            level = self.gate.breath_hold_level(self._inputs())
            old = self.gate.reference
            try:
                self.gate.capture_reference(level)
            except ValueError as exc:
                refusal = str(exc)
        else:
            refusal = f"unknown operator command {command.kind!r}"
        self.status.last_refusal = refusal
        detail = {"who": command.who, "value": command.value, "old": old}
        if command.kind == "capture_reference":
            detail["reference"] = self.gate.reference
        if refusal:
            detail["refused"] = refusal
        self._record("events", (t, "operator", command.kind, json.dumps(detail)))
        return refusal

    def set_horizon(self, t: float, horizon_s: float, measured: dict[str, Any]) -> None:
        """Predict ``horizon_s`` ahead from now on (the horizon following the measured
        latency, ``motionctl.latency``); recorded, with what it was made of, for replay."""
        old = self.estimator.s.horizon_s
        self.estimator.set_horizon(horizon_s)
        detail = {"horizon_s": horizon_s, "old": old, "measured": measured}
        self._record("events", (t, "tracking", "horizon", json.dumps(detail)))

    def window_refusal(self, value: Any) -> str:
        """Why a gating window (centre, width) cannot be used; "" if it can."""
        try:
            center, width = value
        except (TypeError, ValueError):
            return "a window is a centre and a width, in mm"
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return "window values must be numbers"
        if not (math.isfinite(center) and math.isfinite(width)):
            return "window values must be finite"
        if width <= 0:
            return f"window width {width} mm must be positive"
        if width > self._max_window_mm:
            return f"window width {width} mm exceeds the configured maximum {self._max_window_mm}"
        if abs(center) > 50.0:
            return f"window centre {center} mm is outside physical limits (+/-50 mm)"
        return ""

    # -- the decision ---------------------------------------------------------------------
    def decide(self, t: float, new_sample: bool) -> GateDecision | None:
        """The gate's decision at session time ``t``; None when this was not a new sample and
        nothing changed (a deadline wake-up with nothing to report)."""
        self._check_freshness(t)
        decision = self.gate.update(t, self._inputs(), new_sample=new_sample)
        self.status.interlocks = self.interlocks.active()
        self.status.awaiting_ack = self.interlocks.awaiting_ack()
        last = self._last_decision
        if (
            not new_sample
            and last is not None
            and (decision.beam_enabled == last.beam_enabled and decision.reasons == last.reasons)
        ):
            return None
        self._last_decision = decision
        self.status.decision = decision
        self.status.t = t
        return decision

    def next_deadline(self, t: float) -> float:
        """When silence would next change a decision (a device going stale), session time."""
        soonest = math.inf
        for device, timeout in self.stale_timeout_s.items():
            last = self.status.last_rx.get(device)
            if last is None:
                soonest = min(soonest, t + 0.1)
            elif last + timeout > t:
                soonest = min(soonest, last + timeout)
        return soonest

    # -- internals --------------------------------------------------------------------------
    def _inputs(self) -> GateInputs:
        return GateInputs(
            estimate=self._estimate,
            interlocks=self.interlocks.active(),
            operator_enabled=self.status.operator_enabled,
            volume_l=self.status.volume_l,
        )

    def _count(self, device: str, t: float) -> None:
        st = self.status
        st.samples[device] = st.samples.get(device, 0) + 1
        st.last_rx[device] = t

    def _check_device_clock(self, device: str, t: float, t_device: float) -> bool:
        # A device clock that goes back, or jumps away from ours, means its timestamps (and
        # maybe its data) cannot be trusted. Returns whether this timestamp can be.
        live = self.interlocks.live
        self._inputs_seen.add(device)
        if live and f"malformed_data:{device}" in live:  # well-formed: the clean period starts
            self._interlock(t, "malformed_data", device, False)
        if not math.isfinite(t_device):
            # No time at all: distrusted, and kept out of the clock references (a NaN offset
            # would switch the skew check off for good).
            self._interlock(t, "clock_skew", device, True, "device time not finite")
            return False
        last = self._last_t_device.get(device)
        # A repeated time is a re-sent frame (a stuck device): not fresh, not to be trusted.
        backwards = last is not None and t_device <= last
        if backwards:
            detail = f"device time {t_device:.3f} after {last:.3f}"
            self._interlock(t, "clock_backwards", device, True, detail)
        elif f"clock_backwards:{device}" in live:
            self._interlock(t, "clock_backwards", device, False)
        self._last_t_device[device] = t_device
        offset = t_device - t
        reference = self._clock_offset.get(device)
        if reference is None:
            self._clock_offset[device] = offset
            return not backwards
        skew = offset - reference
        skewed = abs(skew) > CLOCK_SKEW_TOLERANCE_S
        if not skewed:
            # Follow the slow drift between the two clocks; a step never moves the reference.
            self._clock_offset[device] = reference + 0.01 * skew
        if skewed:
            self._interlock(t, "clock_skew", device, True, f"device clock {skew:+.3f} s off")
        elif f"clock_skew:{device}" in live:
            self._interlock(t, "clock_skew", device, False)
        return not (backwards or skewed)

    def _report_estimate(self, t: float, estimate: MotionEstimate) -> None:
        present: dict[str, str] = {}
        for reason in estimate.reasons:
            code = _ESTIMATE_INTERLOCKS.get(reason)
            if code is not None:
                present[code] = reason
        if not estimate.valid and not present:
            present["estimate_invalid"] = ",".join(estimate.reasons)
        live = self.interlocks.live
        # Reporting the absence of a condition that is neither present nor holding changes
        # nothing: skip it (this runs at every sample).
        if present or not live.isdisjoint(self._per_sample_key_set):
            for code, subject in self._per_sample_keys:
                if code in present:
                    self._interlock(t, code, subject, True, present[code])
                elif InterlockMonitor.key(code, subject) in live:
                    self._interlock(t, code, subject, False)
        if self.dwell.update(t, estimate, self.gate.center_mm):
            self._interlock(t, "dwell_exceeded", None, True, f"> {self.dwell.dwell_mm} mm")
        elif "dwell_exceeded" in live:
            self._interlock(t, "dwell_exceeded", None, False)

    def _check_freshness(self, t: float) -> None:
        monitor = self.interlocks
        for device, timeout in self.stale_timeout_s.items():
            last = self.status.last_rx.get(device)
            if last is None or f"no_data:{device}" in monitor.live:
                self._interlock(t, "no_data", device, last is None)
            # the same sum as next_deadline(): a decide at that deadline must find it stale
            stale = last is not None and t >= last + timeout
            key = f"stale_data:{device}"
            if stale:
                # The age is recorded when the interlock is raised, never updated afterwards:
                # re-evaluations between samples (not recorded) must not change the log.
                held = key in monitor.active()
                age = "" if held else f"age {1e3 * (t - last):.0f} ms"
                self._interlock(t, "stale_data", device, True, age)
            elif key in monitor.live:
                self._interlock(t, "stale_data", device, False)
        for event in monitor.tick(t):
            self._record("events", (event.t, "interlock", event.kind, _key_detail(event)))

    def _interlock(
        self, t: float, code: str, subject: str | None, active: bool, detail: str = ""
    ) -> None:
        for event in self.interlocks.report(t, code, subject, active, detail):
            self._record("events", (event.t, "interlock", event.kind, _key_detail(event)))


def _key_detail(event) -> str:
    return f"{event.key} {event.detail}".strip()
