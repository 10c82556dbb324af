"""Simulated linac gating interface box on a pty, for the hardware-in-the-loop rig.

It speaks the beam gating wire protocol (documented in ``motionctl.drivers.beam``) from the
box's side, as a real box would, and implements it here on its own (checksum included) so
that it checks the driver rather than sharing its mistakes:

* answers every valid ``ON``/``OFF``/``HB`` with ``ACK,<seq>,<ON|OFF>`` and every rejected
  line with ``NAK,<seq|->,<reason>``;
* is fail-safe like the real box: a watchdog turns the beam off when no valid message has
  arrived for ``watchdog_s`` and latches it off until a new ON; any rejected line turns the
  beam off;
* records every beam-on/off edge with the (injected) clock time at which the state changed,
  so that tests and the rig can measure gating latency and duty cycle from the box's side;
* can be told to stop answering (``set_acks_enabled(False)``) to exercise the host's
  ack-timeout path; the beam logic keeps running;
* can put raw bytes on the line to the host (``inject(data)``: line noise or a corrupted
  line between two intact replies, never inside one); the beam logic is not affected;
* records every reply it wrote in ``sent`` (``SentReply``: monotonic send time, the bytes,
  the fault that shaped them);
* takes runtime faults (``start_fault(kind)`` / ``stop_fault(kind)``; ``supported_faults``):

  ============  ============================================================================
  disconnect    the host link is lost (a pulled cable): the box holds the beam at once (as
                a real box does when it loses the host: it sees the handshake line drop
                and does not wait for its watchdog), reads nothing (what the host sends is
                lost, a half line included) and answers nothing. When the link is back
                the beam stays off until a new ON.
  freeze        the box stops answering but keeps its state: it goes on acting on ON/OFF/HB
                (the watchdog is fed), its replies are lost.
  garbage       every reply is replaced by random bytes of its length, the last a newline
                (the host sees one malformed line per reply, and no ACK).
  delay         every reply is written ``fault_delay_s`` (0.3 s: beyond the host's 0.1 s
                ack timeout) after it was due, in order; when the fault ends the backlog is
                written at once.
  ============  ============================================================================

  ``reorder``, ``nan``, ``jump`` and ``clock-skew`` are not supported: the box sends no
  stream of readings, values or timestamps for them to act on.

What it does NOT model:

* the linac: no dose, MU or beam-on ramp-up; the real beam follows the gate with its own
  delay (tens of milliseconds), which is not added to the edge times here;
* the electrical gate signal (TTL or relay timing, bounce) and the serial line itself: a pty
  delivers bytes at once, whatever the baud rate, with no noise or lost bytes;
* modem control lines, flow control and more than one host on the line;
* the box's own failures (reboot, stuck relay, firmware faults), apart from the ACK switch
  and the faults above;
* the linac console's own interlocks and the operator's beam-on key;
* drift between the box's clock and the host's (both use the injected clock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from motionctl.simulators.faults import fault_label, noise_line
from motionctl.simulators.pty_device import PtyDeviceSim, Rejected, frame, parse_host_line

MAX_LINE_BYTES = 80
COMMANDS = ("ON", "OFF", "HB")
IDLE_WAIT_S = 1.0  # stop() wakes the thread through a pipe; this bound is only a backstop
SUPPORTED_FAULTS = ("disconnect", "freeze", "garbage", "delay")


def _parse_command(line: bytes) -> tuple[str, int]:
    """Return (command, seq) of a host line, or raise Rejected with the NAK reason."""
    fields, seq = parse_host_line(line, MAX_LINE_BYTES)
    if fields[0] not in COMMANDS:
        raise Rejected("unknown_command", seq)
    if len(fields) != 2 or seq is None:
        raise Rejected("syntax", seq)
    return fields[0], seq


@dataclass(frozen=True, slots=True)
class SentReply:
    """One reply as written to the pty (for ``garbage``: the noise written in its place)."""

    t_sent: float  # the box's clock just before the write
    data: bytes
    fault: str | None = None  # the fault kinds that shaped it ("delay", "garbage+delay")


class LinacGatingSim(PtyDeviceSim):
    """Simulated linac gating interface box on a pty."""

    supported_faults: tuple[str, ...] = SUPPORTED_FAULTS
    _thread_suffix = "linac-sim"
    _max_line_bytes = MAX_LINE_BYTES
    _dropped_stat = "replies_dropped"
    _dropped_log_level = logging.WARNING

    def __init__(
        self,
        *,
        watchdog_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        name: str = "beam",
        fault_seed: int = 0,
    ) -> None:
        if watchdog_s <= 0:
            raise ValueError(f"watchdog_s must be positive, got {watchdog_s}")
        super().__init__(clock=clock, name=name, fault_seed=fault_seed)
        # _cond also guards the beam state, edges, stats and the ack switch.
        self._watchdog_s = watchdog_s
        self._beam_on = False
        self._deadline = 0.0  # watchdog deadline; only meaningful while the beam is on
        self._edges: list[tuple[float, bool]] = []
        self._acks_enabled = True
        self._stats = {
            "commands": 0,
            "heartbeats": 0,
            "malformed": 0,
            "watchdog_trips": 0,
            "replies_dropped": 0,
        }
        self.sent: list[SentReply] = []  # the wire queue holds them too, t_sent when made

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Open the pty, start the box thread; returns the device path for the host."""
        path = super().start()
        self._log.info("gating box on %s (watchdog %.0f ms)", path, self._watchdog_s * 1e3)
        return path

    def _on_thread_stopped(self) -> None:
        with self._cond:
            # A box that goes away takes the gate signal with it.
            self._set_beam_locked(False, "simulator stopped")

    def _on_thread_failed(self) -> None:
        with self._cond:
            self._set_beam_locked(False, "simulator failure")

    # -- observation and fault hooks ---------------------------------------------------

    @property
    def beam_on(self) -> bool:
        with self._cond:
            return self._beam_on

    def edges(self) -> list[tuple[float, bool]]:
        """Every beam edge as (clock time, new state), in order; a copy."""
        with self._cond:
            return list(self._edges)

    def wait_for_edge(self, beam_on: bool, after: float, timeout: float) -> float | None:
        """Time of the first edge to ``beam_on`` at or after ``after``; None on timeout."""

        def first() -> float | None:
            for t, state in self._edges:
                if state == beam_on and t >= after:
                    return t
            return None

        with self._cond:
            self._cond.wait_for(lambda: first() is not None, timeout=timeout)
            return first()

    def stats(self) -> dict:
        """commands (ON/OFF), heartbeats, malformed (lines NAKed), watchdog_trips,
        replies_dropped (host not reading)."""
        with self._cond:
            return dict(self._stats)

    def set_acks_enabled(self, enabled: bool) -> None:
        """Fault hook: stop (or resume) answering. The beam logic keeps running."""
        with self._cond:
            self._acks_enabled = enabled
        self._log.info("replies %s", "enabled" if enabled else "disabled")

    def inject(self, data: bytes) -> bool:
        """Fault hook: write ``data`` to the host now, between two replies (never inside
        one); returns False if it could not be written (stopped, link down, buffer full).
        The box's own state does not change: this is noise on its transmit line."""
        with self._cond:
            if self._master is None or "disconnect" in self._faults:
                return False
            if not self._write_locked(data, log_drop=False):
                return False
        self._log.info("injected %r", data[:MAX_LINE_BYTES])
        return True

    def _on_disconnect_locked(self) -> None:
        self._set_beam_locked(False, "host link lost (fault: disconnect)")

    # -- box thread --------------------------------------------------------------------

    def _on_wake(self, readable: bool) -> None:
        now = self._clock()
        with self._cond:
            # Before reading: a message that arrives after the deadline is too late.
            self._check_watchdog_locked(now)
            self._write_due_locked(now)
        if not readable:
            return
        for line in self._read_lines():
            self._reply(self._handle_line(line, now))

    def _wait_timeout(self) -> float:
        with self._cond:
            wake_at = self._clock() + IDLE_WAIT_S
            if self._beam_on:
                # Wake exactly at the watchdog deadline: the trip is on time without polling.
                wake_at = min(wake_at, self._deadline)
            due = self._wire.next_due()
            if due is not None:
                wake_at = min(wake_at, due)  # a delayed reply goes out on time
            return max(0.0, wake_at - self._clock())

    def _check_watchdog_locked(self, now: float) -> None:
        if self._beam_on and now >= self._deadline:
            self._stats["watchdog_trips"] += 1
            self._set_beam_locked(
                False, f"watchdog: no valid message for {self._watchdog_s * 1e3:.0f} ms"
            )

    def _handle_line(self, line: bytes, now: float) -> bytes | None:
        with self._cond:
            if "disconnect" in self._faults:
                return None  # read before the link went, but it never arrived
        try:
            command, seq = _parse_command(line)
        except Rejected as rejected:
            with self._cond:
                self._stats["malformed"] += 1
                self._set_beam_locked(False, f"rejected line ({rejected.reason})")
            self._log.warning("NAK %s: %r", rejected.reason, line[:MAX_LINE_BYTES])
            seq_field = "-" if rejected.seq is None else str(rejected.seq)
            return frame(f"NAK,{seq_field},{rejected.reason}")
        with self._cond:
            self._deadline = now + self._watchdog_s
            if command == "HB":
                self._stats["heartbeats"] += 1
            else:
                self._stats["commands"] += 1
                self._set_beam_locked(command == "ON", f"{command},{seq}")
            state = "ON" if self._beam_on else "OFF"
        self._log.debug("%s,%d -> %s", command, seq, state)
        return frame(f"ACK,{seq},{state}")

    def _set_beam_locked(self, beam_on: bool, why: str) -> None:
        if beam_on == self._beam_on:
            return
        t = self._clock()  # the moment the gate changes, not when the line was read
        self._beam_on = beam_on
        self._edges.append((t, beam_on))
        self._cond.notify_all()
        self._log.info("beam %s at %.6f (%s)", "ON" if beam_on else "OFF", t, why)

    def _reply(self, reply: bytes | None) -> None:
        if reply is None:
            return
        with self._cond:
            faults = self._faults
            if not self._acks_enabled or "freeze" in faults or "disconnect" in faults:
                return
            shaping = faults & {"garbage", "delay"}
            if "garbage" in faults:
                reply = noise_line(self._fault_rng, len(reply))
            now = self._clock()
            self._push_locked(SentReply(now, reply, fault_label(shaping)), now)
            self._write_due_locked(now)

    def _record_sent_locked(self, item: SentReply, t_sent: float) -> None:
        self.sent.append(SentReply(t_sent, item.data, item.fault))
