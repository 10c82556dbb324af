"""kV X-ray imager driver: OpenIGTLink client for projection images with their geometry.

Wire protocol
-------------
OpenIGTLink version 3 messages (header version 2) over TCP: a 58-byte big-endian header --
version (u16, must be 2), type (12 ASCII bytes), device name (20 bytes), timestamp (u32
seconds + u32 2^-32 fractions), body size (u64), CRC-64 (ECMA-182 polynomial, as in the
OpenIGTLink reference) of the body (u64) -- then the body: a 12-byte extended header
(extended-header size, metadata-header size, metadata size, message id), the content, and
the metadata.

The driver reads ``IMAGE`` messages, one per view; other message types are ignored
(counted). For each image:

- **device name**: the imager, e.g. "kv_a" and "kv_b" for a room stereo pair, "kv" for an
  on-board imager; it becomes ``XrayFrame.geometry.imager``. Images of every device name on
  the connection are accepted.
- **content** (OpenIGTLink IMAGE v1 content header): one scalar component, unsigned 16-bit
  (scalar type 5), either endianness; size (i, j, k) = (width, height, 1), no sub-volume.
  Pixel (i, j) is column i, row j. Values are raw transmitted intensity (high = less
  attenuation; gold fiducials are dark), as a flat-field corrected panel gives them.
- **ijk_to_world** (the 3x4 matrix of the IMAGE content, with the standard OpenIGTLink
  convention that the transmitted translation is the *centre* of the image): column i =
  ``panel_u`` (mm per pixel step along a row), column j = ``panel_v`` (mm per step down a
  column), column k = unit panel normal ``u x v`` (pointing away from the source), origin =
  the centre of pixel (0, 0), all in **IEC 61217 patient coordinates** (x = LR +left,
  y = SI +superior, z = AP +anterior), mm, isocentre at the origin. These are not RAS/LPS:
  the message's coordinate-system byte is not used (the simulator leaves pyigtl's "LPS").
- **metadata** (header-version-2 key/value strings), required:
  ``source_mm`` "x y z" (focal spot position, mm, same frame); ``frame_id`` integer (the
  imaging system's frame counter; both views of a stereo pair carry the same id);
  ``t_acquisition`` wall-clock (Unix) seconds at mid-exposure; ``exposure_s`` seconds.
  Optional: ``geometry`` (name of the imaging geometry), ``coordinates``
  ("IEC61217_patient_mm"), ``polarity`` ("transmission"). The header timestamp is the
  same instant as ``t_acquisition`` but only the metadata value is used.

Validation: an image is dropped and reported as ``DeviceEvent(name, t, "malformed",
detail)`` -- the detail names the type, device and what was wrong -- if its CRC fails, it
does not unpack, it is not 2-D single-component uint16, its size differs from
``expected_size`` (width, height), its geometry is not finite, a panel axis is degenerate or
its pixel pitch is outside 0.05-2 mm, the source lies on (within 10 mm of) the panel plane,
a required metadata key is missing or unparsable, or ``t_acquisition`` lies more than
``max_future_s`` after the receiver's wall clock. A header that cannot be trusted (unknown
version, non-ASCII type, body beyond ``max_body_bytes``) means the stream's framing is lost:
the driver reports it, drops the connection and reconnects with back-off.

Accepted images reach the sink as ``XrayFrame``: ``t_device`` = ``t_acquisition``,
``t_rx`` = the controller's monotonic clock when the header arrived, ``image`` = read-only
(height, width) uint16 array. The reader thread blocks on the socket (no polling);
``stop()`` shuts the socket down to unblock it.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
from pyigtl.messages import CRC64, ImageMessage, MessageBase

from motionctl.types import DeviceEvent, ProjectionGeometry, XrayFrame

HEADER_SIZE = MessageBase.IGTL_HEADER_SIZE
_HEADER = struct.Struct("> H 12s 20s I I Q Q")
_EXTENDED_HEADER = struct.Struct("> H H I I")
MAX_BODY_BYTES = 64 << 20  # 4096 x 4096 x 16 bit fits; beyond, the framing is lost
PITCH_RANGE_MM = (0.05, 2.0)
MIN_SOURCE_TO_PANEL_MM = 10.0
REQUIRED_METADATA = ("source_mm", "frame_id", "t_acquisition", "exposure_s")

Sink = Callable[[XrayFrame | DeviceEvent], None]


class FramingError(Exception):
    """The byte stream can no longer be split into messages."""


class MalformedMessage(Exception):
    """One message is unusable; the stream is still in step."""


def parse_header(header: bytes, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[dict, int]:
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


def _vector(text: str, key: str) -> tuple[float, float, float]:
    parts = text.split()
    if len(parts) != 3:
        raise MalformedMessage(f"metadata {key} must be 3 numbers, got {text!r}")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise MalformedMessage(f"metadata {key} is not numeric: {text!r}") from exc
    if not all(math.isfinite(v) for v in values):
        raise MalformedMessage(f"non-finite metadata {key}: {text!r}")
    return values  # type: ignore[return-value]


def _number(metadata: dict, key: str) -> float:
    try:
        value = float(metadata[key])
    except ValueError as exc:
        raise MalformedMessage(f"metadata {key} is not a number: {metadata[key]!r}") from exc
    if not math.isfinite(value):
        raise MalformedMessage(f"non-finite metadata {key}: {metadata[key]!r}")
    return value


def parse_image(
    header: dict,
    body: bytes,
    crc: int,
    *,
    wall_now: float,
    expected_size: tuple[int, int] | None = (1024, 768),
    max_future_s: float = 1.0,
) -> tuple[int, float, float, np.ndarray, ProjectionGeometry]:
    """(frame_id, t_acquisition, exposure_s, image, geometry) of one IMAGE message.

    ``header`` holds pyigtl's header fields; ``wall_now`` is the receiver's wall clock.
    Raises MalformedMessage saying what was wrong.
    """
    if CRC64(body) != crc:
        raise MalformedMessage("CRC-64 mismatch")
    if header["header_version"] != 2:
        raise MalformedMessage("header version 1 carries no metadata (version 2 required)")
    if len(body) < _EXTENDED_HEADER.size:
        raise MalformedMessage(f"body of {len(body)} bytes has no extended header")
    message = ImageMessage()
    try:
        message.unpack(header, body)
    except NotImplementedError as exc:
        raise MalformedMessage(f"sub-volume images are not supported ({exc})") from exc
    except KeyError as exc:
        raise MalformedMessage(f"unknown scalar type {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - pyigtl raises anything on a bad body
        raise MalformedMessage(f"content does not unpack ({exc!r})") from exc

    image = message.image
    if image.ndim != 3 or image.shape[0] != 1:
        raise MalformedMessage(f"not a single-component 2-D image: shape {image.shape}")
    if image.dtype.kind != "u" or image.dtype.itemsize != 2:
        raise MalformedMessage(f"pixel type {image.dtype.name}, uint16 required")
    height, width = image.shape[1:]
    if expected_size is not None and (width, height) != tuple(expected_size):
        raise MalformedMessage(
            f"size {width}x{height} px, {expected_size[0]}x{expected_size[1]} expected"
        )
    image = image[0]
    if not image.dtype.isnative:
        image = image.astype(np.uint16)  # big-endian on the wire: to native order
    image.setflags(write=False)

    matrix = np.asarray(message.ijk_to_world_matrix, dtype=float)
    if not np.all(np.isfinite(matrix)):
        raise MalformedMessage("non-finite ijk_to_world geometry")
    u, v, origin = matrix[:3, 0], matrix[:3, 1], matrix[:3, 3]
    for axis, vec in (("u", u), ("v", v)):
        pitch = float(np.linalg.norm(vec))
        if not PITCH_RANGE_MM[0] <= pitch <= PITCH_RANGE_MM[1]:
            raise MalformedMessage(
                f"pixel pitch {pitch:.4g} mm along {axis} outside "
                f"{PITCH_RANGE_MM[0]}-{PITCH_RANGE_MM[1]} mm"
            )
    normal = np.cross(u, v)
    if np.linalg.norm(normal) < 0.5 * np.linalg.norm(u) * np.linalg.norm(v):
        raise MalformedMessage("panel axes u and v are (nearly) parallel")
    normal /= np.linalg.norm(normal)

    metadata = message.metadata
    for key in REQUIRED_METADATA:
        if key not in metadata:
            raise MalformedMessage(f"metadata {key} missing")
    source = _vector(metadata["source_mm"], "source_mm")
    distance = abs(float((np.asarray(source) - origin) @ normal))
    if distance < MIN_SOURCE_TO_PANEL_MM:
        raise MalformedMessage(f"source {distance:.1f} mm from the panel plane")
    try:
        frame_id = int(metadata["frame_id"])
    except ValueError as exc:
        raise MalformedMessage(
            f"metadata frame_id not an integer: {metadata['frame_id']!r}"
        ) from exc
    if frame_id < 0:
        raise MalformedMessage(f"negative frame_id {frame_id}")
    t_acquisition = _number(metadata, "t_acquisition")
    if t_acquisition - wall_now > max_future_s:
        raise MalformedMessage(
            f"t_acquisition {t_acquisition - wall_now:.3f} s in the future (limit {max_future_s} s)"
        )
    exposure_s = _number(metadata, "exposure_s")
    if not 0.0 <= exposure_s <= 10.0:
        raise MalformedMessage(f"exposure_s {exposure_s} outside 0-10 s")

    geometry = ProjectionGeometry(
        imager=header["device_name"],
        source_mm=source,
        panel_origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        panel_u_mm=(float(u[0]), float(u[1]), float(u[2])),
        panel_v_mm=(float(v[0]), float(v[1]), float(v[2])),
        width_px=int(width),
        height_px=int(height),
    )
    return frame_id, t_acquisition, exposure_s, image, geometry


class XrayImageDriver:
    """OpenIGTLink client with its own reader thread; pushes frames and events to ``sink``."""

    def __init__(
        self,
        host: str,
        port: int,
        sink: Sink,
        *,
        name: str = "xray",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        reconnect_max_s: float = 1.0,
        expected_size: tuple[int, int] | None = (1024, 768),
        max_future_s: float = 1.0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.name = name
        self._address = (host, port)
        self._sink = sink
        self._clock = clock
        self._wall_clock = wall_clock
        self._reconnect_max_s = reconnect_max_s
        self._expected_size = tuple(expected_size) if expected_size is not None else None
        self._max_future_s = max_future_s
        self._max_body_bytes = max_body_bytes
        self._log = logging.getLogger(f"motionctl.driver.{name}")
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.counts = {"frames": 0, "malformed": 0, "ignored": 0, "connects": 0}

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
            mtype, body_size = fields["message_type"], fields["body_size"]
            body = self._recv_exact(sock, body_size)
            if body is None:
                return "connection closed inside a message"
            if mtype != "IMAGE":
                self.counts["ignored"] += 1
                continue
            try:
                frame_id, t_acq, exposure_s, image, geometry = parse_image(
                    fields,
                    body,
                    crc,
                    wall_now=self._wall_clock(),
                    expected_size=self._expected_size,
                    max_future_s=self._max_future_s,
                )
            except MalformedMessage as exc:
                self._emit_event(
                    "malformed",
                    f"IMAGE from {fields['device_name']!r} ({body_size} byte body): {exc}",
                )
                continue
            self.counts["frames"] += 1
            self._sink(
                XrayFrame(
                    device=self.name,
                    frame_id=frame_id,
                    t_device=t_acq,
                    t_rx=t_rx,
                    image=image,
                    geometry=geometry,
                    exposure_s=exposure_s,
                )
            )
        return "stopped"
