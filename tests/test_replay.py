"""Log replay: a session recorded on the simulated rig replays decision for decision; an
altered log is refused (and, forced, diverges where it was altered); what-if questions;
bad input is refused with the reason."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time

import pytest

from motionctl.config import ConfigError, load_config
from motionctl.controller import Controller, OperatorCommand
from motionctl.integrity import verify
from motionctl.replay import ReplayRefused, format_result, replay, stale_timeouts
from motionctl.session import SessionCore
from motionctl.sessionlog import LogFormatError, SessionLogWriter
from motionctl.simulators.patient import patient_from_config
from motionctl.simulators.rig import Rig
from motionctl.types import SurrogateSample

WINDOW_CHANGE = (-1.5, 4.0)


def _record_session(path) -> None:
    """~6.5 s of breathing through the real rig: prediction on (the default), the default
    amplitude window (holds outside it), an operator hold and release, a refused
    acknowledgement and a window change mid-session."""
    cfg = load_config(
        None,
        [
            "devices.surface.port=0",
            "devices.xray.enabled=false",
            "gating.hold_while_prediction_learns=false",
        ],
    )
    rig = Rig(cfg)
    rig.start()
    writer = SessionLogWriter(path, cfg, t0=time.monotonic())
    controller = Controller(cfg, session_log=writer, **rig.endpoints())
    controller.start()
    experiment = threading.Event().wait  # the session's length, not a synchronisation
    try:
        controller.set_operator_enable(True, who="test")
        experiment(2.0)
        controller.submit(OperatorCommand("hold", who="test"))
        experiment(0.4)
        controller.submit(OperatorCommand("acknowledge", "stale_data:surface", who="test"))
        controller.submit(OperatorCommand("release", who="test"))
        experiment(1.0)
        controller.submit(OperatorCommand("window", WINDOW_CHANGE, who="test"))
        experiment(3.0)
    finally:
        controller.stop()
        rig.stop()
        writer.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "session.sqlite"
    _record_session(path)
    return path


@pytest.fixture
def copy_of(recorded, tmp_path):
    def make(name: str = "copy.sqlite"):
        target = tmp_path / name
        shutil.copy(recorded, target)
        return target

    return make


def _rows(path, sql: str, params=()):
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.mark.rig
def test_a_recorded_session_replays_decision_for_decision(recorded):
    digest = hashlib.sha256(recorded.read_bytes()).hexdigest()
    result = replay(recorded)
    # the session exercised what it should: gating holds, operator actions, beam on
    kinds = {k for (k,) in _rows(recorded, "SELECT kind FROM events WHERE source='operator'")}
    assert {"enable", "hold", "acknowledge", "release", "window"} <= kinds
    reasons = {r for (r,) in _rows(recorded, "SELECT reasons FROM decisions")}
    assert any("outside_window" in r for r in reasons) and "" in reasons

    decisions = _rows(
        recorded,
        "SELECT COUNT(*) FROM decisions WHERE NOT (latency_s IS NULL AND "
        "reasons IN ('session_stopped', 'controller_error'))",
    )[0][0]
    estimates = _rows(recorded, "SELECT COUNT(*) FROM estimates")[0][0]
    assert result.verified and not result.forced and not result.what_if
    assert result.decisions_compared == decisions > 150
    assert result.estimates_compared == estimates > 150
    assert result.events_compared >= 8  # interlocks and operator actions, refusals included
    assert result.divergences == 0, result.first_divergence
    assert result.first_divergence is None
    assert result.reproduced and result.exit_status == 0
    # the figures, from the replayed decisions
    assert 0.0 < result.duty_cycle < 1.0
    assert result.holds_by_reason["operator_hold"]["count"] == 1
    assert result.holds_by_reason["outside_window"]["count"] >= 1
    # at most half the window (2.5 mm) plus the target's travel in the 0.4 s the beam takes
    # to follow (<= 3.8 mm in the simulated 12 mm, 4 s breath; the predictor has not learnt
    # yet in so short a session), plus noise
    assert 0.0 <= result.residual_mean_mm <= result.residual_p95_mm < 7.0
    assert result.residual_source == "estimate"
    # first enable -> end: the enable came once the controller had started, a moment
    # (longer on a loaded machine) after the log's time zero
    (t_enable,) = _rows(
        recorded, "SELECT MIN(t) FROM events WHERE source='operator' AND kind='enable'"
    )[0]
    assert result.treatment_time_s == pytest.approx(result.duration_s - t_enable, abs=0.05)
    assert result.recorded["duty_cycle"] == pytest.approx(result.duty_cycle)
    assert result.speed_x > 1.0 and result.wall_s > 0.0
    assert json.loads(result.to_json())["decisions_compared"] == decisions
    assert "REPRODUCED" in format_result(result)
    # the core's own records went to the replay's collector, never into the log
    assert hashlib.sha256(recorded.read_bytes()).hexdigest() == digest


@pytest.mark.rig
def test_an_altered_log_fails_verification_is_refused_and_diverges_where_altered(copy_of):
    path = copy_of()
    (rowid, n, t) = _rows(
        path, "SELECT rowid, n, t FROM samples ORDER BY rowid LIMIT 1 OFFSET 120"
    )[0]
    db = sqlite3.connect(path)
    db.execute("UPDATE samples SET ap_mm = ap_mm + 3.0 WHERE rowid = ?", (rowid,))
    db.commit()
    db.close()
    (batch,) = _rows(path, "SELECT batch FROM chain WHERE n_first <= ? AND ? <= n_last", (n, n))[0]

    checked = verify(path)
    assert not checked.ok and checked.first_bad_batch == batch
    assert f"batch {batch} " in checked.reason

    with pytest.raises(ReplayRefused, match=rf"integrity check failed: batch {batch} "):
        replay(path)

    forced = replay(path, force=True)
    assert forced.forced and not forced.verified
    assert forced.divergences >= 1 and forced.exit_status == 1
    first = forced.first_divergence
    # the estimate made from the altered sample is the first thing that differs
    (est_n,) = _rows(path, "SELECT n FROM estimates WHERE t = ?", (t,))[0]
    assert first["kind"] == "estimate" and first["t"] == t and first["n"] == est_n
    assert f"samples n={n} " in first["after_input"]
    assert all(d["t"] >= t for d in forced.divergence_examples)
    assert "UNVERIFIED" in " ".join(forced.notes)


@pytest.mark.rig
def test_what_if_a_narrower_window_lowers_the_duty_cycle(recorded):
    result = replay(recorded, ["gating.window_mm=2.5"])
    assert result.what_if and result.overrides == ["gating.window_mm=2.5"]
    assert result.decisions_compared == 0 and result.divergences == 0
    assert result.exit_status == 0
    rec = result.recorded
    assert rec is not None and rec["duty_cycle"] > 0.0
    assert result.duty_cycle < rec["duty_cycle"]
    assert result.residual_mean_mm < rec["residual_mean_mm"]  # tighter window, less motion
    assert (
        result.holds_by_reason["outside_window"]["seconds"]
        > rec["holds_by_reason"]["outside_window"]["seconds"]
    )
    assert result.treatment_time_same_beam_on_s > rec["treatment_time_s"]
    # the override sets the window: the operator's recorded window change is not applied
    assert any("window change(s) not applied" in note for note in result.notes)
    assert "what-if" in format_result(result)


@pytest.mark.rig
def test_what_if_with_an_unchanged_setting_gives_the_recorded_figures(recorded):
    result = replay(recorded, ["gating.dwell_s=5.0"])  # the value it ran with
    rec = result.recorded
    assert result.what_if
    assert result.duty_cycle == pytest.approx(rec["duty_cycle"], abs=0.005)
    assert result.residual_mean_mm == pytest.approx(rec["residual_mean_mm"])


@pytest.mark.rig
def test_an_unknown_override_key_is_refused_naming_it(recorded):
    with pytest.raises(ConfigError, match=r"gating\.windw_mm"):
        replay(recorded, ["gating.windw_mm=3"])
    with pytest.raises(ConfigError, match=r"gating\.window_mm = -1"):
        replay(recorded, ["gating.window_mm=-1"])


def test_a_log_without_decisions_replays_as_a_what_if(tmp_path):
    # an imported recording: surrogate samples only (and no imaging, as the importers say)
    path = tmp_path / "imported.sqlite"
    cfg = load_config(
        None, ["devices.xray.enabled=false", "gating.hold_while_prediction_learns=false"]
    )
    patient = patient_from_config(cfg["patient"])
    writer = SessionLogWriter(path, cfg, t0=0.0)
    writer.device("surface", "imported", "trace.vxp")
    for k in range(300):
        t = k / 30.0
        if k == 30:  # rows are replayed in the order they were added (n), not by time
            writer.add("events", (1.0, "operator", "enable", json.dumps({"who": "import"})))
        writer.add("samples", ("surface", k, t, t, *patient.state(t).surrogate_mm))
    writer.close()
    result = replay(path)
    assert result.what_if and result.verified and result.recorded is None
    assert any("no decisions" in note for note in result.notes)
    assert result.holds_by_reason["operator_not_enabled"]["seconds"] == pytest.approx(1.0, abs=0.05)
    assert result.duty_cycle is not None and 0.0 < result.duty_cycle < 1.0
    assert result.residual_samples > 0
    narrower = replay(path, ["gating.window_mm=2.0"])
    assert narrower.duty_cycle < result.duty_cycle


def test_a_log_recorded_before_newer_settings_replays_as_recorded(tmp_path):
    # Its config lacks tracking.predictor_inputs and gating.hold_while_prediction_learns:
    # it predicted from the breathing axis alone and gated while the predictor learnt.
    cfg = load_config(None, ["devices.xray.enabled=false"])
    del cfg["tracking"]["predictor_inputs"], cfg["gating"]["hold_while_prediction_learns"]
    path = tmp_path / "old.sqlite"
    writer = SessionLogWriter(path, cfg, t0=0.0)
    writer.device("surface", "igtl_tracker", "synthetic")
    core = SessionCore(cfg, writer.add, stale_timeout_s=stale_timeouts(cfg))
    assert core.estimator.predictor.aux_channels == 0
    on = []

    def decide(t: float, latency: float | None) -> None:  # as the controller records it
        decision = core.decide(t, latency is not None)
        if decision is not None:
            on.append(decision.beam_enabled and t < 14.0)
            writer.add("decisions", (t, int(decision.beam_enabled), decision.reason_text, latency))

    core.on_command(0.0, OperatorCommand("enable", who="test"))
    decide(0.0, None)
    patient = patient_from_config(cfg["patient"])
    for k in range(600):  # 20 s
        t = k / 30.0
        core.on_surrogate(SurrogateSample("surface", k, t, t, patient.state(t).surrogate_mm))
        decide(t + 1e-4, 1e-4)
    writer.close()
    assert any(on)  # beam on while a new default would still hold for prediction_learning
    result = replay(path)
    assert not result.what_if and result.decisions_compared > 0
    assert result.divergences == 0, result.first_divergence


def test_a_truncated_log_is_refused_with_the_byte(tmp_path):
    path = tmp_path / "s.sqlite"
    writer = SessionLogWriter(path, load_config(), t0=0.0)
    for k in range(3000):
        writer.add("samples", ("surface", k, k / 30, k / 30, 0.0, 0.0, 1.0))
    writer.close()
    size = path.stat().st_size
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(LogFormatError, match=rf"truncated: .*reading stops at byte {size // 2}"):
        replay(cut)


def test_a_text_file_is_refused(tmp_path):
    text = tmp_path / "session.txt"
    text.write_text("this is not a session log\n")
    with pytest.raises(LogFormatError, match=r"not an SQLite file.*byte 0"):
        replay(text)
    with pytest.raises(LogFormatError, match="no such file"):
        replay(tmp_path / "absent.sqlite")


def test_the_residual_is_taken_where_the_beam_follows_the_decision():
    # The gate enables the beam at 1.0 s on the position predicted 0.4 s ahead; the beam
    # responds 0.4 s later. While the decision says on (1.0-2.0 s) the target is still far
    # off (5 mm); by the time the beam is on (1.4-2.4 s) it is at the centre (0 mm).
    from motionctl.replay import _beam_on_residuals

    timeline = [(0.0, 0, "outside_window"), (1.0, 1, ""), (2.0, 0, "outside_window")]
    positions = [(k / 10 + 0.05, 5.0 if k < 14 else 0.0, 0.0) for k in range(30)]
    at_delay = _beam_on_residuals(timeline, positions, 0.4)
    assert len(at_delay) == 10 and set(at_delay) == {0.0}  # 1.45 ... 2.35 s
    at_decision = _beam_on_residuals(timeline, positions, 0.0)
    assert len(at_decision) == 10 and max(at_decision) == 5.0  # the old, misleading figure


@pytest.mark.rig
def test_a_log_of_another_version_says_so(copy_of):
    path = copy_of()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value='0.0.1' WHERE key='motionctl_version'")
    db.close()
    result = replay(path, force=True)  # the edit breaks the hash chain, as it should
    assert not result.verified
    assert any("recorded by motionctl 0.0.1" in note for note in result.notes), result.notes
    assert not any("recorded by motionctl" in note for note in replay(copy_of("b")).notes)
