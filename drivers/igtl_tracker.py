"""Surface / IR-marker tracker driver: OpenIGTLink client for the external surrogate point.

Wire protocol: OpenIGTLink version 2 or 3 (header version 1 or 2) over TCP, as spoken by
PLUS Server, 3D Slicer and the tracking systems behind them. Every message is a 58-byte
big-endian header -- version (u16), type (12 ASCII bytes), device name (20 bytes),
timestamp (u32 seconds + u32 fraction), body size (u64), CRC-64 of the body (u64) -- followed
by the body. The driver accepts, for the configured device name:

- ``TRANSFORM``: a 4x4 matrix (12 float32); its translation is the surrogate point, mm.
- ``POSITION``: as packed by pyigtl (name, group, colour, position, quaternion, diameter,
  owner per point); the first point's position is used.

With header version 2 the extended header's message id is taken as the frame counter;
with version 1 the driver counts frames itself. The header timestamp is kept as the device
time; each sample is stamped on receipt with the controller's monotonic clock.

Messages of other types or other device names are ignored (counted). A message whose CRC,
size or content is wrong (non-finite or beyond ``max_abs_mm``) is dropped and reported as a
``malformed`` event naming its type, length and what was wrong. A header that cannot be
trusted (unknown version, non-ASCII type, absurd body size) means the stream's framing is
lost: the driver reports it, drops the connection and reconnects with back-off.

The reader thread blocks on the socket (no polling); ``stop()`` shuts the socket down to
unblock it.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable

from pyigtl.messages import CRC64, MessageBase

from motionctl.types import DeviceEvent, SurrogateSample

HEADER_SIZE = MessageBase.IGTL_HEADER_SIZE
_HEADER = struct.Struct("> H 12s 20s I I Q Q")
MAX_BODY_BYTES = 1 << 20  # a tracker message is tiny; anything larger means lost framing

Sink = Callable[[SurrogateSample | DeviceEvent], None]


class FramingError(Exception):
    """The byte stream can no longer be split into messages."""


class MalformedMessage(Exception):
    """One message is unusable; the stream is still in step."""


def parse_header(header: bytes) -> tuple[dict, int]:
    """pyigtl's header fields (validated) and the body CRC; raises FramingError."""
    version, mtype, dname, seconds, frac, body_size, crc = _HEADER.unpack(header)
    if version not in (1, 2):
        raise FramingError(f"unknown header version {version}")
    try:
        message_type = mtype.rstrip(b"\0").decode("ascii")
        device_name = dname.rstrip(b"\0").decode("ascii", errors="replace")
    except UnicodeDecodeError as exc:
        raise FramingError(f"non-ASCII message type {mtype!r}") from exc
    if not message_type.isprintable() or not message_type:
        raise FramingError(f"unprintable message type {mtype!r}")
    if body_size > MAX_BODY_BYTES:
        raise FramingError(f"body size {body_size} exceeds {MAX_BODY_BYTES}")
    fields = {
        "header_version": version,
        "message_type": message_type,
        "device_name": device_name,
        "timestamp": seconds + frac / 2**32,
        "body_size": body_size,
    }
    return fields, crc


def parse_point(
    header: dict, body: bytes, crc: int, max_abs_mm: float
) -> tuple[int | None, tuple[float, float, float]]:
    """Frame counter (or None for header version 1) and point (mm) of a TRANSFORM/POSITION.

    ``header`` holds pyigtl's header fields; the body is unpacked with pyigtl's message
    classes. Raises MalformedMessage saying what was wrong.
    """
    if CRC64(body) != crc:
        raise MalformedMessage("CRC-64 mismatch")
    message = MessageBase.create_message(header["message_type"])
    if message is None:
        raise MalformedMessage(f"unsupported type {header['message_type']}")
    try:
        message.unpack(header, body)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"content does not unpack ({exc})") from exc
    if header["message_type"] == "TRANSFORM":
        point = tuple(message.matrix[:3, 3])
    elif message.positions:
        point = message.positions[0]
    else:
        raise MalformedMessage("POSITION message holds no position")
    for value in point:
        if not math.isfinite(value):
            raise MalformedMessage(f"non-finite coordinate {value}")
        if abs(value) > max_abs_mm:
            raise MalformedMessage(f"coordinate {value:.1f} mm beyond +/-{max_abs_mm:.0f} mm")
    message_id = message.message_id if header["header_version"] == 2 else None
    return message_id, (float(point[0]), float(point[1]), float(point[2]))


class IgtlTrackerDriver:
    """OpenIGTLink client with its own reader thread; pushes samples and events to ``sink``."""

    def __init__(
        self,
        host: str,
        port: int,
        sink: Sink,
        *,
        name: str = "surface",
        igtl_device_name: str = "surface",
        clock: Callable[[], float] = time.monotonic,
        reconnect_max_s: float = 1.0,
        max_abs_mm: float = 500.0,
    ):
        self.name = name
        self._address = (host, port)
        self._sink = sink
        self._igtl_device_name = igtl_device_name
        self._clock = clock
        self._reconnect_max_s = reconnect_max_s
        self._max_abs_mm = max_abs_mm
        self._log = logging.getLogger(f"motionctl.driver.{name}")
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._own_seq = 0
        self.connected = False
        self.counts = {"samples": 0, "malformed": 0, "ignored": 0, "connects": 0}

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

    def _recv_exact(self, sock: socket.socket, size: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < size:
            chunk = sock.recv(size - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _read_stream(self, sock: socket.socket) -> str:
        while not self._stop.is_set():
            header = self._recv_exact(sock, HEADER_SIZE)
            if header is None:
                return "connection closed by peer"
            t_rx = self._clock()
            try:
                fields, crc = parse_header(header)
            except FramingError as exc:
                self._emit_event("malformed", f"header ({HEADER_SIZE} bytes): {exc}")
                return f"framing lost: {exc}"
            mtype, body_size = fields["message_type"], fields["body_size"]
            body = self._recv_exact(sock, body_size)
            if body is None:
                return "connection closed inside a message"
            if mtype not in ("TRANSFORM", "POSITION") or (
                fields["device_name"] != self._igtl_device_name
            ):
                self.counts["ignored"] += 1
                continue
            try:
                message_id, point = parse_point(fields, body, crc, self._max_abs_mm)
            except MalformedMessage as exc:
                self._emit_event("malformed", f"{mtype} ({body_size} byte body): {exc}")
                continue
            if message_id is None:
                message_id = self._own_seq
            self._own_seq += 1
            self.counts["samples"] += 1
            self._sink(SurrogateSample(self.name, message_id, fields["timestamp"], t_rx, point))
        return "stopped"
