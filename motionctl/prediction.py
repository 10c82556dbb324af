"""Latency-compensating prediction of a 1-D breathing signal (optionally helped by other,
synchronous channels of the same recording).

The beam gate must act on where the target *will be* when the beam responds, one system
latency (``horizon_s``, typically 0.1-0.5 s) after the sample. A predictor consumes the
uniformly sampled surrogate one sample at a time and returns its forecast of the sample
``H = round(horizon_s * rate_hz)`` steps ahead. Everything here is pure: samples in,
prediction out; no clock, no I/O, no threads; deterministic.

Methods (``PREDICTORS``; ``make_predictor("default", ...)`` gives ``DEFAULT_PREDICTOR``):

- ``none``: the current value, i.e. what the gate sees without prediction; the reference
  that ``relative_rmse`` divides by.
- ``nlms``: normalised least mean squares on a 1 s delay vector, the classical adaptive
  linear filter (Haykin, *Adaptive Filter Theory*); the baseline of Ernst et al., Phys Med
  Biol 58:3911 (2013).
- ``ridge``: online ridge regression with exponential forgetting (RLS with a ridge prior)
  on a 4 s delay vector, refitted every 0.2 s. Linear prediction of tumour motion: Sharp et
  al., Phys Med Biol 49:425 (2004).
- ``analogue``: the method of analogues, nearest neighbours in delay-embedding space
  (Lorenz, J Atmos Sci 26:636, 1969; Farmer & Sidorowich, Phys Rev Lett 59:845, 1987; local
  regression for breathing: Ruan et al., Phys Med Biol 52:7137, 2007). It finds the moments
  of the last two minutes whose recent motion looked most like now and averages what
  followed them ``H`` samples later, so it reproduces the non-linear shape of a breath (the
  sharp end-inhale turn, the end-exhale rest) that a linear filter smooths over. Its
  queries are elastic (below).
- ``ensemble`` (the default): ``analogue`` and ``ridge`` combined with weights inversely
  proportional to their squared error over the last ~10 s (forecast combination, Bates &
  Granger, Oper Res Q 20:451, 1969). On the 44 recorded traces at 0.4 s it beat both
  components on 32 and was never more than 0.035 (relative RMSE) behind the better one.

Rate independence: every length is a duration in seconds, never a sample count. The delay
vector is the increments from the current sample to the means of consecutive 0.2 s blocks,
read from a ring buffer of running sums (a boxcar anti-alias filter, then decimation): a 4 s
vector has 20 entries at 5, 10 or 30 Hz, and at 30 Hz each entry averages six samples of
noise. Learning (ridge statistics, the nLMS step, new analogue library entries) happens on
a ~10 Hz tick grid (``tick_s``), so the cost per second and the speed of adaptation do not
grow with the rate; forgetting factors come from half-lives in seconds. The models see
increments and predict the increment ``x[n+H] - x[n]``, so they are blind to the baseline,
and an all-zero model is exactly ``none``. Below 5 Hz a block is one sample and the vector
keeps its duration with fewer entries.

Extra input channels (``aux_channels = k``, ``step(value, aux)`` with ``k`` values): the
predicted signal is still the one ``value``, but ``ridge``, ``analogue`` and ``ensemble``
may also read other channels sampled at the same instants, typically the other axes of the
same marker or the other markers of the recording. Breathing moves them with different
phases (the axes of a marker's path do not peak together, nor do markers at different
places), so they carry phase information that the main channel's own past lacks.
The ridge sees each extra channel's block increments over the last second (5 per channel);
the analogue embedding appends each one's increments over its span (2 s) in raw mm with
the main channel's lag weights. On the 27 ExtMarker traces at 0.4 s the ensemble's median
relative RMSE went from 0.437 to 0.391 with the same marker's two other axes and to 0.352
with all 8 other channels of the recording; on the 12 liver traces, 0.520 to 0.510
(measured before the elastic queries below). The channels must be synchronous: delaying
them by a single sample loses most of the gain, so never feed a channel from another clock
or a resampled copy with a different latency.
``nlms`` and ``none`` accept ``aux_channels`` and check ``aux`` but ignore it. With
``aux_channels = 0`` every predictor is exactly the 1-D one.

Elastic analogue queries (``speeds``, default ``(0.9, 1.0, 1.11)``, for ``analogue`` and
``ensemble``): the breathing period varies from breath to breath, so the library's best
twin of the current breath was often a little faster or slower, and its 2 s embedding, read
at the same clock, no longer lines up with now. The library is unchanged (embeddings at the
recorded speed); the query is built at each playback speed ``s`` as well, the block edges of
every channel at ``s * j * tap_s`` instead of ``j * tap_s`` (fractional edges by linear
interpolation of the running sums; at ``s = 0.9`` the query's 2 s covers 1.8 s of the
signal, stretched), and the ``k`` nearest neighbours are taken over all speeds together (a
uniform-warp, DTW-like distance). The neighbour's future is still the one ``H`` samples
after it. Measured with the ensemble against ``speeds=(1.0,)`` (median relative RMSE,
2 extra channels): ExtMarker 0.410 -> 0.398 at 0.2 s and 0.391 -> 0.394 at 0.4 s (a wash
there), liver (LARK + KIM) 0.510 -> 0.465 at 0.4 s. ``speeds=(1.0,)`` is exactly the
non-elastic analogue. Speeds must include 1.0 (the library's own speed: elastic matching
widens the exact match, it does not replace it), be distinct and lie in [0.5, 2]; the delay
lines keep ``2 s * max(speeds)`` of history.

Cost: a handful of small numpy operations per sample on preallocated buffers; a 21 x 21
ridge solve every 0.2 s, not every sample (21 + 5 k with k extra channels, which roughly
doubles the cost per sample at k = 2). The elastic query multiplies the neighbour search
by the number of speeds (an (S x D) by (D x 1200) product and a partial sort of S x 1200
distances) plus one gather; the search runs on the ~10 Hz learning ticks only
(above 10 Hz the ensemble holds the analogue's correction in between), so at 30 Hz with 2
extra channels the mean cost went from 24 to 34 us per sample with three speeds (p99
per trace at most ~260 us). ``bench/bench_prediction.py`` measures it. The main and the
extra channels share one delay line (one ring position, one gather per query), which
brought that 34 us down to about 21 us.

Safety: ``step`` refuses non-finite input, in ``value`` or in ``aux`` (the caller restarts
the predictor across invalid data), and an ``aux`` of the wrong length. Until a model has
learned from ``_MIN_LEARNING_S`` of data (and filled its delay vector) the prediction is
the current value (``ready`` is False). ``restart()`` (a gap, a jump, invalid samples)
empties the delay vector and keeps what was learnt: ``ready`` again once it has refilled.
``diverged`` latches when the input (or an extra channel) leaves any physical range, the
state turns non-finite, or the recent error is several times that of no prediction; a
diverged predictor returns the current value until ``reset()``.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from operator import add, sub
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.linalg import lapack

_gesv = lapack.dgesv

__all__ = [
    "DEFAULT_PREDICTOR",
    "PREDICTORS",
    "AnaloguePredictor",
    "EnsemblePredictor",
    "NLMSPredictor",
    "NoPredictor",
    "Predictor",
    "RidgePredictor",
    "evaluate_predictor",
    "horizon_samples",
    "make_predictor",
]


@runtime_checkable
class Predictor(Protocol):
    name: str
    horizon_s: float
    aux_channels: int

    def step(self, value: float, aux: Sequence[float] | None = None) -> float:
        """Consume x[n] (and, if ``aux_channels > 0``, the synchronous extra channels'
        samples ``aux``); return the prediction of x[n + H]."""
        ...

    def reset(self) -> None:
        """Forget everything (after a divergence)."""
        ...

    def restart(self) -> None:
        """Forget the recent samples but keep what was learnt (after a gap, a jump or
        invalid data: the delay vector no longer describes one stretch of breathing, the
        patient's breathing is still the one learnt)."""
        ...

    @property
    def diverged(self) -> bool:
        """True if the state is non-finite or the recent error exploded (until reset)."""
        ...

    @property
    def ready(self) -> bool:
        """True once the prediction is a forecast, not just the current value."""
        ...


# Inputs beyond this magnitude (mm) are not breathing: the predictor latches ``diverged``
# instead of letting the value overflow its running sums.
_MAX_ABS_INPUT_MM = 1.0e6

# ``diverged`` fires when the recent RMS error (half-life 2 s) exceeds this multiple of the
# recent RMS error of no prediction, plus an absolute slack (mm). Predicting 4x worse than
# not predicting at all is a fault, not a bad breath: on every recorded trace the ratio
# stays below 1.5 for the default predictor, and the bench counts any alarm.
_DIVERGED_ERROR_RATIO = 4.0
_DIVERGED_SLACK_MM = 1.0
_DIV_RATIO2 = _DIVERGED_ERROR_RATIO**2  # squared once, not at every sample
_DIV_SLACK2 = _DIVERGED_SLACK_MM**2
_DIVERGED_HALF_LIFE_S = 2.0

# A learner's output is used only after this much learning; until then the predictor says
# "no change" (the current value). A 21-parameter regression fitted on one or two breaths
# extrapolates wildly (seen on a LARK trace at 8.8 s), and the first breaths after a
# reset are also where the analogue library is too small to hold a match.
_MIN_LEARNING_S = 10.0

# Extra input channels: the ridge sees each one's block increments over the last second
# (5 values in 0.2 s blocks); the analogue embedding appends each one's increments over its
# own span (2 s) with the main channel's lag weights. Chosen on half of the ExtMarker
# recordings (longer aux vectors for the ridge overfit: 21 + 20 k parameters).
_AUX_RIDGE_SPAN_S = 1.0

# Elastic analogue queries: the playback speeds at which the query embedding is also built
# (see the module docstring), and the range accepted. Beyond 2x either way a "faster or
# slower twin" is another breathing pattern, and the delay lines would need long histories.
DEFAULT_SPEEDS = (0.9, 1.0, 1.11)
_MIN_SPEED = 0.5
# the squared norm of an empty analogue library slot in the elastic query's matrix product
# (finite: never chosen, as the query needs 2 k filled slots, and no inf * 0 in the product)
_EMPTY_NORM2 = 1.0e300
_MAX_SPEED = 2.0

# The delay line's buffer holds this many times the rows its look-backs need (see
# _DelayLine): the newest rows move to its start once per (this - 1) * size samples.
_ROWS_PER_SIZE = 4


def _check_aux_channels(aux_channels: object) -> int:
    if not (isinstance(aux_channels, numbers.Integral) and not isinstance(aux_channels, bool)):
        raise ValueError(f"aux_channels must be an integer >= 0, got {aux_channels!r}")
    if aux_channels < 0:
        raise ValueError(f"aux_channels must be an integer >= 0, got {aux_channels!r}")
    return int(aux_channels)


def _aux_values(aux: object, k: int) -> list[float]:
    """``aux`` as a list of ``k`` finite floats; ValueError otherwise."""
    if aux is None:
        raise ValueError(f"expected {k} aux channel value(s) per sample, got None")
    try:
        n = len(aux)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"expected {k} aux channel value(s) per sample, as a sequence; got {aux!r}"
        ) from None
    if n != k:
        raise ValueError(f"expected {k} aux channel value(s) per sample, got {n}")
    values = [float(u) for u in aux]  # type: ignore[union-attr]
    for u in values:
        if not math.isfinite(u):
            raise ValueError(f"non-finite aux sample {u!r}: restart the predictor across it")
    return values


def horizon_samples(rate_hz: float, horizon_s: float) -> int:
    """The horizon in samples: ``horizon_s * rate_hz`` rounded to the nearest integer
    (halves up), and at least 1 unless the horizon is 0."""
    _check_rate_horizon(rate_hz, horizon_s)
    if horizon_s == 0.0:
        return 0
    # The 1e-9 guards products such as 0.15 * 10 = 1.4999999999999998 against
    # rounding down.
    return max(1, math.floor(horizon_s * rate_hz + 0.5 + 1e-9))


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_rate_horizon(rate_hz: float, horizon_s: float) -> None:
    if not (_is_real(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a finite positive number, got {rate_hz!r}")
    if not (_is_real(horizon_s) and horizon_s >= 0):
        raise ValueError(f"horizon_s must be a finite number >= 0, got {horizon_s!r}")


def _half_life_factor(half_life_s: float, interval_s: float) -> float:
    """Per-update forgetting factor that halves a weight after ``half_life_s`` seconds."""
    return 0.5 ** (interval_s / half_life_s)


# -- the shared delay line ------------------------------------------------------------------


class _DelayLine:
    """Recent samples of the main channel (and of ``n_aux`` extra channels) and their
    running sums in one buffer of rows.

    ``features(back, out)`` fills, for the sample ``back`` steps ago, the increments
    ``x[n-back] - mean(block j)`` for ``n_taps`` consecutive blocks of ``tap_s`` seconds
    going back from that sample (block 0 contains the sample itself), then (with
    ``n_aux``) each extra channel's ``aux_taps`` increments; with ``bias`` an entry 1 sits
    between the main channel's and the extra channels' entries. Block edges are whole
    samples, so at 5 Hz a 0.2 s block is one sample and at 30 Hz six.

    The channels are pushed and reset together, so they share one position: each time is
    one row of the buffer (flattened), holding the samples of every channel, then their
    running sums; the newest row is ``pos``. A query gathers what it needs of every channel
    with one ``take`` from a window ending at the newest row, with index arrays fixed at
    construction (and ``set_speeds``). Rows are written once, one after another, so that
    every look-back (at most ``size - 2`` rows) is one contiguous index range; when the
    buffer (``_ROWS_PER_SIZE * size`` rows) is full, its newest ``size - 1`` rows move to
    its start: one copy every few hundred samples instead of a ring written twice per
    sample. Rows never written read as 0, as after ``reset``.

    Values are stored minus the first sample after a reset (per channel), so a large
    constant offset (an IR marker at -490 mm in camera coordinates) costs no precision in
    the running sum.
    """

    def __init__(
        self,
        rate_hz: float,
        tap_s: float,
        n_taps: int,
        max_back: int,
        n_aux: int = 0,
        aux_taps: int = 0,
        bias: bool = False,
    ):
        step = max(tap_s * rate_hz, 1.0)  # a block is at least one sample
        self._step = step
        self.edges = self._edges(n_taps)
        self.inv_len = 1.0 / np.diff(self.edges).astype(np.float64)
        self.n_taps = n_taps
        self.max_back = max_back
        self.n_aux = n_aux
        self.aux_taps = aux_taps if n_aux else 0
        C = 1 + n_aux
        self.C = C
        self.W = 2 * C  # row layout: the C samples, then the C running sums
        # per channel: its block edges, the inverse block lengths, its first feature column
        self._chans = [(self.edges, self.inv_len, 0)]
        if n_aux:
            e_aux = self._edges(aux_taps)
            inv_aux = 1.0 / np.diff(e_aux).astype(np.float64)
            first = n_taps + (1 if bias else 0)
            self._chans += [(e_aux, inv_aux, first + c * aux_taps) for c in range(n_aux)]
        self.n_features = n_taps + (1 if bias else 0) + n_aux * self.aux_taps
        self._bias = n_taps if bias else -1
        R = max(int(e[-1]) for e, _, _ in self._chans)  # the oldest edge read by features
        self._reach_f = R
        self.size = R + max_back + 2
        W = self.W
        # features: gather (3, n_features) from the window of rows p - R .. p (p: the
        # anchor sample): running sums at the near and far edge of each block, the sample
        f_idx = np.zeros((3, self.n_features), dtype=np.intp)
        f_inv = np.zeros(self.n_features)  # 0 at the bias column (set to 1 afterwards)
        f_idx[:, :] = R * W  # the bias column reads the main sample
        # linear models on the sums: each channel's sample, then its sums at every edge
        lin = [R * W + c for c in range(C)]
        nf = self.n_features
        chan = np.zeros((C, nf))  # each channel's feature columns
        prev: list[int] = []  # coefficient of the sum at edge j: a[j - 1] - a[j] (a: w / len)
        cur: list[int] = []  # (index nf: 0, before the first and after the last block)
        for c, (e, inv, first) in enumerate(self._chans):
            n = e.size - 1
            cols = slice(first, first + n)
            f_idx[0, cols] = (R - e[:-1]) * W + C + c
            f_idx[1, cols] = (R - e[1:]) * W + C + c
            f_idx[2, cols] = R * W + c
            f_inv[cols] = inv
            lin.extend((R - e) * W + C + c)
            chan[c, cols] = 1.0
            prev.extend([nf] + list(range(first, first + n)))
            cur.extend(list(range(first, first + n)) + [nf])
        self._lin_chan = chan
        self._lin_prev = np.asarray(prev, dtype=np.intp)
        self._lin_cur = np.asarray(cur, dtype=np.intp)
        self._lin_a = np.zeros(nf + 1)
        self._f_idx = f_idx
        self._f_inv = f_inv
        self._f_g = np.zeros((3, self.n_features))
        self._f_m = np.zeros(self.n_features)
        self._lin_idx = np.asarray(lin, dtype=np.intp)
        self._lin_g = np.zeros(self._lin_idx.size)
        # The newest row's running sums and each channel's origin, as Python floats: push
        # does its few scalar operations without numpy's per-call overhead (the same IEEE
        # double arithmetic as on arrays, so the same values).
        self._sums = [0.0] * C
        self._org = [0.0] * C
        self._alloc()
        self.reset()

    def _alloc(self) -> None:
        self._rows = _ROWS_PER_SIZE * self.size
        self._buf = np.zeros(self._rows * self.W)

    def _edges(self, n_taps: int) -> np.ndarray:
        edges = [0]
        for j in range(1, n_taps + 1):
            edges.append(max(edges[-1] + 1, math.floor(j * self._step + 0.5)))
        return np.asarray(edges, dtype=np.intp)

    def set_speeds(self, speeds: Sequence[float], n: int, n_aux_taps: int = 0) -> None:
        """Prepare ``scaled_features`` for the playback ``speeds``, the first ``n`` blocks
        of the main channel and the first ``n_aux_taps`` of each extra channel, and grow the
        ring to the history that the fastest speed reads. Call before any sample (it clears
        the line).

        At speed ``s`` block ``j`` spans ``s * j * tap`` to ``s * (j + 1) * tap`` back, in
        fractional samples: the running sum at a fractional edge ``e = i + f`` is the linear
        interpolation ``(1 - f) cs[i] + f cs[i + 1]`` (``cs[i]``: the sum up to ``i``
        samples back), i.e. a block mean whose edge samples count in part. The integer
        offsets and weights are fixed here; a query is then one gather and a few vector
        operations on preallocated arrays."""
        sp = np.asarray(speeds, dtype=np.float64)[:, None]
        # (channel, blocks read): the main channel's n, each extra channel's n_aux_taps
        parts = [(0, n)] + [(c, n_aux_taps) for c in range(1, self.C)]
        i0s, fracs, invs, chans = [], [], [], []
        for c, m in parts:
            edges = sp * (self._step * np.arange(m + 1))
            i0 = np.floor(edges).astype(np.intp)
            i0s.append(i0)
            fracs.append(edges - i0)
            invs.append(1.0 / np.diff(edges, axis=1))
            chans.append(np.full(m, c, dtype=np.intp))
        reach = max(int(i0.max()) for i0 in i0s) + 1  # the oldest sample read, back
        # as features(): at least two spare slots beyond the oldest sample read
        self.size = max(self.size, reach + 2)
        self._alloc()
        self._reach = reach
        W, C = self.W, self.C
        lo = np.concatenate([i0[:, :-1] for i0 in i0s], axis=1)  # (S, N): near edges
        hi = np.concatenate([i0[:, 1:] for i0 in i0s], axis=1)  # far edges
        f_lo = np.concatenate([f[:, :-1] for f in fracs], axis=1)
        f_hi = np.concatenate([f[:, 1:] for f in fracs], axis=1)
        ch = np.broadcast_to(np.concatenate(chans), lo.shape)
        # from the window of rows p - reach .. p: sums at i0 and i0 + 1 back at the near
        # edge, the same at the far edge, then the sample itself
        self._s_idx = np.stack(
            [
                (reach - lo) * W + C + ch,
                (reach - lo - 1) * W + C + ch,
                (reach - hi) * W + C + ch,
                (reach - hi - 1) * W + C + ch,
                reach * W + ch,
            ]
        )
        self._s_w = np.stack([1.0 - f_lo, f_lo, 1.0 - f_hi, f_hi])
        self._s_inv_len = np.concatenate(invs, axis=1)
        self._s_g = np.zeros(self._s_idx.shape)
        self._s_a = np.zeros(lo.shape)
        self._s_b = np.zeros(lo.shape)
        self.reset()

    def scaled_features(self, out: np.ndarray) -> None:
        """Fill ``out`` (``(len(speeds), N)``, any strides) with the increments of the
        newest sample over the blocks of ``set_speeds`` at each of its speeds (the main
        channel's ``n``, then each extra channel's ``n_aux_taps``): ``features(0)`` with
        block edges ``s * j * tap`` instead of ``j * tap``."""
        p = self.pos
        W = self.W
        g = self._s_g
        self._buf[(p - self._reach) * W : (p + 1) * W].take(self._s_idx, out=g)
        w = self._s_w
        np.multiply(g[:4], w, out=g[:4])
        a = self._s_a
        b = self._s_b
        np.add(g[0], g[1], out=a)  # the running sums at the near edges
        np.add(g[2], g[3], out=b)  # at the far edges
        a -= b
        a *= self._s_inv_len
        np.subtract(g[4], a, out=out)

    def reset(self) -> None:
        self._buf.fill(0.0)
        self._sums = [0.0] * self.C
        self.pos = self.size - 1  # the rows before it read as 0 until they are written
        self.count = 0
        self.origin = 0.0

    @property
    def full(self) -> bool:
        """Enough history for ``features(back)`` with any ``back <= max_back``."""
        return self.count >= self.size

    def push(self, value: float, aux: Sequence[float] = ()) -> None:
        """Append a sample of every channel (``aux``: the ``n_aux`` extra ones)."""
        vals = [value, *aux] if self.n_aux else [value]
        if self.count == 0:
            self._org = list(map(float, vals))
            self.origin = self._org[0]
        xs = list(map(sub, vals, self._org))  # the samples, origin removed
        self._sums = sums = list(map(add, self._sums, xs))
        row = xs + sums
        W = self.W
        buf = self._buf
        pos = self.pos + 1
        if pos == self._rows:
            # full: the newest size - 1 rows (all that any look-back reads) to the start
            keep = self.size - 1
            buf[: keep * W] = buf[(pos - keep) * W : pos * W]
            pos = keep
        self.pos = pos
        buf[pos * W : (pos + 1) * W] = row
        self.count += 1

    def value(self, back: int = 0) -> float:
        """The (origin-removed) main sample ``back`` steps ago."""
        return float(self._buf[(self.pos - back) * self.W])

    def features(self, back: int, out: np.ndarray) -> float:
        """Fill ``out[:n_features]`` with the block increments at ``back`` (the bias entry,
        if any, with 1); return the main sample there."""
        p = self.pos - back
        W = self.W
        g = self._f_g
        self._buf[(p - self._reach_f) * W : (p + 1) * W].take(self._f_idx, out=g)
        m = self._f_m
        np.subtract(g[0], g[1], out=m)
        m *= self._f_inv
        np.subtract(g[2], m, out=out[: self.n_features])
        if self._bias >= 0:
            out[self._bias] = 1.0
        return float(self._buf[p * W])

    def linear_model(self, w: np.ndarray) -> tuple[np.ndarray, float]:
        """A linear model on the features (the layout of ``features``, the bias entry
        excluded), rewritten on the newest row and the running sums at the block edges:
        ``w . z = coef . linear_sums()`` plus the bias weight, the block means telescoped
        into ``coef``. Per sample that is one gather and one dot product instead of
        building the features (the ridge is evaluated at every sample, refitted on
        ticks)."""
        coef = np.empty(self._lin_idx.size)
        C = self.C
        nf = self.n_features
        a = self._lin_a  # a[nf] stays 0
        np.multiply(w[:nf], self._f_inv, out=a[:nf])  # 0 at the bias column
        np.dot(self._lin_chan, w[:nf], out=coef[:C])  # each channel's sample: sum of w
        np.subtract(a.take(self._lin_prev), a.take(self._lin_cur), out=coef[C:])
        return coef, (float(w[self._bias]) if self._bias >= 0 else 0.0)

    def linear_sums(self) -> np.ndarray:
        """The newest samples and running sums that ``linear_model`` coefficients weigh."""
        p = self.pos
        W = self.W
        g = self._lin_g
        self._buf[(p - self._reach_f) * W : (p + 1) * W].take(self._lin_idx, out=g)
        return g


# -- learners on block-increment features ------------------------------------------------------
# A learner sees features z (block increments and a trailing bias 1) and learns the target
# y = x[n+H] - x[n]. Learners combined in the ensemble share one delay line, so the
# features are computed once per sample. ``ok`` turns False if the state became non-finite.
# Dot products and partial sorts are called as array methods (``a.dot(b)``,
# ``d.argpartition(k)``): the same C routines as ``np.dot`` and ``np.argpartition``, so the
# same values, without the Python-level dispatch of the functions (they run on every tick).


class _RidgeLearner:
    """Ridge regression with exponential forgetting on the features (increments + bias).

    Sufficient statistics ``R = sum lam^k z z^T`` and ``r = sum lam^k z y`` are updated per
    tick (O(p^2)) and the weights re-solved every ``refit_ticks`` ticks (O(p^3), amortised).
    The ridge term is ``alpha * trace(R) / p``, invariant to the signal's amplitude; it
    shrinks the model toward "no change" (the ``none`` predictor).

    ``sel`` (optional) picks the ``p`` entries of a longer feature vector that this learner
    uses (the extra channels' first second); without it the vector is used as is.
    """

    def __init__(
        self, p: int, lam: float, alpha: float, refit_ticks: int, sel: np.ndarray | None = None
    ):
        self.p = p
        self.sel = sel
        self._zsel = None if sel is None else np.zeros(p)
        self.lam = lam
        self.alpha = alpha
        self.refit_ticks = max(1, refit_ticks)
        self.R = np.zeros((p, p))
        self.r = np.zeros(p)
        self.w = np.zeros(p)
        self._A = np.zeros((p, p))
        self._outer = np.zeros((p, p))
        self._zy = np.zeros(p)
        self.reset()

    def reset(self) -> None:
        self.R.fill(0.0)
        self.r.fill(0.0)
        self.w.fill(0.0)
        self.ticks = 0
        self.ok = True
        self.version = 0  # counts the weights' updates

    def learn(self, z: np.ndarray, y: float) -> None:
        if self.sel is not None:
            z = z.take(self.sel, out=self._zsel)
        self.R *= self.lam
        np.multiply.outer(z, z, out=self._outer)
        self.R += self._outer
        self.r *= self.lam
        np.multiply(z, y, out=self._zy)
        self.r += self._zy
        self.ticks += 1
        if self.ticks % self.refit_ticks == 0:
            A = self._A
            np.copyto(A, self.R)
            # the diagonal as a strided view of the flat matrix (made here, not kept)
            A.reshape(-1)[:: self.p + 1] += self.alpha * float(self.R.trace()) / self.p + 1e-12
            # LAPACK's gesv, as np.linalg.solve, without its wrapper's overhead
            w, info = _gesv(A, self.r)[2:]
            if info != 0:  # singular (np.linalg.solve: LinAlgError)
                self.ok = False
                return
            if np.isfinite(w).all():
                self.w[:] = w
                self.version += 1
            else:
                self.ok = False

    def predict(self, z: np.ndarray) -> float:
        return float(z.dot(self.w))


class _NLMSLearner:
    """Normalised LMS: ``w += mu * e * z / (eps + |z|^2)`` per tick; predicts ``w . z``.

    Starts at w = 0, i.e. at the ``none`` predictor. ``eps`` is a small fraction of the
    running feature power, so the step does not depend on the signal's amplitude.
    """

    def __init__(self, p: int, mu: float, power_lam: float):
        self.mu = mu
        self.power_lam = power_lam
        self.w = np.zeros(p)
        self._step = np.zeros(p)
        self.reset()

    def reset(self) -> None:
        self.w.fill(0.0)
        self.power = 0.0
        self.ok = True

    def learn(self, z: np.ndarray, y: float) -> None:
        zz = float(z.dot(z))
        self.power = self.power_lam * self.power + (1.0 - self.power_lam) * zz
        e = y - float(z.dot(self.w))
        np.multiply(z, self.mu * e / (zz + 1e-3 * self.power + 1e-12), out=self._step)
        self.w += self._step
        if not math.isfinite(e):
            self.ok = False

    def predict(self, z: np.ndarray) -> float:
        return float(z.dot(self.w))


class _AnalogueLearner:
    """Nearest neighbours in a weighted delay embedding (the method of analogues).

    The library holds, for each of the last ``memory`` ticks, the embedding of that moment,
    ``e = sw * z[:n]`` (increments weighted by ``sqrt(exp(-lag / decay))`` so that the last
    few tenths of a second dominate the match), and what followed, ``x[m+H] - x[m]``. A
    query takes the ``k`` nearest embeddings and averages their futures with Gaussian
    weights whose width is the k-th squared distance (smooth and scale-free).

    Squared distances are ``|l|^2 - 2 l.e + |e|^2``: the rows are stored as ``-2 l`` and
    their norms separately (``inf`` for empty slots, which are then never chosen), so a
    query is one matrix-vector product, one addition and one partial sort.

    With extra channels ``sel`` picks the embedded entries of the feature vector (the main
    channel's first ``n_main`` increments, then each extra channel's), and ``weights`` has
    one lag weight per picked entry; without it the embedding is ``z[:n]``.

    Elastic queries (``n_speeds > 1``): before each ``predict`` the owner fills ``zs``
    (``n_speeds - 1`` rows, the layout of the picked entries, unweighted) with the current
    embedding read at the other playback speeds (``_DelayLine.scaled_features``). The
    query is then the ``n_speeds`` rows (speed 1 first), one matrix product against the
    library and one partial sort of all ``n_speeds * memory`` distances; the kernel is the
    same. ``learn`` is unchanged: the library holds speed-1 embeddings only. With
    ``n_speeds = 1`` nothing changes.
    """

    def __init__(
        self,
        n: int,
        weights: np.ndarray,
        memory: int,
        k: int,
        sel: np.ndarray | None = None,
        n_speeds: int = 1,
    ):
        self.n = n
        self.sel = sel
        self._zsel = None if sel is None else np.zeros(n)
        self.k = k
        self.sw = weights
        self.memory = memory
        # -2 * embedding; for elastic queries two more columns, |e|^2 (huge for empty
        # slots) and 1, so that one matrix product gives the full squared distances
        self.lib = np.zeros((memory, n + 2 if n_speeds > 1 else n))
        self.norm2 = np.full(memory, np.inf)
        self.fut = np.zeros(memory)
        self._e = np.zeros(n)
        self._d = np.zeros(memory)
        self.n_speeds = n_speeds
        if n_speeds > 1:
            # the query at the other speeds, unweighted, in the layout of z.take(sel): the
            # owner fills it before each predict (_DelayLine.scaled_features)
            self.zs = np.zeros((n_speeds - 1, n))
            # weighted queries, speed 1 first, then the columns 1 and |q|^2 (see lib)
            self._q = np.zeros((n_speeds, n + 2))
            self._q[:, n] = 1.0
            self._dd = np.zeros((n_speeds, memory))
        self.reset()

    def reset(self) -> None:
        self.lib.fill(0.0)
        self.norm2.fill(np.inf)
        if self.n_speeds > 1:
            self.lib[:, self.n] = _EMPTY_NORM2
            self.lib[:, self.n + 1] = 1.0
        self.fut.fill(0.0)
        self.count = 0
        self.slot = 0
        self.ok = True

    @property
    def ready(self) -> bool:
        return self.count >= 2 * self.k

    def learn(self, z: np.ndarray, y: float) -> None:
        e = self._e
        zn = z[: self.n] if self.sel is None else z.take(self.sel, out=self._zsel)
        np.multiply(zn, self.sw, out=e)
        slot = self.slot
        n = self.n
        np.multiply(e, -2.0, out=self.lib[slot, :n])
        e2 = float(e.dot(e))
        self.norm2[slot] = e2
        if self.n_speeds > 1:
            self.lib[slot, n] = e2
        self.fut[slot] = y
        self.slot = slot + 1 if slot + 1 < self.memory else 0
        if self.count < self.memory:
            self.count += 1

    def predict(self, z: np.ndarray) -> float:
        if self.n_speeds > 1:
            return self._predict_elastic(z)
        e = self._e
        zn = z[: self.n] if self.sel is None else z.take(self.sel, out=self._zsel)
        np.multiply(zn, self.sw, out=e)
        d = self._d
        self.lib.dot(e, out=d)
        d += self.norm2  # = |l|^2 - 2 l.e, i.e. the squared distance minus |e|^2
        idx = d.argpartition(self.k - 1)[: self.k]
        dk = d[idx]
        e2 = float(e.dot(e))
        # argpartition puts the k-th smallest last: the kernel width is dk[-1] + |e|^2
        width = max(float(dk[-1]) + e2, 0.0) + 1e-12
        dk += e2
        np.maximum(dk, 0.0, out=dk)  # rounding can leave -1e-16
        dk *= -1.0 / width
        np.exp(dk, out=dk)
        return float(dk.dot(self.fut[idx])) / float(dk.sum())

    def _predict_elastic(self, z: np.ndarray) -> float:
        """``predict`` over all speeds: the S weighted queries against the library in one
        matrix product, the ``k`` nearest of the ``S * memory`` distances (an entry may be
        chosen at two speeds), row-major so that entry ``i`` is library slot
        ``i % memory``."""
        q = self._q
        zn = z[: self.n] if self.sel is None else z.take(self.sel, out=self._zsel)
        n = self.n
        np.multiply(zn, self.sw, out=q[0, :n])
        np.multiply(self.zs, self.sw, out=q[1:, :n])
        qn = q[:, :n]
        np.einsum("ij,ij->i", qn, qn, out=q[:, n + 1])
        dd = self._dd
        # views made here, not kept: a kept view would not survive copy.deepcopy (the copy
        # of a view is a separate array)
        q.dot(self.lib.T, out=dd)  # |q|^2 - 2 q.l + |l|^2: full squared distances
        d = dd.reshape(-1)
        idx = d.argpartition(self.k - 1)[: self.k]
        dk = d[idx]
        width = max(float(dk[-1]), 0.0) + 1e-12  # the k-th smallest, as in predict
        np.maximum(dk, 0.0, out=dk)
        dk *= -1.0 / width
        np.exp(dk, out=dk)
        np.remainder(idx, self.memory, out=idx)
        return float(dk.dot(self.fut[idx])) / float(dk.sum())


# -- predictors --------------------------------------------------------------------------------


class NoPredictor:
    """``none``: the prediction is the current value. ``aux_channels`` is accepted (and
    ``aux`` checked as by the learning predictors) but the extra channels are not used."""

    name = "none"

    def __init__(self, rate_hz: float, horizon_s: float, aux_channels: int = 0):
        _check_rate_horizon(rate_hz, horizon_s)
        self.rate_hz = float(rate_hz)
        self.horizon_s = float(horizon_s)
        self.horizon_samples = horizon_samples(rate_hz, horizon_s)
        self.aux_channels = _check_aux_channels(aux_channels)
        self._diverged = False

    def step(self, value: float, aux: Sequence[float] | None = None) -> float:
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"non-finite sample {value!r}: restart the predictor across it")
        if self.aux_channels:
            _aux_values(aux, self.aux_channels)
        if abs(v) > _MAX_ABS_INPUT_MM:
            self._diverged = True
        return v

    def reset(self) -> None:
        self._diverged = False

    def restart(self) -> None:
        self.reset()

    @property
    def diverged(self) -> bool:
        return self._diverged

    @property
    def ready(self) -> bool:
        return not self._diverged


class _FeaturePredictor:
    """The per-sample machinery shared by the learning predictors.

    Per sample: push the value into the delay line; on a tick (every ``tick_s``), compute
    the features of the sample H steps ago and teach every learner the increment that
    followed it; score the prediction made H samples ago (divergence monitor, and the
    ensemble's weights); compute the features now and return ``x[n] + increment``.
    Subclasses build their learners in ``_build`` and map learner outputs to one increment
    in ``_combine``.

    Extra channels (``aux_channels = k > 0``): the delay line also holds each one's last
    ``aux_span_s`` (None: the subclass ignores them; ``aux`` is still checked). The feature
    vectors are laid out ``[main increments (n_taps), bias 1, channel 0 (n_aux_taps),
    channel 1, ...]`` so that with ``k = 0`` they are exactly the 1-D ones; learners pick
    their entries with an index array (``sel``).
    """

    name = "?"

    def __init__(
        self,
        rate_hz: float,
        horizon_s: float,
        span_s: float,
        tap_s: float,
        tick_s: float,
        aux_channels: int = 0,
        aux_span_s: float | None = None,
    ):
        _check_rate_horizon(rate_hz, horizon_s)
        _check_positive(span_s=span_s, tap_s=tap_s, tick_s=tick_s)
        if span_s < tap_s:
            raise ValueError(f"span_s ({span_s}) must be at least one tap ({tap_s})")
        self.aux_channels = _check_aux_channels(aux_channels)
        self.rate_hz = float(rate_hz)
        self.horizon_s = float(horizon_s)
        self.H = horizon_samples(rate_hz, horizon_s)
        self.horizon_samples = self.H
        self.tap_s = max(float(tap_s), 1.0 / self.rate_hz)  # a block is at least one sample
        self.n_taps = max(1, round(span_s / self.tap_s))
        self.tick = max(1, round(tick_s * rate_hz))  # samples per learning tick
        self.tick_interval_s = self.tick / self.rate_hz
        k = self.aux_channels if aux_span_s is not None else 0
        self.n_aux_taps = max(1, round(aux_span_s / self.tap_s)) if k else 0
        self._n_aux_read = k  # extra channels read (0 if the subclass ignores them)
        # one delay line for the main and the extra channels: pushed and reset together
        self.dl = _DelayLine(
            rate_hz, self.tap_s, self.n_taps, self.H, k, self.n_aux_taps, bias=True
        )
        p = self.n_taps + 1 + k * self.n_aux_taps
        self._z = np.zeros(p)  # features now (entry n_taps: bias 1; then the aux channels)
        self._zl = np.zeros(p)  # features of the sample H ago
        self._w_full = np.zeros(p)  # the ridge's weights spread over this layout
        self._ridge_coef = np.zeros(0)
        self._ridge_bias = 0.0
        self._div_lam = _half_life_factor(_DIVERGED_HALF_LIFE_S, 1.0 / self.rate_hz)
        self._div_after = round(2.0 * _DIVERGED_HALF_LIFE_S * self.rate_hz)
        self._min_ticks = math.ceil(_MIN_LEARNING_S / self.tick_interval_s - 1e-9)
        # the analogue's elastic query rows are filled by dl.scaled_features (set by
        # _make_analogue)
        self._scaled = False
        self._learners = self._build()
        # samples needed before features(H) (and the elastic queries, which may reach
        # further back and grow the line in _build) are defined on every channel
        self._need = self.dl.size
        self._past = [math.nan] * max(self.H, 1)
        self.reset()

    def _build(self) -> tuple:
        raise NotImplementedError

    def _combine(self) -> float:
        """The predicted increment at the newest sample (``_features_now`` gives the
        features if a learner needs them)."""
        raise NotImplementedError

    def _features_now(self) -> np.ndarray:
        z = self._z
        self.dl.features(0, z)
        return z

    def _analogue_now(self, analogue: _AnalogueLearner) -> float:
        """``analogue.predict`` of the newest sample, at every speed."""
        z = self._features_now()
        if self._scaled:
            self.dl.scaled_features(analogue.zs)
        return analogue.predict(z)

    def _aux_sel(self, n_main: int, n_aux: int, bias: bool) -> np.ndarray | None:
        """Indices into the feature vector: the first ``n_main`` main entries (and the bias),
        then the first ``n_aux`` entries of each aux channel; None without aux channels."""
        if not self._n_aux_read:
            return None
        idx = list(range(n_main)) + ([self.n_taps] if bias else [])
        for c in range(self._n_aux_read):
            o = self.n_taps + 1 + c * self.n_aux_taps
            idx.extend(range(o, o + min(n_aux, self.n_aux_taps)))
        return np.asarray(idx, dtype=np.intp)

    def _ridge_now(self, ridge: _RidgeLearner) -> float:
        """``ridge.predict(features now)``, evaluated on the running sums."""
        if ridge.version != self._sums_version:
            w = self._w_full  # zero where the ridge reads no feature
            if ridge.sel is None:
                w[: ridge.p] = ridge.w
            else:
                w[ridge.sel] = ridge.w
            self._ridge_coef, self._ridge_bias = self.dl.linear_model(w)
            self._sums_version = ridge.version
        return self._ridge_bias + float(self._ridge_coef.dot(self.dl.linear_sums()))

    def _score(self, realised: float) -> None:
        """Hook: the realised increment of the prediction made H samples ago."""

    def reset(self) -> None:
        self.dl.reset()
        for learner in self._learners:
            learner.reset()
        self._z.fill(0.0)
        self._zl.fill(0.0)
        self._z[self.n_taps] = self._zl[self.n_taps] = 1.0
        self._since_tick = 0
        self._ticks = 0
        self._bad = False
        self._err2 = 0.0
        self._none2 = 0.0
        self._scored = 0
        self._past = [math.nan] * len(self._past)
        self._slot = 0
        self._sums_version = -1  # the ridge weights that _ridge_coef was made from

    def restart(self) -> None:
        """Refill the delay vector, keeping the learners (the ridge's statistics, the
        analogue library) and the divergence monitor. Until the vector is full again (its
        span plus the horizon: about 4.4 s for the default, against the 14 s of learning
        from nothing) the prediction is the current value and ``ready`` is False. A gap in
        the surrogate need not cost the patient's learnt breathing; a divergence does
        (``reset``)."""
        if self._bad:
            self.reset()
            return
        self.dl.reset()
        self._since_tick = 0
        self._past = [math.nan] * len(self._past)
        self._slot = 0

    @property
    def diverged(self) -> bool:
        return self._bad

    @property
    def ready(self) -> bool:
        """True once predictions come from the learned model (not the current value); at
        horizon 0 the current value is the prediction."""
        return not self._bad and (
            self.H == 0 or (self._ticks >= self._min_ticks and self.dl.count >= self._need)
        )

    @property
    def ready_in_s(self) -> float:
        """How long, at the nominal rate, until ``ready``: 0 once ready; nan after a
        divergence (until ``reset``). For the console ("ready in about 9 s")."""
        if self.ready:
            return 0.0
        if self._bad:
            return math.nan
        fill = max(0, self._need - self.dl.count)  # samples until the delay line is full
        ticks_left = self._min_ticks - self._ticks
        # learning samples: counted from the one that fills the line (it is the first)
        learn = max(0, ticks_left * self.tick - self._since_tick) if ticks_left > 0 else 0
        return (fill + learn - (1 if fill and learn else 0)) / self.rate_hz

    def step(self, value: float, aux: Sequence[float] | None = None) -> float:
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"non-finite sample {value!r}: restart the predictor across it")
        k = self.aux_channels
        if k:
            # checked before any state changes (as _aux_values, which gives the errors)
            if aux is None or not hasattr(aux, "__len__") or len(aux) != k:
                _aux_values(aux, k)
            a = list(map(float, aux))
            for u in a:
                if not -_MAX_ABS_INPUT_MM <= u <= _MAX_ABS_INPUT_MM:  # also NaN, inf
                    _aux_values(a, k)  # raises if non-finite
                    self._bad = True
                    return v
        if self._bad:
            return v  # latched until reset(): the caller holds the beam and resets
        if not -_MAX_ABS_INPUT_MM <= v <= _MAX_ABS_INPUT_MM:
            self._bad = True
            return v
        dl = self.dl
        if self._n_aux_read:
            dl.push(v, a)
        else:
            dl.push(v)
        H = self.H
        if H == 0 or dl.count < self._need:
            return v
        x_now = v - dl.origin
        # learn what followed the sample H ago, now that its target x[n] is known
        self._since_tick += 1
        if self._since_tick >= self.tick:
            self._since_tick = 0
            y = x_now - dl.features(H, self._zl)
            for learner in self._learners:
                learner.learn(self._zl, y)
                if not learner.ok:
                    self._bad = True
                    return v
            self._ticks += 1
        if self._ticks < self._min_ticks:
            return v
        # score the prediction made H samples ago
        slot = self._slot
        old = self._past[slot]
        if old == old:  # not NaN: there was a prediction H samples ago
            realised = x_now - dl.value(H)
            self._score(realised)
            lam = self._div_lam
            self._err2 = err2 = lam * self._err2 + (1.0 - lam) * (old - realised) ** 2
            self._none2 = none2 = lam * self._none2 + (1.0 - lam) * realised * realised
            self._scored += 1
            if self._scored > self._div_after and err2 > _DIV_RATIO2 * none2 + _DIV_SLACK2:
                self._bad = True
                return v
        inc = self._combine()
        if not math.isfinite(inc):
            self._bad = True
            return v
        self._past[slot] = inc
        self._slot = slot + 1 if slot + 1 < len(self._past) else 0
        return v + inc


class NLMSPredictor(_FeaturePredictor):
    """``nlms``: normalised LMS on a 1 s block-increment delay vector, step size 0.02.

    The classical 1-D baseline: ``aux_channels`` is accepted (``aux`` is checked) but the
    extra channels are not used."""

    name = "nlms"

    def __init__(
        self,
        rate_hz: float,
        horizon_s: float,
        span_s: float = 1.0,
        mu: float = 0.02,
        tap_s: float = 0.2,
        tick_s: float = 0.1,
        aux_channels: int = 0,
    ):
        self._mu = mu
        super().__init__(rate_hz, horizon_s, span_s, tap_s, tick_s, aux_channels, None)

    def _build(self) -> tuple:
        _check_positive(mu=self._mu)
        power_lam = _half_life_factor(10.0, self.tick_interval_s)
        self._nlms = _NLMSLearner(self.n_taps + 1, self._mu, power_lam)
        return (self._nlms,)

    def _combine(self) -> float:
        return self._nlms.predict(self._features_now())


class RidgePredictor(_FeaturePredictor):
    """``ridge``: forgetting ridge regression on a 4 s block-increment delay vector.

    With ``aux_channels = k`` the regression also sees each extra channel's block
    increments over the last second (0.2 s blocks: 5 per channel), 21 + 5 k parameters."""

    name = "ridge"

    def __init__(
        self,
        rate_hz: float,
        horizon_s: float,
        span_s: float = 4.0,
        half_life_s: float = 60.0,
        alpha: float = 1e-3,
        refit_s: float = 0.2,
        tap_s: float = 0.2,
        tick_s: float = 0.1,
        aux_channels: int = 0,
    ):
        self._ridge_args = (half_life_s, alpha, refit_s)
        super().__init__(rate_hz, horizon_s, span_s, tap_s, tick_s, aux_channels, _AUX_RIDGE_SPAN_S)

    def _build(self) -> tuple:
        self._ridge = _make_ridge(self, *self._ridge_args)
        return (self._ridge,)

    def _combine(self) -> float:
        return self._ridge_now(self._ridge)


def _check_positive(**params: float) -> None:
    for key, value in params.items():
        if not (_is_real(value) and value > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {value!r}")


def _make_ridge(
    owner: _FeaturePredictor, half_life_s: float, alpha: float, refit_s: float
) -> _RidgeLearner:
    _check_positive(half_life_s=half_life_s, refit_s=refit_s)
    if not (_is_real(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    # the ridge always sees all of the owner's taps plus the bias, and the first second of
    # each aux channel
    n_aux = max(1, round(_AUX_RIDGE_SPAN_S / owner.tap_s))
    sel = owner._aux_sel(owner.n_taps, n_aux, bias=True)
    p = owner.n_taps + 1 if sel is None else sel.size
    lam = _half_life_factor(half_life_s, owner.tick_interval_s)
    return _RidgeLearner(p, lam, alpha, round(refit_s / owner.tick_interval_s), sel)


def _check_speeds(speeds: object) -> tuple[float, ...]:
    """``speeds`` as a tuple of floats (in the order given); ValueError unless it is a
    sequence of distinct finite reals in [0.5, 2] that includes 1.0."""
    message = (
        "speeds must be a sequence of distinct playback speeds in "
        f"[{_MIN_SPEED}, {_MAX_SPEED}] that includes 1.0, got {speeds!r}"
    )
    if isinstance(speeds, np.ndarray) and speeds.ndim == 1:
        speeds = speeds.tolist()
    if isinstance(speeds, (str, bytes)) or not isinstance(speeds, Sequence):
        raise ValueError(message)
    if not all(_is_real(s) and _MIN_SPEED <= s <= _MAX_SPEED for s in speeds):
        raise ValueError(message)
    values = [float(s) for s in speeds]
    if 1.0 not in values or len(set(values)) != len(values):
        raise ValueError(message)
    return tuple(values)


def _make_analogue(
    owner: _FeaturePredictor,
    span_s: float,
    decay_s: float,
    memory_s: float,
    k: int,
    speeds: tuple[float, ...] = (1.0,),
) -> _AnalogueLearner:
    _check_positive(span_s=span_s, decay_s=decay_s, memory_s=memory_s)
    speeds = _check_speeds(speeds)
    n = min(owner.n_taps, max(1, round(span_s / owner.tap_s)))
    lags = (np.arange(n) + 0.5) * owner.tap_s  # block j is centred (j + 0.5) taps back
    weights = np.sqrt(np.exp(-lags / decay_s))
    memory = max(4 * k, round(memory_s / owner.tick_interval_s))
    # aux channels: their increments over the same span, raw mm, the same lag weights
    n_aux = max(1, round(span_s / owner.tap_s))
    sel = owner._aux_sel(n, n_aux, bias=False)
    if sel is None:
        learner = _AnalogueLearner(n, weights, memory, k, None, len(speeds))
    else:
        n_aux = min(n_aux, owner.n_aux_taps)
        aux_lags = (np.arange(n_aux) + 0.5) * owner.tap_s
        aux_weights = np.sqrt(np.exp(-aux_lags / decay_s))
        weights = np.concatenate([weights] + [aux_weights] * owner._n_aux_read)
        learner = _AnalogueLearner(sel.size, weights, memory, k, sel, len(speeds))
    if len(speeds) > 1:
        # elastic queries: the delay line fills the query rows at the other speeds, every
        # channel of the embedding (and keeps the history the fastest one needs)
        others = tuple(s for s in speeds if s != 1.0)  # speed 1 is the query row 0
        owner.dl.set_speeds(others, n, n_aux if sel is not None else 0)
        owner._scaled = True
    return learner


class AnaloguePredictor(_FeaturePredictor):
    """``analogue``: k nearest 2 s embeddings of the last ``memory_s``; mean of what followed.

    With ``aux_channels`` the embedding also holds each extra channel's increments over
    the same ``span_s``, in raw mm with the main channel's lag weights: a moment is an
    analogue only if all channels moved alike.

    ``speeds``: elastic queries (module docstring). The current embedding is also built at
    these playback speeds (a breath a little faster or slower than its library twin still
    matches it) and the ``k`` nearest are taken over all of them; ``(1.0,)`` turns it off.
    The delay lines then keep ``span_s * max(speeds)`` of history."""

    name = "analogue"

    def __init__(
        self,
        rate_hz: float,
        horizon_s: float,
        span_s: float = 2.0,
        decay_s: float = 0.3,
        memory_s: float = 120.0,
        k: int = 16,
        tap_s: float = 0.2,
        tick_s: float = 0.1,
        aux_channels: int = 0,
        speeds: tuple[float, ...] = DEFAULT_SPEEDS,
    ):
        if not (isinstance(k, numbers.Integral) and k >= 1):
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.speeds = _check_speeds(speeds)
        self._analogue_args = (span_s, decay_s, memory_s, k, self.speeds)
        super().__init__(rate_hz, horizon_s, span_s, tap_s, tick_s, aux_channels, span_s)

    def _build(self) -> tuple:
        self._analogue = _make_analogue(self, *self._analogue_args)
        return (self._analogue,)

    def _combine(self) -> float:
        if not self._analogue.ready:
            return 0.0
        return self._analogue_now(self._analogue)


class EnsemblePredictor(_FeaturePredictor):
    """``ensemble``: analogue + ridge, weighted by the inverse of their recent squared error.

    Both learners read one 4 s delay line (the analogue uses its most recent 2 s). Each
    component's predicted increment is kept for H samples and scored against the realised
    increment; the mean squared errors decay with ``error_half_life_s``.

    With ``aux_channels`` each extra channel gets a delay line of ``analogue_span_s`` (at
    least 1 s): the ridge sees its last second, the analogue its whole span (see
    ``RidgePredictor`` and ``AnaloguePredictor``).

    ``speeds`` (default ``(0.9, 1.0, 1.11)``): the analogue's elastic queries (see
    ``AnaloguePredictor`` and the module docstring); the extra channels' delay lines then
    keep ``analogue_span_s * max(speeds)``. The ridge is not affected. Measured against
    ``speeds=(1.0,)``: liver 0.510 -> 0.465 at 0.4 s, ExtMarker 0.410 -> 0.398 at 0.2 s
    and 0.391 -> 0.394 at 0.4 s (median relative RMSE, 2 extra channels); 24 -> 34 us per
    sample at 30 Hz.
    """

    name = "ensemble"

    def __init__(
        self,
        rate_hz: float,
        horizon_s: float,
        ridge_span_s: float = 4.0,
        analogue_span_s: float = 2.0,
        half_life_s: float = 60.0,
        alpha: float = 1e-3,
        refit_s: float = 0.2,
        decay_s: float = 0.3,
        memory_s: float = 120.0,
        k: int = 16,
        error_half_life_s: float = 10.0,
        tap_s: float = 0.2,
        tick_s: float = 0.1,
        aux_channels: int = 0,
        speeds: tuple[float, ...] = DEFAULT_SPEEDS,
    ):
        if not (isinstance(k, numbers.Integral) and k >= 1):
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        _check_positive(error_half_life_s=error_half_life_s)
        self.speeds = _check_speeds(speeds)
        self._ridge_args = (half_life_s, alpha, refit_s)
        self._analogue_args = (analogue_span_s, decay_s, memory_s, k, self.speeds)
        self._error_half_life_s = error_half_life_s
        span_s = max(ridge_span_s, analogue_span_s)
        aux_span_s = max(_AUX_RIDGE_SPAN_S, analogue_span_s)
        super().__init__(rate_hz, horizon_s, span_s, tap_s, tick_s, aux_channels, aux_span_s)

    def _build(self) -> tuple:
        self._w_lam = _half_life_factor(self._error_half_life_s, 1.0 / self.rate_hz)
        self._ridge = _make_ridge(self, *self._ridge_args)
        self._analogue = _make_analogue(self, *self._analogue_args)
        return (self._ridge, self._analogue)

    def reset(self) -> None:
        super().reset()
        h = len(self._past)
        self._past_ridge = [math.nan] * h  # component predictions, scored H samples later
        self._past_analogue = [math.nan] * h
        self._mse_ridge = 0.0
        self._mse_analogue = 0.0
        self._n_mse = 0
        self._correction = math.nan  # analogue - ridge at the last search

    def restart(self) -> None:
        super().restart()
        h = len(self._past)
        self._past_ridge = [math.nan] * h
        self._past_analogue = [math.nan] * h
        self._correction = math.nan  # the last search was before the gap

    def _score(self, realised: float) -> None:
        slot = self._slot  # the slot of the prediction made H samples ago
        a = self._past_ridge[slot]
        b = self._past_analogue[slot]
        if a == a and b == b:
            lam = self._w_lam
            self._mse_ridge = lam * self._mse_ridge + (1.0 - lam) * (a - realised) ** 2
            self._mse_analogue = lam * self._mse_analogue + (1.0 - lam) * (b - realised) ** 2
            self._n_mse += 1

    def _combine(self) -> float:
        p_ridge = self._ridge_now(self._ridge)
        if not self._analogue.ready:
            p_analogue = p_ridge
        elif self._since_tick == 0 or self._correction != self._correction:
            p_analogue = self._analogue_now(self._analogue)
            self._correction = p_analogue - p_ridge
        else:
            # Between learning ticks (above 10 Hz) the analogue's correction to the ridge is
            # held: the neighbour search is most of the cost, and the analogues' shape
            # correction changes little within a tenth of a second.
            p_analogue = p_ridge + self._correction
        slot = self._slot
        self._past_ridge[slot] = p_ridge
        self._past_analogue[slot] = p_analogue
        if self._n_mse == 0:
            return 0.5 * (p_ridge + p_analogue)
        # inverse-MSE weights; the floor keeps them defined on a perfectly predicted signal
        e_r = self._mse_ridge + 1e-12
        e_a = self._mse_analogue + 1e-12
        return (p_ridge * e_a + p_analogue * e_r) / (e_r + e_a)


PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "none": NoPredictor,
    "nlms": NLMSPredictor,
    "ridge": RidgePredictor,
    "analogue": AnaloguePredictor,
    "ensemble": EnsemblePredictor,
}

DEFAULT_PREDICTOR = "ensemble"


def make_predictor(name: str, rate_hz: float, horizon_s: float, **params: Any) -> Predictor:
    """A predictor by name (``"default"`` = ``DEFAULT_PREDICTOR``); ``params`` go to its
    constructor. Raises ValueError for an unknown name, listing the valid ones."""
    key = DEFAULT_PREDICTOR if name == "default" else name
    if key not in PREDICTORS:
        raise ValueError(
            f"unknown predictor {name!r}; valid: {', '.join(PREDICTORS)} "
            f"(or 'default' = {DEFAULT_PREDICTOR})"
        )
    return PREDICTORS[key](rate_hz, horizon_s, **params)


def evaluate_predictor(
    t_s: np.ndarray,
    x: np.ndarray,
    horizon_s: float,
    name: str,
    warmup_s: float = 30.0,
    aux: np.ndarray | None = None,
    **params: Any,
) -> dict:
    """Causal evaluation of one predictor on one uniformly sampled trace.

        ``rate = 1 / median(dt)``; ``step()`` runs over every sample in order and the prediction
        made at n is compared with ``x[n + H]``. A run of NaN samples restarts the predictor
    (``restart``: it keeps what it learnt, as in the estimator); a pair is
        scored only if no sample from n to n + H is NaN and ``t[n] >= t[0] + warmup_s``.

        Returns: ``rmse_mm``; ``relative_rmse`` = RMSE / RMSE of no prediction (``x[n]`` for
        ``x[n+H]``) over the same pairs; ``p95_mm`` (95th percentile of |error|); ``jitter_mm``
        (mean |y[n+1] - y[n]| of consecutive predictions in the scored range, Ernst 2013);
        ``mean_us_per_sample`` and ``p99_us_per_sample`` (wall time of ``step()``); plus
        ``rate_hz``, ``horizon_samples``, ``n_scored``, ``n_resets`` (restarts) and
        ``n_diverged`` (samples at which the predictor reported ``diverged``; it is then
        reset, as the estimator does).
        ``params`` go to the predictor's constructor (for sensitivity studies).

        ``aux`` (optional, shape ``(N, k)``): k extra channels sampled with ``x`` (same rows);
        the predictor is built with ``aux_channels=k`` and gets row n with ``x[n]``. A row with
        any NaN in it counts as a NaN sample: reset across it, pairs touching it not scored.
    """
    t_s = np.asarray(t_s, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if t_s.ndim != 1 or t_s.shape != x.shape or t_s.size < 3:
        raise ValueError("t_s and x must be 1-D arrays of the same length (>= 3)")
    dt = np.diff(t_s)
    if not np.all(dt > 0):
        raise ValueError("t_s must be strictly increasing")
    rate = 1.0 / float(np.median(dt))
    finite = np.isfinite(x)
    aux_rows: list | None = None
    if aux is None:
        predictor = make_predictor(name, rate, horizon_s, **params)
    else:
        aux = np.asarray(aux, dtype=np.float64)
        if aux.ndim != 2 or aux.shape[0] != x.size:
            raise ValueError(f"aux must have shape (len(x), k) = ({x.size}, k), got {aux.shape}")
        if "aux_channels" in params:
            raise ValueError("give aux (the data), not aux_channels: it is aux.shape[1]")
        predictor = make_predictor(name, rate, horizon_s, aux_channels=aux.shape[1], **params)
        finite &= np.isfinite(aux).all(axis=1)
        aux_rows = aux.tolist()
    H = horizon_samples(rate, horizon_s)
    n = x.size
    pred = np.full(n, np.nan)
    cost_ns = np.zeros(n)
    resets = diverged = 0
    was_valid = True
    clock = time.perf_counter_ns
    for i in range(n):
        if not finite[i]:
            if was_valid:
                predictor.restart()  # as the estimator does across invalid samples
                resets += 1
            was_valid = False
            continue
        was_valid = True
        value = float(x[i])
        if aux_rows is None:
            t0 = clock()
            p = predictor.step(value)
            cost_ns[i] = clock() - t0
        else:
            row = aux_rows[i]
            t0 = clock()
            p = predictor.step(value, row)
            cost_ns[i] = clock() - t0
        if predictor.diverged:
            diverged += 1
            predictor.reset()
            p = value
        pred[i] = p

    # pair n -> n + H valid if no NaN in x[n..n+H]: count NaNs in each window by cumsum
    bad = np.concatenate(([0], np.cumsum(~finite)))
    idx = np.arange(n - H)
    clean = (bad[idx + H + 1] - bad[idx]) == 0
    scored = clean & (t_s[idx] >= t_s[0] + warmup_s) & np.isfinite(pred[idx])
    i_s = idx[scored]
    if i_s.size == 0:
        raise ValueError(
            f"no scored samples: trace of {t_s[-1] - t_s[0]:.1f} s with warm-up {warmup_s} s"
        )
    err = pred[i_s] - x[i_s + H]
    err_none = x[i_s] - x[i_s + H]
    rmse = float(np.sqrt(np.mean(err**2)))
    rmse_none = float(np.sqrt(np.mean(err_none**2)))
    # jitter over consecutive predictions that are both in the scored range
    consecutive = scored[:-1] & scored[1:] if scored.size > 1 else np.zeros(0, bool)
    j_idx = idx[:-1][consecutive]
    jitter = float(np.mean(np.abs(pred[j_idx + 1] - pred[j_idx]))) if j_idx.size else math.nan
    stepped = cost_ns[finite] / 1e3
    return {
        "rmse_mm": rmse,
        "relative_rmse": rmse / rmse_none if rmse_none > 0 else math.nan,
        "p95_mm": float(np.percentile(np.abs(err), 95)),
        "jitter_mm": jitter,
        "mean_us_per_sample": float(np.mean(stepped)),
        "p99_us_per_sample": float(np.percentile(stepped, 99)),
        "rate_hz": rate,
        "horizon_samples": H,
        "n_scored": int(i_s.size),
        "n_resets": resets,
        "n_diverged": diverged,
    }
