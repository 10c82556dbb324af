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

import math
import struct
import time
from collections.abc import Callable

import numpy as np
from pyigtl.messages import CRC64, ImageMessage

from motionctl.drivers import igtl_client
from motionctl.drivers.igtl_client import (
    HEADER_SIZE,
    FramingError,
    IgtlClientDriver,
    MalformedMessage,
)
from motionctl.types import DeviceEvent, ProjectionGeometry, XrayFrame

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY_BYTES",
    "FramingError",
    "MalformedMessage",
    "XrayImageDriver",
    "parse_header",
    "parse_image",
]

_EXTENDED_HEADER = struct.Struct("> H H I I")
MAX_BODY_BYTES = 64 << 20  # 4096 x 4096 x 16 bit fits; beyond, the framing is lost
PITCH_RANGE_MM = (0.05, 2.0)
MIN_SOURCE_TO_PANEL_MM = 10.0
REQUIRED_METADATA = ("source_mm", "frame_id", "t_acquisition", "exposure_s")

Sink = Callable[[XrayFrame | DeviceEvent], None]


def parse_header(header: bytes, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[dict, int]:
    """pyigtl's header fields (validated) and the body CRC; raises FramingError."""
    return igtl_client.parse_header(header, max_body_bytes)


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


class XrayImageDriver(IgtlClientDriver):
    """OpenIGTLink client with its own reader thread; pushes frames and events to ``sink``."""

    _frame_counter = "frames"

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
        super().__init__(
            host,
            port,
            sink,
            name=name,
            clock=clock,
            reconnect_max_s=reconnect_max_s,
            max_body_bytes=max_body_bytes,
        )
        self._wall_clock = wall_clock
        self._expected_size = tuple(expected_size) if expected_size is not None else None
        self._max_future_s = max_future_s

    def _accepts(self, fields: dict) -> bool:
        return fields["message_type"] == "IMAGE"

    def _parse_message(self, fields: dict, body: bytes, crc: int, t_rx: float) -> XrayFrame:
        frame_id, t_acq, exposure_s, image, geometry = parse_image(
            fields,
            body,
            crc,
            wall_now=self._wall_clock(),
            expected_size=self._expected_size,
            max_future_s=self._max_future_s,
        )
        return XrayFrame(
            device=self.name,
            frame_id=frame_id,
            t_device=t_acq,
            t_rx=t_rx,
            image=image,
            geometry=geometry,
            exposure_s=exposure_s,
        )

    def _message_label(self, fields: dict) -> str:
        return f"IMAGE from {fields['device_name']!r}"
