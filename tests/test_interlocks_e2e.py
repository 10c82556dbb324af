"""End-to-end interlock tests on the simulated rig for the interlocks the fault matrices
(``test_fault_matrix*.py``, driven by ``motionctl sim --fault``) cannot reach: an operator
hold, a session log that can no longer be written, a predictor that diverges, a garbled
line from the gating box between intact replies, and a spirometer volume outside its
physical range.

Each runs a live session (``RigSession``: every simulated device on its real transport, a
real controller and session log), turns the beam on, makes the fault happen, and asserts on
the simulated linac's own record of beam edges: held within 50 ms, no beam-on edge while the
fault lasted; and on the session log: the interlock raised, with its reason.
"""

from __future__ import annotations

import json
import math
import resource
import sqlite3
import threading
import time

import pytest

from motionctl.session import OperatorCommand
from motionctl.sessionlog import verify

pytestmark = pytest.mark.rig

HOLD_WITHIN_S = 0.050
BEAM_ON_TIMEOUT_S = 10.0
# Amplitude gating with a window wide enough that only the fault can hold the beam, and no
# X-ray model (as in test_fault_matrix.py).
WIDE_OPEN = (
    "devices.xray.enabled=false",
    "gating.center_mm=-6",
    "gating.window_mm=20",
    "gating.hold_while_prediction_learns=false",
)


def _beam_on(s, timeout: float = BEAM_ON_TIMEOUT_S, enable: bool = True) -> None:
    """Enable as the operator and wait until the linac has had the beam on for 0.2 s (on a
    loaded machine a nuisance hold, e.g. a late ACK, may come and go first)."""
    if enable:
        s.controller.set_operator_enable(True, who="test_operator")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        edges = s.rig.linac.edges()
        if edges and edges[-1][1] and time.monotonic() - edges[-1][0] >= 0.2:
            return
        time.sleep(0.02)
    raise AssertionError(f"the beam never stayed on: {s.controller.status.decision}")


def _held(s, t_fault: float, t_end: float) -> float:
    """The hold latency (s) from the linac's edges; asserts that the beam was on when the
    fault began and that no beam-on edge came while it lasted."""
    before = [on for t, on in s.rig.linac.edges() if t <= t_fault]
    assert before and before[-1], "the beam was already off: the test proves nothing"
    t_off = s.rig.linac.wait_for_edge(False, after=t_fault, timeout=1.0)
    assert t_off is not None, "the beam was never held"
    on_edges = [t for t, on in s.rig.linac.edges() if on and t_fault <= t <= t_end]
    assert on_edges == [], f"beam-on edges while the fault lasted: {on_edges}"
    return t_off - t_fault


def _raised(path, key: str, t_from: float, t_to: float) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [
            d
            for (d,) in db.execute(
                "SELECT detail FROM events WHERE source='interlock' AND kind='raised' "
                "AND t BETWEEN ? AND ? ORDER BY t",
                (t_from, t_to),
            )
            if d == key or d.startswith(key + " ")
        ]
    finally:
        db.close()


def test_operator_hold_holds_within_50_ms_until_released(session, request):
    s = session(*WIDE_OPEN)
    _beam_on(s)
    t_hold = time.monotonic()
    s.controller.submit(OperatorCommand("hold", who="test_operator"))
    time.sleep(0.5)
    t_release = time.monotonic()
    latency = _held(s, t_hold, t_release)
    request.node.user_properties.append(("hold_latency_ms", round(latency * 1e3, 1)))
    assert latency <= HOLD_WITHIN_S, latency
    assert "operator_hold" in s.controller.status.interlocks
    s.controller.submit(OperatorCommand("release", who="test_operator"))
    assert s.rig.linac.wait_for_edge(True, after=t_release, timeout=2.0) is not None
    s.close()
    t0 = s.writer.t0
    raised = _raised(s.path, "operator_hold", t_hold - t0, t_release - t0)
    assert raised == ["operator_hold test_operator"], raised


class _BlowingUpPredictor:
    """Test double around the live predictor: while ``armed`` its prediction is not finite,
    as a predictor whose state overflowed. Only a test can put it there (it is not in
    ``PREDICTORS``, so no config can name it): on the rig no in-range surrogate makes the
    real predictors diverge (a search over oscillations, square waves and plateaus within
    the jump limit reached at most a fifth of the divergence threshold), the monitor
    guards against numerical failure, not bad breaths."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.armed = threading.Event()
        self.resets = 0
        self.name = inner.name
        self.horizon_s = inner.horizon_s
        self.aux_channels = inner.aux_channels

    def step(self, value: float, aux=None) -> float:
        predicted = self._inner.step(value, aux)
        return math.inf if self.armed.is_set() else predicted

    def reset(self) -> None:
        self.resets += 1
        self._inner.reset()

    def restart(self) -> None:
        self._inner.restart()

    @property
    def diverged(self) -> bool:
        return self._inner.diverged

    @property
    def ready(self) -> bool:
        return self._inner.ready


def test_predictor_divergence_holds_within_50_ms_and_resets_the_predictor(session, request):
    s = session(*WIDE_OPEN)
    estimator = s.controller.core.estimator
    predictor = _BlowingUpPredictor(estimator.predictor)
    estimator.predictor = predictor  # one attribute, read once per sample by the loop
    _beam_on(s)
    t_fault = time.monotonic()
    predictor.armed.set()
    time.sleep(0.5)
    predictor.armed.clear()
    t_end = time.monotonic()
    latency = _held(s, t_fault, t_end)
    request.node.user_properties.append(("hold_latency_ms", round(latency * 1e3, 1)))
    assert latency <= HOLD_WITHIN_S, latency
    assert predictor.resets > 0  # reset on every diverged sample
    # auto-clears after 1 s without divergence
    assert s.rig.linac.wait_for_edge(True, after=t_end, timeout=3.0) is not None
    s.close()
    t0 = s.writer.t0
    # A sample received just before the fault but handled after it (the queue lags under
    # load) raises the interlock at its receipt time, a little before t_fault.
    raised = _raised(s.path, "predictor_diverged", t_fault - t0 - 0.2, t_end - t0)
    assert raised == ["predictor_diverged predictor_diverged"], raised


def test_session_log_write_failure_holds_and_keeps_what_was_recorded(session, request):
    """The disk fills up mid-session (a file size limit of one byte on this process: every
    write to the log fails as on a full disk; sockets and ptys are not files, the rig goes
    on). The beam holds on log_write_failure, stays held (it needs an acknowledgement, which
    is refused: the log stays failed), and every row committed before is still there, under
    an intact hash chain."""
    s = session(*WIDE_OPEN)
    failures: list[float] = []
    on_failure = s.writer.on_failure  # the controller's: queues the write_failure event

    def recorded(reason: str) -> None:
        failures.append(time.monotonic())
        on_failure(reason)

    s.writer.on_failure = recorded
    _beam_on(s)
    time.sleep(0.2)
    committed_before = s.writer.rows_written
    assert committed_before > 0
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    t_fault = time.monotonic()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
    try:
        deadline = t_fault + 1.0
        while s.writer.failed is None and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert s.writer.failed is not None, "the log did not fail"
    assert failures, "the failure was not reported"
    t_failed = failures[0]
    # the writer finds out at its next commit (every commit_interval_s, 50 ms)
    request.node.user_properties.append(("detected_after_ms", round((t_failed - t_fault) * 1e3)))
    time.sleep(0.3)
    s.controller.submit(OperatorCommand("acknowledge", "log_write_failure", who="test_operator"))
    time.sleep(0.3)
    t_end = time.monotonic()
    latency = _held(s, t_failed, t_end)
    request.node.user_properties.append(("hold_latency_ms", round(latency * 1e3, 1)))
    assert latency <= HOLD_WITHIN_S, (latency, t_failed - t_fault)
    status = s.controller.status
    assert "log_write_failure" in status.interlocks
    assert "log_write_failure" in status.decision.reasons
    assert "its condition is still present" in status.last_refusal
    assert not s.rig.linac.beam_on
    rows_written = s.writer.rows_written
    s.close()
    # Nothing committed before the failure is lost, and nothing after it pretends to be.
    result = verify(s.path)
    assert result.ok, result
    assert not result.closed  # a failed log is not marked as closed normally
    assert rows_written >= committed_before
    assert result.rows == rows_written
    db = sqlite3.connect(s.path)
    try:
        t0 = s.writer.t0
        (last_t,) = db.execute(
            "SELECT MAX(t) FROM (SELECT MAX(t) AS t FROM samples UNION ALL "
            "SELECT MAX(t) FROM decisions)"
        ).fetchone()
        assert last_t <= t_failed - t0
        (on,) = db.execute("SELECT COUNT(*) FROM decisions WHERE beam_enabled=1").fetchone()
        assert on > 0  # the beam-on part of the session is in the log
    finally:
        db.close()


def test_a_garbled_line_from_the_gating_box_holds_within_50_ms(session, request):
    """Noise on the box's transmit line between two intact replies (no ACK is lost): the
    driver latches malformed:<reason> (beam_interface) and the session raises
    malformed_data:beam; the box itself saw nothing wrong, so only the host can hold."""
    s = session(*WIDE_OPEN)
    _beam_on(s)
    t_fault = time.monotonic()
    assert s.rig.linac.inject(b"$ACK,0,ON*00\n")  # a wrong checksum
    latency = _held(s, t_fault, t_fault + 0.1)
    request.node.user_properties.append(("hold_latency_ms", round(latency * 1e3, 1)))
    assert latency <= HOLD_WITHIN_S, latency
    assert s.rig.linac.wait_for_edge(True, after=t_fault, timeout=2.0) is not None
    s.close()
    assert s.controller.beam.stats()["malformed"] == 1
    assert s.controller.status.malformed.get("beam") == 1  # the device health figure
    t0 = s.writer.t0
    window = (t_fault - t0, t_fault - t0 + 0.2)
    assert _raised(s.path, "beam_interface", *window) == ["beam_interface malformed:checksum"]
    (malformed,) = _raised(s.path, "malformed_data:beam", *window)
    assert "checksum mismatch" in malformed


def test_a_spirometer_volume_outside_its_range_holds_within_50_ms(session, request):
    """Breath-hold gating on volume; the spirometer reads 9 l above its zero (beyond the
    protocol's -2..8 l): the driver rejects each such reading as malformed ``range``, which
    holds the beam, is counted per device and logged with the reason."""
    s = session(
        "devices.xray.enabled=false",
        "gating.hold_while_prediction_learns=false",
        "gating.mode=breath_hold",
        "gating.breath_hold_signal=volume",
        "patient.breath_hold_per_min=60",
        "patient.breath_hold_s=60",
        "patient.period_s=3",
    )
    status = s.controller.status
    s.controller.set_operator_enable(True, who="test_operator")
    # the test is the operator: capture the reference once the patient holds
    assert s.controller.wait_until(lambda st: st.valve_closed, timeout=BEAM_ON_TIMEOUT_S)
    s.controller.submit(OperatorCommand("capture_reference", who="test_operator"))
    _beam_on(s, timeout=5.0, enable=False)
    s.rig.spirometer.jump_ml = 9000
    t_fault = time.monotonic()
    s.rig.spirometer.start_fault("jump")
    time.sleep(0.5)
    s.rig.spirometer.stop_fault("jump")
    t_end = time.monotonic()
    latency = _held(s, t_fault, t_end)
    request.node.user_properties.append(("hold_latency_ms", round(latency * 1e3, 1)))
    assert latency <= HOLD_WITHIN_S, latency
    s.close()  # the controller has handled every event the driver reported
    by_reason = s.controller.spirometer.stats()["malformed_by_reason"]
    assert by_reason.get("range", 0) >= 10, by_reason  # 0.5 s at 30 Hz
    assert status.malformed.get("spirometer", 0) == sum(by_reason.values())  # device health
    t_s = s.writer.t0
    (raised, *_) = _raised(s.path, "malformed_data:spirometer", t_fault - t_s, t_end - t_s)
    assert "outside -2000..8000" in raised, raised
    db = sqlite3.connect(s.path)
    try:
        refs = [
            json.loads(d)["reference"]
            for (d,) in db.execute(
                "SELECT detail FROM events WHERE source='operator' AND kind='capture_reference'"
            )
        ]
    finally:
        db.close()
    assert len(refs) == 1 and 0.2 < refs[0] < 1.5, refs


def test_a_gating_box_that_goes_away_holds_until_it_is_back_and_has_confirmed_a_hold(tmp_path):
    """The gating box's USB-serial adapter is pulled and plugged in again: its pty goes away
    and a new one appears behind the same stable name (a udev /dev/serial/by-id link). The
    beam is held at once (beam_interface port_error, disconnected:beam); the driver reopens
    the port by itself, and the beam comes back only after the box has acknowledged an OFF,
    and the 0.2 s reconnection period has passed. The failed writes meanwhile (a heartbeat
    every 10 ms) are logged once, not a hundred times a second."""
    from types import SimpleNamespace

    from motionctl.config import load_config
    from motionctl.controller import Controller
    from motionctl.sessionlog import SessionLogWriter
    from motionctl.simulators.linac import LinacGatingSim
    from motionctl.simulators.rig import Rig

    cfg = load_config(None, ["devices.surface.port=0", "devices.xray.port=0", *WIDE_OPEN])
    rig = Rig(cfg)
    rig.start()
    link = tmp_path / "gating-box"
    link.symlink_to(rig.linac.path)
    path = tmp_path / "session.sqlite"
    writer = SessionLogWriter(path, cfg, t0=time.monotonic())
    controller = Controller(cfg, session_log=writer, **{**rig.endpoints(), "beam_url": str(link)})
    controller.start()
    box = LinacGatingSim(watchdog_s=cfg["devices"]["beam"]["watchdog_s"])
    try:
        _beam_on(SimpleNamespace(controller=controller, rig=rig))
        t_pull = time.monotonic()
        rig.linac.stop()  # pulled: the old box is gone for good
        time.sleep(0.5)  # unplugged for a while (the outage, not a synchronisation)
        new_link = tmp_path / "gating-box.new"
        new_link.symlink_to(box.start())
        t_back = time.monotonic()
        new_link.replace(link)
        t_on = box.wait_for_edge(True, after=t_back, timeout=BEAM_ON_TIMEOUT_S)
        assert t_on is not None, f"the beam never came back: {controller.status.decision}"
    finally:
        controller.stop()
        rig.stop()
        box.stop()
        writer.close()
    t0 = writer.t0
    # A write already under way when the adapter was pulled fails with the time it began
    # (a heartbeat every 10 ms): the outage is seen from one heartbeat period before the pull.
    heartbeat_s = cfg["devices"]["beam"]["heartbeat_period_s"]
    pull, back, on = t_pull - t0 - heartbeat_s, t_back - t0, t_on - t0
    db = sqlite3.connect(path)
    try:
        events = db.execute(
            "SELECT t, kind, detail FROM events WHERE source='beam' ORDER BY t"
        ).fetchall()
        beam_on_times = [
            t
            for (t,) in db.execute(
                "SELECT t FROM decisions WHERE beam_enabled=1 AND t > ? AND t < ?", (pull, on)
            )
        ]
        acks = db.execute(
            "SELECT command FROM beam_acks WHERE t_sent > ? AND command != 'HB' ORDER BY t_sent",
            (back,),
        ).fetchall()
    finally:
        db.close()
    kinds = [k for _, k, _ in events]
    assert kinds.count("port_error") == 1 and kinds.count("connected") == 1, events
    (t_error,) = [t for t, k, _ in events if k == "port_error"]
    (t_connected,) = [t for t, k, _ in events if k == "connected"]
    (t_cleared,) = [t for t, k, _ in events if k == "fault_cleared" and t > t_connected]
    assert pull <= t_error < back < t_connected < t_cleared, events
    assert kinds.count("write_error") <= 3, events  # one per kind of failure, not per write
    assert _raised(path, "beam_interface", pull, back) == ["beam_interface port_error"]
    assert _raised(path, "disconnected:beam", pull, back)
    # No beam-on decision from the fault until the beam came back after the confirmed hold,
    # which the new box acknowledged as the first command it was sent.
    first_on = min((t for t in beam_on_times if t > t_error), default=None)
    assert first_on is not None and first_on >= max(t_cleared, t_connected + 0.2), (
        first_on,
        t_connected,
        t_cleared,
    )
    assert acks and acks[0] == ("OFF",), acks
    # the outage and the recovery are in the log as the core saw them: replay agrees
    from motionctl.replay import replay

    result = replay(path)
    assert result.reproduced, result.first_divergence
