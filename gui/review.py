"""Review mode: a recorded session log in the console's own widgets, with a scrub bar.

``ReviewSource`` reads the log once (read-only SQLite, ``sessionlog.open_log``) and
rebuilds, for any session time, the ``ConsoleState`` the live console showed then: the
trace (from the ``estimates`` table), the beam-on strip and the hold reasons (each sample's
decision, from ``decisions``), the gating window and operator settings (operator events),
the interlocks with their times (interlock events), and the devices (sample times and
device events). The QA reviewer scrubs with the slider, plays at real time, or clicks an
interlock to jump to it. Nothing can be sent: the window has no controls. The X-ray panel
says that the log holds no images (it records each frame's localisation, not the image).

Entry points: ``run_review(log_path, screenshot=None)`` for the CLI, and
``open_review(log_path)`` (returns the shown window; creates the QApplication if needed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PyQt6.QtCore import Qt
from PyQt6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from motionctl.gui import widgets as w
from motionctl.gui.console import ConsoleWindow, application, run_window
from motionctl.gui.reasons import describe
from motionctl.gui.state import (
    NO_IMAGER,
    NO_IMAGES_IN_LOG,
    RATE_WINDOW_S,
    RECENT_CLEARED,
    SPANS_S,
    AlarmRow,
    ConsoleState,
    DeviceRow,
    GateView,
    ImagingView,
    ModelView,
    prior_target,
    surrogate_span,
)
from motionctl.sessionlog import open_log, summarize

SCRUB_STEP_S = 0.1  # slider resolution


@dataclass
class _Interval:
    key: str
    t_raised: float
    t_awaiting: float | None = None
    t_cleared: float | None = None


def _last_before(times: np.ndarray, t: float) -> int:
    """Index of the last entry at or before ``t``; -1 if none."""
    return int(np.searchsorted(times, t, side="right")) - 1


class ReviewSource:
    """A session log as a ``ConsoleState`` at any time ``t`` (session seconds)."""

    read_only = True

    def __init__(self, log_path: str | Path):
        self.path = Path(log_path)
        db = open_log(self.path)  # raises LogFormatError for anything but a session log
        try:
            self.cfg = json.loads(db.execute("SELECT json FROM config").fetchone()[0])
            self._load_trace(db)
            self._load_events(db)
            self._load_devices(db)
            ends = [
                row[0]
                for row in db.execute(
                    "SELECT MAX(t) FROM samples UNION ALL SELECT MAX(t) FROM decisions "
                    "UNION ALL SELECT MAX(t) FROM events"
                )
                if row[0] is not None
            ]
        finally:
            db.close()
        self.t_end = max(ends, default=0.0)
        self.t = self.t_end
        self.summary = summarize(self.path)
        # The log keeps each frame's localisation (the fiducials table), not the image.
        imaged = "xray" in self.summary["devices"]
        self._imaging_message = NO_IMAGES_IN_LOG if imaged else NO_IMAGER
        self._model_key: tuple | None = None
        self._model: ModelView | None = None

    # -- loading ------------------------------------------------------------------------
    def _load_trace(self, db) -> None:
        rows = db.execute(
            "SELECT t, surrogate_mm, lr_mm, si_mm, ap_mm, pred_lr_mm, pred_si_mm, pred_ap_mm, "
            "uncertainty_mm, valid, n, model FROM estimates ORDER BY n"
        ).fetchall()
        numeric = np.array([r[:11] for r in rows], dtype=float).reshape(-1, 11)
        self._models = [r[11] for r in rows]
        decisions = db.execute(
            "SELECT t, beam_enabled, reasons, n FROM decisions ORDER BY n"
        ).fetchall()
        self._dec_t = np.array([d[0] for d in decisions], dtype=float)
        self._dec_on = np.array([d[1] for d in decisions], dtype=bool)
        self._dec_reasons = [tuple(d[2].split(",")) if d[2] else () for d in decisions]
        dec_n = np.array([d[3] for d in decisions], dtype=float)
        # Each sample's decision is the first one recorded after its estimate (same order
        # as the live trace's beam_on column).
        est_n = numeric[:, 10]
        idx = np.clip(np.searchsorted(dec_n, est_n, side="left"), 0, max(0, len(dec_n) - 1))
        beam_on = self._dec_on[idx].astype(float) if len(dec_n) else np.zeros(len(est_n))
        columns = {
            "t": numeric[:, 0],
            "surrogate_mm": numeric[:, 1],
            "lr_mm": numeric[:, 2],
            "si_mm": numeric[:, 3],
            "ap_mm": numeric[:, 4],
            "pred_lr_mm": numeric[:, 5],
            "pred_si_mm": numeric[:, 6],
            "pred_ap_mm": numeric[:, 7],
            "uncertainty_mm": numeric[:, 8],
            "beam_on": beam_on,
            "valid": numeric[:, 9],
        }
        self._trace = columns

    def _load_events(self, db) -> None:
        events = db.execute("SELECT t, source, kind, detail FROM events ORDER BY n").fetchall()
        self.events = events
        g = self.cfg["gating"]
        # Operator settings over time: (t, value) of every accepted change.
        self._enabled = [(0.0, False)]
        self._window = [(0.0, (g["center_mm"], g["window_mm"]))]
        self._reference: list[tuple[float, float | None]] = [(0.0, None)]
        self._beam_fault: list[tuple[float, str]] = [(0.0, "")]
        intervals: list[_Interval] = []
        open_: dict[str, _Interval] = {}

        def close(key: str, t: float) -> None:
            interval = open_.pop(key, None)
            if interval is not None:
                interval.t_cleared = t

        for t, source, kind, detail in events:
            if source == "interlock":
                key = (detail or "").split(" ", 1)[0]
                if kind == "raised" and key not in open_:
                    open_[key] = _Interval(key, t)
                    intervals.append(open_[key])
                elif kind == "awaiting_ack" and key in open_:
                    open_[key].t_awaiting = t
                elif kind in ("cleared", "acknowledged"):
                    close(key, t)
            elif source == "operator":
                info = json.loads(detail) if detail else {}
                if info.get("refused"):
                    continue
                if kind in ("enable", "disable"):
                    self._enabled.append((t, kind == "enable"))
                elif kind == "window":
                    self._window.append((t, tuple(info["value"])))
                elif kind == "capture_reference":
                    self._reference.append((t, info.get("reference")))
                elif kind == "release":
                    close("operator_hold", t)  # a release acknowledges the hold at once
            elif source == "beam" and kind == "fault":
                self._beam_fault.append((t, detail or ""))
        self._intervals = intervals

    def _load_devices(self, db) -> None:
        times: dict[str, list[float]] = {}
        # the X-ray imager's "samples" are its localised frames (one row per frame or pair)
        for table in ("samples", "spirometer_samples", "fiducials"):
            for device, t in db.execute(f"SELECT device, t FROM {table} ORDER BY n"):  # noqa: S608
                times.setdefault(device, []).append(t)
        self._sample_t = {d: np.array(ts) for d, ts in times.items()}
        volumes = db.execute("SELECT t, volume_l FROM spirometer_samples ORDER BY n").fetchall()
        self._volume = np.array(volumes, dtype=float).reshape(-1, 2)  # (t, litres) rows
        self._connection: dict[str, list[tuple[float, bool]]] = {}
        self._malformed_t: dict[str, list[float]] = {}
        for t, source, kind, _detail in self.events:
            if kind in ("connected", "disconnected", "port_error"):
                self._connection.setdefault(source, []).append((t, kind == "connected"))
            elif kind == "malformed":
                self._malformed_t.setdefault(source, []).append(t)
        tracking, devices, gating = self.cfg["tracking"], self.cfg["devices"], self.cfg["gating"]
        surrogate = tracking["surrogate_device"]
        self._required = {surrogate: devices[surrogate]["stale_timeout_s"]}
        if gating["mode"] == "breath_hold" and gating["breath_hold_signal"] == "volume":
            self._required["spirometer"] = devices["spirometer"]["stale_timeout_s"]

    # -- commands: none in review ---------------------------------------------------------
    def submit(self, kind, value=None, who="console") -> None:
        raise RuntimeError("review is read-only: no command can be sent to a recorded session")

    def window_refusal(self, value) -> str:
        return "review is read-only"

    # -- the frame at self.t --------------------------------------------------------------
    def state(self, span_s: float) -> ConsoleState:
        t = self.t
        trace_t = self._trace["t"]
        lo = int(np.searchsorted(trace_t, t - span_s - 1.0))
        hi = int(np.searchsorted(trace_t, t, side="right"))
        trace = {name: column[lo:hi] for name, column in self._trace.items()}
        i = _last_before(self._dec_t, t)
        gate = self._gate_view(t)
        beam_fault = _value_at(self._beam_fault, t)
        return ConsoleState(
            t=t,
            trace=trace,
            decided=i >= 0,
            beam_enabled=bool(self._dec_on[i]) if i >= 0 else False,
            reasons=self._dec_reasons[i] if i >= 0 else (),
            operator_enabled=_value_at(self._enabled, t),
            gate=gate,
            alarms=self._alarms(t),
            devices=self._devices(t, beam_fault or None),
            model=self._model_view(gate, trace, hi - 1),
            volume_l=self._volume_at(t),
            imaging=ImagingView(message=self._imaging_message),
        )

    def _volume_at(self, t: float) -> float:
        """The spirometer's volume last recorded at or before ``t`` (nan: none yet)."""
        i = int(np.searchsorted(self._volume[:, 0], t, side="right")) - 1
        return float(self._volume[i, 1]) if i >= 0 else math.nan

    def _gate_view(self, t: float) -> GateView:
        g = self.cfg["gating"]
        center, width = _value_at(self._window, t)
        volume = g["breath_hold_signal"] == "volume"
        return GateView(
            mode=g["mode"],
            axis=g["axis"],
            source=g["source"],
            center_mm=float(center),
            window_mm=float(width),
            horizon_s=self.cfg["tracking"]["horizon_s"],
            breath_hold_signal=g["breath_hold_signal"],
            reference=_value_at(self._reference, t),
            tolerance=g["breath_hold_tolerance_l"] if volume else g["breath_hold_tolerance_mm"],
            phase_window=tuple(g["phase_window"]),
        )

    def _alarms(self, t: float) -> tuple[AlarmRow, ...]:
        active, cleared = [], []
        for iv in self._intervals:
            if iv.t_raised > t:
                continue
            if iv.t_cleared is None or iv.t_cleared > t:
                awaiting = iv.t_awaiting is not None and iv.t_awaiting <= t
                active.append(AlarmRow(iv.key, iv.t_raised, None, awaiting))
            else:
                cleared.append(AlarmRow(iv.key, iv.t_raised, iv.t_cleared))
        cleared.sort(key=lambda a: a.t_cleared)
        return (*active, *reversed(cleared[-RECENT_CLEARED:]))

    def _devices(self, t: float, beam_fault: str | None) -> tuple[DeviceRow, ...]:
        names = sorted(set(self._sample_t) | set(self._connection) | set(self._required))
        names = [n for n in names if n != "beam"]
        rows = []
        for name in names:
            times = self._sample_t.get(name, np.empty(0))
            count = int(np.searchsorted(times, t, side="right"))
            span = min(RATE_WINDOW_S, t)
            before = int(np.searchsorted(times, t - span, side="right"))
            connection = [(ct, up) for ct, up in self._connection.get(name, []) if ct <= t]
            rows.append(
                DeviceRow(
                    name=name,
                    connected=connection[-1][1] if connection else None,
                    rate_hz=(count - before) / span if span >= 0.5 else math.nan,
                    age_s=t - times[count - 1] if count else math.nan,
                    samples=count,
                    malformed=sum(1 for mt in self._malformed_t.get(name, []) if mt <= t),
                    stale_after_s=self._required.get(name),
                )
            )
        rows.append(
            DeviceRow("beam", beam_fault is None, math.nan, math.nan, 0, 0, None, beam_fault or "")
        )
        return tuple(rows)

    def _model_view(self, gate: GateView, trace: dict[str, np.ndarray], last: int) -> ModelView:
        model = self._models[last] if 0 <= last < len(self._models) else "none"
        lo, hi = surrogate_span(trace["surrogate_mm"])
        key = (model, round(lo), round(hi))
        if key == self._model_key and self._model is not None:
            return self._model
        s = np.linspace(round(lo) - 0.5, round(hi) + 0.5, 41)
        if model == "prior":
            view = ModelView(
                "prior (planning CT): no X-ray model yet", s, prior_target(self.cfg, s, gate.axis)
            )
        elif model == "none":
            view = ModelView("no valid model at this time", s, np.full_like(s, math.nan))
        else:
            # The log holds the estimates the model made, not the model itself.
            view = ModelView(
                f"{model} model from X-ray points (curve not in the log)",
                s,
                np.full_like(s, math.nan),
            )
        self._model_key, self._model = key, view
        return view


def _value_at(changes: list[tuple[float, object]], t: float):
    """The value of a setting at ``t``, from its (time, value) changes in time order."""
    value = changes[0][1]
    for t_change, v in changes:
        if t_change > t:
            break
        value = v
    return value


class ReviewWindow(ConsoleWindow):
    """The console over a session log, with a scrub bar (slider, play, +/- 5 s)."""

    def __init__(self, source: ReviewSource, *, span_s: float | None = None):
        if span_s is None:  # the shortest span that shows the whole of a short session
            span_s = next((s for s in SPANS_S if s >= source.t_end), SPANS_S[-1])
        super().__init__(source, span_s=float(span_s))
        self.timer.stop()  # review redraws when the time moves, not at display rate
        self.timer.timeout.disconnect()
        self.timer.timeout.connect(self._play_tick)
        self._play_from: tuple[float, float] | None = None  # (wall clock, session t)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, max(1, round(source.t_end / SCRUB_STEP_S)))
        self.slider.setValue(self.slider.maximum())
        self.slider.valueChanged.connect(self._on_slider)
        self.play_button = QPushButton("Play")
        back, forward = QPushButton("-5 s"), QPushButton("+5 s")
        back.clicked.connect(lambda: self.seek(self.source.t - 5.0))
        forward.clicked.connect(lambda: self.seek(self.source.t + 5.0))
        self.play_button.clicked.connect(self.toggle_play)
        self.time_label = w._CachedLabel("")
        self.time_label.setFont(w._font(13, bold=True))
        summary = source.summary
        self.summary_label = QLabel(_summary_text(summary))
        self.summary_label.setStyleSheet(f"color: {w.MUTED}")
        self.summary_label.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(QLabel("Review"))
        row.addWidget(self.play_button)
        row.addWidget(back)
        row.addWidget(forward)
        row.addWidget(self.slider, 1)
        row.addWidget(self.time_label)
        bar = QVBoxLayout()
        bar.addLayout(row)
        bar.addWidget(self.summary_label)
        scrub = QWidget()
        scrub.setLayout(bar)
        self.left.insertWidget(2, scrub)
        self.alarms.seek.connect(self.seek)
        self.setWindowTitle(f"motionctl review: {source.path.name}")
        self.refresh(slow=True)

    def seek(self, t: float) -> None:
        """Move the scrub time to ``t`` (session seconds, clamped to the log)."""
        self.slider.setValue(round(min(max(t, 0.0), self.source.t_end) / SCRUB_STEP_S))

    def _on_slider(self, value: int) -> None:
        self.source.t = min(value * SCRUB_STEP_S, self.source.t_end)
        if self._play_from is None:
            self.refresh(slow=True)

    def toggle_play(self) -> None:
        if self._play_from is None:
            if self.source.t >= self.source.t_end:
                self.seek(0.0)
            self._play_from = (time.monotonic(), self.source.t)
            self.play_button.setText("Pause")
            self.timer.start()
        else:
            self._play_from = None
            self.play_button.setText("Play")
            self.timer.stop()

    def _play_tick(self) -> None:
        wall0, t0 = self._play_from
        t = t0 + time.monotonic() - wall0
        self.slider.blockSignals(True)
        self.slider.setValue(round(t / SCRUB_STEP_S))
        self.slider.blockSignals(False)
        self.source.t = min(t, self.source.t_end)
        self.refresh()
        if t >= self.source.t_end:
            self.toggle_play()

    def refresh(self, slow: bool = False) -> None:
        super().refresh(slow)
        if hasattr(self, "time_label"):
            self.time_label.set_text(f"t = {self.source.t:6.1f} s of {self.source.t_end:.1f} s")


def _summary_text(summary: dict) -> str:
    duration = summary["duration_s"] or 0.0
    on = summary["beam_on_s"]
    duty = f" ({100 * on / duration:.0f} %)" if duration else ""
    holds = sorted(summary["holds_by_reason"].items(), key=lambda kv: -kv[1]["seconds"])
    parts = [f"{describe(k)}: {v['count']}x, {v['seconds']:.1f} s" for k, v in holds[:4]]
    more = f"; {len(holds) - 4} more" if len(holds) > 4 else ""
    return (
        f"{Path(summary['log']).name}:   beam on {on:.1f} s of {duration:.1f} s{duty}.   "
        f"Holds: {'; '.join(parts) or 'none'}{more}"
    )


def open_review(log_path: str | Path, *, at_s: float | None = None) -> ReviewWindow:
    """Open a session log (read-only) in the console's widgets and show it; the scrub time
    starts at ``at_s`` (default: the end). Creates the QApplication if needed."""
    app = application()
    window = ReviewWindow(ReviewSource(log_path))
    window.application = app  # a QApplication created here lives as long as its window
    if at_s is not None:
        window.seek(at_s)
    window.show()
    return window


def run_review(
    log_path: str | Path,
    screenshot: str | Path | None = None,
    *,
    seconds: float | None = None,
    at_s: float | None = None,
) -> int:
    """Review a session log until the window is closed (or ``seconds`` have passed);
    ``screenshot`` receives a PNG at the end. Raises ``LogFormatError`` for a file that is
    not a session log (before any window opens). Returns 0."""
    app = application()  # held for the whole run
    source = ReviewSource(log_path)
    window = ReviewWindow(source)
    if at_s is not None:
        window.seek(at_s)
    try:
        return run_window(window, seconds=seconds, screenshot=screenshot)
    finally:
        window.deleteLater()
        app.processEvents()
