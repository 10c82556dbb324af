"""The prediction horizon following the measured latency: the monitor's rule (pure), and on
the rig a session whose horizon follows what the controller measured, replayed exactly."""

from __future__ import annotations

import json
import sqlite3

import pytest

from motionctl.latency import LatencyMonitor
from motionctl.replay import replay


def _monitor(**kw) -> LatencyMonitor:
    return LatencyMonitor(unmeasured_s=0.3, rate_hz=30.0, update_s=5.0, **kw)


def _feed(monitor: LatencyMonitor, decision_s: float, rtt_s: float, n: int = 50) -> None:
    for _ in range(n):
        monitor.add_decision(decision_s)
        monitor.add_round_trip(rtt_s)


def test_horizon_is_unmeasured_plus_median_decision_latency_and_round_trip():
    m = _monitor()
    _feed(m, 0.002, 0.040)
    m.add_round_trip(5.0)  # one outlier does not move a median
    assert m.propose(0.0, 0.4) is None  # the first evaluation is one update period away
    horizon, measured = m.propose(5.0, 0.4)
    assert horizon == pytest.approx(0.342)
    assert measured == {"unmeasured_ms": 300.0, "decision_ms": 2.0, "round_trip_ms": 40.0}


def test_no_proposal_before_it_is_due_with_too_few_measurements_or_within_a_sample():
    m = _monitor(min_measurements=20)
    _feed(m, 0.001, 0.001, n=19)
    m.propose(0.0, 0.4)
    assert m.propose(5.0, 0.4) is None  # 19 < 20 measurements
    _feed(m, 0.001, 0.001, n=1)
    assert m.propose(7.0, 0.4) is None  # not due until 10 s
    assert m.propose(10.0, 0.3) is None  # 0.302 s is the same 9 samples at 30 Hz as 0.3 s
    proposal = m.propose(15.0, 0.4)  # 12 samples -> 9 samples: a change
    assert proposal is not None and proposal[0] == pytest.approx(0.302)


def test_negative_measurements_are_ignored():
    m = _monitor(min_measurements=1)
    m.add_decision(-1.0)
    m.add_round_trip(-1.0)
    assert m.measured() is None


@pytest.mark.rig
def test_the_horizon_follows_the_measured_latency_and_replays(session):
    """Following on, unmeasured part 0.3 s: the controller's first evaluation after 5 s
    moves the horizon from the configured 0.4 s to 0.3 s + what it measured (a few ms on
    the rig), logs why, and the estimates after it predict that far ahead; the replay
    reproduces every estimate and decision."""
    s = session(
        "tracking.follow_latency=true",
        "tracking.unmeasured_latency_s=0.3",
        "devices.xray.enabled=false",
    )
    s.controller.set_operator_enable(True, who="test")
    assert s.controller.wait_until(
        lambda st: st.estimate is not None and st.estimate.horizon_s < 0.4, timeout=15
    ), "the horizon did not follow the measured latency"
    s.close()
    db = sqlite3.connect(s.path)
    rows = db.execute("SELECT t, detail FROM events WHERE source='tracking' AND kind='horizon'")
    (t_change, detail), *_ = rows.fetchall()
    change = json.loads(detail)
    assert change["old"] == 0.4
    measured = change["measured"]
    assert measured["unmeasured_ms"] == 300.0 and 0 < measured["round_trip_ms"] < 50
    expected = 0.3 + (measured["decision_ms"] + measured["round_trip_ms"]) / 1e3
    assert change["horizon_s"] == pytest.approx(expected, abs=1e-4)
    horizons = db.execute("SELECT t, horizon_s FROM estimates ORDER BY n").fetchall()
    assert {h for t, h in horizons if t < t_change} == {0.4}
    assert {h for t, h in horizons if t > t_change} == {change["horizon_s"]}
    result = replay(s.path)
    assert result.reproduced, result.first_divergence
