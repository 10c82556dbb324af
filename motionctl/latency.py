"""The system latency the prediction horizon has to cover, as the controller measures it.

The beam acts on a decision some time after the surrogate sample it came from: the
controller's own decision latency (sample received -> beam command written), the trip to
the gating box and back (command -> ACK), and what the controller cannot see: the tracker's
own processing before it sends a sample, and the linac's beam response. The predictor must
forecast that far ahead.

``LatencyMonitor`` keeps the recent measured parts and, when ``tracking.follow_latency`` is
on, proposes a new horizon = ``tracking.unmeasured_latency_s`` + median decision latency +
median round trip, re-evaluated every ``update_s``. It proposes a change only when the
horizon moves by at least one surrogate sample (a predictor predicts whole samples ahead,
and every change restarts its learning), and only from at least ``min_measurements`` of
each kind. The controller hands the proposal to ``SessionCore.set_horizon``, which logs it
as an event that replay feeds back, so replay predicts with the horizon the session used.

Pure: times are passed in; no clock, no I/O.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from motionctl.prediction import horizon_samples


class LatencyMonitor:
    def __init__(
        self,
        *,
        unmeasured_s: float,
        rate_hz: float,
        update_s: float = 5.0,
        window: int = 500,
        min_measurements: int = 20,
    ):
        self.unmeasured_s = float(unmeasured_s)
        self.rate_hz = float(rate_hz)
        self.update_s = float(update_s)
        self.min_measurements = min_measurements
        self.decision_s: deque[float] = deque(maxlen=window)
        self.round_trip_s: deque[float] = deque(maxlen=window)
        self._next_update: float | None = None

    def add_decision(self, latency_s: float) -> None:
        if latency_s >= 0:
            self.decision_s.append(latency_s)

    def add_round_trip(self, rtt_s: float) -> None:
        if rtt_s >= 0:
            self.round_trip_s.append(rtt_s)

    def measured(self) -> dict[str, float] | None:
        """Median decision latency and round trip (ms), or None with too few of either."""
        if min(len(self.decision_s), len(self.round_trip_s)) < self.min_measurements:
            return None
        return {
            "decision_ms": round(1e3 * statistics.median(self.decision_s), 3),
            "round_trip_ms": round(1e3 * statistics.median(self.round_trip_s), 3),
        }

    def propose(self, t: float, current_horizon_s: float) -> tuple[float, dict[str, Any]] | None:
        """At session time ``t``: a new horizon and what it was made of, or None (not due,
        too few measurements, or less than one sample away from ``current_horizon_s``)."""
        if self._next_update is None:
            self._next_update = t + self.update_s
        if t < self._next_update:
            return None
        self._next_update = t + self.update_s
        measured = self.measured()
        if measured is None:
            return None
        horizon = self.unmeasured_s + (measured["decision_ms"] + measured["round_trip_ms"]) / 1e3
        horizon = round(horizon, 4)
        if horizon_samples(self.rate_hz, horizon) == horizon_samples(
            self.rate_hz, current_horizon_s
        ):
            return None
        return horizon, {"unmeasured_ms": round(1e3 * self.unmeasured_s, 3), **measured}
