"""Beam gating interface driver: asks the linac's gating box to hold or release the beam.

The gating box sits between this controller and the linac's gating interlock (a TTL or
relay input). The controller decides; this driver carries each decision to the box over a
serial line, keeps the link alive with heartbeats, matches every reply to what was sent,
measures the round trip and says when the link is in doubt. The box is the last word: it is
fail-safe on its own (watchdog, hold on doubt), so a dead controller or a cut cable holds the
beam without any help from this side.

Wire protocol
=============

Transport
    A serial line, 115200 baud, 8 data bits, no parity, 1 stop bit (8N1), no flow control.
    Any pyserial URL works (``/dev/ttyUSB0``, a pty, ``socket://host:port``, ``loop://``).

Framing (NMEA style)
    Every message is one line of printable ASCII::

        $<BODY>*<CS>\\n

    * ``BODY`` is comma-separated fields of printable ASCII (0x20-0x7E) without ``$`` or
      ``*``. The first field is the message type.
    * ``CS`` is the XOR of all ``BODY`` bytes (not ``$``, ``*`` or the newline), written as
      exactly two UPPERCASE hex digits. Example: ``$ON,12*2E\\n``.
    * A line is at most 80 bytes including ``$``, ``*``, checksum and the ``\\n``.
    * The terminator is a single ``\\n``; ``\\r`` is not allowed anywhere.
    * A receiver rejects a line that is too long, contains a byte outside 0x20-0x7E (other
      than the final ``\\n``), lacks the leading ``$`` or the ``*``, has a checksum field
      that is not two uppercase hex digits, or whose checksum does not match.

Host -> box
    ``ON,<seq>``    request beam enable
    ``OFF,<seq>``   request beam hold
    ``HB,<seq>``    heartbeat: "the host is alive"; changes nothing else

    ``seq`` is a decimal integer 0..65535 (no sign, no spaces), incremented by one for every
    message the host sends, of any type, wrapping 65535 -> 0. The host starts at 0 each time
    it opens the port.

Box -> host
    ``ACK,<seq>,<ON|OFF>``       for every valid command, in the order received; the state
                                 is the box's beam state *after* acting on the command.
    ``NAK,<seq|->,<reason>``     for a line the box rejects. ``seq`` is ``-`` unless the
                                 line passed the checksum and carried a valid seq. Reasons:
                                 ``checksum``, ``syntax``, ``non_ascii``, ``too_long``,
                                 ``unknown_command``.

Box rules (fail-safe)
    * The initial state is OFF.
    * The beam is on only while the last ON has not been followed by an OFF *and* a valid
      message (ON, OFF or HB) arrived within ``watchdog_s`` (0.25 s by default).
    * When the watchdog trips, the box turns the beam off by itself and stays off (latched):
      heartbeats do not bring it back; only a new ON does.
    * Every line the box NAKs (malformed, bad checksum, unknown command) also turns the beam
      off: doubt means hold. A NAK therefore always means "the beam is now off".
    * A NAKed line does not feed the watchdog.

Host rules
    * ON/OFF are sent when the host's decision changes (the first decision after opening is
      always sent); HB is sent every heartbeat period (typically 20-50 ms) from the
      controller's own loop, so a stalled controller stops the heartbeats and the box holds.
    * Every message must be acknowledged within ``ack_timeout_s`` (0.1 s by default);
      otherwise, or on any NAK, the link is in doubt and the gate must hold.
    * A line from the box that the host cannot read (framing, checksum, fields, or a
      message type a box does not send) puts the link in doubt too, even when it arrives
      between intact ACKs: it may have been a reply, or the box may be failing, and the
      host cannot tell which. Doubt means hold, on this side as on the box's.
    * On shutdown the host sends OFF.

Recovery after a fault (this driver)
    ``ack_lost``, ``nak:<reason>``, ``malformed:<reason>`` (an unreadable line from the box;
    ``reason`` as in ``ProtocolError``) and ``box_hold`` (the box reported OFF while the
    host asked for ON: its watchdog tripped or it dropped the beam on doubt) are latched. They
    clear only when an OFF sent after the fault is acknowledged in time with state OFF, i.e.
    when the host and the box agree again that the beam is held. While a fault is latched,
    ``command(False)`` always sends, so the gate's hold decision is what re-synchronises the
    link; re-enabling then takes a fresh ON. ``reader_error`` clears only by ``close()`` and
    ``open()``. A ``port_error`` (a read or write that fails: the USB adapter pulled, say)
    closes the port, and the reader opens it again with back-off (50 ms doubling up to
    ``reconnect_max_s``) until it opens or ``close()``; ``fault()`` says ``port_error``
    throughout, and once the port is open again the fault stays latched like the ones above:
    the box may have dropped messages or held by its watchdog meanwhile, so only an OFF sent
    after the reopening and acknowledged with state OFF clears it. Messages outstanding when
    the port failed are counted lost.

Events (``on_event``, as ``DeviceEvent(name, t, kind, detail)``)
    ``malformed`` (a line from the box that does not parse, or is not an ACK/NAK; the detail
    says what was wrong and the line's length), ``nak``, ``ack_lost`` (one per message not
    acknowledged in time), ``box_hold``, ``fault_cleared``, ``unmatched_ack`` (an ACK for
    no outstanding seq: late, or not ours), ``port_error``, ``connected`` (detail: the URL;
    the port opened again after a ``port_error``), ``reader_error``.

Threads: one reader thread per open port parses replies, matches ACKs, and calls ``on_ack``
and ``on_event`` (so callbacks run on the reader thread, without the driver's lock held, and
must not raise: an exception in a callback ends the reader and latches ``reader_error``).
``command``, ``heartbeat``, ``fault`` and ``stats`` are thread-safe; ``open`` and ``close``
belong to the one thread that owns the interface.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import serial

from motionctl.types import DeviceEvent

BAUDRATE = 115200
READ_TIMEOUT_S = 0.05  # bounds how long close() waits for the reader to notice the stop
WRITE_TIMEOUT_S = 0.1  # a box that stops reading must not block the controller loop for good
JOIN_TIMEOUT_S = 2.0
MAX_LINE_BYTES = 80
SEQ_MODULO = 65536
DEFAULT_ACK_TIMEOUT_S = 0.1
RECONNECT_FIRST_S = 0.05  # the first retry after a port failure; doubles each time ...
DEFAULT_RECONNECT_MAX_S = 1.0  # ... up to this (config: devices.beam.reconnect_max_s)

_HEX_UPPER = frozenset(b"0123456789ABCDEF")


class ProtocolError(ValueError):
    """A line that breaks the wire protocol; the message says what was wrong.

    ``reason`` is the short token a box would put in its NAK (``checksum``, ``syntax``,
    ``non_ascii``, ``too_long``) or ``unexpected`` for a well-framed line that is not a
    reply this driver understands.
    """

    def __init__(self, message: str, reason: str = "syntax") -> None:
        super().__init__(message)
        self.reason = reason


def checksum(body: bytes) -> int:
    """XOR of all bytes of ``body`` (NMEA style)."""
    value = 0
    for byte in body:
        value ^= byte
    return value


def _check_body(body: bytes) -> None:
    for offset, byte in enumerate(body):
        if byte < 0x20 or byte == 0x7F:
            raise ProtocolError(f"control character 0x{byte:02X} at body offset {offset}")
        if byte in b"$*":
            raise ProtocolError(f"reserved character {chr(byte)!r} at body offset {offset}")


def frame(body: str) -> bytes:
    """Frame ``body`` as one line: ``frame("ON,12") == b"$ON,12*2E\\n"``.

    Raises ProtocolError for a body that the other side would have to reject, so the host
    never puts a line on the wire that it knows to be invalid.
    """
    try:
        raw = body.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"non-ASCII character at body offset {exc.start}", "non_ascii") from exc
    _check_body(raw)
    line = b"$%s*%02X\n" % (raw, checksum(raw))
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"line too long: {len(line)} bytes > {MAX_LINE_BYTES}", "too_long")
    return line


def parse_line(line: bytes) -> tuple[str, ...]:
    """Check one line's framing and checksum and return the fields of its body.

    ``line`` may end with its ``\\n`` or not. Raises ProtocolError naming the problem.
    """
    # Length first, so a flood of garbage costs no more than 80 bytes of work per line.
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"line too long: {len(line)} bytes > {MAX_LINE_BYTES}", "too_long")
    for offset, byte in enumerate(line):
        if byte > 0x7F:
            raise ProtocolError(f"non-ASCII byte 0x{byte:02X} at offset {offset}", "non_ascii")
    text = line[:-1] if line.endswith(b"\n") else line
    if not text.startswith(b"$"):
        raise ProtocolError("missing '$' at start of line")
    star = text.rfind(b"*")
    if star < 0:
        raise ProtocolError("missing '*' before the checksum")
    body, cs_field = text[1:star], text[star + 1 :]
    if len(cs_field) != 2 or not all(byte in _HEX_UPPER for byte in cs_field):
        raise ProtocolError(
            f"checksum field {cs_field.decode('ascii')!r} is not two uppercase hex digits"
        )
    _check_body(body)
    computed = checksum(body)
    if int(cs_field, 16) != computed:
        raise ProtocolError(
            f"checksum mismatch: line says {cs_field.decode('ascii')}, body gives {computed:02X}",
            "checksum",
        )
    return tuple(body.decode("ascii").split(","))


class LineSplitter:
    """Cuts a byte stream into ``\\n``-terminated lines without unbounded buffering.

    A stretch of more than ``max_bytes`` without a newline is handed on cut short, at
    ``max_bytes + 1`` bytes (so that parse_line rejects it as too long), and the rest of it up
    to the next newline is dropped: one over-long line, one rejection.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_bytes:
                    if not self._discarding:
                        lines.append(bytes(self._buffer[: self._max_bytes + 1]))
                        self._discarding = True
                    self._buffer.clear()
                return lines
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False  # the tail of a line already reported as too long
                continue
            lines.append(line)


def write_all(port: serial.SerialBase, data: bytes, timeout_s: float) -> None:
    """Write ``data`` to ``port``; raise ``serial.SerialTimeoutException`` only if the port
    has not taken all of it within ``timeout_s`` (a device that stopped reading).

    pyserial's POSIX ``write()`` with a ``write_timeout`` raises SerialTimeoutException
    whenever its deadline has passed by the time ``os.write()`` returns, even when every
    byte was written (pyserial issue #281, open since 2017): on a loaded machine a thread
    descheduled for 0.1 s around a completed write reported the gating box's port as
    failed, and the driver closed and reopened it (a spurious ``disconnected:beam`` hold,
    seen with six simulated sessions on two cores). For a port with a file descriptor
    (a tty, pty or USB adapter, opened non-blocking by pyserial) the bytes are written
    here and the clock is read only while some remain; other ports (``loop://``,
    ``socket://``) use their own ``write()``. OSError (an adapter pulled out) propagates.
    """
    fd = getattr(port, "fd", None)
    if fd is None:
        port.write(data)
        return
    view = memoryview(data)
    deadline = None
    while True:
        try:
            view = view[os.write(fd, view) :]
        except (BlockingIOError, InterruptedError):
            pass
        if not view:
            return
        now = time.monotonic()
        deadline = now + timeout_s if deadline is None else deadline
        if now >= deadline or not select.select([], [fd], [], deadline - now)[1]:
            raise serial.SerialTimeoutException(
                f"Write timeout: {len(view)} of {len(data)} bytes not taken in {timeout_s:g} s"
            )


def reopen_with_backoff(
    open_port: Callable[[], serial.SerialBase],
    stop: threading.Event,
    max_s: float,
    log: logging.Logger,
    what: str,
) -> serial.SerialBase | None:
    """Open a failed serial port again: ``open_port()`` until it succeeds, waiting 50 ms
    after the first failure and doubling up to ``max_s``; None once ``stop`` is set. Shared
    by the serial drivers (a USB adapter pulled and plugged back in)."""
    backoff = RECONNECT_FIRST_S
    while not stop.wait(backoff):
        try:
            return open_port()
        except (OSError, serial.SerialException) as exc:
            log.debug("reopening %s failed: %s", what, exc)
            backoff = min(2 * backoff, max_s)
    return None


def _parse_seq(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) < SEQ_MODULO):
        raise ProtocolError(f"seq {text!r} is not a decimal integer 0..{SEQ_MODULO - 1}")
    return int(text)


class _Reply(NamedTuple):
    kind: str  # "ACK" or "NAK"
    seq: int | None
    beam_on: bool  # ACK only
    reason: str  # NAK only


def _parse_reply(fields: tuple[str, ...]) -> _Reply:
    kind = fields[0]
    if kind not in ("ACK", "NAK"):
        raise ProtocolError(
            f"unexpected message type {kind!r}: a box sends only ACK and NAK", "unexpected"
        )
    if len(fields) != 3:
        raise ProtocolError(f"{kind} needs 3 fields, got {len(fields)}")
    if kind == "ACK":
        if fields[2] not in ("ON", "OFF"):
            raise ProtocolError(f"ACK state {fields[2]!r} is neither ON nor OFF")
        return _Reply("ACK", _parse_seq(fields[1]), fields[2] == "ON", "")
    if not fields[2]:
        raise ProtocolError("NAK without a reason")
    seq = None if fields[1] == "-" else _parse_seq(fields[1])
    return _Reply("NAK", seq, False, fields[2])


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledged message: what was sent, when, and the box's beam state after it."""

    seq: int
    command: str
    t_sent: float
    t_ack: float
    beam_on: bool

    @property
    def round_trip_s(self) -> float:
        return self.t_ack - self.t_sent


@dataclass(frozen=True, slots=True)
class _Outstanding:
    command: str
    t_sent: float
    serial_no: int  # counts every message sent, never wraps: orders messages across seq wrap


class BeamInterface:
    """Host side of the beam gating protocol on one serial port (any pyserial URL)."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "beam",
        clock: Callable[[], float] = time.monotonic,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        on_ack: Callable[[Ack], None] | None = None,
        on_event: Callable[[DeviceEvent], None] | None = None,
        reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if ack_timeout_s <= 0:
            raise ValueError(f"ack_timeout_s must be positive, got {ack_timeout_s}")
        if not reconnect_max_s > 0:
            raise ValueError(f"reconnect_max_s must be positive, got {reconnect_max_s}")
        self._reconnect_max_s = reconnect_max_s
        self._url = url
        self._name = name
        self._clock = clock
        self._ack_timeout_s = ack_timeout_s
        self._on_ack = on_ack
        self._on_event = on_event
        self._log = logging.getLogger(f"motionctl.{name}")
        self._lock = threading.Lock()
        self._acked = threading.Condition(self._lock)  # notified whenever a message settles
        self._stop = threading.Event()
        self._port: serial.SerialBase | None = None
        self._reader: threading.Thread | None = None
        self._reset_session_locked()

    def _reset_session_locked(self) -> None:
        self._next_seq = 0
        self._sent_count = 0
        self._outstanding: dict[int, _Outstanding] = {}
        self._commanded = False
        self._requested_on = False
        self._acknowledged_on = False
        self._last_on_serial = 0
        self._last_ack_seq: int | None = None
        # latched: ack_lost, nak:<reason>, malformed:<reason>, box_hold
        self._fault: str | None = None
        self._fault_t = float("-inf")  # an OFF sent at or after this time may clear _fault
        # port_error (the reader reopens the port) or reader_error (needs close() + open())
        self._dead: str | None = None
        self._deliveries: list[Ack | DeviceEvent] = []  # handed to callbacks by the reader
        self._stats: dict[str, float | int | None] = {
            "sent": 0,
            "acks": 0,
            "naks": 0,
            "malformed": 0,
            "lost": 0,
            "unmatched": 0,
            "last_rtt_s": None,
            "max_rtt_s": None,
        }

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._url

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Open the port and start the reader thread."""
        with self._lock:
            if self._reader is not None:
                raise RuntimeError(f"{self._name}: already open")
        port = self._open_port()
        with self._lock:
            self._reset_session_locked()
            self._port = port
        self._stop.clear()
        self._reader = threading.Thread(
            target=self._reader_main, args=(port,), name=f"{self._name}-reader", daemon=False
        )
        self._reader.start()
        self._log.info("opened %s", self._url)

    def _open_port(self) -> serial.SerialBase:
        return serial.serial_for_url(
            self._url,
            baudrate=BAUDRATE,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            timeout=READ_TIMEOUT_S,
            write_timeout=WRITE_TIMEOUT_S,
        )

    def close(self) -> None:
        """Send OFF if the link still works, stop the reader, close the port. Idempotent."""
        with self._lock:
            port, reader, dead = self._port, self._reader, self._dead
        if reader is None:
            return
        if dead == "port_error":
            self._log.warning("closing without OFF: the port has failed")
        elif port is not None:
            self._send_off_before_close(wait_for_ack=dead is None)
        self._stop.set()
        try:
            if reader is not threading.current_thread():
                reader.join(JOIN_TIMEOUT_S)
                if reader.is_alive():
                    raise RuntimeError(f"{self._name}: reader thread did not stop")
        finally:
            # Only the reader replaces the port, and it has ended (or is this thread).
            with self._lock:
                port, self._port = self._port, None
                self._reader = None
                self._dead = None  # closed: fault() says not_open
            if port is not None:
                port.close()
            self._log.info("closed %s", self._url)

    def _send_off_before_close(self, wait_for_ack: bool) -> None:
        try:
            with self._lock:
                seq = self._send_locked("OFF")
                self._requested_on = False
                self._commanded = True
                if not wait_for_ack:  # no reader left to see the ACK
                    return
                # Wait for the box to confirm the hold, so the ACK is not left in the line
                # and the log says whether the box agreed.
                self._acked.wait_for(
                    lambda: seq not in self._outstanding, timeout=self._ack_timeout_s
                )
                confirmed = self._last_ack_seq == seq and not self._acknowledged_on
        except (OSError, serial.SerialException) as exc:
            # Closing must still release the port; the box's watchdog holds the beam anyway.
            self._log.error("could not send OFF before closing: %s", exc)
            return
        if not confirmed:
            self._log.warning(
                "OFF,%d sent on close was not acknowledged within %.0f ms",
                seq,
                self._ack_timeout_s * 1e3,
            )

    def __enter__(self) -> BeamInterface:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- commands ----------------------------------------------------------------------

    def command(self, enable: bool, force: bool = False) -> int | None:
        """Ask for beam enable (True) or hold (False); returns the seq sent, or None.

        Sends only when the request differs from the last one sent, on the first call after
        open(), when ``force`` is set, or, for a hold, while a fault is latched (the hold's
        ACK is what clears the fault).
        """
        with self._lock:
            in_doubt = self._fault_locked(self._clock()) is not None
            unchanged = self._commanded and enable == self._requested_on
            if unchanged and not force and not (in_doubt and not enable):
                return None
            seq = self._send_locked("ON" if enable else "OFF")
            self._requested_on = enable
            self._commanded = True
            return seq

    def heartbeat(self) -> int:
        """Send a heartbeat; returns its seq. Call it every heartbeat period."""
        with self._lock:
            return self._send_locked("HB")

    def _send_locked(self, command: str) -> int:
        if self._port is None:
            raise serial.PortNotOpenError()
        seq = self._next_seq
        line = frame(f"{command},{seq}")
        t_sent = self._clock()
        self._sent_count += 1
        # Registered before the write: the reply can arrive before write() returns.
        self._outstanding[seq] = _Outstanding(command, t_sent, self._sent_count)
        try:
            # Written under the lock so that seq order is wire order.
            write_all(self._port, line, WRITE_TIMEOUT_S)
        except (OSError, serial.SerialException) as exc:
            del self._outstanding[seq]
            self._mark_dead_locked("port_error", f"write failed: {exc}", t_sent)
            raise
        self._next_seq = (seq + 1) % SEQ_MODULO
        self._stats["sent"] += 1
        if command == "ON":
            self._last_on_serial = self._sent_count
        self._log.debug("sent %s,%d", command, seq)
        return seq

    # -- state -------------------------------------------------------------------------

    @property
    def requested_on(self) -> bool:
        """What the host last asked for (False before the first command)."""
        with self._lock:
            return self._requested_on

    @property
    def acknowledged_on(self) -> bool:
        """The box's beam state according to its last ACK (False after any NAK)."""
        with self._lock:
            return self._acknowledged_on

    def fault(self) -> str | None:
        """None while the link is healthy, else why it is in doubt.

        ``not_open``, ``port_error``, ``reader_error``, ``ack_lost``, ``nak:<reason>``,
        ``malformed:<reason>`` or ``box_hold``. Outstanding messages are checked against
        ``ack_timeout_s`` on the injected clock at call time.
        """
        with self._lock:
            return self._fault_locked(self._clock())

    def ack_deadline(self) -> float | None:
        """When the oldest unacknowledged message times out (clock time), or None: lets the
        controller wake exactly then instead of finding out at its next decision."""
        with self._lock:
            if not self._outstanding:
                return None
            return min(sent.t_sent for sent in self._outstanding.values()) + self._ack_timeout_s

    def stats(self) -> dict:
        """Counters: sent, acks, naks, malformed, lost, unmatched; last_rtt_s, max_rtt_s."""
        with self._lock:
            return dict(self._stats)

    def _fault_locked(self, now: float) -> str | None:
        if self._dead is not None:  # (a failed port is closed while it is reopened)
            return self._dead
        if self._port is None:
            return "not_open"
        self._expire_locked(now)
        return self._fault

    def _expire_locked(self, now: float) -> None:
        expired = [
            seq
            for seq, sent in self._outstanding.items()
            if now - sent.t_sent > self._ack_timeout_s
        ]
        for seq in expired:
            sent = self._outstanding.pop(seq)
            self._stats["lost"] += 1
            detail = (
                f"{sent.command},{seq} not acknowledged within {self._ack_timeout_s * 1e3:.0f} ms"
            )
            self._latch_locked("ack_lost", sent.t_sent + self._ack_timeout_s, detail)
            self._deliveries.append(DeviceEvent(self._name, now, "ack_lost", detail))
        if expired:
            self._acked.notify_all()

    def _latch_locked(self, reason: str, t_fault: float, detail: str) -> bool:
        """Latch a fault; returns True if the link was healthy until now."""
        # Any later fault moves the time an OFF must beat to clear the latch.
        self._fault_t = max(self._fault_t, t_fault)
        if self._fault is None:
            self._fault = reason
            self._log.warning("link in doubt (%s): %s", reason, detail)
            return True
        self._log.debug("%s while already in doubt (%s): %s", reason, self._fault, detail)
        return False

    def _mark_dead_locked(self, reason: str, detail: str, t: float) -> None:
        if self._dead is None:
            self._dead = reason
            self._log.error("%s: %s", reason, detail)
            self._deliveries.append(DeviceEvent(self._name, t, reason, detail))

    # -- reader thread -----------------------------------------------------------------

    def _reader_main(self, port: serial.SerialBase) -> None:
        try:
            while self._read_loop(port):
                port = self._reopen()
                if port is None:
                    return
        except Exception as exc:
            # A bug here (or in a callback) must hold the beam, not leave the link
            # silently unserviced: record it as a fault and let the gate see it.
            self._log.exception("reader thread failed")
            with self._lock:
                # Nothing is delivered any more (the callbacks may be what failed); fault()
                # reports reader_error from now on.
                self._deliveries.clear()
                self._dead = None  # (a port_error being recovered is superseded)
                self._mark_dead_locked(
                    "reader_error", f"{type(exc).__name__}: {exc}", self._clock()
                )
        finally:
            self._acked_notify()

    def _reopen(self) -> serial.SerialBase | None:
        """Open the failed port again, with back-off; None if closed first."""
        port = reopen_with_backoff(
            self._open_port, self._stop, self._reconnect_max_s, self._log, self._url
        )
        if port is None:
            return None
        with self._lock:
            now = self._clock()
            self._port = port
            self._dead = None
            # What was in flight went down with the port: lost, and the link in doubt until
            # the box confirms a hold sent from now on.
            self._stats["lost"] += len(self._outstanding)
            self._outstanding.clear()
            self._commanded = False
            self._latch_locked("port_error", now, f"{self._url} reopened")
            self._deliveries.append(DeviceEvent(self._name, now, "connected", self._url))
            self._acked.notify_all()
        self._log.info("reopened %s", self._url)
        self._deliver()
        return port

    def _acked_notify(self) -> None:
        with self._lock:
            self._acked.notify_all()

    def _read_loop(self, port: serial.SerialBase) -> bool:
        """Read until stopped (False) or the port fails (True: it has been closed)."""
        splitter = LineSplitter()
        while not self._stop.is_set():
            failure = ""
            try:
                data = port.read(port.in_waiting or 1)
            except (OSError, serial.SerialException) as exc:
                failure = f"read failed: {exc}"
            with self._lock:
                if failure:
                    self._mark_dead_locked("port_error", failure, self._clock())
                failed = self._dead == "port_error"  # (a write may have failed)
                if failed:
                    self._port = None
                    port.close()
            if failed:
                self._deliver()
                return True
            now = self._clock()
            with self._lock:
                for line in splitter.feed(data) if data else ():
                    self._handle_line_locked(line, now)
                # Expire here too, so ack_lost is reported even if nobody polls fault().
                if self._dead is None:
                    self._expire_locked(now)
            self._deliver()
        return False

    def _deliver(self) -> None:
        with self._lock:
            items, self._deliveries = self._deliveries, []
        for item in items:
            if isinstance(item, Ack):
                if self._on_ack is not None:
                    self._on_ack(item)
            elif self._on_event is not None:
                self._on_event(item)

    def _handle_line_locked(self, line: bytes, now: float) -> None:
        try:
            reply = _parse_reply(parse_line(line))
        except ProtocolError as exc:
            self._stats["malformed"] += 1
            detail = f"{exc} ({len(line)} bytes)"
            self._log.warning("malformed line from box: %s", detail)
            self._deliveries.append(DeviceEvent(self._name, now, "malformed", detail))
            # Latched like a NAK: only a hold the box confirms afterwards clears the doubt.
            self._latch_locked(f"malformed:{exc.reason}", now, detail)
            return
        if reply.kind == "ACK":
            self._handle_ack_locked(reply.seq, reply.beam_on, now)
        else:
            self._handle_nak_locked(reply.seq, reply.reason, now)

    def _handle_ack_locked(self, seq: int, beam_on: bool, now: float) -> None:
        self._stats["acks"] += 1
        self._acknowledged_on = beam_on
        self._last_ack_seq = seq
        sent = self._outstanding.pop(seq, None)
        self._acked.notify_all()
        if sent is None:
            self._stats["unmatched"] += 1
            detail = f"ACK,{seq} matches no outstanding message (late, or not ours)"
            self._log.warning(detail)
            self._deliveries.append(DeviceEvent(self._name, now, "unmatched_ack", detail))
            return
        ack = Ack(seq, sent.command, sent.t_sent, now, beam_on)
        rtt = ack.round_trip_s
        self._stats["last_rtt_s"] = rtt
        max_rtt = self._stats["max_rtt_s"]
        self._stats["max_rtt_s"] = rtt if max_rtt is None else max(max_rtt, rtt)
        self._deliveries.append(ack)
        self._log.debug("ACK,%d,%s after %.2f ms", seq, "ON" if beam_on else "OFF", rtt * 1e3)
        if rtt > self._ack_timeout_s:
            self._stats["lost"] += 1
            detail = f"ACK for {sent.command},{seq} came after {rtt * 1e3:.1f} ms"
            self._latch_locked("ack_lost", sent.t_sent + self._ack_timeout_s, detail)
            self._deliveries.append(DeviceEvent(self._name, now, "ack_lost", detail))
        elif (
            self._fault is not None
            and sent.command == "OFF"
            and not beam_on
            and sent.t_sent >= self._fault_t
        ):
            detail = f"hold confirmed by ACK,{seq},OFF after {self._fault}"
            self._log.info(detail)
            self._fault = None
            self._deliveries.append(DeviceEvent(self._name, now, "fault_cleared", detail))
        # The box says OFF to a message sent after our ON, and we still want ON: it has
        # dropped the beam by itself (watchdog or doubt) and will not re-enable on its own.
        if (
            not beam_on
            and self._requested_on
            and sent.command != "OFF"
            and sent.serial_no >= self._last_on_serial
        ):
            detail = f"box reports OFF (ACK,{seq}) while ON is requested"
            if self._latch_locked("box_hold", now, detail):
                self._deliveries.append(DeviceEvent(self._name, now, "box_hold", detail))

    def _handle_nak_locked(self, seq: int | None, reason: str, now: float) -> None:
        self._stats["naks"] += 1
        self._acknowledged_on = False  # the box holds on every line it rejects
        sent = self._outstanding.pop(seq, None) if seq is not None else None
        self._acked.notify_all()
        detail = f"NAK,{'-' if seq is None else seq},{reason}"
        if sent is not None:
            detail += f" for {sent.command},{seq}"
        self._deliveries.append(DeviceEvent(self._name, now, "nak", detail))
        self._latch_locked(f"nak:{reason}", now, detail)
