"""Breath-hold spirometer: wire protocol, the device model, and driver and simulated device
over a real pty."""

from __future__ import annotations

import os
import re
import select
import threading
import time
import tty
from collections.abc import Callable

import numpy as np
import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from motionctl.drivers.beam import LineSplitter
from motionctl.drivers.spirometer import (
    CommandReply,
    ProtocolError,
    Reading,
    Reply,
    SpirometerDriver,
    Status,
    frame,
    parse_message,
)
from motionctl.simulators.patient import LujanParams, LujanPatient
from motionctl.simulators.spirometer import BreathHoldModel, SpirometerSim
from motionctl.types import DeviceEvent, SpirometerSample

WAIT_S = 1.0  # upper bound for anything that should take milliseconds
OUR_THREAD_SUFFIXES = ("-reader", "-spirometer-sim")


class Recorder:
    """Collects what the driver's reader thread delivers and lets the test wait for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.samples: list[SpirometerSample] = []
        self.events: list[DeviceEvent] = []

    def __call__(self, item: SpirometerSample | DeviceEvent) -> None:
        with self._cond:
            if isinstance(item, SpirometerSample):
                self.samples.append(item)
            else:
                self.events.append(item)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def kinds(self, kind: str) -> list[DeviceEvent]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]

    def sample_count(self) -> int:
        with self._cond:
            return len(self.samples)


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
    """One line from a raw fd, byte by byte so that nothing past the newline is consumed."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no complete line within {timeout} s; got {line!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            line += os.read(fd, 1)
    return line


def _with_wrong_checksum(line: bytes) -> bytes:
    wrong = (int(line[-3:-1], 16) ^ 0x01) & 0xFF
    return line[:-3] + b"%02X\n" % wrong


def _steady_patient(**overrides) -> LujanPatient:
    params = {"period_s": 4.0, "surrogate_lead_s": 0.0, **overrides}
    return LujanPatient(LujanParams(**params), seed=0)


@pytest.fixture(autouse=True)
def no_leftover_threads():
    yield
    assert _our_threads() == [], "a driver or simulator thread outlived its test"


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def rig(rec):
    """A simulated spirometer and the driver on its pty; the patient never lets go."""
    sim = SpirometerSim(_steady_patient(), release_ml=1e6, noise_ml=1.0)
    sim.start()
    driver = SpirometerDriver(sim.path, rec)
    driver.start()
    yield sim, driver
    driver.stop()
    sim.stop()


# -- protocol ----------------------------------------------------------------------------------


def test_parse_every_message_type():
    assert parse_message(frame("SPV,17,5123,612,-45,C,600")) == Reading(
        17, 5123, 612, -45, True, 600
    )
    assert parse_message(frame("SPV,65535,4294967295,-2000,19999,O,0")) == Reading(
        65535, 4294967295, -2000, 19999, False, 0
    )
    assert parse_message(frame("SPV,0,0,8000,-19999,O,8000")).volume_ml == 8000
    assert parse_message(frame("STS,40,CLOSED,patient")) == Status(40, "CLOSED", "patient")
    assert parse_message(frame("STS,41,OPENED,host")) == Status(41, "OPENED", "host")
    assert parse_message(frame("STS,42,ZEROED,-35")) == Status(42, "ZEROED", "-35")
    assert parse_message(frame("STS,43,LEVEL,1200")) == Status(43, "LEVEL", "1200")
    assert parse_message(frame("STS,44,ERROR,sensor_2")) == Status(44, "ERROR", "sensor_2")
    assert parse_message(frame("ACK,3,VALVE")) == Reply("ACK", 3, "VALVE")
    assert parse_message(frame("NAK,4,valve_closed")) == Reply("NAK", 4, "valve_closed")
    assert parse_message(frame("NAK,-,checksum")) == Reply("NAK", None, "checksum")


@pytest.mark.parametrize(
    ("body_or_line", "message", "reason"),
    [
        (_with_wrong_checksum(frame("SPV,1,2,3,4,O,0")), "checksum mismatch", "checksum"),
        ("SPV,1,2,3,4,O", "SPV needs 7 fields, got 6", "fields"),
        ("SPV,1,2,3,4,O,0,9", "SPV needs 7 fields, got 8", "fields"),
        ("SPV,1,2,abc,4,O,0", "volume_ml 'abc' is not a decimal integer", "number"),
        ("SPV,1,2,3.5,4,O,0", "volume_ml '3.5' is not a decimal integer", "number"),
        ("SPV,1,2,+3,4,O,0", "volume_ml '\\+3' is not a decimal integer", "number"),
        ("SPV,01,2,3,4,O,0", "seq '01' is not a decimal integer", "number"),
        ("SPV,1,2,,4,O,0", "volume_ml '' is not a decimal integer", "number"),
        ("SPV,1,2,8001,4,O,0", "volume_ml 8001 outside -2000..8000", "range"),
        ("SPV,1,2,-2001,4,O,0", "volume_ml -2001 outside -2000..8000", "range"),
        ("SPV,1,2,3,20000,O,0", "flow_ml_s 20000 outside -19999..19999", "range"),
        ("SPV,1,2,3,-20000,O,0", "flow_ml_s -20000 outside", "range"),
        ("SPV,1,2,3,4,O,8001", "level_ml 8001 outside 0..8000", "range"),
        ("SPV,65536,2,3,4,O,0", "seq 65536 outside 0..65535", "range"),
        ("SPV,-1,2,3,4,O,0", "seq -1 outside", "range"),
        ("SPV,1,4294967296,3,4,O,0", "t_ms 4294967296 outside", "range"),
        ("SPV,1,2,3,4,X,0", "valve 'X' is neither O nor C", "syntax"),
        ("STS,1,BURST,x", "STS event 'BURST' is not one of", "unexpected"),
        ("STS,1,CLOSED,nurse", "cause 'nurse' is neither host nor patient", "syntax"),
        ("STS,1,LEVEL,9000", "LEVEL ml 9000 outside 0..8000", "range"),
        ("STS,1,ERROR,", "ERROR code '' is not", "syntax"),
        ("ACK,1,FIRE", "ACK for 'FIRE', which is not a command", "syntax"),
        ("ACK,1", "ACK needs 3 fields, got 2", "fields"),
        ("NAK,x,checksum", "NAK seq 'x' is not a decimal integer", "number"),
        ("VALVE,1,C", "unexpected message type 'VALVE'", "unexpected"),
        (b"hello\n", "missing '\\$'", "syntax"),
        (b"$SPV,1,2," + b"9" * 80 + b"*00\n", "line too long", "too_long"),
        (b"$SPV,1,2,3,4,\xc3\x96,0*00\n", "non-ASCII byte 0xC3", "non_ascii"),
    ],
)
def test_parse_message_rejects_and_names_the_problem(body_or_line, message, reason):
    line = frame(body_or_line) if isinstance(body_or_line, str) else body_or_line
    with pytest.raises(ProtocolError, match=message) as info:
        parse_message(line)
    assert info.value.reason == reason


_readings = st.builds(
    Reading,
    seq=st.integers(0, 65535),
    t_ms=st.integers(0, 2**32 - 1),
    volume_ml=st.integers(-2000, 8000),
    flow_ml_s=st.integers(-19999, 19999),
    valve_closed=st.booleans(),
    level_ml=st.integers(0, 8000),
)


def _spv(r: Reading) -> bytes:
    valve = "C" if r.valve_closed else "O"
    return frame(f"SPV,{r.seq},{r.t_ms},{r.volume_ml},{r.flow_ml_s},{valve},{r.level_ml}")


@given(_readings)
def test_reading_round_trip(reading):
    assert parse_message(_spv(reading)) == reading


@given(_readings, st.data())
def test_a_single_corrupted_byte_never_parses(reading, data):
    line = bytearray(_spv(reading))
    index = data.draw(st.integers(0, len(line) - 1), label="index")
    original = line[index]
    line[index] = data.draw(st.integers(0, 255).filter(lambda b: b != original), label="byte")
    with pytest.raises(ProtocolError):
        parse_message(bytes(line))


@given(st.lists(_readings, min_size=3, max_size=3), st.sampled_from("sdi"), st.data())
def test_corruption_in_a_stream_never_yields_a_different_reading(readings, how, data):
    """One byte substituted, deleted or inserted in the middle line of three: whatever the
    splitter then makes of the stream, every line that parses is one that was sent."""
    middle = bytearray(_spv(readings[1]))
    # Up to the newline: a byte inserted after it belongs to the next line, not this one.
    index = data.draw(st.integers(0, len(middle) - 1), label="index")
    if how == "d":
        del middle[index]
    else:
        byte = data.draw(st.integers(0, 255), label="byte")
        if how == "s":
            if byte == middle[index]:
                return
            middle[index] = byte
        else:
            middle.insert(index, byte)
    stream = _spv(readings[0]) + bytes(middle) + _spv(readings[2])
    parsed = []
    for line in LineSplitter().feed(stream):
        try:
            parsed.append(parse_message(line))
        except ProtocolError:
            pass
    assert all(message in readings for message in parsed), parsed


# -- the device model, stepped without I/O ------------------------------------------------------


def test_model_coughs_in_a_hold_are_early_releases_visible_in_the_signal():
    patient = _steady_patient(breath_hold_per_min=6, breath_hold_s=15.0, cough_per_min=4)
    release_ml = 150.0
    model = BreathHoldModel(patient, noise_ml=0.0, release_ml=release_ml, seed=1)
    holds = closes = 0
    early: list[tuple[float, float, float]] = []  # (t, last held volume, volume after)
    previous = None
    was_holding = False
    for i in range(300 * 30):
        t = i / 30
        measurement, changes = model.step(t)
        holding = patient.state(t).breath_hold
        holds += holding and not was_holding
        was_holding = holding
        for event, cause in changes:
            assert cause == "patient"
            if event == "CLOSED":
                closes += 1
                assert holding, f"valve closed at {t:.2f} s outside a hold of the patient"
            elif holding:
                early.append((t, previous.volume_ml, measurement.volume_ml))
        assert measurement.valve_closed == model.valve_closed
        assert not measurement.valve_closed or holding
        previous = measurement
    assert holds >= 5 and closes == holds  # every hold of the patient closes the valve once
    assert early, "no early release in 5 minutes with 4 coughs a minute"
    for t, held, after in early:
        # The release is the patient's effort breaking away from the held volume: a step in
        # the signal (a cough dips the volume), not a silent valve change.
        assert abs(after - held) > release_ml - 20, (t, held, after)


def test_model_zero_removes_drift_without_a_flow_spike_and_is_refused_while_closed():
    patient = _steady_patient(lung_volume_l=0.0)  # breathing adds nothing: only the drift
    model = BreathHoldModel(patient, noise_ml=0.0, drift_ml_per_min=600.0)
    for i in range(60):
        measurement, _ = model.step(i / 30)
    assert measurement.volume_ml == round(59 / 30 * 10)
    assert measurement.flow_ml_s == 10
    assert model.zero(2.0) == [("ZEROED", "20")]
    measurement, _ = model.step(2.0 + 1 / 30)
    assert measurement.volume_ml == 0 and measurement.flow_ml_s == 10
    assert model.valve(2.1, True) == [("CLOSED", "host")]
    with pytest.raises(Exception, match="valve_closed"):
        model.zero(2.2)


# -- the simulated device on its own -------------------------------------------------------------


def test_sim_answers_commands_and_naks_bad_lines():
    sim = SpirometerSim(_steady_patient(), release_ml=1e6)
    sim.start()
    fd = os.open(sim.path, os.O_RDWR | os.O_NOCTTY)

    try:
        expected = [
            (frame("VALVE,0,C"), ("ACK", 0, "VALVE"), [("CLOSED", "host")]),
            (frame("VALVE,1,C"), ("ACK", 1, "VALVE"), []),  # already closed: no change
            (frame("ZERO,2"), ("NAK", 2, "valve_closed"), []),
            (frame("VALVE,3,O"), ("ACK", 3, "VALVE"), [("OPENED", "host")]),
            (frame("LEVEL,4,600"), ("ACK", 4, "LEVEL"), [("LEVEL", "600")]),
            (frame("LEVEL,5,8001"), ("NAK", 5, "range"), []),
            (frame("LEVEL,6,1.5"), ("NAK", 6, "syntax"), []),
            (frame("FIRE,7"), ("NAK", 7, "unknown_command"), []),
            (frame("ZERO,8,now"), ("NAK", 8, "syntax"), []),
            (_with_wrong_checksum(frame("ZERO,9")), ("NAK", None, "checksum"), []),
            (b"$" + b"A" * 100 + b"\n", ("NAK", None, "too_long"), []),
            (b"$ZERO,10\xff*00\n", ("NAK", None, "non_ascii"), []),
            (frame("ZERO,65535"), ("ACK", 65535, "ZERO"), None),
        ]
        for line, reply, statuses in expected:
            os.write(fd, line)
            while not isinstance(message := parse_message(_read_line(fd)), Reply):
                pass
            assert tuple(message) == reply, line
            got = []
            while isinstance(message := parse_message(_read_line(fd)), Status):
                got.append((message.event, message.arg))
            assert isinstance(message, Reading)  # the next reading shows the new state
            if statuses is None:
                assert [event for event, _ in got] == ["ZEROED"]
            else:
                assert got == statuses, line
        assert message.level_ml == 600 and not message.valve_closed
    finally:
        os.close(fd)
        sim.stop()
    stats = sim.stats()
    assert (stats["commands"], stats["rejected"], stats["status"]) == (5, 8, 4)


# -- driver and simulated device over a pty ------------------------------------------------------


def _stop_streaming_and_collect(sim: SpirometerSim, rec: Recorder) -> list:
    """Stop the readings; once every reading sent since the first received one has arrived,
    return the sent records for those readings."""
    assert rec.wait_for(lambda r: r.samples), "no reading arrived"
    sim.set_streaming(False)
    first = rec.samples[0].seq
    sent = list(sim.sent)
    index = next(i for i, s in enumerate(sent) if s.seq == first)
    expected = sent[index:]
    assert rec.wait_for(lambda r: len(r.samples) >= len(expected)), (
        f"{len(expected)} readings sent, {rec.sample_count()} received"
    )
    return expected


def test_readings_arrive_at_the_configured_rate_and_none_is_lost(rec):
    rate_hz = 50.0
    patient = _steady_patient()
    sim = SpirometerSim(patient, rate_hz=rate_hz)
    sim.start()
    driver = SpirometerDriver(sim.path, rec)  # events go to the sink too
    try:
        driver.start()
        driver.start()  # idempotent: still one reader
        assert sorted(_our_threads()) == ["spirometer-reader", "spirometer-spirometer-sim"]
        assert rec.wait_for(lambda r: len(r.samples) >= 50, timeout=3.0)
        expected = _stop_streaming_and_collect(sim, rec)
    finally:
        driver.stop()
        sim.stop()
    samples = rec.samples
    assert [s.seq for s in samples] == [s.seq for s in expected]
    for sample, sent in zip(samples, expected, strict=True):
        assert sample.device == "spirometer"
        assert sample.volume_l == sent.volume_ml / 1e3
        assert sample.flow_l_s == sent.flow_ml_s / 1e3
        assert sample.valve_closed == sent.valve_closed
        assert sample.feedback_level == sent.level_ml / 1e3
        assert 0.0 <= sample.t_rx - sent.t_sent < 0.1
        # The volume is the patient's, in litres, within the sensor noise.
        assert abs(sample.volume_l - patient.state(sent.patient_t).lung_volume_l) < 0.02
    stats = driver.stats()
    assert stats["samples"] == len(samples) and stats["lost_samples"] == 0
    assert stats["malformed"] == 0
    assert [(e.kind, e.detail) for e in rec.events] == [("connected", sim.path)]
    t_device = np.array([s.t_device for s in samples])
    t_rx = np.array([s.t_rx for s in samples])
    assert np.all(np.diff(t_device) > 0)
    n = len(samples) - 1
    assert n / (t_device[-1] - t_device[0]) == pytest.approx(rate_hz, rel=0.05)
    assert n / (t_rx[-1] - t_rx[0]) == pytest.approx(rate_hz, rel=0.2)
    assert sim.stats()["dropped"] == 0


def test_valve_level_and_zero_commands_round_trip(rig, rec):
    sim, driver = rig

    def reply(seq: int) -> CommandReply:
        result = driver.wait_reply(seq, WAIT_S)
        assert result is not None, f"no reply to command {seq}"
        return result

    seq = driver.command_valve(True)
    closed = reply(seq)
    assert (closed.seq, closed.command, closed.accepted) == (0, "VALVE,0,C", True)
    assert 0 < closed.t_reply - closed.t_sent < 0.1
    assert sim.valve_closed
    assert rec.wait_for(lambda r: r.kinds("valve_closed"))
    assert rec.kinds("valve_closed")[0].detail.startswith("CLOSED,host")
    n = rec.sample_count()
    assert rec.wait_for(lambda r: len(r.samples) >= n + 5)
    held = rec.samples[n:]
    assert all(s.valve_closed for s in held)
    assert max(s.volume_l for s in held) - min(s.volume_l for s in held) < 0.01

    refused = reply(driver.zero())  # the zero must not move under a hold
    assert not refused.accepted and refused.reason == "valve_closed"
    assert rec.wait_for(lambda r: r.kinds("nak"))
    assert rec.kinds("nak")[0].detail == "NAK,1,valve_closed for ZERO,1"

    assert reply(driver.command_valve(False)).accepted
    assert not sim.valve_closed
    assert rec.wait_for(lambda r: r.kinds("valve_opened"))
    assert rec.kinds("valve_opened")[0].detail.startswith("OPENED,host")

    assert reply(driver.set_level(0.8)).command == "LEVEL,3,800"
    assert rec.wait_for(lambda r: r.samples[-1].feedback_level == 0.8)
    assert rec.kinds("level_set")[0].detail.startswith("LEVEL,800")
    assert reply(driver.zero()).accepted
    assert rec.wait_for(lambda r: r.kinds("zeroed"))

    n = rec.sample_count()
    assert rec.wait_for(lambda r: len(r.samples) >= n + 2)
    assert not rec.samples[-1].valve_closed

    with pytest.raises(ValueError, match="outside 0..8 l"):
        driver.set_level(8.5)
    stats = driver.stats()
    assert (stats["sent"], stats["acks"], stats["naks"], stats["acks_lost"]) == (5, 4, 1, 0)
    assert stats["events"]["ack"] == 4 and stats["malformed"] == 0


def test_breath_holds_appear_as_valve_closed_intervals_with_a_slow_drift(rec):
    # A fast breather who holds often, so that two holds fit into three seconds; patient time
    # starts at 1 s, just before the first hold.
    patient = LujanPatient(
        LujanParams(
            period_s=0.75,
            breath_hold_per_min=120,
            breath_hold_s=0.8,
            surrogate_lead_s=0.0,
        ),
        seed=5,
    )
    leak_ml_s = -10.0
    sim = SpirometerSim(patient, noise_ml=1.0, leak_ml_s=leak_ml_s, t0=time.monotonic() - 1.0)
    sim.start()
    driver = SpirometerDriver(sim.path, rec)
    try:
        driver.start()
        assert rec.wait_for(lambda r: len(r.kinds("valve_opened")) >= 2, timeout=6.0)
        expected = _stop_streaming_and_collect(sim, rec)
    finally:
        driver.stop()
        sim.stop()
    samples = rec.samples
    assert [s.seq for s in samples] == [s.seq for s in expected]
    holding = [patient.state(s.patient_t).breath_hold for s in expected]
    assert [s.valve_closed for s in samples] == holding

    events = [(e.kind, e.detail.split(" ")[0]) for e in rec.events]
    assert events[0] == ("connected", sim.path)
    assert events[1:5] == [
        ("valve_closed", "CLOSED,patient"),
        ("valve_opened", "OPENED,patient"),
        ("valve_closed", "CLOSED,patient"),
        ("valve_opened", "OPENED,patient"),
    ]
    # The closed intervals: the held volume stays near the level of the hold's start and
    # drifts at the leak rate, while free breathing swings by the tidal volume.
    closed = np.array([s.valve_closed for s in samples])
    edges = np.flatnonzero(np.diff(closed.astype(int)))
    assert len(edges) >= 4
    t = np.array([s.t_device for s in samples])
    volume_ml = np.array([s.volume_l * 1e3 for s in samples])
    for start, end in zip(edges[0::2] + 1, edges[1::2] + 1, strict=False):
        assert 0.7 < t[end] - t[start] < 0.9  # the 0.8 s hold, at the device's clock
        slope = np.polyfit(t[start:end], volume_ml[start:end], 1)[0]
        assert slope == pytest.approx(leak_ml_s, abs=4.0)
        level_ml = patient.state(expected[start].patient_t).lung_volume_l * 1e3
        assert abs(volume_ml[start] - level_ml) < 6.0
        assert np.ptp(volume_ml[start:end]) < 20.0
    assert np.ptp(volume_ml[~closed]) > 400.0


def test_malformed_lines_are_reported_counted_and_dropped_and_reading_goes_on(rig, rec):
    sim, driver = rig
    assert rec.wait_for(lambda r: len(r.samples) >= 2)
    bad = [
        (_with_wrong_checksum(frame("SPV,1,2,3,4,O,0")), "checksum mismatch", "checksum"),
        (frame("SPV,1,2,3,4,O"), "SPV needs 7 fields, got 6", "fields"),
        (frame("SPV,1,2,lots,4,O,0"), "volume_ml 'lots' is not a decimal integer", "number"),
        (frame("SPV,1,2,9000,4,O,0"), "volume_ml 9000 outside -2000..8000", "range"),
        (frame("SPV,1,2,300,25000,O,0"), "flow_ml_s 25000 outside", "range"),
        (frame("PING,1"), "unexpected message type 'PING'", "unexpected"),
        (b"garbage\n", "missing '\\$'", "syntax"),
    ]
    for line, _, _ in bad:
        sim.inject(line)
    sim.inject(b"$" + b"9" * 120 + b"\n")
    assert rec.wait_for(lambda r: len(r.kinds("malformed")) == len(bad) + 1)
    details = [e.detail for e in rec.kinds("malformed")]
    for (line, message, _), detail in zip(bad, details, strict=False):
        assert re.search(message, detail), detail
        assert detail.endswith(f"({len(line)} bytes)")
    # 122 bytes if they arrive in one read, cut at 81 if the line straddles reads
    assert re.fullmatch(r"line too long: (122|81) bytes > 80 \((122|81) bytes\)", details[-1])

    n = rec.sample_count()
    assert rec.wait_for(lambda r: len(r.samples) >= n + 3), "the reader stopped reading"
    seqs = [s.seq for s in rec.samples]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing of ours was lost
    assert all(abs(s.volume_l) < 2.0 for s in rec.samples)  # no injected value got through
    stats = driver.stats()
    assert stats["malformed"] == len(bad) + 1
    assert stats["malformed_by_reason"] == {
        "checksum": 1,
        "fields": 1,
        "number": 1,
        "range": 2,
        "unexpected": 1,
        "syntax": 1,
        "too_long": 1,
    }
    assert stats["lost_samples"] == 0
    assert stats["events"] == {"connected": 1, "malformed": len(bad) + 1}


# -- driver against a raw pty: the test plays the device ------------------------------------------


@pytest.fixture
def raw_pty():
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_unanswered_command_is_ack_lost_and_a_late_ack_unmatched(raw_pty, rec):
    master, path = raw_pty
    clock = FakeClock()
    events: list[DeviceEvent] = []
    event_seen = threading.Condition()

    def on_event(event: DeviceEvent) -> None:
        with event_seen:
            events.append(event)
            event_seen.notify_all()

    with SpirometerDriver(path, rec, clock=clock, on_event=on_event) as driver:
        assert [(e.kind, e.detail) for e in events] == [("connected", path)]
        del events[0]
        seq = driver.command_valve(True)
        assert _read_line(master) == frame("VALVE,0,C")
        assert driver.wait_reply(seq, 0.0) is None
        clock.t += 0.26
        reply = driver.wait_reply(seq, WAIT_S)
        assert reply == CommandReply(0, "VALVE,0,C", 1000.0, clock.t, False, "timeout")
        os.write(master, frame("ACK,0,VALVE"))  # too late
        os.write(master, frame("NAK,-,checksum"))
        os.write(master, frame("SPV,7,10,5,0,O,0"))
        os.write(master, frame("SPV,9,20,6,0,O,0"))
        with event_seen:
            assert event_seen.wait_for(lambda: len(events) >= 4, timeout=WAIT_S)
        assert rec.wait_for(lambda r: len(r.samples) == 2)
        assert [(e.kind, e.detail) for e in events] == [
            ("ack_lost", "VALVE,0,C not acknowledged within 250 ms"),
            ("unmatched_ack", "ACK,0,VALVE matches no outstanding command"),
            ("nak", "NAK,-,checksum"),
            ("seq_gap", "expected SPV seq 8, got 9: 1 missing"),
        ]
        assert rec.events == []  # on_event takes the events; the sink gets only samples
        assert rec.samples[0] == SpirometerSample(
            "spirometer", 7, 0.01, clock.t, 0.005, 0.0, False, 0.0
        )
        stats = driver.stats()
        assert (stats["acks_lost"], stats["unmatched"], stats["naks"]) == (1, 1, 1)
        assert stats["lost_samples"] == 1


def _collect_events():
    """(events, condition, on_event, opened): the ``connected`` events of opening the port
    go to ``opened``, every other event to ``events``."""
    events: list[DeviceEvent] = []
    opened: list[DeviceEvent] = []
    seen = threading.Condition()

    def on_event(event: DeviceEvent) -> None:
        with seen:
            (opened if event.kind == "connected" else events).append(event)
            seen.notify_all()

    return events, seen, on_event, opened


def test_a_reordered_reading_is_late_not_a_gap_of_65534(raw_pty, rec):
    """Pairwise swapped readings (the simulator's ``reorder``): each late one is reported and
    counted as reordered, is not lost, and leaves the expected seq where it was."""
    master, path = raw_pty
    events, seen, on_event, opened = _collect_events()
    with SpirometerDriver(path, rec, on_event=on_event) as driver:
        assert [(e.kind, e.detail) for e in opened] == [("connected", path)]
        for seq, t_ms in ((4, 100), (6, 166), (5, 133), (7, 200), (9, 266), (8, 233), (10, 300)):
            os.write(master, frame(f"SPV,{seq},{t_ms},600,0,C,600"))
        assert rec.wait_for(lambda r: len(r.samples) == 7)
        with seen:
            assert seen.wait_for(lambda: len(events) >= 4, timeout=WAIT_S)
        assert [(e.kind, e.detail) for e in events] == [
            ("seq_gap", "expected SPV seq 5, got 6: 1 missing"),
            ("reordered", "SPV seq 5 arrived after seq 6 (it was counted missing)"),
            ("seq_gap", "expected SPV seq 8, got 9: 1 missing"),
            ("reordered", "SPV seq 8 arrived after seq 9 (it was counted missing)"),
        ]
        stats = driver.stats()
        assert (stats["samples"], stats["lost_samples"], stats["reordered"]) == (7, 0, 2)
        # Still delivered, with its own earlier device time: the session holds on that
        # (clock_backwards), and the driver reports no second event for it.
        assert [s.seq for s in rec.samples] == [4, 6, 5, 7, 9, 8, 10]
        assert [s.t_device for s in rec.samples] == [0.1, 0.166, 0.133, 0.2, 0.266, 0.233, 0.3]


def test_a_seq_far_behind_is_a_restart_not_a_reorder(raw_pty, rec):
    master, path = raw_pty
    events, seen, on_event, opened = _collect_events()
    with SpirometerDriver(path, rec, on_event=on_event) as driver:
        assert [(e.kind, e.detail) for e in opened] == [("connected", path)]
        for seq, t_ms in ((500, 20000), (0, 10), (1, 43), (2, 76)):
            os.write(master, frame(f"SPV,{seq},{t_ms},600,0,O,600"))
        assert rec.wait_for(lambda r: len(r.samples) == 4)
        with seen:
            assert seen.wait_for(lambda: len(events) >= 2, timeout=WAIT_S)
        assert [e.kind for e in events] == ["seq_reset", "clock_backwards"]
        assert events[0].detail == "expected SPV seq 501, got 0: 501 back (device restart?)"
        stats = driver.stats()
        assert (stats["lost_samples"], stats["reordered"]) == (0, 0)


def test_the_device_clock_is_unwrapped(raw_pty, rec):
    """t_ms wraps 4294967295 -> 0 every 49.7 days: t_device goes on increasing through it,
    also for a reading that arrives late across the wrap."""
    master, path = raw_pty
    events, seen, on_event, opened = _collect_events()
    top = 2**32
    with SpirometerDriver(path, rec, on_event=on_event) as driver:
        assert [(e.kind, e.detail) for e in opened] == [("connected", path)]
        for seq, t_ms in ((0, top - 40), (1, top - 7), (3, 59), (2, 26), (4, 92)):
            os.write(master, frame(f"SPV,{seq},{t_ms},600,0,O,600"))
        assert rec.wait_for(lambda r: len(r.samples) == 5)
        with seen:
            assert seen.wait_for(lambda: len(events) >= 3, timeout=WAIT_S)
        t = [round(s.t_device * 1e3) for s in rec.samples]
        assert t == [top - 40, top - 7, top + 59, top + 26, top + 92]
        assert [e.kind for e in events] == ["seq_gap", "clock_wrapped", "reordered"]
        assert events[1].detail == f"device clock wrapped: t_ms {top - 7} -> 59"
        stats = driver.stats()
        assert (stats["clock_wraps"], stats["lost_samples"], stats["reordered"]) == (1, 0, 1)


def test_an_in_order_reading_with_an_earlier_clock_is_reported(raw_pty, rec):
    master, path = raw_pty
    events, seen, on_event, opened = _collect_events()
    with SpirometerDriver(path, rec, on_event=on_event):
        assert [(e.kind, e.detail) for e in opened] == [("connected", path)]
        for seq, t_ms in ((0, 5000), (1, 3033), (2, 3066)):
            os.write(master, frame(f"SPV,{seq},{t_ms},600,0,O,600"))
        assert rec.wait_for(lambda r: len(r.samples) == 3)
        with seen:
            assert seen.wait_for(lambda: len(events) >= 1, timeout=WAIT_S)
        assert [(e.kind, e.detail) for e in events] == [
            ("clock_backwards", "device clock went back 1967 ms: t_ms 5000 -> 3033")
        ]
        assert [s.t_device for s in rec.samples] == [5.0, 3.033, 3.066]


def test_a_device_that_goes_away_is_a_port_error_and_is_reopened_when_it_is_back(tmp_path, rec):
    # The driver opens a stable name for the port, as udev's /dev/serial/by-id/... links are;
    # the device behind it goes away (a USB adapter pulled) and comes back on another pty.
    link = tmp_path / "spirometer"
    sim = SpirometerSim(_steady_patient())
    link.symlink_to(sim.start())
    driver = SpirometerDriver(str(link), rec, name="abc", reconnect_max_s=0.2)
    driver.start()
    again = None
    try:
        assert rec.wait_for(lambda r: r.samples)
        sim.stop()  # the pty goes away under the driver
        assert rec.wait_for(lambda r: r.kinds("port_error"))
        with pytest.raises(serial.SerialException):
            driver.command_valve(False)  # nothing to write to while it is away
        before = rec.sample_count()
        again = SpirometerSim(_steady_patient())
        new_link = tmp_path / "spirometer.new"
        new_link.symlink_to(again.start())
        new_link.replace(link)
        assert rec.wait_for(lambda r: len(r.kinds("connected")) == 2), "not reopened"
        assert rec.wait_for(lambda r: r.sample_count() > before + 10), "no readings after it"
        seq = driver.command_valve(True)  # and commands go out again
        reply = driver.wait_reply(seq, WAIT_S)
        assert reply is not None and reply.accepted, reply
    finally:
        driver.stop()  # neither hangs nor raises
        sim.stop()
        if again is not None:
            again.stop()
    kinds = [e.kind for e in rec.events]
    # one port_error for the failure, whatever failed after it; connected at each opening
    assert kinds.count("port_error") == 1 and kinds.count("connected") == 2, kinds
    assert (
        kinds.index("connected")
        < kinds.index("port_error")
        < len(kinds) - kinds[::-1].index("connected")
    )
    assert all(e.detail == str(link) for e in rec.kinds("connected"))
    assert driver.stats()["reconnects"] == 1
    assert _our_threads() == []
    with pytest.raises(serial.PortNotOpenError):
        driver.zero()


def test_a_raising_sink_is_a_reader_error(raw_pty):
    master, path = raw_pty
    events: list[DeviceEvent] = []
    done = threading.Event()

    def sink(item) -> None:
        raise RuntimeError("bug in the consumer")

    def on_event(event: DeviceEvent) -> None:
        events.append(event)
        if event.kind != "connected":
            done.set()

    with SpirometerDriver(path, sink, on_event=on_event):
        os.write(master, frame("SPV,0,0,0,0,O,0"))
        assert done.wait(WAIT_S)
        assert [e.kind for e in events] == ["connected", "reader_error"]
        assert "bug in the consumer" in events[1].detail


def test_stop_leaves_no_thread_and_no_open_fd(rec):
    fds_before = _open_fds()
    sim = SpirometerSim(_steady_patient())
    path = sim.start()
    driver = SpirometerDriver(path, rec)
    driver.start()
    assert rec.wait_for(lambda r: r.samples)
    driver.stop()
    driver.stop()
    sim.stop()
    sim.stop()
    assert _our_threads() == []
    assert _open_fds() == fds_before


def test_commands_need_an_open_port():
    driver = SpirometerDriver("loop://", lambda item: None)
    with pytest.raises(serial.PortNotOpenError):
        driver.command_valve(True)
    with pytest.raises(ValueError, match="finite"):
        driver.set_level(float("nan"))
    driver.stop()  # nothing to stop: no error
