"""External-to-internal correlation model: surrogate amplitude -> internal 3-D target position.

What it is for
--------------
The surface camera (or marker block) gives a 1-D breathing amplitude ``s`` (mm) 25-30 times a
second; the internal liver target is seen only on sparse X-ray images ("model points", one every
1-3 s). As CyberKnife Synchrony does, this module fits a model ``s -> (LR, SI, AP)`` at the model
points and evaluates it at every surrogate sample, so that the gate and the tracker see the
internal position between images. Positions are IEC 61217 (LR, SI, AP) millimetres; times are
seconds on the caller's clock. The module is pure: no I/O, no threads, no clock reads.

Features (``SurrogateHistory``)
-------------------------------
``ModelFeatures(s, s_dot, t)``: the surrogate value, its causal velocity and their time.

- ``s_dot`` is the slope of a least-squares line through the samples of the last
  ``velocity_window_s`` (0.4 s: about 12 samples at 30 Hz, enough to average camera noise; its
  delay, half the window, is 5 % of a 4 s breath).
- ``s`` is the end point of such a line through the last ``smoothing_window_s`` (0.2 s): it
  averages ~6 camera frames, has no delay on a steady slope, and its bias at the turning points
  (s'' w^2 / 12: ~0.02 mm for a 5 mm, 4 s breath) is negligible. Surrogate noise matters
  because the model multiplies it by its slope (the liver moves 2-5 mm per mm of a small
  abdominal surrogate). A slow device (two samples or fewer in 0.2 s, e.g. 5 Hz) gets its raw
  samples.
- ``features_at(t)``: the features at an earlier time inside the buffer (an X-ray taken
  mid-exposure before the newest sample), interpolated linearly between the features at the
  two samples that bracket ``t``; a time after the newest sample is refused (no future data).
- ``features_ahead(s_pred, h)``: the features of a predicted sample ``h`` seconds after the
  newest one (its velocity from the history plus the predicted sample).

Models (each fitted per axis, with its own coefficients; the form is selected per axis)
--------------------------------------------------------------------------------------
``z`` is the surrogate centred and scaled on the model points, ``v`` the velocity.

- ``linear``:     x = a + b z.
- ``quadratic``:  x = a + b z + c q(z). The curvature is used only inside the surrogate range of
  the model points; beyond it the curve continues along its tangent (q = zc (2 z - zc), zc = z
  clipped to the range), because a parabola fitted to a dozen points extrapolates badly into a
  deep breath.
- ``dual``:       inhale/exhale branches (hysteresis): x = a + b z + c h(v), h = +1 on the branch
  where the surrogate rises and -1 where it falls, chosen by the sign of the velocity. Near the
  turning points (|v| below ``dual_ramp_fraction`` = 1/4 of the largest |v| among the model
  points) h ramps linearly from -1 to +1, so the branches meet at end-inhale and end-exhale as a
  real loop does, and velocity noise at a turning point cannot flip the estimate. The branches
  share the slope: two free slopes (four parameters, about six points per branch) were unstable
  on the real traces.
- ``augmented``:  x = a + b z + c v, state-augmented with the velocity (for small lags
  s(t - L) = s - L s_dot, so this is also the delayed-surrogate model). At prediction the
  velocity is clipped to the range seen at the model points (the loop is not extrapolated).

Range
-----
A model speaks for the surrogate range of its points extended by ``max_extrapolation`` (1.0)
times that range on either side (at least ``min_span_mm`` for a static model): inside, it
extrapolates linearly; beyond, ``predict()`` returns (nan, nan, nan) and the estimator holds
with ``surrogate_beyond_model``: a surrogate twice as far out as anything imaged, or breathing
again after a breath hold's static model, says nothing of where the target is. Checking a new
point, the model is evaluated clamped to that range instead (the point may be a real shift, to
be caught), except a static model, which has no slope to say anything beyond its points: such
a point is the breathing resuming, accepted unchecked; the refit takes a slope only once the
points agree on one (the building check: each left out within ``check_threshold_mm`` of a
line through the others, so at least two such points), until then the model stays static.

Static model
------------
Points that span less than ``min_span_mm`` (0.5 mm) of surrogate determine no slope: a breath
hold, or a long one imaged often enough to fill every point (40 points are 8 s at 5 Hz). Fitted
as a line, the slope was noise and the range a few tenths of a mm wide, clamped: after a deep-
inspiration hold it put the target at its held position at full exhale, 9 mm away, until the
next image. Such points give a static model instead (``kind`` "static"): every axis the GLS
mean of the points, with the offset state; uncertainty the leave-one-out RMS. Built from
scratch only if the target held still too: every point within ``static_tolerance_mm`` (2 mm)
of the plain mean of the others (a flat surrogate while the target moves is no breath hold).

Offset (baseline drift) state
-----------------------------
Slow internal/external drift is modelled rather than merely forgotten: each model carries a
per-axis baseline offset b(t) that is a random walk, on top of white scatter. The fit is
generalised least squares with point covariance C = I + K / ``offset_drift_time_s``,
K_ij = min(tau_i, tau_j), tau = age of a point relative to the newest one: after
``offset_drift_time_s`` (10 s) the baseline may have wandered as much as one image scatters.
This is exactly a Kalman filter over the window's points whose state is the offset (random
walk) and the shape coefficients (constant): the offset is updated at every image with the
Kalman gain; old points count less for the offset but fully for the shape (slope, loop width).
Estimates use the offset at the newest image (a random walk's best forecast). A 1 mm baseline
step is absorbed by 41 / 60 / 79 / 92 % at the 1st / 2nd / 3rd / 4th image after it at 3 s
imaging, 27 / 42 / 60 / 73 / 81 % at 1 s: about 80 % within 10 s either way. ``offset_mm``
reports the baseline at the newest image minus its average over the model points (the drift
absorbed). ``offset_drift_time_s = inf`` turns the state off (ordinary least squares).

Selection
---------
Every enabled model is fitted at every image. When the next image arrives, each model's
prediction of it, made before it is added, is a held-out (forward) error: exactly what the model
is used for. Each model keeps, per axis, an exponentially discounted mean of its squared forward
errors (memory ``selection_memory`` = 20 images); scoring starts once every enabled model has a
fit (6 points). The simplest enabled model (``linear``) is used until ``min_held_out`` (5)
errors are scored; after that, on each axis, the 3-parameter model with the lowest held-out RMS
on that axis is chosen only if it is clearly better there than linear (complexity guard): below
(1 - ``selection_margin``) = 0.9 times linear's RMS and lower by at least
``selection_min_gain_mm`` (0.05 mm).

Why per axis: the three axes are fitted separately anyway, and their relations to the surrogate
differ (e.g. SI follows the surrogate with a lag, AP loops, LR hardly moves). One form chosen on
the 3-D error let the axes the surrogate explains least (the largest scatter) pick the form for
the gated axis: on a KIM liver trace they chose ``dual`` where SI needed ``augmented``, and the
SI error was 38 % larger. Choosing each axis's form on its own held-out error minimises each
term of the 3-D error, hence the 3-D error too. ``kind`` reports the form of the principal axis
(the one the surrogate moves most: the largest slope), ``kinds`` every axis's.

Refits
------
A valid model is refitted when a point arrives at least ``min_refit_interval_s`` (0.5 s)
after the last refit: at every image when imaging every 1-3 s, at every third image at 5 Hz.
Every point is still checked and scored when it arrives and joins the next refit; points a
fifth of a second apart add little to a fit over a breath, and at 5 Hz imaging the refit
would otherwise cost more than all the per-sample work of a replay.

Model points, check and recovery (what a physicist can predict)
---------------------------------------------------------------
- At most ``max_points`` points (40); adding one more drops the oldest. Synchrony keeps 15
  because its model has no drift term, so an old point carries an old baseline. Here the
  offset state already discounts old points for the baseline (see "Offset") while they still
  inform the shape (slope, curvature, loop): a longer window averages the X-ray localisation
  noise and covers more of the breathing range (fewer extrapolations, and no gap in the range
  when the imaging period aliases with the breathing period), without slowing the response to
  a drift. On the LARK liver traces (2 s imaging, 0.3 mm noise) the SI error fell steadily from
  15 to 40 points and little beyond; 40 points are 80 s at 2 s imaging, so a slow change of
  the shape is still followed within minutes (a fast one is caught by the check below).
- A point with a non-finite time, feature or position, or a time not after the previous point,
  is rejected with a reason and never reaches the fit; the model state is unchanged.
- While the model is valid, each new point is first compared with the current model's estimate
  (offset included); the residual (3-D distance) is returned. Above ``check_threshold_mm``
  (5 mm) the model becomes INVALID (an interlock for the gate); the reason gives the residual,
  the threshold and the time. The suspect point is not accepted into the old model; all old
  points are dropped (the old model evidently no longer describes the patient) and the suspect
  point is kept as the first point of the rebuild. 5 mm is the top of KIM's 3-5 mm liver range:
  with a ~1 mm held-out RMS, the largest correlation errors on the LARK liver traces were
  2.6-4.2 mm apart from one 10 mm trace discontinuity, so 5 mm does not interrupt ordinary
  breathing while it catches a shift or a bad image.
- Building (at start) and rebuilding (after an invalidation) follow one rule: the newest
  ``min_points`` (4) points are kept, or as many more (up to ``max_points``) as it takes to
  cover ``min_build_span_s`` (2.5 s, most of a breath: at 5 Hz imaging four points cover 0.6
  s of one inhale, and a line through them extrapolated over the whole breath was 5.8 mm off
  at the next image); the model becomes VALID at the first image at which these points
  cover that time (or are ``max_points``) and are mutually consistent: a linear fit to them
  predicts each one, left out, within ``check_threshold_mm``; or, spanning less than
  ``min_span_mm`` of surrogate, they held still (a static model, above). Otherwise the oldest is
  dropped and the next image is awaited. So (imaging every 0.85 s or slower) after a real
  shift of the target the model is valid again at the ``min_points``-th image (the suspect
  one included); after a single bad image, at the ``min_points``-th good image after it.
- ``state`` is a stable code for the gate and the log: "collecting" (first build, or after
  ``reset()``, which forgets every point: a new session or an explicit re-baseline),
  "rebuilding" (after an invalidation) or "valid"; ``reasons`` gives the words.
- ``predict()`` returns (nan, nan, nan) whenever the model is not valid (never a stale model's
  estimate): NaN fails every window comparison, so a caller that forgets to check ``valid``
  still holds the beam. ``uncertainty_mm`` is then ``inf`` and ``kind`` is "".

Uncertainty
-----------
``uncertainty_mm`` is the RMS 3-D error of ``predict()`` from held-out errors: the discounted RMS
of the selected models' forward errors at the images (each axis's own model's). These are
errors one imaging interval after a fit (the worst point of the interval) against measured
positions (imaging noise included), so the figure is slightly conservative. Before
``min_held_out`` forward errors exist it is the leave-one-out RMS of the current points (an
interpolation error, hence optimistic), and never less than the forward errors seen so far.

What it does not model
----------------------
Rotations of the target; more than one surrogate channel; deformation; a time-out when images
stop coming (the estimator, which owns the clock, must hold when the newest image is too old);
surrogate dropouts (the history does not know that a gap occurred: clear it after a gap);
imaging latency (``add_point`` takes the mid-exposure time with features from ``features_at``);
prediction of the surrogate ahead of time (the predictor's job; ``features_ahead`` takes its
output).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np

__all__ = [
    "MODEL_KINDS",
    "CorrelationModel",
    "CorrelationParams",
    "ModelFeatures",
    "PointResult",
    "SurrogateHistory",
    "evaluate_correlation",
]

# In order of complexity: the simplest enabled kind is the default (see "Selection").
MODEL_KINDS = ("linear", "quadratic", "dual", "augmented")
_N_PARAMS = {"linear": 2, "quadratic": 3, "dual": 3, "augmented": 3}
# Not a candidate: the form every axis takes while the points span less than min_span_mm of
# surrogate (a breath hold), where no slope can be determined (see "Static model").
STATIC = "static"
# A 3-parameter model is fitted only with at least 3 residual degrees of freedom.
_SPARE_DOF = 3
_NAN3 = (math.nan, math.nan, math.nan)
# Ridge on the standardised slope terms, relative to the normal-matrix scale: numerical only
# (keeps a breath-hold, where the surrogate hardly moves, from an ill-conditioned solve).
_RIDGE = 1e-10
_TIME_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# Surrogate history and features
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelFeatures:
    """What the models see of the surrogate at one instant."""

    s: float  # surrogate amplitude, mm (causally smoothed over smoothing_window_s)
    s_dot: float  # causal velocity, mm/s (least-squares slope over velocity_window_s)
    t: float = math.nan  # time of the (possibly interpolated or hypothetical) sample, s


def _fit(m: int, st: float, sv: float, stt: float, sts: float) -> tuple[float, float]:
    """(value at dt = 0, slope) of the least-squares line through m points with these sums
    (of dt, s, dt^2, dt s); slope 0.0 with fewer than 2 distinct times."""
    if m < 2:
        return sv, 0.0
    den = stt - st * st / m
    slope = (sts - st * sv / m) / den if den > 0.0 else 0.0
    return sv / m - slope * st / m, slope


class SurrogateHistory:
    """Ring buffer of recent (t, s) surrogate samples (preallocated; a few seconds).

    Holds at least ``span_s`` seconds at rates up to ``max_rate_hz`` (more at lower rates).
    ``append`` raises ValueError for a non-finite sample or a time not after the newest one:
    the caller decides what a bad sample means (it is a device fault, not a model question).
    The velocity is the slope over the last ``velocity_window_s`` (0.0 with a single sample);
    the value is smoothed over the last ``smoothing_window_s`` (0 = raw samples). Build it with
    ``for_params`` so that it uses the model's windows. ``features*`` raise ValueError on an
    empty history or a time outside it.
    """

    _RESUM_EVERY = 32  # appends between exact recomputations of the running window sums

    def __init__(
        self,
        span_s: float = 4.0,
        max_rate_hz: float = 60.0,
        velocity_window_s: float = 0.4,
        smoothing_window_s: float = 0.2,
    ):
        if not (span_s > 0 and max_rate_hz > 0 and math.isfinite(span_s * max_rate_hz)):
            raise ValueError(f"span_s and max_rate_hz must be > 0, got {span_s}, {max_rate_hz}")
        if not (0 < velocity_window_s < span_s):
            raise ValueError(f"velocity_window_s must be in (0, span_s), got {velocity_window_s}")
        self._cap = int(math.ceil(span_s * max_rate_hz)) + 2
        self._t = [0.0] * self._cap
        self._s = [0.0] * self._cap
        self._n = 0
        self._head = -1  # index of the newest sample
        self.velocity_window_s = float(velocity_window_s)
        if not (0 <= smoothing_window_s < span_s):
            raise ValueError(f"smoothing_window_s must be in [0, span_s), got {smoothing_window_s}")
        self.smoothing_window_s = float(smoothing_window_s)
        self._lo_v = -self.velocity_window_s - _TIME_EPS
        self._lo_s = -self.smoothing_window_s - _TIME_EPS
        self._reset_windows()

    def _reset_windows(self) -> None:
        # Running sums (count, sum dt, sum s, sum dt^2, sum dt s; dt relative to the newest
        # sample) of the velocity (v) and smoothing (w) windows ending at the newest sample,
        # and how many of the newest samples each holds: ``features()`` is O(1) per sample.
        # Recomputed exactly every _RESUM_EVERY appends (and when a window is down to the
        # newest sample), so rounding cannot accumulate.
        # (values relative to _s_ref, the newest sample at the last recomputation, so that a
        # large offset costs no precision)
        self._s_ref = 0.0
        self._vsum = (0, 0.0, 0.0, 0.0, 0.0)
        self._wsum = (0, 0.0, 0.0, 0.0, 0.0)
        self._vn = 0
        self._wn = 0
        self._since_resum = 0

    @classmethod
    def for_params(
        cls, params: CorrelationParams, span_s: float = 4.0, max_rate_hz: float = 60.0
    ) -> SurrogateHistory:
        """A history computing the features the way ``params`` says."""
        return cls(span_s, max_rate_hz, params.velocity_window_s, params.smoothing_window_s)

    def __len__(self) -> int:
        return self._n

    @property
    def t_newest(self) -> float:
        """Time of the newest sample held (nan when empty)."""
        return self._t[self._head] if self._n else math.nan

    def clear(self) -> None:
        self._n = 0
        self._head = -1
        self._reset_windows()

    def append(self, t: float, s: float) -> None:
        if not (math.isfinite(t) and math.isfinite(s)):
            raise ValueError(f"surrogate sample not finite: t={t!r}, s={s!r}")
        if self._n and t <= self._t[self._head]:
            raise ValueError(
                f"surrogate sample time {t!r} s is not after the newest {self._t[self._head]!r} s"
            )
        t = float(t)
        s = float(s)
        if self._n == self._cap and max(self._vn, self._wn) >= self._cap:
            # a window holds the sample about to be overwritten (an extreme rate)
            self._since_resum = self._RESUM_EVERY
        if self._n:
            d = t - self._t[self._head]  # shift the sums' origin to the new sample
            x = s - self._s_ref
            m, st, sv, stt, sts = self._vsum
            self._vsum = (m + 1, st - m * d, sv + x, stt - d * (2.0 * st - m * d), sts - d * sv)
            m, st, sv, stt, sts = self._wsum
            self._wsum = (m + 1, st - m * d, sv + x, stt - d * (2.0 * st - m * d), sts - d * sv)
        self._head = (self._head + 1) % self._cap
        self._t[self._head] = t
        self._s[self._head] = s
        if self._n < self._cap:
            self._n += 1
        self._since_resum += 1
        if self._since_resum >= self._RESUM_EVERY:
            self._resum()
            return
        self._vn += 1
        self._wn += 1
        self._vsum, self._vn = self._trim(self._vsum, self._vn, self._lo_v, t, s)
        self._wsum, self._wn = self._trim(self._wsum, self._wn, self._lo_s, t, s)

    def _trim(
        self, sums: tuple, count: int, lo: float, t_end: float, s_end: float
    ) -> tuple[tuple, int]:
        """Drop the window's oldest samples while they are older than ``lo`` (and beyond
        the samples held)."""
        ts, ss, cap, head, ref = self._t, self._s, self._cap, self._head, self._s_ref
        m, st, sv, stt, sts = sums
        while count > 1:
            i = (head - count + 1) % cap
            dt = ts[i] - t_end
            if dt >= lo and count <= self._n:
                break
            x = ss[i] - ref
            m, st, sv, stt, sts = m - 1, st - dt, sv - x, stt - dt * dt, sts - dt * x
            count -= 1
        if count == 1:
            return (1, 0.0, s_end - ref, 0.0, 0.0), 1
        return (m, st, sv, stt, sts), count

    def _resum(self) -> None:
        """Both windows' sums afresh from the samples (as ``_features_of(0)`` scans them)."""
        self._since_resum = 0
        ts, ss, cap, n, head = self._t, self._s, self._cap, self._n, self._head
        t_end = ts[head]
        ref = self._s_ref = ss[head]
        for lo, name in ((self._lo_v, "v"), (self._lo_s, "w")):
            m, st, sv, stt, sts = 1, 0.0, 0.0, 0.0, 0.0
            j = 1
            while j < n:
                i = (head - j) % cap
                dt = ts[i] - t_end
                if dt < lo:
                    break
                x = ss[i] - ref
                m, st, sv, stt, sts = m + 1, st + dt, sv + x, stt + dt * dt, sts + dt * x
                j += 1
            if name == "v":
                self._vsum, self._vn = (m, st, sv, stt, sts), j
            else:
                self._wsum, self._wn = (m, st, sv, stt, sts), j

    # index k = 0 is the newest sample, k = n - 1 the oldest
    def _idx(self, k: int) -> int:
        return (self._head - k) % self._cap

    def _line_ending_at(
        self, k: int, window: float, extra: tuple[float, float] | None = None
    ) -> tuple[float, float]:
        """(value, slope) of the least-squares line through the samples of the window ending
        at sample k (or at the hypothetical sample ``extra``), the value at the window's end.
        Sums are of times relative to the end, accumulated in one pass."""
        ts, ss, cap, n, head = self._t, self._s, self._cap, self._n, self._head
        if extra is not None:
            t_end, s_end = extra
            j = k
        else:
            i = (head - k) % cap
            t_end, s_end = ts[i], ss[i]
            j = k + 1
        m, st, sv, stt, sts = 1, 0.0, s_end, 0.0, 0.0
        lo = -window - _TIME_EPS
        while j < n:
            i = (head - j) % cap
            dt = ts[i] - t_end
            if dt < lo:
                break
            x = ss[i]
            m, st, sv, stt, sts = m + 1, st + dt, sv + x, stt + dt * dt, sts + dt * x
            j += 1
        # Sparse samples (a slow device, or a horizon longer than the window): use the nearest
        # older sample so that the velocity is still a causal difference.
        if m < 2 and j < n:
            i = (head - j) % cap
            dt, x = ts[i] - t_end, ss[i]
            m, st, sv, stt, sts = m + 1, st + dt, sv + x, stt + dt * dt, sts + dt * x
        return _fit(m, st, sv, stt, sts)

    def _require(self) -> None:
        if self._n == 0:
            raise ValueError("surrogate history is empty")

    def features(self) -> ModelFeatures:
        """Features at the newest sample."""
        self._require()
        # the running sums of append(): equal to _features_of(0) up to rounding
        head = self._head
        t_end = self._t[head]
        vm, vt, vs, vtt, vts = self._vsum
        if vm < 2 and self._vn < self._n:  # sparse samples: the nearest older sample
            i = (head - self._vn) % self._cap
            dt, x = self._t[i] - t_end, self._s[i] - self._s_ref
            vm, vt, vs, vtt, vts = 2, vt + dt, vs + x, vtt + dt * dt, vts + dt * x
        slope = _fit(vm, vt, vs, vtt, vts)[1]
        if self.smoothing_window_s > 0:
            wm, wt, ws, wtt, wts = self._wsum
            if wm < 2 and self._wn < self._n:
                i = (head - self._wn) % self._cap
                dt, x = self._t[i] - t_end, self._s[i] - self._s_ref
                wm, wt, ws, wtt, wts = 2, wt + dt, ws + x, wtt + dt * dt, wts + dt * x
            value = self._s_ref + _fit(wm, wt, ws, wtt, wts)[0]
        else:
            value = self._s[head]
        return ModelFeatures(value, slope, t_end)

    def _features_of(self, k: int) -> ModelFeatures:
        """The velocity line and the smoothing line ending at sample k, in one pass over the
        samples (the sums and the sparse-sample rule of ``_line_ending_at``, inlined).
        ``features()`` gets the same lines (up to rounding) from the running sums that
        ``append`` keeps; this scan serves ``features_at`` and the exact recomputations."""
        ts, ss, cap, n, head = self._t, self._s, self._cap, self._n, self._head
        i = (head - k) % cap
        t_end = ts[i]
        s_end = ss[i]
        lo_v = -self.velocity_window_s - _TIME_EPS
        lo_s = -self.smoothing_window_s - _TIME_EPS
        lo = min(lo_v, lo_s)
        # count, sum dt, sum s, sum dt^2, sum dt s: velocity window (v) and smoothing (w)
        vm, vt, vs, vtt, vts = 1, 0.0, s_end, 0.0, 0.0
        wm, wt, ws, wtt, wts = 1, 0.0, s_end, 0.0, 0.0
        beyond_v = beyond_s = None  # the first sample older than each window
        j = k + 1
        while j < n:
            i = (head - j) % cap
            dt = ts[i] - t_end
            x = ss[i]
            if dt >= lo_v:
                vm += 1
                vt += dt
                vs += x
                vtt += dt * dt
                vts += dt * x
            elif beyond_v is None:
                beyond_v = (dt, x)
            if dt >= lo_s:
                wm += 1
                wt += dt
                ws += x
                wtt += dt * dt
                wts += dt * x
            elif beyond_s is None:
                beyond_s = (dt, x)
            if dt < lo:
                break
            j += 1
        # Sparse samples: the nearest older sample keeps the velocity a causal difference.
        if vm < 2 and beyond_v is not None:
            dt, x = beyond_v
            vm, vt, vs, vtt, vts = 2, vt + dt, vs + x, vtt + dt * dt, vts + dt * x
        slope = _fit(vm, vt, vs, vtt, vts)[1]
        if self.smoothing_window_s > 0:
            if wm < 2 and beyond_s is not None:
                dt, x = beyond_s
                wm, wt, ws, wtt, wts = 2, wt + dt, ws + x, wtt + dt * dt, wts + dt * x
            value = _fit(wm, wt, ws, wtt, wts)[0]
        else:
            value = s_end
        return ModelFeatures(value, slope, t_end)

    def features_at(self, t: float) -> ModelFeatures:
        """Features at an earlier time inside the buffer, interpolated between the features at
        the two samples that bracket ``t`` (exact at a sample time)."""
        self._require()
        if not math.isfinite(t):
            raise ValueError(f"time not finite: {t!r}")
        t_new = self._t[self._head]
        t_old = self._t[self._idx(self._n - 1)]
        if t > t_new + _TIME_EPS:
            raise ValueError(
                f"time {t:.3f} s is after the newest surrogate sample ({t_new:.3f} s): "
                "wait for the next sample (the model must never use future data)"
            )
        if t < t_old - _TIME_EPS:
            raise ValueError(
                f"time {t:.3f} s is before the oldest surrogate sample held ({t_old:.3f} s)"
            )
        k = 0
        while k < self._n - 1 and self._t[self._idx(k)] > t + _TIME_EPS:
            k += 1
        f1 = self._features_of(k)
        if k == 0 or abs(f1.t - t) <= _TIME_EPS:
            return ModelFeatures(f1.s, f1.s_dot, t)
        f2 = self._features_of(k - 1)  # the sample after t
        a = (t - f1.t) / (f2.t - f1.t)
        return ModelFeatures(f1.s + a * (f2.s - f1.s), f1.s_dot + a * (f2.s_dot - f1.s_dot), t)

    def features_ahead(self, s_pred: float, horizon_s: float) -> ModelFeatures:
        """Features of a hypothetical sample ``s_pred`` at newest time + ``horizon_s`` (the
        predictor's output); the velocity uses the history before it. ``horizon_s = 0`` with
        ``features().s`` gives ``features()``."""
        self._require()
        if not (math.isfinite(s_pred) and math.isfinite(horizon_s) and horizon_s >= 0):
            raise ValueError(f"need finite s_pred and horizon_s >= 0: {s_pred!r}, {horizon_s!r}")
        t_h = self._t[self._head] + horizon_s
        # the hypothetical sample replaces any sample at its own time (horizon 0)
        k = 0
        while k < self._n and self._t[self._idx(k)] >= t_h - _TIME_EPS:
            k += 1
        v = self._line_ending_at(k, self.velocity_window_s, extra=(t_h, s_pred))[1]
        return ModelFeatures(s_pred, v, t_h)


# --------------------------------------------------------------------------------------------
# Parameters and results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorrelationParams:
    """Correlation-model settings (field names are the keys of a ``[correlation]`` table)."""

    max_points: int = 40  # model points kept (oldest dropped); see "Model points"
    min_points: int = 4  # consistent points needed to (re)build a valid model
    check_threshold_mm: float = 5.0  # a new point further than this from the model: INVALID
    models: tuple[str, ...] = MODEL_KINDS  # candidates; the simplest enabled is the default
    offset_drift_time_s: float = 10.0  # random-walk offset: drift variance = scatter after this
    selection_margin: float = 0.1  # a 3-parameter model must beat linear's RMS by this fraction
    selection_min_gain_mm: float = 0.05  # ... and by at least this much (clinically relevant)
    selection_memory: float = 20.0  # images: memory of the discounted held-out error
    min_held_out: int = 5  # held-out errors before a non-default model may be chosen
    dual_ramp_fraction: float = 0.25  # dual: |v| below this x max |v| of the points ramps h
    velocity_window_s: float = 0.4  # causal velocity window (pass to SurrogateHistory)
    smoothing_window_s: float = 0.2  # causal surrogate smoothing window (pass to it too)
    min_span_mm: float = 0.5  # a slope needs this much surrogate; below, a static model
    static_tolerance_mm: float = 2.0  # ... built only if every point is this near the others
    min_build_span_s: float = 2.5  # ... and this much time (most of a breath), max_points allowing
    max_extrapolation: float = 1.0  # a model speaks for its points' range +- this x range
    min_refit_interval_s: float = 0.5  # a valid model is refitted at most this often

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.min_points, int) and self.min_points >= 3):
            problems.append(f"min_points = {self.min_points!r}: expected an integer >= 3")
        if not (isinstance(self.max_points, int) and self.max_points >= max(self.min_points, 3)):
            problems.append(f"max_points = {self.max_points!r}: expected an integer >= min_points")
        if not (self.check_threshold_mm > 0 and math.isfinite(self.check_threshold_mm)):
            problems.append(f"check_threshold_mm = {self.check_threshold_mm!r}: expected > 0 mm")
        models = tuple(self.models)
        if (
            not models
            or any(m not in MODEL_KINDS for m in models)
            or len(set(models)) < len(models)
        ):
            problems.append(f"models = {self.models!r}: expected distinct names from {MODEL_KINDS}")
        if not (self.offset_drift_time_s > 0):
            problems.append(
                f"offset_drift_time_s = {self.offset_drift_time_s!r}: expected > 0 s (inf = off)"
            )
        if not (0 <= self.selection_min_gain_mm < math.inf):
            problems.append(
                f"selection_min_gain_mm = {self.selection_min_gain_mm!r}: expected >= 0 mm"
            )
        if not (0 <= self.selection_margin < 1):
            problems.append(f"selection_margin = {self.selection_margin!r}: expected in [0, 1)")
        if not (self.selection_memory >= 1 and math.isfinite(self.selection_memory)):
            problems.append(f"selection_memory = {self.selection_memory!r}: expected >= 1")
        if not (isinstance(self.min_held_out, int) and self.min_held_out >= 1):
            problems.append(f"min_held_out = {self.min_held_out!r}: expected an integer >= 1")
        if not (0 < self.dual_ramp_fraction <= 1):
            problems.append(f"dual_ramp_fraction = {self.dual_ramp_fraction!r}: expected in (0, 1]")
        if not (0 <= self.smoothing_window_s <= 2):
            problems.append(
                f"smoothing_window_s = {self.smoothing_window_s!r}: expected [0, 2] s (0 = raw)"
            )
        if not (0 < self.velocity_window_s <= 2):
            problems.append(f"velocity_window_s = {self.velocity_window_s!r}: expected (0, 2] s")
        if not (0 <= self.min_build_span_s < math.inf):
            problems.append(f"min_build_span_s = {self.min_build_span_s!r}: expected >= 0 s")
        if not (0 <= self.min_span_mm < math.inf):
            problems.append(f"min_span_mm = {self.min_span_mm!r}: expected >= 0 mm")
        if not (0 < self.static_tolerance_mm < math.inf):
            problems.append(f"static_tolerance_mm = {self.static_tolerance_mm!r}: expected > 0 mm")
        if not (0 <= self.max_extrapolation < math.inf):
            problems.append(f"max_extrapolation = {self.max_extrapolation!r}: expected >= 0")
        if not (0 <= self.min_refit_interval_s < math.inf):
            problems.append(
                f"min_refit_interval_s = {self.min_refit_interval_s!r}: expected >= 0 s"
            )
        if problems:
            raise ValueError("invalid CorrelationParams: " + "; ".join(problems))
        # canonical order (simplest first), so that the default does not depend on the order
        object.__setattr__(self, "models", tuple(k for k in MODEL_KINDS if k in models))

    @classmethod
    def from_mapping(cls, mapping: dict) -> CorrelationParams:
        """Build from a ``[correlation]`` config table (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown [correlation] keys: {unknown}; known: {sorted(known)}")
        kwargs = dict(mapping)
        if "models" in kwargs:
            kwargs["models"] = tuple(kwargs["models"])
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class PointResult:
    """What ``add_point`` did with a point.

    ``accepted`` is False for a rejected point (bad input) and for the point that invalidated
    the model (it is kept only as the first point of the rebuild); points added while building
    are accepted (there is no model to check them against yet).
    """

    residual_mm: float | None  # 3-D distance model -> measured point before adding it
    accepted: bool  # passed every check that applies and joined the model's points
    model_valid: bool  # model validity after this point
    reason: str | None  # why rejected / why the model is invalid (None when valid)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------
class _Fit:
    """One fitted model (all three axes), stored as plain floats for a cheap predict().

    Each axis has its own form (``kinds``, see "Selection"); a candidate fit has the same form
    on all three. Coefficients are per axis over the columns of ``_full_design`` (1, z, q, h,
    v), zero where the form does not use a column. ``kind`` names the form of the principal
    axis, the one the surrogate moves most (largest slope): the form that carries the
    estimate."""

    __slots__ = (
        "kind",
        "kinds",
        "sc",
        "inv_ss",
        "zlo",
        "zhi",
        "zmin",
        "zmax",
        "zout_lo",
        "zout_hi",
        "vlo",
        "vhi",
        "inv_v_dual",
        "inv_v_aug",
        "use_q",
        "use_h",
        "use_v",
        "coef",
    )

    def __init__(self, kinds, geom, coef):
        sc, inv_ss, zlo, zhi, extrap, min_span_z, vlo, vhi, inv_v_dual, inv_v_aug = geom
        self.kinds = tuple(kinds)
        self.sc, self.inv_ss, self.zlo, self.zhi = sc, inv_ss, zlo, zhi
        # never extrapolate further than extrap x the points' own span beyond them
        self.zmin = zlo - extrap * (zhi - zlo)
        self.zmax = zhi + extrap * (zhi - zlo)
        # and say nothing beyond that (or beyond min_span_mm of a static model's points)
        beyond = max(extrap * (zhi - zlo), min_span_z)
        self.zout_lo, self.zout_hi = zlo - beyond, zhi + beyond
        self.vlo, self.vhi = vlo, vhi
        self.inv_v_dual, self.inv_v_aug = inv_v_dual, inv_v_aug
        self.coef = coef  # per axis (LR, SI, AP): coefficients of (1, z, q, h, v)
        cols = {c for k in self.kinds for c in _COLUMNS[k]}
        self.use_q, self.use_h, self.use_v = 2 in cols, 3 in cols, 4 in cols
        principal = max(range(3), key=lambda ax: abs(coef[ax][1]))
        self.kind = self.kinds[principal]

    def predict(self, s: float, v: float, beyond: bool = False) -> tuple[float, float, float]:
        """The position at surrogate ``s``, velocity ``v``; (nan, nan, nan) for a surrogate
        beyond the model's range, unless ``beyond`` (the clamped value: for checking a
        point, which may be a real shift, against the model)."""
        z = (s - self.sc) * self.inv_ss
        if not beyond and (z < self.zout_lo or z > self.zout_hi):
            return _NAN3
        z = self.zmin if z < self.zmin else (self.zmax if z > self.zmax else z)
        q = h = g = 0.0
        if self.use_q:  # curvature inside the fitted range, tangent beyond
            zc = self.zlo if z < self.zlo else (self.zhi if z > self.zhi else z)
            q = zc * (2.0 * z - zc)
        if self.use_h:  # branch: -1 falling ... +1 rising, ramped near the turning points
            h = v * self.inv_v_dual
            h = -1.0 if h < -1.0 else (1.0 if h > 1.0 else h)
        if self.use_v:  # velocity, clipped to the points' range
            g = (self.vlo if v < self.vlo else (self.vhi if v > self.vhi else v)) * self.inv_v_aug
        (a0, b0, q0, h0, v0), (a1, b1, q1, h1, v1), (a2, b2, q2, h2, v2) = self.coef
        return (
            a0 + b0 * z + q0 * q + h0 * h + v0 * g,
            a1 + b1 * z + q1 * q + h1 * h + v1 * g,
            a2 + b2 * z + q2 * q + h2 * h + v2 * g,
        )


# Columns of ``_full_design`` each model uses: intercept, z, then its own terms.
_COLUMNS = {
    STATIC: [0],
    "linear": [0, 1],
    "quadratic": [0, 1, 2],
    "dual": [0, 1, 3],
    "augmented": [0, 1, 4],
}
_N_COLUMNS = 5


def _full_design(z: np.ndarray, v: np.ndarray, inv_v_dual: float, inv_v_aug: float) -> np.ndarray:
    """(1, z, z^2, dual branch, scaled velocity): every model's design is a column subset."""
    F = np.empty((len(z), _N_COLUMNS))
    F[:, 0] = 1.0
    F[:, 1] = z
    np.multiply(z, z, out=F[:, 2])  # inside the range by construction
    np.clip(v * inv_v_dual, -1.0, 1.0, out=F[:, 3])
    np.multiply(v, inv_v_aug, out=F[:, 4])
    return F


def _ridge(mean_diagonal: float) -> float:
    """The numerical ridge for a normal matrix with this mean diagonal (see ``_RIDGE``)."""
    return _RIDGE * max(mean_diagonal, 1e-12)


def _solve_small(G: list[list[float]], B: list[list[float]]) -> list[list[float]]:
    """Solve G X = B for a small symmetric positive definite G (2 x 2 or 3 x 3, lists of
    floats) by Gaussian elimination in plain floats: numpy's per-call overhead is ten times
    the arithmetic at this size, and the correlation refit runs at every image."""
    n = len(G)
    A = [list(G[i]) + list(B[i]) for i in range(n)]
    m = len(A[0])
    for k in range(n):
        pivot = A[k][k]
        if not pivot > 0.0:  # a singular normal matrix: the ridge keeps this from happening
            raise np.linalg.LinAlgError("singular normal matrix in the correlation fit")
        inv = 1.0 / pivot
        row_k = A[k]
        for i in range(k + 1, n):
            f = A[i][k] * inv
            if f:
                row_i = A[i]
                for j in range(k, m):
                    row_i[j] -= f * row_k[j]
    X = [[0.0] * (m - n) for _ in range(n)]
    for i in range(n - 1, -1, -1):
        row = A[i]
        for c in range(m - n):
            acc = row[n + c]
            for j in range(i + 1, n):
                acc -= row[j] * X[j][c]
            X[i][c] = acc / row[i]
    return X


def _gls(A: np.ndarray, Ci: np.ndarray, Y: np.ndarray):
    """Generalised least squares with point precision Ci (C inverse).

    Returns (coefficients p x 3, inverse normal matrix, Ci A) -- the last two for the
    leave-one-out residuals."""
    p = A.shape[1]
    CiA = Ci @ A
    G = A.T @ CiA
    G[1:, 1:] += _ridge(float(np.trace(G)) / p) * np.eye(p - 1)  # intercept never shrunk
    Gi = np.linalg.inv(G)
    return Gi @ (CiA.T @ Y), Gi, CiA


def _loo_rms(A, Ci, Y) -> float:
    """RMS 3-D leave-one-out error of the GLS fit of design ``A``."""
    coef, Gi, CiA = _gls(A, Ci, Y)
    loo = _loo_residuals(A, Ci, Y, coef, Gi, CiA)
    return float(np.sqrt(np.mean(np.sum(loo * loo, axis=1))))


def _loo_residuals(A, Ci, Y, coef, Gi, CiA) -> np.ndarray:
    """Leave-one-out residuals of a GLS fit (n x 3), exact for known C (Dubrule 1983)."""
    Q = Ci - CiA @ Gi @ CiA.T
    r = Y - A @ coef
    return (Ci @ r - CiA @ (Gi @ (CiA.T @ r))) / np.diag(Q)[:, None]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class CorrelationModel:
    """Surrogate -> internal position model with point management, check and recovery.

    See the module docstring for the models, the selection, the offset state and the
    invalid/recovery rule.
    """

    def __init__(self, params: CorrelationParams | None = None):
        self.params = params if params is not None else CorrelationParams()
        self._default_kind = self.params.models[0]
        self._lambda = (
            0.0
            if math.isinf(self.params.offset_drift_time_s)
            else (1.0 / self.params.offset_drift_time_s)
        )
        self._gamma = 1.0 - 1.0 / self.params.selection_memory
        self.reset()

    def reset(self) -> None:
        """Forget every point (a new session, or an explicit re-baseline): state "collecting"."""
        self._reset(reason=f"collecting model points: 0 of {self.params.min_points}")
        self._state = "collecting"

    # ---- state -----------------------------------------------------------------------------
    def _reset(self, reason: str) -> None:
        self._t: list[float] = []
        self._s: list[float] = []
        self._v: list[float] = []
        self._y: list[tuple[float, float, float]] = []
        self._valid = False
        self._reasons: tuple[str, ...] = (reason,)
        self._fits: dict[str, _Fit] = {}
        self._sel: _Fit | None = None  # the fit predict() uses (None while invalid)
        # discounted squared held-out errors per candidate, per axis (LR, SI, AP)
        self._score = {k: [0.0, 0.0, 0.0] for k in self.params.models}
        self._score_w = 0.0
        self._n_scored = 0
        self._loo_rms = math.inf
        self._offset = (0.0, 0.0, 0.0)
        self._t_refit = -math.inf

    @property
    def valid(self) -> bool:
        return self._valid

    @property
    def state(self) -> str:
        """A stable code: "collecting" (first build), "rebuilding" (after an invalidation,
        until valid again) or "valid"; ``reasons`` says more."""
        return "valid" if self._valid else self._state

    @property
    def reasons(self) -> tuple[str, ...]:
        return self._reasons

    @property
    def kind(self) -> str:
        """The selected form of the principal axis, the one the surrogate moves most
        ("" while not valid); ``kinds`` gives every axis's."""
        return self._sel.kind if (self._valid and self._sel is not None) else ""

    @property
    def kinds(self) -> tuple[str, str, str]:
        """The selected form per axis (LR, SI, AP); ("", "", "") while not valid."""
        return self._sel.kinds if (self._valid and self._sel is not None) else ("", "", "")

    @property
    def n_points(self) -> int:
        return len(self._t)

    @property
    def point_times(self) -> tuple[float, ...]:
        """Times of the model points held, oldest first."""
        return tuple(self._t)

    @property
    def offset_mm(self) -> tuple[float, float, float]:
        """Baseline at the newest image minus its average over the model points (per axis)."""
        return self._offset

    @property
    def held_out_rms_mm(self) -> dict[str, float]:
        """Discounted held-out (forward) RMS 3-D error per candidate (nan before scoring)."""
        if self._score_w <= 0:
            return dict.fromkeys(self._score, math.nan)
        return {k: math.sqrt(sum(v) / self._score_w) for k, v in self._score.items()}

    @property
    def uncertainty_mm(self) -> float:
        """RMS 3-D error of predict() from held-out residuals (inf while not valid)."""
        if not self._valid or self._sel is None:
            return math.inf
        if self._sel.kind == STATIC:  # no forms to choose between, no held-out scores
            return self._loo_rms
        # the selected form's held-out squared errors, axis by axis
        e2 = sum(self._score[k][ax] for ax, k in enumerate(self._sel.kinds))
        if self._n_scored >= self.params.min_held_out:
            return math.sqrt(e2 / self._score_w)
        fwd = math.sqrt(e2 / self._score_w) if self._score_w else 0.0
        return max(self._loo_rms, fwd)

    # ---- prediction ------------------------------------------------------------------------
    def predict(self, features: ModelFeatures) -> tuple[float, float, float]:
        """Internal (LR, SI, AP) mm at the features; (nan, nan, nan) while not valid, and for
        a surrogate beyond the model's range (see "Range")."""
        fit = self._sel
        if fit is None or not self._valid:
            return _NAN3
        s = features.s
        v = features.s_dot
        if not (math.isfinite(s) and math.isfinite(v)):
            return _NAN3
        return fit.predict(s, v)

    def positions_over_range(self, n: int = 25) -> list[tuple[float, float, float]]:
        """Every position the model can give, sampled: the surrogate over its clamp range,
        the velocity at its extremes and zero (the loop's two branches and its middle).
        Empty while not valid. For checking an image whose time cannot be matched."""
        fit = self._sel
        if fit is None or not self._valid:
            return []
        out = []
        for i in range(n):
            z = fit.zmin + (fit.zmax - fit.zmin) * i / (n - 1)
            s = fit.sc + z / fit.inv_ss
            for v in (fit.vlo, 0.0, fit.vhi):  # clamped: z may round just beyond the range
                out.append(fit.predict(s, v, beyond=True))
        return out

    # ---- points ----------------------------------------------------------------------------
    def add_point(
        self, t: float, features: ModelFeatures, internal_mm: tuple[float, float, float]
    ) -> PointResult:
        """Check a new model point against the model, then add it and refit (see the module
        docstring for the rule)."""
        p = self.params
        bad = self._check_input(t, features, internal_mm)
        if bad is not None:
            return PointResult(None, False, self._valid, bad)
        y = (float(internal_mm[0]), float(internal_mm[1]), float(internal_mm[2]))
        s, v = float(features.s), float(features.s_dot)

        # Held-out errors of every candidate for this point, before it is added.
        residual = None
        if self._fits:
            errs = {}
            for kind, fit in self._fits.items():
                # a point beyond the range is checked against the clamped model (it may be a
                # real shift), except by a static model, which has no slope to say anything
                # there: that point is the breathing resuming after a hold
                px, py, pz = fit.predict(s, v, beyond=kind != STATIC)
                errs[kind] = ((y[0] - px) ** 2, (y[1] - py) ** 2, (y[2] - pz) ** 2)
            if self._sel is not None:
                residual = math.sqrt(sum(errs[k][ax] for ax, k in enumerate(self._sel.kinds)))
                if math.isnan(residual):
                    residual = None
        else:
            errs = {}

        if self._valid and residual is not None and residual > p.check_threshold_mm:
            reason = (
                f"model INVALID: correlation error {residual:.2f} mm > "
                f"{p.check_threshold_mm:.2f} mm at t={t:.2f} s; old points dropped, rebuilding "
                f"from this point (1 of {p.min_points} points)"
            )
            self._reset(reason)
            self._state = "rebuilding"
            self._append(t, s, v, y)
            return PointResult(residual, False, False, reason)

        # Score the candidates only on images where all of them had a fit (comparable sets).
        if self._valid and errs.keys() == self._score.keys():
            g = self._gamma
            for kind, e2 in errs.items():
                sc = self._score[kind]
                for ax in range(3):
                    sc[ax] = g * sc[ax] + e2[ax]
            self._score_w = g * self._score_w + 1.0
            self._n_scored += 1

        self._append(t, s, v, y)
        if self._valid:
            while len(self._t) > p.max_points:
                self._drop_oldest()
            if t - self._t_refit >= p.min_refit_interval_s - _TIME_EPS:
                self._refit()
            return PointResult(residual, True, True, None)

        # Building / rebuilding: keep the newest min_points, or more if that is what covers
        # min_build_span_s (fast imaging); valid once they are consistent.
        ts = self._t
        while len(ts) > p.max_points or (
            len(ts) > p.min_points and ts[-1] - ts[1] >= p.min_build_span_s - _TIME_EPS
        ):
            self._drop_oldest()
        n = len(ts)
        if n < p.min_points:
            self._reasons = (self._building_reason(f"{n} of {p.min_points} points"),)
            return PointResult(residual, True, False, self._reasons[0])
        covered = ts[-1] - ts[0]
        if covered < p.min_build_span_s - _TIME_EPS and n < p.max_points:
            self._reasons = (
                self._building_reason(
                    f"{n} points cover {covered:.1f} s of breathing (< {p.min_build_span_s:.1f} s)"
                ),
            )
            return PointResult(residual, True, False, self._reasons[0])
        span = max(self._s) - min(self._s)
        static = span < p.min_span_mm
        worst, t_worst = self._still() if static else self._consistency()
        if static and worst > p.static_tolerance_mm:
            self._reasons = (
                self._building_reason(
                    f"points span only {span:.2f} mm of surrogate (< {p.min_span_mm:.2f} mm), "
                    f"too little for a slope, and lie up to {worst:.2f} mm from the others "
                    f"(> {p.static_tolerance_mm:.2f} mm) for a static model (point at "
                    f"t={t_worst:.2f} s); the oldest is dropped at the next point"
                ),
            )
            return PointResult(residual, True, False, self._reasons[0])
        if worst > p.check_threshold_mm:
            self._reasons = (
                self._building_reason(
                    f"points not consistent: left-out error {worst:.2f} mm > "
                    f"{p.check_threshold_mm:.2f} mm (point at t={t_worst:.2f} s); "
                    "the oldest is dropped at the next point"
                ),
            )
            return PointResult(residual, True, False, self._reasons[0])
        self._valid = True
        self._reasons = ()
        self._refit()
        return PointResult(residual, True, True, None)

    def _building_reason(self, what: str) -> str:
        first = self._reasons[0] if self._reasons else ""
        if first.startswith("model INVALID"):
            head = first.split(";", 1)[0]
            return f"{head}; old points dropped, rebuilding: {what}"
        return f"collecting model points: {what}"

    def _check_input(self, t, features, internal_mm) -> str | None:
        try:
            vals = (float(t), float(features.s), float(features.s_dot))
            pos = tuple(float(x) for x in internal_mm)
        except (TypeError, ValueError, AttributeError) as exc:
            return f"point rejected: malformed input ({exc})"
        if len(pos) != 3:
            return f"point rejected: internal position needs 3 values, got {len(pos)}"
        if not all(math.isfinite(x) for x in vals):
            return f"point rejected: non-finite time or features (t={t!r}, features={features!r})"
        if not all(math.isfinite(x) for x in pos):
            return f"point rejected: non-finite internal position {internal_mm!r}"
        if self._t and vals[0] <= self._t[-1]:
            return (
                f"point rejected: time {vals[0]:.3f} s is not after the previous model point "
                f"({self._t[-1]:.3f} s)"
            )
        return None

    def _append(self, t, s, v, y) -> None:
        self._t.append(float(t))
        self._s.append(s)
        self._v.append(v)
        self._y.append(y)

    def _drop_oldest(self) -> None:
        del self._t[0], self._s[0], self._v[0], self._y[0]

    # ---- fitting ---------------------------------------------------------------------------
    def _arrays(self):
        t = np.asarray(self._t)
        s = np.asarray(self._s)
        v = np.asarray(self._v)
        Y = np.asarray(self._y)
        tau = t[-1] - t
        C = np.eye(len(t))
        if self._lambda > 0:
            C += self._lambda * np.minimum.outer(tau, tau)
        Ci = np.linalg.inv(C)
        sc = float(s.mean())
        ss = float(s.std())
        inv_ss = 1.0 / ss if ss > 1e-6 else 1.0  # a flat surrogate: slope terms ~ 0 (ridge)
        z = (s - sc) * inv_ss
        return t, z, v, Y, Ci, sc, inv_ss

    def _still(self) -> tuple[float, float]:
        """Worst 3-D distance of a point from the plain mean of the others, and its time: a
        static model is for a target that held still (no drift term: a target moving while
        the surrogate does not is not a breath hold)."""
        Y = np.asarray(self._y)
        n = len(Y)
        d = np.linalg.norm(Y - Y.mean(axis=0), axis=1) * (n / (n - 1))
        i = int(np.argmax(d))
        return float(d[i]), self._t[i]

    def _consistency(self, arrays=None) -> tuple[float, float]:
        """Worst leave-one-out 3-D error of a linear fit to the current points (``arrays``:
        their ``_arrays()``, if already at hand)."""
        t, z, _, Y, Ci, _, _ = arrays if arrays is not None else self._arrays()
        A = np.column_stack((np.ones_like(z), z))  # the building check: always linear
        coef, Gi, CiA = _gls(A, Ci, Y)
        loo = _loo_residuals(A, Ci, Y, coef, Gi, CiA)
        e = np.sqrt(np.sum(loo * loo, axis=1))
        i = int(np.argmax(e))
        return float(e[i]), float(t[i])

    def _refit(self) -> None:
        p = self.params
        self._t_refit = self._t[-1]
        arrays = self._arrays()
        t, z, v, Y, Ci, sc, inv_ss = arrays
        n = len(t)
        vmax = float(np.max(np.abs(v)))
        inv_v_dual = 1.0 / (p.dual_ramp_fraction * vmax) if vmax > 1e-9 else 0.0
        inv_v_aug = 1.0 / vmax if vmax > 1e-9 else 0.0
        geom = (
            sc,
            inv_ss,
            float(z.min()),
            float(z.max()),
            p.max_extrapolation,
            p.min_span_mm * inv_ss,
            float(v.min()),
            float(v.max()),
            inv_v_dual,
            inv_v_aug,
        )
        if max(self._s) - min(self._s) < p.min_span_mm:
            self._refit_static(t, Y, Ci, geom)
            return
        static = self._sel is not None and self._sel.kind == STATIC
        if static and self._consistency(arrays)[0] > p.check_threshold_mm:
            # Breathing again after a hold: its points joined unchecked (a static model has
            # no slope to check them by), so a slope is taken only once they agree on one,
            # as when building; until then the static model speaks for its hold alone.
            return
        # Every model's columns are a subset of (1, z, q, h, v): one design holding all of
        # them gives every model's normal equations as sub-blocks of one product (the
        # per-sample budget of replay is tight; four separate GLS fits cost 3x as much).
        F = _full_design(z, v, inv_v_dual, inv_v_aug)
        CiF = Ci @ F
        G_all = (F.T @ CiF).tolist()
        B_all = (CiF.T @ Y).tolist()
        fits: dict[str, _Fit] = {}
        for kind in p.models:
            npar = _N_PARAMS[kind]
            # the default model is always fitted (n >= min_points >= 3); the others only with
            # spare degrees of freedom
            need = min(p.min_points, n) if kind == self._default_kind else npar + _SPARE_DOF
            if n < max(need, npar):
                continue
            cols = _COLUMNS[kind]
            G = [[G_all[i][j] for j in cols] for i in cols]
            reg = _ridge(sum(G[i][i] for i in range(npar)) / npar)
            for i in range(1, npar):  # the intercept (baseline) is never shrunk
                G[i][i] += reg
            coef = _solve_small(G, [B_all[i] for i in cols])  # p rows x 3 axes
            rows = []
            for ax in range(3):
                row = [0.0] * _N_COLUMNS
                for i, c in enumerate(cols):
                    row[c] = coef[i][ax]
                rows.append(tuple(row))
            fits[kind] = _Fit((kind,) * 3, geom, tuple(rows))
        self._fits = fits
        sel = self._select()
        if sel[0] == sel[1] == sel[2]:
            self._sel = fits[sel[0]]
        else:  # each axis with its own form (see "Selection")
            self._sel = _Fit(sel, geom, tuple(fits[k].coef[ax] for ax, k in enumerate(sel)))
        self._set_offset(t, Y - F @ np.array(self._sel.coef).T, Ci)
        if self._n_scored < p.min_held_out:  # the default form on every axis (_select)
            self._loo_rms = _loo_rms(F[:, _COLUMNS[self._default_kind]], Ci, Y)

    def _refit_static(self, t, Y, Ci, geom) -> None:
        """The points span too little surrogate for a slope (a breath hold): every axis is
        the GLS mean of the points, with the same offset state (see "Static model")."""
        A = np.ones((len(t), 1))
        coef = _gls(A, Ci, Y)[0]
        fit = _Fit((STATIC,) * 3, geom, tuple((float(c), 0.0, 0.0, 0.0, 0.0) for c in coef[0]))
        self._fits = {STATIC: fit}
        self._sel = fit
        self._set_offset(t, Y - coef[0], Ci)
        self._loo_rms = _loo_rms(A, Ci, Y)

    def _set_offset(self, t, r, Ci) -> None:
        """Kriging estimate of the random-walk part at the points from the fit's residuals
        ``r``, u_i = b(t_i) - b(t_newest); the offset is minus its mean over the points."""
        if self._lambda > 0:
            tau = t[-1] - t
            u = self._lambda * np.minimum.outer(tau, tau) @ (Ci @ r)
            self._offset = tuple(float(x) for x in -u.mean(axis=0))
        else:
            self._offset = (0.0, 0.0, 0.0)

    def _select(self) -> tuple[str, str, str]:
        """The form per axis (LR, SI, AP), each chosen on that axis's held-out errors."""
        p = self.params
        default = self._default_kind
        if self._n_scored < p.min_held_out or self._score_w <= 0:
            return (default, default, default)
        out = []
        for ax in range(3):
            base = self._score[default][ax]
            best, best_score = default, base
            for kind in p.models[1:]:
                if kind in self._fits and self._score[kind][ax] < best_score:
                    best, best_score = kind, self._score[kind][ax]
            # complexity guard on the held-out RMS: clearly better, relatively and absolutely
            if best != default:
                rms_best = math.sqrt(best_score / self._score_w)
                rms_base = math.sqrt(base / self._score_w)
                if not (
                    rms_best < (1.0 - p.selection_margin) * rms_base
                    and rms_base - rms_best >= p.selection_min_gain_mm
                ):
                    best = default
            out.append(best)
        return (out[0], out[1], out[2])


# --------------------------------------------------------------------------------------------
# Evaluation by simulated imaging
# --------------------------------------------------------------------------------------------
def evaluate_correlation(
    t_int: np.ndarray,
    internal_mm: np.ndarray,
    t_sur: np.ndarray,
    surrogate_mm: np.ndarray,
    imaging_period_s: float,
    params: CorrelationParams | None = None,
    skip_s: float = 60.0,
    noise_mm: float = 0.0,
    seed: int = 0,
    image_latency_s: float = 0.0,
) -> dict:
    """Simulate imaging on a paired trace and score the model at every surrogate sample.

    Images are taken at internal sample times, the first at or after the first surrogate
    sample and each next one at the first internal sample at least ``imaging_period_s`` after
    the previous; the imaged position gets Gaussian noise ``noise_mm`` per axis. An image taken
    at t is used from the first surrogate sample at or after t + ``image_latency_s`` (features
    from ``features_at(t)``). At every surrogate sample, the estimate ``predict()`` is compared
    with the internal position linearly interpolated to that time (samples outside the internal
    trace are not scored). Everything is causal. Scores are over samples (and images) at or
    after ``t_sur[0] + skip_s``; samples where the model is invalid are not in the RMS but are
    counted in ``valid_fraction``. ``correlation_error_mm`` is over the images that met a valid
    model (the residual before the image updates it); ``n_invalid`` counts the images that
    invalidated it; ``kinds`` counts the selected model after each image. Surrogate times must
    increase and its samples be finite (ValueError otherwise, from ``SurrogateHistory``).
    """
    params = params if params is not None else CorrelationParams()
    t_int = np.asarray(t_int, dtype=float)
    X = np.asarray(internal_mm, dtype=float)
    t_sur = np.asarray(t_sur, dtype=float)
    sur = np.asarray(surrogate_mm, dtype=float).reshape(-1)
    if X.shape != (len(t_int), 3) or len(sur) != len(t_sur) or len(t_sur) < 2:
        raise ValueError("need internal_mm (N, 3) matching t_int and surrogate (M,) matching t_sur")
    if not imaging_period_s > 0:
        raise ValueError(f"imaging_period_s must be > 0, got {imaging_period_s}")
    rng = np.random.default_rng(seed)

    # image schedule at internal sample times
    img: list[int] = []
    t_next = t_sur[0]
    for i, ti in enumerate(t_int):
        if ti >= t_next - _TIME_EPS and ti <= t_sur[-1]:
            img.append(i)
            t_next = ti + imaging_period_s
    img_t = t_int[img]
    img_y = X[img] + (rng.normal(0.0, noise_mm, (len(img), 3)) if noise_mm > 0 else 0.0)

    truth = np.column_stack([np.interp(t_sur, t_int, X[:, ax]) for ax in range(3)])
    in_range = (t_sur >= t_int[0]) & (t_sur <= t_int[-1])
    t0 = t_sur[0] + skip_s

    model = CorrelationModel(params)
    span = max(4.0, image_latency_s + 2 * params.velocity_window_s + 1.0)
    rate = min(1.0 / max(float(np.min(np.diff(t_sur))), 1e-6), 1000.0)
    hist = SurrogateHistory.for_params(params, span_s=span, max_rate_hz=rate)

    est = np.full((len(t_sur), 3), np.nan)
    unc = np.full(len(t_sur), np.nan)
    corr_err: list[float] = []
    kinds: Counter[str] = Counter()
    n_invalid = 0
    n_images = 0
    j = 0
    for k, (tk, sk) in enumerate(zip(t_sur, sur, strict=True)):
        hist.append(float(tk), float(sk))
        while j < len(img) and img_t[j] + image_latency_s <= tk + _TIME_EPS:
            ti = float(img_t[j])
            try:
                f = hist.features_at(ti)
            except ValueError:  # image older than the history (cannot happen after start)
                j += 1
                continue
            was_valid = model.valid
            res = model.add_point(ti, f, tuple(img_y[j]))
            if ti >= t0:
                n_images += 1
                if res.residual_mm is not None and was_valid:
                    corr_err.append(res.residual_mm)
                if was_valid and not res.model_valid:
                    n_invalid += 1
                if model.valid:
                    kinds[model.kind] += 1
            j += 1
        if model.valid:
            est[k] = model.predict(hist.features())
            unc[k] = model.uncertainty_mm

    scored = (t_sur >= t0) & in_range
    ok = scored & np.isfinite(est[:, 0])
    err = est[ok] - truth[ok]
    e3 = np.sqrt(np.sum(err * err, axis=1))
    ce = np.asarray(corr_err)

    def q(a, pct):
        return float(np.percentile(a, pct)) if a.size else math.nan

    return {
        "rms_3d_mm": float(np.sqrt(np.mean(e3**2))) if e3.size else math.nan,
        "p95_3d_mm": q(e3, 95),
        "max_3d_mm": float(e3.max()) if e3.size else math.nan,
        "rms_axis_mm": {
            name: float(np.sqrt(np.mean(err[:, ax] ** 2))) if e3.size else math.nan
            for ax, name in enumerate(("LR", "SI", "AP"))
        },
        "correlation_error_mm": {"median": q(ce, 50), "p95": q(ce, 95), "max": q(ce, 100)},
        "uncertainty_rms_mm": float(np.sqrt(np.mean(unc[ok] ** 2))) if e3.size else math.nan,
        "within_uncertainty": float(np.mean(e3 <= unc[ok])) if e3.size else math.nan,
        "n_samples": int(scored.sum()),
        "valid_fraction": float(ok.sum() / max(int(scored.sum()), 1)),
        "n_images": n_images,
        "n_invalid": n_invalid,
        "kinds": dict(kinds),
    }
