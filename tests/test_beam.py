"""Beam gating interface: wire protocol, driver and simulated gating box over real ptys."""

from __future__ import annotations

import os
import re
import select
import threading
import time
import tty
from collections.abc import Callable

import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from motionctl.drivers.beam import (
    MAX_LINE_BYTES,
    Ack,
    BeamInterface,
    LineSplitter,
    ProtocolError,
    checksum,
    frame,
    parse_line,
    write_all,
)
from motionctl.simulators.linac import LinacGatingSim
from motionctl.types import DeviceEvent

# Functional tests use a long watchdog so that a slow CI machine cannot trip it between two
# steps of a test; the watchdog test itself uses the default 0.25 s.
RELAXED_WATCHDOG_S = 1.0
WAIT_S = 1.0  # upper bound for anything that should take milliseconds
OUR_THREAD_SUFFIXES = ("-reader", "-linac-sim")


class Recorder:
    """Collects what the driver's reader thread reports and lets the test wait for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.acks: list[Ack] = []
        self.events: list[DeviceEvent] = []

    def on_ack(self, ack: Ack) -> None:
        with self._cond:
            self.acks.append(ack)
            self._cond.notify_all()

    def on_event(self, event: DeviceEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def wait_ack(self, seq: int) -> Ack:
        assert self.wait_for(lambda r: any(a.seq == seq for a in r.acks)), f"no ACK for {seq}"
        with self._cond:
            return next(a for a in self.acks if a.seq == seq)

    def kinds(self, kind: str) -> list[DeviceEvent]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(OUR_THREAD_SUFFIXES)]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _read_line(fd: int, timeout: float = WAIT_S) -> bytes:
    """One line from a raw fd, byte by byte so nothing past the newline is consumed."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no complete line within {timeout} s; got {line!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            line += os.read(fd, 1)
    return line


@pytest.fixture(autouse=True)
def no_leftover_threads():
    yield
    assert _our_threads() == [], "a driver or simulator thread outlived its test"


@pytest.fixture
def sim():
    box = LinacGatingSim(watchdog_s=RELAXED_WATCHDOG_S)
    box.start()
    yield box
    box.stop()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def iface(sim, rec):
    beam = BeamInterface(sim.path, on_ack=rec.on_ack, on_event=rec.on_event)
    beam.open()
    yield beam
    beam.close()


# -- framing -------------------------------------------------------------------------------


def test_frame_and_parse_round_trip():
    # "ON,12": 0x4F ^ 0x4E ^ 0x2C ^ 0x31 ^ 0x32 == 0x2E
    assert frame("ON,12") == b"$ON,12*2E\n"
    assert parse_line(b"$ON,12*2E\n") == ("ON", "12")
    assert parse_line(b"$ON,12*2E") == ("ON", "12")  # the newline is optional
    assert parse_line(frame("ACK,65535,OFF")) == ("ACK", "65535", "OFF")


def _with_wrong_checksum(line: bytes) -> bytes:
    wrong = (int(line[-3:-1], 16) ^ 0x01) & 0xFF
    return line[:-3] + b"%02X\n" % wrong


_GOOD = frame("ACK,3,ON")


@pytest.mark.parametrize(
    ("line", "message", "reason"),
    [
        (
            _with_wrong_checksum(_GOOD),
            "checksum mismatch",
            "checksum",
        ),
        (_GOOD[1:], "missing '\\$'", "syntax"),
        (_GOOD.replace(b"*", b""), "missing '\\*'", "syntax"),
        (_GOOD[:-3] + b"G1\n", "not two uppercase hex digits", "syntax"),
        (b"$ON,12*2e\n", "not two uppercase hex digits", "syntax"),
        (b"$ACK,3,\xc3\x96N*00\n", "non-ASCII byte 0xC3 at offset 7", "non_ascii"),
        (b"$" + b"A" * 80 + b"*41\n", "too long: 85 bytes > 80", "too_long"),
        (b"$ACK,3\r,ON*00\n", "control character 0x0D", "syntax"),
        (b"$ACK,$3,ON*00\n", "reserved character '\\$'", "syntax"),
        (b"\n", "missing '\\$'", "syntax"),
    ],
    ids=[
        "bad-checksum",
        "missing-dollar",
        "missing-star",
        "non-hex-checksum",
        "lowercase-checksum",
        "non-ascii",
        "too-long",
        "control-char",
        "reserved-char",
        "empty",
    ],
)
def test_parse_line_rejects_and_names_the_problem(line, message, reason):
    with pytest.raises(ProtocolError, match=message) as info:
        parse_line(line)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("body", "message"),
    [("ON,1*", "reserved"), ("ON\n,1", "control"), ("ÖN,1", "non-ASCII"), ("A" * 76, "too long")],
)
def test_frame_refuses_bodies_the_box_would_reject(body, message):
    with pytest.raises(ProtocolError, match=message):
        frame(body)


_FIELD_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "$*,")
_fields = st.lists(st.text(alphabet=_FIELD_CHARS, max_size=12), min_size=1, max_size=6).filter(
    lambda fields: len(",".join(fields)) <= MAX_LINE_BYTES - 5  # "$" "*" "CS" "\n"
)


@given(_fields)
def test_parse_line_inverts_frame(fields):
    assert parse_line(frame(",".join(fields))) == tuple(fields)


@given(_fields, st.data())
def test_no_single_byte_corruption_gets_through(fields, data):
    line = bytearray(frame(",".join(fields)))
    index = data.draw(st.integers(0, len(line) - 1), label="index")
    original = line[index]
    line[index] = data.draw(st.integers(0, 255).filter(lambda b: b != original), label="byte")
    # A changed body byte changes the XOR; a changed checksum digit changes its value (case
    # is strict); a changed '$', '*' or '\n' breaks the framing. So, with this framing, a
    # single corrupted byte can never parse, not even when a checksum happens to match.
    try:
        fields_parsed = parse_line(bytes(line))
    except ProtocolError:
        return
    star = line.rindex(b"*")
    pytest.fail(
        f"corrupted line {bytes(line)!r} parsed as {fields_parsed}; checksum "
        f"{checksum(bytes(line[1:star])):02X}"
    )


def test_line_splitter_cuts_over_long_lines_once():
    splitter = LineSplitter()
    assert splitter.feed(b"$HB,1*") == []
    assert splitter.feed(b"00\n$A") == [b"$HB,1*00\n"]
    lines = splitter.feed(b"x" * 200)
    assert len(lines) == 1 and len(lines[0]) == MAX_LINE_BYTES + 1
    assert splitter.feed(b"y" * 200) == []  # still the same over-long line
    assert splitter.feed(b"tail\n$OFF,2*00\n") == [b"$OFF,2*00\n"]


# -- the simulated box on its own ------------------------------------------------------------


def test_sim_acks_commands_and_naks_bad_lines(sim):
    fd = os.open(sim.path, os.O_RDWR | os.O_NOCTTY)

    def exchange(line: bytes) -> bytes:
        os.write(fd, line)
        return _read_line(fd)

    try:
        assert exchange(frame("ON,7")) == frame("ACK,7,ON")
        assert sim.beam_on
        assert exchange(frame("HB,8")) == frame("ACK,8,ON")
        assert exchange(frame("FIRE,9")) == frame("NAK,9,unknown_command")
        assert not sim.beam_on  # doubt = hold
        assert exchange(frame("ON,10")) == frame("ACK,10,ON")
        assert exchange(_with_wrong_checksum(frame("ON,11"))) == frame("NAK,-,checksum")
        assert not sim.beam_on
        assert exchange(frame("ON,65536")) == frame("NAK,-,syntax")
        assert exchange(frame("ON")) == frame("NAK,-,syntax")
        assert exchange(frame("HB,12,extra")) == frame("NAK,12,syntax")
        assert exchange(b"$" + b"A" * 100 + b"\n") == frame("NAK,-,too_long")
        assert exchange(b"$ON,13\xff*00\n") == frame("NAK,-,non_ascii")
        assert exchange(frame("OFF,14")) == frame("ACK,14,OFF")
        assert exchange(frame("HB,65535")) == frame("ACK,65535,OFF")
    finally:
        os.close(fd)
    assert sim.stats() == {
        "commands": 3,
        "heartbeats": 2,
        "malformed": 7,
        "watchdog_trips": 0,
        "replies_dropped": 0,
    }
    assert [state for _, state in sim.edges()] == [True, False, True, False]


# -- driver and box over a pty ---------------------------------------------------------------


def test_command_reaches_box_and_is_acknowledged(sim, iface, rec):
    assert iface.fault() is None
    t0 = time.monotonic()
    seq_on = iface.command(True)
    assert seq_on == 0
    t_on = sim.wait_for_edge(True, after=t0, timeout=WAIT_S)
    assert t_on is not None
    ack = rec.wait_ack(seq_on)
    assert ack.command == "ON" and ack.beam_on
    assert 0 < ack.round_trip_s < 0.1
    assert iface.acknowledged_on and iface.requested_on

    assert iface.command(True) is None  # unchanged: nothing sent

    seq_off = iface.command(False)
    assert seq_off == 1
    t_off = sim.wait_for_edge(False, after=t_on, timeout=WAIT_S)
    assert t_off is not None
    assert not rec.wait_ack(seq_off).beam_on
    assert not iface.acknowledged_on and not iface.requested_on

    assert sim.edges() == [(t_on, True), (t_off, False)]
    assert sim.stats()["commands"] == 2
    stats = iface.stats()
    assert (stats["sent"], stats["acks"], stats["naks"], stats["malformed"]) == (2, 2, 0, 0)
    assert 0 < stats["last_rtt_s"] <= stats["max_rtt_s"] < 0.1
    assert iface.fault() is None


def test_force_resends_an_unchanged_command(sim, iface, rec):
    first = iface.command(True)
    second = iface.command(True, force=True)
    assert second == first + 1
    rec.wait_ack(second)
    assert sim.stats()["commands"] == 2
    assert [state for _, state in sim.edges()] == [True]  # one edge: already on


def test_seq_wraps_after_65535(sim, iface, rec):
    iface._next_seq = 65535  # reach the wrap without sending 65535 messages first
    assert iface.heartbeat() == 65535
    assert iface.heartbeat() == 0
    assert rec.wait_ack(65535).command == "HB"
    assert rec.wait_ack(0).command == "HB"
    assert iface.fault() is None


def test_heartbeats_hold_beam_watchdog_trips_on_time_and_latches(rec):
    watchdog_s = 0.25
    sim = LinacGatingSim(watchdog_s=watchdog_s)
    sim.start()
    pacer = threading.Event()  # never set: its wait() paces the heartbeats

    def heartbeats_for(beam: BeamInterface, duration_s: float) -> float:
        t_last = t_start = time.monotonic()
        while t_last - t_start < duration_s:
            t_last = time.monotonic()
            beam.heartbeat()
            pacer.wait(0.05)
        return t_last

    try:
        with BeamInterface(sim.path, on_ack=rec.on_ack, on_event=rec.on_event) as beam:
            t0 = time.monotonic()
            beam.command(True)
            t_on = sim.wait_for_edge(True, after=t0, timeout=WAIT_S)
            assert t_on is not None

            t_last = heartbeats_for(beam, 2.5 * watchdog_s)
            assert t_last - t_on > 2 * watchdog_s
            assert sim.beam_on
            assert sim.wait_for_edge(False, after=t_on, timeout=0) is None
            assert beam.fault() is None

            # Heartbeats stop: the box holds by itself, on time.
            t_off = sim.wait_for_edge(False, after=t_on, timeout=WAIT_S)
            assert t_off is not None
            assert watchdog_s <= t_off - t_last <= watchdog_s + 0.05
            assert sim.stats()["watchdog_trips"] == 1

            # Heartbeats resume: the box stays off (latched) and the driver says why.
            heartbeats_for(beam, 2 * watchdog_s)
            assert not sim.beam_on
            assert sim.wait_for_edge(True, after=t_off, timeout=0) is None
            assert rec.wait_for(lambda r: r.kinds("box_hold"))
            assert beam.fault() == "box_hold"
            assert beam.requested_on and not beam.acknowledged_on

            # The gate holds (the hold's ACK clears the fault); a fresh ON re-enables.
            rec.wait_ack(beam.command(False))
            assert beam.fault() is None
            t1 = time.monotonic()
            beam.command(True)
            assert sim.wait_for_edge(True, after=t1, timeout=WAIT_S) is not None
    finally:
        sim.stop()


def test_garbage_line_is_naked_and_holds_the_beam(sim, iface, rec):
    t0 = time.monotonic()
    iface.command(True)
    t_on = sim.wait_for_edge(True, after=t0, timeout=WAIT_S)
    assert t_on is not None

    second_handle = os.open(sim.path, os.O_WRONLY | os.O_NOCTTY)
    try:
        os.write(second_handle, b"garbage\n")
    finally:
        os.close(second_handle)

    assert sim.wait_for_edge(False, after=t_on, timeout=WAIT_S) is not None
    assert sim.stats()["malformed"] == 1
    assert rec.wait_for(lambda r: r.kinds("nak"))
    assert rec.kinds("nak")[0].detail == "NAK,-,syntax"
    assert iface.fault() == "nak:syntax"
    assert not iface.acknowledged_on
    assert iface.stats()["naks"] == 1

    # A confirmed hold clears the doubt.
    seq = iface.command(False)
    assert seq is not None
    rec.wait_ack(seq)
    assert iface.fault() is None
    assert rec.kinds("fault_cleared")


def test_unanswered_message_is_ack_lost(sim, rec):
    clock = FakeClock()
    with BeamInterface(
        sim.path, clock=clock, ack_timeout_s=0.1, on_ack=rec.on_ack, on_event=rec.on_event
    ) as beam:
        sim.set_acks_enabled(False)
        beam.heartbeat()
        clock.t += 0.099
        assert beam.fault() is None
        clock.t += 0.002
        assert beam.fault() == "ack_lost"
        assert rec.wait_for(lambda r: r.kinds("ack_lost"))
        assert "HB,0 not acknowledged within 100 ms" in rec.kinds("ack_lost")[0].detail
        assert beam.stats()["lost"] == 1
        assert beam.command(True) is not None
        assert beam.fault() == "ack_lost"  # an ON does not clear the doubt

        # The box answers again: only an acknowledged hold clears the fault.
        sim.set_acks_enabled(True)
        rec.wait_ack(beam.command(False))
        assert beam.fault() is None


def test_close_sends_off_and_leaves_nothing_open():
    fds_before = _open_fds()
    sim = LinacGatingSim(watchdog_s=RELAXED_WATCHDOG_S)
    path = sim.start()
    beam = BeamInterface(path)
    beam.open()
    assert set(_our_threads()) == {"beam-reader", "beam-linac-sim"}
    t0 = time.monotonic()
    beam.command(True)
    t_on = sim.wait_for_edge(True, after=t0, timeout=WAIT_S)
    assert t_on is not None

    t_close = time.monotonic()
    beam.close()
    # close() waited for the OFF's ACK, so the edge is already there, long before the
    # watchdog could have made it.
    t_off = sim.wait_for_edge(False, after=t_on, timeout=0)
    assert t_off is not None and t_off - t_close < 0.1
    assert sim.stats()["commands"] == 2 and sim.stats()["watchdog_trips"] == 0
    assert beam.fault() == "not_open"

    beam.close()
    sim.stop()
    sim.stop()
    assert _our_threads() == []
    assert _open_fds() == fds_before


def test_not_open():
    beam = BeamInterface("loop://")
    assert beam.fault() == "not_open"
    with pytest.raises(serial.PortNotOpenError):
        beam.command(True)
    with pytest.raises(serial.PortNotOpenError):
        beam.heartbeat()
    assert not beam.requested_on
    beam.close()  # nothing to close: no error


def test_box_disappearing_is_a_port_error_until_it_is_back_and_confirms_a_hold(tmp_path, rec):
    # The driver opens a stable name for the port, as udev's /dev/serial/by-id/... links are;
    # the box behind it goes away (a USB adapter pulled) and comes back on another pty.
    link = tmp_path / "gating-box"
    sim = LinacGatingSim(watchdog_s=RELAXED_WATCHDOG_S)
    link.symlink_to(sim.start())
    beam = BeamInterface(str(link), on_ack=rec.on_ack, on_event=rec.on_event, reconnect_max_s=0.2)
    beam.open()
    again = None
    try:
        rec.wait_ack(beam.command(True))
        sim.stop()  # the pty goes away under the driver
        assert rec.wait_for(lambda r: r.kinds("port_error"))
        assert beam.fault() == "port_error"
        with pytest.raises(serial.SerialException):
            beam.heartbeat()
        again = LinacGatingSim(watchdog_s=RELAXED_WATCHDOG_S)
        new_link = tmp_path / "gating-box.new"
        new_link.symlink_to(again.start())
        new_link.replace(link)
        assert rec.wait_for(lambda r: r.kinds("connected")), "not reopened"
        (connected,) = rec.kinds("connected")
        assert connected.detail == str(link)
        # Open again, but in doubt until the box confirms a hold: an acknowledged heartbeat
        # does not clear it, an acknowledged OFF does; then a fresh ON enables the new box.
        rec.wait_ack(beam.heartbeat())
        assert beam.fault() == "port_error"
        assert again.wait_for_edge(True, after=0.0, timeout=0) is None
        off = rec.wait_ack(beam.command(False))
        assert not off.beam_on and beam.fault() is None
        on = rec.wait_ack(beam.command(True))
        assert on.beam_on and beam.fault() is None
        assert again.wait_for_edge(True, after=0.0, timeout=WAIT_S) is not None
    finally:
        beam.close()  # must neither hang nor raise
        sim.stop()
        if again is not None:
            again.stop()
    assert beam.fault() == "not_open"
    kinds = [e.kind for e in rec.events]
    assert kinds.count("port_error") == 1, kinds
    assert kinds.index("port_error") < kinds.index("connected") < kinds.index("fault_cleared")


def test_close_stops_reopening_a_port_that_is_gone(rec):
    sim = LinacGatingSim(watchdog_s=RELAXED_WATCHDOG_S)
    sim.start()
    beam = BeamInterface(sim.path, on_event=rec.on_event)
    beam.open()
    try:
        sim.stop()  # the pty goes away under the driver, for good
        assert rec.wait_for(lambda r: r.kinds("port_error"))
        assert beam.fault() == "port_error"
    finally:
        t0 = time.monotonic()
        beam.close()  # stops the reopening: neither hangs nor raises
        sim.stop()
    assert time.monotonic() - t0 < WAIT_S
    assert beam.fault() == "not_open"
    assert not rec.kinds("connected")


def test_driver_survives_malformed_replies(rec):
    """The test plays the box on a raw pty and answers with junk before a good ACK."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        with BeamInterface(os.ttyname(slave), on_ack=rec.on_ack, on_event=rec.on_event) as beam:
            seq = beam.heartbeat()
            assert _read_line(master) == frame(f"HB,{seq}")
            good = frame(f"ACK,{seq},OFF")
            os.write(master, _with_wrong_checksum(good))
            os.write(master, b"#" * 200 + b"\n")
            os.write(master, frame(f"ACK,{seq},MAYBE"))
            os.write(master, frame("ACK,77,OFF"))
            os.write(master, good)
            ack = rec.wait_ack(seq)
            assert ack.command == "HB" and not ack.beam_on
            details = [e.detail for e in rec.kinds("malformed")]
            assert len(details) == 3
            assert "checksum mismatch" in details[0] and f"({len(good)} bytes)" in details[0]
            # 201 bytes if they arrive in one read, cut at 81 if the line straddles reads
            assert re.fullmatch(
                r"line too long: (201|81) bytes > 80 \((201|81) bytes\)", details[1]
            )
            assert "neither ON nor OFF" in details[2]
            assert rec.kinds("unmatched_ack")
            stats = beam.stats()
            assert (stats["malformed"], stats["acks"], stats["unmatched"]) == (3, 2, 1)
            # The first unreadable line put the link in doubt; the good ACK of an HB after
            # it does not clear that, only a confirmed hold does.
            assert beam.fault() == "malformed:checksum"
            assert all(e.device == "beam" for e in rec.events)
    finally:
        os.close(master)
        os.close(slave)


def test_a_malformed_line_between_intact_acks_latches_until_a_confirmed_hold(rec):
    """A garbled line from the box that is not in place of a reply (every message still gets
    its ACK) is counted, reported, and puts the link in doubt: the gate holds on
    beam_interface until an OFF sent after it is acknowledged OFF."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        with BeamInterface(os.ttyname(slave), on_ack=rec.on_ack, on_event=rec.on_event) as beam:
            seq = beam.command(True)
            assert _read_line(master) == frame(f"ON,{seq}")
            os.write(master, frame(f"ACK,{seq},ON"))
            rec.wait_ack(seq)
            assert beam.fault() is None

            os.write(master, b"$ACK,1,O\x15N*3C\n")  # noise in a line of its own
            assert rec.wait_for(lambda r: r.kinds("malformed"))
            assert beam.fault() == "malformed:syntax"
            assert beam.stats()["malformed"] == 1
            assert "control character 0x15" in rec.kinds("malformed")[0].detail

            hb = beam.heartbeat()  # intact replies go on: still in doubt
            assert _read_line(master) == frame(f"HB,{hb}")
            os.write(master, frame(f"ACK,{hb},ON"))
            rec.wait_ack(hb)
            assert beam.fault() == "malformed:syntax"
            assert beam.command(True) is None  # unchanged request: nothing sent

            off = beam.command(False)
            assert _read_line(master) == frame(f"OFF,{off}")
            os.write(master, frame(f"ACK,{off},OFF"))
            rec.wait_ack(off)
            assert beam.fault() is None
            assert [e.kind for e in rec.events] == ["malformed", "fault_cleared"]
    finally:
        os.close(master)
        os.close(slave)


def test_sim_injected_noise_reaches_the_host_as_one_malformed_line(sim, iface, rec):
    t0 = time.monotonic()
    rec.wait_ack(iface.command(True))
    assert sim.wait_for_edge(True, after=t0, timeout=WAIT_S) is not None
    assert sim.inject(b"$ACK,0,ON*00\n")  # a wrong checksum, between replies
    assert rec.wait_for(lambda r: r.kinds("malformed"))
    assert iface.fault() == "malformed:checksum"
    assert sim.beam_on  # the box itself saw nothing wrong: the host must hold it
    rec.wait_ack(iface.command(False))
    assert iface.fault() is None and not sim.beam_on


def test_loop_url_reads_back_own_command_as_malformed(rec):
    with BeamInterface("loop://", on_ack=rec.on_ack, on_event=rec.on_event) as beam:
        beam.command(True)
        assert rec.wait_for(lambda r: len(r.kinds("malformed")) >= 1)
        detail = rec.kinds("malformed")[0].detail
        assert (
            "unexpected message type 'ON'" in detail and f"({len(frame('ON,0'))} bytes)" in detail
        )
        beam.heartbeat()  # the reader is still alive and still reporting
        assert rec.wait_for(lambda r: len(r.kinds("malformed")) >= 2)
        assert beam.stats()["malformed"] == 2
        assert rec.acks == []


def test_failing_callback_is_a_reader_error_not_a_silent_death(sim, caplog):
    called = threading.Event()

    def broken_on_ack(ack: Ack) -> None:
        called.set()
        raise RuntimeError("bug in the consumer")

    beam = BeamInterface(sim.path, on_ack=broken_on_ack)
    beam.open()
    try:
        reader = next(t for t in threading.enumerate() if t.name == "beam-reader")
        t0 = time.monotonic()
        beam.command(True)
        assert called.wait(WAIT_S)
        reader.join(WAIT_S)
        assert not reader.is_alive()
        assert beam.fault() == "reader_error"
        assert "bug in the consumer" in caplog.text
    finally:
        beam.close()  # still sends OFF: the port itself is fine
    assert sim.wait_for_edge(False, after=t0, timeout=WAIT_S) is not None
    assert sim.stats()["watchdog_trips"] == 0


def test_a_completed_write_is_not_a_timeout_however_late_the_thread_runs(monkeypatch):
    # pyserial's POSIX write() raises SerialTimeoutException if its deadline has passed
    # when os.write() returns, even with every byte written (pyserial #281): under load the
    # gating box's port was taken for failed, closed and reopened. A clock that runs a
    # second per reading stands for a thread descheduled around the write.
    import pty

    master, slave = pty.openpty()
    tty.setraw(master)
    port = serial.serial_for_url(os.ttyname(slave), write_timeout=0.1)
    try:
        ticks = iter(range(10_000))

        def late() -> float:
            return float(next(ticks))

        monkeypatch.setattr(serial.serialutil.Timeout, "TIME", staticmethod(late))
        monkeypatch.setattr(time, "monotonic", late)
        with pytest.raises(serial.SerialTimeoutException):
            port.write(b"HB,1*00\n")  # pyserial's own write: the spurious timeout
        write_all(port, b"HB,2*00\n", 0.1)  # every byte taken: no timeout
        monkeypatch.undo()
        received = b""
        while select.select([master], [], [], 0.5)[0] and len(received) < 16:
            received += os.read(master, 64)
        assert received == b"HB,1*00\nHB,2*00\n"
        # a device that stops reading: the bytes it never takes are a timeout, in time
        t0 = time.monotonic()
        with pytest.raises(serial.SerialTimeoutException, match="not taken in 0.1 s"):
            for _ in range(10_000):
                write_all(port, b"x" * 4096, 0.1)
        assert time.monotonic() - t0 < 2.0
    finally:
        port.close()
        os.close(master)
        os.close(slave)
