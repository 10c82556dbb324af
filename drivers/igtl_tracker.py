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

import math
import struct
import time
from collections.abc import Callable

from pyigtl.messages import CRC64, MessageBase

from motionctl.drivers import igtl_client
from motionctl.drivers.igtl_client import (
    HEADER_SIZE,
    FramingError,
    IgtlClientDriver,
    MalformedMessage,
)
from motionctl.types import DeviceEvent, SurrogateSample

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY_BYTES",
    "FramingError",
    "IgtlTrackerDriver",
    "MalformedMessage",
    "parse_header",
    "parse_point",
]

MAX_BODY_BYTES = 1 << 20  # a tracker message is tiny; anything larger means lost framing

Sink = Callable[[SurrogateSample | DeviceEvent], None]


def parse_header(header: bytes) -> tuple[dict, int]:
    """pyigtl's header fields (validated) and the body CRC; raises FramingError."""
    return igtl_client.parse_header(header, MAX_BODY_BYTES)


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


class IgtlTrackerDriver(IgtlClientDriver):
    """OpenIGTLink client with its own reader thread; pushes samples and events to ``sink``."""

    _frame_counter = "samples"

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
        super().__init__(
            host,
            port,
            sink,
            name=name,
            clock=clock,
            reconnect_max_s=reconnect_max_s,
            max_body_bytes=MAX_BODY_BYTES,
        )
        self._igtl_device_name = igtl_device_name
        self._max_abs_mm = max_abs_mm
        self._own_seq = 0

    def _accepts(self, fields: dict) -> bool:
        return (
            fields["message_type"] in ("TRANSFORM", "POSITION")
            and fields["device_name"] == self._igtl_device_name
        )

    def _parse_message(self, fields: dict, body: bytes, crc: int, t_rx: float) -> SurrogateSample:
        message_id, point = parse_point(fields, body, crc, self._max_abs_mm)
        if message_id is None:
            message_id = self._own_seq
        self._own_seq += 1
        return SurrogateSample(self.name, message_id, fields["timestamp"], t_rx, point)

    def _message_label(self, fields: dict) -> str:
        return fields["message_type"]
