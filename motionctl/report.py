"""QA report: one self-contained HTML file for one or more recorded sessions.

``write_report(logs, out)`` verifies each log's hash chain, replays it (``motionctl.replay``)
and writes one HTML file -- figures embedded as base64 PNG (matplotlib, Agg canvas, no
pyplot state), no external files, scripts or fonts -- with, per session: summary, trace with
beam-on intervals and the gating window, duty cycle, residual motion in the gate, holds by
reason on a timeline, latencies, correlation checks at each X-ray, fiducial acceptance,
interlocks, injected faults and the TG-142 gating timing check.

An unverified log (its hash chain does not match) is not replayed unless ``force``: its
section says so and shows no figures; with ``force`` every figure is marked UNVERIFIED.

TG-142 gating timing: definition
--------------------------------
TG-142 asks that the beam switch within 100 ms of the expected time. What is *expected*
when the gate acts on a prediction?

* The gate compares the position **predicted** ``tracking.horizon_s`` ahead with the window,
  so that a beam that follows the gating command by that latency switches when the
  *target* crosses the window edge. Judging the edges against the predicted position would
  only check the machine (decision, debounce, interface), never whether the prediction put
  the beam where the target was.
* So the expected time of a window edge is **the time the target crossed the window edge**
  (linear interpolation between samples; target = the estimated internal position on the
  gated axis from ``estimates``, or the ``ground_truth`` device when the log has one; with
  ``gating.source = "surrogate"`` the surrogate), **minus the beam delay**: the time the beam
  takes to follow the recorded edge. The delay is not in the log. By default it is the
  configured ``tracking.horizon_s`` -- the latency the configuration declares and the
  prediction compensates -- so the check tests the system against its own claim; give the
  measured delay with ``beam_delay_s`` (``--beam-delay``). A wrong delay shifts every
  latency by the same amount: look at the mean.
* Latency = recorded edge - expected time; PASS when ``|latency| <= 100 ms``. Edges caused
  by something other than the window (an interlock, the operator, session stop) are judged
  against the decision that caused them (the chain latency). An edge with no target
  crossing of its direction within +/-1 s (gate chatter, a prediction crossing the target
  did not make) FAILs, unless that crossing could lie after the recorded target ends (an
  edge in the last beam delay + 100 ms of the session: NOT ASSESSED). An expected
  transition with no edge FAILs if the beam state
  disagreed with it for more than 100 ms (a short visit of the target to the window that
  ends within the tolerance needs no edge).
* Edges: the simulated linac's own record (``beam_edges`` source ``linac_sim``) when
  present, else another recorded box edge source, else the decisions. Diagnostics per edge:
  decision -> edge (the chain) and gate input crossing -> edge (what the gate saw); the
  difference between that and the latency is the prediction's timing error.
* Only amplitude gating is assessed; a log without decisions (an import) is NOT ASSESSED.

Other definitions: duty cycle, residual motion (|estimated position on the gated axis -
window centre| at each surrogate sample while the beam was on, i.e. while the decision in
force one beam delay earlier enabled it) and holds come from ``replay`` (recorded
figures; an import's what-if figures). "Holds" in the summary row counts interruptions:
hold episodes for any reason but the gate's own cycle (``outside_window``, the phase and
breath-hold conditions, ``debounce``), ``operator_not_enabled`` and ``session_stopped``.
Samples of device ``ground_truth`` (``motionctl.importers``) are truth, never a surrogate:
they are drawn and, with a beam state, give a ground-truth residual.
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from motionctl import __version__, integrity
from motionctl.config import ConfigError
from motionctl.sessionlog import TABLES, LogFormatError

__all__ = [
    "GROUND_TRUTH_DEVICE",
    "EdgeCheck",
    "ReportSummary",
    "SessionReport",
    "TimingCheck",
    "gating_timing",
    "write_report",
]

GROUND_TRUTH_DEVICE = "ground_truth"
TOLERANCE_S = 0.100  # TG-142: gating on/off within 100 ms of expected
MATCH_RADIUS_S = 1.0  # an edge further than this from every expected transition is unmatched
MAX_SAMPLE_GAP_S = 0.5  # no crossing is interpolated across a longer gap
WINDOW_REASONS = frozenset({"outside_window", "debounce"})
# Not counted as "holds" (interruptions) in the summary row: the gate's own cycle, the
# operator's enable and the session's end.
NOT_HOLDS = frozenset(
    {
        "operator_not_enabled",
        "debounce",
        "session_stopped",
        "outside_window",
        "outside_phase_window",
        "outside_breath_hold_tolerance",
        "breath_hold_not_stable",
    }
)
EDGE_SOURCE_ORDER = ("linac_sim",)  # preferred; then other box sources; then rpm_ttl
IMPORT_EDGE_SOURCES = ("rpm_ttl", "rpm_ttlin")
MAX_TABLE_ROWS = 60
PLOT_POINTS = 6000

PASS, FAIL, NOT_ASSESSED = "PASS", "FAIL", "NOT ASSESSED"

GATE_REASONS = {
    "outside_window": "the target (predicted) is outside the gating window",
    "debounce": "in the window, waiting for the debounce samples before beam-on",
    "operator_not_enabled": "the operator has not enabled the beam",
    "estimate_invalid": "the tracker could not vouch for its estimate",
    "outside_phase_window": "the breathing phase is outside the phase window",
    "phase_unknown": "the breathing phase is not known yet",
    "prediction_learning": "the predictor is still learning the breathing (start or gap)",
    "no_breath_hold_reference": "no breath-hold reference captured",
    "breath_hold_level_unknown": "the breath-hold level is not known",
    "outside_breath_hold_tolerance": "the breath-hold level is outside its tolerance",
    "breath_hold_not_stable": "the breath hold has not been stable long enough",
    "session_stopped": "the session stopped (the controller's own final hold)",
    "controller_error": "the controller failed to handle an input (forced hold)",
}

# Column indices of the log's tables (sessionlog.SCHEMA).
S_DEV, S_T, S_XYZ = 0, 2, 4
E_T, E_POS, E_PRED, E_VALID, E_SURR = 0, 1, 4, 8, 14
D_T, D_ON, D_REASONS, D_LAT = 0, 1, 2, 3
EV_T, EV_SRC, EV_KIND, EV_DETAIL = 0, 1, 2, 3
F_DEV, F_FRAME, F_T, F_TACQ, F_MODE, F_ACC, F_REASON, F_XYZ = 0, 1, 2, 3, 4, 5, 6, 7
F_NSEEDS, F_RES, F_UNC = 13, 14, 15


# -- results ---------------------------------------------------------------------------------
@dataclass
class EdgeCheck:
    t: float
    beam_on: bool
    cause: str  # "window" or the hold reasons that caused it
    expected_t: float | None
    latency_s: float | None  # edge - expected
    chain_s: float | None  # decision -> edge
    gate_input_s: float | None  # gate input crossing -> edge
    verdict: str  # PASS, FAIL or NOT ASSESSED
    note: str = ""


@dataclass
class TimingCheck:
    verdict: str
    reason: str
    edge_source: str
    target_source: str
    beam_delay_s: float
    tolerance_s: float = TOLERANCE_S
    edges: list[EdgeCheck] = field(default_factory=list)
    missed: list[dict[str, Any]] = field(default_factory=list)
    expected_transitions: int = 0

    @property
    def assessed(self) -> int:
        return sum(1 for e in self.edges if e.verdict in (PASS, FAIL))

    @property
    def failures(self) -> int:
        return sum(1 for e in self.edges if e.verdict == FAIL) + len(self.missed)


@dataclass
class SessionReport:
    """One session's outcome; ``row()`` is its line of a batch summary."""

    log: str
    name: str
    status: str = "failed"  # "ok" or "failed"
    error: str = ""
    verified: bool = False
    forced: bool = False
    verify_reason: str | None = None
    digest: str | None = None
    started_utc: str | None = None
    duration_s: float | None = None
    what_if: bool = False
    duty_cycle: float | None = None
    residual_mean_mm: float | None = None
    residual_p95_mm: float | None = None
    decisions_compared: int = 0
    divergences: int = 0
    holds: int = 0
    holds_by_reason: dict[str, dict[str, float]] = field(default_factory=dict)
    tg142: str = NOT_ASSESSED
    tg142_edges: int = 0
    tg142_failures: int = 0
    tg142_reason: str = ""
    timing: TimingCheck | None = field(default=None, repr=False)  # the check, edge by edge

    def row(self) -> dict[str, Any]:
        def r(value: float | None, digits: int = 6) -> Any:
            return "" if value is None or not math.isfinite(value) else round(value, digits)

        return {
            "file": self.name,
            "verified": self.verified,
            "duration_s": r(self.duration_s, 3),
            "duty_cycle": r(self.duty_cycle, 4),
            "residual_p95_mm": r(self.residual_p95_mm, 3),
            "decisions_compared": self.decisions_compared,
            "divergences": self.divergences,
            "holds": self.holds,
            "tg142": self.tg142,
            "status": self.status,
            "error": self.error,
            "what_if": self.what_if,
            "residual_mean_mm": r(self.residual_mean_mm, 3),
            "tg142_edges": self.tg142_edges,
            "tg142_failures": self.tg142_failures,
            "holds_by_reason": ";".join(
                f"{k}:{int(v['count'])}" for k, v in sorted(self.holds_by_reason.items())
            ),
        }


ROW_FIELDS = tuple(SessionReport(log="", name="").row())


@dataclass
class ReportSummary:
    out: Path
    sessions: list[SessionReport]

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.sessions)

    @property
    def tg142(self) -> str:
        verdicts = {s.tg142 for s in self.sessions}
        if FAIL in verdicts:
            return FAIL
        return PASS if verdicts == {PASS} else NOT_ASSESSED

    @property
    def exit_status(self) -> int:
        """2: a log could not be read or replayed; 1: a TG-142 failure, a replay divergence
        or an unverified log; 0 otherwise."""
        if not self.ok:
            return 2
        if any(s.tg142 == FAIL or s.divergences or not s.verified for s in self.sessions):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "sessions": [asdict(s) for s in self.sessions]}


# -- the entry point ---------------------------------------------------------------------------
def write_report(
    logs: Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    beam_delay_s: float | None = None,
) -> ReportSummary:
    """Write one HTML report for ``logs`` to ``out``; see the module docstring. A log that
    cannot be read or replayed gets a section saying why (status "failed"); only writing
    ``out`` itself can raise."""
    sessions, sections = [], []
    for index, log in enumerate(logs, start=1):
        session, section = analyse_session(log, force=force, beam_delay_s=beam_delay_s, index=index)
        sessions.append(session)
        sections.append(section)
    out = Path(out)
    write_html(out, sessions, sections)
    return ReportSummary(out, sessions)


def write_html(out: Path, sessions: list[SessionReport], sections: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = _document(sessions, sections)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def analyse_session(
    path: str | Path,
    *,
    force: bool = False,
    beam_delay_s: float | None = None,
    index: int = 1,
    name: str | None = None,
) -> tuple[SessionReport, str]:
    """The session's result and its HTML section (``name``: the label shown, default the
    file name)."""
    path = Path(path)
    session = SessionReport(log=str(path), name=name or path.name)
    try:
        body = _Session(path, session, force, beam_delay_s).render()
    except (LogFormatError, ConfigError, OSError) as exc:
        session.status, session.error = "failed", _one_line(exc)
        body = _bad(f"This file could not be reviewed: {html.escape(session.error)}")
    except Exception as exc:  # noqa: BLE001 - one bad log must not stop a report or a batch
        session.status = "failed"
        session.error = f"{type(exc).__name__}: {_one_line(exc)}"
        body = _bad(f"Internal error while reviewing this log: {html.escape(session.error)}")
    # The report names the log by its file name: no folder names (they may name a patient),
    # and the same text wherever the log was reviewed.
    session.error = session.error.replace(str(path), session.name)
    body = body.replace(html.escape(str(path)), html.escape(session.name))
    return session, _section_frame(index, session, body)


# -- one session -----------------------------------------------------------------------------
class _Session:
    def __init__(self, path: Path, out: SessionReport, force: bool, beam_delay_s: float | None):
        self.path, self.out, self.force = path, out, force
        db = integrity.open_checked(path)
        try:
            self.tables = integrity.read_tables(db, TABLES, path)
            self.check = integrity.verify_tables(db, self.tables, path)
            self.meta = dict(integrity.query(db, "meta", "SELECT key, value FROM meta", path))
            rows = integrity.query(db, "config", "SELECT json FROM config", path)
            self.devices = integrity.query(
                db, "devices", "SELECT name, kind, address FROM devices ORDER BY name", path
            )
        finally:
            db.close()
        try:
            self.cfg = json.loads(rows[0][0]) if rows else {}
        except (TypeError, ValueError) as exc:
            raise LogFormatError(f"{path}: table config: not valid JSON ({exc})") from exc
        out.verified = self.check.ok
        out.verify_reason = self.check.reason
        out.digest = self.check.digest
        out.started_utc = self.meta.get("started_utc")
        self.imported = "source_format" in self.meta
        gating = self.cfg.get("gating", {})
        tracking = self.cfg.get("tracking", {})
        self.axis_name = gating.get("axis", "SI")
        self.axis = ("LR", "SI", "AP").index(self.axis_name)
        self.horizon = float(tracking.get("horizon_s", 0.0) or 0.0)
        self.beam_delay = self.horizon if beam_delay_s is None else float(beam_delay_s)
        self.end_t = _end_time(self.tables)
        self.result = None

    # -- data ------------------------------------------------------------------------------
    def _replay(self) -> None:
        from motionctl.replay import replay

        self.result = replay(self.path, force=self.force)
        r = self.result
        # replay's end of session is the last sample/decision/event; an import of X-ray
        # frames only has none of those
        self.out.duration_s = r.duration_s if r.duration_s > 0 else self.end_t
        self.out.what_if = r.what_if
        self.out.decisions_compared = r.decisions_compared
        self.out.divergences = r.divergences
        figures = r.recorded if r.recorded is not None else asdict_figures(r)
        self.figures = figures
        self.out.duty_cycle = figures["duty_cycle"]
        self.out.residual_mean_mm = figures["residual_mean_mm"]
        self.out.residual_p95_mm = figures["residual_p95_mm"]
        self.out.holds_by_reason = figures["holds_by_reason"]
        self.out.holds = int(
            sum(v["count"] for k, v in figures["holds_by_reason"].items() if k not in NOT_HOLDS)
        )

    def render(self) -> str:
        parts = []
        if not self.check.ok and not self.force:
            self.out.status = "failed"
            self.out.error = f"integrity check failed: {self.check.reason}; replay refused"
            self.out.tg142_reason = "the log is not verified"
            parts.append(
                _bad(
                    "<b>NOT VERIFIED.</b> The log's hash chain does not match its contents: "
                    f"{html.escape(str(self.check.reason))}. Replay refuses an unverified log, "
                    "so this section shows no figures. Re-run with <code>--force</code> to "
                    "review it anyway (every figure is then marked UNVERIFIED)."
                )
            )
            parts.append(self._summary_html())
            return "\n".join(parts)
        self._replay()
        if not self.check.ok:
            parts.append(
                _bad(
                    "<b>UNVERIFIED LOG, reviewed by force.</b> The hash chain does not match: "
                    f"{html.escape(str(self.check.reason))}. Every figure below comes from a "
                    "log that may have been altered."
                )
            )
        self.data = self._arrays()
        try:
            self.timing = self._timing()
        except Exception as exc:  # noqa: BLE001 - a damaged (forced) log: say so, go on
            self.timing = TimingCheck(
                NOT_ASSESSED,
                f"the check could not be computed: {_one_line(exc)}",
                edge_source=self.data["edge_source"],
                target_source="",
                beam_delay_s=self.beam_delay,
            )
        self.out.timing = self.timing
        self.out.tg142 = self.timing.verdict
        self.out.tg142_edges = self.timing.assessed
        self.out.tg142_failures = self.timing.failures
        self.out.tg142_reason = self.timing.reason
        self.out.status = "ok"
        for builder in (
            self._summary_html,
            self._trace_html,
            self._duty_html,
            self._holds_html,
            self._latency_html,
            self._timing_html,
            self._correlation_html,
            self._fiducials_html,
            self._interlocks_html,
            self._faults_html,
            self._notes_html,
        ):
            try:
                parts.append(builder())
            except Exception as exc:  # noqa: BLE001 - a damaged (forced) log: say, go on
                parts.append(
                    _bad(f"This part could not be computed: {html.escape(_one_line(exc))}")
                )
        return "\n".join(parts)

    def _arrays(self) -> dict[str, Any]:
        t = self.tables
        d: dict[str, Any] = {}
        est = t["estimates"]
        d["est_t"] = _col(est, E_T)
        d["est_pos"] = _col(est, E_POS + self.axis)
        d["est_pred"] = _col(est, E_PRED + self.axis)
        d["est_surr"] = _col(est, E_SURR)
        surrogate = self.cfg.get("tracking", {}).get("surrogate_device", "surface")
        s_axis = ("LR", "SI", "AP").index(self.cfg.get("tracking", {}).get("surrogate_axis", "AP"))
        rows = [r for r in t["samples"] if r[S_DEV] == surrogate]
        d["surrogate_device"], d["surrogate_axis"] = surrogate, ("LR", "SI", "AP")[s_axis]
        d["sur_t"], d["sur_v"] = _col(rows, S_T), _col(rows, S_XYZ + s_axis)
        gt = [r for r in t["samples"] if r[S_DEV] == GROUND_TRUTH_DEVICE]
        d["gt_t"] = _col(gt, S_T)
        d["gt_xyz"] = np.stack([_col(gt, S_XYZ + k) for k in range(3)], axis=1) if gt else None
        d["decisions"] = [
            (_num(r[D_T]), bool(r[D_ON]), str(r[D_REASONS] or ""), r[D_LAT]) for r in t["decisions"]
        ]
        d["window"] = self._window_timeline()
        d["edge_source"], d["edges"] = self._edges(d["decisions"])
        return d

    def _window_timeline(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = self.cfg.get("gating", {})
        center, width = float(g.get("center_mm", 0.0)), float(g.get("window_mm", 0.0))
        times, lo, hi = [-math.inf], [center - width / 2], [center + width / 2]
        for row in self.tables["events"]:
            if row[EV_SRC] == "operator" and row[EV_KIND] == "window":
                try:
                    detail = json.loads(row[EV_DETAIL])
                    if "refused" in detail:
                        continue
                    c, w = float(detail["value"][0]), float(detail["value"][1])
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
                times.append(_num(row[EV_T]))
                lo.append(c - w / 2)
                hi.append(c + w / 2)
        order = np.argsort(times, kind="stable")
        return np.asarray(times)[order], np.asarray(lo)[order], np.asarray(hi)[order]

    def _edges(self, decisions) -> tuple[str, list[tuple[float, bool]]]:
        by_source: dict[str, list[tuple[float, bool]]] = {}
        for row in self.tables["beam_edges"]:
            by_source.setdefault(str(row[2]), []).append((_num(row[0]), bool(row[1])))
        ordered = [s for s in EDGE_SOURCE_ORDER if s in by_source]
        ordered += sorted(s for s in by_source if s not in EDGE_SOURCE_ORDER + IMPORT_EDGE_SOURCES)
        ordered += [s for s in IMPORT_EDGE_SOURCES if s in by_source]
        if ordered:
            return ordered[0], sorted(by_source[ordered[0]])
        flips, state = [], False
        for t, on, _, _ in decisions:
            if on != state:
                flips.append((t, on))
                state = on
        return "decisions", flips

    def _timing(self) -> TimingCheck:
        d = self.data
        g = self.cfg.get("gating", {})
        source = g.get("source", "predicted")
        if source == "surrogate":
            target_t, target, target_source = d["est_t"], d["est_surr"], "the surrogate (gated)"
        elif d["gt_xyz"] is not None:
            target_t, target = d["gt_t"], d["gt_xyz"][:, self.axis]
            target_source = f"ground truth (device {GROUND_TRUTH_DEVICE}), {self.axis_name}"
        else:
            target_t, target = d["est_t"], d["est_pos"]
            target_source = f"estimated internal position, {self.axis_name} (not the prediction)"
        gate_input = d["est_surr"] if source == "surrogate" else d["est_pred"]
        base = {"edge_source": d["edge_source"], "target_source": target_source}
        if not d["decisions"]:
            return TimingCheck(
                NOT_ASSESSED,
                "the log has no recorded decisions (an import): the recorded beam state is "
                "shown, but the gating window it was delivered with is not in the source",
                beam_delay_s=self.beam_delay,
                **base,
            )
        if g.get("mode", "amplitude") != "amplitude":
            return TimingCheck(
                NOT_ASSESSED,
                f"gating mode {g.get('mode')!r}: the check compares the target with an "
                "amplitude window",
                beam_delay_s=self.beam_delay,
                **base,
            )
        return gating_timing(
            target_t,
            target,
            d["est_t"],
            gate_input,
            d["window"],
            [(t, on, reasons) for t, on, reasons, _ in d["decisions"]],
            d["edges"],
            beam_delay_s=self.beam_delay,
            **base,
        )

    # -- sections --------------------------------------------------------------------------
    def _summary_html(self) -> str:
        m = self.meta
        counts: dict[str, int] = {}
        for r in self.tables["samples"]:
            counts[str(r[S_DEV])] = counts.get(str(r[S_DEV]), 0) + 1
        for r in self.tables["spirometer_samples"]:
            counts[str(r[S_DEV])] = counts.get(str(r[S_DEV]), 0) + 1
        if self.tables["fiducials"]:
            counts["fiducial frames"] = len(self.tables["fiducials"])
        check = self.check
        integrity_text = (
            _badge("VERIFIED", "pass")
            + f" {check.batches} batches, {check.rows} rows"
            + (", closed normally" if check.closed else ", NOT closed (killed, or still open)")
        )
        if not check.ok:
            integrity_text = _badge("NOT VERIFIED", "fail") + " " + html.escape(str(check.reason))
        rows = [
            ("Log file", html.escape(str(self.path.name))),
            ("Integrity (hash chain)", integrity_text),
            (
                "Last chain digest",
                f"<code>{html.escape(str(check.digest))}</code> (keep it with the treatment "
                "record: it makes later edits of the whole log evident)",
            ),
            ("Started (UTC)", html.escape(str(m.get("started_utc", "—")))),
            ("Duration", _fmt(self.end_t, ".1f", " s")),
            ("motionctl version", html.escape(str(m.get("motionctl_version", "—")))),
            (
                "Devices",
                "<br>".join(
                    f"{html.escape(str(n))}: {html.escape(str(k))} at {html.escape(str(a))}"
                    for n, k, a in self.devices
                )
                or "—",
            ),
            (
                "Samples",
                ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(counts.items())) or "—",
            ),
        ]
        if self.imported:
            rows[3] = (
                "Started (UTC)",
                f"not recorded: imported {html.escape(str(m.get('imported_utc', '')))}",
            )
            rows.append(
                (
                    "Imported from",
                    f"{html.escape(str(m.get('source_file')))} "
                    f"({html.escape(str(m.get('source_format')))}), "
                    f"SHA-256 <code>{html.escape(str(m.get('source_sha256')))}</code>",
                )
            )
            if "patient_id_sha256" in m:
                rows.append(
                    (
                        "Patient ID",
                        "not stored; SHA-256 of the source's Patient_ID: "
                        f"<code>{html.escape(m['patient_id_sha256'])}</code> (an unsalted "
                        "hash links files of one patient; it does not anonymise a short ID)",
                    )
                )
            for key in ("import_ttl", "import_invalid_samples", "ground_truth"):
                if key in m:
                    rows.append((key.replace("_", " "), html.escape(m[key])))
        r = self.result
        if r is not None:
            if r.what_if:
                text = _badge("WHAT-IF", "na") + (
                    " the log has no recorded decisions (an import): replayed with the "
                    "recorded config, a decision at every sample; figures are motionctl's "
                    "counterfactual gate on this recording"
                )
            elif r.divergences == 0:
                text = _badge("REPRODUCED", "pass") + (
                    f" {r.decisions_compared} decisions, {r.estimates_compared} estimates and "
                    f"{r.events_compared} events replayed identically"
                )
            else:
                first = r.first_divergence or {}
                text = _badge(f"DIVERGED ({r.divergences})", "fail") + html.escape(
                    f" first: {first.get('kind')} at t={_num(first.get('t')):.3f} s: "
                    f"{first.get('reason')}"
                )
            rows.append(("Replay", text))
        return _h3("Summary") + _kv_table(rows)

    def _trace_html(self) -> str:
        d = self.data
        fig_main = _trace_figure(self, 0.0, self.end_t, "whole session")
        out = [_h3("Trace, beam-on intervals and gating window"), _img(fig_main)]
        first_on = next((t for t, on in d["edges"] if on), None)
        if self.end_t > 90 and first_on is not None:
            start = max(0.0, first_on - 5.0)
            out.append(_img(_trace_figure(self, start, start + 30.0, "30 s detail")))
        parts = []
        if np.isfinite(d["est_pos"]).any():
            parts.append(
                f"Gated axis {self.axis_name}: the estimated internal position (solid) and the "
                f"position predicted {self.horizon:g} s ahead (thin: what the gate compares)"
            )
        if d["gt_xyz"] is not None:
            parts.append(f"ground truth (device ground_truth, {self.axis_name}) in black")
        if self.tables["fiducials"]:
            parts.append(
                f"dots: X-ray fiducial positions on {self.axis_name} (accepted filled, rejected x)"
            )
        if parts:
            parts.append(
                "the band is the gating window (config plus the operator's window changes)"
            )
        if d["edges"]:
            parts.append(f"shaded: beam on (from {html.escape(d['edge_source'])})")
        else:
            parts.append("no beam-on interval in the log")
        if len(d["sur_t"]):
            parts.append(
                f"lower panel: the surrogate ({html.escape(d['surrogate_device'])}, "
                f"{d['surrogate_axis']}); red: invalid samples (kept, never interpolated)"
            )
        caption = "; ".join(parts) + "."
        caption = caption[0].upper() + caption[1:]
        out.append(f"<p class=caption>{caption}</p>")
        return "\n".join(out)

    def _duty_html(self) -> str:
        r, f = self.result, self.figures
        rows = []
        header = ["", "recorded" if not r.what_if else "what-if (motionctl's gate)"]
        recorded_ttl = None
        if r.what_if and self.data["edges"]:
            recorded_ttl = _beam_on_fraction(self.data["edges"], self.end_t)
            header.append(f"recorded ({html.escape(self.data['edge_source'])})")

        def line(label, value, spec, unit="", extra=None):
            cells = [label, _fmt(value, spec, unit)]
            if recorded_ttl is not None:
                cells.append(extra if extra is not None else "—")
            rows.append(cells)

        line(
            "Duty cycle (beam-on / time from first enable)",
            f["duty_cycle"],
            ".1%",
            extra=_fmt(recorded_ttl[0], ".1%") if recorded_ttl else None,
        )
        line(
            "Beam-on time",
            f["beam_on_s"],
            ".1f",
            " s",
            extra=_fmt(recorded_ttl[1], ".1f", " s") if recorded_ttl else None,
        )
        line("Treatment time (first enable to end)", f["treatment_time_s"], ".1f", " s")
        line("Residual motion in the gate, mean", f["residual_mean_mm"], ".2f", " mm")
        line("Residual motion in the gate, P95", f["residual_p95_mm"], ".2f", " mm")
        line("Residual samples (surrogate samples with the beam on)", f["residual_samples"], "d")
        gt = self._ground_truth_residual()
        if gt is not None:
            rows.append(
                ["Residual vs ground truth, mean / P95", f"{gt[0]:.2f} / {gt[1]:.2f} mm"]
                + (["—"] if recorded_ttl is not None else [])
            )
        note = (
            "<p class=caption>Residual motion = |estimated internal position on the gated axis "
            "- window centre| at each surrogate sample with the beam on: the decision in force "
            f"one beam delay earlier ({self.horizon * 1e3:.0f} ms, the configured horizon) "
            "enabled it (source: the estimates, not a ground truth"
            + ("; the ground-truth row uses the ground_truth device" if gt else "")
            + ").</p>"
        )
        return _h3("Duty cycle and residual motion in the gate") + _table(header, rows) + note

    def _ground_truth_residual(self) -> tuple[float, float] | None:
        d = self.data
        if d["gt_xyz"] is None or not d["edges"]:
            return None
        t, x = d["gt_t"], d["gt_xyz"][:, self.axis]
        # the beam at t follows the gating edge recorded one beam delay earlier
        t_edge = t - self.beam_delay
        on = _state_at(d["edges"], t_edge)
        wt, lo, hi = d["window"]
        k = np.searchsorted(wt, t_edge, side="right") - 1
        center = (lo[k] + hi[k]) / 2
        res = np.abs(x - center)[on & np.isfinite(x)]
        if not res.size:
            return None
        return float(res.mean()), float(np.percentile(res, 95))

    def _holds_html(self) -> str:
        holds = self.figures["holds_by_reason"]
        rows = []
        for reason, v in sorted(holds.items(), key=lambda kv: -kv[1]["seconds"]):
            rows.append(
                [
                    f"<code>{html.escape(reason)}</code>",
                    str(int(v["count"])),
                    f"{v['seconds']:.1f} s",
                    html.escape(_describe_reason(reason)),
                ]
            )
        out = [_h3("Holds by reason")]
        intervals = _reason_intervals(self.data["decisions"], self.end_t)
        if intervals:
            out.append(_img(_holds_figure(intervals, self.end_t)))
        out.append(_table(["reason", "episodes", "time", "meaning"], rows))
        if self.result.what_if:
            out.append("<p class=caption>What-if holds: motionctl's gate on the recording.</p>")
        return "\n".join(out)

    def _latency_html(self) -> str:
        dec = [_num(lat) for _, _, _, lat in self.data["decisions"] if lat is not None]
        acks: dict[str, list[float]] = {}
        for row in self.tables["beam_acks"]:
            acks.setdefault(str(row[1]), []).append(_num(row[3]) - _num(row[2]))
        chain = [e.chain_s for e in self.timing.edges if e.chain_s is not None]
        rows = [_stats_row("Sample receipt → decision (decisions.latency_s)", dec)]
        for command, values in sorted(acks.items()):
            rows.append(_stats_row(f"Gating box round trip, {command} → ACK (beam_acks)", values))
        if not acks:
            rows.append(["Gating box round trip (beam_acks)", "0", "—", "—", "—", "—"])
        rows.append(_stats_row(f"Decision → beam edge ({self.data['edge_source']})", chain))
        out = [
            _h3("Latency"),
            _table(["figure", "n", "median", "P95", "P99", "max"], rows, numeric_from=1),
        ]
        if dec or acks:
            out.append(_img(_latency_figure(dec, acks)))
        return "\n".join(out)

    def _timing_html(self) -> str:
        tc = self.timing
        cls = {PASS: "pass", FAIL: "fail"}.get(tc.verdict, "na")
        out = [_h3("TG-142 gating timing (beam on/off within 100 ms of expected)")]
        out.append(
            f"<p class=verdict>Overall: {_badge(tc.verdict, cls)} "
            + (
                f"{tc.assessed} edges assessed, {tc.failures} failure(s)"
                if tc.verdict != NOT_ASSESSED
                else html.escape(tc.reason)
            )
            + "</p>"
        )
        out.append(
            "<div class=definition><b>Expected time, as used here.</b> The gate compares the "
            f"position predicted {self.horizon:g} s ahead with the window, so that a beam "
            "following the gating command by that latency switches when the <i>target</i> "
            "crosses the window edge. Checking the edges against the prediction would only "
            "test the machine, never whether the beam matched the target. So: "
            "<b>expected = the time the target crossed the window edge "
            f"(target: {html.escape(tc.target_source)}; interpolated between samples) minus "
            f"the beam delay after the recorded edge, {tc.beam_delay_s * 1e3:.0f} ms</b> "
            + (
                "(the configured prediction horizon <code>tracking.horizon_s</code>: the "
                "latency the configuration declares; the delay is not in the log; give the "
                "measured one with <code>--beam-delay</code>)"
                if abs(tc.beam_delay_s - self.horizon) < 1e-12
                else "(given for this report)"
            )
            + f". Recorded edges: <code>{html.escape(tc.edge_source)}</code>"
            + (
                " (the simulated linac's own record; the simulator adds no beam delay of its own)"
                if tc.edge_source == "linac_sim"
                else ""
            )
            + ". PASS: |edge − expected| ≤ 100 ms. Edges caused by an interlock, the operator "
            "or the session stop are judged against the decision that caused them. An edge "
            f"with no target crossing of its direction within ±{MATCH_RADIUS_S:g} s FAILs "
            "(gate chatter, or a predicted crossing the target did not make), unless the "
            "recorded target ends before that crossing could be seen (NOT ASSESSED); so does an "
            "expected transition the beam did not follow for more than 100 ms. Diagnostics: "
            "<i>gate input → edge</i> is the time from the gate's own input (the predicted "
            "position) crossing; <i>latency − that</i> is the prediction's timing error at "
            "the crossing; <i>decision → edge</i> is the interface.</div>"
        )
        if not tc.edges and not tc.missed:
            return "\n".join(out)
        window_edges = [e for e in tc.edges if e.cause == "window" and e.latency_s is not None]
        if window_edges:
            rows = []
            for label, on in (("beam on", True), ("beam off", False)):
                lat = [e.latency_s for e in window_edges if e.beam_on == on]
                gate = [
                    e.gate_input_s
                    for e in window_edges
                    if e.beam_on == on and e.gate_input_s is not None
                ]
                if not lat:
                    continue
                a = np.abs(np.asarray(lat))
                rows.append(
                    [
                        label,
                        str(len(lat)),
                        f"{np.mean(lat) * 1e3:+.0f} ms",
                        f"{np.median(a) * 1e3:.0f} ms",
                        f"{np.percentile(a, 95) * 1e3:.0f} ms",
                        f"{a.max() * 1e3:.0f} ms",
                        f"{np.median(gate) * 1e3:.0f} ms" if gate else "—",
                        str(sum(1 for e in window_edges if e.beam_on == on and e.verdict == FAIL)),
                    ]
                )
            out.append(
                _table(
                    [
                        "window edges",
                        "n",
                        "mean latency",
                        "median |latency|",
                        "P95 |latency|",
                        "max |latency|",
                        "median gate input → edge",
                        "FAIL",
                    ],
                    rows,
                    numeric_from=1,
                )
            )
            means = []
            for label, on in (("on", True), ("off", False)):
                lat = [e.latency_s for e in window_edges if e.beam_on == on]
                if lat:
                    means.append(f"{label} {(np.mean(lat) + tc.beam_delay_s) * 1e3:+.0f} ms")
            out.append(
                "<p class=caption>Another beam delay <i>d</i> moves every window-edge latency "
                f"by ({tc.beam_delay_s * 1e3:.0f} ms − <i>d</i>): with <i>d</i> = 0 (the beam "
                f"exactly at the recorded edge) the mean latencies would be {', '.join(means)} "
                "(same pairing). A constant offset points at the delay or the prediction's lead; "
                "scatter points at prediction error.</p>"
            )
            out.append(_img(_timing_figure(tc)))
        failing = [e for e in tc.edges if e.verdict == FAIL]
        shown = failing[:MAX_TABLE_ROWS]
        if len(shown) < MAX_TABLE_ROWS:
            shown += [e for e in tc.edges if e.verdict != FAIL][: MAX_TABLE_ROWS - len(shown)]
        shown.sort(key=lambda e: e.t)
        rows = [
            [
                _fmt(e.t, ".3f", " s"),
                "ON" if e.beam_on else "OFF",
                html.escape(e.cause),
                _fmt(e.expected_t, ".3f", " s"),
                _fmt_ms(e.latency_s, signed=True),
                _fmt_ms(e.gate_input_s),
                _fmt_ms(e.chain_s),
                _badge(e.verdict, {PASS: "pass", FAIL: "fail"}.get(e.verdict, "na")),
                html.escape(e.note),
            ]
            for e in shown
        ]
        more = len(tc.edges) - len(shown)
        out.append(
            _table(
                [
                    "edge at",
                    "beam",
                    "caused by",
                    "expected at",
                    "latency",
                    "gate input → edge",
                    "decision → edge",
                    "verdict",
                    "note",
                ],
                rows,
            )
        )
        if more > 0:
            out.append(
                f"<p class=caption>{more} more passing edges not listed (every failing edge "
                "is listed first).</p>"
            )
        if tc.missed:
            rows = [
                [
                    _fmt(m["t"], ".3f", " s"),
                    "ON" if m["beam_on"] else "OFF",
                    f"{m['duration_s'] * 1e3:.0f} ms",
                    _badge(FAIL, "fail"),
                    html.escape(m["note"]),
                ]
                for m in tc.missed[:MAX_TABLE_ROWS]
            ]
            out.append("<h4>Expected transitions the beam did not follow</h4>")
            out.append(_table(["expected at", "beam", "disagreement", "verdict", "note"], rows))
        return "\n".join(out)

    def _correlation_html(self) -> str:
        points = []
        for row in self.tables["events"]:
            if row[EV_SRC] == "correlation" and row[EV_KIND] == "model_point":
                try:
                    detail = json.loads(row[EV_DETAIL])
                except (TypeError, ValueError):
                    detail = {}
                points.append((_num(row[EV_T]), detail))
        out = [_h3("Correlation model checks at each X-ray")]
        if not points:
            out.append("<p>No X-ray model points in this log.</p>")
            return "\n".join(out)
        tol = float(self.cfg.get("tracking", {}).get("fiducial_tolerance_mm", math.nan))
        check = float(self.cfg.get("correlation", {}).get("check_threshold_mm", math.nan))
        res = [_num(p.get("residual_mm")) for _, p in points]
        miss = [_num(p.get("estimate_miss_mm")) for _, p in points]
        rows = [
            _stats_row("Correlation error (new point vs model), mm", res, unit="mm"),
            _stats_row("Estimate miss (estimate vs X-ray position), mm", miss, unit="mm"),
        ]
        out.append(_table(["figure", "n", "median", "P95", "P99", "max"], rows, numeric_from=1))
        over = sum(1 for v in miss if math.isfinite(v) and v > tol)
        out.append(
            f"<p>{len(points)} X-ray model points; "
            f"{sum(1 for _, p in points if p.get('accepted'))} accepted by the model; "
            f"estimate miss above the fiducial tolerance ({tol:g} mm): {over}.</p>"
        )
        out.append(_img(_correlation_figure(points, tol, check)))
        listed = [
            (t, p)
            for t, p in points
            if not p.get("accepted") or _num(p.get("estimate_miss_mm")) > tol
        ]
        listed = (listed + [tp for tp in points if tp not in listed])[:MAX_TABLE_ROWS]
        listed.sort(key=lambda tp: tp[0])
        rows = [
            [
                _fmt(t, ".2f", " s"),
                html.escape(str(p.get("frame_id", ""))),
                "yes" if p.get("accepted") else "<b class=failtext>no</b>",
                html.escape(str(p.get("model") or "—")),
                "yes" if p.get("model_valid") else "no",
                _fmt(_num(p.get("residual_mm")), ".2f", " mm"),
                _fmt(_num(p.get("estimate_miss_mm")), ".2f", " mm"),
                html.escape(str(p.get("reason") or "")),
            ]
            for t, p in listed
        ]
        out.append(
            _table(
                [
                    "t",
                    "frame",
                    "accepted",
                    "model",
                    "model valid",
                    "correlation error",
                    "estimate miss",
                    "reason",
                ],
                rows,
            )
        )
        return "\n".join(out)

    def _fiducials_html(self) -> str:
        rows_in = self.tables["fiducials"]
        out = [_h3("Fiducial acceptance")]
        if not rows_in:
            out.append("<p>No fiducial frames in this log.</p>")
            return "\n".join(out)
        groups: dict[tuple[str, str], list[tuple]] = {}
        for r in rows_in:
            groups.setdefault((str(r[F_DEV]), str(r[F_MODE])), []).append(r)
        rows = []
        for (device, mode), items in sorted(groups.items()):
            accepted = [r for r in items if r[F_ACC]]
            reasons: dict[str, int] = {}
            for r in items:
                if not r[F_ACC]:
                    reasons[str(r[F_REASON])] = reasons.get(str(r[F_REASON]), 0) + 1
            residual = [_num(r[F_RES]) for r in accepted]
            residual = [v for v in residual if math.isfinite(v)]
            unc = [_num(r[F_UNC]) for r in accepted]
            unc = [v for v in unc if math.isfinite(v)]
            rows.append(
                [
                    html.escape(device),
                    html.escape(mode),
                    str(len(items)),
                    f"{len(accepted)} ({len(accepted) / len(items):.0%})",
                    "; ".join(f"{html.escape(k)}: {v}" for k, v in sorted(reasons.items())) or "—",
                    f"{np.mean(residual):.2f} mm" if residual else "—",
                    f"{np.mean(unc):.2f} mm" if unc else "—",
                ]
            )
        out.append(
            _table(
                [
                    "device",
                    "mode",
                    "frames",
                    "accepted",
                    "rejected (reason: frames)",
                    "mean fit residual",
                    "mean uncertainty",
                ],
                rows,
            )
        )
        return "\n".join(out)

    def _interlocks_html(self) -> str:
        events = [r for r in self.tables["events"] if r[EV_SRC] == "interlock"]
        out = [_h3("Interlock events")]
        if not events:
            out.append("<p>No interlock events.</p>")
            return "\n".join(out)
        open_at: dict[str, float] = {}
        summary: dict[str, list[float]] = {}
        for r in events:
            key = str(r[EV_DETAIL] or "").split(" ", 1)[0]
            t = _num(r[EV_T])
            if r[EV_KIND] == "raised":
                open_at[key] = t
                summary.setdefault(key, [])
            elif r[EV_KIND] == "cleared" and key in open_at:
                summary.setdefault(key, []).append(t - open_at.pop(key))
        rows = []
        for key, durations in sorted(summary.items()):
            still = " (still active at the end)" if key in open_at else ""
            rows.append(
                [
                    f"<code>{html.escape(key)}</code>",
                    str(len(durations) + (1 if key in open_at else 0)),
                    f"{sum(durations):.2f} s{still}",
                    f"{max(durations) * 1e3:.0f} ms" if durations else "—",
                    html.escape(_describe_reason(key)),
                ]
            )
        out.append(_table(["interlock", "raised", "total time", "longest", "meaning"], rows))
        rows = [
            [
                _fmt(_num(r[EV_T]), ".3f", " s"),
                html.escape(str(r[EV_KIND])),
                html.escape(str(r[EV_DETAIL] or "")),
            ]
            for r in events[:MAX_TABLE_ROWS]
        ]
        out.append(_table(["t", "event", "detail"], rows))
        if len(events) > MAX_TABLE_ROWS:
            out.append(f"<p class=caption>{len(events) - MAX_TABLE_ROWS} more not listed.</p>")
        return "\n".join(out)

    def _faults_html(self) -> str:
        faults = []
        for r in self.tables["events"]:
            if r[EV_SRC] == "rig" and r[EV_KIND] == "fault":
                try:
                    faults.append(json.loads(r[EV_DETAIL]))
                except (TypeError, ValueError):
                    faults.append({"detail": r[EV_DETAIL]})
        if not faults:
            return _h3("Injected faults") + "<p>None (no rig fault events in this log).</p>"
        rate_hz = _num(self.cfg.get("imaging", {}).get("rate_hz"))
        rows = []
        for f in faults:
            latency = f.get("hold_latency_ms")
            on_edges = f.get("beam_on_edges_during")
            held = _badge(*fault_verdict(f, rate_hz))
            rows.append(
                [
                    html.escape(f"{f.get('device')}:{f.get('kind')}"),
                    _fmt(_num(f.get("start_s")), ".2f", " s"),
                    _fmt(_num(f.get("end_s")), ".2f", " s"),
                    "yes" if f.get("beam_on_at_start") else "no",
                    _fmt(_num(latency), ".1f", " ms"),
                    html.escape(str(on_edges)),
                    held,
                ]
            )
        return (
            _h3("Injected faults")
            + _table(
                [
                    "fault",
                    "start",
                    "end",
                    "beam on at start",
                    "hold latency",
                    "beam-on edges during",
                    "outcome",
                ],
                rows,
            )
            + "<p class=caption>From the rig's record (events rig/fault), measured on the "
            "simulated linac's own edges. CHECK: the beam was on at the fault and was not "
            "held within 100 ms, or came on during the fault; some faults (e.g. on a device "
            "the gate does not need) are not expected to hold. An X-ray imager's fault shows "
            "only in its next image: held within one imaging period + 100 ms of the fault's "
            "start (two for a reordered pair) is 'HELD at the next image'; a freeze shorter "
            "than the imager's stale timeout is not held, by design.</p>"
        )

    def _notes_html(self) -> str:
        notes = list(self.result.notes) if self.result is not None else []
        if not notes:
            return ""
        return (
            _h3("Replay notes")
            + "<ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes[:MAX_TABLE_ROWS])
            + "</ul>"
        )


def fault_verdict(fault: dict, imaging_rate_hz: float | None) -> tuple[str, str]:
    """(badge text, kind) for one injected fault of the rig's record. An X-ray imager's
    fault shows only in its next image: up to one imaging period after the fault starts,
    two for a reordered pair (the older image arrives a period late)."""
    latency = fault.get("hold_latency_ms")
    on_edges = fault.get("beam_on_edges_during")
    if not fault.get("beam_on_at_start"):
        return "beam already off", "na"
    if latency is None or on_edges:
        return "CHECK", "fail"
    if latency <= TOLERANCE_S * 1e3:
        return "HELD ≤ 100 ms", "pass"
    if fault.get("device") == "xray" and imaging_rate_hz and imaging_rate_hz > 0:
        images = 2 if fault.get("kind") == "reorder" else 1
        if latency <= (images / imaging_rate_hz + TOLERANCE_S) * 1e3:
            return "HELD at the next image", "pass"
    return "CHECK", "fail"


def asdict_figures(result) -> dict[str, Any]:
    return {
        "beam_on_s": result.beam_on_s,
        "duty_cycle": result.duty_cycle,
        "residual_mean_mm": result.residual_mean_mm,
        "residual_p95_mm": result.residual_p95_mm,
        "residual_samples": result.residual_samples,
        "holds_by_reason": result.holds_by_reason,
        "treatment_time_s": result.treatment_time_s,
    }


# -- the timing check (pure) -------------------------------------------------------------------
def gating_timing(
    target_t: np.ndarray,
    target: np.ndarray,
    gate_t: np.ndarray,
    gate_input: np.ndarray,
    window: tuple[np.ndarray, np.ndarray, np.ndarray],
    decisions: Sequence[tuple[float, bool, str]],
    edges: Sequence[tuple[float, bool]],
    *,
    beam_delay_s: float,
    edge_source: str = "",
    target_source: str = "",
    tolerance_s: float = TOLERANCE_S,
    radius_s: float = MATCH_RADIUS_S,
) -> TimingCheck:
    """The TG-142 timing check of the module docstring.

    ``target_t, target``: the target on the gated axis; ``gate_t, gate_input``: what the gate
    compared (the prediction); ``window``: (times, lower, upper) step function, the first
    time -inf; ``decisions``: (t, beam enabled, reasons) in order; ``edges``: (t, beam on)
    as recorded."""
    edges = sorted((float(t), bool(on)) for t, on in edges)
    dec_t = np.asarray([d[0] for d in decisions], dtype=float)
    permitted = np.asarray(
        [not (set(filter(None, d[2].split(","))) - WINDOW_REASONS) for d in decisions], dtype=bool
    )

    def permitted_at(t: float) -> bool:
        k = int(np.searchsorted(dec_t, t, side="right")) - 1
        return bool(permitted[k]) if k >= 0 else False

    # decision flips and what caused them
    flips: dict[bool, list[tuple[float, frozenset[str]]]] = {True: [], False: []}
    state = False
    last_hold: frozenset[str] = frozenset()
    for t, on, reasons in decisions:
        rs = frozenset(filter(None, reasons.split(",")))
        if not on and rs - {"debounce"}:
            last_hold = rs - {"debounce"}
        if on != state:
            flips[on].append((t, last_hold if on else rs))
            state = on
    flip_t = {k: [f[0] for f in v] for k, v in flips.items()}

    # expected transitions: target crossings, shifted by the beam delay, where permitted
    expected = [
        (tc - beam_delay_s, on)
        for tc, on in _crossings(target_t, target, window, interpolate=True)
        if permitted_at(tc - beam_delay_s)
    ]
    gate_cross = _crossings(gate_t, gate_input, window, interpolate=False)
    gate_times = {k: [t for t, on in gate_cross if on == k] for k in (True, False)}

    checks: list[EdgeCheck] = []
    window_edges: list[int] = []
    for t_e, on in edges:
        k = bisect.bisect_right(flip_t[on], t_e + 0.002) - 1
        if k < 0:
            if on:
                checks.append(
                    EdgeCheck(
                        t_e,
                        on,
                        "no decision",
                        None,
                        None,
                        None,
                        None,
                        FAIL,
                        "beam on with no decision enabling it",
                    )
                )
            else:
                checks.append(
                    EdgeCheck(
                        t_e,
                        on,
                        "no decision",
                        None,
                        None,
                        None,
                        None,
                        NOT_ASSESSED,
                        "the box or linac held by itself (fail-safe)",
                    )
                )
            continue
        t_d, cause = flips[on][k]
        chain = t_e - t_d
        other = sorted(cause - WINDOW_REASONS)
        if other or not cause:
            label = ",".join(other) or ("operator enable" if on else "hold")
            verdict = PASS if -0.002 <= chain <= tolerance_s else FAIL
            checks.append(
                EdgeCheck(
                    t_e,
                    on,
                    label,
                    t_d,
                    chain,
                    chain,
                    None,
                    verdict,
                    "judged against the decision that caused it",
                )
            )
            continue
        g = bisect.bisect_right(gate_times[on], t_d + 1e-9) - 1
        gate_lat = t_e - gate_times[on][g] if g >= 0 else None
        checks.append(EdgeCheck(t_e, on, "window", None, None, chain, gate_lat, FAIL))
        window_edges.append(len(checks) - 1)

    # match window edges to expected transitions: nearest first, one to one
    exp_by_dir = {
        k: [(t, j) for j, (t, on) in enumerate(expected) if on == k] for k in (True, False)
    }
    pairs = []
    for i in window_edges:
        e = checks[i]
        times = exp_by_dir[e.beam_on]
        lo = bisect.bisect_left(times, (e.t - radius_s, -1))
        for t_x, j in times[lo:]:
            if t_x > e.t + radius_s:
                break
            pairs.append((abs(e.t - t_x), i, j))
    pairs.sort()
    used_edges: set[int] = set()
    used_expected: set[int] = set()
    for _, i, j in pairs:
        if i in used_edges or j in used_expected:
            continue
        used_edges.add(i)
        used_expected.add(j)
        e = checks[i]
        e.expected_t = expected[j][0]
        e.latency_s = e.t - e.expected_t
        e.verdict = PASS if abs(e.latency_s) <= tolerance_s else FAIL
        if e.verdict == FAIL:
            e.note = (
                "late: after the target crossing minus the beam delay"
                if e.latency_s > 0
                else "early: before the target crossing minus the beam delay"
            )
    # A crossing the edge could match may lie after the recorded target ends (an edge in the
    # last beam delay + tolerance before the session stopped): it cannot be judged.
    last_expected = (float(target_t[-1]) if len(target_t) else -math.inf) - beam_delay_s
    for i in window_edges:
        if i in used_edges:
            continue
        if checks[i].t + tolerance_s > last_expected:
            checks[i].verdict = NOT_ASSESSED
            checks[i].note = "the recorded target ends before its crossing could be seen"
        else:
            checks[i].note = (
                f"no target crossing of this direction within ±{radius_s:g} s (gate chatter, "
                "or a predicted crossing the target did not make)"
            )

    # expected transitions with no edge: did the beam disagree for longer than the tolerance?
    missed = []
    perm_change = dec_t[1:][permitted[1:] != permitted[:-1]] if len(dec_t) > 1 else dec_t[:0]
    exp_times = [t for t, _ in expected]
    for j, (t_x, on) in enumerate(expected):
        if j in used_expected:
            continue
        nxt = exp_times[j + 1] if j + 1 < len(expected) else math.inf
        p = int(np.searchsorted(perm_change, t_x, side="right"))
        if p < len(perm_change):
            nxt = min(nxt, float(perm_change[p]))
        a = bisect.bisect_right(edges, (t_x, True))
        follow = next((t for t, s in edges[a:] if s == on), math.inf)
        until = min(nxt, follow)
        actual = edges[a - 1][1] if a > 0 else False
        if actual != on and until - t_x > tolerance_s:
            duration = min(until, target_t[-1] if len(target_t) else until) - t_x
            if duration <= tolerance_s:
                continue
            missed.append(
                {
                    "t": t_x,
                    "beam_on": on,
                    "duration_s": duration,
                    "note": (
                        "the target entered the window; the beam stayed off"
                        if on
                        else "the target left the window; the beam stayed ON"
                    ),
                }
            )
    result = TimingCheck(
        NOT_ASSESSED,
        "",
        edge_source=edge_source,
        target_source=target_source,
        beam_delay_s=beam_delay_s,
        tolerance_s=tolerance_s,
        edges=checks,
        missed=missed,
        expected_transitions=len(expected),
    )
    if result.failures:
        result.verdict = FAIL
        result.reason = f"{result.failures} failure(s)"
    elif result.assessed:
        result.verdict = PASS
        result.reason = f"all {result.assessed} edges within {tolerance_s * 1e3:.0f} ms"
    else:
        result.reason = "no beam edges to assess"
    return result


def _crossings(
    t: np.ndarray,
    x: np.ndarray,
    window: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    interpolate: bool,
) -> list[tuple[float, bool]]:
    """(time, now inside) wherever ``x`` enters or leaves the window."""
    t = np.asarray(t, dtype=float)
    x = np.asarray(x, dtype=float)
    keep = np.isfinite(t) & np.isfinite(x)
    t, x = t[keep], x[keep]
    if len(t) < 2:
        return []
    wt, wlo, whi = window
    k = np.searchsorted(wt, t, side="right") - 1
    lo, hi = wlo[k], whi[k]
    inside = (x >= lo) & (x <= hi)
    out = []
    for i in np.flatnonzero(inside[1:] != inside[:-1]) + 1:
        t0, t1, x0, x1 = t[i - 1], t[i], x[i - 1], x[i]
        tc = t1
        same_window = lo[i] == lo[i - 1] and hi[i] == hi[i - 1]
        if interpolate and same_window and t1 - t0 <= MAX_SAMPLE_GAP_S and x1 != x0:
            if inside[i]:
                bound = hi[i] if x0 > hi[i] else lo[i]
            else:
                bound = hi[i] if x1 > hi[i] else lo[i]
            frac = min(1.0, max(0.0, (bound - x0) / (x1 - x0)))
            tc = t0 + frac * (t1 - t0)
        out.append((float(tc), bool(inside[i])))
    return out


# -- small helpers ----------------------------------------------------------------------------
def _num(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan if value is None else float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _col(rows: Sequence[tuple], k: int) -> np.ndarray:
    return np.fromiter((_num(r[k]) for r in rows), dtype=float, count=len(rows))


def _end_time(tables: dict[str, list[tuple]]) -> float:
    latest = 0.0
    for table, column in (
        ("samples", 2),
        ("spirometer_samples", 2),
        ("decisions", 0),
        ("events", 0),
        ("beam_edges", 0),
        ("fiducials", 2),
    ):
        values = [v for v in (_num(r[column]) for r in tables[table]) if math.isfinite(v)]
        if values:
            latest = max(latest, max(values))
    return latest


def _state_at(edges: Sequence[tuple[float, bool]], t: np.ndarray) -> np.ndarray:
    if not edges:
        return np.zeros(len(t), dtype=bool)
    et = np.asarray([e[0] for e in edges])
    es = np.asarray([e[1] for e in edges], dtype=bool)
    k = np.searchsorted(et, t, side="right") - 1
    return np.where(k >= 0, es[np.maximum(k, 0)], False)


def _beam_intervals(edges: Sequence[tuple[float, bool]], end_t: float) -> list[tuple[float, float]]:
    out, start = [], None
    for t, on in edges:
        if on and start is None:
            start = t
        elif not on and start is not None:
            out.append((start, t))
            start = None
    if start is not None:
        out.append((start, max(end_t, start)))
    return out


def _beam_on_fraction(
    edges: Sequence[tuple[float, bool]], end_t: float
) -> tuple[float | None, float]:
    intervals = _beam_intervals(edges, end_t)
    on = sum(b - a for a, b in intervals)
    if not intervals or end_t <= intervals[0][0]:
        return None, on
    return on / (end_t - intervals[0][0]), on


def _reason_intervals(decisions, end_t: float) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    active: dict[str, float] = {}
    last_t = 0.0
    for t, _, reasons, _ in decisions:
        current = set(filter(None, reasons.split(",")))
        for r in list(active):
            if r not in current:
                out.setdefault(r, []).append((active.pop(r), t))
        for r in current:
            active.setdefault(r, t)
        last_t = t
    for r, start in active.items():
        out.setdefault(r, []).append((start, max(end_t, last_t)))
    return out


def _describe_reason(reason: str) -> str:
    from motionctl.interlocks import SPECS

    code, _, subject = reason.partition(":")
    if code in GATE_REASONS:
        return GATE_REASONS[code]
    spec = SPECS.get(code)
    if spec is not None:
        text = spec.trigger + (f" ({subject})" if subject else "")
        return text + ("; needs the operator's acknowledgement" if spec.clears == "ack" else "")
    return ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    try:
        return format(value, spec) + unit
    except (TypeError, ValueError):
        return html.escape(str(value))


def _fmt_ms(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value * 1e3:+.1f} ms" if signed else f"{value * 1e3:.1f} ms"


def _stats_row(label: str, values: Sequence[float], unit: str = "ms") -> list[str]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not a.size:
        return [html.escape(label), "0", "—", "—", "—", "—"]
    scale, fmt = (1e3, ".2f") if unit == "ms" else (1.0, ".2f")
    suffix = f" {unit}"
    return [
        html.escape(label),
        str(a.size),
        *(
            format(v * scale, fmt) + suffix
            for v in (
                np.median(a),
                np.percentile(a, 95),
                np.percentile(a, 99),
                a.max(),
            )
        ),
    ]


# -- HTML ----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1b1f24;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:2px solid #345;padding-bottom:4px;
margin-top:2.2em}h3{margin-top:1.6em;color:#234}h4{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em 0;font-size:.92em}
th,td{border:1px solid #c8ced6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:4px;font-weight:700;color:#fff}
.pass{background:#1e7d32}.fail{background:#c62828}.na{background:#6b7280}
.failtext{color:#c62828}.box{padding:8px 12px;border-radius:6px;margin:.6em 0}
.bad{background:#fdecea;border:1px solid #c62828}
.definition{background:#f4f7fb;border-left:4px solid #345;padding:8px 12px;margin:.6em 0;
font-size:.92em}.caption{color:#4b5563;font-size:.9em}.verdict{font-size:1.1em}
img{max-width:100%;height:auto;border:1px solid #e5e7eb}code{font-size:.95em}
.meta{color:#4b5563}
"""


def _document(sessions: list[SessionReport], sections: list[str]) -> str:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    rows = []
    for i, s in enumerate(sessions, start=1):
        rows.append(
            [
                f'<a href="#s{i}">{html.escape(s.name)}</a>',
                _badge("yes", "pass") if s.verified else _badge("NO", "fail"),
                _fmt(s.duration_s, ".1f", " s"),
                _fmt(s.duty_cycle, ".1%"),
                _fmt(s.residual_p95_mm, ".2f", " mm"),
                _verdict_badge(s.tg142),
                _badge("ok", "pass") if s.status == "ok" else _badge("FAILED", "fail"),
                html.escape(s.error),
            ]
        )
    overview = _table(
        [
            "session log",
            "verified",
            "duration",
            "duty cycle",
            "residual P95",
            "TG-142 timing",
            "review",
            "error",
        ],
        rows,
    )
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>motionctl QA report</title><style>{CSS}</style></head><body>\n"
        "<h1>motionctl QA report: respiratory gating sessions</h1>\n"
        f"<p class=meta>Generated {now} by motionctl {html.escape(__version__)}. "
        f"{len(sessions)} session(s). Times are seconds from each session's start.</p>\n"
        "<h2>Overview</h2>\n" + overview + "\n".join(sections) + "\n</body></html>\n"
    )


def _section_frame(index: int, session: SessionReport, body: str) -> str:
    verified = _badge("VERIFIED", "pass") if session.verified else _badge("NOT VERIFIED", "fail")
    review = _badge("ok", "pass") if session.status == "ok" else _badge("FAILED", "fail")
    return (
        f'<section id="s{index}"><h2>{index}. {html.escape(session.name)}</h2>\n'
        f"<p>Integrity: {verified} &nbsp; TG-142 gating timing: "
        f"{_verdict_badge(session.tg142)} &nbsp; Review: {review}</p>\n"
        f"{body}\n</section>\n"
    )


def _verdict_badge(verdict: str) -> str:
    return _badge(verdict, {PASS: "pass", FAIL: "fail"}.get(verdict, "na"))


def _badge(text: str, cls: str) -> str:
    return f"<span class='badge {cls}'>{html.escape(text)}</span>"


def _bad(text: str) -> str:
    return f"<div class='box bad'>{text}</div>"


def _h3(text: str) -> str:
    return f"<h3>{html.escape(text)}</h3>"


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 99) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=num>{c}</td>" if k >= numeric_from else f"<td>{c}</td>"
            for k, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="figure" src="data:image/png;base64,{data}"></p>'


# -- figures (matplotlib, Agg canvas, no pyplot) -----------------------------------------------
def _new_figure(width: float, height: float, rows: int = 1, sharex: bool = True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _envelope(t: np.ndarray, y: np.ndarray, points: int = PLOT_POINTS):
    """At most ``points`` points that keep every peak (min and max per bucket); NaN gaps
    stay gaps, and so do gaps in time (no line is drawn across missing samples)."""
    t, y = _break_gaps(np.asarray(t, dtype=float), np.asarray(y, dtype=float))
    n = len(t)
    if n <= points:
        return t, y
    buckets = points // 2
    edges = np.linspace(0, n, buckets + 1).astype(int)
    out_t, out_y = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        seg = y[a:b]
        if not np.isfinite(seg).any():
            out_t += [t[a]]
            out_y += [np.nan]
            continue
        i, j = int(np.nanargmin(seg)), int(np.nanargmax(seg))
        for k in sorted({i, j}):
            out_t.append(t[a + k])
            out_y.append(seg[k])
    return np.asarray(out_t), np.asarray(out_y)


def _break_gaps(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(t) < 3:
        return t, y
    dt = np.diff(t)
    limit = max(0.25, 3.0 * float(np.median(dt)))
    gaps = np.flatnonzero(dt > limit) + 1
    if not gaps.size:
        return t, y
    return np.insert(t, gaps, t[gaps - 1] + dt[gaps - 1] / 2), np.insert(y, gaps, np.nan)


def _window_steps(window, t0: float, t1: float):
    wt, lo, hi = window
    times = [t0] + [t for t in wt[1:] if t0 < t < t1] + [t1]
    k = np.searchsorted(wt, times, side="right") - 1
    return np.asarray(times), lo[k], hi[k]


def _shade_beam(ax, intervals, t0: float, t1: float, label: str) -> None:
    spans = [(max(a, t0), min(b, t1) - max(a, t0)) for a, b in intervals if b >= t0 and a <= t1]
    if spans:
        ax.broken_barh(
            spans,
            (0, 1),
            transform=ax.get_xaxis_transform(),
            color="#fbbf24",
            alpha=0.28,
            lw=0,
            label=label,
        )


def _trace_figure(s: _Session, t0: float, t1: float, title: str) -> bytes:
    d = s.data
    has_est = np.isfinite(d["est_pos"]).any()
    has_gt = d["gt_xyz"] is not None or bool(s.tables["fiducials"])
    has_sur = len(d["sur_t"]) > 0
    rows = int(has_est or has_gt) + int(has_sur)
    rows = max(rows, 1)
    fig, axes = _new_figure(11, 2.6 * rows + 0.4, rows)
    intervals = _beam_intervals(d["edges"], s.end_t)
    k = 0
    if has_est or has_gt:
        ax = axes[k]
        k += 1
        wt, lo, hi = _window_steps(d["window"], t0, t1)
        ax.fill_between(
            wt, lo, hi, step="post", color="#60a5fa", alpha=0.25, lw=0, label="gating window"
        )
        _shade_beam(ax, intervals, t0, t1, f"beam on ({d['edge_source']})")
        sel = (d["est_t"] >= t0) & (d["est_t"] <= t1)
        if has_est:
            tt, yy = _envelope(d["est_t"][sel], d["est_pos"][sel])
            ax.plot(tt, yy, color="#1d4ed8", lw=1.1, label="estimated target")
            tt, yy = _envelope(d["est_t"][sel], d["est_pred"][sel])
            ax.plot(
                tt, yy, color="#7c3aed", lw=0.7, alpha=0.8, label=f"predicted (+{s.horizon:g} s)"
            )
        if d["gt_xyz"] is not None:
            g = (d["gt_t"] >= t0) & (d["gt_t"] <= t1)
            tt, yy = _envelope(d["gt_t"][g], d["gt_xyz"][g, s.axis])
            ax.plot(tt, yy, color="black", lw=1.0, label="ground truth")
        fid = [r for r in s.tables["fiducials"] if t0 <= _num(r[F_TACQ]) <= t1]
        if fid:
            acc = [r for r in fid if r[F_ACC]]
            rej = [r for r in fid if not r[F_ACC]]
            if acc:
                ax.plot(
                    [_num(r[F_TACQ]) for r in acc],
                    [_num(r[F_XYZ + s.axis]) for r in acc],
                    "o",
                    ms=3.5,
                    color="#059669",
                    label="X-ray (accepted)",
                )
            if rej:
                ax.plot(
                    [_num(r[F_TACQ]) for r in rej],
                    [_num(r[F_XYZ + s.axis]) for r in rej],
                    "x",
                    ms=4,
                    color="#c62828",
                    label="X-ray (rejected)",
                )
        ax.set_ylabel(f"{s.axis_name} (mm)")
        _legend_above(ax)
        ax.set_title(f"Gated axis {s.axis_name}: {title}", fontsize=9, loc="left")
    if has_sur:
        ax = axes[k]
        sel = (d["sur_t"] >= t0) & (d["sur_t"] <= t1)
        _shade_beam(ax, intervals, t0, t1, f"beam on ({d['edge_source']})")
        tt, yy = _envelope(d["sur_t"][sel], d["sur_v"][sel])
        ax.plot(tt, yy, color="#374151", lw=0.9, label=f"surrogate {d['surrogate_device']}")
        first = True
        for row in s.tables["events"]:
            if row[EV_SRC] == "import" and row[EV_KIND] == "invalid_samples":
                try:
                    until = float(json.loads(row[EV_DETAIL])["until_s"])
                except (TypeError, ValueError, KeyError):
                    until = _num(row[EV_T])
                a = _num(row[EV_T])
                if until >= t0 and a <= t1:
                    ax.axvspan(
                        a,
                        max(until, a + 0.02),
                        color="#dc2626",
                        alpha=0.35,
                        lw=0,
                        label="invalid samples" if first else None,
                    )
                    first = False
        ax.set_ylabel(f"{d['surrogate_axis']} (mm)")
        _legend_above(ax)
    axes[-1].set_xlabel("session time (s)")
    axes[-1].set_xlim(t0, t1 if t1 > t0 else t0 + 1)
    return _png(fig)


def _legend_above(ax) -> None:
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=6, fontsize=7, frameon=False)


def _holds_figure(intervals: dict[str, list[tuple[float, float]]], end_t: float) -> bytes:
    reasons = sorted(intervals, key=lambda r: -sum(b - a for a, b in intervals[r]))
    fig, (ax,) = _new_figure(11, 0.45 * len(reasons) + 1.0)
    for y, reason in enumerate(reversed(reasons)):
        spans = [(a, max(b - a, end_t / 2000)) for a, b in intervals[reason]]
        color = "#9ca3af" if reason in NOT_HOLDS else "#dc2626"
        ax.broken_barh(spans, (y - 0.35, 0.7), color=color)
    ax.set_yticks(range(len(reasons)), list(reversed(reasons)), fontsize=8)
    ax.set_xlabel("session time (s)")
    ax.set_xlim(0, max(end_t, 1e-3))
    ax.set_title(
        "Hold reasons over time (red: interruptions; grey: the gate's own cycle, the "
        "operator's enable, the session's end)",
        fontsize=10,
    )
    return _png(fig)


def _latency_figure(dec: list[float], acks: dict[str, list[float]]) -> bytes:
    fig, axes = _new_figure(11, 2.6, 1)
    ax = axes[0]
    series = [("receipt → decision", dec)] + [(f"{c} → ACK", v) for c, v in sorted(acks.items())]
    data = [np.asarray([x for x in v if math.isfinite(x)]) * 1e3 for _, v in series]
    keep = [(label, a) for (label, _), a in zip(series, data, strict=True) if a.size]
    if keep:
        import matplotlib

        major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
        horizontal = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
        ax.boxplot(
            [a for _, a in keep],
            whis=(1, 99),
            showfliers=True,
            flierprops={"markersize": 2},
            **horizontal,
        )
        ax.set_yticks(range(1, len(keep) + 1), [label for label, _ in keep], fontsize=8)
        ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale; whiskers P1-P99)")
    return _png(fig)


def _timing_figure(tc: TimingCheck) -> bytes:
    fig, (ax,) = _new_figure(11, 2.8)
    tol = tc.tolerance_s * 1e3
    ax.axhspan(-tol, tol, color="#bbf7d0", alpha=0.6, lw=0, label="±100 ms")
    for on, marker, color in ((True, "^", "#1d4ed8"), (False, "v", "#b45309")):
        pts = [
            (e.t, e.latency_s * 1e3)
            for e in tc.edges
            if e.cause == "window" and e.latency_s is not None and e.beam_on == on
        ]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(
                x,
                y,
                marker,
                ms=4,
                color=color,
                ls="none",
                label="beam-on edges" if on else "beam-off edges",
            )
    unmatched = [e.t for e in tc.edges if e.cause == "window" and e.latency_s is None]
    if unmatched:
        ax.plot(
            unmatched,
            [0.04] * len(unmatched),
            "x",
            color="#c62828",
            ls="none",
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label="no target crossing within ±1 s (FAIL; drawn at the bottom)",
        )
    ax.set_ylabel("edge − expected (ms)")
    ax.set_xlabel("session time (s)")
    _legend_above(ax)
    return _png(fig)


def _correlation_figure(points, tol: float, check: float) -> bytes:
    fig, (ax,) = _new_figure(11, 2.6)
    t = [p[0] for p in points]
    ax.plot(
        t,
        [_num(p[1].get("estimate_miss_mm")) for p in points],
        "o",
        ms=3,
        color="#1d4ed8",
        label="estimate miss",
    )
    ax.plot(
        t,
        [_num(p[1].get("residual_mm")) for p in points],
        "s",
        ms=3,
        mfc="none",
        color="#b45309",
        label="correlation error",
    )
    if math.isfinite(tol):
        ax.axhline(tol, color="#c62828", lw=0.8, ls="--", label=f"fiducial tolerance {tol:g} mm")
    if math.isfinite(check):
        ax.axhline(check, color="#6b7280", lw=0.8, ls=":", label=f"model check {check:g} mm")
    ax.set_ylabel("mm")
    ax.set_xlabel("session time (s)")
    _legend_above(ax)
    return _png(fig)


# -- for batch workers: a report from a log's bytes ----------------------------------------
def report_from_bytes(
    name: str, data: bytes, *, force: bool = False, beam_delay_s: float | None = None
) -> tuple[SessionReport, str]:
    """(session, complete HTML) for a log sent as bytes (a worker without the client's
    disk); the report names it ``name``."""
    with tempfile.TemporaryDirectory(prefix="motionctl-qa-") as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(data)
        session, section = analyse_session(path, force=force, beam_delay_s=beam_delay_s, name=name)
    session.log = name
    return session, _document([session], [section])


def report_from_path(
    path: str | Path, *, force: bool = False, beam_delay_s: float | None = None
) -> tuple[SessionReport, str]:
    """(session, complete HTML) for one log on this machine's disk."""
    session, section = analyse_session(path, force=force, beam_delay_s=beam_delay_s)
    return session, _document([session], [section])
