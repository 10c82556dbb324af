"""Log replay for QA: a recorded session's inputs through the same core, decision for decision.

``replay(path)`` verifies the log's hash chain (``motionctl.integrity``), rebuilds a
``SessionCore`` from the config the session ran with, and feeds it the recorded inputs in
the recorded order (the ``n`` column, one order across all tables):

============================================  ===========================================
recorded row                                  fed to the core as
============================================  ===========================================
``samples``                                   ``on_surrogate`` (``t_rx`` = the row's ``t``)
``spirometer_samples``                        ``on_spirometer``
``events`` source ``operator``                ``on_command`` (detail JSON: who, value)
``events`` source ``tracking``, ``horizon``   ``set_horizon`` (the latency-following horizon)
``events`` source ``beam``, kind ``fault``    ``set_beam_fault`` (the driver's fault state)
``events`` from drivers (other sources)       ``on_device_event``
``decisions``                                 ``decide(t, new_sample = latency IS NOT NULL)``
============================================  ===========================================

Outputs are compared, not fed: each recorded decision with the replayed one (beam enabled
and reasons), each recorded estimate with the replayed one (every column, exactly: same
floats), and the core's event rows (interlocks raised and cleared, operator refusals,
breath-hold references) as a sequence. Neither fed nor compared: rows that are not the
core's -- ``session_stopped`` and ``controller_error`` forced holds, ``controller`` and
``rig`` events, ``beam``/``write_error`` events, beam ACKs and edges.

Silent decisions: the controller also decides after every operator command, driver event
and (non-required) spirometer sample, and records nothing when the decision did not
change. When no decision row follows such an input, the replay decides at the input's time
(the original's clock reading a few microseconds later is not in the log) and checks that
nothing changed; the replay counts these as ``silent_decides``.

What-if: with ``overrides`` (``--set key=value``, validated like ``load_config``) there is
nothing to compare; the replay also wakes at the stale-data deadlines as the controller
would, and reports the counterfactual figures beside the recorded ones, computed the same
way. If an override sets ``gating.window_mm`` or ``gating.center_mm``, the operator's
recorded window changes are not applied (the result's notes say so). A log without
decisions (an import: samples only) is replayed as a what-if: a decision at every sample.

Figures: duty cycle = beam-on time / time from the operator's first enable to the end;
residual motion = |estimated internal position on the gated axis - window centre| at each
surrogate sample while the beam was on, i.e. while the decision in force one beam delay
earlier enabled it (the gate decides on the position predicted one horizon ahead, so that a
beam following its command by that delay switches as the target crosses the window edge; the
delay is the configured ``tracking.horizon_s``, as the QA report's TG-142 check takes it; the
centre is the one that decision used). Measured at the decision instead, the residual was
that of the target one latency before the beam responded (the figures are from the
estimates, not a ground truth: ``residual_source`` says "estimate"); holds by reason
(episodes and seconds, as ``motionctl log info``); treatment time = first enable to the end.

Pure: imports no driver, simulator or GUI module, and prints nothing (``format_result``
gives the CLI its text).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np

from motionctl import __version__, integrity
from motionctl.config import (
    ConfigError,
    _check_components,
    _merge,
    _nest,
    _parse_override,
    load_defaults,
)
from motionctl.session import OperatorCommand, SessionCore
from motionctl.sessionlog import TABLES, LogFormatError, _beam_time_and_holds
from motionctl.types import (
    AXES,
    DeviceEvent,
    FiducialMeasurement,
    SpirometerSample,
    SurrogateSample,
)

__all__ = ["Divergence", "Figures", "ReplayRefused", "ReplayResult", "format_result", "replay"]

FORCED_REASONS = frozenset({"session_stopped", "controller_error"})
# Event rows that are not the core's (not inputs, not compared): the controller's own
# (its errors, failed writes to the gating box) and the rig's record of injected faults.
# A new writer of ``events`` rows that are not driver events must be listed here.
NOT_CORE_SOURCES = frozenset({"controller", "rig"})
NOT_CORE_EVENTS = frozenset({("beam", "write_error")})
HORIZON_KEY = "tracking.horizon_s"
# Samples stored under this device are an imported ground-truth channel, not a surrogate.
GROUND_TRUTH_DEVICE = "ground_truth"
# Event rows the core itself writes (outputs, compared, never fed back in).
CORE_OUTPUT_SOURCES = frozenset({"interlock", "correlation"})
ESTIMATE_COLUMNS = (
    "t",
    "lr_mm",
    "si_mm",
    "ap_mm",
    "pred_lr_mm",
    "pred_si_mm",
    "pred_ap_mm",
    "horizon_s",
    "valid",
    "reasons",
    "phase",
    "amplitude_mm",
    "uncertainty_mm",
    "model",
    "surrogate_mm",
)
WINDOW_KEYS = ("gating.window_mm", "gating.center_mm")
MAX_EXAMPLES = 20  # divergences kept in detail

# The tables the replay walks, by code.
_SAMPLE, _SPIRO, _EST, _DEC, _EVENT, _FIDUCIAL = range(6)
_STREAM_TABLES = (
    "samples",
    "spirometer_samples",
    "estimates",
    "decisions",
    "events",
    "fiducials",
)


class ReplayRefused(LogFormatError):
    """The log failed verification (and ``force`` was not given); ``.verify`` says why."""

    def __init__(self, message: str, verify: integrity.VerifyResult | None = None):
        super().__init__(message)
        self.verify = verify


@dataclass
class Divergence:
    kind: str  # "decision", "estimate", "event" or "core_error"
    t: float
    n: int | None  # the recorded row (None: the replay produced something the log lacks)
    recorded: Any
    replayed: Any
    reason: str
    after_input: str  # the last recorded input fed to the core before it


@dataclass
class Figures:
    """QA figures of one run (recorded or replayed), computed the same way for both."""

    beam_on_s: float
    duty_cycle: float | None  # beam-on / (end - first enable)
    residual_mean_mm: float | None
    residual_p95_mm: float | None
    residual_samples: int
    holds_by_reason: dict[str, dict[str, float]]
    treatment_time_s: float | None  # first enable -> end
    first_enable_t: float | None
    decisions: int


@dataclass
class ReplayResult:
    log: str
    what_if: bool
    overrides: list[str]
    verified: bool
    forced: bool
    verify: dict[str, Any]
    duration_s: float
    wall_s: float
    speed_x: float  # session duration / wall time
    decisions_compared: int
    estimates_compared: int
    events_compared: int
    silent_decides: int
    event_detail_differences: int
    divergences: int
    decision_divergences: int
    estimate_divergences: int
    event_divergences: int
    first_divergence: dict[str, Any] | None
    duty_cycle: float | None
    residual_mean_mm: float | None
    residual_p95_mm: float | None
    residual_samples: int
    residual_source: str
    holds_by_reason: dict[str, dict[str, float]]
    treatment_time_s: float | None
    beam_on_s: float
    recorded: dict[str, Any] | None  # the recorded figures, computed the same way
    # what-if: time to give the recorded beam-on time at the replayed duty cycle
    treatment_time_same_beam_on_s: float | None = None
    divergence_examples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def reproduced(self) -> bool:
        return not self.what_if and self.divergences == 0

    @property
    def exit_status(self) -> int:
        """0: verified and reproduced (or what-if done); 1: a divergence, or a log that
        failed verification and was replayed with force. (2, refused, is raised.)"""
        if self.divergences or not self.verified:
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reproduced"] = self.reproduced
        out["exit_status"] = self.exit_status
        return _finite(out)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# -- the entry point ---------------------------------------------------------------------
def replay(path: str | Path, overrides: Sequence[str] = (), *, force: bool = False) -> ReplayResult:
    """Replay a session log; see the module docstring.

    Raises LogFormatError for a file that is not a readable session log (truncated,
    corrupt, foreign: the message says where reading stopped), ReplayRefused (a
    LogFormatError) for a log that fails verification unless ``force``, and ConfigError
    for a bad override (naming the key)."""
    overrides = list(overrides)
    wall0 = time.perf_counter()
    db = integrity.open_checked(path)
    try:
        tables = integrity.read_tables(db, TABLES, path)
        wall_read = time.perf_counter()
        checked = integrity.verify_tables(db, tables, path)
        wall_verify = time.perf_counter()
        if not checked.ok and not force:
            raise ReplayRefused(
                f"{path}: integrity check failed: {checked.reason}; replay refused "
                "(force it to replay an unverified log)",
                checked,
            )
        recorded_cfg = _recorded_config(db, path)
        end_t = _end_time(tables)
        row = db.execute("SELECT value FROM meta WHERE key='motionctl_version'").fetchone()
        recorded_version = row[0] if row else "an unknown version"
    finally:
        db.close()
    cfg = apply_overrides(recorded_cfg, overrides)

    stream = _merge_stream(tables)
    has_decisions = bool(tables["decisions"])
    what_if = bool(overrides) or not has_decisions
    notes: list[str] = []
    if not has_decisions:
        notes.append("the log has no decisions (an import?): replayed as a what-if")
    elif recorded_version != __version__:
        # The tracking and gating change between versions: a divergence may be that, not a
        # fault of the log (the replay still compares and reports every one).
        notes.append(
            f"recorded by motionctl {recorded_version}, replayed with {__version__}: "
            "decisions of another version may differ"
        )
    if not checked.ok:
        notes.append(f"UNVERIFIED log replayed by force: {checked.reason}")
    skip_windows = any(item.partition("=")[0].strip() in WINDOW_KEYS for item in overrides)
    try:
        run = _Run(cfg, compare=not what_if, what_if=what_if, skip_windows=skip_windows)
    except (KeyError, TypeError, ValueError) as exc:
        if overrides:
            raise ConfigError(
                " ".join(f"--set {item}" for item in overrides),
                "(the config with the overrides)",
                "(table)",
                f"settings the core accepts ({type(exc).__name__}: {exc})",
            ) from exc
        raise LogFormatError(
            f"{path}: the recorded config cannot build the core ({type(exc).__name__}: {exc})"
        ) from exc
    run.skip_horizons = any(item.partition("=")[0].strip() == HORIZON_KEY for item in overrides)
    wall_setup = time.perf_counter()
    run.run(stream, end_t)
    wall_replay = time.perf_counter()

    first_enable = _first_enable(tables["events"])
    replayed = _figures(
        run.timeline, run.positions, cfg["tracking"]["horizon_s"], first_enable, end_t
    )
    recorded = (
        _recorded_figures(stream, recorded_cfg, first_enable, end_t) if has_decisions else None
    )
    notes.extend(run.notes)
    same_beam_on = None
    if what_if and recorded is not None and replayed.duty_cycle:
        same_beam_on = recorded.beam_on_s / replayed.duty_cycle
    wall_end = time.perf_counter()
    wall = wall_end - wall0
    first = run.first_divergence()
    return ReplayResult(
        log=str(path),
        what_if=what_if,
        overrides=overrides,
        verified=checked.ok,
        forced=force and not checked.ok,
        verify=checked.to_dict(),
        duration_s=end_t,
        wall_s=wall,
        speed_x=end_t / wall if wall > 0 else math.inf,
        decisions_compared=run.decisions_compared,
        estimates_compared=run.estimates_compared,
        events_compared=run.events_compared,
        silent_decides=run.silent_decides,
        event_detail_differences=run.event_detail_differences,
        divergences=sum(run.counts.values()),
        decision_divergences=run.counts["decision"],
        estimate_divergences=run.counts["estimate"],
        event_divergences=run.counts["event"] + run.counts["core_error"],
        first_divergence=asdict(first) if first is not None else None,
        duty_cycle=replayed.duty_cycle,
        residual_mean_mm=replayed.residual_mean_mm,
        residual_p95_mm=replayed.residual_p95_mm,
        residual_samples=replayed.residual_samples,
        residual_source="estimate",
        holds_by_reason=replayed.holds_by_reason,
        treatment_time_s=replayed.treatment_time_s,
        beam_on_s=replayed.beam_on_s,
        recorded=asdict(recorded) if recorded is not None else None,
        treatment_time_same_beam_on_s=same_beam_on,
        divergence_examples=[asdict(d) for d in run.examples],
        notes=notes,
        timing={
            "read_s": wall_read - wall0,
            "verify_s": wall_verify - wall_read,
            "setup_s": wall_setup - wall_verify,
            "replay_s": wall_replay - wall_setup,
            "figures_s": wall_end - wall_replay,
        },
    )


def apply_overrides(recorded: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The recorded config with ``--set key=value`` overrides, checked as ``load_config``
    checks them (the packaged defaults are the schema: an unknown key is an error naming
    it). Without overrides, the recorded config exactly as it was."""
    if not overrides:
        return recorded
    cfg = copy.deepcopy(recorded)
    defaults = load_defaults()
    for item in overrides:
        key, value = _parse_override(item)
        try:
            _merge(cfg, defaults, _nest(key, value), f"--set {item}", prefix="")
        except KeyError as exc:  # a table the recorded config lacks (an older version)
            raise ConfigError(
                f"--set {item}", key, value, f"a key the recorded config has (no {exc})"
            ) from exc
    _check_components(cfg)
    return cfg


def stale_timeouts(cfg: dict[str, Any]) -> dict[str, float]:
    """The required devices and their timeouts, derived as the controller derives them."""
    device = cfg["tracking"]["surrogate_device"]
    stale = {device: cfg["devices"][device]["stale_timeout_s"]}
    gating = cfg["gating"]
    if gating["mode"] == "breath_hold" and gating["breath_hold_signal"] == "volume":
        stale["spirometer"] = cfg["devices"]["spirometer"]["stale_timeout_s"]
    return stale


# -- the run -------------------------------------------------------------------------------
class _Run:
    """One pass of the recorded rows through a fresh core."""

    def __init__(self, cfg: dict[str, Any], *, compare: bool, what_if: bool, skip_windows: bool):
        self.cfg = cfg
        self.compare = compare
        self.what_if = what_if
        self.skip_windows = skip_windows
        self.est_out: list[tuple] = []  # estimates the core recorded, not yet compared
        self.ev_out: list[tuple] = []  # events the core recorded ...
        self.ev_after: list[str | tuple] = []  # ... and the input each came after
        est_append, ev_append, after_append = (
            self.est_out.append,
            self.ev_out.append,
            self.ev_after.append,
        )

        def record(table: str, row: tuple) -> None:
            if table == "estimates":
                est_append(row)
            elif table == "events":
                ev_append(row)
                after_append(self.last_input)
            # samples, spirometer_samples: echoes of the inputs, not needed

        self.core = SessionCore(cfg, record, stale_timeout_s=stale_timeouts(cfg))
        self.spiro_required = "spirometer" in self.core.stale_timeout_s
        self.axis = AXES.index(cfg["gating"]["axis"])
        self.timeline: list[tuple[float, int, str]] = []
        # (t, estimated position on the gated axis, window centre) at each sample decision
        self.positions: list[tuple[float, float, float]] = []
        self.fault: str | None = None
        self.pend_t: float | None = None  # a decide the controller made after the last input
        self.pend_new = False
        self.t_last = 0.0  # the latest decision time (the controller's clock was past it)
        self.est_fresh = False
        # The last recorded input fed to the core: a description, or (table, n, t) of a
        # row, formatted (_input_text) only if a divergence names it: the repr of a float
        # at every sample is a measurable part of a replay.
        self.last_input: str | tuple = "the start of the log"
        self.recorded_events: list[tuple] = []
        self.recorded_event_n: list[int] = []
        self.event_detail_differences = 0
        self.decisions_compared = 0
        self.estimates_compared = 0
        self.events_compared = 0
        self.silent_decides = 0
        self.counts = {"decision": 0, "estimate": 0, "event": 0, "core_error": 0}
        self.firsts: dict[str, Divergence] = {}
        self.examples: list[Divergence] = []
        self.notes: list[str] = []
        self.windows_skipped = 0
        self.skip_horizons = False  # a what-if that sets the horizon ignores recorded changes
        self.horizons_skipped = 0
        self.core_errors = 0
        self.controller_errors = 0

    # -- divergences ------------------------------------------------------------------------
    def diverge(self, kind: str, t: float, n, recorded, replayed, reason: str) -> None:
        self.counts[kind] += 1
        if kind not in self.firsts or len(self.examples) < MAX_EXAMPLES:
            d = Divergence(kind, t, n, recorded, replayed, reason, _input_text(self.last_input))
            self.firsts.setdefault(kind, d)
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(d)

    def first_divergence(self) -> Divergence | None:
        if not self.firsts:
            return None
        return min(self.firsts.values(), key=lambda d: (d.t, d.n if d.n is not None else -1))

    # -- deciding -------------------------------------------------------------------------
    def decide(self, t: float, new_sample: bool):
        core = self.core
        core.set_beam_fault(t, self.fault)
        decision = core.decide(t, new_sample)
        if t > self.t_last:
            self.t_last = t
        if decision is not None:
            self.timeline.append((t, int(decision.beam_enabled), decision.reason_text))
            if new_sample and self.est_fresh:
                value = core.status.estimate.position_mm[self.axis]
                self.positions.append((t, value, core.gate.center_mm))
        if new_sample:
            self.est_fresh = False
        return decision

    def resolve_pending(self) -> None:
        """The controller's decide after the last input, when the log recorded none."""
        t, new = self.pend_t, self.pend_new
        self.pend_t = None
        decision = self.decide(t, new)
        if not self.compare:
            return
        self.silent_decides += 1
        if new:
            self.diverge(
                "decision",
                t,
                None,
                None,
                _decision_tuple(decision),
                "the log has no decision for this sample (deleted, or a controller error)",
            )
        elif decision is not None:
            self.diverge(
                "decision",
                t,
                None,
                None,
                _decision_tuple(decision),
                "the replay changed its decision where the log records no change",
            )

    def deadlines(self, t_next: float) -> None:
        """What-if: wake at the stale-data deadlines before ``t_next``, as the controller
        does (in an exact replay those that changed something are recorded decisions)."""
        core = self.core
        while True:
            deadline = core.next_deadline(self.t_last)
            if not deadline < t_next:
                return
            self.decide(deadline, False)
            self.t_last = deadline

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stream: list[tuple[int, tuple]], end_t: float) -> None:
        nan = math.nan
        core = self.core
        compare, what_if = self.compare, self.what_if
        est_out = self.est_out
        ei = 0  # next replayed estimate to compare
        for code, row in stream:
            try:
                if code == _SAMPLE:
                    device, seq, t, t_device, x, y, z, n = row
                    if device == GROUND_TRUTH_DEVICE:
                        continue  # an imported truth channel: for figures, not an input
                    if self.pend_t is not None:
                        self.resolve_pending()
                    if what_if:
                        self.deadlines(t)
                    if compare and ei < len(est_out):
                        for extra in est_out[ei:]:
                            self.diverge(
                                "estimate",
                                extra[0],
                                None,
                                None,
                                extra,
                                "the replay made an estimate the log does not have",
                            )
                    est_out.clear()
                    ei = 0
                    self.last_input = ("samples", n, t)
                    core.on_surrogate(
                        SurrogateSample(
                            device,
                            seq,
                            t_device,
                            t,
                            (
                                nan if x is None else x,
                                nan if y is None else y,
                                nan if z is None else z,
                            ),
                        )
                    )
                    self.est_fresh = bool(est_out)
                    self.pend_t, self.pend_new = t, True
                elif code == _DEC:
                    t, enabled, reasons, latency, n = row
                    if latency is None and reasons in FORCED_REASONS:
                        self.timeline.append((t, enabled, reasons))  # the controller's own
                        continue
                    new = latency is not None
                    if what_if:
                        self.deadlines(t)
                    self.pend_t = None
                    decision = self.decide(t, new)
                    if compare:
                        self.decisions_compared += 1
                        if decision is None:
                            self.diverge(
                                "decision",
                                t,
                                n,
                                (enabled, reasons),
                                None,
                                "the replay saw no change where the log records a decision",
                            )
                        elif (
                            decision.beam_enabled != bool(enabled)
                            or decision.reason_text != reasons
                        ):
                            self.diverge(
                                "decision",
                                t,
                                n,
                                (enabled, reasons),
                                _decision_tuple(decision),
                                _decision_difference((enabled, reasons), decision),
                            )
                elif code == _EST:
                    if compare:
                        self.estimates_compared += 1
                        recorded = row[:-1]
                        if ei < len(est_out):
                            replayed = est_out[ei]
                            ei += 1
                            if recorded != replayed:
                                self._compare_estimate(row, replayed)
                        else:
                            self.diverge(
                                "estimate",
                                row[0],
                                row[-1],
                                recorded,
                                None,
                                "the replay made no estimate for this sample",
                            )
                elif code == _EVENT:
                    self._event(row)
                elif code == _FIDUCIAL:
                    (
                        device,
                        frame_id,
                        t,
                        t_acq,
                        mode,
                        accepted,
                        reason,
                        x,
                        y,
                        z,
                        rx,
                        ry,
                        rz,
                        n_seeds,
                        residual,
                        uncertainty,
                        n,
                    ) = row
                    if self.pend_t is not None:
                        self.resolve_pending()
                    if what_if:
                        self.deadlines(t)
                    self.last_input = ("fiducials", n, t)
                    core.on_fiducial(
                        FiducialMeasurement(
                            device,
                            frame_id,
                            t_acq,
                            t,
                            mode,
                            bool(accepted),
                            reason,
                            _f3(x, y, z),
                            _f3(rx, ry, rz),
                            n_seeds,
                            _f(residual),
                            _f(uncertainty),
                        )
                    )
                    # the controller decides after every measurement (a silent decide)
                    self.pend_t, self.pend_new = max(t, self.t_last), False
                else:  # _SPIRO
                    device, seq, t, t_device, volume, flow, valve, level, n = row
                    if self.pend_t is not None:
                        self.resolve_pending()
                    if what_if:
                        self.deadlines(t)
                    self.last_input = ("spirometer_samples", n, t)
                    core.on_spirometer(
                        SpirometerSample(
                            device,
                            seq,
                            t_device,
                            t,
                            nan if volume is None else volume,
                            nan if flow is None else flow,
                            bool(valve),
                            nan if level is None else level,
                        )
                    )
                    if self.spiro_required:
                        self.pend_t, self.pend_new = t, True
                    else:
                        self.pend_t, self.pend_new = max(t, self.t_last), False
            except Exception as exc:  # noqa: BLE001 - the live controller survives it too
                self.core_errors += 1
                self.pend_t = None
                self.notes.append(
                    f"the core raised {type(exc).__name__}: {exc} on {_describe(code, row)}"
                )
        if self.pend_t is not None:
            self.resolve_pending()
        if what_if:
            self.deadlines(end_t)
        if compare:
            for extra in est_out[ei:]:
                self.diverge(
                    "estimate",
                    extra[0],
                    None,
                    None,
                    extra,
                    "the replay made an estimate the log does not have",
                )
            self._compare_events()
            if self.core_errors != self.controller_errors:
                self.diverge(
                    "core_error",
                    end_t,
                    None,
                    self.controller_errors,
                    self.core_errors,
                    "controller errors recorded vs core exceptions in the replay",
                )
        if self.windows_skipped:
            self.notes.append(
                f"{self.windows_skipped} recorded operator window change(s) not applied: "
                "an override sets the window"
            )
        if self.horizons_skipped:
            self.notes.append(
                f"{self.horizons_skipped} recorded horizon change(s) not applied: an override "
                "sets tracking.horizon_s"
            )

    def _event(self, row: tuple) -> None:
        t, source, kind, detail, n = row
        if source in NOT_CORE_SOURCES or (source, kind) in NOT_CORE_EVENTS:
            if source == "controller":
                # The controller's handling of the last input failed: it decided nothing
                # more for it (a forced controller_error hold follows).
                self.controller_errors += 1
                self.pend_t = None
                self.notes.append(f"recorded controller error at t={t!r}: {detail}")
            return
        self.recorded_events.append(row[:-1])
        self.recorded_event_n.append(n)
        if source in CORE_OUTPUT_SOURCES:
            return  # an output of the core
        if source == "beam" and kind == "fault":
            # Part of the controller's decide: the driver's fault state at that time.
            self.fault = detail or None
            if self.pend_t is not None:
                self.pend_t = max(self.pend_t, t)
            self.core.set_beam_fault(t, self.fault)
            return
        if self.pend_t is not None:
            self.resolve_pending()
        if self.what_if:
            self.deadlines(t)
        self.last_input = f"events n={n} t={t!r} {source}/{kind}"
        if source == "tracking" and kind == "horizon":
            # The horizon following the measured latency: the controller's input to the core.
            if self.skip_horizons:
                self.horizons_skipped += 1
                return
            parsed = json.loads(detail)
            self.core.set_horizon(t, parsed["horizon_s"], parsed["measured"])
            return
        if source == "operator":
            if self.skip_windows and kind == "window":
                self.windows_skipped += 1
                return
            who, value = "operator", None
            try:
                parsed = json.loads(detail or "{}")
                who, value = parsed.get("who", who), parsed.get("value")
            except (ValueError, AttributeError):
                self.notes.append(f"operator event n={n}: detail is not JSON: {detail!r}")
            self.core.on_command(t, OperatorCommand(kind, value, who))
        else:
            self.core.on_device_event(DeviceEvent(source, t, kind, detail or ""))
        self.pend_t, self.pend_new = max(t, self.t_last), False

    def _compare_estimate(self, row: tuple, replayed: tuple) -> None:
        recorded = row[:-1]
        # SQLite stores NaN as NULL: compare as the log would have stored the replay's row.
        stored = tuple(None if v.__class__ is float and v != v else v for v in replayed)
        if recorded == stored:
            return
        column = next(i for i, (a, b) in enumerate(zip(recorded, stored, strict=True)) if a != b)
        self.diverge(
            "estimate",
            row[0],
            row[-1],
            recorded,
            stored,
            f"{ESTIMATE_COLUMNS[column]}: recorded {recorded[column]!r}, replayed "
            f"{stored[column]!r}",
        )

    def _compare_events(self) -> None:
        recorded = self.recorded_events
        replayed = [tuple(r) for r in self.ev_out]
        self.events_compared = len(recorded)
        if recorded == replayed:
            return
        self.event_detail_differences = sum(
            1 for a, b in zip(recorded, replayed, strict=False) if a != b and _key(a) == _key(b)
        )
        rec_keys, rep_keys = [_key(r) for r in recorded], [_key(r) for r in replayed]
        if rec_keys == rep_keys:
            opcodes = []
        elif len(recorded) + len(replayed) > 40000:  # keep the diff cheap on huge logs
            opcodes = [("replace", 0, len(recorded), 0, len(replayed))]
        else:
            opcodes = SequenceMatcher(None, rec_keys, rep_keys, autojunk=False).get_opcodes()
        for tag, i1, i2, j1, j2 in opcodes:
            if tag == "equal":
                continue
            for k in range(max(i2 - i1, j2 - j1)):
                rec = recorded[i1 + k] if i1 + k < i2 else None
                rep = replayed[j1 + k] if j1 + k < j2 else None
                if rec is not None and rep is not None and _key(rec) == _key(rep):
                    continue
                why = (
                    "recorded event missing from the replay"
                    if rep is None
                    else "replayed event not in the log"
                    if rec is None
                    else "event differs"
                )
                self.last_input = self.ev_after[j1 + k] if rep is not None else "(see n)"
                n = self.recorded_event_n[i1 + k] if rec is not None else None
                self.diverge("event", (rec or rep)[0], n, rec, rep, why)
        if self.event_detail_differences:
            self.notes.append(
                f"{self.event_detail_differences} stale_data 'cleared' event(s) differ only in "
                "the age in their detail: the age is the one seen at the controller's last "
                "unrecorded wake-up (heartbeat) before the data came back; not a divergence"
            )


# -- figures -------------------------------------------------------------------------------
def _figures(
    timeline: list[tuple[float, int, str]],
    positions: list[tuple[float, float, float]],
    beam_delay_s: float,
    first_enable: float | None,
    end_t: float,
) -> Figures:
    beam_on_s, holds = _beam_time_and_holds(timeline, end_t=end_t)
    treatment = end_t - first_enable if first_enable is not None else None
    duty = beam_on_s / treatment if treatment else None
    res = _beam_on_residuals(timeline, positions, beam_delay_s)
    return Figures(
        beam_on_s=beam_on_s,
        duty_cycle=duty,
        residual_mean_mm=float(res.mean()) if res.size else None,
        residual_p95_mm=float(np.percentile(res, 95)) if res.size else None,
        residual_samples=int(res.size),
        holds_by_reason=holds,
        treatment_time_s=treatment,
        first_enable_t=first_enable,
        decisions=len(timeline),
    )


def _beam_on_residuals(
    timeline: list[tuple[float, int, str]],
    positions: list[tuple[float, float, float]],
    beam_delay_s: float,
) -> np.ndarray:
    """|position - centre| at each sample (t, position, centre) while the beam was on: the
    decision in force at t - ``beam_delay_s`` enabled it; the centre is that decision's (the
    latest sample's at or before it)."""
    if not positions or not timeline:
        return np.empty(0)
    t, x, centre = np.array(positions, dtype=float).T
    dec_t = np.fromiter((d[0] for d in timeline), dtype=float, count=len(timeline))
    dec_on = np.fromiter((d[1] for d in timeline), dtype=bool, count=len(timeline))
    t_beam = t - beam_delay_s  # when the decision the beam follows at t was made
    k = np.searchsorted(dec_t, t_beam, side="right") - 1
    j = np.searchsorted(t, t_beam, side="right") - 1
    on = (k >= 0) & (j >= 0) & np.isfinite(x)
    on[on] = dec_on[k[on]]
    return np.abs(x[on] - centre[j[on]])


def _recorded_figures(
    stream: list[tuple[int, tuple]], cfg: dict[str, Any], first_enable: float | None, end_t: float
) -> Figures:
    """The same figures from the recorded rows: the decisions as logged, the residual from
    the logged estimates and the window centre as the operator's logged changes set it."""
    column = 1 + AXES.index(cfg["gating"]["axis"])
    center = cfg["gating"]["center_mm"]
    timeline: list[tuple[float, int, str]] = []
    positions: list[tuple[float, float, float]] = []
    position = None
    fresh = False
    for code, row in stream:
        if code == _EST:
            position, fresh = row[column], True
        elif code in (_SAMPLE, _SPIRO, _FIDUCIAL):
            continue
        elif code == _DEC:
            t, enabled, reasons, latency, _n = row
            timeline.append((t, enabled, reasons))
            if latency is not None:
                if fresh and position is not None:
                    positions.append((t, position, center))
                fresh = False
        elif row[1] == "operator" and row[2] == "window":
            try:
                detail = json.loads(row[3])
                if "refused" not in detail:
                    center = float(detail["value"][0])
            except (ValueError, KeyError, TypeError, IndexError):
                pass
    return _figures(timeline, positions, cfg["tracking"]["horizon_s"], first_enable, end_t)


def _f(value: float | None) -> float:
    return math.nan if value is None else value  # SQLite stores NaN as NULL


def _f3(x: float | None, y: float | None, z: float | None) -> tuple[float, float, float]:
    return (_f(x), _f(y), _f(z))


def _first_enable(events: list[tuple]) -> float | None:
    times = [row[0] for row in events if row[1] == "operator" and row[2] == "enable"]
    return min(times) if times else None


# -- reading -------------------------------------------------------------------------------
def _end_time(tables: dict[str, list[tuple]]) -> float:
    """The session's last time: the latest t of samples, decisions and events."""
    latest = 0.0
    for table, column in (
        ("samples", 2),
        ("spirometer_samples", 2),
        ("decisions", 0),
        ("events", 0),
    ):
        rows = tables[table]
        if not rows:
            continue
        try:
            latest = max(latest, max(row[column] for row in rows))
        except TypeError:  # a damaged log replayed by force: a t that is not a number
            numbers = (row[column] for row in rows if isinstance(row[column], int | float))
            latest = max(latest, max(numbers, default=0.0))
    return float(latest)


def _recorded_config(db, path) -> dict[str, Any]:
    rows = integrity.query(db, "config", "SELECT json FROM config", path)
    if not rows:
        raise LogFormatError(f"{path}: the log has no config row")
    try:
        cfg = json.loads(rows[0][0])
    except (TypeError, ValueError) as exc:
        raise LogFormatError(f"{path}: table config: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise LogFormatError(f"{path}: table config: not a JSON object")
    return cfg


def _merge_stream(tables: dict[str, list[tuple]]) -> list[tuple[int, tuple]]:
    """The replayed tables merged into one list of (code, row) in ``n`` order."""
    parts = [(code, tables[name]) for code, name in enumerate(_STREAM_TABLES)]
    total = sum(len(rows) for _, rows in parts)
    top = -1
    dense = True
    for _, rows in parts:
        for row in rows:
            n = row[-1]
            if n.__class__ is not int or n < 0:
                dense = False
                break
            if n > top:
                top = n
    if dense and top < 4 * total + 1024:
        slots: list[tuple[int, tuple] | None] = [None] * (top + 1)
        for code, rows in parts:
            for row in rows:
                n = row[-1]
                if slots[n] is not None:
                    dense = False  # two rows with one n: a damaged log, replayed by force
                    break
                slots[n] = (code, row)
            if not dense:
                break
        if dense:
            return [item for item in slots if item is not None]
    keyed = [
        (row[-1] if isinstance(row[-1], int) else -1, code, i, row)
        for code, rows in parts
        for i, row in enumerate(rows)
    ]
    keyed.sort(key=lambda item: item[:3])
    return [(code, row) for _, code, _, row in keyed]


# -- text ----------------------------------------------------------------------------------
def format_result(result: ReplayResult) -> str:
    """The replay result as the CLI prints it."""
    r = result
    lines = [f"log:              {r.log}"]
    if r.verified:
        lines.append(
            f"integrity:        verified ({r.verify['batches']} batches, "
            f"{r.verify['rows']} rows, last digest {r.verify['digest']})"
        )
    else:
        lines.append(f"integrity:        FAILED, replayed by force: {r.verify['reason']}")
    lines.append(
        f"session:          {r.duration_s:.1f} s replayed in {r.wall_s:.2f} s "
        f"({r.speed_x:.0f}x real time)"
    )
    if not r.what_if:
        verdict = "REPRODUCED" if r.divergences == 0 else f"DIVERGED ({r.divergences})"
        lines += [
            f"result:           {verdict}",
            f"decisions:        {r.decisions_compared} compared, {r.decision_divergences} "
            f"differ ({r.silent_decides} silent decides checked)",
            f"estimates:        {r.estimates_compared} compared, {r.estimate_divergences} differ",
            f"events:           {r.events_compared} compared, {r.event_divergences} differ",
        ]
        if r.first_divergence:
            d = r.first_divergence
            values = (
                ""
                if d["kind"] == "estimate"
                else (f"; recorded {d['recorded']!r}, replayed {d['replayed']!r}")
            )
            lines.append(
                f"first divergence: {d['kind']} at t={d['t']:.6f} s (n={d['n']}): "
                f"{d['reason']}{values}; after {d['after_input']}"
            )
    else:
        lines.append(f"what-if:          {' '.join(r.overrides) or '(recorded config)'}")
    rec = r.recorded if r.what_if else None
    if rec:
        lines.append(f"{'':18s}{'what-if':>8s}   {'recorded':>8s}")

    def row(label: str, value, recorded_value, fmt: str) -> None:
        def f(v):
            return "--" if v is None else format(v, fmt)

        text = f"{label:18s}{f(value):>8s}"
        if rec:
            text += f"   {f(recorded_value):>8s}"
        lines.append(text)

    row("duty cycle", r.duty_cycle, rec and rec["duty_cycle"], ".3f")
    row("beam on, s", r.beam_on_s, rec and rec["beam_on_s"], ".1f")
    row("residual mean, mm", r.residual_mean_mm, rec and rec["residual_mean_mm"], ".2f")
    row("residual P95, mm", r.residual_p95_mm, rec and rec["residual_p95_mm"], ".2f")
    row("treatment, s", r.treatment_time_s, rec and rec["treatment_time_s"], ".1f")
    if r.treatment_time_same_beam_on_s is not None:
        lines.append(
            f"time for the recorded beam-on time at this duty cycle: "
            f"{r.treatment_time_same_beam_on_s:.1f} s"
        )
    lines.append(f"residual source:  {r.residual_source} (no ground-truth channel in the log)")
    lines.append("holds by reason:" + (f"{'what-if':>29s}{'recorded':>23s}" if rec else ""))
    reasons = sorted(set(r.holds_by_reason) | set(rec["holds_by_reason"] if rec else ()))
    for reason in reasons:
        mine = r.holds_by_reason.get(reason, {"count": 0, "seconds": 0.0})
        text = f"  {reason:32s} {mine['count']:5d} x {mine['seconds']:8.1f} s"
        if rec:
            theirs = rec["holds_by_reason"].get(reason, {"count": 0, "seconds": 0.0})
            text += f"   {theirs['count']:5d} x {theirs['seconds']:8.1f} s"
        lines.append(text)
    lines += [f"note: {note}" for note in r.notes]
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------
def _decision_tuple(decision) -> tuple[int, str] | None:
    return None if decision is None else (int(decision.beam_enabled), decision.reason_text)


def _decision_difference(recorded: tuple[int, str], decision) -> str:
    if bool(recorded[0]) != decision.beam_enabled:
        state = "enabled" if decision.beam_enabled else "held"
        return f"the replay {state} the beam (reasons {decision.reason_text!r})"
    return f"reasons differ: recorded {recorded[1]!r}, replayed {decision.reason_text!r}"


def _key(event: tuple) -> tuple:
    """An event as compared: the age in a stale_data 'cleared' detail depends on unrecorded
    controller wake-ups (see the notes), so it is left out."""
    t, source, kind, detail = event
    if (
        source == "interlock"
        and kind == "cleared"
        and isinstance(detail, str)
        and detail.startswith("stale_data:")
    ):
        return (t, source, kind, detail.split(" age ", 1)[0])
    return event


def _input_text(last_input: str | tuple) -> str:
    """``_Run.last_input`` as divergences name it ("samples n=... t=...")."""
    if isinstance(last_input, str):
        return last_input
    table, n, t = last_input
    return f"{table} n={n} t={t!r}"


def _describe(code: int, row: tuple) -> str:
    return f"{_STREAM_TABLES[code]} n={row[-1]!r}"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
