"""Target estimation from the external surrogate (first tracker of the walking skeleton).

``ScaledSurrogateTracker`` maps the surrogate's breathing axis linearly to the internal
target, ``target = offset + gain * surrogate[axis]`` per target axis, with no prediction.
The tracking core (correlation model, predictor) replaces it behind the same ``step()``.

Pure and clock-injected: the time is the sample's receipt time; no I/O, threads or Qt.
Samples that are non-finite or go back in time never reach the model: the estimate is then
marked invalid with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from motionctl.types import AXES, MotionEstimate, SurrogateSample


class ScaledSurrogateTracker:
    def __init__(
        self,
        surrogate_axis: str,
        gain: Sequence[float],
        offset_mm: Sequence[float],
        horizon_s: float = 0.0,
    ):
        self._axis = AXES.index(surrogate_axis)
        self._gain = tuple(float(g) for g in gain)
        self._offset = tuple(float(o) for o in offset_mm)
        self.horizon_s = horizon_s
        self._last_t: float | None = None

    def step(self, sample: SurrogateSample) -> MotionEstimate:
        value = sample.position_mm[self._axis]
        reasons: list[str] = []
        if not all(math.isfinite(v) for v in sample.position_mm):
            reasons.append("surrogate_not_finite")
        if self._last_t is not None and sample.t_rx < self._last_t:
            reasons.append("clock_backwards")
        if reasons:
            nan3 = (math.nan, math.nan, math.nan)
            return MotionEstimate(sample.t_rx, nan3, nan3, self.horizon_s, False, tuple(reasons))
        self._last_t = sample.t_rx
        g, o = self._gain, self._offset
        position = (o[0] + g[0] * value, o[1] + g[1] * value, o[2] + g[2] * value)
        return MotionEstimate(sample.t_rx, position, position, self.horizon_s, True)
