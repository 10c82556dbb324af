"""Gating accuracy on a recorded trace: drive the session core in session time, then score
its beam against the true target.

What this module is for: the gating benchmark (``bench/bench_gating.py``) and QA questions of
the kind "on this patient's motion, how often was the beam on while the target was outside
the window, and how late did it follow?". It does two things, both pure and clock-injected:

1. ``run_core`` feeds a ``SessionCore`` (the one the live controller and log replay use)
   with surrogate samples, localised X-ray fiducial positions and operator actions, in
   time order, exactly as the controller does (sample -> ``on_surrogate`` + ``decide(t,
   new_sample=True)``; fiducial / command -> ``on_fiducial`` / ``on_command`` +
   ``decide(t, new_sample=False)``). An interlock that needs an acknowledgement is
   acknowledged by the simulated operator ``ack_delay_s`` after it becomes acknowledgeable.
2. ``score`` compares the beam with the truth on a fine time grid. The beam at time t is
   the decision in force at ``t - latency_s`` (``beam_at``; the latency from the sample to the
   beam actually switching, which prediction is meant to compensate). Truth is "the true
   target is inside the gating window at t": the true internal position on the gated
   axis inside the amplitude window, inside the breath-hold tolerance of the hold's true
   level, or the true breathing phase (from the internal trace, offline) inside the
   phase window.

Figures (all over the scored interval; times in seconds, positions in mm):

- ``duty_cycle``: fraction of time the beam is on; ``true_duty_cycle`` the same for truth.
- ``accuracy``: fraction of time the beam state equals the truth (on and inside, or off
  and outside); ``false_on`` (beam on, target outside) and ``false_off`` split the rest.
- ``residual``: while the beam is on, the distance of the true target from the window
  centre on the gated axis, ``|x - centre|`` (mean and P95); ``excursion`` is the part
  beyond the window edge, ``max(0, |x - centre| - half_width)`` (mean, P95, max). For phase
  gating the centre and half-width are those of the trace's amplitude window, so the
  residuals of the modes compare; for breath-hold they are the hold's level and the
  tolerance.
- ``timing``: every true window entry (exit) is matched to the nearest beam-on (beam-off)
  edge within ``match_s``; the error is beam edge minus true edge (positive = late). Median
  and P95 of the absolute error, the signed median, and the counts of true edges without a
  beam edge (missed) and beam edges without a true edge (spurious).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from motionctl.session import OperatorCommand, SessionCore
from motionctl.types import FiducialMeasurement, SurrogateSample

__all__ = [
    "CoreRun",
    "amplitude_window",
    "beam_at",
    "breath_holds",
    "edges",
    "run_core",
    "score",
    "true_phase",
]


@dataclass
class CoreRun:
    """What the core decided and estimated, in session time."""

    t_decision: np.ndarray  # decision times (every decision the core returned)
    beam: np.ndarray  # bool, beam enabled by that decision
    reasons: list[str]  # the decision's hold reasons, comma-separated
    t_estimate: np.ndarray  # one per surrogate sample
    predicted_mm: np.ndarray  # (N, 3) the estimate one horizon ahead
    position_mm: np.ndarray  # (N, 3) the estimate now
    estimate_valid: np.ndarray  # bool
    references: list[tuple[float, float]] = field(default_factory=list)  # breath-hold captures
    acknowledged: list[tuple[float, str]] = field(default_factory=list)
    model_points: int = 0
    model_points_rejected: int = 0


def run_core(
    cfg: dict[str, Any],
    stale_timeout_s: dict[str, float],
    t_s: np.ndarray,
    surrogate_mm: np.ndarray,
    *,
    fiducials: Sequence[tuple[float, float, tuple[float, float, float]]] = (),
    commands: Sequence[tuple] = (),
    ack_delay_s: float = 2.0,
    retry_s: float = 1.0,
    device: str | None = None,
    prepare: Callable[[SessionCore], None] | None = None,
) -> CoreRun:
    """Drive a fresh ``SessionCore`` through a recording, in session time.

    ``t_s`` (N,) receipt times of the surrogate samples and ``surrogate_mm`` (N, 3) their
    positions (LR, SI, AP). ``fiducials``: ``(t_acq, t_rx, position_mm)`` of accepted
    X-ray positions. ``commands``: ``(t, OperatorCommand)`` or ``(t, OperatorCommand,
    retry_until)``: a refused command with ``retry_until`` is tried again every ``retry_s``
    until then (a therapist who tries again while the reference cannot yet be captured).
    An interlock awaiting acknowledgement is acknowledged ``ack_delay_s`` after the core
    first reports it so (a therapist who re-images and acknowledges; never if
    ``ack_delay_s`` is inf). ``prepare(core)`` runs before the first input (what-if
    studies, e.g. another predictor).
    """
    device = device or cfg["tracking"]["surrogate_device"]
    est_rows: list[tuple] = []
    points = [0, 0]

    def record(table: str, row: tuple) -> None:
        if table == "estimates":
            est_rows.append(row)
        elif table == "events" and row[1] == "correlation" and row[2] == "model_point":
            points[0 if json.loads(row[3]).get("accepted") else 1] += 1

    core = SessionCore(cfg, record, stale_timeout_s=stale_timeout_s)
    if prepare is not None:
        prepare(core)
    # Kinds: 0 command, 1 fiducial, 2 surrogate sample (a tie keeps this order, as a
    # command or an image that arrived first is handled first by the controller's queue).
    stream: list[tuple[float, int, int]] = [(float(c[0]), 0, i) for i, c in enumerate(commands)]
    stream += [(float(f[1]), 1, i) for i, f in enumerate(fiducials)]
    stream += [(float(t), 2, i) for i, t in enumerate(t_s)]
    heapq.heapify(stream)
    t_dec: list[float] = []
    beam: list[bool] = []
    reasons: list[str] = []
    run = CoreRun(
        np.empty(0),
        np.empty(0, bool),
        [],
        np.empty(0),
        np.empty((0, 3)),
        np.empty((0, 3)),
        np.empty(0, bool),
    )
    ack_due: dict[str, float] = {}

    def decide(t: float, new_sample: bool) -> None:
        core.set_beam_fault(t, None)
        decision = core.decide(t, new_sample=new_sample)
        if decision is not None:
            t_dec.append(t)
            beam.append(decision.beam_enabled)
            reasons.append(decision.reason_text)
        for key in core.status.awaiting_ack:
            ack_due.setdefault(key, t + ack_delay_s)

    def acknowledge(t_until: float) -> None:
        for key, t_ack in sorted(ack_due.items(), key=lambda kv: kv[1]):
            if t_ack <= t_until:
                del ack_due[key]
                if not core.on_command(t_ack, OperatorCommand("acknowledge", key, who="bench")):
                    run.acknowledged.append((t_ack, key))
                decide(t_ack, False)

    while stream:
        t, kind, i = heapq.heappop(stream)
        if ack_due:
            acknowledge(t)
        if kind == 2:
            x, y, z = (float(v) for v in surrogate_mm[i])
            core.on_surrogate(SurrogateSample(device, i, t, t, (x, y, z)))
            decide(t, True)
        elif kind == 1:
            t_acq, t_rx, pos = fiducials[i]
            m = FiducialMeasurement(
                "xray", i, float(t_acq), float(t_rx), "stereo", True, "",
                tuple(float(v) for v in pos), (0.0, 0.0, 0.0), 3, 0.0, 0.3,
            )  # fmt: skip
            core.on_fiducial(m)
            decide(t, False)
        else:
            command = commands[i][1]
            refusal = core.on_command(t, command)
            if command.kind == "capture_reference" and not refusal:
                run.references.append((t, float(core.gate.reference)))
            decide(t, False)
            if refusal and len(commands[i]) > 2 and t + retry_s <= commands[i][2]:
                heapq.heappush(stream, (t + retry_s, 0, i))

    run.t_decision = np.asarray(t_dec, float)
    run.beam = np.asarray(beam, bool)
    run.reasons = reasons
    if est_rows:
        rows = est_rows
        run.t_estimate = np.array([r[0] for r in rows], float)
        run.position_mm = np.array([r[1:4] for r in rows], float)
        run.predicted_mm = np.array([r[4:7] for r in rows], float)
        run.estimate_valid = np.array([bool(r[8]) for r in rows])
    run.model_points, run.model_points_rejected = points
    return run


# -- the truth --------------------------------------------------------------------------------
def amplitude_window(
    t_s: np.ndarray,
    x_mm: np.ndarray,
    *,
    setup_s: float = 60.0,
    duty: float = 0.4,
    exhale_high: bool = True,
    margin_mm: float = 1.0,
    min_width_mm: float = 3.0,
    max_width_mm: float = 20.0,
) -> tuple[float, float]:
    """The end-exhale amplitude window ``(centre, width)`` by a fixed rule, from the first
    ``setup_s`` of the true position on the gated axis (as a physicist sets it from the
    set-up fluoroscopy): the inner edge leaves the fraction ``duty`` of those samples on the
    exhale side; the outer edge is ``margin_mm`` beyond the most-exhale position seen. The
    width is clamped to [min_width_mm, max_width_mm] about the outer edge.

    ``exhale_high``: end-exhale is the high end (SI of the liver: superior at exhale)."""
    t_s = np.asarray(t_s, float)
    x = np.asarray(x_mm, float)
    first = x[(t_s - t_s[0]) <= setup_s]
    first = first[np.isfinite(first)]
    if first.size < 2:
        raise ValueError("no samples in the set-up interval to set the window from")
    sign = 1.0 if exhale_high else -1.0
    y = sign * first  # exhale is high
    inner = float(np.quantile(y, 1.0 - duty))
    outer = float(np.max(y)) + margin_mm
    width = min(max(outer - inner, min_width_mm), max_width_mm)
    centre = sign * (outer - width / 2.0)
    return centre, width


def true_phase(
    t_s: np.ndarray, x_mm: np.ndarray, *, exhale_high: bool = True, min_period_s: float = 1.5
) -> np.ndarray:
    """The true breathing phase in [0, 1) (0 = end-exhale), offline, from the internal
    position: end-exhale is each most-exhale point between consecutive inhale troughs (found
    with a prominence of a quarter of the P5-P95 range and ``min_period_s`` apart); the phase
    runs linearly from one end-exhale to the next. NaN before the first and after the last.
    """
    from scipy.signal import find_peaks

    t_s = np.asarray(t_s, float)
    y = np.asarray(x_mm, float) * (1.0 if exhale_high else -1.0)
    dt = float(np.median(np.diff(t_s)))
    k = max(1, round(0.4 / dt))  # a 0.4 s running mean: camera/robot noise, not breathing
    smooth = np.convolve(y, np.ones(k) / k, mode="same")
    p5, p95 = np.percentile(smooth, [5, 95])
    prominence = max(0.25 * (p95 - p5), 0.3)
    distance = max(1, int(min_period_s / dt))
    peaks, _ = find_peaks(smooth, prominence=prominence, distance=distance)
    phase = np.full(t_s.shape, np.nan)
    for a, b in zip(peaks[:-1], peaks[1:], strict=True):
        phase[a:b] = (t_s[a:b] - t_s[a]) / (t_s[b] - t_s[a])
    return phase


def breath_holds(
    t_s: np.ndarray,
    x_mm: np.ndarray,
    *,
    still_mm: float = 1.0,
    look_s: float = 2.0,
    min_s: float = 5.0,
    merge_s: float = 1.0,
) -> list[tuple[float, float]]:
    """Breath holds in a true trace: ``(start, end)`` of each run of at least ``min_s`` in
    which the position stays within ``still_mm`` (peak to peak) over every ``look_s``; runs
    less than ``merge_s`` apart are one hold (a glitch does not end a hold, and no breath
    between two holds is that short)."""
    t_s = np.asarray(t_s, float)
    x = np.asarray(x_mm, float)
    n = len(t_s)
    still = np.zeros(n, bool)
    j = 0
    for i in range(n):
        j = max(j, i)
        while j + 1 < n and t_s[j + 1] - t_s[i] <= look_s:
            j += 1
        if t_s[j] - t_s[i] >= 0.9 * look_s:
            seg = x[i : j + 1]
            still[i] = float(seg.max() - seg.min()) <= still_mm
    runs: list[list[float]] = []
    i = 0
    while i < n:
        if not still[i]:
            i += 1
            continue
        k = i
        while k + 1 < n and still[k + 1]:
            k += 1
        end = float(min(t_s[-1], t_s[k] + look_s))  # the last still look covers look_s more
        if runs and t_s[i] - runs[-1][1] <= merge_s:
            runs[-1][1] = end
        else:
            runs.append([float(t_s[i]), end])
        i = k + 1
    return [(a, b) for a, b in runs if b - a >= min_s]


# -- scoring ----------------------------------------------------------------------------------
def beam_at(
    t_eval: np.ndarray, t_decision: np.ndarray, beam: np.ndarray, latency_s: float
) -> np.ndarray:
    """The beam state at ``t_eval``: the decision in force at ``t_eval - latency_s`` (off
    before the first decision)."""
    idx = np.searchsorted(t_decision, np.asarray(t_eval) - latency_s, side="right") - 1
    out = np.zeros(len(idx), bool)
    ok = idx >= 0
    out[ok] = np.asarray(beam, bool)[idx[ok]]
    return out


def edges(t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Times of the off->on and on->off changes of a sampled boolean (at the first sample
    of the new state)."""
    s = np.asarray(state, bool).astype(np.int8)
    d = np.diff(s)
    t = np.asarray(t)
    return t[1:][d == 1], t[1:][d == -1]


def _match(truth: np.ndarray, beam: np.ndarray, match_s: float) -> tuple[np.ndarray, int, int]:
    """Signed errors (beam - truth) of the true edges matched one-to-one to the nearest beam
    edge within match_s, the number of true edges missed and of spurious beam edges."""
    errors = []
    used = np.zeros(len(beam), bool)
    for te in truth:
        if len(beam) == 0:
            break
        j = int(np.searchsorted(beam, te))
        best = None
        for c in (j - 1, j, j + 1):
            if 0 <= c < len(beam) and not used[c] and abs(beam[c] - te) <= match_s:
                if best is None or abs(beam[c] - te) < abs(beam[best] - te):
                    best = c
        if best is not None:
            used[best] = True
            errors.append(beam[best] - te)
    missed = len(truth) - len(errors)
    return np.asarray(errors), missed, int((~used).sum())


def score(
    t_grid: np.ndarray,
    x_true: np.ndarray,
    inside_true: np.ndarray,
    beam: np.ndarray,
    centre_mm: np.ndarray | float,
    half_width_mm: np.ndarray | float,
    *,
    match_s: float = 1.0,
) -> dict[str, Any]:
    """The figures of one run on a uniform grid ``t_grid`` (already cut to the scored
    interval): true position on the gated axis, truth inside, beam state, and the window
    centre and half-width (per grid point or constant) for the residual."""
    inside = np.asarray(inside_true, bool)
    beam = np.asarray(beam, bool)
    n = len(t_grid)
    if n == 0:
        raise ValueError("nothing to score")
    off_centre = np.abs(np.asarray(x_true, float) - centre_mm)
    excursion = np.maximum(0.0, off_centre - half_width_mm)
    on = beam
    residual = off_centre[on]
    beyond = excursion[on]
    true_on, true_off = edges(t_grid, inside)
    beam_on, beam_off = edges(t_grid, beam)
    e_on, miss_on, spur_on = _match(true_on, beam_on, match_s)
    e_off, miss_off, spur_off = _match(true_off, beam_off, match_s)
    both = np.concatenate([e_on, e_off])

    def stats(v: np.ndarray) -> dict[str, float]:
        if v.size == 0:
            return {"median_ms": math.nan, "p95_ms": math.nan, "signed_median_ms": math.nan, "n": 0}
        a = np.abs(v)
        return {
            "median_ms": float(1e3 * np.median(a)),
            "p95_ms": float(1e3 * np.percentile(a, 95)),
            "signed_median_ms": float(1e3 * np.median(v)),
            "n": int(v.size),
        }

    return {
        "scored_s": float(t_grid[-1] - t_grid[0]),
        "duty_cycle": float(on.mean()),
        "true_duty_cycle": float(inside.mean()),
        "accuracy": float((on == inside).mean()),
        "false_on": float((on & ~inside).mean()),
        "false_off": float((~on & inside).mean()),
        "residual_mean_mm": float(residual.mean()) if residual.size else math.nan,
        "residual_p95_mm": float(np.percentile(residual, 95)) if residual.size else math.nan,
        "excursion_mean_mm": float(beyond.mean()) if beyond.size else math.nan,
        "excursion_p95_mm": float(np.percentile(beyond, 95)) if beyond.size else math.nan,
        "excursion_max_mm": float(beyond.max()) if beyond.size else math.nan,
        "half_width_mm": float(np.median(np.broadcast_to(half_width_mm, (n,)))),
        "timing_on": stats(e_on),
        "timing_off": stats(e_off),
        "timing": stats(both),
        "missed_edges": miss_on + miss_off,
        "spurious_edges": spur_on + spur_off,
        "true_edges": len(true_on) + len(true_off),
        "beam_edges": len(beam_on) + len(beam_off),
    }
