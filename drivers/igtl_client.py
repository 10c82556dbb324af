"""The OpenIGTLink TCP client shared by the OpenIGTLink drivers.

``IgtlClientDriver`` is the base of ``IgtlTrackerDriver`` (TRANSFORM/POSITION messages,
``igtl_tracker.py``) and ``XrayImageDriver`` (IMAGE messages, ``xray.py``): a reader thread
(``f"{name}-reader"``) that connects to the device's server, reconnects with back-off
(50 ms doubling up to ``reconnect_max_s``), splits the stream into messages (the 58-byte
header, checked by ``parse_header``, then the body) and hands each message of interest to
the subclass. What each message holds and how it is checked is the subclass's: each
driver's module docstring documents its wire protocol.

Device events reach the sink as ``DeviceEvent(name, clock(), kind, detail)``:

- ``connected``, detail "host:port";
- ``malformed``: a message the subclass rejected (detail "<label> (<n> byte body): <why>")
  or a header that cannot be trusted (detail "header (58 bytes): <why>"); the latter means
  the stream's framing is lost, so the connection is dropped and made again;
- ``disconnected``, with the reason: "connection closed by peer", "connection closed inside
  a message", "framing lost: <why>", "socket error: <error>" or "reader failed: <error>".
  No event is sent for a disconnection that ``stop()`` caused.

The reader thread blocks on the socket (no polling); ``stop()`` shuts the socket down to
unblock it.

A subclass sets ``_frame_counter`` (the ``counts`` key of accepted messages) and passes its
``max_body_bytes`` to ``__init__``; implements ``_accepts(fields)`` (whether a message is of
interest: the others are counted as ``ignored``), ``_parse_message(fields, body, crc, t_rx)``
(the item for the sink, or ``MalformedMessage``) and ``_message_label(fields)`` (how a
``malformed`` detail names the message). ``fields`` are pyigtl's header fields, as
``parse_header`` returns them.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from pyigtl.messages import MessageBase

from motionctl.types import DeviceEvent

__all__ = [
    "HEADER_SIZE",
    "FramingError",
    "IgtlClientDriver",
    "MalformedMessage",
    "parse_header",
]

HEADER_SIZE = MessageBase.IGTL_HEADER_SIZE
_HEADER = struct.Struct("> H 12s 20s I I Q Q")


class FramingError(Exception):
    """The byte stream can no longer be split into messages."""


class MalformedMessage(Exception):
    """One message is unusable; the stream is still in step."""


def parse_header(header: bytes, max_body_bytes: int) -> tuple[dict, int]:
    """pyigtl's header fields (validated) and the body CRC; raises FramingError."""
    version, mtype, dname, seconds, frac, body_size, crc = _HEADER.unpack(header)
    if version not in (1, 2):
        raise FramingError(f"unknown header version {version}")
    try:
        message_type = mtype.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError as exc:
        raise FramingError(f"non-ASCII message type {mtype!r}") from exc
    if not message_type.isprintable() or not message_type:
        raise FramingError(f"unprintable message type {mtype!r}")
    if body_size > max_body_bytes:
        raise FramingError(f"body size {body_size} exceeds {max_body_bytes}")
    fields = {
        "header_version": version,
        "message_type": message_type,
        "device_name": dname.rstrip(b"\0").decode("ascii", errors="replace"),
        "timestamp": seconds + frac / 2**32,
        "body_size": body_size,
    }
    return fields, crc


class IgtlClientDriver:
    """OpenIGTLink client with its own reader thread; pushes items and events to ``sink``."""

    _frame_counter: ClassVar[str]  # the counts key of accepted messages: "samples", "frames"

    def __init__(
        self,
        host: str,
        port: int,
        sink: Callable[[Any], None],
        *,
        name: str,
        clock: Callable[[], float],
        reconnect_max_s: float,
        max_body_bytes: int,
    ):
        self.name = name
        self._address = (host, port)
        self._sink = sink
        self._clock = clock
        self._reconnect_max_s = reconnect_max_s
        self._max_body_bytes = max_body_bytes
        self._log = logging.getLogger(f"motionctl.driver.{name}")
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.counts = {self._frame_counter: 0, "malformed": 0, "ignored": 0, "connects": 0}

    # -- what a subclass supplies ----------------------------------------------------------

    def _accepts(self, fields: dict) -> bool:
        """Whether the message is one this driver reads (the others are ignored)."""
        raise NotImplementedError

    def _parse_message(self, fields: dict, body: bytes, crc: int, t_rx: float) -> Any:
        """The sink's item for an accepted message; raises MalformedMessage."""
        raise NotImplementedError

    def _message_label(self, fields: dict) -> str:
        """How a ``malformed`` event's detail names the message."""
        raise NotImplementedError

    # -- the client ------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-reader")
        self._thread.start()

    def stop(self) -> None:
        """Stop the reader thread and close the connection; idempotent, never blocks long."""
        self._stop.set()
        with self._sock_lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already disconnected: nothing to unblock
        if self._thread is not None:
            self._thread.join(timeout=3.0)
            self._thread = None

    def _emit_event(self, kind: str, detail: str = "") -> None:
        if kind == "malformed":
            self.counts["malformed"] += 1
            self._log.warning("malformed message: %s", detail)
        else:
            self._log.info("%s %s", kind, detail)
        self._sink(DeviceEvent(self.name, self._clock(), kind, detail))

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                sock = socket.create_connection(self._address, timeout=1.0)
            except OSError as exc:
                # Back-off between attempts; waiting on the stop event keeps stop() prompt.
                self._log.debug("connect to %s:%d failed: %s", *self._address, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._reconnect_max_s)
                continue
            sock.settimeout(None)  # the reader blocks; stop() shuts the socket down
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._sock_lock:
                if self._stop.is_set():
                    sock.close()
                    break
                self._sock = sock
            backoff = 0.05
            self.connected = True
            self.counts["connects"] += 1
            self._emit_event("connected", f"{self._address[0]}:{self._address[1]}")
            try:
                reason = self._read_stream(sock)
            except OSError as exc:
                reason = f"socket error: {exc}"
            except Exception as exc:  # noqa: BLE001 - a reader thread must never die silently
                self._log.exception("reader failed")
                reason = f"reader failed: {exc!r}"
            self.connected = False
            with self._sock_lock:
                self._sock = None
            sock.close()
            if not self._stop.is_set():
                self._emit_event("disconnected", reason)

    @staticmethod
    def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = sock.recv_into(view[got:], size - got)
            if n == 0:
                return None
            got += n
        return bytes(buf)

    def _read_stream(self, sock: socket.socket) -> str:
        while not self._stop.is_set():
            header = self._recv_exact(sock, HEADER_SIZE)
            if header is None:
                return "connection closed by peer"
            t_rx = self._clock()
            try:
                fields, crc = parse_header(header, self._max_body_bytes)
            except FramingError as exc:
                self._emit_event("malformed", f"header ({HEADER_SIZE} bytes): {exc}")
                return f"framing lost: {exc}"
            body_size = fields["body_size"]
            body = self._recv_exact(sock, body_size)
            if body is None:
                return "connection closed inside a message"
            if not self._accepts(fields):
                self.counts["ignored"] += 1
                continue
            try:
                item = self._parse_message(fields, body, crc, t_rx)
            except MalformedMessage as exc:
                label = self._message_label(fields)
                self._emit_event("malformed", f"{label} ({body_size} byte body): {exc}")
                continue
            self.counts[self._frame_counter] += 1
            self._sink(item)
        return "stopped"
