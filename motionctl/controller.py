"""The live controller loop: one consumer thread, one queue, one clock.

Drivers push samples and events into the queue from their reader threads. The controller
thread takes them in order, converts their times to session seconds, hands them to the
pure ``SessionCore`` (estimator, gate, interlocks), carries each decision to the beam
interface, sends the heartbeat, and records the decisions with their latency (and the
gating box's ACKs with their round trip; with ``tracking.follow_latency`` the prediction
horizon follows the two, ``motionctl.latency``). It wakes by itself at the next deadline
(heartbeat due, data going stale), so silence is noticed without polling. Operator
commands arrive through the same queue, so there is exactly one writer of the gate's inputs
and a frozen console cannot change what the gate does.

X-ray frames pass through here on their way to the fiducial worker, and its measurements on
their way into the queue: both taps only keep a reference to the newest (``latest_xray``,
for the console's image panel; read at most a few times a second, off this module's
threads). Neither touches the controller thread's per-sample path.

This module and the CLI are the only places that wire drivers, core and log together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import serial

from motionctl.config import ConfigError
from motionctl.drivers.beam import Ack, BeamInterface
from motionctl.drivers.igtl_tracker import IgtlTrackerDriver
from motionctl.drivers.spirometer import SpirometerDriver
from motionctl.drivers.xray import XrayImageDriver
from motionctl.imaging import FiducialWorker
from motionctl.latency import LatencyMonitor
from motionctl.livestate import LiveTrace
from motionctl.session import OperatorCommand, SessionCore, SessionStatus
from motionctl.sessionlog import SessionLogWriter
from motionctl.settings import seed_plan
from motionctl.types import (
    DeviceEvent,
    FiducialMeasurement,
    GateDecision,
    SpirometerSample,
    SurrogateSample,
    XrayFrame,
)

log = logging.getLogger("motionctl.controller")

_STOP = object()

XRAY_RESULTS_KEPT = 8  # the newest fiducial measurements kept for the console, by frame id

__all__ = ["Controller", "LatestXray", "OperatorCommand"]


@dataclasses.dataclass(frozen=True)
class LatestXray:
    """What the console's image panel needs, as the controller last saw it: the newest frame
    of each imager view (the driver's own read-only arrays, not copies) and the newest
    fiducial measurements by frame id (controller clock, as the worker delivered them)."""

    configured: bool  # an X-ray imager is part of this session
    frames: dict[str, XrayFrame]  # imager name -> its newest frame
    measurements: dict[int, FiducialMeasurement]  # frame id -> its localisation


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
        xray_address: tuple[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.log = session_log  # owned by the caller, who closes it after stop()
        self.t0 = session_log.t0
        self.log.on_failure = self._on_log_failure
        self.surrogate_device = cfg["tracking"]["surrogate_device"]
        surface_cfg = cfg["devices"][self.surrogate_device]
        beam_cfg = cfg["devices"]["beam"]
        self._heartbeat_period_s = beam_cfg["heartbeat_period_s"]
        stale = {self.surrogate_device: surface_cfg["stale_timeout_s"]}
        gating = cfg["gating"]
        # Breath-hold gating on volume needs the spirometer: then its silence holds the beam.
        if gating["mode"] == "breath_hold" and gating["breath_hold_signal"] == "volume":
            if not spirometer_url:
                raise ConfigError(
                    "the config",
                    "devices.spirometer.url",
                    spirometer_url,
                    "a spirometer for gating.mode = breath_hold on volume",
                )
            stale["spirometer"] = cfg["devices"]["spirometer"]["stale_timeout_s"]
        self.core = SessionCore(cfg, self.log.add, stale_timeout_s=stale)
        tracking = cfg["tracking"]
        self.latency = LatencyMonitor(
            unmeasured_s=tracking["unmeasured_latency_s"], rate_hz=tracking["surrogate_rate_hz"]
        )
        self._follow_latency = tracking["follow_latency"]
        self.surface = IgtlTrackerDriver(
            *surface_address,
            self._queue.put,
            name=self.surrogate_device,
            igtl_device_name=surface_cfg["igtl_device_name"],
            clock=clock,
            reconnect_max_s=surface_cfg["reconnect_max_s"],
        )
        self.spirometer = None
        if spirometer_url:
            self.spirometer = SpirometerDriver(
                spirometer_url,
                self._queue.put,
                name="spirometer",
                clock=clock,
                reconnect_max_s=cfg["devices"]["spirometer"]["reconnect_max_s"],
            )
        self.xray = self.fiducials = None
        # The console's view of imaging: replaced (never mutated) by the driver's and the
        # worker's threads, read by the console's; one reference store per frame.
        self._xray_frames: dict[str, XrayFrame] = {}
        self._xray_measurements: dict[int, FiducialMeasurement] = {}
        if xray_address is not None:
            self.fiducials = FiducialWorker(
                seed_plan(cfg),
                stereo=cfg["imaging"]["geometry"] == "stereo",
                deliver=self._from_fiducial_worker,
                latest_estimate=lambda: self.core.status.estimate,
                pair_timeout_s=cfg["imaging"]["pair_timeout_s"],
                clock=clock,
            )
            self.xray = XrayImageDriver(
                *xray_address, self._from_xray_driver, name="xray", clock=clock
            )
            xhost, xport = xray_address
            self.log.device("xray", cfg["devices"]["xray"]["kind"], f"{xhost}:{xport}")
        self.beam = BeamInterface(
            beam_url,
            name="beam",
            clock=clock,
            ack_timeout_s=beam_cfg["ack_timeout_s"],
            on_ack=self._queue.put,
            on_event=self._queue.put,
            reconnect_max_s=beam_cfg["reconnect_max_s"],
        )
        self._beam_write_error = ""  # the last write error logged, until a write succeeds
        host, port = surface_address
        self.log.device(self.surrogate_device, surface_cfg["kind"], f"{host}:{port}")
        self.log.device("beam", beam_cfg["kind"], beam_url)
        if spirometer_url:
            self.log.device("spirometer", cfg["devices"]["spirometer"]["kind"], spirometer_url)
        self.live = LiveTrace(rate_hz=cfg["tracking"]["surrogate_rate_hz"])  # for the console
        self._thread: threading.Thread | None = None
        self._handled = threading.Condition()  # notified after each queue item is handled

    @property
    def status(self) -> SessionStatus:
        return self.core.status

    @property
    def gate(self):
        return self.core.gate

    # -- public API (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self.beam.open()
        self._thread = threading.Thread(target=self._run, name="controller")
        self._thread.start()
        self.surface.start()
        if self.spirometer is not None:
            self.spirometer.start()
        if self.xray is not None:
            self.fiducials.start()
            self.xray.start()

    def stop(self) -> None:
        """Hold the beam and stop the drivers and the loop; idempotent. The log stays open."""
        if self._thread is None:
            return
        self.surface.stop()
        if self.spirometer is not None:
            self.spirometer.stop()
        if self.xray is not None:
            self.xray.stop()
            self.fiducials.stop()
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self.beam.close()

    def submit(self, command: OperatorCommand) -> None:
        self._queue.put(command)

    def set_operator_enable(self, enabled: bool, who: str = "operator") -> None:
        self.submit(OperatorCommand("enable" if enabled else "disable", who=who))

    def wait_until(self, predicate: Callable[[SessionStatus], bool], timeout: float) -> bool:
        """Block until ``predicate(status)`` holds after some queue item; False on timeout."""
        with self._handled:
            return self._handled.wait_for(lambda: predicate(self.status), timeout)

    def session_t(self, t: float) -> float:
        return t - self.t0

    def latest_xray(self) -> LatestXray:
        """The newest X-ray frame of each view and the newest measurements (any thread)."""
        return LatestXray(
            configured=self.xray is not None,
            frames=self._xray_frames,
            measurements=self._xray_measurements,
        )

    # -- X-ray taps (the image driver's and the fiducial worker's threads) ------------------
    def _from_xray_driver(self, item: object) -> None:
        """The image driver's sink: note the frame as its view's newest, then localise."""
        if isinstance(item, XrayFrame):
            self._xray_frames = {**self._xray_frames, item.geometry.imager: item}
        self.fiducials.submit(item)

    def _from_fiducial_worker(self, item: object) -> None:
        """The fiducial worker's output: note a measurement, then queue it for the core."""
        if isinstance(item, FiducialMeasurement):
            kept = list(self._xray_measurements.items())[-(XRAY_RESULTS_KEPT - 1) :]
            self._xray_measurements = {**dict(kept), item.frame_id: item}
        self._queue.put(item)

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
            if self._follow_latency:
                self._follow_measured_latency(now)
            stale_at = self.core.next_deadline(self.session_t(now)) + self.t0
            ack_at = self.beam.ack_deadline()
            deadline = min(next_heartbeat, stale_at, math.inf if ack_at is None else ack_at)
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
                t = self.session_t(self._clock())
                self.log.add("events", (t, "controller", "error", f"{type(exc).__name__}: {exc}"))
                self._force_hold("controller_error")
            with self._handled:
                self._handled.notify_all()
        self._force_hold("session_stopped")

    def _handle(self, item: object) -> None:
        session_t = self.session_t
        if isinstance(item, SurrogateSample):
            self.core.on_surrogate(dataclasses.replace(item, t_rx=session_t(item.t_rx)))
            self._decide(item.t_rx)
            self._publish()
        elif isinstance(item, SpirometerSample):
            self.core.on_spirometer(dataclasses.replace(item, t_rx=session_t(item.t_rx)))
            self._decide(item.t_rx if "spirometer" in self.core.stale_timeout_s else None)
        elif isinstance(item, FiducialMeasurement):
            self.core.on_fiducial(
                dataclasses.replace(item, t_acq=session_t(item.t_acq), t_rx=session_t(item.t_rx))
            )
            self._decide(None)
        elif isinstance(item, Ack):
            self.latency.add_round_trip(item.round_trip_s)
            self.log.add(
                "beam_acks",
                (
                    item.seq,
                    item.command,
                    session_t(item.t_sent),
                    session_t(item.t_ack),
                    int(item.beam_on),
                ),
            )
        elif isinstance(item, DeviceEvent):
            self.core.on_device_event(dataclasses.replace(item, t=session_t(item.t)))
            self._decide(None)
        elif isinstance(item, OperatorCommand):
            t = session_t(self._clock())
            self.core.on_command(t, item)
            self._decide(None, t)  # the same instant: replay decides at the command's time
        elif item is None:
            self._decide(None)  # woke on a deadline: freshness or heartbeat
        else:
            raise TypeError(f"unknown queue item {item!r}")

    def _decide(self, t_rx: float | None, t: float | None = None) -> None:
        if t is None:
            t = self.session_t(self._clock())
        self.core.set_beam_fault(t, self.beam.fault())
        decision = self.core.decide(t, new_sample=t_rx is not None)
        if decision is None:
            return
        self._send_to_beam(self.beam.command, decision.beam_enabled)
        latency = None if t_rx is None else self._clock() - t_rx
        if latency is not None:
            self.latency.add_decision(latency)
        self._record_decision(decision, latency)

    def _follow_measured_latency(self, now: float) -> None:
        t = self.session_t(now)
        proposal = self.latency.propose(t, self.core.estimator.s.horizon_s)
        if proposal is not None:
            horizon, measured = proposal
            self.core.set_horizon(t, horizon, measured)

    def _publish(self) -> None:
        est, decision = self.status.estimate, self.status.decision
        if est is None:
            return
        self.live.append(
            (
                est.t,
                est.surrogate_mm,
                *est.position_mm,
                *est.predicted_mm,
                est.uncertainty_mm,
                1.0 if decision is not None and decision.beam_enabled else 0.0,
                float(est.valid),
            )
        )

    def _force_hold(self, reason: str) -> None:
        decision = GateDecision(self.session_t(self._clock()), False, (reason,))
        self._send_to_beam(self.beam.command, False)
        self.core.status.decision = decision
        self._record_decision(decision, None)

    def _record_decision(self, decision: GateDecision, latency: float | None) -> None:
        self.log.add(
            "decisions",
            (decision.t, int(decision.beam_enabled), decision.reason_text, latency),
        )

    def _send_to_beam(self, send: Callable[..., object], *args: object) -> None:
        """Write to the gating box; a failed write is recorded, the driver's fault() then
        raises the beam-interface interlock (the box's own watchdog holds meanwhile)."""
        try:
            send(*args)
        except (OSError, serial.SerialException) as exc:
            error = f"{type(exc).__name__}: {exc}"
            # Once per outage, not at every heartbeat (100 a second) while the port is away.
            if error != self._beam_write_error:
                self._beam_write_error = error
                t = self.session_t(self._clock())
                self.log.add("events", (t, "beam", "write_error", error))
        else:
            self._beam_write_error = ""
