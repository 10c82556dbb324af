"""Surface tracker over OpenIGTLink: parser on bytes, interoperability with pyigtl's own
server and client, and bad input on a real loopback socket."""

from __future__ import annotations

import math
import queue
import signal
import socket
import struct
import threading

import numpy as np
import pyigtl
import pytest

from motionctl.drivers.igtl_tracker import (
    FramingError,
    IgtlTrackerDriver,
    MalformedMessage,
    parse_header,
    parse_point,
)
from motionctl.simulators.surface_tracker import SurfaceTrackerSim
from motionctl.types import DeviceEvent, SurrogateSample

TIMEOUT = 5.0


def _transform_bytes(point, header_version=2, message_id=7, device="surface"):
    matrix = np.eye(4)
    matrix[:3, 3] = point
    msg = pyigtl.TransformMessage(matrix, timestamp=1700000000.25, device_name=device)
    msg.header_version = header_version
    msg.message_id = message_id
    return msg.pack()


def _parse(data: bytes):
    fields, crc = parse_header(data[:58])
    body = data[58 : 58 + fields["body_size"]]
    return fields["timestamp"], parse_point(fields, body, crc, 500.0)


@pytest.mark.parametrize("version", [1, 2])
def test_transform_round_trip(version):
    t_device, (message_id, point) = _parse(_transform_bytes((1.5, -12.25, 8.0), version))
    assert point == pytest.approx((1.5, -12.25, 8.0))
    assert t_device == pytest.approx(1700000000.25, abs=1e-6)
    assert message_id == (7 if version == 2 else None)


def test_position_round_trip():
    msg = pyigtl.PositionMessage([3.0, 4.0, -5.0], [0, 0, 0, 1], device_name="surface")
    _, (_, point) = _parse(msg.pack())
    assert point == pytest.approx((3.0, 4.0, -5.0))


def test_corrupt_body_fails_crc():
    data = bytearray(_transform_bytes((1, 2, 3)))
    data[-1] ^= 0x40
    with pytest.raises(MalformedMessage, match="CRC"):
        _parse(bytes(data))


@pytest.mark.parametrize(("value", "what"), [(math.nan, "non-finite"), (9999.0, "beyond")])
def test_non_finite_or_out_of_range_point_is_malformed(value, what):
    with pytest.raises(MalformedMessage, match=what):
        _parse(_transform_bytes((0.0, value, 0.0)))


def test_header_that_breaks_framing():
    good = _transform_bytes((0, 0, 0))
    with pytest.raises(FramingError, match="version"):
        parse_header(b"\x00\x09" + good[2:58])
    huge = good[:42] + struct.pack(">Q", 1 << 40) + good[50:58]
    with pytest.raises(FramingError, match="body size"):
        parse_header(huge)


def _drain(q: queue.Queue, kind, n: int) -> list:
    out = []
    while len(out) < n:
        item = q.get(timeout=TIMEOUT)
        if isinstance(item, kind):
            out.append(item)
    return out


def _wait_event(q: queue.Queue, kind: str) -> DeviceEvent:
    while True:
        item = q.get(timeout=TIMEOUT)
        if isinstance(item, DeviceEvent) and item.kind == kind:
            return item


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_driver_reads_from_pyigtl_server():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    port = _free_port()
    server = pyigtl.OpenIGTLinkServer(port=port, local_server=True)
    received: queue.Queue = queue.Queue()
    driver = IgtlTrackerDriver("127.0.0.1", port, received.put)
    driver.start()
    try:
        _wait_event(received, "connected")
        points = [(0.5 * i, -1.0 * i, 2.0 + i) for i in range(5)]
        for point in points:
            matrix = np.eye(4)
            matrix[:3, 3] = point
            server.send_message(pyigtl.TransformMessage(matrix, device_name="surface"))
        # pyigtl's server speaks header version 1 and ignores other device names.
        server.send_message(pyigtl.TransformMessage(np.eye(4), device_name="other"))
        samples = _drain(received, SurrogateSample, 5)
    finally:
        driver.stop()
        server.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert [s.position_mm for s in samples] == [pytest.approx(p) for p in points]
    assert [s.seq for s in samples] == [0, 1, 2, 3, 4]  # counted by the driver (version 1)
    assert all(s.device == "surface" for s in samples)


class _ConstantPatient:
    def state(self, t):
        from types import SimpleNamespace

        return SimpleNamespace(surrogate_mm=(1.0, 2.0, 3.0 + t), target_mm=(0.0, 0.0, 0.0))


def test_pyigtl_client_reads_from_simulator():
    sim = SurfaceTrackerSim(_ConstantPatient(), port=0, rate_hz=30.0)
    host, port = sim.start()
    client = pyigtl.OpenIGTLinkClient(host, port)
    try:
        message = client.wait_for_message("surface", timeout=TIMEOUT)
    finally:
        client.stop()
        sim.stop()
    assert message is not None and message.message_type == "TRANSFORM"
    assert message.matrix[0, 3] == pytest.approx(1.0) and message.matrix[1, 3] == pytest.approx(2.0)
    assert message.header_version == 2


def test_driver_counts_every_frame_the_simulator_sent():
    sim = SurfaceTrackerSim(_ConstantPatient(), port=0, rate_hz=60.0)
    received: queue.Queue = queue.Queue()
    driver = IgtlTrackerDriver(*sim.start(), received.put)
    driver.start()
    try:
        samples = _drain(received, SurrogateSample, 30)
    finally:
        sim.stop()
        driver.stop()
    sent = {f.seq: f for f in sim.sent}
    while not received.empty():
        item = received.get()
        if isinstance(item, SurrogateSample):
            samples.append(item)
    assert [s.seq for s in samples] == sorted(sent)  # none lost, none reordered
    for s in samples:
        assert s.position_mm == pytest.approx(sent[s.seq].surrogate_mm)
        assert s.t_rx >= sent[s.seq].t_sent - 1e-3


class _RawServer:
    """A loopback server that sends exactly the bytes a test gives it (a misbehaving device)."""

    def __init__(self, payloads: list[bytes]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.payloads = payloads
        self.thread = threading.Thread(target=self._serve, name="raw-server")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def _serve(self) -> None:
        self.listener.settimeout(TIMEOUT)
        for payload in self.payloads:
            conn, _ = self.listener.accept()
            with conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                try:
                    conn.recv(1)  # until the driver closes its side
                except ConnectionResetError:
                    pass  # the driver dropped the connection with bytes unread: expected

    def close(self) -> None:
        self.thread.join(timeout=TIMEOUT)
        self.listener.close()


def test_bad_messages_are_reported_and_dropped_and_lost_framing_reconnects():
    good1 = _transform_bytes((1, 1, 1), message_id=1)
    corrupt = bytearray(_transform_bytes((2, 2, 2), message_id=2))
    corrupt[-3] ^= 0xFF
    nan = _transform_bytes((math.nan, 0, 0), message_id=3)
    good4 = _transform_bytes((4, 4, 4), message_id=4)
    garbage = b"\xde\xad" * 40
    good5 = _transform_bytes((5, 5, 5), message_id=5)
    server = _RawServer([good1 + bytes(corrupt) + nan + good4 + garbage, good5])
    received: queue.Queue = queue.Queue()
    driver = IgtlTrackerDriver("127.0.0.1", server.port, received.put, reconnect_max_s=0.2)
    driver.start()
    items = []
    try:
        while not any(isinstance(i, SurrogateSample) and i.seq == 5 for i in items):
            items.append(received.get(timeout=TIMEOUT))
    finally:
        driver.stop()
        server.close()
    samples = [i.seq for i in items if isinstance(i, SurrogateSample)]
    malformed = [i.detail for i in items if isinstance(i, DeviceEvent) and i.kind == "malformed"]
    assert samples == [1, 4, 5]
    assert "CRC" in malformed[0] and "TRANSFORM" in malformed[0]
    assert "non-finite" in malformed[1]
    assert "header" in malformed[2]
    assert any(isinstance(i, DeviceEvent) and i.kind == "disconnected" for i in items)
    assert driver.counts["malformed"] == 3
    assert driver.counts["connects"] >= 2  # a third may sneak in before the driver stops
