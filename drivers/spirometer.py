"""Breath-hold spirometer driver (Active Breathing Coordinator style) over a serial line.

A breath-hold spirometer measures the air the patient breathes through a mouthpiece, shows
the lung volume on a feedback display next to a target level, and has a valve that closes
the airway so that the patient holds their breath at that level. This driver reads its data
stream into ``SpirometerSample``s (litres, seconds), reports everything else it notices as
``DeviceEvent``s, and sends the three commands a host needs: close/open the valve, set the
feedback level, re-zero.

Wire protocol
=============

Transport
    A serial line, 115200 baud, 8N1, no flow control. Any pyserial URL works
    (``/dev/ttyUSB0``, a pty, ``socket://host:port``, ``loop://``).

Framing (the same as the beam gating interface, ``motionctl.drivers.beam``)
    Every message is one line of printable ASCII::

        $<BODY>*<CS>\\n

    * ``BODY`` is comma-separated fields of printable ASCII (0x20-0x7E) without ``$`` or
      ``*``; the first field is the message type.
    * ``CS`` is the XOR of all ``BODY`` bytes, as exactly two UPPERCASE hex digits.
    * At most 80 bytes per line including ``$``, ``*``, checksum and ``\\n``; the terminator
      is a single ``\\n``, ``\\r`` is not allowed anywhere.

Numbers
    Decimal integers: an optional ``-``, then 1 to 10 digits without leading zeros (``0``
    itself is fine); no ``+``, spaces or decimal point. Volumes are millilitres (ml) relative
    to the device's zero (end-exhale when it was last zeroed), positive = more air in the
    lungs; flows are ml/s, positive = inhaling; device times are milliseconds.

Device -> host
    ``SPV,<seq>,<t_ms>,<volume_ml>,<flow_ml_s>,<valve>,<level_ml>``
        One reading, at the device's data rate (25-50 Hz; the simulator's default is 30 Hz).

        ============  ===================  ============================================
        field         range                meaning
        ============  ===================  ============================================
        seq           0..65535             +1 per SPV line, wrapping 65535 -> 0; 0 at
                                           power-up. A jump means readings were lost;
                                           a step back, that a reading came late.
        t_ms          0..4294967295        the device's own millisecond clock at the
                                           measurement (wraps 4294967295 -> 0 after
                                           49.7 days)
        volume_ml     -2000..8000          lung volume above the device's zero
        flow_ml_s     -19999..19999        airflow, + inhale
        valve         ``O`` or ``C``       breath-hold valve open / closed
        level_ml      0..8000              target level on the patient's feedback display
        ============  ===================  ============================================

        Example: ``$SPV,17,5123,612,-45,C,600*XX``. A reading outside these ranges is not
        physical (volume beyond -2..8 l, |flow| of 20 l/s or more) and is rejected.

    ``STS,<t_ms>,<event>,<arg>``
        A change of state, sent when it happens and before the next SPV (which already
        shows the new state). ``t_ms`` as in SPV. Events:

        * ``CLOSED,<host|patient>``: the valve closed, on a ``VALVE,C`` command (``host``)
          or because the patient began a breath hold (``patient``);
        * ``OPENED,<host|patient>``: the valve opened, on ``VALVE,O`` (``host``) or because
          the patient let go (``patient``: the end of a hold, or an early release such as
          a cough). The patient can always open the valve, whatever the host asked;
        * ``ZEROED,<ml>``: the reading ``<ml>`` (-2000..8000, before re-zeroing) became the
          new zero;
        * ``LEVEL,<ml>``: the feedback level is now ``<ml>`` (0..8000);
        * ``ERROR,<code>``: a device fault; ``code`` is letters, digits and ``_``. Readings
          after it may not be trustworthy.

    ``ACK,<seq>,<command>``
        For every accepted host command, in the order received: ``seq`` is the command's,
        ``command`` its type (``VALVE``, ``LEVEL`` or ``ZERO``).

    ``NAK,<seq|->,<reason>``
        For every rejected host line; ``seq`` is ``-`` unless the line passed the checksum
        and carried a valid seq. Reasons: ``checksum``, ``syntax``, ``non_ascii``,
        ``too_long``, ``unknown_command``, ``range`` (a LEVEL outside 0..8000),
        ``valve_closed`` (ZERO while the valve is closed: the zero would move under a hold).
        A rejected command changes nothing.

Host -> device
    ``VALVE,<seq>,<C|O>``  close (``C``) or open (``O``) the breath-hold valve
    ``LEVEL,<seq>,<ml>``   set the feedback level, 0..8000 ml
    ``ZERO,<seq>``         make the current volume reading the new zero (at end-exhale)

    ``seq`` is 0..65535, +1 per command of any type, wrapping; the host starts at 0 each
    time it opens the port. It is independent of the device's SPV seq. Commands that
    repeat the current state (``VALVE,C`` with the valve closed) are acknowledged and change
    nothing. A reply is expected within ``ack_timeout_s`` (0.25 s by default).

This driver
===========

* Opens the port with ``serial.serial_for_url(url, baudrate=115200, timeout=0.05)`` and
  discards whatever the line had buffered before it was opened (old readings would carry a
  wrong receipt time).
* One reader thread, ``f"{name}-reader"``, splits lines, parses and validates them, and
  calls ``sink`` with each ``SpirometerSample`` (volume, flow and level in litres and l/s;
  ``t_device`` = ``t_ms`` / 1000; ``t_rx`` from the injected clock when the bytes were
  read). Events go to ``on_event`` if given, else to ``sink`` as well. Callbacks run on
  the reader thread without the driver's lock held, and must not raise.
* Unwraps the device clock: ``t_device`` is ``t_ms`` / 1000 plus 4294.967296 s for every
  wrap of ``t_ms`` since the port was opened. Consecutive readings are taken to be less
  than half the clock's range (24.8 days) apart, so a small step back is a step back
  (reported, and passed on for the session to judge), never a wrap.
* Reads the SPV seq as the device counts it: a step forward of more than one is a
  ``seq_gap`` (the readings in between are counted lost); a step back of at most
  ``REORDER_WINDOW`` is a reading that arrived late (``reordered``, counted in
  ``stats()["reordered"]``; if it was one counted lost, it no longer is), and the
  expected seq stays where it was; a bigger step back is a ``seq_reset`` (a device that
  restarted its count) and the count resumes from there. A late reading is still
  delivered, with its own (earlier) ``t_device``: the session holds the beam on a device
  clock that goes backwards.
* Every line that breaks the protocol (framing, checksum, field count, a number that is not
  a number, a value out of range, an unknown message type) is dropped and reported as a
  ``malformed`` event whose detail says what was wrong and gives the line's length; it is
  counted per reason in ``stats()["malformed_by_reason"]`` (``checksum``, ``syntax``,
  ``non_ascii``, ``too_long``, ``fields``, ``number``, ``range``, ``unexpected``).
* Commands are sent by ``command_valve``, ``set_level`` and ``zero``, which return the seq;
  ``wait_reply(seq, timeout)`` gives the ``CommandReply`` (ACK, NAK with its reason, or
  ``timeout``) once it is known.
* Reconnects. A port that fails (a USB adapter unplugged, a read or write error, a write
  that times out) is closed and opened again by the reader thread, with back-off (50 ms
  doubling up to ``reconnect_max_s``), until it opens or ``stop()``: a serial line has no
  connection to lose, so the port is what is watched. Each opening is a ``connected`` event
  (``start()`` gives the first); the stream's counters and seq/clock tracking go on across
  it, so readings lost in the gap are counted as a ``seq_gap``, and a command outstanding
  when the port failed ends as ``ack_lost``.

Events (``DeviceEvent(name, t, kind, detail)``): ``malformed``, ``seq_gap`` (SPV readings
missing), ``reordered`` (an SPV reading arrived after a later one), ``seq_reset`` (the SPV
seq went back further than a reordering could explain), ``clock_backwards`` (an in-order
reading with an earlier ``t_ms`` than the one before), ``clock_wrapped`` (``t_ms`` wrapped
through 0, as it does every 49.7 days), ``valve_closed``, ``valve_opened`` (detail: who),
``zeroed``, ``level_set``, ``device_error`` (from STS lines), ``ack``, ``nak``, ``ack_lost``
(no reply in time), ``unmatched_ack`` (a reply for no outstanding command: late, or not
ours), ``connected`` (detail: the URL; the port opened, by ``start()`` or a reconnection),
``port_error`` (the port failed: closed, and reopened as above), ``reader_error`` (a bug or a
raising callback ended the reader; ``stop()`` then ``start()`` to read again).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import serial

from motionctl.drivers.beam import (
    LineSplitter,
    ProtocolError,
    checksum,
    frame,
    parse_line,
    reopen_with_backoff,
    write_all,
)
from motionctl.types import DeviceEvent, SpirometerSample

__all__ = [
    "CommandReply",
    "ProtocolError",
    "Reading",
    "Reply",
    "SpirometerDriver",
    "Status",
    "checksum",
    "frame",
    "parse_line",
    "parse_message",
]

BAUDRATE = 115200
READ_TIMEOUT_S = 0.05  # bounds how long stop() waits for the reader to notice
WRITE_TIMEOUT_S = 0.1  # a device that stops reading must not block the caller for good
JOIN_TIMEOUT_S = 2.0
DEFAULT_RECONNECT_MAX_S = 1.0  # reopening back-off ceiling (devices.spirometer.reconnect_max_s)
DEFAULT_ACK_TIMEOUT_S = 0.25
SEQ_MODULO = 65536
T_MS_MAX = 2**32 - 1
T_MS_MODULO = 2**32
# A reading at most this many places behind the expected seq came late; further back, the
# device restarted its count. 64 readings are 1.3-2.6 s at 25-50 Hz, far beyond any
# reordering a serial line or adapter can cause.
REORDER_WINDOW = 64
VOLUME_ML_RANGE = (-2000, 8000)  # -2..8 l: anything else is not a lung
FLOW_ML_S_RANGE = (-19999, 19999)  # |flow| < 20 l/s
LEVEL_ML_RANGE = (0, 8000)
COMMANDS = ("VALVE", "LEVEL", "ZERO")
STATUS_EVENTS = {
    "CLOSED": "valve_closed",
    "OPENED": "valve_opened",
    "ZEROED": "zeroed",
    "LEVEL": "level_set",
    "ERROR": "device_error",
}
# Events that are part of normal use are logged at INFO, the rest at WARNING.
_ROUTINE_EVENTS = frozenset(
    {"ack", "valve_closed", "valve_opened", "zeroed", "level_set", "clock_wrapped", "connected"}
)
REPLIES_KEPT = 256  # wait_reply() can look this many commands back

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,9})")
_ERROR_CODE = re.compile(r"[A-Za-z0-9_]+")

Sink = Callable[[SpirometerSample | DeviceEvent], None]


# -- pure parsing ------------------------------------------------------------------------------


class Reading(NamedTuple):
    """An SPV line, in wire units."""

    seq: int
    t_ms: int
    volume_ml: int
    flow_ml_s: int
    valve_closed: bool
    level_ml: int


class Status(NamedTuple):
    """An STS line: ``event`` is the wire token (``CLOSED``, ...), ``arg`` as sent."""

    t_ms: int
    event: str
    arg: str


class Reply(NamedTuple):
    """An ACK (``value`` = the command type) or NAK (``value`` = the reason; seq may be None)."""

    kind: str
    seq: int | None
    value: str


def _integer(message: str, name: str, text: str, low: int, high: int) -> int:
    if not _INTEGER.fullmatch(text):
        raise ProtocolError(f"{message} {name} {text!r} is not a decimal integer", "number")
    value = int(text)
    if not low <= value <= high:
        raise ProtocolError(f"{message} {name} {value} outside {low}..{high}", "range")
    return value


def _field_count(fields: tuple[str, ...], expected: int) -> None:
    if len(fields) != expected:
        raise ProtocolError(f"{fields[0]} needs {expected} fields, got {len(fields)}", "fields")


def _parse_reading(fields: tuple[str, ...]) -> Reading:
    _field_count(fields, 7)
    seq = _integer("SPV", "seq", fields[1], 0, SEQ_MODULO - 1)
    t_ms = _integer("SPV", "t_ms", fields[2], 0, T_MS_MAX)
    volume_ml = _integer("SPV", "volume_ml", fields[3], *VOLUME_ML_RANGE)
    flow_ml_s = _integer("SPV", "flow_ml_s", fields[4], *FLOW_ML_S_RANGE)
    if fields[5] not in ("O", "C"):
        raise ProtocolError(f"SPV valve {fields[5]!r} is neither O nor C")
    level_ml = _integer("SPV", "level_ml", fields[6], *LEVEL_ML_RANGE)
    return Reading(seq, t_ms, volume_ml, flow_ml_s, fields[5] == "C", level_ml)


def _parse_status(fields: tuple[str, ...]) -> Status:
    _field_count(fields, 4)
    t_ms = _integer("STS", "t_ms", fields[1], 0, T_MS_MAX)
    event, arg = fields[2], fields[3]
    if event not in STATUS_EVENTS:
        raise ProtocolError(
            f"STS event {event!r} is not one of {list(STATUS_EVENTS)}", "unexpected"
        )
    if event in ("CLOSED", "OPENED"):
        if arg not in ("host", "patient"):
            raise ProtocolError(f"STS {event} cause {arg!r} is neither host nor patient")
    elif event == "ZEROED":
        _integer("STS", "ZEROED ml", arg, *VOLUME_ML_RANGE)
    elif event == "LEVEL":
        _integer("STS", "LEVEL ml", arg, *LEVEL_ML_RANGE)
    elif not _ERROR_CODE.fullmatch(arg):
        raise ProtocolError(f"STS ERROR code {arg!r} is not letters, digits and '_'")
    return Status(t_ms, event, arg)


def _parse_reply(fields: tuple[str, ...]) -> Reply:
    kind = fields[0]
    _field_count(fields, 3)
    if kind == "ACK":
        seq = _integer("ACK", "seq", fields[1], 0, SEQ_MODULO - 1)
        if fields[2] not in COMMANDS:
            raise ProtocolError(f"ACK for {fields[2]!r}, which is not a command")
        return Reply("ACK", seq, fields[2])
    seq = None if fields[1] == "-" else _integer("NAK", "seq", fields[1], 0, SEQ_MODULO - 1)
    if not fields[2]:
        raise ProtocolError("NAK without a reason")
    return Reply("NAK", seq, fields[2])


def parse_message(line: bytes) -> Reading | Status | Reply:
    """Check one device line (framing, checksum, fields, numbers, ranges) and decode it.

    Raises ProtocolError whose message says what was wrong and whose ``reason`` is one of
    ``checksum``, ``syntax``, ``non_ascii``, ``too_long``, ``fields``, ``number``, ``range``,
    ``unexpected``.
    """
    fields = parse_line(line)
    kind = fields[0]
    if kind == "SPV":
        return _parse_reading(fields)
    if kind == "STS":
        return _parse_status(fields)
    if kind in ("ACK", "NAK"):
        return _parse_reply(fields)
    raise ProtocolError(f"unexpected message type {kind!r} from the device", "unexpected")


# -- the driver --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandReply:
    """What became of one command: acknowledged, refused (NAK) or not answered in time."""

    seq: int
    command: str  # the body sent, e.g. "VALVE,3,C"
    t_sent: float
    t_reply: float  # when the ACK/NAK was read, or when the timeout was noticed
    accepted: bool
    reason: str = ""  # the NAK's reason, or "timeout"


class SpirometerDriver:
    """Host side of the spirometer protocol on one serial port (any pyserial URL)."""

    def __init__(
        self,
        url: str,
        sink: Sink,
        *,
        name: str = "spirometer",
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[DeviceEvent], None] | None = None,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if not ack_timeout_s > 0:
            raise ValueError(f"ack_timeout_s must be positive, got {ack_timeout_s}")
        if not reconnect_max_s > 0:
            raise ValueError(f"reconnect_max_s must be positive, got {reconnect_max_s}")
        self._url = url
        self._sink = sink
        self._name = name
        self._clock = clock
        self._on_event = on_event
        self._ack_timeout_s = ack_timeout_s
        self._reconnect_max_s = reconnect_max_s
        self._log = logging.getLogger(f"motionctl.driver.{name}")
        self._lock = threading.Lock()
        self._replied = threading.Condition(self._lock)  # notified when a command settles
        self._stop = threading.Event()
        self._port: serial.SerialBase | None = None
        self._reader: threading.Thread | None = None
        self._reset_session_locked()

    def _reset_session_locked(self) -> None:
        self._next_seq = 0
        self._outstanding: dict[int, tuple[str, float]] = {}  # seq -> (body, t_sent)
        self._replies: OrderedDict[int, CommandReply] = OrderedDict()
        self._expected_seq: int | None = None
        self._missing: dict[int, None] = {}  # seqs counted lost, newest last (a late one may come)
        self._last_t_ms: int | None = None  # the previous reading's t_ms, as sent ...
        self._last_t_device_ms = 0  # ... and unwrapped
        self._port_failed = False  # set on a read or write failure: the reader reopens
        self._stats: dict = {
            "samples": 0,
            "lost_samples": 0,  # counted from SPV seq gaps (less readings that came late)
            "reordered": 0,  # readings that arrived after a later one
            "clock_wraps": 0,
            "status": 0,
            "malformed": 0,
            "malformed_by_reason": {},
            "sent": 0,
            "acks": 0,
            "naks": 0,
            "acks_lost": 0,
            "unmatched": 0,
            "reconnects": 0,
            "events": {},  # per event kind
        }

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._url

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the port and start the reader thread; does nothing if already started.

        Raises serial.SerialException if the port cannot be opened (once started, a port
        that fails is reopened by the reader).
        """
        with self._lock:
            if self._reader is not None:
                return
        port = self._open()
        with self._lock:
            self._reset_session_locked()
            self._port = port
            connected = self._event_locked(self._clock(), "connected", self._url)
        self._stop.clear()
        self._deliver([connected])  # before any reading
        self._reader = threading.Thread(
            target=self._reader_main, args=(port,), name=f"{self._name}-reader", daemon=False
        )
        self._reader.start()
        self._log.info("opened %s", self._url)

    def _open(self) -> serial.SerialBase:
        port = serial.serial_for_url(
            self._url, baudrate=BAUDRATE, timeout=READ_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S
        )
        try:
            port.reset_input_buffer()
        except (OSError, serial.SerialException):
            port.close()
            raise
        return port

    def stop(self) -> None:
        """Stop the reader and close the port. Idempotent; waits at most JOIN_TIMEOUT_S.

        Raises RuntimeError if the reader thread does not end (a callback that blocks).
        """
        with self._lock:
            reader = self._reader
        if reader is None:
            return
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
                self._replied.notify_all()
            if port is not None:
                port.close()
            self._log.info("closed %s", self._url)

    def __enter__(self) -> SpirometerDriver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- commands ----------------------------------------------------------------------------

    def command_valve(self, closed: bool) -> int:
        """Ask the device to close (True) or open (False) the breath-hold valve; returns seq."""
        return self._send("VALVE", "C" if closed else "O")

    def set_level(self, litres: float) -> int:
        """Set the patient's feedback level (litres, sent as whole ml); returns seq.

        Raises ValueError for a level the device would refuse (outside 0..8 l).
        """
        if not math.isfinite(litres):
            raise ValueError(f"feedback level must be finite, got {litres!r}")
        ml = round(litres * 1000.0)
        low, high = LEVEL_ML_RANGE
        if not low <= ml <= high:
            raise ValueError(f"feedback level {litres:g} l outside {low / 1e3:g}..{high / 1e3:g} l")
        return self._send("LEVEL", str(ml))

    def zero(self) -> int:
        """Ask the device to make its current volume reading zero; returns seq.

        Do it at end-exhale with the valve open (the device refuses it while closed).
        """
        return self._send("ZERO", None)

    def wait_reply(self, seq: int, timeout: float) -> CommandReply | None:
        """The reply to command ``seq`` once it is known, or None if not within ``timeout``."""
        with self._replied:
            self._replied.wait_for(lambda: seq in self._replies, timeout=timeout)
            return self._replies.get(seq)

    def _send(self, command: str, arg: str | None) -> int:
        events: list[DeviceEvent] = []
        try:
            with self._lock:
                if self._port is None:
                    raise serial.PortNotOpenError()
                seq = self._next_seq
                body = f"{command},{seq}" if arg is None else f"{command},{seq},{arg}"
                line = frame(body)
                t_sent = self._clock()
                # Registered before the write: the reply can arrive before write() returns.
                self._outstanding[seq] = (body, t_sent)
                self._replies.pop(seq, None)  # a reply from 65536 commands ago
                try:
                    # under the lock, so that seq order is wire order
                    write_all(self._port, line, WRITE_TIMEOUT_S)
                except (OSError, serial.SerialException) as exc:
                    del self._outstanding[seq]
                    if not self._port_failed:  # the reader closes and reopens the port
                        events.append(self._port_error_locked(f"write failed: {exc}"))
                    raise
                self._next_seq = (seq + 1) % SEQ_MODULO
                self._stats["sent"] += 1
            self._log.info("sent %s", body)
            return seq
        finally:
            self._deliver(events)

    # -- state -------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters: samples, lost_samples, reordered, clock_wraps, status, malformed,
        malformed_by_reason (dict), sent, acks, naks, acks_lost, unmatched, reconnects (port
        reopened after a failure), events (dict: count per event kind)."""
        with self._lock:
            stats = dict(self._stats)
            stats["malformed_by_reason"] = dict(self._stats["malformed_by_reason"])
            stats["events"] = dict(self._stats["events"])
            return stats

    # -- reader thread -----------------------------------------------------------------------

    def _reader_main(self, port: serial.SerialBase) -> None:
        try:
            while self._read_loop(port):
                port = self._reopen()
                if port is None:
                    return
        except Exception as exc:
            # A bug here or in a callback must be seen, not leave the stream silently unread.
            self._log.exception("reader thread failed")
            with self._lock:
                event = self._event_locked(
                    self._clock(), "reader_error", f"{type(exc).__name__}: {exc}"
                )
            try:
                self._deliver([event])
            except Exception:
                self._log.exception("could not deliver the reader_error event")
        finally:
            with self._lock:
                self._replied.notify_all()

    def _read_loop(self, port: serial.SerialBase) -> bool:
        """Read until stopped (False) or the port fails (True: it has been closed)."""
        splitter = LineSplitter()
        while not self._stop.is_set():
            failure = ""
            try:
                data = port.read(port.in_waiting or 1)
            except (OSError, serial.SerialException) as exc:
                failure = f"read failed: {exc}"
            events: list[SpirometerSample | DeviceEvent] = []
            with self._lock:
                failed = bool(failure) or self._port_failed  # (a write may have failed)
                if failed:
                    if not self._port_failed:
                        events.append(self._port_error_locked(failure))
                    self._port = None
                    port.close()
            if failed:
                self._deliver(events)
                return True
            now = self._clock()
            items: list[SpirometerSample | DeviceEvent] = []
            with self._lock:
                for line in splitter.feed(data) if data else ():
                    self._handle_line_locked(line, now, items)
                # Here too, so that ack_lost is reported even if nobody waits for the reply.
                self._expire_locked(now, items)
            self._deliver(items)
        return False

    def _reopen(self) -> serial.SerialBase | None:
        """Open the port again, with back-off; None if stopped first."""
        port = reopen_with_backoff(
            self._open, self._stop, self._reconnect_max_s, self._log, self._url
        )
        if port is None:
            return None
        with self._lock:
            self._port = port
            self._port_failed = False
            self._stats["reconnects"] += 1
            event = self._event_locked(self._clock(), "connected", self._url)
        self._deliver([event])
        self._log.info("reopened %s", self._url)
        return port

    def _port_error_locked(self, detail: str) -> DeviceEvent:
        """The port failed: one ``port_error`` until it is open again."""
        self._port_failed = True
        return self._event_locked(self._clock(), "port_error", detail)

    def _deliver(self, items: list[SpirometerSample | DeviceEvent]) -> None:
        for item in items:
            if isinstance(item, DeviceEvent) and self._on_event is not None:
                self._on_event(item)
            else:
                self._sink(item)

    def _event_locked(self, t: float, kind: str, detail: str) -> DeviceEvent:
        events = self._stats["events"]
        events[kind] = events.get(kind, 0) + 1
        level = logging.INFO if kind in _ROUTINE_EVENTS else logging.WARNING
        self._log.log(level, "%s: %s", kind, detail)
        return DeviceEvent(self._name, t, kind, detail)

    def _handle_line_locked(self, line: bytes, now: float, items: list) -> None:
        try:
            message = parse_message(line)
        except ProtocolError as exc:
            self._stats["malformed"] += 1
            by_reason = self._stats["malformed_by_reason"]
            by_reason[exc.reason] = by_reason.get(exc.reason, 0) + 1
            items.append(self._event_locked(now, "malformed", f"{exc} ({len(line)} bytes)"))
            return
        if isinstance(message, Reading):
            self._handle_reading_locked(message, now, items)
        elif isinstance(message, Status):
            self._stats["status"] += 1
            detail = f"{message.event},{message.arg} at t_device={message.t_ms / 1e3:.3f} s"
            items.append(self._event_locked(now, STATUS_EVENTS[message.event], detail))
        elif message.kind == "ACK":
            self._handle_ack_locked(message, now, items)
        else:
            self._handle_nak_locked(message, now, items)

    def _handle_reading_locked(self, reading: Reading, now: float, items: list) -> None:
        late = self._check_seq_locked(reading.seq, now, items)
        t_device_ms = self._unwrap_t_ms_locked(reading.t_ms, now, items, late)
        self._stats["samples"] += 1
        items.append(
            SpirometerSample(
                device=self._name,
                seq=reading.seq,
                t_device=t_device_ms / 1e3,
                t_rx=now,
                volume_l=reading.volume_ml / 1e3,
                flow_l_s=reading.flow_ml_s / 1e3,
                valve_closed=reading.valve_closed,
                feedback_level=reading.level_ml / 1e3,
            )
        )

    def _check_seq_locked(self, seq: int, now: float, items: list) -> bool:
        """Follow the SPV seq; True if this reading came after a later one."""
        expected = self._expected_seq
        if expected is None or seq == expected:
            self._expected_seq = (seq + 1) % SEQ_MODULO
            return False
        ahead = (seq - expected) % SEQ_MODULO
        behind = SEQ_MODULO - ahead  # how far before the expected seq this one is
        if behind <= REORDER_WINDOW:
            # A reading that came after a later one: not lost after all, and no gap ahead.
            self._stats["reordered"] += 1
            counted_lost = seq in self._missing
            if counted_lost:
                del self._missing[seq]
                self._stats["lost_samples"] -= 1
            detail = f"SPV seq {seq} arrived after seq {(expected - 1) % SEQ_MODULO}" + (
                " (it was counted missing)" if counted_lost else " (a repeat)"
            )
            items.append(self._event_locked(now, "reordered", detail))
            return True
        self._expected_seq = (seq + 1) % SEQ_MODULO
        if ahead < SEQ_MODULO // 2:
            self._stats["lost_samples"] += ahead
            for k in range(max(0, ahead - REORDER_WINDOW), ahead):
                self._missing[(expected + k) % SEQ_MODULO] = None
            while len(self._missing) > REORDER_WINDOW:
                del self._missing[next(iter(self._missing))]
            detail = f"expected SPV seq {expected}, got {seq}: {ahead} missing"
            items.append(self._event_locked(now, "seq_gap", detail))
        else:
            self._missing.clear()
            detail = f"expected SPV seq {expected}, got {seq}: {behind} back (device restart?)"
            items.append(self._event_locked(now, "seq_reset", detail))
        return False

    def _unwrap_t_ms_locked(self, t_ms: int, now: float, items: list, late: bool) -> int:
        """The device time in ms, counting the clock's wraps since the port was opened.

        ``late``: the reading came after a later one (already reported as reordered), so
        its earlier time is no news."""
        last = self._last_t_ms
        if last is None:
            unwrapped = t_ms
        else:
            # The step from the previous reading, taken as the shorter way round the clock.
            step = (t_ms - last + T_MS_MODULO // 2) % T_MS_MODULO - T_MS_MODULO // 2
            unwrapped = self._last_t_device_ms + step
            if step > 0 and t_ms < last:
                self._stats["clock_wraps"] += 1
                detail = f"device clock wrapped: t_ms {last} -> {t_ms}"
                items.append(self._event_locked(now, "clock_wrapped", detail))
            elif step < 0 and not late:
                detail = f"device clock went back {-step} ms: t_ms {last} -> {t_ms}"
                items.append(self._event_locked(now, "clock_backwards", detail))
        self._last_t_ms, self._last_t_device_ms = t_ms, unwrapped
        return unwrapped

    def _settle_locked(self, reply: CommandReply) -> None:
        self._replies[reply.seq] = reply
        while len(self._replies) > REPLIES_KEPT:
            self._replies.popitem(last=False)
        self._replied.notify_all()

    def _handle_ack_locked(self, reply: Reply, now: float, items: list) -> None:
        self._stats["acks"] += 1
        sent = self._outstanding.get(reply.seq)
        if sent is None or sent[0].split(",", 1)[0] != reply.value:
            self._stats["unmatched"] += 1
            detail = f"ACK,{reply.seq},{reply.value} matches no outstanding command"
            items.append(self._event_locked(now, "unmatched_ack", detail))
            return
        body, t_sent = self._outstanding.pop(reply.seq)
        self._settle_locked(CommandReply(reply.seq, body, t_sent, now, True))
        detail = f"{body} acknowledged after {(now - t_sent) * 1e3:.1f} ms"
        items.append(self._event_locked(now, "ack", detail))

    def _handle_nak_locked(self, reply: Reply, now: float, items: list) -> None:
        self._stats["naks"] += 1
        seq_text = "-" if reply.seq is None else str(reply.seq)
        detail = f"NAK,{seq_text},{reply.value}"
        sent = self._outstanding.pop(reply.seq, None) if reply.seq is not None else None
        if sent is not None:
            body, t_sent = sent
            self._settle_locked(CommandReply(reply.seq, body, t_sent, now, False, reply.value))
            detail += f" for {body}"
        # A NAK without a seq names no command: the one it refused will time out.
        items.append(self._event_locked(now, "nak", detail))

    def _expire_locked(self, now: float, items: list) -> None:
        expired = [
            seq
            for seq, (_, t_sent) in self._outstanding.items()
            if now - t_sent > self._ack_timeout_s
        ]
        for seq in expired:
            body, t_sent = self._outstanding.pop(seq)
            self._stats["acks_lost"] += 1
            self._settle_locked(CommandReply(seq, body, t_sent, now, False, "timeout"))
            detail = f"{body} not acknowledged within {self._ack_timeout_s * 1e3:.0f} ms"
            items.append(self._event_locked(now, "ack_lost", detail))
