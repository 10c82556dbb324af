"""The pure core of the walking skeleton: first tracker and amplitude gate."""

from __future__ import annotations

import math

import pytest

from motionctl.gating import AmplitudeGate, GateHealth
from motionctl.tracking import ScaledSurrogateTracker
from motionctl.types import MotionEstimate, SurrogateSample


def _sample(t, ap, seq=0):
    return SurrogateSample("surface", seq, 1e9 + t, t, (0.0, 0.0, ap))


def test_tracker_scales_the_surrogate_axis():
    tracker = ScaledSurrogateTracker("AP", gain=[0.0, -1.5, 0.5], offset_mm=[1.0, 2.0, 3.0])
    est = tracker.step(_sample(1.0, 4.0))
    assert est.valid and est.t == 1.0
    assert est.position_mm == pytest.approx((1.0, 2.0 - 6.0, 3.0 + 2.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_tracker_rejects_non_finite(bad):
    tracker = ScaledSurrogateTracker("AP", gain=[0, 1, 0], offset_mm=[0, 0, 0])
    est = tracker.step(_sample(1.0, bad))
    assert not est.valid and "surrogate_not_finite" in est.reasons


def test_tracker_rejects_time_going_backwards_and_recovers():
    tracker = ScaledSurrogateTracker("AP", gain=[0, 1, 0], offset_mm=[0, 0, 0])
    assert tracker.step(_sample(2.0, 1.0)).valid
    back = tracker.step(_sample(1.5, 1.0))
    assert not back.valid and back.reasons == ("clock_backwards",)
    assert tracker.step(_sample(2.1, 1.0)).valid


def _estimate(si, valid=True):
    return MotionEstimate(0.0, (0.0, si, 0.0), (0.0, si, 0.0), 0.0, valid)


HEALTHY = GateHealth(operator_enabled=True)


def test_gate_enables_only_inside_the_window():
    gate = AmplitudeGate("SI", center_mm=-2.0, window_mm=4.0)
    assert gate.update(0, _estimate(-2.0), HEALTHY).beam_enabled
    assert gate.update(0, _estimate(0.0), HEALTHY).beam_enabled  # edge is inside
    held = gate.update(0, _estimate(0.1), HEALTHY)
    assert not held.beam_enabled and held.reasons == ("outside_window",)


@pytest.mark.parametrize(
    ("health", "estimate", "reason"),
    [
        (GateHealth(operator_enabled=False), _estimate(-2.0), "operator_not_enabled"),
        (GateHealth(True, stale_devices=("surface",)), _estimate(-2.0), "stale_data:surface"),
        (GateHealth(True, missing_devices=("surface",)), None, "no_data:surface"),
        (GateHealth(True, beam_fault="ack_lost"), _estimate(-2.0), "beam_interface_fault:ack_lost"),
        (GateHealth(True, log_failed=True), _estimate(-2.0), "log_write_failure"),
        (HEALTHY, _estimate(-2.0, valid=False), "estimate_invalid"),
        (HEALTHY, _estimate(math.nan), "outside_window"),
        (HEALTHY, None, "estimate_invalid"),
    ],
)
def test_every_failing_condition_holds_with_its_reason(health, estimate, reason):
    decision = AmplitudeGate("SI", -2.0, 4.0).update(0, estimate, health)
    assert not decision.beam_enabled
    assert reason in decision.reasons


def test_all_failing_conditions_are_reported_together():
    health = GateHealth(False, stale_devices=("surface",), beam_fault="port_error")
    decision = AmplitudeGate("SI", -2.0, 4.0).update(0, _estimate(5.0), health)
    assert set(decision.reasons) == {
        "operator_not_enabled",
        "stale_data:surface",
        "beam_interface_fault:port_error",
        "outside_window",
    }


@pytest.mark.parametrize("width", [0.0, -1.0, math.nan])
def test_window_must_be_positive_and_finite(width):
    with pytest.raises(ValueError, match="window"):
        AmplitudeGate("SI", 0.0, width)
