"""The live controller loop: one consumer thread, one queue, one clock.

Drivers push samples and events into the queue from their reader threads. The controller
thread takes them in order, runs the pure estimator and gate, keeps the interlocks,
commands the beam interface, sends its heartbeat, and queues every sample, estimate,
decision, acknowledgement, interlock change and operator action for the session log. It
wakes by itself at the next deadline (heartbeat due, data going stale) so that silence is
noticed without polling. Operator commands arrive through the same queue, so there is
exactly one writer of the gate's inputs, and a frozen console cannot change what the gate
does.

This module and the CLI are the only places that wire drivers, core and log together.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import serial

from motionctl.config import ConfigError
from motionctl.correlation import CorrelationModel
from motionctl.drivers.beam import Ack, BeamInterface
from motionctl.drivers.igtl_tracker import IgtlTrackerDriver
from motionctl.drivers.spirometer import SpirometerDriver
from motionctl.estimator import MotionEstimator
from motionctl.gating import DwellMonitor, Gate, GateInputs
from motionctl.interlocks import InterlockEvent, InterlockMonitor
from motionctl.sessionlog import SessionLogWriter
from motionctl.settings import correlation_params, estimator_settings, gate_settings
from motionctl.types import (
    DeviceEvent,
    GateDecision,
    MotionEstimate,
    SpirometerSample,
    SurrogateSample,
)

log = logging.getLogger("motionctl.controller")

# Estimate reasons that are interlocks of their own (the rest: estimate_invalid).
_ESTIMATE_INTERLOCKS = {
    "surrogate_not_finite": "not_finite",
    "surrogate_out_of_range": "out_of_range",
    "time_not_finite": "not_finite",
    "clock_backwards": "clock_backwards",
    "time_repeated": "clock_backwards",
    "predictor_diverged": "predictor_diverged",
    "correlation_model_invalid": "correlation_model_invalid",
    "fiducial_disagreement": "fiducial_disagreement",
}
_PER_SAMPLE_INTERLOCKS = sorted(set(_ESTIMATE_INTERLOCKS.values()) | {"estimate_invalid"})


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    """enable, disable, hold, release, window (value = (centre, width)), acknowledge
    (value = interlock key), capture_reference."""

    kind: str
    value: Any = None
    who: str = "operator"


@dataclass
class ControllerStatus:
    """The latest state, for the status line and the console; replaced field by field by the
    controller thread, read (never written) by others."""

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


_STOP = object()


class Controller:
    """Consumes samples, decides, drives the beam and records the session."""

    def __init__(
        self,
        cfg: dict[str, Any],
        *,
        surface_address: tuple[str, int],
        beam_url: str,
        session_log: SessionLogWriter,
        spirometer_url: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.surrogate_device = cfg["tracking"]["surrogate_device"]
        surface_cfg = cfg["devices"][self.surrogate_device]
        beam_cfg = cfg["devices"]["beam"]
        self._stale_timeout_s = {self.surrogate_device: surface_cfg["stale_timeout_s"]}
        self._heartbeat_period_s = beam_cfg["heartbeat_period_s"]
        self.estimator = MotionEstimator(
            estimator_settings(cfg), CorrelationModel(correlation_params(cfg))
        )
        settings = gate_settings(cfg)
        self.gate = Gate(settings)
        self.dwell = DwellMonitor(settings.axis, settings.dwell_mm, settings.dwell_s)
        self.interlocks = InterlockMonitor()
        # Breath-hold gating on volume needs the spirometer: then its silence holds the beam.
        if settings.mode == "breath_hold" and settings.breath_hold_signal == "volume":
            if not spirometer_url:
                raise ConfigError(
                    "the config",
                    "devices.spirometer.url",
                    spirometer_url,
                    "a spirometer for gating.mode = breath_hold on volume",
                )
            spiro_cfg = cfg["devices"]["spirometer"]
            self._stale_timeout_s["spirometer"] = spiro_cfg["stale_timeout_s"]
        self.spirometer = None
        if spirometer_url:
            self.spirometer = SpirometerDriver(
                spirometer_url, self._queue.put, name="spirometer", clock=clock
            )
        self._latest_volume_l = math.nan
        self._max_window_mm = cfg["gating"]["max_window_mm"]
        self.log = session_log  # owned by the caller, who closes it after stop()
        self.t0 = session_log.t0
        self.log.on_failure = self._on_log_failure
        self.surface = IgtlTrackerDriver(
            *surface_address,
            self._queue.put,
            name=self.surrogate_device,
            igtl_device_name=surface_cfg["igtl_device_name"],
            clock=clock,
            reconnect_max_s=surface_cfg["reconnect_max_s"],
        )
        self.beam = BeamInterface(
            beam_url,
            name="beam",
            clock=clock,
            ack_timeout_s=beam_cfg["ack_timeout_s"],
            on_ack=self._queue.put,
            on_event=self._queue.put,
        )
        host, port = surface_address
        self.log.device(self.surrogate_device, surface_cfg["kind"], f"{host}:{port}")
        self.log.device("beam", beam_cfg["kind"], beam_url)
        if spirometer_url:
            self.log.device("spirometer", cfg["devices"]["spirometer"]["kind"], spirometer_url)
        self.status = ControllerStatus(
            samples={self.surrogate_device: 0}, malformed={self.surrogate_device: 0, "beam": 0}
        )
        self._latest_estimate: MotionEstimate | None = None
        self._last_decision: GateDecision | None = None
        self._thread: threading.Thread | None = None
        self._handled = threading.Condition()  # notified after each queue item is handled

    # -- public API (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self.beam.open()
        self._thread = threading.Thread(target=self._run, name="controller")
        self._thread.start()
        self.surface.start()
        if self.spirometer is not None:
            self.spirometer.start()

    def stop(self) -> None:
        """Hold the beam and stop the drivers and the loop; idempotent. The log stays open."""
        if self._thread is None:
            return
        self.surface.stop()
        if self.spirometer is not None:
            self.spirometer.stop()
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self.beam.close()

    def submit(self, command: OperatorCommand) -> None:
        self._queue.put(command)

    def set_operator_enable(self, enabled: bool, who: str = "operator") -> None:
        self.submit(OperatorCommand("enable" if enabled else "disable", who=who))

    def wait_until(self, predicate: Callable[[ControllerStatus], bool], timeout: float) -> bool:
        """Block until ``predicate(status)`` holds after some queue item; False on timeout."""
        with self._handled:
            return self._handled.wait_for(lambda: predicate(self.status), timeout)

    def session_t(self, t: float) -> float:
        return t - self.t0

    # -- controller thread -----------------------------------------------------------------
    def _on_log_failure(self, reason: str) -> None:
        self._queue.put(DeviceEvent("session_log", self._clock(), "write_failure", reason))

    def _run(self) -> None:
        next_heartbeat = self._clock()
        while True:
            now = self._clock()
            if now >= next_heartbeat:
                self._send_to_beam(self.beam.heartbeat)
                next_heartbeat = now + self._heartbeat_period_s
            deadline = min(next_heartbeat, self._next_stale_deadline(now))
            try:
                item = self._queue.get(timeout=max(0.0, deadline - self._clock()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            try:
                self._handle(item)
            except Exception as exc:  # noqa: BLE001 - the loop must survive and hold instead
                log.exception("controller failed on %r", item)
                self._record_event("controller", "error", f"{type(exc).__name__}: {exc}")
                self._decide(self._clock(), None, force_hold="controller_error")
            with self._handled:
                self._handled.notify_all()
        final = GateDecision(self._clock(), False, ("session_stopped",))
        self._send_to_beam(self.beam.command, False)
        self._record_decision(final, None)

    def _send_to_beam(self, send: Callable[..., object], *args: object) -> None:
        """Write to the gating box; a failed write is recorded, the driver's fault() then
        raises the beam-interface interlock (the box's own watchdog holds meanwhile)."""
        try:
            send(*args)
        except (OSError, serial.SerialException) as exc:
            self._record_event("beam", "write_error", f"{type(exc).__name__}: {exc}")

    def _next_stale_deadline(self, now: float) -> float:
        soonest = math.inf
        for device, timeout in self._stale_timeout_s.items():
            last = self.status.last_rx.get(device)
            if last is None:
                soonest = min(soonest, now + 0.1)
            elif last + timeout > now:
                soonest = min(soonest, last + timeout)
            # Already stale: decided when it expired; the heartbeats keep the loop awake.
        return soonest

    def _handle(self, item: object) -> None:
        now = self._clock()
        if isinstance(item, SurrogateSample):
            self._on_sample(item)
        elif isinstance(item, SpirometerSample):
            self._on_spirometer(item)
        elif isinstance(item, Ack):
            self.log.add(
                "beam_acks",
                (
                    item.seq,
                    item.command,
                    self.session_t(item.t_sent),
                    self.session_t(item.t_ack),
                    int(item.beam_on),
                ),
            )
        elif isinstance(item, DeviceEvent):
            self._on_event(item)
        elif isinstance(item, OperatorCommand):
            self._on_command(item)
        elif item is None:
            self._decide(now, None)  # woke on a deadline: freshness or heartbeat
        else:
            raise TypeError(f"unknown queue item {item!r}")

    def _on_sample(self, sample: SurrogateSample) -> None:
        st = self.status
        st.samples[sample.device] = st.samples.get(sample.device, 0) + 1
        st.last_rx[sample.device] = sample.t_rx
        x, y, z = sample.position_mm
        self.log.add(
            "samples",
            (sample.device, sample.seq, self.session_t(sample.t_rx), sample.t_device, x, y, z),
        )
        if sample.device != self.surrogate_device:
            return
        estimate = self.estimator.step(sample)
        self._latest_estimate = estimate
        st.estimate = estimate
        self._report_estimate(sample.t_rx, estimate)
        p, q = estimate.position_mm, estimate.predicted_mm
        self.log.add(
            "estimates",
            (
                self.session_t(estimate.t),
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
        self._decide(self._clock(), sample.t_rx)

    def _on_spirometer(self, sample: SpirometerSample) -> None:
        st = self.status
        st.samples[sample.device] = st.samples.get(sample.device, 0) + 1
        st.last_rx[sample.device] = sample.t_rx
        self._latest_volume_l = sample.volume_l
        st.valve_closed = sample.valve_closed
        self.log.add(
            "spirometer_samples",
            (
                sample.device,
                sample.seq,
                self.session_t(sample.t_rx),
                sample.t_device,
                sample.volume_l,
                sample.flow_l_s,
                int(sample.valve_closed),
                sample.feedback_level,
            ),
        )
        if "spirometer" in self._stale_timeout_s:
            self._decide(self._clock(), sample.t_rx)

    def _report_estimate(self, t: float, estimate: MotionEstimate) -> None:
        present = {}
        for reason in estimate.reasons:
            code = _ESTIMATE_INTERLOCKS.get(reason)
            if code is not None:
                present[code] = reason
        if not estimate.valid and not present:
            present["estimate_invalid"] = ",".join(estimate.reasons)
        device = self.surrogate_device
        for code in _PER_SAMPLE_INTERLOCKS:
            subject = device if code in ("not_finite", "out_of_range", "clock_backwards") else None
            self._interlock(t, code, subject, code in present, present.get(code, ""))
        dwell = self.dwell.update(t, estimate, self.gate.center_mm)
        self._interlock(t, "dwell_exceeded", None, dwell, f"> {self.dwell.dwell_mm} mm")

    def _on_event(self, event: DeviceEvent) -> None:
        t = event.t
        if event.kind == "malformed":
            self.status.malformed[event.device] = self.status.malformed.get(event.device, 0) + 1
            # A momentary condition: raised now, cleared after the interlock's clean period.
            self._interlock(t, "malformed_data", event.device, True, event.detail)
            self._interlock(t, "malformed_data", event.device, False)
        elif event.kind in ("connected", "disconnected", "port_error"):
            up = event.kind == "connected"
            self.status.connected[event.device] = up
            self._interlock(t, "disconnected", event.device, not up, event.detail)
        elif event.device == "session_log" and event.kind == "write_failure":
            self._interlock(t, "log_write_failure", None, True, event.detail)
        self._record_event(event.device, event.kind, event.detail, event.t)
        self._decide(self._clock(), None)

    def _on_command(self, command: OperatorCommand) -> None:
        now = self._clock()
        refusal = ""
        if command.kind in ("enable", "disable"):
            old = self.status.operator_enabled
            self.status.operator_enabled = command.kind == "enable"
            detail = f"old={old} new={self.status.operator_enabled}"
        elif command.kind == "window":
            center, width = command.value
            old = (self.gate.center_mm, self.gate.window_mm)
            refusal = self._window_refusal(center, width)
            if not refusal:
                self.gate.set_window(center, width)
            detail = f"old={old} new={(center, width)}"
        elif command.kind == "hold":
            self._interlock(now, "operator_hold", None, True, command.who)
            detail = "beam held by the operator"
        elif command.kind == "release":
            self._interlock(now, "operator_hold", None, False)
            accepted, refusal = self.interlocks.acknowledge(now, "operator_hold")
            detail = "operator hold released"
        elif command.kind == "acknowledge":
            accepted, refusal = self.interlocks.acknowledge(now, command.value)
            detail = f"interlock {command.value}"
        elif command.kind == "capture_reference":
            level = self.gate.breath_hold_level(self._gate_inputs())
            try:
                self.gate.capture_reference(level)
            except ValueError as exc:
                refusal = str(exc)
            detail = f"reference={level!r}"
        else:
            refusal = f"unknown operator command {command.kind!r}"
            detail = ""
        self.status.last_refusal = refusal
        kind = command.kind if not refusal else f"{command.kind}_refused"
        self._record_event("operator", kind, f"who={command.who} {detail} {refusal}".strip())
        self._decide(now, None)

    def _window_refusal(self, center: float, width: float) -> str:
        if not (isinstance(center, int | float) and isinstance(width, int | float)):
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

    def _interlock(
        self, t: float, code: str, subject: str | None, active: bool, detail: str = ""
    ) -> None:
        for event in self.interlocks.report(t, code, subject, active, detail):
            self._record_interlock(event)

    def _record_interlock(self, event: InterlockEvent) -> None:
        self._record_event("interlock", event.kind, f"{event.key} {event.detail}".strip(), event.t)

    def _record_event(self, source: str, kind: str, detail: str, t: float | None = None) -> None:
        t = self._clock() if t is None else t
        self.log.add("events", (self.session_t(t), source, kind, detail))

    def _check_health(self, now: float) -> None:
        for device, timeout in self._stale_timeout_s.items():
            last = self.status.last_rx.get(device)
            self._interlock(now, "no_data", device, last is None)
            stale = last is not None and now - last >= timeout
            age = "" if last is None else f"age {1e3 * (now - last):.0f} ms"
            self._interlock(now, "stale_data", device, stale, age)
        fault = self.beam.fault()
        self._interlock(now, "beam_interface", None, fault is not None, fault or "")
        for event in self.interlocks.tick(now):
            self._record_interlock(event)

    def _gate_inputs(self) -> GateInputs:
        return GateInputs(
            estimate=self._latest_estimate,
            interlocks=self.interlocks.active(),
            operator_enabled=self.status.operator_enabled,
            volume_l=self._latest_volume_l,
        )

    def _decide(self, now: float, t_rx: float | None, force_hold: str | None = None) -> None:
        self._check_health(now)
        decision = self.gate.update(now, self._gate_inputs())
        if force_hold is not None:
            decision = GateDecision(now, False, (*decision.reasons, force_hold))
        self.status.interlocks = self.interlocks.active()
        self.status.awaiting_ack = self.interlocks.awaiting_ack()
        # A deadline wake-up that changes nothing is not a new decision worth recording.
        last = self._last_decision
        if (
            t_rx is None
            and last is not None
            and (decision.beam_enabled == last.beam_enabled and decision.reasons == last.reasons)
        ):
            return
        self._send_to_beam(self.beam.command, decision.beam_enabled)
        latency = None if t_rx is None else self._clock() - t_rx
        self._record_decision(decision, latency)

    def _record_decision(self, decision: GateDecision, latency: float | None) -> None:
        self._last_decision = decision
        self.status.decision = decision
        self.status.t = decision.t
        self.log.add(
            "decisions",
            (self.session_t(decision.t), int(decision.beam_enabled), decision.reason_text, latency),
        )
