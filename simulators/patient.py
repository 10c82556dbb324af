"""The simulated breathing patient that drives the rig's devices.

A patient answers one question: where are the internal liver target and the external surface
marker at time ``t`` (seconds since the session started), and how much air is in the lungs?
``state(t)`` is a pure, deterministic function of (parameters, seed, t), cheap enough for the
device simulator threads to call 30-50 times a second, in any order, from several threads.

Two patients:

- ``LujanPatient``: the Lujan-type model of liver motion (Lujan et al., Med Phys 1999),
  ``SI(t) = exhale - A * sin^2n(pi * phase)`` per breathing cycle, so end-exhale is the long
  rest and end-inhale is a brief peak. Each cycle draws its own period and amplitude (lognormal,
  with the configured coefficients of variation). AP and LR follow the same shape a fraction
  ``hysteresis_rad / 2pi`` of the cycle behind SI, which opens the inhale/exhale loop. The
  baseline drifts linearly. Irregular events arrive as Poisson processes in session time:
  coughs (a sharp superior/posterior jolt of ~1 s, added on top of the breathing) at any
  instant; deep breaths (one cycle at 1.8x amplitude, 1.3x period), pauses (end-exhale rest for
  1-2 nominal periods) and breath holds (inhale, hold near end-inhale for ``breath_hold_s``
  with a slow relaxation, exhale) at the first cycle boundary after they fall due, and never
  two in a row.
- ``TracePatient``: replays a recorded internal trace (6-DoF or 2-column SI), looped, with a
  recorded surrogate partner or one derived from the internal SI.

The external surrogate is a surface/IR-marker point on the abdomen: it follows the same
breathing, ``surrogate_lead_s`` earlier, with its own amplitudes, drift and white measurement
noise. The noise is a hash of (seed, time in microseconds), so it too is reproducible whatever
the query order.

What it does NOT model: tissue deformation or rotation of the target (6-DoF rotations in a
trace are read but not applied), cardiac motion, a surrogate-to-target relation that changes
with the breathing pattern (beyond hysteresis, lead and separate drifts), the imaging of
fiducials, device latency or dropouts (those belong to the device simulators), and
physiology such as a coached breath-hold level (holds are at the cycle's own end-inhale).

Coordinates: IEC 61217 patient coordinates, tuples ordered (LR, SI, AP), x = LR (+left),
y = SI (+superior), z = AP (+anterior); millimetres, seconds, litres.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from motionctl.traces import TraceFormatError, read_trace

__all__ = [
    "LujanParams",
    "LujanPatient",
    "PatientState",
    "TraceParams",
    "TracePatient",
    "patient_from_config",
]

Vec3 = tuple[float, float, float]

# Direction each axis moves on inhale, (LR, SI, AP): the liver goes inferior and anterior
# (and, by this model's convention, slightly left); the abdominal marker rises anteriorly and
# slides inferiorly with the abdominal wall. Amplitudes in the parameters are magnitudes.
TARGET_INHALE_DIRECTION: Vec3 = (1.0, -1.0, 1.0)
SURROGATE_INHALE_DIRECTION: Vec3 = (1.0, -1.0, 1.0)

DEEP_BREATH_AMPLITUDE = 1.8  # a sigh: one cycle much deeper ...
DEEP_BREATH_PERIOD = 1.3  # ... and somewhat slower than the cycle it replaces
PAUSE_PERIODS = (1.0, 2.0)  # an end-exhale pause lasts this many nominal periods (uniform)
# During a hold the diaphragm relaxes slowly back towards exhale: ~1.4 mm over an ABC hold
# (Eccles 2006), i.e. about a tenth of a typical 12 mm SI excursion.
BREATH_HOLD_LEAK = 0.1
# A cough is a forced expiration: the diaphragm kicks the liver superior and the abdominal wall
# pulls posterior, peaking COUGH_RISE_S after onset at this fraction of the tidal amplitude.
COUGH_FRACTION = 0.5
COUGH_RISE_S = 0.1
COUGH_WINDOW_S = 1.2  # the pulse is < 0.1 % of its peak after this; ignore older coughs

_MODELS = ("lujan", "trace")


@dataclass(frozen=True, slots=True)
class PatientState:
    """Ground truth of the simulated patient at one instant."""

    t: float  # s since the start of the session
    target_mm: Vec3  # ground-truth internal liver target (LR, SI, AP)
    surrogate_mm: Vec3  # external surface/IR marker point (LR, SI, AP)
    lung_volume_l: float  # lung volume above end-exhale (litres), for a spirometer
    breath_hold: bool  # inside the held part of a breath-hold episode


# --------------------------------------------------------------------------------------------
# Parameter validation: every message names the [patient] key, so a bad site file is obvious.


def _key(name: str) -> str:
    return f"patient.{name}"


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_key(name)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_key(name)} must be finite, got {value!r}")
    return value


def _at_least(name: str, value: Any, low: float, *, strict: bool = False) -> float:
    value = _number(name, value)
    if value < low or (strict and value == low):
        raise ValueError(f"{_key(name)} must be {'>' if strict else '>='} {low:g}, got {value:g}")
    return value


def _vec3(name: str, value: Any, *, non_negative: bool = False) -> Vec3:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{_key(name)} must be 3 numbers (LR, SI, AP), got {value!r}")
    out = tuple(_number(name, v) for v in value)
    if non_negative and min(out) < 0:
        raise ValueError(f"{_key(name)} must be >= 0 on every axis, got {list(out)}")
    return out  # type: ignore[return-value]


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


@dataclass(frozen=True, slots=True)
class LujanParams:
    """Parameters of the Lujan-type model patient; names are the ``[patient]`` config keys."""

    period_s: float = 4.0
    period_cv: float = 0.10
    amplitude_mm: Vec3 = (1.5, 12.0, 4.0)
    amplitude_cv: float = 0.10
    shape_n: int = 2
    exhale_mm: Vec3 = (0.0, 0.0, 0.0)
    drift_mm_per_min: Vec3 = (0.0, 0.5, 0.0)
    hysteresis_rad: float = 0.35
    cough_per_min: float = 0.0
    deep_breath_per_min: float = 0.0
    pause_per_min: float = 0.0
    breath_hold_per_min: float = 0.0
    breath_hold_s: float = 20.0
    lung_volume_l: float = 0.6
    surrogate_lead_s: float = 0.15
    surrogate_amplitude_mm: Vec3 = (0.5, 1.0, 8.0)
    surrogate_noise_mm: float = 0.1
    surrogate_drift_mm_per_min: Vec3 = (0.0, 0.0, 0.3)

    def __post_init__(self) -> None:
        _set(self, "period_s", _at_least("period_s", self.period_s, 0.0, strict=True))
        for name in ("period_cv", "amplitude_cv"):
            cv = _at_least(name, getattr(self, name), 0.0)
            if cv > 1.0:
                raise ValueError(f"{_key(name)} must be <= 1, got {cv:g}")
            _set(self, name, cv)
        for name in ("amplitude_mm", "surrogate_amplitude_mm"):
            _set(self, name, _vec3(name, getattr(self, name), non_negative=True))
        for name in ("exhale_mm", "drift_mm_per_min", "surrogate_drift_mm_per_min"):
            _set(self, name, _vec3(name, getattr(self, name)))
        n = self.shape_n
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{_key('shape_n')} must be an integer >= 1, got {self.shape_n!r}")
        _set(self, "shape_n", n)
        h = _number("hysteresis_rad", self.hysteresis_rad)
        if abs(h) > math.pi:
            raise ValueError(f"{_key('hysteresis_rad')} must be within [-pi, pi], got {h:g}")
        _set(self, "hysteresis_rad", h)
        for name in (
            "cough_per_min",
            "deep_breath_per_min",
            "pause_per_min",
            "breath_hold_per_min",
            "lung_volume_l",
            "surrogate_noise_mm",
        ):
            _set(self, name, _at_least(name, getattr(self, name), 0.0))
        hold = _at_least("breath_hold_s", self.breath_hold_s, 0.0, strict=True)
        _set(self, "breath_hold_s", hold)
        _set(self, "surrogate_lead_s", _number("surrogate_lead_s", self.surrogate_lead_s))


@dataclass(frozen=True, slots=True)
class TraceParams:
    """Parameters of the trace-replay patient; names are the ``[patient]`` config keys."""

    trace: str = ""
    surrogate_trace: str = ""
    amplitude_mm: Vec3 = (1.5, 12.0, 4.0)  # only [1] is used: scales a derived surrogate
    lung_volume_l: float = 0.6
    surrogate_lead_s: float = 0.15
    surrogate_amplitude_mm: Vec3 = (0.5, 1.0, 8.0)  # only [2] is used: the derived AP scale
    surrogate_noise_mm: float = 0.1

    def __post_init__(self) -> None:
        for name in ("trace", "surrogate_trace"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{_key(name)} must be a file path string")
        if not self.trace:
            raise ValueError(f"{_key('trace')} must name a trace file when model = 'trace'")
        for name in ("amplitude_mm", "surrogate_amplitude_mm"):
            _set(self, name, _vec3(name, getattr(self, name), non_negative=True))
        if not self.surrogate_trace and self.amplitude_mm[1] <= 0:
            raise ValueError(
                f"{_key('amplitude_mm')}[1] (SI) must be > 0 to derive the surrogate from the "
                "trace when surrogate_trace is empty"
            )
        _set(self, "lung_volume_l", _at_least("lung_volume_l", self.lung_volume_l, 0.0))
        _set(self, "surrogate_lead_s", _number("surrogate_lead_s", self.surrogate_lead_s))
        _set(
            self,
            "surrogate_noise_mm",
            _at_least("surrogate_noise_mm", self.surrogate_noise_mm, 0.0),
        )


# --------------------------------------------------------------------------------------------
# Measurement noise as a pure function of (seed, t): splitmix64 of the quantised time, then
# Box-Muller. Quantising to 1 us makes 0.1 + 0.2 and 0.3 the same instant.

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _white_noise_3(seed_key: int, t: float, sd: float) -> Vec3:
    """Three independent N(0, sd^2) values, a deterministic function of (seed_key, t)."""
    if sd == 0.0:
        return (0.0, 0.0, 0.0)
    base = _splitmix64(seed_key ^ (round(t * 1e6) & _MASK64))
    u = [((_splitmix64(base + j) >> 11) + 1) * 2.0**-53 for j in range(4)]  # in (0, 1]
    r0 = sd * math.sqrt(-2.0 * math.log(u[0]))
    r1 = sd * math.sqrt(-2.0 * math.log(u[2]))
    return (
        r0 * math.cos(2.0 * math.pi * u[1]),
        r0 * math.sin(2.0 * math.pi * u[1]),
        r1 * math.cos(2.0 * math.pi * u[3]),
    )


def _noise_key(seed: int, stream: int) -> int:
    return _splitmix64(_splitmix64(seed & _MASK64) ^ stream)


def _seed_value(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{_key('seed')} must be an integer >= 0, got {seed!r}")
    return seed


def _check_time(t: float) -> float:
    t = float(t)
    if not (t >= 0.0 and math.isfinite(t)):
        raise ValueError(f"patient state asked for t = {t!r}; t must be finite and >= 0")
    return t


# --------------------------------------------------------------------------------------------
# The Lujan-type model patient.

# Segment kinds. A segment is a stretch of breathing with one start time, drawn in order.
_BREATH, _PAUSE, _HOLD = 0, 1, 2
_EVENT_PAUSE, _EVENT_DEEP_BREATH, _EVENT_BREATH_HOLD = "pause", "deep_breath", "breath_hold"
# Independent random streams, so that e.g. switching coughs on does not change the breathing.
_STREAM_BREATHING, _STREAM_EVENTS, _STREAM_COUGHS, _STREAM_NOISE = 1, 2, 3, 4
_CHUNK = 32  # segments generated per extension


def _lognormal_factor(rng: np.random.Generator, cv: float) -> float:
    """A positive factor with mean 1 and coefficient of variation ``cv``."""
    if cv == 0.0:
        return 1.0
    sigma = math.sqrt(math.log1p(cv * cv))
    return math.exp(sigma * float(rng.standard_normal()) - 0.5 * sigma * sigma)


def _stream(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))


class LujanPatient:
    """A Lujan-type breathing patient with cycle-to-cycle variation and irregular events."""

    def __init__(self, params: LujanParams, seed: int = 0):
        self.params = params
        self.seed = _seed_value(seed)
        self._power = 2 * params.shape_n
        # Fraction of the current cycle by which AP and LR trail SI.
        self._lag_cycles = params.hysteresis_rad / (2.0 * math.pi)
        self._target_amp = tuple(
            d * a for d, a in zip(TARGET_INHALE_DIRECTION, params.amplitude_mm, strict=True)
        )
        self._surrogate_amp = tuple(
            d * a
            for d, a in zip(SURROGATE_INHALE_DIRECTION, params.surrogate_amplitude_mm, strict=True)
        )
        self._drift_per_s = tuple(v / 60.0 for v in params.drift_mm_per_min)
        self._surrogate_drift_per_s = tuple(v / 60.0 for v in params.surrogate_drift_mm_per_min)
        self._noise_key = _noise_key(self.seed, _STREAM_NOISE)

        self._breathing_rng = _stream(self.seed, _STREAM_BREATHING)
        self._event_rng = _stream(self.seed, _STREAM_EVENTS)
        self._cough_rng = _stream(self.seed, _STREAM_COUGHS)
        # Poisson clocks: the time each irregular event is next due (inf when its rate is 0).
        self._event_rates = {
            _EVENT_PAUSE: params.pause_per_min,
            _EVENT_DEEP_BREATH: params.deep_breath_per_min,
            _EVENT_BREATH_HOLD: params.breath_hold_per_min,
        }
        self._next_event = {
            event: self._exp_interval(rate, self._event_rng)
            for event, rate in self._event_rates.items()
        }
        self._next_cough = self._exp_interval(params.cough_per_min, self._cough_rng)

        # The generated sequence: parallel lists that only grow. A segment is
        # (start_s, duration_s, period_s, amplitude_factor, kind); _end is where the last ends.
        # Writers append the segment, then its start, then move _end; a reader that sees
        # t < _end therefore finds complete entries (appends are atomic under the GIL).
        self._segments: list[tuple[float, float, float, float, int]] = []
        self._starts: list[float] = []
        self._coughs: list[float] = []
        self._end = 0.0
        self._after_event = False
        self._lock = threading.Lock()

    @staticmethod
    def _exp_interval(rate_per_min: float, rng: np.random.Generator) -> float:
        if rate_per_min <= 0.0:
            return math.inf
        return float(rng.exponential(60.0 / rate_per_min))

    # -- lazy, order-independent generation ----------------------------------------------------

    def _extend(self, t: float) -> None:
        """Generate segments (in order, in chunks) until the sequence covers time ``t``."""
        with self._lock:
            while self._end <= t:
                for _ in range(_CHUNK):
                    self._append_segment()

    def _append_segment(self) -> None:
        p = self.params
        start = self._end
        # Every segment consumes one period and one amplitude draw, so the breathing stream
        # advances the same way whichever events are switched on.
        period = p.period_s * _lognormal_factor(self._breathing_rng, p.period_cv)
        amplitude = _lognormal_factor(self._breathing_rng, p.amplitude_cv)

        kind, duration = _BREATH, period
        # At most one event between regular breaths: after an event the patient breathes.
        event = min(self._next_event, key=self._next_event.__getitem__)
        if self._after_event or self._next_event[event] > start:
            self._after_event = False
        else:
            self._after_event = True
            self._next_event[event] += self._exp_interval(self._event_rates[event], self._event_rng)
            if event == _EVENT_DEEP_BREATH:
                period *= DEEP_BREATH_PERIOD
                amplitude *= DEEP_BREATH_AMPLITUDE
                duration = period
            elif event == _EVENT_PAUSE:
                kind = _PAUSE
                duration = p.period_s * float(self._event_rng.uniform(*PAUSE_PERIODS))
            else:
                kind = _HOLD
                duration = period + p.breath_hold_s

        end = start + duration
        while self._next_cough < end:
            self._coughs.append(self._next_cough)
            self._next_cough += self._exp_interval(p.cough_per_min, self._cough_rng)
        self._segments.append((start, duration, period, amplitude, kind))
        self._starts.append(start)
        self._end = end

    # -- evaluation ----------------------------------------------------------------------------

    def _segment_at(self, t: float) -> tuple[float, float, float, float, int]:
        if t >= self._end:
            self._extend(t)
        return self._segments[bisect_right(self._starts, t) - 1]

    def _inhale_fraction(self, t: float) -> tuple[float, bool]:
        """Depth of inhalation at ``t`` as a fraction of the nominal tidal amplitude.

        0 at end-exhale; the cycle's amplitude factor at its end-inhale. Also says whether
        ``t`` is inside the held part of a breath hold. Before t = 0 the patient rests at
        end-exhale, which is where the first cycle starts.
        """
        if t <= 0.0:
            return 0.0, False
        start, duration, period, amplitude, kind = self._segment_at(t)
        u = t - start
        if kind == _BREATH:
            return amplitude * math.sin(math.pi * u / period) ** self._power, False
        if kind == _PAUSE:
            return 0.0, False
        # Breath hold: the first half of a cycle in, the hold, the second half out.
        half = 0.5 * period
        hold = duration - period
        if u < half:
            return amplitude * math.sin(math.pi * u / period) ** self._power, False
        if u < half + hold:
            return amplitude * (1.0 - BREATH_HOLD_LEAK * (u - half) / hold), True
        level = amplitude * (1.0 - BREATH_HOLD_LEAK)
        return level * math.sin(math.pi * (u - hold) / period) ** self._power, False

    def _cough_pulse(self, t: float) -> float:
        """Sum of the cough pulses (each peaking at 1) active at ``t``."""
        if not self._coughs:
            return 0.0
        pulse = 0.0
        i = bisect_right(self._coughs, t) - 1
        while i >= 0 and t - self._coughs[i] < COUGH_WINDOW_S:
            x = (t - self._coughs[i]) / COUGH_RISE_S
            pulse += x * math.exp(1.0 - x)  # alpha function: sharp rise, quick decay
            i -= 1
        return pulse

    def state(self, t: float) -> PatientState:
        t = _check_time(t)
        p = self.params
        si_depth, holding = self._inhale_fraction(t)
        period_now = self._segment_at(t)[2]
        lagged_depth, _ = self._inhale_fraction(t - self._lag_cycles * period_now)
        cough = self._cough_pulse(t)

        ex, dr, amp = p.exhale_mm, self._drift_per_s, self._target_amp
        target = (
            ex[0] + dr[0] * t + amp[0] * lagged_depth,
            ex[1] + dr[1] * t + amp[1] * si_depth + COUGH_FRACTION * p.amplitude_mm[1] * cough,
            ex[2] + dr[2] * t + amp[2] * lagged_depth - COUGH_FRACTION * p.amplitude_mm[2] * cough,
        )

        surface_depth, _ = self._inhale_fraction(t + p.surrogate_lead_s)
        sdr, samp = self._surrogate_drift_per_s, self._surrogate_amp
        noise = _white_noise_3(self._noise_key, t, p.surrogate_noise_mm)
        surrogate = (
            sdr[0] * t + samp[0] * surface_depth + noise[0],
            sdr[1] * t + samp[1] * surface_depth + noise[1],
            sdr[2] * t
            + samp[2] * surface_depth
            - COUGH_FRACTION * p.surrogate_amplitude_mm[2] * cough
            + noise[2],
        )
        volume = p.lung_volume_l * (surface_depth - COUGH_FRACTION * cough)
        return PatientState(t, target, surrogate, volume, holding)


# --------------------------------------------------------------------------------------------
# The trace-replay patient.


class _LoopedSeries:
    """Linear interpolation of sampled columns, repeating the samples end to end forever.

    Time 0 is the first sample. The loop closes by interpolating from the last sample back to
    the first over one median sample interval, so a looped trace has no jump in time and only
    the (usually small) jump in value that the recording itself has between its ends.
    """

    def __init__(self, t_s: np.ndarray, columns: np.ndarray):
        times = t_s - t_s[0]
        self._times = times.tolist()
        self._columns = [columns[:, j].tolist() for j in range(columns.shape[1])]
        self.period_s = float(times[-1] + np.median(np.diff(times)))

    def at(self, t: float) -> list[float]:
        tau = t % self.period_s
        times = self._times
        i = bisect_right(times, tau) - 1
        if i == len(times) - 1:  # between the last sample and the loop's restart
            t0, t1, j = times[i], self.period_s, 0
        else:
            t0, t1, j = times[i], times[i + 1], i + 1
        w = (tau - t0) / (t1 - t0)
        return [col[i] + w * (col[j] - col[i]) for col in self._columns]


class TracePatient:
    """A patient that replays a recorded internal trace, looped; surrogate recorded or derived.

    The internal trace gives the target: 6-DoF columns x, y, z (LR, SI, AP, mm) or, for a
    2-column trace, SI only (LR = AP = 0). Without ``surrogate_trace`` the marker's AP is
    ``-SI(t + lead) * surrogate_amplitude_mm[2] / amplitude_mm[1]``; a recorded surrogate is
    replayed as it is (its lead is in the recording). Either way only the AP axis moves; all
    three get white noise. Lung volume is the surrogate's AP excursion scaled so that the
    trace's typical excursion (2nd to 98th percentile) is ``lung_volume_l``. Session time 0
    is the first sample of each trace, whatever its own time stamp. Breath holds in
    a trace are not detected: ``breath_hold`` is always False. The drift keys do not apply:
    any drift is in the recording.
    """

    def __init__(self, params: TraceParams, seed: int = 0):
        self.params = params
        self.seed = _seed_value(seed)
        self._noise_key = _noise_key(self.seed, _STREAM_NOISE)

        internal = read_trace(params.trace)
        if internal.kind in ("6dof", "3d"):  # IEC LR, SI, AP first
            xyz = internal.values[:, 0:3]
        elif internal.kind != "1d":
            raise ValueError(
                f"{_key('trace')}: {internal.source} is a {internal.kind} trace (not IEC "
                "patient coordinates); an internal trace must be 6-DoF, HexaMotion or 1-D SI"
            )
        else:
            xyz = np.zeros((len(internal.t_s), 3))
            xyz[:, 1] = internal.values[:, 0]
        self._internal = _LoopedSeries(internal.t_s, xyz)

        if params.surrogate_trace:
            surrogate = read_trace(params.surrogate_trace)
            if surrogate.kind != "1d":
                raise ValueError(
                    f"{_key('surrogate_trace')}: {surrogate.source} is a {surrogate.kind} "
                    "trace; a 2-column `t value` surrogate is expected"
                )
            self._surrogate: _LoopedSeries | None = _LoopedSeries(surrogate.t_s, surrogate.values)
            surrogate_ap = surrogate.values[:, 0]
            self._si_to_ap = 0.0
        else:
            self._surrogate = None
            self._si_to_ap = -params.surrogate_amplitude_mm[2] / params.amplitude_mm[1]
            surrogate_ap = xyz[:, 1] * self._si_to_ap

        low, high = np.percentile(surrogate_ap, [2.0, 98.0])
        self._ap_exhale = float(low)
        self._litres_per_mm = params.lung_volume_l / (high - low) if high > low else 0.0

    def state(self, t: float) -> PatientState:
        t = _check_time(t)
        p = self.params
        target = tuple(self._internal.at(t))
        if self._surrogate is not None:
            surface_ap = self._surrogate.at(t)[0]
        else:
            surface_ap = self._internal.at(t + p.surrogate_lead_s)[1] * self._si_to_ap
        noise = _white_noise_3(self._noise_key, t, p.surrogate_noise_mm)
        surrogate = (noise[0], noise[1], surface_ap + noise[2])
        volume = (surface_ap - self._ap_exhale) * self._litres_per_mm
        return PatientState(t, target, surrogate, volume, False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------


def _params_from(cls: type, section: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        value = section[f.name]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def patient_from_config(section: Mapping[str, Any]) -> LujanPatient | TracePatient:
    """Build the patient that the ``[patient]`` config table describes.

    ``section`` must hold every key of the table (the config loader fills in defaults).
    Raises ValueError naming the key for a missing, unknown or bad value, including a trace
    file that cannot be read.
    """
    expected = {"model", "seed"} | {f.name for f in fields(LujanParams)}
    expected |= {f.name for f in fields(TraceParams)}
    missing = sorted(expected - section.keys())
    if missing:
        raise ValueError(f"{_key(missing[0])} is missing from the [patient] config")
    unknown = sorted(set(section) - expected)
    if unknown:
        raise ValueError(f"{_key(unknown[0])} is not a [patient] config key")

    model = section["model"]
    if model not in _MODELS:
        raise ValueError(f"{_key('model')} must be one of {list(_MODELS)}, got {model!r}")
    seed = _seed_value(section["seed"])
    # The model parameters are checked whichever model runs, so that a bad value in a site
    # file is reported now rather than when someone switches the model back.
    lujan = _params_from(LujanParams, section)
    for name in ("trace", "surrogate_trace"):
        if not isinstance(section[name], str):
            raise ValueError(f"{_key(name)} must be a file path string, got {section[name]!r}")
    if model == "lujan":
        return LujanPatient(lujan, seed)

    params = _params_from(TraceParams, section)
    for name in ("trace", "surrogate_trace"):
        path = getattr(params, name)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"{_key(name)}: cannot read {path!r}: {exc.strerror}") from exc
    try:
        return TracePatient(params, seed)
    except TraceFormatError as exc:
        name = "surrogate_trace" if exc.source == str(Path(params.surrogate_trace)) else "trace"
        raise ValueError(f"{_key(name)}: {exc}") from exc
