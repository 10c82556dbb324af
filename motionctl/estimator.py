"""The motion estimator: one ``MotionEstimate`` per surrogate sample.

Per sample, causally and clock-injected (the time is the sample's receipt time):

1. the breathing axis of the surrogate goes through ``SurrogateProcessor`` (rejection,
   despiking, smoothing, cycles, phase, baseline);
2. the predictor forecasts the processed surrogate one system latency (``horizon_s``) ahead,
   with the marker's other two axes as extra inputs (``predictor_inputs = "all"``: the
   loop between a marker's axes tells inhale from exhale and where in the breath it is);
3. the correlation model maps the surrogate now, and the predicted surrogate, to the 3-D
   internal target. Until the model has been built from X-ray fiducial positions, the
   configured prior (``target = offset + gain * surrogate``, as a planning-CT/4DCT fit
   would give) stands in for it, if the site allows that; the estimate says which model
   it used;
4. the uncertainty combines the model's own (held-out residuals of its points, or the
   configured prior uncertainty) with the predictor's recent error, measured by comparing
   each prediction with the estimate that arrives one horizon later.

X-ray fiducial positions arrive through ``add_fiducial``: each is first compared with the
estimate at its acquisition time (a disagreement beyond ``fiducial_tolerance_mm`` marks the
estimates invalid with ``fiducial_disagreement`` until a later image agrees), then offered
to the correlation model as a model point.

Validity: an estimate is valid only if the sample was usable, a model is available and
valid and speaks for this surrogate (now and predicted: ``surrogate_beyond_model``), the
predictor has not diverged and the last fiducial check agreed. Every reason is
named in ``MotionEstimate.reasons``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from motionctl.correlation import CorrelationModel, PointResult, SurrogateHistory
from motionctl.prediction import (
    DEFAULT_PREDICTOR,
    Predictor,
    horizon_samples,
    make_predictor,
)
from motionctl.surrogate import SurrogateParams, SurrogateProcessor, spike_window_samples
from motionctl.types import AXES, MotionEstimate, SurrogateSample

_NAN3 = (math.nan, math.nan, math.nan)
_RECENT_ESTIMATES = 512  # about 17 s at 30 Hz, 100 s at 5 Hz
_RECENT_GAP_S = 0.25  # estimates further apart than this do not bracket an image's time
# An image whose time cannot be matched to the surrogate was still taken recently: it is
# received within this long of its exposure (the imagers' latency is 0.05-0.3 s). So it is
# also checked against where the target was estimated over this span: a much tighter test
# than every position the model can give (which reaches beyond the breathing seen), and
# one that an image older than this can fail only by holding the beam without need.
_UNTIMED_WINDOW_S = 10.0


@dataclass(frozen=True)
class EstimatorSettings:
    surrogate_axis: str = "AP"
    inhale_positive: bool = True  # the surrogate rises on inhale (AP of an abdominal marker)
    rate_hz: float = 30.0  # nominal surrogate rate: the predictor's sample clock
    smoothing_s: float = 0.04  # surrogate low-pass time constant (0 = none)
    horizon_s: float = 0.4
    predictor: str = "default"
    # "all": the surrogate's other two axes are extra predictor inputs; "axis": none
    predictor_inputs: str = "all"
    prior_gain: Sequence[float] = (0.0, -1.5, 0.5)  # target per mm of raw surrogate
    prior_offset_mm: Sequence[float] = (0.0, 0.0, 0.0)
    use_prior: bool = True
    prior_uncertainty_mm: float = 2.0
    fiducial_tolerance_mm: float = 3.0
    max_target_mm: float = 60.0  # an estimate further from the isocentre is not physical
    error_time_constant_s: float = 10.0  # averaging of the predictor's recent error


class MotionEstimator:
    def __init__(
        self,
        settings: EstimatorSettings,
        correlation: CorrelationModel,
        predictor: Predictor | None = None,
        surrogate: SurrogateProcessor | None = None,
    ):
        self.s = settings
        self._axis = AXES.index(settings.surrogate_axis)
        self._sign = 1.0 if settings.inhale_positive else -1.0
        self.surrogate = surrogate or SurrogateProcessor(
            SurrogateParams(
                smoothing_s=settings.smoothing_s,
                spike_window=spike_window_samples(settings.rate_hz),
            )
        )
        # The marker's other axes, as the predictor's extra inputs (raw mm; the last finite
        # value stands in for a missing one, e.g. the absent axes of a 1-D RPM export).
        aux_axes = [i for i in range(3) if i != self._axis]
        self._aux_axes = tuple(aux_axes) if settings.predictor_inputs == "all" else ()
        self._aux = [0.0] * len(self._aux_axes)
        self.predictor = predictor or self._make_predictor(settings)
        if getattr(self.predictor, "aux_channels", 0) != len(self._aux_axes):
            self._aux_axes, self._aux = (), []  # an injected 1-D predictor
        self.correlation = correlation
        self.history = SurrogateHistory.for_params(correlation.params)
        self._horizon_samples = horizon_samples(settings.rate_hz, settings.horizon_s)
        # Ring of past predictions, to score each one when its target time arrives.
        self._past: list[tuple[float, float, float] | None] = [None] * max(1, self._horizon_samples)
        self._slot = 0
        self._pred_err2 = 0.0
        self._pred_err_n = 0
        self._alpha = 1.0 / max(1.0, settings.error_time_constant_s * settings.rate_hz)
        self._fiducial_reason: str | None = None
        self.last_check_mm = math.nan  # estimate vs the last X-ray position, 3-D distance
        # Every surrogate level seen this session (never reset): the prior's range, for
        # checking an image whose time cannot be matched to the surrogate.
        self._s_lo, self._s_hi = math.inf, -math.inf
        # The estimates of the last seconds, kept across restarts: an image taken before a
        # surrogate glitch is still checked against what was estimated when it was taken.
        self._recent: deque[tuple[float, tuple[float, float, float], float]] = deque(
            maxlen=_RECENT_ESTIMATES
        )
        self.last_model = "none"

    # -- the per-sample path: scalar state, no per-sample numpy ---------------------------
    def step(self, sample: SurrogateSample) -> MotionEstimate:
        t = sample.t_rx
        raw = sample.position_mm[self._axis]
        state = self.surrogate.step(t, self._sign * raw)
        if not state.valid:
            self._restart()
            return MotionEstimate(
                t, _NAN3, _NAN3, self.s.horizon_s, False, state.reasons, model="none"
            )
        # Across a gap or a jump the history no longer describes this breathing: a
        # predictor that learnt from it would forecast the artefact.
        reasons = (
            [r for r in state.reasons if r in ("gap", "surrogate_jump")] if state.reasons else []
        )
        if reasons:
            self._restart()
        value = state.value_mm
        if value < self._s_lo:
            self._s_lo = value
        if value > self._s_hi:
            self._s_hi = value
        self.history.append(t, value)
        aux = self._aux
        if aux:
            marker = sample.position_mm
            for j, i in enumerate(self._aux_axes):
                v = marker[i]
                if math.isfinite(v):
                    aux[j] = v
            predicted = self.predictor.step(value, aux)
        else:
            predicted = self.predictor.step(value)
        if self.predictor.diverged or not math.isfinite(predicted):
            reasons.append("predictor_diverged")
            self.predictor.reset()
            predicted = value

        model = self.correlation
        if model.valid:
            position = model.predict(self.history.features())
            ahead = model.predict(self.history.features_ahead(predicted, self.s.horizon_s))
            model_sigma = model.uncertainty_mm
            self.last_model = model.kind
            if position[0] != position[0] or ahead[0] != ahead[0]:  # NaN
                # beyond the surrogate range the model was built on (e.g. breathing again
                # after a breath hold's static model): where the target is, nobody knows
                reasons.append("surrogate_beyond_model")
        elif self.s.use_prior and model.state == "collecting":
            # Before the first X-ray model is built (never after one was invalidated: that is
            # an interlock, not something for the prior to paper over).
            position = self._prior(value)
            ahead = self._prior(predicted)
            model_sigma = self.s.prior_uncertainty_mm
            self.last_model = "prior"
        else:
            reasons.append(
                "correlation_model_invalid"
                if model.state == "rebuilding"
                else "no_correlation_model"
            )
            position = ahead = _NAN3
            model_sigma = math.nan
            self.last_model = "none"

        lim = self.s.max_target_mm
        (p0, p1, p2), (a0, a1, a2) = position, ahead
        if (
            abs(p0) > lim
            or abs(p1) > lim
            or abs(p2) > lim
            or abs(a0) > lim
            or abs(a1) > lim
            or abs(a2) > lim
        ):
            reasons.append("target_out_of_range")
        prediction_sigma = self._score_prediction(position, ahead)
        if self._fiducial_reason is not None:
            reasons.append(self._fiducial_reason)
        # a gap restarts; it does not invalidate
        valid = not reasons or all(r == "gap" for r in reasons)
        uncertainty = math.sqrt(model_sigma**2 + prediction_sigma**2)
        if valid:
            self._recent.append((t, position, model_sigma))
        return MotionEstimate(
            t,
            position,
            ahead,
            self.s.horizon_s,
            valid,
            tuple(reasons),
            phase=state.phase,
            amplitude_mm=state.amplitude_mm,
            uncertainty_mm=uncertainty,
            model=self.last_model,
            surrogate_mm=value,
            predicted_phase=(state.phase + self.s.horizon_s / state.period_s) % 1.0
            if state.period_s > 0
            else math.nan,
            prediction_ready=self.predictor.ready,
        )

    @property
    def prediction_ready_in_s(self) -> float:
        """How long until the predictor can forecast (0 once it can; nan if it cannot say:
        a predictor without the count, or one that diverged)."""
        return getattr(self.predictor, "ready_in_s", math.nan)

    @property
    def fiducial_reason(self) -> str | None:
        """ "fiducial_disagreement" while the last X-ray check disagreed, else None."""
        return self._fiducial_reason

    def set_horizon(self, horizon_s: float) -> None:
        """Predict ``horizon_s`` ahead from now on. The predictor learnt a different
        horizon, so it starts again (its warm-up: until then the prediction is the current
        value); the correlation model and the surrogate history are kept."""
        self.s = replace(self.s, horizon_s=float(horizon_s))
        self.predictor = self._make_predictor(self.s)
        self._horizon_samples = horizon_samples(self.s.rate_hz, self.s.horizon_s)
        self._past = [None] * max(1, self._horizon_samples)
        self._slot = 0
        self._pred_err2, self._pred_err_n = 0.0, 0

    def _make_predictor(self, settings: EstimatorSettings) -> Predictor:
        name = DEFAULT_PREDICTOR if settings.predictor == "default" else settings.predictor
        return make_predictor(
            name, settings.rate_hz, settings.horizon_s, aux_channels=len(self._aux_axes)
        )

    def _prior(self, value: float) -> tuple[float, float, float]:
        raw = self._sign * value
        g, o = self.s.prior_gain, self.s.prior_offset_mm
        return (o[0] + g[0] * raw, o[1] + g[1] * raw, o[2] + g[2] * raw)

    def _score_prediction(self, position, ahead) -> float:
        """RMS 3-D error of the predictions made one horizon ago against the estimate now."""
        if self._horizon_samples == 0:
            return 0.0
        old = self._past[self._slot]
        self._past[self._slot] = ahead
        self._slot = (self._slot + 1) % self._horizon_samples
        if old is not None and math.isfinite(old[0]) and math.isfinite(position[0]):
            err2 = (
                (old[0] - position[0]) ** 2
                + (old[1] - position[1]) ** 2
                + (old[2] - position[2]) ** 2
            )
            self._pred_err_n += 1
            # Plain mean until the average has as many samples as its time constant.
            alpha = max(self._alpha, 1.0 / self._pred_err_n)
            self._pred_err2 += alpha * (err2 - self._pred_err2)
        return math.sqrt(self._pred_err2)

    def _restart(self) -> None:
        # The samples before a gap, a jump or invalid data no longer continue into the new
        # ones; the breathing the predictor learnt is still this patient's (it relearns
        # from nothing only after a divergence).
        self.predictor.restart()
        self.history.clear()
        self._past = [None] * len(self._past)
        self._pred_err2, self._pred_err_n = 0.0, 0

    # -- X-ray fiducial positions ---------------------------------------------------------
    def add_fiducial(self, t: float, position_mm: tuple[float, float, float]) -> PointResult:
        """Check a measured internal position against the estimate at its acquisition time,
        then offer it to the correlation model as a point."""
        try:
            features = self.history.features_at(t)
        except ValueError as exc:  # no surrogate history covering the image's time
            if not self._check_against_recent(t, position_mm):
                self.check_untimed(position_mm)
            return PointResult(None, False, self.correlation.valid, f"no surrogate at t: {exc}")
        expected = None
        sigma = 0.0
        if self.correlation.valid:
            expected = self.correlation.predict(features)
            sigma = self.correlation.uncertainty_mm
        elif self.s.use_prior and self.correlation.state == "collecting":
            expected = self._prior(features.s)
            sigma = self.s.prior_uncertainty_mm
        result = self.correlation.add_point(t, features, position_mm)
        if expected is not None and math.isnan(expected[0]):
            # The surrogate then was beyond the model's range: the image cannot be judged
            # (an earlier disagreement stands).
            self.last_check_mm = math.nan
        elif expected is not None:
            self.last_check_mm = math.dist(expected, position_mm)
            # A miss is judged against what the estimate claims: never tighter than the
            # tolerance, but a 2-sigma miss of a model that says it is uncertain (the
            # planning prior) is that model being honest, not a disagreement.
            limit = max(self.s.fiducial_tolerance_mm, 2.0 * sigma)
            disagree = self.last_check_mm > limit
            self._fiducial_reason = "fiducial_disagreement" if disagree else None
        else:
            self.last_check_mm = math.nan
        return result

    def _check_against_recent(self, t: float, position_mm: tuple[float, float, float]) -> bool:
        """Check against the estimate recorded at ``t`` (interpolated between the two valid
        estimates around it, at most ``_RECENT_GAP_S`` apart); False if there are none."""
        after = None
        for entry in reversed(self._recent):
            if entry[0] >= t:
                after = entry
                continue
            if after is None or after[0] - entry[0] > _RECENT_GAP_S:
                return False
            (t0, p0, s0), (t1, p1, s1) = entry, after
            a = (t - t0) / (t1 - t0)
            expected = tuple(u + a * (w - u) for u, w in zip(p0, p1, strict=True))
            self.last_check_mm = math.dist(expected, position_mm)
            limit = max(self.s.fiducial_tolerance_mm, 2.0 * max(s0, s1))
            if self.last_check_mm > limit:
                self._fiducial_reason = "fiducial_disagreement"
            return True
        return False

    def check_untimed(self, position_mm: tuple[float, float, float]) -> None:
        """Check an X-ray position whose acquisition time cannot be matched to the surrogate
        (its clock is in doubt, or the surrogate history around it was lost): against every
        position the model (or the prior, over every surrogate level seen) can give at any
        phase of the breath, and against the estimates of the last ``_UNTIMED_WINDOW_S``
        (the path between consecutive ones). Far from all of either is a disagreement
        whenever it was taken; near one of them proves nothing, so an earlier disagreement
        stands."""
        candidates: list[tuple[float, float, float]] = []
        sigma = 0.0
        if self.correlation.valid:
            candidates = self.correlation.positions_over_range()
            sigma = self.correlation.uncertainty_mm
        elif self.s.use_prior and self.correlation.state == "collecting":
            lo, hi = self._s_lo, self._s_hi
            if lo <= hi:  # a surrogate seen
                candidates = [self._prior(lo + (hi - lo) * i / 24) for i in range(25)]
                sigma = self.s.prior_uncertainty_mm
        self.last_check_mm = math.nan
        if candidates:
            self.last_check_mm = min(math.dist(c, position_mm) for c in candidates)
            if self.last_check_mm > max(self.s.fiducial_tolerance_mm, 2.0 * sigma):
                self._fiducial_reason = "fiducial_disagreement"
                return
        miss, excess = self._recent_miss(position_mm)
        if math.isfinite(miss):
            self.last_check_mm = miss
            if excess > 0.0:
                self._fiducial_reason = "fiducial_disagreement"

    def _recent_miss(self, position_mm: tuple[float, float, float]) -> tuple[float, float]:
        """(distance, distance beyond its tolerance) from ``position_mm`` to the nearest
        point of the path of valid estimates over the last ``_UNTIMED_WINDOW_S``; (nan, nan)
        if there are none. The tolerance is the fiducial tolerance or 2 sigma, as for a
        timed image."""
        recent = self._recent
        if not recent:
            return math.nan, math.nan
        t_from = recent[-1][0] - _UNTIMED_WINDOW_S
        tol = self.s.fiducial_tolerance_mm
        best = excess = math.inf
        later = None
        for entry in reversed(recent):
            t, p, sigma = entry
            if t < t_from:
                break
            limit = max(tol, 2.0 * sigma)
            if later is not None and later[0] - t <= _RECENT_GAP_S:
                d = _segment_distance(position_mm, p, later[1])
                limit = max(limit, 2.0 * later[2])
            else:
                d = math.dist(position_mm, p)
            best = min(best, d)
            excess = min(excess, d - limit)
            later = entry
        return best, excess


def _segment_distance(p: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float:
    """Distance from the point ``p`` to the segment from ``a`` to ``b`` (3-D)."""
    ab = [v - u for u, v in zip(a, b, strict=True)]
    ap = [v - u for u, v in zip(a, p, strict=True)]
    length2 = sum(c * c for c in ab)
    u = 0.0 if length2 == 0.0 else sum(x * y for x, y in zip(ap, ab, strict=True)) / length2
    u = min(1.0, max(0.0, u))
    return math.dist(p, [x + u * c for x, c in zip(a, ab, strict=True)])
