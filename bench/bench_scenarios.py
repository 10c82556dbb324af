"""Benchmark: the beam safety invariant over >= 10,000 generated fault scenarios (issue 5).

Each scenario drives a ``SessionCore`` exactly as the live controller does: every
surrogate sample -> ``on_surrogate`` then ``set_beam_fault`` + ``decide(new_sample=True)``;
a spirometer sample -> ``on_spirometer`` then a decide (a new sample when breath-hold
gating on volume requires the spirometer); a fiducial measurement, a driver event, a
beam-interface fault change -> the input then ``decide(new_sample=False)``; an operator
command -> ``on_command(t)`` then a decide at the same instant; and the controller's
wake-ups between inputs at ``min(next heartbeat, next_deadline(t))`` (or, for some configs,
at ``next_deadline`` only, as a what-if replay does) -> ``decide(new_sample=False)``.

Inputs (random, seeded, reproducible): surrogate samples with NaN / inf / out-of-range
values, NaN on a non-breathing axis, jumps, gaps (stale data), time-reversed and repeated
device timestamps, device clock steps, NaN device timestamps, a receipt time that goes
back, a stuck tracker repeating its last frame, baseline drift, samples from a second
tracker; spirometer samples with leaks, NaN volume, gaps, reordering, clock steps;
fiducial measurements (consistent, disagreeing by 10-20 mm, rejected, arriving before
the surrogate covers them, a wrong planning prior); driver events (disconnect, reconnect,
port error, malformed frames for every device), session-log write failures; beam
interface faults; operator commands (enable, disable, hold, release, window changes valid
and invalid, acknowledge of what is awaiting acknowledgement and of random keys, capture
of the breath-hold reference, unknown commands). Gating modes: amplitude (predicted and
surrogate), phase, breath-hold (volume and position); configs vary debounce, dwell
rule, window, phase window, stability time, sample rate, stale timeouts and wake-ups.

The oracle (``Oracle``) is written from the spec (issue 5, ``docs/interlocks.md``,
``motionctl/gating.py``'s docstring) and keeps its own state from the inputs it saw; it
never calls the gate, the interlock monitor or their predicates. At every decide (and
between decides: the beam stays as last commanded) it checks

    beam enabled => operator enabled and not holding (hold not released), no session-log
    failure, no beam-interface fault, every required device has sent data within its stale
    timeout, no device disconnected (and 0.2 s since it reconnected), no malformed frame in
    the last 0.2 s (counted from the device's first well-formed input after it, for a device
    that has sent any), no device timestamp going back (0.2 s of ordered ones since), no device
    clock stepped > 0.25 s against ours (0.2 s after it agrees again), no non-finite or
    out-of-range (> 500 mm; a jump: > 5 mm from the recent median and > 100 mm/s from the
    previous sample; target > 60 mm) surrogate value in the last 0.2 s, no predictor
    divergence in the last 1 s, the latest estimate valid, the input inside the window for
    the mode (amplitude: predicted or surrogate value in the operator's current window;
    phase: in [start, end) wrapping; breath-hold: a captured reference, level within
    tolerance, stable for min_stable_s), debounce consecutive samples with all of this
    holding, no X-ray disagreement (> max(3 mm, 2 sigma)) not yet followed by a
    non-disagreeing image and an acknowledgement, no dwell (> dwell_mm off for > dwell_s)
    not yet acknowledged after it ended; and an invalid window (non-finite, <= 0, >
    max_window_mm, |centre| > 50 mm, not two numbers) is never accepted.

Also violations: beam on within 0.2 s of a non-finite or repeated device timestamp (a
re-sent frame); breath-hold stability not restarted by an unknown (NaN) level. A NaN on an
axis the tracker does not read is not a condition (1-D surrogates have none there).

Why a plain seeded generator and not hypothesis: a scenario is a timeline (a breathing
signal sampled at 15-30 Hz with faults laid over time windows, images whose positions follow
the signal, commands at times), and reaching beam-on at all needs a warmed-up core (breathing
cycle known, devices seen); here each config's warm-up runs once and every scenario starts
from a deep copy of it, which keeps 10,000 scenarios (~2.5 million decisions) to about a
minute and a half on one core. Each scenario is reproducible from ``(seed, index)`` alone.
The shrinking hypothesis would give is replaced by a greedy delta-debugging pass over the
scenario's inputs. ``tests/test_core.py`` keeps the hypothesis property test on the gate.

Any violation: the scenario is shrunk (events removed while the violation persists) and
printed, and the exit status is 1.

Usage: python bench/bench_scenarios.py [--scenarios 10000] [--seed 5] [--json]
       [--configs 96]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass

from motionctl.config import load_config
from motionctl.replay import stale_timeouts
from motionctl.session import OperatorCommand, SessionCore
from motionctl.types import (
    AXES,
    DeviceEvent,
    FiducialMeasurement,
    SpirometerSample,
    SurrogateSample,
)

SUR = "surface"
SPI = "spirometer"
EPS = 1e-9
LATENCY_S = 0.0002  # receipt -> decide in the controller
AUTO_CLEAR_S = 0.2  # clean period of the data interlocks (docs/interlocks.md)
DIVERGED_CLEAR_S = 1.0
SKEW_S = 0.25
SKEW_MARGIN_S = 0.3  # the generator never makes clock offsets between 0.25 and 0.3 s
# An X-ray image whose time is not trusted is judged against the estimates of this span
# (the spec's 10 s; longer here, so that the oracle never asks for more than the spec)
UNTIMED_WINDOW_S = 10.5
MAX_ABS_MM = 500.0
JUMP_SPEED_MM_S = 100.0
MAX_TARGET_MM = 60.0
ACK_KEYS = ("fiducial_disagreement", "correlation_model_invalid")
MODES = ("amplitude/predicted", "amplitude/surrogate", "phase", "breath_hold/volume",
         "breath_hold/position")  # fmt: skip


# -- configs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conf:
    idx: int
    mode: str
    debounce: int
    dwell_mm: float
    dwell_s: float
    center_mm: float
    window_mm: float
    phase_window: tuple[float, float]
    min_stable_s: float
    rate_hz: float
    heartbeat_s: float | None  # None: wake at next_deadline only
    period_s: float
    amp_mm: float
    hold_ap_mm: float
    hold_volume_l: float
    dev_offset_s: float  # the tracker's clock - ours
    spi_offset_s: float
    spirometer: bool  # a spirometer streams (always in breath_hold/volume)
    xray_stale_s: float  # devices.xray.stale_timeout_s (0 = images not required)

    @property
    def gate_mode(self) -> str:
        return self.mode.split("/")[0]

    @property
    def breath_hold(self) -> bool:
        return self.gate_mode == "breath_hold"

    def cfg(self, base: dict) -> dict:
        cfg = copy.deepcopy(base)
        g = cfg["gating"]
        g["mode"] = self.gate_mode
        if self.mode == "amplitude/surrogate":
            g["source"] = "surrogate"
        if self.breath_hold:
            g["breath_hold_signal"] = self.mode.split("/")[1]
        g.update(
            center_mm=self.center_mm,
            window_mm=self.window_mm,
            phase_window=list(self.phase_window),
            min_stable_s=self.min_stable_s,
            debounce_samples=self.debounce,
            dwell_mm=self.dwell_mm,
            dwell_s=self.dwell_s,
            # Scenarios last seconds, less than the predictor's learning (~14 s): gate from
            # the start so that the predicted modes reach beam-on at all. The learning hold
            # only adds holds (test_core.py::test_the_gate_holds_while_the_predictor_learns).
            hold_while_prediction_learns=False,
        )
        cfg["tracking"]["surrogate_rate_hz"] = self.rate_hz
        cfg["devices"][SUR]["stale_timeout_s"] = round(2.25 / self.rate_hz, 4)
        cfg["devices"][SPI]["stale_timeout_s"] = 0.1
        cfg["devices"]["xray"]["stale_timeout_s"] = self.xray_stale_s
        return cfg


def make_confs(n: int, rng: random.Random) -> list[Conf]:
    confs = []
    for i in range(n):
        mode = MODES[i % len(MODES)]
        surrogate = mode == "amplitude/surrogate"
        dwell = rng.random() < 0.4
        confs.append(
            Conf(
                idx=i,
                mode=mode,
                debounce=rng.randint(1, 4),
                dwell_mm=round(rng.uniform(1.0, 4.0), 2) if dwell else 0.0,
                dwell_s=round(rng.uniform(0.2, 1.0), 2),
                center_mm=round(rng.uniform(1.0, 4.0) if surrogate else rng.uniform(-6, 0), 2),
                window_mm=round(rng.uniform(2.0, 8.0), 2),
                phase_window=rng.choice([(0.8, 0.2), (0.1, 0.6), (0.0, 0.5), (0.6, 0.95)]),
                min_stable_s=round(rng.uniform(0.1, 0.6), 2),
                rate_hz=rng.choice([30.0, 30.0, 30.0, 15.0]),
                heartbeat_s=rng.choice([0.01, 0.02, 0.05, None]),
                period_s=round(rng.uniform(1.8, 3.5), 2),
                amp_mm=round(rng.uniform(3.0, 8.0), 2),
                hold_ap_mm=round(rng.uniform(1.0, 5.0), 2),
                hold_volume_l=round(rng.uniform(0.8, 2.5), 2),
                dev_offset_s=round(rng.uniform(-500, 500), 3),
                spi_offset_s=round(rng.uniform(-500, 500), 3),
                spirometer=mode == "breath_hold/volume" or rng.random() < 0.3,
                xray_stale_s=rng.choice([0.0, 0.0, 1.0, 3.0]),
            )
        )
    return confs


# -- the oracle ----------------------------------------------------------------------------
class Oracle:
    """The safety invariant from the spec, with its own state. Never asks the gate."""

    def __init__(self, conf: Conf, cfg: dict, required: dict[str, float]):
        self.conf = conf
        self.required = dict(required)  # the devices the config requires, their timeouts
        self.max_window = cfg["gating"]["max_window_mm"]
        self.tol = (
            cfg["gating"]["breath_hold_tolerance_l"]
            if conf.mode == "breath_hold/volume"
            else cfg["gating"]["breath_hold_tolerance_mm"]
        )
        self.axis = AXES.index(cfg["gating"]["axis"])
        self.fid_tol = cfg["tracking"]["fiducial_tolerance_mm"]
        self.center, self.width = conf.center_mm, conf.window_mm
        self.enabled = False
        self.held = False
        self.log_failed = False
        self.beam_fault = False
        self.last_rx: dict[str, float] = {}
        self.disconnected: set[str] = set()
        self.until: dict[str, float] = {}  # condition -> beam off before this time
        self.inputs_seen: set[str] = set()  # devices that delivered a well-formed input
        self.malformed_open: set[str] = set()  # malformed, no well-formed input since
        self.last_tdev: dict[str, float] = {}
        self.backwards_now: dict[str, bool] = {}
        self.offset0: dict[str, float] = {}
        self.skewed_now: dict[str, bool] = {}
        self.prev_raw: float | None = None
        self.prev_raw_t = -math.inf
        self.n_clean = 0  # consecutive usable samples (the despike window's fill)
        # the raw values of the last 0.23 s (at least 3): "the recent median" of the spec
        self.raw_window: deque[float] = deque(maxlen=max(3, round(0.23 * conf.rate_hz)))
        self.est = None
        self.ests: list = []  # recent estimates (t, valid, position, uncertainty)
        self.pending: list[tuple[float, tuple]] = []  # images not yet covered
        self.xray_open = False
        self.xray_agreed = False
        self.xray_disagree_t = -math.inf  # acquisition time of the latest disagreeing image
        self.xray_prev_t: float | None = None  # the previous image's time (clock checks)
        self.xray_ref: float | None = None  # the imager's clock offset against ours
        self.dwell_start: float | None = None
        self.dwell_open = False
        self.dwell_ended = False
        self.volume = math.nan
        self.ref: float | None = None
        self.stable_since: float | None = None
        self.stable_since_strict: float | None = None
        self.sample_id = 0
        self.counted_id = -1
        self.run = 0

    # -- inputs
    def _off_until(self, name: str, t: float, clear_s: float = AUTO_CLEAR_S) -> None:
        self.until[name] = max(self.until.get(name, -math.inf), t + clear_s)

    def _well_formed(self, device: str, t_rx: float) -> None:
        self.inputs_seen.add(device)
        if device in self.malformed_open:
            self.malformed_open.discard(device)
            self._off_until(f"malformed:{device}", t_rx)

    def device_sample(self, device: str, t_rx: float, t_dev: float) -> None:
        self._well_formed(device, t_rx)
        self.last_rx[device] = t_rx
        if not math.isfinite(t_dev):
            # Not a time (docs/interlocks.md, clock_skew): holds, and is no reference for
            # the device's later times.
            self._off_until(f"clock_skew:{device}", t_rx)
            return
        last = self.last_tdev.get(device)
        if last is not None and t_dev <= last:  # a repeated time is a re-sent frame
            self.backwards_now[device] = True
        elif self.backwards_now.get(device):
            self.backwards_now[device] = False
            self._off_until(f"clock_backwards:{device}", t_rx)
        self.last_tdev[device] = t_dev
        offset = t_dev - t_rx
        if not math.isfinite(offset):
            return
        ref = self.offset0.setdefault(device, offset)
        if abs(offset - ref) > SKEW_MARGIN_S:
            self.skewed_now[device] = True
        elif self.skewed_now.get(device) and abs(offset - ref) < SKEW_S:
            self.skewed_now[device] = False
            self._off_until(f"clock_skew:{device}", t_rx)

    def surrogate(self, t_rx: float, position: tuple, axis_ap: int, est) -> None:
        raw = position[axis_ap]
        # Only the breathing axis is read: another axis may be absent (a 1-D RPM export
        # stores NaN there), and the drivers reject a NaN in a 3-D frame as malformed.
        if not math.isfinite(raw):
            self._off_until("not_finite", t_rx)
        elif abs(raw) > MAX_ABS_MM:
            self._off_until("out_of_range", t_rx)
        else:
            if t_rx - self.prev_raw_t > 0.5:
                self.n_clean = 0
                self.raw_window.clear()
            self.raw_window.append(raw)
            median = sorted(self.raw_window)[len(self.raw_window) // 2]
            step = abs(raw - self.prev_raw) if self.prev_raw is not None else 0.0
            if (
                self.n_clean >= 3
                and step > 8
                and step > JUMP_SPEED_MM_S * (t_rx - self.prev_raw_t) + 2
                and abs(raw - median) > 5 + 2
            ):
                # a jump no breath makes (the generator's jumps are >= 8 mm), clearly faster
                # than breathing since the previous sample (a step after a short gap, or at a
                # low rate, may be breathing) and away from the recent median (a step back to
                # it is the end of a spike, not a jump)
                self._off_until("out_of_range", t_rx)
            self.prev_raw, self.prev_raw_t = raw, t_rx
            self.n_clean += 1
        if not est.valid:
            self.n_clean = 0
        self.est = est
        pos, pred = est.position_mm, est.predicted_mm
        if any(math.isfinite(v) and abs(v) > MAX_TARGET_MM for v in (*pos, *pred)):
            self._off_until("target_out_of_range", t_rx)
        if "predictor_diverged" in est.reasons:
            self._off_until("predictor_diverged", t_rx, DIVERGED_CLEAR_S)
        self.ests.append((est.t, est.valid, pos, est.uncertainty_mm))
        if len(self.ests) > 1200:  # keep more than UNTIMED_WINDOW_S of them
            cut = next(i for i, e in enumerate(self.ests) if e[0] >= est.t - 2 * UNTIMED_WINDOW_S)
            del self.ests[:cut]
        self._dwell(est)
        if self.conf.mode == "breath_hold/position":
            self._level(pred[self.axis], t_rx)
        self._judge_pending()

    def spirometer(self, t_rx: float, volume: float) -> None:
        self.volume = volume
        if self.conf.mode == "breath_hold/volume":
            self._level(volume, t_rx)

    def _level(self, level: float, t: float) -> None:
        if self.ref is None:
            return
        if not math.isfinite(level):
            self.stable_since_strict = None
            return
        if abs(level - self.ref) > self.tol:
            self.stable_since = self.stable_since_strict = None
            return
        if self.stable_since is None:
            self.stable_since = t
        if self.stable_since_strict is None:
            self.stable_since_strict = t

    def _dwell(self, est) -> None:
        dwell_mm = self.conf.dwell_mm
        if dwell_mm <= 0:
            return
        if not est.valid:
            self.dwell_start = None
            self.dwell_ended = self.dwell_open
            return
        off = abs(est.position_mm[self.axis] - self.center)
        if off > dwell_mm + 0.05:
            if self.dwell_start is None:
                self.dwell_start = est.t
            if est.t - self.dwell_start > self.conf.dwell_s + 1e-6:
                self.dwell_open, self.dwell_ended = True, False
        else:
            self.dwell_start = None
            if self.dwell_open:
                self.dwell_ended = True

    def fiducial(self, t_rx: float, t_acq: float, position: tuple, accepted: bool) -> None:
        self._well_formed("xray", t_rx)
        stamp = self._xray_stamp(t_rx, t_acq)  # every image's time is checked
        if not accepted:
            return
        self.last_rx["xray"] = t_rx  # an accepted image is fresh X-ray data
        if stamp == "timed":
            self.pending.append((t_acq, position))
            self._judge_pending()
        elif stamp == "untimed":
            if self._untimed_disagrees(position):
                # it cannot be placed in the breath: a later image is one acquired after the
                # earliest moment it can have been taken
                self.xray_open, self.xray_agreed = True, False
                self.xray_disagree_t = max(self.xray_disagree_t, t_rx - UNTIMED_WINDOW_S)
        elif self.xray_open and t_acq > self.xray_disagree_t:
            # "either": the core may have judged it at its time, and found it agreeing
            self.xray_agreed = True

    def _xray_stamp(self, t_rx: float, t_acq: float) -> str:
        """Whether the spec trusts an image's time: "timed"; "untimed" (it went back, is not
        a number, or the imager's clock moved > 0.25 s against ours; the reference offset
        follows the slow drift, 1 % of each difference within the limit); "either" (within
        20 ms of that limit: judged neither way)."""
        if not math.isfinite(t_acq):
            return "untimed"
        backwards = self.xray_prev_t is not None and t_acq <= self.xray_prev_t
        self.xray_prev_t = t_acq
        offset = t_acq - t_rx
        if self.xray_ref is None:
            self.xray_ref = offset
            return "untimed" if backwards else "timed"
        skew = offset - self.xray_ref
        if abs(skew) <= SKEW_S:
            self.xray_ref += 0.01 * skew
        if backwards:
            return "untimed"
        if abs(abs(skew) - SKEW_S) < 0.02:
            return "either"
        return "untimed" if abs(skew) > SKEW_S else "timed"

    def _untimed_disagrees(self, xpos: tuple) -> bool:
        """Far (by the limit + 2 mm) from the path of every valid estimate of the last
        ``UNTIMED_WINDOW_S``: wherever in it the image was taken, it disagrees."""
        t_from = None
        later = None
        for t, valid, pos, sigma in reversed(self.ests):
            if not valid:  # (the path joins the valid ones either side)
                continue
            if t_from is None:
                t_from = t - UNTIMED_WINDOW_S  # from the newest valid estimate
            elif t < t_from:
                break
            limit = max(self.fid_tol, 2.0 * sigma if math.isfinite(sigma) else 0.0)
            d = math.dist(pos, xpos)
            if later is not None:
                d = min(d, _to_segment(xpos, pos, later))
            if d <= limit + 2.0:
                return False
            later = pos
        return t_from is not None

    def _judge_pending(self) -> None:
        if not self.pending or not self.ests:
            return
        newest = self.ests[-1][0]
        keep = []
        for t_acq, xpos in self.pending:
            if newest < t_acq:
                keep.append((t_acq, xpos))
                continue
            verdict = self._verdict(t_acq, xpos)
            if verdict == "disagree":
                self.xray_open, self.xray_agreed = True, False
                self.xray_disagree_t = max(self.xray_disagree_t, t_acq)
            elif self.xray_open and t_acq > self.xray_disagree_t:
                # a later image agrees (or cannot be judged: the core may call it agreeing)
                self.xray_agreed = True
        self.pending = keep

    def _verdict(self, t_acq: float, xpos: tuple) -> str:
        before = after = None
        for e in reversed(self.ests):
            if e[0] >= t_acq:
                after = e
            else:
                before = e
                break
        if before is None or after is None or after[0] - before[0] > 0.1:
            return "unknown"
        if not (before[1] and after[1]):
            return "unknown"
        near = min((before, after), key=lambda e: abs(e[0] - t_acq))
        sigma = near[3] if math.isfinite(near[3]) else 0.0
        limit = max(self.fid_tol, 2.0 * sigma)
        miss = math.dist(near[2], xpos)
        if miss > limit + 2.0:
            return "disagree"
        return "agree" if miss < limit - 1.0 else "unknown"

    def device_event(self, t: float, device: str, kind: str) -> None:
        if kind == "malformed":
            if device in self.inputs_seen:  # until its next well-formed input, then 0.2 s
                self.malformed_open.add(device)
            else:
                self._off_until(f"malformed:{device}", t)
        elif kind in ("disconnected", "port_error"):
            self.disconnected.add(device)
        elif kind == "connected":
            if device in self.disconnected:
                self.disconnected.discard(device)
                self._off_until(f"disconnected:{device}", t)
        elif device == "session_log" and kind == "write_failure":
            self.log_failed = True

    def command(self, t: float, kind: str, value, refusal: str) -> str | None:
        """Returns a violation text if the core accepted what the spec refuses."""
        if kind == "enable":
            self.enabled = True
        elif kind == "disable":
            self.enabled = False
        elif kind == "hold":
            self.held = True
        elif kind == "release":
            self.held = False
        elif kind == "window":
            ok = _window_ok(value, self.max_window)
            if ok and not refusal:
                self.center, self.width = float(value[0]), float(value[1])
            if not refusal and not ok:
                return f"invalid window {value!r} accepted"
        elif kind == "acknowledge":
            if value in ACK_KEYS and self.xray_open and self.xray_agreed:
                self.xray_open = False
            if value == "dwell_exceeded" and self.dwell_open and self.dwell_ended:
                self.dwell_open = False
        elif kind == "capture_reference":
            if self.conf.mode == "breath_hold/volume":
                level = self.volume
            else:
                level = self.est.predicted_mm[self.axis] if self.est is not None else math.nan
            if math.isfinite(level):
                self.ref = level
                self.stable_since = self.stable_since_strict = t
        return None

    # -- the invariant
    def failing(self, t: float) -> list[str]:
        """Every spec condition that fails at ``t`` (empty: the beam may be on)."""
        fail = []
        if not self.enabled:
            fail.append("operator_not_enabled")
        if self.held:
            fail.append("operator_hold")
        if self.log_failed:
            fail.append("log_write_failure")
        if self.beam_fault:
            fail.append("beam_interface")
        for device, timeout in self.required.items():
            last = self.last_rx.get(device)
            if last is None:
                fail.append(f"no_data:{device}")
            elif t >= last + timeout:  # at or after the deadline, computed as a deadline
                fail.append(f"stale_data:{device}")
        fail.extend(f"disconnected:{d}" for d in sorted(self.disconnected))
        fail.extend(f"clock_backwards:{d}" for d, b in self.backwards_now.items() if b)
        fail.extend(f"clock_skew:{d}" for d, s in self.skewed_now.items() if s)
        fail.extend(name for name, until in self.until.items() if t < until - EPS)
        fail.extend(f"malformed:{device}" for device in self.malformed_open)
        if self.xray_open:
            fail.append("xray_disagreement_unacknowledged")
        if self.dwell_open:
            fail.append("dwell_unacknowledged")
        est = self.est
        if est is None or not est.valid:
            fail.append("estimate_invalid")
        window = self._window_failure(t)
        if window:
            fail.append(window)
        return fail

    def _window_failure(self, t: float) -> str | None:
        mode, est = self.conf.mode, self.est
        if mode.startswith("amplitude"):
            if est is None:
                return "no_estimate"
            value = est.surrogate_mm if mode.endswith("surrogate") else est.predicted_mm[self.axis]
            lo, hi = self.center - self.width / 2, self.center + self.width / 2
            return None if lo - EPS <= value <= hi + EPS else "outside_window"
        if mode == "phase":
            # gating.source "predicted" (the default): the phase one horizon ahead
            phase = math.nan if est is None else est.predicted_phase
            if not math.isfinite(phase):
                return "phase_unknown"
            start, end = self.conf.phase_window
            inside = start <= phase < end if start <= end else (phase >= start or phase < end)
            return None if inside else "outside_phase_window"
        if self.ref is None:
            return "no_reference"
        if mode == "breath_hold/volume":
            level = self.volume
        else:
            level = math.nan if est is None else est.predicted_mm[self.axis]
        if not (math.isfinite(level) and abs(level - self.ref) <= self.tol + EPS):
            return "outside_tolerance"
        if self.stable_since is None or t - self.stable_since < self.conf.min_stable_s - EPS:
            return "not_stable"
        return None

    def decision(self, t: float, new_sample: bool, beam_on: bool) -> list[str]:
        """Check one decide; returns the violations."""
        if new_sample:
            self.sample_id += 1
        fail = self.failing(t)
        if fail:
            self.run, self.counted_id = 0, -1
        elif self.counted_id != self.sample_id:
            self.run += 1
            self.counted_id = self.sample_id
        if not beam_on:
            return []
        violations = list(fail)
        if not fail and self.run < self.conf.debounce:
            violations.append(f"debounce ({self.run} of {self.conf.debounce} samples)")
        if self.conf.breath_hold and (
            self.stable_since_strict is None
            or t - self.stable_since_strict < self.conf.min_stable_s - EPS
        ):
            violations.append("breath_hold_stability_across_unknown_level")
        return violations

    def stayed_on(self, t: float) -> list[str]:
        """The beam stayed on from the last decide until ``t``: was it fresh throughout?"""
        out = []
        for device, timeout in self.required.items():
            last = self.last_rx.get(device)
            if last is not None and t > last + timeout + 1e-6:
                out.append(f"stale_data_late:{device} (beam on {t - last:.4f} s after its sample)")
        return out


def _to_segment(p: tuple, a: tuple, b: tuple) -> float:
    ab = [v - u for u, v in zip(a, b, strict=True)]
    length2 = sum(c * c for c in ab)
    u = sum((x - y) * c for x, y, c in zip(p, a, ab, strict=True)) / length2 if length2 else 0.0
    u = min(1.0, max(0.0, u))
    return math.dist(p, [y + u * c for y, c in zip(a, ab, strict=True)])


def _window_ok(value, max_window: float) -> bool:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return False
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return False
    c, w = value
    return math.isfinite(c) and math.isfinite(w) and 0 < w <= max_window and abs(c) <= 50


# -- the harness: drive the core as the controller does --------------------------------------
class Harness:
    def __init__(self, conf: Conf, base_cfg: dict):
        self.conf = conf
        cfg = conf.cfg(base_cfg)
        self.core = SessionCore(cfg, self.record, stale_timeout_s=stale_timeouts(cfg))
        # the required devices as the config makes them (the core adds the X-ray imager when
        # devices.xray.stale_timeout_s > 0)
        self.required = dict(self.core.stale_timeout_s)
        self.oracle = Oracle(conf, cfg, self.required)
        self.ap = AXES.index(cfg["tracking"]["surrogate_axis"])
        self.now = 0.0
        self.next_hb = 0.0
        self.fault: str | None = None
        self.beam_on = False
        self.seq = 0
        self.decisions = 0
        self.beam_on_decisions = 0
        self.raised: Counter = Counter()
        self.violations: list[tuple[float, str]] = []
        self.log: list[str] | None = None

    def record(self, table: str, row: tuple) -> None:
        if table == "events":
            if row[1] == "interlock" and row[2] == "raised":
                self.raised[row[3].split(" ", 1)[0].split(":", 1)[0]] += 1
            if self.log is not None and row[1] != "operator":
                self.log.append(f"    event t={row[0]:.4f} {row[1]}/{row[2]} {row[3]}")

    def fresh_counts(self) -> None:
        self.decisions = self.beam_on_decisions = 0
        self.raised = Counter()
        self.violations = []

    # wake-ups between inputs
    def advance(self, t: float) -> None:
        hb = self.conf.heartbeat_s
        while True:
            deadline = self.core.next_deadline(self.now)
            if hb is not None:
                deadline = min(deadline, self.next_hb)
            if not deadline < t:
                break
            self.now = max(self.now, deadline)
            if hb is not None and self.now >= self.next_hb:
                self.next_hb = self.now + hb
            self.check_stayed()
            self.decide(False)
        self.now = max(self.now, t)

    def check_stayed(self) -> None:
        if self.beam_on:
            for v in self.oracle.stayed_on(self.now):
                self.violations.append((self.now, v))

    def decide(self, new_sample: bool) -> None:
        t = self.now
        o = self.oracle
        o.beam_fault = self.fault is not None
        self.core.set_beam_fault(t, self.fault)
        d = self.core.decide(t, new_sample)
        if d is not None:
            self.beam_on = d.beam_enabled
        self.decisions += 1
        self.beam_on_decisions += self.beam_on
        for v in o.decision(t, new_sample, self.beam_on):
            self.violations.append((t, v))
        if self.log is not None:
            reasons = d.reason_text if d is not None else "(unchanged)"
            self.log.append(f"    decide t={t:.4f} new={new_sample} on={self.beam_on} {reasons}")

    def apply(self, item: tuple) -> None:
        kind, ta = item[0], item[1]
        self.advance(ta + LATENCY_S)
        self.check_stayed()
        core, o = self.core, self.oracle
        if self.log is not None:
            self.log.append(f"  {_fmt(item)}")
        if kind == "sur":
            _, _, device, t_rx, t_dev, pos = item
            self.seq += 1
            core.on_surrogate(SurrogateSample(device, self.seq, t_dev, t_rx, pos))
            o.device_sample(device, t_rx, t_dev)
            if device == SUR:
                o.surrogate(t_rx, pos, self.ap, core.status.estimate)
            self.decide(True)
        elif kind == "spi":
            _, _, t_rx, t_dev, volume = item
            self.seq += 1
            core.on_spirometer(SpirometerSample(SPI, self.seq, t_dev, t_rx, volume, 0.0, True, 0))
            o.device_sample(SPI, t_rx, t_dev)
            o.spirometer(t_rx, volume)
            self.decide(SPI in self.required)
        elif kind == "fid":
            _, _, t_acq, accepted, pos = item
            self.seq += 1
            m = FiducialMeasurement(
                "xray", self.seq, t_acq, ta, "stereo", accepted, "" if accepted else "no seeds",
                pos if accepted else (math.nan,) * 3, (0.0, 0.0, 0.0), 3, 0.2, 0.3,
            )  # fmt: skip
            core.on_fiducial(m)
            o.fiducial(ta, t_acq, pos, accepted)
            self.decide(False)
        elif kind == "dev":
            _, _, device, ev = item
            core.on_device_event(DeviceEvent(device, ta, ev, "bench"))
            o.device_event(ta, device, ev)
            self.decide(False)
        elif kind == "fault":
            self.fault = item[2]
            self.decide(False)  # the driver's ack deadline wakes the controller
        elif kind == "cmd":
            _, _, ck, value = item
            if ck == "acknowledge" and value == "AWAITING":
                waiting = core.status.awaiting_ack
                value = waiting[0] if waiting else "operator_hold"
            refusal = core.on_command(self.now, OperatorCommand(ck, value))
            bad = o.command(self.now, ck, value, refusal)
            if bad:
                self.violations.append((self.now, bad))
            self.decide(False)
        else:
            raise ValueError(kind)

    def finish(self, t_end: float) -> None:
        self.advance(t_end)


def _fmt(item: tuple) -> str:
    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else repr(v)

    return f"{item[0]} " + " ".join(
        "(" + ", ".join(f(x) for x in v) + ")" if isinstance(v, tuple) else f(v) for v in item[1:]
    )


# -- the generator ---------------------------------------------------------------------------
class Signal:
    """The clean breathing surrogate (AP, mm, inhale +) and lung volume of one config."""

    def __init__(self, conf: Conf):
        self.c = conf
        self.drift: list[tuple[float, float, float]] = []  # (start, end, mm) baseline ramps
        self.leak: list[tuple[float, float, float]] = []  # (start, end, litres)

    def ap(self, t: float) -> float:
        c = self.c
        if c.breath_hold:
            base = c.hold_ap_mm + 0.03 * math.sin(7.3 * t)
        else:
            base = c.amp_mm * math.sin(math.pi * t / c.period_s) ** 4
        for a, b, mm in self.drift:
            if t > a:
                base += mm * min(1.0, (t - a) / max(b - a, 1e-3))
        return base

    def volume(self, t: float) -> float:
        v = self.c.hold_volume_l + 0.01 * math.sin(5.1 * t)
        for a, b, litres in self.leak:
            if t > a:
                v += litres * min(1.0, (t - a) / max(b - a, 1e-3))
        return v


WARMUP_S = 6.0


def warm_items(conf: Conf) -> list[tuple]:
    """Clean data from t = 0: the breathing cycle known, the devices seen; operator off."""
    sig = Signal(conf)
    items = []
    dt = 1.0 / conf.rate_hz
    n = int(WARMUP_S / dt)
    for i in range(n):
        t = i * dt
        items.append(("sur", t + 0.001, SUR, t + 0.001, t + conf.dev_offset_s,
                      (0.0, 0.0, sig.ap(t))))  # fmt: skip
    for k in range(1, int(WARMUP_S)):  # X-ray positions at 1 Hz, agreeing with the prior
        t = k + 0.5
        ap = sig.ap(t - 0.1)
        items.append(("fid", t, t - 0.1, True, (0.0, -1.5 * ap, 0.5 * ap)))
    if conf.spirometer:
        for i in range(int(WARMUP_S * 30)):
            t = i / 30 + 0.004
            items.append(("spi", t + 0.001, t + 0.001, t + conf.spi_offset_s, sig.volume(t)))
    items.sort(key=lambda it: it[1])
    return items


FAULTS_SUR = ("nan", "inf", "nan_axis", "range", "jump", "gap", "reorder", "repeat_tdev",
              "clock_step", "rx_back", "tdev_nan", "stuck", "drift", "other_device")  # fmt: skip
FAULTS_SPI = ("leak", "spi_nan", "spi_gap", "spi_reorder", "spi_step")
BEAM_FAULTS = ("ack_lost", "nak", "beam_dropped", "port_error")
BAD_WINDOWS = (
    (math.nan, 5.0), (0.0, math.inf), (0.0, 0.0), (0.0, -3.0), (0.0, 25.0), (60.0, 5.0),
    ("a", 5.0), (True, 5.0), (1.0,), (1.0, 2.0, 3.0), None, "x5",
)  # fmt: skip
RANDOM_ACKS = ("stale_data:surface", "operator_hold", "dwell_exceeded", "fiducial_disagreement",
               "correlation_model_invalid", "log_write_failure", "nonsense", None, 5)  # fmt: skip


def gen_scenario(conf: Conf, rng: random.Random, t0: float) -> tuple[list[tuple], float, list]:
    """One scenario after the warm-up: (items sorted by arrival, end time, fault names)."""
    dur = rng.uniform(2.0, 4.0)
    t1 = t0 + dur
    sig = Signal(conf)
    names: list[str] = []

    def window(short: bool = False) -> tuple[float, float]:
        a = rng.uniform(t0, t1 - 0.2)
        length = rng.uniform(0.01, 0.12) if short else rng.uniform(0.05, 0.9)
        return a, a + length

    sur_faults: list[tuple[str, float, float, float]] = []
    for _ in range(_poisson(rng, 1.6)):
        f = rng.choice(FAULTS_SUR)
        a, b = window(short=f in ("nan", "inf", "nan_axis", "range", "jump", "reorder",
                                  "repeat_tdev", "rx_back", "tdev_nan"))  # fmt: skip
        mag = 0.0
        if f == "jump":
            mag = rng.choice([-1, 1]) * rng.uniform(8, 20)
        elif f == "reorder":
            mag = rng.choice([rng.uniform(0.03, 0.2), rng.uniform(0.4, 0.8)])
        elif f == "clock_step":
            mag = rng.choice([-1, 1]) * rng.uniform(0.5, 3.0)
            if rng.random() < 0.3:
                b = t1 + 1
        elif f == "drift":
            mag = rng.choice([-1, 1]) * rng.uniform(2, 8)
            sig.drift.append((a, b, mag))
        sur_faults.append((f, a, b, mag))
        names.append(f)
    spi_faults: list[tuple[str, float, float, float]] = []
    if conf.spirometer:
        for _ in range(_poisson(rng, 0.8)):
            f = rng.choice(FAULTS_SPI)
            a, b = window(short=f in ("spi_nan", "spi_reorder"))
            mag = 0.0
            if f == "leak":
                mag = rng.choice([-1, 1]) * rng.uniform(0.15, 0.5)
                sig.leak.append((a, b, mag))
            elif f == "spi_reorder":
                mag = rng.uniform(0.03, 0.2)
            elif f == "spi_step":
                mag = rng.choice([-1, 1]) * rng.uniform(0.5, 2.0)
            spi_faults.append((f, a, b, mag))
            names.append(f)

    items: list[tuple] = []
    # surrogate samples
    dt = 1.0 / conf.rate_hz
    k0 = math.ceil(t0 / dt)
    prev_rx = prev_tdev = None
    prev_pos = None
    k = k0
    while k * dt < t1:
        t = k * dt
        k += 1
        active = {f: (a, b, m) for f, a, b, m in sur_faults if a <= t < b}
        if "gap" in active:
            continue
        t_rx = t + rng.uniform(0.0005, 0.003)
        offset = conf.dev_offset_s + sum(m for f, a, b, m in sur_faults
                                         if f == "clock_step" and a <= t < b)  # fmt: skip
        t_dev = t + offset
        ap = sig.ap(t) + rng.gauss(0, 0.05)
        pos = [0.0, 0.0, ap]
        if "stuck" in active and prev_pos is not None:
            items.append(("sur", t_rx, SUR, t_rx, prev_tdev, prev_pos))
            prev_rx = t_rx
            continue
        if "nan" in active:
            pos[2] = math.nan
        if "inf" in active:
            pos[2] = rng.choice([math.inf, -math.inf])
        if "range" in active:
            pos[2] = rng.choice([-1, 1]) * rng.uniform(600, 1000)
        if "jump" in active:
            pos[2] += active["jump"][2]
        if "nan_axis" in active:
            pos[rng.randint(0, 1)] = math.nan
        if "reorder" in active:
            t_dev -= active["reorder"][2]
        if "repeat_tdev" in active and prev_tdev is not None:
            t_dev = prev_tdev
        if "tdev_nan" in active:
            t_dev = rng.choice([math.nan, math.inf])
        if "rx_back" in active and prev_rx is not None:
            t_rx = prev_rx - rng.uniform(0.001, 0.03)
        arrival = max(t_rx, (prev_rx or t_rx))
        pos_t = (pos[0], pos[1], pos[2])
        items.append(("sur", arrival, SUR, t_rx, t_dev, pos_t))
        prev_rx, prev_tdev, prev_pos = arrival, t_dev, pos_t
    for f, a, _b, _m in sur_faults:
        if f == "other_device":
            items.append(("sur", a, "surface2", a, a + 3.0, (0.0, 0.0, math.nan)))
    # spirometer samples
    if conf.spirometer:
        k = math.ceil(t0 * 30)
        while k / 30 < t1:
            t = k / 30 + 0.004
            k += 1
            active = {f: (a, b, m) for f, a, b, m in spi_faults if a <= t < b}
            if "spi_gap" in active:
                continue
            t_rx = t + rng.uniform(0.0005, 0.003)
            t_dev = t + conf.spi_offset_s
            t_dev += sum(m for f, a, b, m in spi_faults if f == "spi_step" and a <= t < b)
            if "spi_reorder" in active:
                t_dev -= active["spi_reorder"][2]
            volume = sig.volume(t) + rng.gauss(0, 0.005)
            if "spi_nan" in active:
                volume = math.nan
            items.append(("spi", t_rx, t_rx, t_dev, volume))
    # fiducials
    fid_hz = rng.choice([0, 1, 1, 3, 5])
    prior_error = rng.choice([0.0] * 6 + [rng.uniform(4, 8)])
    if fid_hz:
        t = t0 + rng.uniform(0, 1 / fid_hz)
        while t < t1:
            t_acq = t - rng.uniform(0.05, 0.35)
            ap = sig.ap(t_acq)
            target = [0.0, -1.5 * ap + prior_error, 0.5 * ap]
            if rng.random() < 0.2:
                target[1] += rng.choice([-1, 1]) * rng.uniform(10, 20)
                names.append("fiducial_disagree")
            target = [v + rng.gauss(0, 0.2) for v in target]
            if rng.random() < 0.1:
                t_acq = t + rng.uniform(0.01, 0.2)  # ahead of the surrogate: waits
            items.append(("fid", t, t_acq, rng.random() < 0.9, tuple(target)))
            t += 1 / fid_hz
    # driver events
    for _ in range(_poisson(rng, 0.9)):
        device = rng.choice([SUR, SUR, SPI, "xray"])
        ev = rng.choice(["disconnected", "port_error", "malformed", "malformed"])
        a = rng.uniform(t0, t1)
        items.append(("dev", a, device, ev))
        names.append(f"{device}:{ev}")
        if ev != "malformed" and rng.random() < 0.7:
            items.append(("dev", a + rng.uniform(0.05, 1.0), device, "connected"))
    if rng.random() < 0.05:
        items.append(("dev", rng.uniform(t0, t1), "session_log", "write_failure"))
        names.append("log_write_failure")
    # beam interface faults
    for _ in range(_poisson(rng, 0.5)):
        a = rng.uniform(t0, t1)
        items.append(("fault", a, rng.choice(BEAM_FAULTS)))
        items.append(("fault", a + rng.uniform(0.005, 0.5), None))
        names.append("beam_fault")
    # operator commands
    if conf.breath_hold and rng.random() < 0.85:
        items.append(("cmd", t0 + rng.uniform(0.0, 0.1), "capture_reference", None))
    if rng.random() < 0.85:
        items.append(("cmd", t0 + rng.uniform(0.0, 0.15), "enable", None))
    for _ in range(_poisson(rng, 1.5)):
        a = rng.uniform(t0, t1)
        r = rng.random()
        if r < 0.12:
            items.append(("cmd", a, "disable", None))
            items.append(("cmd", a + rng.uniform(0.05, 1.0), "enable", None))
        elif r < 0.3:
            items.append(("cmd", a, "hold", None))
            if rng.random() < 0.8:
                items.append(("cmd", a + rng.uniform(0.05, 1.0), "release", None))
        elif r < 0.45:
            value = (round(rng.uniform(-8, 4), 2), round(rng.uniform(1, 12), 2))
            items.append(("cmd", a, "window", rng.choice([value, list(value)])))
        elif r < 0.6:
            items.append(("cmd", a, "window", rng.choice(BAD_WINDOWS)))
        elif r < 0.8:
            items.append(("cmd", a, "acknowledge", "AWAITING"))
        elif r < 0.88:
            items.append(("cmd", a, "acknowledge", rng.choice(RANDOM_ACKS)))
        elif r < 0.96:
            items.append(("cmd", a, "capture_reference", None))
        else:
            items.append(("cmd", a, rng.choice(["fire", "", "ENABLE"]), None))
    for _ in range(_poisson(rng, 0.6)):  # the operator acknowledges what is awaiting
        items.append(("cmd", rng.uniform(t0, t1), "acknowledge", "AWAITING"))
    items.sort(key=lambda it: it[1])
    return items, t1, names


def _poisson(rng: random.Random, lam: float) -> int:
    n, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p < limit:
            return n
        n += 1


# -- running, shrinking ------------------------------------------------------------------------
class Runner:
    def __init__(self, confs: list[Conf]):
        self.base = load_config()
        self.confs = confs
        self.warm: dict[int, Harness] = {}

    def warmed(self, conf: Conf) -> Harness:
        h = self.warm.get(conf.idx)
        if h is None:
            h = Harness(conf, self.base)
            for item in warm_items(conf):
                h.apply(item)
            h.advance(WARMUP_S)
            self.warm[conf.idx] = h
        fresh = copy.deepcopy(h)
        fresh.fresh_counts()
        return fresh

    def run(
        self, conf: Conf, items: list[tuple], t_end: float, log: bool = False, stop_at: str = ""
    ) -> Harness:
        h = self.warmed(conf)
        if log:
            h.log = []
        for item in items:
            h.apply(item)
            if stop_at and any(_kind(v) == stop_at for _, v in h.violations):
                break
        else:
            h.finish(t_end)
        return h

    def shrink(self, conf: Conf, items: list[tuple], t_end: float, kind: str) -> list[tuple]:
        """Remove chunks of inputs while a violation of the same kind remains (greedy delta
        debugging)."""

        def fails(candidate):
            h = self.run(conf, candidate, t_end, stop_at=kind)
            return any(_kind(v) == kind for _, v in h.violations)

        chunk = max(1, len(items) // 2)
        while True:
            i, changed = 0, False
            while i < len(items):
                candidate = items[:i] + items[i + chunk :]
                if candidate and fails(candidate):
                    items, changed = candidate, True
                else:
                    i += chunk
            if chunk == 1 and not changed:
                return items
            chunk = max(1, chunk // 2) if not changed else chunk


def _kind(violation: str) -> str:
    return violation.split(" ", 1)[0].split(":", 1)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--configs", type=int, default=100, help="distinct configs (warmed once)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-violations", type=int, default=3, help="shrink and print this many")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    rng = random.Random(args.seed)
    confs = make_confs(args.configs, rng)
    runner = Runner(confs)
    decisions = beam_on = 0
    per_mode: dict[str, Counter] = {m: Counter() for m in MODES}
    raised: Counter = Counter()
    injected: Counter = Counter()
    failures: list[tuple] = []
    n_violating = 0
    by_kind: Counter = Counter()  # scenarios with a violation of each kind
    shown: set[str] = set()  # one shrunk example per kind
    for i in range(args.scenarios):
        srng = random.Random(f"{args.seed}:{i}")
        conf = confs[srng.randrange(len(confs))]
        items, t_end, names = gen_scenario(conf, srng, WARMUP_S)
        h = runner.run(conf, items, t_end)
        decisions += h.decisions
        beam_on += h.beam_on_decisions
        pm = per_mode[conf.mode]
        pm["scenarios"] += 1
        pm["decisions"] += h.decisions
        pm["beam_on_decisions"] += h.beam_on_decisions
        raised.update(h.raised)
        injected.update(names)
        if h.violations:
            n_violating += 1
            pm["violating_scenarios"] += 1
            kinds = {_kind(v) for _, v in h.violations}
            by_kind.update(kinds)
            for t, v in h.violations:
                k = _kind(v)
                if k not in shown and len(failures) < args.max_violations:
                    shown.add(k)
                    failures.append((i, conf, items, t_end, (t, v)))
    wall = time.perf_counter() - start

    summary = {
        "command": "python bench/bench_scenarios.py "
        + " ".join(sys.argv[1:] if argv is None else argv),  # fmt: skip
        "seed": args.seed,
        "scenarios": args.scenarios,
        "configs": args.configs,
        "decisions_checked": decisions,
        "beam_on_decisions": beam_on,
        "violating_scenarios": n_violating,
        "violating_scenarios_by_kind": dict(sorted(by_kind.items())),
        "per_mode": {m: dict(c) for m, c in per_mode.items()},
        "interlocks_raised": dict(sorted(raised.items())),
        "faults_injected": dict(sorted(injected.items())),
        "wall_s": round(wall, 1),
    }
    shrunk = []
    for i, conf, items, t_end, first in failures:
        small = runner.shrink(conf, items, t_end, _kind(first[1]))
        h = runner.run(conf, small, t_end, log=True)
        shrunk.append((i, conf, small, h, first))
    if args.json:
        summary["violations"] = [
            {"scenario": i, "config": conf.__dict__, "first": list(first),
             "minimal_inputs": [_fmt(it) for it in small],
             "violations": [list(v) for v in h.violations[:5]]}
            for i, conf, small, h, first in shrunk
        ]  # fmt: skip
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"scenarios: {args.scenarios} (seed {args.seed}, {args.configs} configs)")
        print(f"decisions checked: {decisions}")
        print(f"beam-on decisions: {beam_on}")
        print(f"violations: {n_violating} scenarios")
        if by_kind:
            print("  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
        print("per mode:")
        for m, c in per_mode.items():
            print(f"  {m:22s} " + ", ".join(f"{k} {v}" for k, v in c.items()))
        print("interlocks raised: " + ", ".join(f"{k} {v}" for k, v in sorted(raised.items())))
        print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(injected.items())))
        print(f"wall time: {wall:.1f} s")
        for i, conf, small, h, first in shrunk:
            print(f"\nVIOLATION in scenario {i}: {first[1]} at t={first[0]:.4f}")
            print(f"  config: {conf}")
            print(f"  minimal scenario ({len(small)} inputs after the {WARMUP_S:g} s warm-up):")
            print("\n".join(h.log))
            print("  violations: " + "; ".join(f"t={t:.4f} {v}" for t, v in h.violations[:5]))
    return 1 if n_violating else 0


if __name__ == "__main__":
    sys.exit(main())
