"""The live controller loop: one consumer thread, one queue, one clock.

Drivers push samples and events into the queue from their reader threads. The controller
thread takes them in order, runs the pure tracker and gate, commands the beam interface,
sends its heartbeat, and queues every sample, estimate, decision, acknowledgement and event
for the session log. It wakes by itself at the next deadline (heartbeat due, data going
stale) so that silence is noticed without any polling. Operator commands arrive through
the same queue, so there is exactly one writer of the gate's inputs.

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

from motionctl.drivers.beam import Ack, BeamInterface
from motionctl.drivers.igtl_tracker import IgtlTrackerDriver
from motionctl.gating import AmplitudeGate, GateHealth
from motionctl.sessionlog import SessionLogWriter
from motionctl.tracking import ScaledSurrogateTracker
from motionctl.types import DeviceEvent, GateDecision, MotionEstimate, SurrogateSample

log = logging.getLogger("motionctl.controller")


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    kind: str  # "enable", "disable", "window"
    value: Any = None
    who: str = "operator"


@dataclass
class ControllerStatus:
    """The latest state, for the status line and (later) the console; read-only outside."""

    t: float = 0.0
    decision: GateDecision | None = None
    estimate: MotionEstimate | None = None
    operator_enabled: bool = False
    samples: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    connected: dict[str, bool] = field(default_factory=dict)
    last_rx: dict[str, float] = field(default_factory=dict)


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
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        tracking, gating = cfg["tracking"], cfg["gating"]
        self.surrogate_device = tracking["surrogate_device"]
        surface_cfg = cfg["devices"][self.surrogate_device]
        beam_cfg = cfg["devices"]["beam"]
        self._stale_timeout_s = {self.surrogate_device: surface_cfg["stale_timeout_s"]}
        self._heartbeat_period_s = beam_cfg["heartbeat_period_s"]
        self.tracker = ScaledSurrogateTracker(
            tracking["surrogate_axis"],
            tracking["gain"],
            tracking["offset_mm"],
            tracking["horizon_s"],
        )
        self.gate = AmplitudeGate(gating["axis"], gating["center_mm"], gating["window_mm"])
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
        self.status = ControllerStatus(
            samples={self.surrogate_device: 0}, malformed={self.surrogate_device: 0, "beam": 0}
        )
        self._log_failure: str | None = None
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

    def stop(self) -> None:
        """Hold the beam and stop the drivers and the loop; idempotent. The log stays open."""
        if self._thread is None:
            return
        self.surface.stop()
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
        """Write to the gating box; a failed write is recorded and the driver's fault()
        then holds the gate (the box's own watchdog holds the beam meanwhile)."""
        try:
            send(*args)
        except (OSError, serial.SerialException) as exc:
            self._record_event("beam", "write_error", f"{type(exc).__name__}: {exc}")

    def _next_stale_deadline(self, now: float) -> float:
        last = self.status.last_rx.get(self.surrogate_device)
        if last is None:
            return now + 0.1
        deadline = last + self._stale_timeout_s[self.surrogate_device]
        if deadline <= now:
            # Already stale: re-check at the heartbeat; the decision was made when it expired.
            return math.inf
        return deadline

    def _handle(self, item: object) -> None:
        now = self._clock()
        if isinstance(item, SurrogateSample):
            self._on_sample(item)
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
        estimate = self.tracker.step(sample)
        self._latest_estimate = estimate
        st.estimate = estimate
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
            ),
        )
        self._decide(self._clock(), sample.t_rx)

    def _on_event(self, event: DeviceEvent) -> None:
        if event.kind == "malformed":
            self.status.malformed[event.device] = self.status.malformed.get(event.device, 0) + 1
        elif event.kind in ("connected", "disconnected"):
            self.status.connected[event.device] = event.kind == "connected"
        elif event.device == "session_log" and event.kind == "write_failure":
            self._log_failure = event.detail
        self._record_event(event.device, event.kind, event.detail, event.t)
        self._decide(self._clock(), None)

    def _on_command(self, command: OperatorCommand) -> None:
        if command.kind in ("enable", "disable"):
            old = self.status.operator_enabled
            self.status.operator_enabled = command.kind == "enable"
            detail = f"who={command.who} old={old} new={self.status.operator_enabled}"
        elif command.kind == "window":
            center, width = command.value
            old = (self.gate.center_mm, self.gate.window_mm)
            self.gate.set_window(center, width)
            detail = f"who={command.who} old={old} new={(center, width)}"
        else:
            raise ValueError(f"unknown operator command {command.kind!r}")
        self._record_event("operator", command.kind, detail)
        self._decide(self._clock(), None)

    def _record_event(self, source: str, kind: str, detail: str, t: float | None = None) -> None:
        t = self._clock() if t is None else t
        self.log.add("events", (self.session_t(t), source, kind, detail))

    def _health(self, now: float) -> GateHealth:
        stale, missing = [], []
        for device, timeout in self._stale_timeout_s.items():
            last = self.status.last_rx.get(device)
            if last is None:
                missing.append(device)
            elif now - last > timeout:
                stale.append(device)
        return GateHealth(
            operator_enabled=self.status.operator_enabled,
            stale_devices=tuple(stale),
            missing_devices=tuple(missing),
            beam_fault=self.beam.fault(),
            log_failed=self._log_failure is not None,
        )

    def _decide(self, now: float, t_rx: float | None, force_hold: str | None = None) -> None:
        decision = self.gate.update(now, self._latest_estimate, self._health(now))
        if force_hold is not None:
            decision = GateDecision(now, False, (*decision.reasons, force_hold))
        # A deadline wake-up that changes nothing is not a new decision worth recording.
        if (
            t_rx is None
            and self._last_decision is not None
            and (
                decision.beam_enabled == self._last_decision.beam_enabled
                and decision.reasons == self._last_decision.reasons
            )
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
