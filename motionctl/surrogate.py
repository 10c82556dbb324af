"""Surrogate processing: from the raw breathing signal to a clean value and its breathing state.

One ``SurrogateProcessor`` per breathing signal (1-D, mm, oriented so that inhale is
positive: the caller flips the sign of a signal that falls on inhale). Per sample, causally:

- **rejection**: non-finite, out-of-range or time-reversed samples never reach any state;
  they mark the output invalid until fresh valid data arrive.
- **despiking**: a Hampel test against the median of the last few samples; a spike is
  replaced by that median (so a single glitch cannot open the gate) and flagged.
- **smoothing**: a one-pole low-pass with a short time constant (default 40 ms): enough to
  calm camera noise, little enough lag to leave to the predictor.
- **cycle detection**: extremum detection with hysteresis (a turning point counts once the
  signal has come back by a fraction of the recent amplitude), giving end-exhale and
  end-inhale times and levels, the period, the peak-to-peak amplitude.
- **baseline and drift**: the end-exhale level averaged over the last cycles, and its drift
  rate from a line through the recent end-exhale levels (mm/s).
- **phase** in [0, 1), 0 = end-exhale, 0.5 = end-inhale: in two halves, the time since the
  last end-exhale over the recent inhale duration (0 to 0.5), then the time since the last
  end-inhale over the recent exhale duration (0.5 to 1, then on into the next breath). It
  never passes an end-inhale that has not been confirmed: a breath held at end-inhale stays
  at 0.5, and a long end-exhale rest at most reaches the next breath's 0.5. Time since the
  last end-exhale over the period, wrapped, ran on through end-exhale while the breath was
  held at end-inhale: into an end-exhale gating window after 0.8 of a period.
- **irregularity**: the combined coefficient of variation of the recent periods and
  amplitudes (0 = perfectly regular).

The processor is pure and clock-injected: time comes with each sample.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# The Hampel window's span: 7 frames of a 30 Hz camera. In samples it must follow the rate:
# at 5 Hz seven samples span 1.4 s, and the first fast sample after an end-exhale plateau
# stood so far from the plateau's median that ordinary breathing was taken for spikes and
# jumps (12 % of the samples of a LIGHT-SABR lung surrogate: each jump an interlock and a
# predictor restart).
SPIKE_WINDOW_S = 0.23


def spike_window_samples(rate_hz: float) -> int:
    """Samples in the Hampel window at this sample rate (at least 3: a median needs them)."""
    return max(3, round(SPIKE_WINDOW_S * rate_hz))


@dataclass(frozen=True)
class SurrogateParams:
    smoothing_s: float = 0.04  # one-pole time constant
    spike_window: int = 7  # samples in the Hampel median (spike_window_samples(rate))
    spike_threshold: float = 4.0  # robust standard deviations
    spike_floor_mm: float = 1.0  # never call a deviation below this a spike
    jump_mm: float = 5.0  # a spike this far from the median ...
    # ... and this fast from the previous sample is a jump. Breathing is slower: the fastest
    # of the recorded surrogates (LIGHT-SABR, ExtMarker) moves 61 mm/s over 0.2 s.
    jump_speed_mm_s: float = 100.0
    turn_fraction: float = 0.25  # of the recent amplitude, to confirm a turning point
    turn_floor_mm: float = 0.5  # minimum excursion for a turning point
    cycles_for_baseline: int = 3
    cycles_for_statistics: int = 6
    gap_s: float = 0.5  # a longer silence restarts the cycle state
    max_abs_mm: float = 500.0  # physically possible surrogate values
    min_period_s: float = 1.0  # breathing faster than this is not a cycle
    max_period_s: float = 15.0


@dataclass(frozen=True, slots=True)
class SurrogateState:
    t: float
    value_mm: float  # despiked and smoothed
    raw_mm: float
    valid: bool
    reasons: tuple[str, ...]
    baseline_mm: float  # end-exhale level (nan until the first cycle)
    drift_mm_per_s: float
    phase: float  # [0, 1), 0 = end-exhale; nan until a period is known
    period_s: float
    amplitude_mm: float
    irregularity: float
    event: str | None = None  # "end_exhale" or "end_inhale" when confirmed at this sample


_NAN = math.nan


class SurrogateProcessor:
    def __init__(self, params: SurrogateParams | None = None):
        self.p = params or SurrogateParams()
        self.reset()

    def reset(self) -> None:
        self._last_t: float | None = None
        self._window: deque[float] = deque(maxlen=self.p.spike_window)
        self._smooth: float | None = None
        self._restart_cycles()

    def _restart_cycles(self) -> None:
        self._looking_for = "any"  # the next turning point to confirm
        self._ext_value = _NAN  # running extreme since the last confirmed turn
        self._ext_t = _NAN
        self._min_value = math.inf
        self._max_value = -math.inf
        self._min_t = self._max_t = _NAN
        self._exhales: deque[tuple[float, float]] = deque(maxlen=self.p.cycles_for_statistics + 1)
        self._inhales: deque[tuple[float, float]] = deque(maxlen=self.p.cycles_for_statistics + 1)
        self._period = self._amplitude = self._baseline = self._drift = _NAN
        self._irregularity = _NAN
        self._inhale_s = self._exhale_s = _NAN  # recent durations of the two halves

    # ---------------------------------------------------------------------------------
    def step(self, t: float, value: float) -> SurrogateState:
        p = self.p
        reasons: list[str] = []
        if not math.isfinite(value):
            reasons.append("surrogate_not_finite")
        elif abs(value) > p.max_abs_mm:
            reasons.append("surrogate_out_of_range")
        if not math.isfinite(t):
            reasons.append("time_not_finite")
        elif self._last_t is not None and t <= self._last_t:
            reasons.append("clock_backwards" if t < self._last_t else "time_repeated")
        if reasons:
            # A sample out of time is not used, but its value is still a look at the device:
            # far from the recent median it is a jump (no time to excuse it as fast
            # breathing), which holds for its clean period, not for this sample only.
            window = self._window
            if (
                math.isfinite(value)
                and len(window) >= 3
                and "surrogate_out_of_range" not in reasons
                and abs(value - sorted(window)[len(window) // 2]) > p.jump_mm
            ):
                reasons.append("surrogate_jump")
            return self._invalid(t, value, tuple(reasons))

        if self._last_t is not None and t - self._last_t > p.gap_s:
            # After a gap the breathing state is unknown: restart rather than bridge it.
            self._window.clear()
            self._smooth = None
            self._restart_cycles()
            reasons.append("gap")
        dt = 0.0 if self._last_t is None else t - self._last_t
        self._last_t = t

        clean = self._despike(value, dt, reasons)
        if self._smooth is None or p.smoothing_s <= 0:
            self._smooth = clean
        else:
            alpha = dt / (p.smoothing_s + dt)
            self._smooth += alpha * (clean - self._smooth)
        event = self._detect_turn(t, self._smooth)
        return self._state(t, value, reasons, event)

    def _invalid(self, t: float, value: float, reasons: tuple[str, ...]) -> SurrogateState:
        return SurrogateState(t, _NAN, value, False, reasons, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN)

    def _despike(self, value: float, dt: float, reasons: list[str]) -> float:
        """``dt``: the time since the previous sample."""
        window = self._window
        window.append(value)  # raw values: a real step wins once it fills half the window
        if len(window) < 3:
            return value
        ordered = sorted(window)
        median = ordered[len(ordered) // 2]
        mad = sorted([abs(v - median) for v in ordered])[len(ordered) // 2]
        limit = max(self.p.spike_threshold * 1.4826 * mad, self.p.spike_floor_mm)
        deviation = abs(value - median)
        # A jump is a step no breath makes since the previous sample: in seconds, not
        # samples (at 5 Hz a 55 mm lung surrogate's ordinary inhale moves 12 mm). It is not
        # asked to be a spike as well: erratic samples just before it widen the spike limit
        # (their spread is the MAD) until no jump would be one.
        jump = deviation > self.p.jump_mm and abs(value - window[-2]) > self.p.jump_speed_mm_s * dt
        if deviation > limit or jump:
            reasons.append("spike_replaced")
            if jump:
                reasons.append("surrogate_jump")
            return median
        return value

    def _detect_turn(self, t: float, x: float) -> str | None:
        if x > self._max_value:
            self._max_value, self._max_t = x, t
        if x < self._min_value:
            self._min_value, self._min_t = x, t
        threshold = max(self.p.turn_fraction * self._recent_amplitude(), self.p.turn_floor_mm)
        if self._looking_for in ("any", "inhale") and self._max_value - x > threshold:
            self._inhales.append((self._max_t, self._max_value))
            self._looking_for = "exhale"
            self._min_value, self._min_t = x, t
            return "end_inhale"
        if self._looking_for in ("any", "exhale") and x - self._min_value > threshold:
            self._exhales.append((self._min_t, self._min_value))
            self._looking_for = "inhale"
            self._max_value, self._max_t = x, t
            return "end_exhale"
        return None

    def _recent_amplitude(self) -> float:
        if self._inhales and self._exhales:
            return max(0.0, self._inhales[-1][1] - self._exhales[-1][1])
        return 0.0

    def _update_statistics(self) -> None:
        """Period, amplitude, baseline, drift, irregularity: they change only at a turn."""
        p = self.p
        exhales = list(self._exhales)
        periods = [
            b[0] - a[0]
            for a, b in zip(exhales[:-1], exhales[1:], strict=True)
            if p.min_period_s <= b[0] - a[0] <= p.max_period_s
        ]
        amplitudes = [
            inhale - exhale
            for (_, exhale), (_, inhale) in zip(exhales, self._inhales, strict=False)
        ]
        recent = [level for _, level in exhales[-p.cycles_for_baseline :]]
        self._period = _median(periods)
        self._amplitude = _median(amplitudes[-p.cycles_for_statistics :])
        self._baseline = sum(recent) / len(recent) if recent else _NAN
        self._drift = _slope(exhales[-p.cycles_for_statistics :])
        self._irregularity = (
            math.hypot(_cv(periods), _cv(amplitudes)) if len(periods) >= 2 else _NAN
        )
        # the halves: end-exhale -> end-inhale and end-inhale -> end-exhale, turn by turn
        # (a half shorter than a quarter of the shortest breath is a noise turn, not breath)
        turns = sorted([(t, 0) for t, _ in exhales] + [(t, 1) for t, _ in self._inhales])
        halves: tuple[list[float], list[float]] = ([], [])
        for (ta, kind), (tb, next_kind) in zip(turns[:-1], turns[1:], strict=True):
            if kind != next_kind and 0.25 * p.min_period_s <= tb - ta <= p.max_period_s:
                halves[kind].append(tb - ta)
        n = p.cycles_for_statistics
        self._inhale_s = _median(halves[0][-n:])
        self._exhale_s = _median(halves[1][-n:])

    def _state(self, t: float, raw: float, reasons: list[str], event: str | None) -> SurrogateState:
        if event is not None:
            self._update_statistics()
        period = self._period
        phase = self._phase(t)
        if not math.isfinite(phase):
            reasons.append("no_breathing_cycle_yet")
        # Only problems with the sample itself make it invalid (handled before); the
        # breathing state not being known yet is reported, and a consumer that needs it
        # checks the fields.
        return SurrogateState(
            t,
            self._smooth,
            raw,
            True,
            tuple(reasons),
            self._baseline,
            self._drift,
            phase,
            period,
            self._amplitude,
            self._irregularity,
            event,
        )

    def _phase(self, t: float) -> float:
        """Two halves (see the module docstring); nan until a period is known."""
        if not (self._exhales and math.isfinite(self._period)):
            return _NAN
        t_exhale = self._exhales[-1][0]
        t_inhale = self._inhales[-1][0] if self._inhales else -math.inf
        half = 0.5 * self._period
        d_in = self._inhale_s if math.isfinite(self._inhale_s) else half
        if t_inhale > t_exhale:  # exhaling: 0.5 at end-inhale
            d_ex = self._exhale_s if math.isfinite(self._exhale_s) else half
            if t - t_inhale < d_ex:
                return 0.5 + 0.5 * (t - t_inhale) / d_ex
            # on into the next breath (an end-exhale is confirmed only once the signal has
            # risen again), but not past its end-inhale
            return min(0.5 * (t - t_inhale - d_ex) / d_in, 0.5)
        return min(0.5 * (t - t_exhale) / d_in, 0.5)


def _median(values: list[float]) -> float:
    if not values:
        return _NAN
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _cv(values: list[float]) -> float:
    if len(values) < 2:
        return _NAN
    mean = sum(values) / len(values)
    if mean == 0:
        return _NAN
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / abs(mean)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, level) points; nan with fewer than 3."""
    if len(points) < 3:
        return _NAN
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    stt = sum((t - mt) ** 2 for t, _ in points)
    if stt == 0:
        return _NAN
    return sum((t - mt) * (v - mv) for t, v in points) / stt
