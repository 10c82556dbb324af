"""The pty and transport faults shared by the serial-line device simulators.

``PtyDeviceSim`` is the base of ``LinacGatingSim`` (the gating box: ACK/NAK and a
watchdog) and ``SpirometerSim`` (streamed readings): a device on one side of a pty pair, the
host's port the other side (``path``), speaking newline-terminated lines. It owns the pty,
the device thread and the line framing, and takes the transport side of the runtime faults
(``start_fault``/``stop_fault``, the ``FaultTarget`` protocol of ``faults.py``):

- ``disconnect``: the cable is pulled. What the host sends is lost (a line half received
  when the cable goes or comes back is dropped) and the lines queued for the host by
  ``delay``/``reorder`` are lost with it; the subclass writes nothing while it is on. The
  pty stays open: closing the master would end the host's port for good.
- ``delay`` and ``reorder``: lines for the host go through a ``WireQueue``; when the fault
  ends the backlog is written before ``stop_fault`` returns.
- every other kind is only recorded here (``_faults``): what it does to a line is the
  subclass's (each simulator's module docstring has the table for its device).

One thread, the device thread (``f"{name}-{_thread_suffix}"``), waits on the pty and on a
pipe that ``stop()`` writes to, so it never waits out an idle timeout to stop. On every wake
it calls the subclass's ``_on_wake(readable)``, which reads the host's lines with
``_read_lines()`` and does the device's timed work; ``_wait_timeout()`` says when to wake
next. Lines for the host are written from the thread holding ``_cond`` with non-blocking
writes (``_write_locked``): a host that stops reading cannot wedge the device, and what the
full pty buffer does not take is dropped, as a real UART drops it.

A subclass sets ``_thread_suffix``, ``_max_line_bytes`` (a longer line from the host is
handed on once, cut there, and the rest of it up to the next newline is skipped),
``_dropped_stat`` (its ``_stats`` key counting dropped writes) and ``_dropped_log_level``;
makes ``_stats``; implements ``_wait_timeout()``, ``_on_wake(readable)`` and
``_record_sent_locked(item, t_sent)`` (an item of the wire queue has a ``data`` attribute:
the bytes to write); and may hook ``_on_start()``, ``_on_thread_stopped()``,
``_on_thread_failed()`` and ``_on_disconnect_locked()``.

Both devices frame their lines the same way, NMEA style: ``$BODY*CS`` + newline, CS the XOR
of the body's bytes in two upper-case hex digits (``frame``); ``parse_host_line`` checks a
host line's framing and returns its fields and sequence number, or raises ``Rejected`` with
the NAK reason. The checksum is deliberately a copy of the drivers' (a device has its own
firmware): a driver bug must not be mirrored by its simulator.

What it does not model: the serial line itself (a pty delivers bytes at once, whatever the
baud rate), modem control and flow control lines, and more than one host.
"""

from __future__ import annotations

import logging
import os
import random
import select
import threading
import tty
from collections.abc import Callable
from typing import Any, ClassVar

from motionctl.simulators.faults import FAULT_KINDS, WireQueue, unsupported_fault

SEQ_MODULO = 65536
_HEX_UPPER = frozenset(b"0123456789ABCDEF")


def checksum(body: bytes) -> int:
    value = 0
    for byte in body:
        value ^= byte
    return value


def frame(body: str) -> bytes:
    """A device line: ``$body*CS`` and a newline."""
    raw = body.encode("ascii")
    return b"$%s*%02X\n" % (raw, checksum(raw))


class Rejected(Exception):
    """A host line the device NAKs; ``reason`` is the NAK's reason token."""

    def __init__(self, reason: str, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seq = seq


def parse_host_line(line: bytes, max_bytes: int) -> tuple[list[str], int | None]:
    """The fields of a host line and its sequence number (the second field; None when it
    is not one), or raise ``Rejected`` for a line whose framing fails: too long, non-ASCII,
    syntax, checksum."""
    if len(line) > max_bytes:
        raise Rejected("too_long")
    if any(byte > 0x7F for byte in line):
        raise Rejected("non_ascii")
    text = line[:-1] if line.endswith(b"\n") else line
    star = text.rfind(b"*")
    if not text.startswith(b"$") or star < 0:
        raise Rejected("syntax")
    body, cs_field = text[1:star], text[star + 1 :]
    if len(cs_field) != 2 or not all(byte in _HEX_UPPER for byte in cs_field):
        raise Rejected("syntax")
    if any(byte < 0x20 or byte == 0x7F or byte in b"$*" for byte in body):
        raise Rejected("syntax")
    if int(cs_field, 16) != checksum(body):
        raise Rejected("checksum")
    fields = body.decode("ascii").split(",")
    seq = None
    if len(fields) >= 2 and fields[1].isdigit() and len(fields[1]) <= 5:
        seq = int(fields[1]) if int(fields[1]) < SEQ_MODULO else None
    return fields, seq


__all__ = ["FAULT_DELAY_S", "PtyDeviceSim"]

READ_CHUNK_BYTES = 4096
JOIN_TIMEOUT_S = 2.0
FAULT_DELAY_S = 0.3  # the delay fault's default delay


class PtyDeviceSim:
    """A device on a pty with a device thread and the transport faults (see above)."""

    supported_faults: tuple[str, ...] = FAULT_KINDS
    _thread_suffix: ClassVar[str]  # the device thread is f"{name}-{suffix}"
    _max_line_bytes: ClassVar[int]
    _dropped_stat: ClassVar[str]
    _dropped_log_level: ClassVar[int]
    _stats: dict[str, int]

    def __init__(self, *, clock: Callable[[], float], name: str, fault_seed: int) -> None:
        self._clock = clock
        self._name = name
        self._log = logging.getLogger(f"motionctl.sim.{name}")
        # Guards the fault state, the wire queue and the subclass's device state; lines are
        # written to the pty with it held.
        self._cond = threading.Condition()
        self.fault_delay_s = FAULT_DELAY_S  # set it before the fault starts
        self._faults: set[str] = set()
        self._wire: WireQueue[Any] = WireQueue()
        self._link_epoch = 0  # +1 when the cable goes or comes back: drop a half line
        self._fault_rng = random.Random(fault_seed)
        # The device thread's line framing.
        self._rx_buffer = bytearray()
        self._rx_discarding = False  # inside an over-long line already handed on
        self._rx_epoch = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._path: str | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Open the pty and start the device thread; returns the device path for the host."""
        if self._started:
            raise RuntimeError(f"a {type(self).__name__} starts once; make a new one")
        master, slave = os.openpty()
        fds = [master, slave]
        try:
            tty.setraw(slave)  # no echo, no line editing, no CR/LF translation
            # Non-blocking, so that a host that stops reading cannot wedge the device thread.
            os.set_blocking(master, False)
            path = os.ttyname(slave)
            wake_r, wake_w = os.pipe()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # The slave stays open for the device's lifetime: otherwise the master reads EIO
        # whenever no host has the port open (between tests, across a driver reconnect).
        self._master, self._slave = master, slave
        self._wake_r, self._wake_w = wake_r, wake_w
        self._path = path
        self._started = True
        self._on_start()
        self._thread = threading.Thread(
            target=self._run, name=f"{self._name}-{self._thread_suffix}", daemon=False
        )
        self._thread.start()
        return path

    @property
    def path(self) -> str:
        if self._path is None:
            raise RuntimeError("not started")
        return self._path

    def stop(self) -> None:
        """Stop the device thread and close the pty. Idempotent.

        Raises RuntimeError if the device thread failed while running.
        """
        thread = self._thread
        if thread is not None:
            os.write(self._wake_w, b"x")
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError(f"{self._name}: simulator thread did not stop")
            self._thread = None
            self._on_thread_stopped()
        with self._cond:  # a stop_fault() on another thread may be writing a backlog
            for attr in ("_master", "_slave", "_wake_r", "_wake_w"):
                fd = getattr(self, attr)
                if fd is not None:
                    setattr(self, attr, None)
                    os.close(fd)
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"{self._name}: simulator thread failed") from error

    def _on_start(self) -> None:
        """Called by ``start()`` once the pty is open, before the device thread starts."""

    def _on_thread_stopped(self) -> None:
        """Called by ``stop()`` once the device thread has ended."""

    def _on_thread_failed(self) -> None:
        """Called on the device thread when it fails (the error is logged and kept)."""

    # -- faults ------------------------------------------------------------------------------

    def active_faults(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(k for k in self.supported_faults if k in self._faults)

    def start_fault(self, kind: str) -> None:
        """Start a fault (see the module docstring); thread-safe, idempotent."""
        if kind not in self.supported_faults:
            raise unsupported_fault(self._name, kind, self.supported_faults)
        with self._cond:
            if kind in self._faults:
                return
            self._faults.add(kind)
            if kind == "disconnect":
                self._link_epoch += 1
                self._on_disconnect_locked()
                self._wire.clear()  # lines not yet written are lost with the cable
        self._log.info("fault %s started", kind)

    def stop_fault(self, kind: str) -> None:
        """End a fault; thread-safe, idempotent. When it returns, a backlog held by
        ``delay`` or ``reorder`` has been written."""
        if kind not in self.supported_faults:
            raise unsupported_fault(self._name, kind, self.supported_faults)
        with self._cond:
            if kind not in self._faults:
                return
            self._faults.discard(kind)
            now = self._clock()
            if kind == "disconnect":
                self._link_epoch += 1
            elif kind == "reorder":
                self._wire.release_held()
            elif kind == "delay":
                self._wire.release_all(now)
            self._write_due_locked(now)
        self._log.info("fault %s ended", kind)

    def _on_disconnect_locked(self) -> None:
        """Called when the cable is pulled, before the wire queue is emptied; hold ``_cond``."""

    # -- device thread -----------------------------------------------------------------------

    def _wait_timeout(self) -> float:
        """Seconds until the device thread has work to do without the host; the subclass's."""
        raise NotImplementedError

    def _on_wake(self, readable: bool) -> None:
        """The device thread woke (``readable``: the host has sent bytes); the subclass's."""
        raise NotImplementedError

    def _record_sent_locked(self, item: Any, t_sent: float) -> None:
        """Record an item of the wire queue that was written; the subclass's."""
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:
            self._log.exception("simulator thread failed")
            self._error = exc  # re-raised by stop(), so that a test cannot miss it
            self._on_thread_failed()

    def _serve(self) -> None:
        while True:
            readable, _, _ = select.select(
                [self._master, self._wake_r], [], [], self._wait_timeout()
            )
            if self._wake_r in readable:
                return
            self._on_wake(self._master in readable)

    def _read_lines(self) -> list[bytes]:
        """Read what the host sent; returns the complete lines (newline included) and the
        first ``_max_line_bytes`` and more of an over-long one. Device thread only."""
        try:
            data = os.read(self._master, READ_CHUNK_BYTES)
        except BlockingIOError:
            return []  # select() said readable but the bytes are not there yet: wait again
        with self._cond:
            if self._rx_epoch != self._link_epoch:
                self._rx_epoch = self._link_epoch
                self._rx_buffer.clear()  # the cable went or came back inside a line
                self._rx_discarding = False
            if "disconnect" in self._faults:
                return []  # the cable is pulled: the host's bytes go nowhere
        buffer = self._rx_buffer
        buffer += data
        lines = []
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > self._max_line_bytes:
                    if not self._rx_discarding:
                        lines.append(bytes(buffer))
                        self._rx_discarding = True
                    buffer.clear()
                break
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            if self._rx_discarding:
                self._rx_discarding = False
                continue
            lines.append(line)
        return lines

    def _push_locked(self, item: Any, now: float) -> None:
        """Queue a line for the host as the delay and reorder faults want; hold ``_cond``."""
        self._wire.push(
            item,
            now,
            delay_s=self.fault_delay_s if "delay" in self._faults else 0.0,
            reorder="reorder" in self._faults,
        )

    def _write_due_locked(self, now: float) -> None:
        # Written with the lock held (non-blocking writes), so that the end of a delay fault
        # can flush the backlog from another thread without interleaving bytes.
        for item in self._wire.pop_due(now):
            if self._master is None:
                continue  # stopped: nothing to write to
            t_sent = self._clock()  # before the write: the host may act before it returns
            if self._write_locked(item.data):
                self._record_sent_locked(item, t_sent)

    def _write_locked(self, data: bytes, *, log_drop: bool = True) -> bool:
        """Write ``data`` to the host now; False (counted in ``_stats``) if the pty buffer
        did not take all of it. Hold ``_cond``."""
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            # The pty buffer is full: no host is reading. A real device's UART drops too.
            self._stats[self._dropped_stat] += 1
            if log_drop:
                self._log.log(
                    self._dropped_log_level, "pty output full; dropped %r", data[written:]
                )
            return False
        return True
