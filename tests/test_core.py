"""The gate state machine and the interlock monitor (pure core)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from motionctl.gating import TRANSITIONS, DwellMonitor, Gate, GateInputs, GateSettings, GateState
from motionctl.interlocks import SPECS, InterlockMonitor
from motionctl.types import MotionEstimate


def estimate(si=-2.0, valid=True, phase=0.0, surrogate=0.0, reasons=()):
    pos = (0.0, si, 0.0)
    return MotionEstimate(0.0, pos, pos, 0.4, valid, reasons, phase=phase, surrogate_mm=surrogate)


def ok(est=None, **kw):
    return GateInputs(estimate=est or estimate(), operator_enabled=True, **kw)


# -- amplitude gating --------------------------------------------------------------------
def test_amplitude_window_edges_and_reason():
    gate = Gate(GateSettings(center_mm=-2.0, window_mm=4.0))
    assert gate.update(0, ok(estimate(-2.0))).beam_enabled
    assert gate.update(0, ok(estimate(0.0))).beam_enabled  # the edge is inside
    held = gate.update(0, ok(estimate(0.1)))
    assert not held.beam_enabled and held.reasons == ("outside_window",)


def test_gate_uses_the_predicted_position_or_the_surrogate():
    est = MotionEstimate(0.0, (0, 5.0, 0), (0, -2.0, 0), 0.4, True, surrogate_mm=9.0)
    assert Gate(GateSettings(center_mm=-2, window_mm=2)).update(0, ok(est)).beam_enabled
    surrogate = Gate(GateSettings(source="surrogate", center_mm=9.0, window_mm=1))
    assert surrogate.update(0, ok(est)).beam_enabled


def test_debounce_is_asymmetric():
    gate = Gate(GateSettings(debounce_samples=3))
    states = [gate.update(t, ok()).beam_enabled for t in range(3)]
    assert states == [False, False, True]
    assert gate.update(3, ok()).reasons == ()
    assert not gate.update(4, ok(estimate(20.0))).beam_enabled  # off at once
    assert not gate.update(5, ok()).beam_enabled  # and counting again
    assert gate.update(5, ok()).reasons == ("debounce",)


def test_transition_table_is_complete():
    assert set(TRANSITIONS) == {(s, c) for s in GateState for c in (True, False)}
    assert all(TRANSITIONS[(s, False)] is GateState.HOLD for s in GateState)


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        (GateInputs(estimate(), operator_enabled=False), "operator_not_enabled"),
        (ok(interlocks=("stale_data:surface",)), "stale_data:surface"),
        (ok(estimate(valid=False)), "estimate_invalid"),
        (ok(estimate(math.nan)), "outside_window"),
        (GateInputs(None, operator_enabled=True), "estimate_invalid"),
    ],
)
def test_every_failing_condition_holds_with_its_reason(inputs, reason):
    decision = Gate(GateSettings()).update(0, inputs)
    assert not decision.beam_enabled and reason in decision.reasons


# -- phase gating ------------------------------------------------------------------------
@pytest.mark.parametrize(("phase", "on"), [(0.85, True), (0.0, True), (0.19, True), (0.5, False)])
def test_phase_window_wraps_through_end_exhale(phase, on):
    gate = Gate(GateSettings(mode="phase", phase_window=(0.8, 0.2)))
    decision = gate.update(0, ok(estimate(phase=phase)))
    assert decision.beam_enabled is on
    if not on:
        assert decision.reasons == ("outside_phase_window",)


def test_unknown_phase_holds():
    gate = Gate(GateSettings(mode="phase"))
    assert gate.update(0, ok(estimate(phase=math.nan))).reasons == ("phase_unknown",)


# -- breath-hold gating ------------------------------------------------------------------
def test_breath_hold_needs_a_reference_and_a_stable_hold():
    gate = Gate(GateSettings(mode="breath_hold", breath_hold_tolerance_l=0.1, min_stable_s=1.0))
    assert gate.update(0, ok(volume_l=2.0)).reasons == ("no_breath_hold_reference",)
    gate.capture_reference(2.0)
    assert gate.update(0.0, ok(volume_l=2.05)).reasons == ("breath_hold_not_stable",)
    assert gate.update(0.5, ok(volume_l=2.02)).reasons == ("breath_hold_not_stable",)
    assert gate.update(1.0, ok(volume_l=2.03)).beam_enabled
    leak = gate.update(1.5, ok(volume_l=1.85))
    assert leak.reasons == ("outside_breath_hold_tolerance",)
    assert not gate.update(1.6, ok(volume_l=2.0)).beam_enabled  # stability restarts


# -- dwell --------------------------------------------------------------------------------
def test_dwell_rule_trips_after_the_dwell_time():
    dwell = DwellMonitor("SI", dwell_mm=3.0, dwell_s=5.0)
    assert not dwell.update(0.0, estimate(-6.0), center_mm=-2.0)
    assert not dwell.update(5.0, estimate(-6.0), center_mm=-2.0)
    assert dwell.update(5.1, estimate(-6.0), center_mm=-2.0)
    assert not dwell.update(5.2, estimate(-2.5), center_mm=-2.0)
    assert not DwellMonitor("SI", 0.0, 5.0).update(100, estimate(-60.0), -2.0)  # off


# -- interlocks ---------------------------------------------------------------------------
def test_auto_interlock_clears_after_its_clean_period():
    mon = InterlockMonitor()
    events = mon.report(1.0, "malformed_data", "surface", True, "CRC")
    assert [e.kind for e in events] == ["raised"] and mon.active() == ("malformed_data:surface",)
    mon.report(1.0, "malformed_data", "surface", False)
    assert mon.tick(1.1) == [] and mon.active()  # 0.1 s clean: not yet
    assert [e.kind for e in mon.tick(1.25)] == ["cleared"] and not mon.active()


def test_ack_interlock_waits_for_the_condition_to_go_and_an_acknowledgement():
    mon = InterlockMonitor()
    mon.report(0, "fiducial_disagreement", None, True, "4.2 mm")
    assert mon.acknowledge(1, "fiducial_disagreement")[0] is False  # condition still present
    events = mon.report(2, "fiducial_disagreement", None, False)
    assert [e.kind for e in events] == ["awaiting_ack"]
    assert mon.tick(100) == [] and mon.active() == ("fiducial_disagreement",)
    assert mon.awaiting_ack() == ("fiducial_disagreement",)
    assert mon.acknowledge(101, "fiducial_disagreement") == (True, "")
    assert not mon.active()


def test_auto_interlocks_refuse_acknowledgement():
    mon = InterlockMonitor()
    mon.report(0, "stale_data", "surface", True)
    accepted, why = mon.acknowledge(0, "stale_data:surface")
    assert not accepted and "clears by itself" in why


def test_unknown_interlock_code_is_a_programming_error():
    with pytest.raises(KeyError):
        InterlockMonitor().report(0, "no_such_interlock", None, True)


# -- the safety property ------------------------------------------------------------------
step = st.fixed_dictionaries(
    {
        "dt": st.floats(0.0, 0.5),
        "operator": st.booleans(),
        "si": st.one_of(st.floats(-20, 20), st.just(math.nan), st.just(math.inf)),
        "valid": st.booleans(),
        "phase": st.one_of(st.floats(0, 1, exclude_max=True), st.just(math.nan)),
        "volume": st.one_of(st.floats(-1, 4), st.just(math.nan)),
        "interlock": st.sampled_from([None, *sorted(SPECS)]),
        "clear": st.booleans(),
        "ack": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(["amplitude", "phase", "breath_hold"]),
    debounce=st.integers(1, 4),
    steps=st.lists(step, min_size=1, max_size=60),
)
def test_no_sequence_enables_the_beam_while_any_condition_fails(mode, debounce, steps):
    gate = Gate(GateSettings(mode=mode, debounce_samples=debounce, min_stable_s=0.3))
    gate.capture_reference(2.0)
    mon = InterlockMonitor()
    t = 0.0
    run = 0  # consecutive samples with every condition holding
    for s in steps:
        t += s["dt"]
        if s["interlock"] is not None:
            mon.report(t, s["interlock"], None, not s["clear"], "x")
            if s["ack"]:
                mon.acknowledge(t, s["interlock"])
        mon.tick(t)
        est = MotionEstimate(t, (0, s["si"], 0), (0, s["si"], 0), 0.4, s["valid"], phase=s["phase"])
        inputs = GateInputs(est, mon.active(), s["operator"], s["volume"])
        decision = gate.update(t, inputs)
        if mode == "amplitude":
            window_ok = s["valid"] and gate.lower_mm <= s["si"] <= gate.upper_mm
        elif mode == "phase":
            window_ok = s["valid"] and 0.8 <= s["phase"] or s["valid"] and s["phase"] < 0.2
        else:
            window_ok = abs(s["volume"] - 2.0) <= 0.1  # (stability checked by the gate)
        conditions = s["operator"] and not mon.active() and window_ok
        run = run + 1 if conditions else 0
        if decision.beam_enabled:
            assert conditions, (decision, inputs)
            assert run >= debounce
            assert decision.reasons == ()
        else:
            assert decision.reasons, "a hold must say why"
