"""Runtime fault injection: the fault spec language, the schedule, and what every fault kind
of every simulator puts on its real transport, as the project's drivers see it."""

from __future__ import annotations

import math
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from motionctl.drivers.beam import BeamInterface
from motionctl.drivers.igtl_tracker import IgtlTrackerDriver
from motionctl.drivers.spirometer import SpirometerDriver
from motionctl.simulators.faults import (
    FAULT_KINDS,
    FaultSchedule,
    FaultSpec,
    FaultTarget,
    WireQueue,
    fault_label,
    noise_line,
    parse_fault,
)
from motionctl.simulators.linac import LinacGatingSim
from motionctl.simulators.patient import LujanParams, LujanPatient
from motionctl.simulators.spirometer import SpirometerSim
from motionctl.simulators.surface_tracker import SurfaceTrackerSim
from motionctl.types import DeviceEvent

WAIT_S = 2.0  # upper bound for anything that should take milliseconds
TOL_S = 0.05  # timing tolerance of a fault's start and end
SURFACE_HZ = 100.0
SPIROMETER_HZ = 50.0


class Collector:
    """Everything a driver's reader thread delivers, in order; the test waits on it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list = []

    def __call__(self, item) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Collector], bool], timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def samples(self) -> list:
        with self._cond:
            return [i for i in self.items if not isinstance(i, DeviceEvent)]

    def events(self, kind: str) -> list[DeviceEvent]:
        with self._cond:
            return [i for i in self.items if isinstance(i, DeviceEvent) and i.kind == kind]


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class LinearPatient:
    """The surface marker rises 1 mm/s in AP; enough to tell frames apart."""

    def state(self, t):
        from types import SimpleNamespace

        return SimpleNamespace(surrogate_mm=(1.0, 2.0, 3.0 + t), target_mm=(0.0, 0.0, 0.0))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _steady_patient() -> LujanPatient:
    return LujanPatient(LujanParams(period_s=4.0, surrogate_lead_s=0.0), seed=0)


# -- the spec language -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("surface:freeze@5+2", FaultSpec("surface", "freeze", 5.0, 2.0)),
        ("beam:disconnect@10", FaultSpec("beam", "disconnect", 10.0, None)),
        ("spirometer:nan@3.5+0.5", FaultSpec("spirometer", "nan", 3.5, 0.5)),
        ("  xray:clock-skew@.5  ", FaultSpec("xray", "clock-skew", 0.5, None)),
        ("surface:garbage@7.+1", FaultSpec("surface", "garbage", 7.0, 1.0)),
        ("kv_2-b:delay@0", FaultSpec("kv_2-b", "delay", 0.0)),
    ],
)
def test_parse_fault_accepts(text, spec):
    assert parse_fault(text) == spec


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("surface", "no ':'"),
        ("surface:freeze", "no '@'"),
        (":freeze@1", "DEVICE ''"),
        ("3d:freeze@1", "DEVICE '3d'"),
        ("surface:melt@1", "unknown KIND 'melt'"),
        ("surface:Freeze@1", "unknown KIND 'Freeze'"),
        ("surface:freeze@", "START ''"),
        ("surface:freeze@-1", "START '-1'"),
        ("surface:freeze@1e3", "START '1e3'"),
        ("surface:freeze@inf", "START 'inf'"),
        ("surface:freeze@ 1", "START ' 1'"),
        ("surface:freeze@1+0", "DURATION '0' is not > 0"),
        ("surface:freeze@1+0.000", "DURATION '0.000' is not > 0"),
        ("surface:freeze@1+", "DURATION ''"),
        ("surface:freeze@1+2+3", "DURATION '2+3'"),
        ("surface:freeze@1s", "START '1s'"),
    ],
)
def test_parse_fault_rejects_and_says_what_and_the_form(text, what):
    with pytest.raises(ValueError) as error:
        parse_fault(text)
    message = str(error.value)
    assert what in message
    assert repr(text) in message
    assert "DEVICE:KIND@START[+DURATION]" in message
    assert all(kind in message for kind in FAULT_KINDS)


_devices = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,15}", fullmatch=True)
_seconds = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
_durations = st.none() | st.floats(
    min_value=0.0, max_value=1e7, exclude_min=True, allow_nan=False, allow_infinity=False
)


@given(st.builds(FaultSpec, _devices, st.sampled_from(FAULT_KINDS), _seconds, _durations))
def test_parse_fault_inverts_str(spec):
    assert parse_fault(str(spec)) == spec


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (("", "freeze", 1.0), "device"),
        (("surface", "melt", 1.0), "unknown fault kind 'melt'"),
        (("surface", "freeze", -1.0), "start"),
        (("surface", "freeze", math.nan), "start"),
        (("surface", "freeze", 1.0, 0.0), "duration"),
        (("surface", "freeze", 1.0, math.inf), "duration"),
    ],
)
def test_fault_spec_checks_its_fields(args, what):
    with pytest.raises(ValueError, match=what):
        FaultSpec(*args)


# -- helpers for the simulators ----------------------------------------------------------------


def test_wire_queue_delays_in_order_and_swaps_pairs():
    wire: WireQueue[int] = WireQueue()
    for n in range(3):
        wire.push(n, now=float(n), delay_s=0.3)
    assert wire.pop_due(0.29) == []
    assert wire.next_due() == pytest.approx(0.3)
    assert wire.pop_due(1.3) == [0, 1]
    wire.push(3, now=1.4)  # the delay ended: a new frame never overtakes one queued before
    assert wire.pop_due(1.4) == []
    wire.release_all(1.5)  # ... and the backlog clears at once
    assert wire.pop_due(1.5) == [2, 3]

    for n in range(4, 9):
        wire.push(n, now=2.0, reorder=True)
    assert wire.pop_due(2.0) == [5, 4, 7, 6]
    assert len(wire) == 1  # 8 waits for a partner
    wire.release_held()
    assert wire.pop_due(2.0) == [8]
    assert wire.pushed == 9

    wire.push(9, now=3.0, delay_s=1.0)
    wire.push(10, now=3.0, reorder=True)
    assert wire.clear() == 1 and len(wire) == 0  # the held frame is not counted as pushed


def test_noise_line_is_one_line_and_fault_label_is_canonical():
    line = noise_line(random.Random(1), 40)
    assert len(line) == 40 and line.endswith(b"\n") and line.count(b"\n") == 1
    assert fault_label({"nan", "delay"}) == "delay+nan"
    assert fault_label([]) is None
    with pytest.raises(ValueError):
        noise_line(random.Random(1), 0)


# -- the schedule ------------------------------------------------------------------------------


class FakeTarget:
    """Records start_fault/stop_fault calls with the clock's time."""

    def __init__(self, clock, supported=("freeze", "nan"), fail_on: str | None = None):
        self.supported_faults = tuple(supported)
        self.clock = clock
        self.calls: list[tuple[str, str, float]] = []
        self.fail_on = fail_on

    def start_fault(self, kind: str) -> None:
        if kind == self.fail_on:
            raise OSError("device refused")
        self.calls.append(("start", kind, self.clock()))

    def stop_fault(self, kind: str) -> None:
        self.calls.append(("stop", kind, self.clock()))


def test_schedule_applies_and_ends_faults_at_session_times_on_a_fake_clock():
    clock = FakeClock(100.0)
    target = FakeTarget(clock)
    assert isinstance(target, FaultTarget)
    specs = [parse_fault(t) for t in ("dev:freeze@1+2", "dev:nan@2", "dev:freeze@3+1")]
    schedule = FaultSchedule(specs, {"dev": target}, clock=clock, t0=100.0)
    for t in (100.0, 100.5, 101.0, 102.0, 103.0, 104.0):
        clock.t = t
        schedule.run_due()
    assert target.calls == [
        ("start", "freeze", 101.0),
        ("start", "nan", 102.0),
        ("stop", "freeze", 103.0),  # an end goes before a start at the same instant
        ("start", "freeze", 103.0),
        ("stop", "freeze", 104.0),
    ]
    assert schedule.wait_done(0)
    clock.t = 110.0
    schedule.stop()  # ends the fault without a duration
    assert [(a.device, a.kind, a.start_s, a.end_s) for a in schedule.applied] == [
        ("dev", "freeze", 1.0, 3.0),
        ("dev", "nan", 2.0, 10.0),
        ("dev", "freeze", 3.0, 4.0),
    ]
    assert schedule.applied[1].spec == specs[1]
    schedule.stop()  # idempotent
    assert len(target.calls) == 6


def test_schedule_validates_devices_kinds_and_overlaps_before_the_session():
    target = FakeTarget(time.monotonic)
    targets = {"dev": target, "other": target}
    with pytest.raises(ValueError, match=r"unknown device 'nope'; devices: dev, other"):
        FaultSchedule([parse_fault("nope:freeze@1")], targets)
    with pytest.raises(
        ValueError, match=r"device 'dev' does not support fault 'jump'; it supports: freeze, nan"
    ):
        FaultSchedule([parse_fault("dev:jump@1")], targets)
    with pytest.raises(ValueError, match="overlap"):
        FaultSchedule([parse_fault("dev:nan@1+2"), parse_fault("dev:nan@2.5")], targets)
    with pytest.raises(ValueError, match="overlap"):
        FaultSchedule([parse_fault("dev:nan@5"), parse_fault("dev:nan@6+1")], targets)
    FaultSchedule([parse_fault("dev:nan@1+2"), parse_fault("dev:nan@3")], targets)  # touching
    FaultSchedule([parse_fault("dev:nan@1+2"), parse_fault("other:nan@1.5")], targets)
    with pytest.raises(RuntimeError, match="t0"):
        FaultSchedule([], targets).run_due()
    assert target.calls == []


def test_schedule_reports_a_target_that_refuses_and_leaves_no_thread():
    target = FakeTarget(time.monotonic, fail_on="nan")
    schedule = FaultSchedule(
        [parse_fault("dev:nan@0"), parse_fault("dev:freeze@0+0.05")], {"dev": target}
    )
    schedule.start()
    assert schedule.wait_done(WAIT_S)
    with pytest.raises(RuntimeError, match=r"dev:nan@0\.0: start_fault failed: OSError"):
        schedule.stop()
    assert [(a.kind, a.end_s is not None) for a in schedule.applied] == [("freeze", True)]
    assert not [t for t in threading.enumerate() if t.name == "fault-schedule"]


def test_schedule_stop_is_prompt_with_faults_far_ahead():
    target = FakeTarget(time.monotonic)
    schedule = FaultSchedule([parse_fault("dev:freeze@3600")], {"dev": target})
    schedule.start()
    t_stop = time.monotonic()
    schedule.stop()
    assert time.monotonic() - t_stop < 0.5
    assert target.calls == [] and schedule.applied == []


# -- how a test runs a fault on a streaming simulator ------------------------------------------


def _shaped_by(record, kind: str) -> bool:
    return record.fault is not None and kind in record.fault.split("+")


def _records(sim, kind: str) -> list:
    return [r for r in list(sim.sent) if _shaped_by(r, kind)]


def _wait_received(sim, col: Collector, predicate) -> None:
    """Wait until the simulator has recorded a frame for which ``predicate(record)`` holds
    and the driver has delivered it (the record can lag the delivery by a few
    microseconds: the simulator appends it after the write)."""

    def done(c: Collector) -> bool:
        received = {s.seq for s in c.samples()}
        return any(r.seq in received and predicate(r) for r in list(sim.sent))

    assert col.wait_for(done)


def _settled(sim, col: Collector) -> tuple[list, dict]:
    """The samples delivered so far whose frames the simulator has recorded, and the
    records by seq."""
    samples = col.samples()
    by_seq = {r.seq: r for r in list(sim.sent) if r.seq is not None}
    return [s for s in samples if s.seq in by_seq], by_seq


def _run(sim, col: Collector, kind: str, count: int = 5) -> tuple[list, dict]:
    """Hold ``kind`` on until ``count`` frames it shaped were sent, end it, and wait until a
    frame made after it has reached the driver; returns ``_settled``."""
    sim.start_fault(kind)
    try:
        assert col.wait_for(lambda c: len(_records(sim, kind)) >= count)
    finally:
        sim.stop_fault(kind)
    last = max(r.seq for r in _records(sim, kind) if r.seq is not None)
    _wait_received(sim, col, lambda r: r.seq > last and not _shaped_by(r, kind))
    return _settled(sim, col)


def _gap_around(sim, t0: float, applied) -> tuple[float, float]:
    """Session times of the last frame sent before ``applied`` started and the first after it
    ended; asserts that none went in between."""
    sends = [r.t_sent - t0 for r in list(sim.sent)]
    assert not [t for t in sends if applied.start_s + 0.005 < t < applied.end_s]
    return (
        max(t for t in sends if t <= applied.start_s + 0.005),
        min(t for t in sends if t >= applied.end_s),
    )


# -- surface tracker (OpenIGTLink over TCP) ----------------------------------------------------


@pytest.fixture
def surface():
    sim = SurfaceTrackerSim(LinearPatient(), rate_hz=SURFACE_HZ)
    col = Collector()
    driver = IgtlTrackerDriver(*sim.start(), col, reconnect_max_s=0.1)
    driver.start()
    try:
        assert col.wait_for(lambda c: len(c.samples()) >= 3)
        yield sim, driver, col
    finally:
        driver.stop()
        sim.stop()


def test_surface_schedule_freezes_the_stream_at_the_right_session_times(surface):
    sim, driver, col = surface
    t0 = time.monotonic()
    schedule = FaultSchedule([parse_fault("surface:freeze@0.2+0.3")], {"surface": sim}, t0=t0)
    schedule.start()
    try:
        assert schedule.wait_done(WAIT_S)
    finally:
        schedule.stop()
    (applied,) = schedule.applied
    assert applied.start_s == pytest.approx(0.2, abs=TOL_S)
    assert applied.end_s == pytest.approx(0.5, abs=TOL_S)
    _wait_received(sim, col, lambda r: r.t_sent - t0 >= applied.end_s)
    # The simulator's own record: it stopped and resumed sending when the schedule says.
    last_before, first_after = _gap_around(sim, t0, applied)
    assert last_before == pytest.approx(0.2, abs=TOL_S)
    assert first_after == pytest.approx(0.5, abs=TOL_S)
    assert not col.events("disconnected") and not col.events("malformed")
    assert all(f.fault is None for f in sim.sent)


def test_surface_nan_frames_are_malformed_non_finite(surface):
    sim, driver, col = surface
    samples, by_seq = _run(sim, col, "nan")
    nan_frames = _records(sim, "nan")
    malformed = col.events("malformed")
    assert len(malformed) == len(nan_frames) >= 5
    assert all("non-finite" in e.detail for e in malformed)
    assert all(math.isnan(v) for f in nan_frames for v in f.surrogate_mm)
    assert not {s.seq for s in samples} & {f.seq for f in nan_frames}


def test_surface_garbage_breaks_framing_and_the_driver_reconnects(surface):
    sim, driver, col = surface
    sim.start_fault("garbage")
    try:
        assert col.wait_for(lambda c: c.events("malformed") and c.events("disconnected"))
    finally:
        t_stop = time.monotonic()
        sim.stop_fault("garbage")
    _wait_received(sim, col, lambda r: r.t_sent > t_stop and r.fault is None)
    assert "header" in col.events("malformed")[0].detail
    assert "framing lost" in col.events("disconnected")[0].detail
    assert len(col.events("connected")) >= 2
    garbage = _records(sim, "garbage")
    assert garbage and all(f.seq is None and math.isnan(f.surrogate_mm[0]) for f in garbage)


def test_surface_disconnect_refuses_connections_then_the_driver_reconnects(surface):
    sim, driver, col = surface
    sim.start_fault("disconnect")
    t_start = time.monotonic()
    try:
        assert sim.client_count() == 0
        assert col.wait_for(lambda c: c.events("disconnected"))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sim.address, timeout=WAIT_S).close()
        assert len(col.events("connected")) == 1
    finally:
        t_stop = time.monotonic()
        sim.stop_fault("disconnect")
    _wait_received(sim, col, lambda r: r.t_sent > t_stop)
    assert col.events("connected")[1].t >= t_stop
    assert not [f for f in list(sim.sent) if t_start < f.t_sent < t_stop]


def test_surface_delay_sends_every_frame_late_and_in_order(surface):
    sim, driver, col = surface
    samples, by_seq = _run(sim, col, "delay", count=10)
    lags = [f.t_sent - (sim.t0 + f.patient_t) for f in _records(sim, "delay")]
    assert max(lags) < sim.fault_delay_s + TOL_S
    # All but the backlog flushed when the fault ended went the full delay late.
    assert sum(lag > sim.fault_delay_s - 0.01 for lag in lags) >= 5
    seqs = [s.seq for s in samples]
    assert seqs == list(range(seqs[0], seqs[-1] + 1))  # in order, none lost


def test_surface_reorder_swaps_consecutive_frames(surface):
    sim, driver, col = surface
    samples, by_seq = _run(sim, col, "reorder", count=6)
    seqs = [s.seq for s in samples]
    assert seqs == [f.seq for f in list(sim.sent)][: len(seqs)]  # wire order
    assert sorted(seqs) == list(range(seqs[0], seqs[-1] + 1))  # none lost
    swapped = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if a > b]
    assert len(swapped) >= 3 and all(a == b + 1 for a, b in swapped)
    assert all(by_seq[a].fault == by_seq[b].fault == "reorder" for a, b in swapped)


def test_surface_jump_offsets_the_point_by_80_mm_ap(surface):
    sim, driver, col = surface
    samples, by_seq = _run(sim, col, "jump")
    jumped = [s for s in samples if by_seq[s.seq].fault == "jump"]
    assert len(jumped) >= 5  # accepted by the driver: it is the core's to judge
    for sample in jumped:
        frame = by_seq[sample.seq]
        truth = LinearPatient().state(frame.patient_t).surrogate_mm
        offset = [sent - true for sent, true in zip(frame.surrogate_mm, truth, strict=True)]
        assert offset == pytest.approx([0.0, 0.0, 80.0], abs=1e-3)
        assert sample.position_mm == pytest.approx(frame.surrogate_mm)


def test_surface_clock_skew_steps_the_header_timestamp_back(surface):
    sim, driver, col = surface
    samples, by_seq = _run(sim, col, "clock-skew")
    assert all(s.t_device == pytest.approx(by_seq[s.seq].t_device, abs=1e-6) for s in samples)
    steps = [
        # The header step less the time between the two frames: the clock's own step.
        (b.t_device - a.t_device) - (by_seq[b.seq].patient_t - by_seq[a.seq].patient_t)
        for a, b in zip(samples, samples[1:], strict=False)
        if by_seq[a.seq].fault != by_seq[b.seq].fault
    ]
    assert steps == [
        pytest.approx(-sim.clock_skew_s, abs=0.01),
        pytest.approx(sim.clock_skew_s, abs=0.01),
    ]


def test_surface_faults_are_idempotent_and_combine(surface):
    sim, driver, col = surface
    sim.start_fault("delay")
    sim.start_fault("jump")
    sim.start_fault("jump")
    assert sim.active_faults() == ("delay", "jump")
    try:
        assert col.wait_for(lambda c: len(_records(sim, "jump")) >= 2)
    finally:
        sim.stop_fault("jump")
        sim.stop_fault("jump")
        sim.stop_fault("delay")
    assert sim.active_faults() == ()
    assert {f.fault for f in _records(sim, "jump")} == {"delay+jump"}


# -- spirometer (serial line protocol on a pty) ------------------------------------------------


@pytest.fixture
def spirometer():
    sim = SpirometerSim(_steady_patient(), rate_hz=SPIROMETER_HZ, release_ml=1e6, noise_ml=1.0)
    col = Collector()
    driver = SpirometerDriver(sim.start(), col)
    driver.start()
    try:
        assert col.wait_for(lambda c: len(c.samples()) >= 3)
        yield sim, driver, col
    finally:
        driver.stop()
        sim.stop()


def test_spirometer_schedule_freezes_readings_but_commands_are_answered(spirometer):
    sim, driver, col = spirometer
    with pytest.raises(ValueError, match="unknown device 'spirometer'; devices: spir"):
        FaultSchedule([parse_fault("spirometer:freeze@0.1+0.3")], {"spir": sim})
    t0 = time.monotonic()
    schedule = FaultSchedule([parse_fault("spirometer:freeze@0.1+0.3")], {"spirometer": sim}, t0=t0)
    schedule.start()
    try:
        assert schedule.wait_for(lambda applied: bool(applied), WAIT_S)
        reply = driver.wait_reply(driver.command_valve(False), WAIT_S)
        assert reply is not None and reply.accepted
        assert schedule.wait_done(WAIT_S)
    finally:
        schedule.stop()
    (applied,) = schedule.applied
    assert applied.start_s == pytest.approx(0.1, abs=TOL_S)
    assert applied.end_s == pytest.approx(0.4, abs=TOL_S)
    assert reply.t_reply - t0 < applied.end_s
    _wait_received(sim, col, lambda r: r.t_sent - t0 >= applied.end_s)
    last_before, first_after = _gap_around(sim, t0, applied)
    assert last_before == pytest.approx(0.1, abs=TOL_S)
    assert first_after == pytest.approx(0.4, abs=TOL_S)
    assert not col.events("seq_gap")  # the device made no readings: none is missing


def test_spirometer_disconnect_is_silence_both_ways_and_a_seq_gap_after(spirometer):
    sim, driver, col = spirometer
    sim.start_fault("disconnect")
    t_start = time.monotonic()
    try:
        reply = driver.wait_reply(driver.command_valve(False), WAIT_S)
        assert reply is not None and reply.reason == "timeout"
        assert col.events("ack_lost")
    finally:
        t_stop = time.monotonic()
        sim.stop_fault("disconnect")
    assert col.wait_for(lambda c: c.events("seq_gap"))
    lost = sim.stats()["lost_on_line"]
    assert lost >= 5
    assert f": {lost} missing" in col.events("seq_gap")[0].detail
    assert driver.stats()["lost_samples"] == lost
    assert not [r for r in list(sim.sent) if t_start < r.t_sent < t_stop]
    assert sim.stats()["commands"] == 0  # the command never reached the device
    reply = driver.wait_reply(driver.command_valve(False), WAIT_S)
    assert reply is not None and reply.accepted  # the cable is back


def test_spirometer_garbage_lines_are_malformed_and_the_readings_missing(spirometer):
    sim, driver, col = spirometer
    samples, by_seq = _run(sim, col, "garbage")
    garbage = _records(sim, "garbage")
    assert len(col.events("malformed")) == len(garbage) == sim.stats()["garbage"] >= 5
    assert driver.stats()["lost_samples"] == len(garbage)  # the line ate them
    assert not {s.seq for s in samples} & {r.seq for r in garbage}


def test_spirometer_nan_fields_are_malformed_numbers(spirometer):
    sim, driver, col = spirometer
    _run(sim, col, "nan")
    nan_readings = _records(sim, "nan")
    assert all(r.volume_ml is None and r.flow_ml_s is None for r in nan_readings)
    assert driver.stats()["malformed_by_reason"] == {"number": len(nan_readings)}
    assert all("volume_ml 'nan'" in e.detail for e in col.events("malformed"))


def test_spirometer_delay_holds_readings_back_in_order(spirometer):
    sim, driver, col = spirometer
    samples, by_seq = _run(sim, col, "delay", count=8)
    lags = [r.t_sent - (sim.t0 + r.patient_t) for r in _records(sim, "delay")]
    assert max(lags) < sim.fault_delay_s + TOL_S
    assert sum(lag > sim.fault_delay_s - 0.01 for lag in lags) >= 5
    seqs = [s.seq for s in samples]
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert not col.events("seq_gap")


def test_spirometer_reorder_swaps_consecutive_readings(spirometer):
    sim, driver, col = spirometer
    samples, by_seq = _run(sim, col, "reorder", count=6)
    seqs = [s.seq for s in samples]
    wire = [r.seq for r in list(sim.sent)]
    start = wire.index(seqs[0])
    assert wire[start : start + len(seqs)] == seqs  # wire order, none lost
    swapped = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if a > b]
    assert len(swapped) >= 3 and all(a == b + 1 for a, b in swapped)


def test_spirometer_jump_adds_3_litres(spirometer):
    sim, driver, col = spirometer
    samples, by_seq = _run(sim, col, "jump")
    first = min(r.seq for r in _records(sim, "jump"))
    step_ml = by_seq[first].volume_ml - by_seq[first - 1].volume_ml
    assert step_ml == pytest.approx(sim.jump_ml, abs=150)
    jumped = [s for s in samples if by_seq[s.seq].fault == "jump"]
    assert len(jumped) >= 5  # inside the wire's range: it is the core's to judge
    assert all(s.volume_l == pytest.approx(by_seq[s.seq].volume_ml / 1e3) for s in jumped)


def _wrapped_step_s(t_a: float, t_b: float) -> float:
    # t_ms wraps at 2**32 ms; 2 s back within 2 s of the device's boot wraps it.
    step_ms = round((t_b - t_a) * 1e3) % 2**32
    return (step_ms - 2**32 if step_ms >= 2**31 else step_ms) / 1e3


def test_spirometer_clock_skew_steps_t_ms_back(spirometer):
    sim, driver, col = spirometer
    samples, by_seq = _run(sim, col, "clock-skew")
    steps = [
        _wrapped_step_s(a.t_device, b.t_device)
        - (by_seq[b.seq].patient_t - by_seq[a.seq].patient_t)
        for a, b in zip(samples, samples[1:], strict=False)
        if by_seq[a.seq].fault != by_seq[b.seq].fault
    ]
    assert steps == [
        pytest.approx(-sim.clock_skew_s, abs=0.002),
        pytest.approx(sim.clock_skew_s, abs=0.002),
    ]


# -- linac gating box (serial line protocol on a pty) ------------------------------------------


@pytest.fixture
def beam():
    # A relaxed watchdog, so that a slow machine cannot trip it between two steps.
    sim = LinacGatingSim(watchdog_s=1.0)
    col = Collector()
    iface = BeamInterface(sim.start(), on_ack=col, on_event=col)
    iface.open()
    try:
        yield sim, iface, col
    finally:
        iface.close()
        sim.stop()


def _acked(col: Collector, seq: int) -> bool:
    return col.wait_for(lambda c: any(getattr(i, "seq", None) == seq for i in c.samples()))


def _beam_on(sim, iface, col) -> None:
    assert _acked(col, iface.command(True))
    assert sim.beam_on and iface.fault() is None


def _resync(sim, iface, col) -> None:
    """After a fault: an acknowledged hold clears the driver's doubt."""
    assert _acked(col, iface.command(False))
    assert iface.fault() is None and not sim.beam_on


def test_beam_delay_is_ack_lost_then_a_late_unmatched_ack(beam):
    sim, iface, col = beam
    sim.start_fault("delay")
    try:
        t_hb = time.monotonic()
        iface.heartbeat()
        assert col.wait_for(lambda c: c.events("ack_lost"))
        assert iface.fault() == "ack_lost"
        assert col.wait_for(lambda c: c.events("unmatched_ack"))
    finally:
        sim.stop_fault("delay")
    (late,) = _records(sim, "delay")
    assert late.data.startswith(b"$ACK,0,OFF*")
    assert late.t_sent - t_hb == pytest.approx(sim.fault_delay_s, abs=TOL_S)
    _resync(sim, iface, col)


def test_beam_freeze_loses_the_acks_but_the_box_keeps_its_state(beam):
    sim, iface, col = beam
    _beam_on(sim, iface, col)
    sim.start_fault("freeze")
    try:
        heartbeats = sim.stats()["heartbeats"]
        iface.heartbeat()
        assert col.wait_for(lambda c: c.events("ack_lost"))
        assert sim.stats()["heartbeats"] == heartbeats + 1  # the box heard it
        assert sim.beam_on and len(sim.edges()) == 1
    finally:
        sim.stop_fault("freeze")
    _resync(sim, iface, col)


def test_beam_disconnect_holds_the_beam_and_hears_nothing(beam):
    sim, iface, col = beam
    _beam_on(sim, iface, col)
    t_fault = time.monotonic()
    sim.start_fault("disconnect")
    try:
        t_off = sim.wait_for_edge(False, after=t_fault, timeout=0)
        assert t_off is not None and t_off - t_fault < TOL_S  # at once, not at the watchdog
        heartbeats = sim.stats()["heartbeats"]
        iface.heartbeat()
        assert col.wait_for(lambda c: c.events("ack_lost"))
        assert sim.stats()["heartbeats"] == heartbeats and sim.stats()["malformed"] == 0
    finally:
        sim.stop_fault("disconnect")
    _resync(sim, iface, col)
    _beam_on(sim, iface, col)  # a new ON after the link is back


def test_beam_garbage_replies_are_malformed_and_the_acks_lost(beam):
    sim, iface, col = beam
    sim.start_fault("garbage")
    try:
        iface.heartbeat()
        assert col.wait_for(lambda c: c.events("malformed") and c.events("ack_lost"))
        # the noise in place of the ACK is read first: that latched the doubt
        assert iface.fault().startswith("malformed:")
    finally:
        sim.stop_fault("garbage")
    (noise,) = _records(sim, "garbage")
    assert len(noise.data) == len(b"$ACK,0,OFF*00\n") and noise.data.count(b"\n") == 1
    _resync(sim, iface, col)


def test_unsupported_kinds_are_refused_listing_the_supported_ones():
    box = LinacGatingSim()
    for kind in ("reorder", "nan", "jump", "clock-skew"):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"device 'beam' does not support fault '{kind}'; it supports: "
                "disconnect, freeze, garbage, delay"
            ),
        ):
            box.start_fault(kind)
        with pytest.raises(ValueError, match="it supports"):
            box.stop_fault(kind)
    with pytest.raises(ValueError, match="fault beam:nan@1.0: device 'beam' does not support"):
        FaultSchedule([parse_fault("beam:nan@1")], {"beam": box})
    surface = SurfaceTrackerSim(LinearPatient())
    spirometer = SpirometerSim(_steady_patient())
    for sim in (surface, spirometer):
        assert sim.supported_faults == FAULT_KINDS
        with pytest.raises(ValueError, match="it supports: disconnect, freeze"):
            sim.start_fault("melt")
        assert isinstance(sim, FaultTarget)


# -- everything together -----------------------------------------------------------------------


def test_stopping_everything_leaves_no_thread_and_no_fd():
    fds_before = _open_fds()
    threads_before = set(threading.enumerate())
    surface = SurfaceTrackerSim(LinearPatient(), rate_hz=SURFACE_HZ)
    spirometer = SpirometerSim(_steady_patient(), rate_hz=SPIROMETER_HZ)
    box = LinacGatingSim(watchdog_s=1.0)
    col = Collector()
    tracker = IgtlTrackerDriver(*surface.start(), col, reconnect_max_s=0.1)
    spiro = SpirometerDriver(spirometer.start(), col)
    iface = BeamInterface(box.start(), on_ack=col, on_event=col)
    schedule = FaultSchedule(
        [
            parse_fault(text)
            for text in (
                "surface:delay@0+0.3",
                "surface:reorder@0",
                "surface:disconnect@0.2",
                "spirometer:delay@0",
                "spirometer:disconnect@0.1",
                "beam:delay@0",
                "beam:garbage@0.1",
            )
        ],
        {"surface": surface, "spirometer": spirometer, "beam": box},
    )
    try:
        tracker.start()
        spiro.start()
        iface.open()
        schedule.start()
        assert schedule.wait_for(lambda applied: len(applied) == 7, WAIT_S)
        iface.heartbeat()
    finally:
        schedule.stop()  # ends the faults still on
        iface.close()
        spiro.stop()
        tracker.stop()
        box.stop()
        spirometer.stop()
        surface.stop()
    assert all(a.end_s is not None for a in schedule.applied)
    assert (surface.active_faults(), spirometer.active_faults(), box.active_faults()) == (
        (),
        (),
        (),
    )
    assert [t.name for t in threading.enumerate() if t not in threads_before] == []
    assert _open_fds() == fds_before
