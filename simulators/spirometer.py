"""Simulated breath-hold spirometer (Active Breathing Coordinator style) on a pty.

It speaks the spirometer wire protocol (documented in ``motionctl.drivers.spirometer``) from
the device's side, with its own copy of the framing and checksum so that it checks the
driver rather than sharing its mistakes:

* streams ``SPV`` readings at ``rate_hz`` (default 30 Hz). The volume is the patient model's
  ``lung_volume_l`` (litres -> ml) plus the device's zero offset, an optional linear drift
  (``drift_ml_per_min``, the slow creep of an integrating flow sensor that ``ZERO``
  removes) and white noise (``noise_ml`` standard deviation). The flow is the difference
  of the noise-free volume between consecutive readings over their time step;
* closes the valve when the patient model enters the held part of a breath hold
  (``STS,...,CLOSED,patient``; at most once per hold) or on ``VALVE,C``. While it is
  closed the reading holds the volume at closure, drifting at ``leak_ml_s``;
* opens the valve on ``VALVE,O``, at the end of the patient's hold, or as soon as the
  patient's breathing effort (the model's lung volume) departs from the held volume by more
  than ``release_ml``: the patient lets go. That is the early release a cough during a hold
  causes, and also what a patient breathing freely does to a valve the host closed on them;
* shows the model's coughs (a sharp dip: a forced expiration), deep breaths and pauses in
  the volume and flow as the model makes them; during a closed valve they appear only
  through the release they cause;
* answers ``VALVE``, ``LEVEL`` and ``ZERO`` with ``ACK``/``NAK`` and reports every change in
  an ``STS`` line before the next reading;
* records every reading it wrote in ``sent`` (``SentReading``: seq, monotonic send time,
  patient time, the wire values) so tests can count both sides;
* fault hooks: ``inject(data)`` puts raw bytes on the line between two lines of its own
  (malformed lines, device errors), ``set_streaming(False)`` stops the readings (the
  device keeps working and answering), and the runtime faults below.

Faults (``start_fault(kind)`` / ``stop_fault(kind)``; all of ``FAULT_KINDS``; several may be
on together). Line faults (``disconnect``, ``garbage``) hit the cable: the device goes on
measuring and counting, so the readings they swallow show up as an SPV seq gap afterwards.
Device faults (``freeze``) stop the device making readings: no gap.

============  ==============================================================================
disconnect    the cable is pulled. Nothing goes either way: the device writes nothing
              (readings, STS, replies) and everything the host writes is lost, so commands
              go unanswered (the driver's ``ack_lost``); a line half received when the
              cable went is dropped. The pty stays open (a pty cannot be unplugged, and
              closing the master would end the host's port for good: a real host port
              survives a pulled cable). Readings keep their seq running, so the host sees a
              gap of exactly the readings lost when the cable is back.
freeze        no readings (the measurement stream stalls, seq does not advance); commands
              are still answered and status changes still reported.
garbage       each reading is replaced by ``garbage_bytes`` (40) random bytes ending in one
              newline (line noise: one bad line per reading); replies and STS are intact.
delay         each reading is written ``fault_delay_s`` (0.3 s) after it was measured (its
              t_ms is the measurement time), in order; replies and STS are not delayed. When
              the fault ends the backlog is written at once.
reorder       consecutive readings swap pairwise (seq 1, 0, 3, 2, ...).
nan           the volume and flow fields read ``nan``: a framed line with a good checksum
              whose numbers are not integers (the driver reports malformed ``number``).
jump          the volume reads ``jump_ml`` (+3000 ml) high for the duration (flow is
              untouched: a sensor glitch, not air); still inside the wire's range.
clock-skew    the device clock (``t_ms`` of SPV and STS) is ``clock_skew_s`` (2 s) behind for
              the duration, modulo 2**32 as the wire clock wraps.
============  ==============================================================================

What it does NOT model:

* a patient who lets go early without a cause in the signal: the patient model's holds last
  exactly ``breath_hold_s``; early releases here come only from the effort rule above
  (coughs in a hold). ``simulators/patient.py`` has no early-release event;
* the patient's reaction to the valve: the model does not know the valve is closed and goes
  on breathing (the target keeps moving) while the reading is held; when the valve opens,
  the reading rejoins the model with a step of at most about ``release_ml``;
* the hand switch and the trigger threshold: the valve closes where the model holds (its own
  end-inhale), not at the feedback level, which is only displayed and echoed back;
* the model's lung volume leads its ``breath_hold`` flag by ``surrogate_lead_s`` (the model
  derives the volume from the surface marker), so the volume plateau starts that much
  before the valve closes, and the last held readings differ from the model's exhale;
* flow-sensor physics: no turbine inertia, flow noise, BTPS correction or leak around the
  mouthpiece; readings outside the wire's ranges are sent as they are (the driver rejects
  them);
* the serial line: a pty delivers bytes at once, whatever the baud rate, with no noise; a
  full pty buffer (no host reading) drops what does not fit, counted per line in
  ``stats()["dropped"]`` (a line cut short there reaches the host as one malformed line);
* device faults (``STS,...,ERROR``) other than by ``inject()``, a maximum hold time, more
  than one host, and drift between the device's millisecond clock and the host's (both
  come from the injected clock; ``t_ms`` counts from ``start()``) other than the
  ``clock-skew`` fault's step;
* noise on the host-to-device direction (``garbage`` is one-way), and the modem lines a
  pulled cable would drop (the host learns of ``disconnect`` only from the silence).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from motionctl.simulators.faults import FAULT_KINDS, fault_label, noise_line
from motionctl.simulators.pty_device import (
    SEQ_MODULO,
    PtyDeviceSim,
    Rejected,
    frame,
    parse_host_line,
)

MAX_LINE_BYTES = 80
T_MS_MODULO = 2**32
LEVEL_ML_RANGE = (0, 8000)
COMMAND_FIELDS = {"VALVE": 3, "LEVEL": 3, "ZERO": 2}
GARBAGE_BYTES = 40  # under MAX_LINE_BYTES: one noise line is one bad line at the host
JUMP_ML = 3000
CLOCK_SKEW_S = 2.0
_TRANSPORT_KINDS = frozenset({"delay", "reorder"})

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,9})")


def _parse_command(line: bytes) -> tuple[str, int, str | None]:
    """(command, seq, argument) of a host line, or raise Rejected with the NAK reason."""
    fields, seq = parse_host_line(line, MAX_LINE_BYTES)
    command = fields[0]
    if command not in COMMAND_FIELDS:
        raise Rejected("unknown_command", seq)
    if len(fields) != COMMAND_FIELDS[command] or seq is None:
        raise Rejected("syntax", seq)
    if command == "VALVE" and fields[2] not in ("C", "O"):
        raise Rejected("syntax", seq)
    if command == "LEVEL":
        if not _INTEGER.fullmatch(fields[2]):
            raise Rejected("syntax", seq)
        if not LEVEL_ML_RANGE[0] <= int(fields[2]) <= LEVEL_ML_RANGE[1]:
            raise Rejected("range", seq)
    return command, seq, fields[2] if len(fields) == 3 else None


@dataclass(frozen=True, slots=True)
class Measurement:
    """One reading in wire units, as the device would send it."""

    volume_ml: int
    flow_ml_s: int
    valve_closed: bool
    level_ml: int


@dataclass(frozen=True, slots=True)
class SentReading:
    """One SPV line as written to the pty (or the noise written in its place).

    ``fault`` names the fault kinds that shaped it ("nan", "jump+delay", ...). The values
    are what the device put in the line: None where the line said ``nan``; for ``garbage``
    they are what the device measured, and the wire carried noise instead.
    """

    seq: int
    t_sent: float  # the simulator's clock (monotonic by default) just before the write
    patient_t: float  # patient-model time of the reading (when it was measured)
    volume_ml: int | None
    flow_ml_s: int | None
    valve_closed: bool
    level_ml: int
    t_ms: int = 0  # the device clock in the line
    fault: str | None = None


class BreathHoldModel:
    """The device's measurement and valve logic: no I/O, no threads, no clock.

    Call ``step(t)`` with increasing patient times for one reading each; the command methods
    take the patient time at which the command arrived. Each returns the status changes it
    caused as ``(event, arg)`` pairs in STS wire tokens. Not thread-safe: one owner.
    """

    def __init__(
        self,
        patient,
        *,
        noise_ml: float = 3.0,
        leak_ml_s: float = -3.0,
        release_ml: float = 150.0,
        drift_ml_per_min: float = 0.0,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("noise_ml", noise_ml),
            ("leak_ml_s", leak_ml_s),
            ("release_ml", release_ml),
            ("drift_ml_per_min", drift_ml_per_min),
        ):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if noise_ml < 0 or release_ml <= 0:
            raise ValueError("noise_ml must be >= 0 and release_ml > 0")
        self._patient = patient
        self._noise_ml = noise_ml
        self._leak_ml_s = leak_ml_s
        self._release_ml = release_ml
        self._drift_ml_s = drift_ml_per_min / 60.0
        self._rng = random.Random(seed)
        self.valve_closed = False
        self.level_ml = 0
        self._offset_ml = 0.0
        self._t_close = 0.0
        self._v_close = 0.0
        self._in_hold = False  # inside a breath hold of the patient model
        self._previous: tuple[float, float] | None = None  # (t, noise-free reading)

    def _effort_ml(self, t: float) -> tuple[float, bool]:
        """The reading an open valve would give (noise-free), and the model's hold flag."""
        state = self._patient.state(t)
        volume = state.lung_volume_l * 1e3 + self._drift_ml_s * t + self._offset_ml
        return volume, state.breath_hold

    def _held_ml(self, t: float) -> float:
        return self._v_close + self._leak_ml_s * (t - self._t_close)

    def _close(self, t: float, volume_ml: float, cause: str, changes: list) -> None:
        self.valve_closed = True
        self._t_close, self._v_close = t, volume_ml
        changes.append(("CLOSED", cause))

    def _open(self, cause: str, changes: list) -> None:
        self.valve_closed = False
        changes.append(("OPENED", cause))

    def step(self, t: float) -> tuple[Measurement, list[tuple[str, str]]]:
        changes: list[tuple[str, str]] = []
        effort, holding = self._effort_ml(t)
        if holding and not self._in_hold:
            self._in_hold = True
            if not self.valve_closed:
                self._close(t, effort, "patient", changes)
        elif not holding and self._in_hold:
            self._in_hold = False
            if self.valve_closed:
                self._open("patient", changes)  # the hold is over: the patient lets go
        if self.valve_closed and abs(effort - self._held_ml(t)) > self._release_ml:
            self._open("patient", changes)  # early release: the patient cannot hold on
        volume = self._held_ml(t) if self.valve_closed else effort
        flow = 0.0
        if self._previous is not None and t > self._previous[0]:
            flow = (volume - self._previous[1]) / (t - self._previous[0])
        self._previous = (t, volume)
        noise = self._rng.gauss(0.0, self._noise_ml) if self._noise_ml > 0 else 0.0
        measurement = Measurement(
            round(volume + noise), round(flow), self.valve_closed, self.level_ml
        )
        return measurement, changes

    def valve(self, t: float, closed: bool) -> list[tuple[str, str]]:
        changes: list[tuple[str, str]] = []
        if closed and not self.valve_closed:
            self._close(t, self._effort_ml(t)[0], "host", changes)
        elif not closed and self.valve_closed:
            self._open("host", changes)
        return changes

    def set_level(self, level_ml: int) -> list[tuple[str, str]]:
        self.level_ml = level_ml
        return [("LEVEL", str(level_ml))]

    def zero(self, t: float) -> list[tuple[str, str]]:
        """Make the current reading zero; raises Rejected while the valve is closed."""
        if self.valve_closed:
            raise Rejected("valve_closed")
        reading = self._effort_ml(t)[0]
        self._offset_ml -= reading
        if self._previous is not None:
            # A re-zero moves the reading, not the air: no flow spike at the next step.
            self._previous = (self._previous[0], self._previous[1] - reading)
        return [("ZEROED", str(round(reading)))]


@dataclass(frozen=True, slots=True)
class _Pending:
    """A reading made but perhaps not yet written (delay, reorder)."""

    data: bytes
    record: SentReading  # t_sent filled in when written
    garbage: bool


class SpirometerSim(PtyDeviceSim):
    """Simulated breath-hold spirometer on a pty, driven by ``patient.state(t)``.

    Patient time is ``clock() - t0``; ``t0`` defaults to the clock at ``start()`` (the rig
    passes its shared patient clock). The clock must advance in real time: it paces the
    readings.
    """

    supported_faults: tuple[str, ...] = FAULT_KINDS
    _thread_suffix = "spirometer-sim"
    _max_line_bytes = MAX_LINE_BYTES
    _dropped_stat = "dropped"
    _dropped_log_level = logging.DEBUG

    def __init__(
        self,
        patient,
        *,
        rate_hz: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        t0: float | None = None,
        name: str = "spirometer",
        noise_ml: float = 3.0,
        leak_ml_s: float = -3.0,
        release_ml: float = 150.0,
        drift_ml_per_min: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not (math.isfinite(rate_hz) and 0 < rate_hz <= 1000):
            raise ValueError(f"rate_hz must be in (0, 1000], got {rate_hz!r}")
        self.model = BreathHoldModel(
            patient,
            noise_ml=noise_ml,
            leak_ml_s=leak_ml_s,
            release_ml=release_ml,
            drift_ml_per_min=drift_ml_per_min,
            seed=seed,
        )
        super().__init__(clock=clock, name=name, fault_seed=seed + 1)
        self._period_s = 1.0 / rate_hz
        self.t0 = t0
        # _cond also guards the model, sent, stats, the injected bytes and the streaming
        # switch; the device thread writes to the pty with it held (non-blocking writes), so
        # a reading is in ``sent`` exactly when it is on the line.
        self.sent: list[SentReading] = []
        self._seq = 0
        self._streaming = True
        self._injected: list[bytes] = []
        self._stats = {
            "readings": 0,
            "status": 0,
            "commands": 0,
            "rejected": 0,
            "dropped": 0,
            "garbage": 0,
            "lost_on_line": 0,
        }
        # Fault parameters (and fault_delay_s): set them before the fault starts.
        self.garbage_bytes = GARBAGE_BYTES
        self.jump_ml = JUMP_ML
        self.clock_skew_s = CLOCK_SKEW_S
        self._t_boot = 0.0
        self._next_tick = 0.0  # when the device thread makes the next reading

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Open the pty and start the device thread; returns the device path for the host."""
        path = super().start()
        self._log.info("spirometer on %s at %.0f Hz", path, 1.0 / self._period_s)
        return path

    def _on_start(self) -> None:
        self._t_boot = self._clock()
        if self.t0 is None:
            self.t0 = self._t_boot

    def __enter__(self) -> SpirometerSim:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- observation and fault hooks ---------------------------------------------------------

    @property
    def valve_closed(self) -> bool:
        with self._cond:
            return self.model.valve_closed

    def stats(self) -> dict:
        """readings (SPV written), status (STS written), commands (ACKed), rejected (NAKed),
        dropped (lines the full pty buffer did not take), garbage (noise lines written in
        place of readings), lost_on_line (readings made while the cable was pulled)."""
        with self._cond:
            return dict(self._stats)

    def set_streaming(self, enabled: bool) -> None:
        """Fault hook: stop (or resume) sending readings; when it returns, none is in flight.

        The device keeps measuring, moving its valve and answering commands.
        """
        with self._cond:
            self._streaming = enabled
        self._log.info("readings %s", "resumed" if enabled else "stopped")

    def inject(self, data: bytes) -> None:
        """Fault hook: write ``data`` as it is before the next reading (never inside a line)."""
        with self._cond:
            self._injected.append(bytes(data))

    def _on_disconnect_locked(self) -> None:
        self._stats["lost_on_line"] += len(self._wire)

    # -- device thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        self._next_tick = self._clock()
        super()._serve()

    def _wait_timeout(self) -> float:
        with self._cond:
            wake_at = self._next_tick
            due = self._wire.next_due()
            if due is not None:
                wake_at = min(wake_at, due)
        return max(0.0, wake_at - self._clock())

    def _on_wake(self, readable: bool) -> None:
        if readable:
            for line in self._read_lines():
                self._handle_line(line)
        now = self._clock()
        if now >= self._next_tick:
            self._tick(now)
            self._next_tick += self._period_s
            if self._next_tick < now:
                self._next_tick = now + self._period_s  # fell behind (loaded machine): skip
        else:
            with self._cond:
                self._write_due_locked(now)

    def _patient_t(self, now: float) -> float:
        return max(0.0, now - self.t0)

    def _t_ms_locked(self, now: float) -> int:
        skew_s = self.clock_skew_s if "clock-skew" in self._faults else 0.0
        return int((now - self._t_boot - skew_s) * 1e3) % T_MS_MODULO

    def _tick(self, now: float) -> None:
        patient_t = self._patient_t(now)
        with self._cond:
            t_ms = self._t_ms_locked(now)
            faults = set(self._faults)
            line_down = "disconnect" in faults
            if not line_down:
                for data in self._injected:
                    self._write_locked(data)
            self._injected.clear()
            measurement, changes = self.model.step(patient_t)
            if line_down:
                for event, arg in changes:
                    self._log.info("status %s,%s lost: the cable is pulled", event, arg)
            else:
                self._write_status_locked(t_ms, changes)
            if not self._streaming or "freeze" in faults:
                self._write_due_locked(now)
                return
            seq, self._seq = self._seq, (self._seq + 1) % SEQ_MODULO
            if line_down:
                self._stats["lost_on_line"] += 1
                return
            m = measurement
            volume_ml = m.volume_ml + (self.jump_ml if "jump" in faults else 0)
            flow_ml_s = m.flow_ml_s
            shaping = faults & _TRANSPORT_KINDS
            if "garbage" in faults:
                data = noise_line(self._fault_rng, self.garbage_bytes)
                shaping.add("garbage")
            elif "nan" in faults:
                data = frame(
                    f"SPV,{seq},{t_ms},nan,nan,{'C' if m.valve_closed else 'O'},{m.level_ml}"
                )
                volume_ml = flow_ml_s = None
                shaping |= faults & {"nan", "clock-skew"}
            else:
                data = frame(
                    f"SPV,{seq},{t_ms},{volume_ml},{flow_ml_s},"
                    f"{'C' if m.valve_closed else 'O'},{m.level_ml}"
                )
                shaping |= faults & {"jump", "clock-skew"}
            record = SentReading(
                seq,
                math.nan,
                patient_t,
                volume_ml,
                flow_ml_s,
                m.valve_closed,
                m.level_ml,
                t_ms,
                fault_label(shaping),
            )
            self._push_locked(_Pending(data, record, "garbage" in shaping), now)
            self._write_due_locked(now)

    def _record_sent_locked(self, item: _Pending, t_sent: float) -> None:
        self._stats["garbage" if item.garbage else "readings"] += 1
        self.sent.append(replace(item.record, t_sent=t_sent))

    def _handle_line(self, line: bytes) -> None:
        now = self._clock()
        patient_t = self._patient_t(now)
        with self._cond:
            if "disconnect" in self._faults:
                return  # read before the cable went, but it never arrived
            try:
                command, seq, arg = _parse_command(line)
                if command == "VALVE":
                    changes = self.model.valve(patient_t, arg == "C")
                elif command == "LEVEL":
                    changes = self.model.set_level(int(arg))
                else:
                    try:
                        changes = self.model.zero(patient_t)
                    except Rejected as rejected:
                        rejected.seq = seq
                        raise
            except Rejected as rejected:
                self._stats["rejected"] += 1
                seq_field = "-" if rejected.seq is None else str(rejected.seq)
                self._log.warning("NAK %s: %r", rejected.reason, line[:MAX_LINE_BYTES])
                self._write_locked(frame(f"NAK,{seq_field},{rejected.reason}"))
                return
            self._stats["commands"] += 1
            self._log.info("%s,%d%s", command, seq, "" if arg is None else f",{arg}")
            self._write_locked(frame(f"ACK,{seq},{command}"))
            self._write_status_locked(self._t_ms_locked(now), changes)

    def _write_status_locked(self, t_ms: int, changes: list[tuple[str, str]]) -> None:
        for event, arg in changes:
            self._log.info("status %s,%s", event, arg)
            if self._write_locked(frame(f"STS,{t_ms},{event},{arg}")):
                self._stats["status"] += 1
