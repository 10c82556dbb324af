"""The console's widgets. Each draws its part of a ``ConsoleState`` and emits the operator's
intent as a Qt signal; none of them talks to the controller.

Drawing rules (pyqtgraph's fast-plot practice, measured in bench/bench_console.py): plot
items are created once and fed with ``setData`` from the display timer, never per sample;
only the visible span is drawn, decimated to the pixel width (see ``TracePanel``); text
and colours are only re-set when they change, because style and layout changes cost far
more than the drawing itself.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PyQt6.QtCore import QPointF, QRectF, Qt, pyqtSignal
from PyQt6.QtGui import QBrush, QColor, QFont, QImage, QPainter, QPen, QPolygonF
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from motionctl.gui.reasons import describe, device_words, format_session_time, is_routine
from motionctl.gui.state import (
    SPANS_S,
    AlarmRow,
    ConsoleState,
    DeviceRow,
    GateView,
    gated_column,
)

# -- colours: a dim treatment room, so a dark console with few, meaningful colours ----------
BACKGROUND = "#17191c"
PANEL = "#22252a"
TEXT = "#e6e6e6"
MUTED = "#9aa0a6"
ENABLED = "#1e8e3e"  # beam enabled (gate open)
ROUTINE_HOLD = "#f2a900"  # held by gating itself or the operator: amber
FAULT_HOLD = "#d93025"  # held by a fault or an interlock: red
PENDING = "#ff9800"  # an edited window that is not applied yet

TARGET_NOW = "#4fc3f7"
TARGET_PREDICTED = "#ffd54f"
OTHER_AXES = {"LR": "#81c784", "SI": "#4fc3f7", "AP": "#ce93d8"}
SURROGATE = "#b0bec5"
WINDOW_FILL = (76, 175, 80, 70)
WINDOW_EDGE = (129, 199, 132)


def _font(point_size: float, bold: bool = False) -> QFont:
    font = QFont()
    font.setPointSizeF(point_size)
    font.setBold(bold)
    return font


def _no_focus(*buttons: QPushButton) -> None:
    # Buttons never take the keyboard focus: Space must always mean HOLD, never "press the
    # focused button" (which could be Enable).
    for button in buttons:
        button.setFocusPolicy(Qt.FocusPolicy.NoFocus)


class _CachedLabel(QLabel):
    """A label that re-lays-out only when its text or style really changes."""

    def set_text(self, text: str) -> None:
        if text != self.text():
            self.setText(text)

    def set_style(self, style: str) -> None:
        if style != self.styleSheet():
            self.setStyleSheet(style)


# =========================================================================================
# Beam state
# =========================================================================================
class BeamBanner(QWidget):
    """BEAM ENABLED / BEAM HOLD, large, with the reasons in words and the target against the
    window. Green: enabled; amber: held by gating or the operator; red: held by a fault.

    Painted directly rather than built from styled labels: the colour changes with every
    breath, and re-styling widgets costs milliseconds on the GUI thread each time.
    """

    MAX_REASONS = 3

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.state_text = "BEAM HOLD"
        self.reasons_text = ""
        self.target_text = ""
        self.colour = FAULT_HOLD
        self._state_font = _font(34, bold=True)
        self._reasons_font = _font(15, bold=True)
        self._target_font = _font(14)

    def update_state(self, state: ConsoleState) -> None:
        if state.beam_enabled:
            text, colour = "BEAM ENABLED", ENABLED
            reasons = f"{_IN_GATE[state.gate.mode]}; every check passes"
        else:
            text = "BEAM HOLD"
            codes = state.reasons if state.decided else ("No decision yet: controller starting",)
            lines = [_reason_line(r, state) for r in codes[: self.MAX_REASONS]]
            if len(codes) > self.MAX_REASONS:
                lines.append(f"and {len(codes) - self.MAX_REASONS} more (see Interlocks)")
            reasons = "\n".join(lines)
            routine = state.decided and all(is_routine(r) for r in state.reasons)
            colour = ROUTINE_HOLD if routine else FAULT_HOLD
        new = (text, reasons, _target_text(state), colour)
        if new != (self.state_text, self.reasons_text, self.target_text, self.colour):
            self.state_text, self.reasons_text, self.target_text, self.colour = new
            self.update()

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect())
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor(self.colour))
        p.drawRoundedRect(rect, 6, 6)
        # Black on amber, white on green and red: the readable pairs.
        p.setPen(QColor("black" if self.colour == ROUTINE_HOLD else "white"))
        inner = rect.adjusted(18, 6, -18, -6)
        p.setFont(self._state_font)
        state_h = p.fontMetrics().height()
        p.drawText(inner, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop, self.state_text)
        p.setFont(self._reasons_font)
        reasons = QRectF(
            inner.left(), inner.top() + state_h, inner.width() * 0.62, inner.height() - state_h
        )
        p.drawText(
            reasons,
            Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop | Qt.TextFlag.TextWordWrap,
            self.reasons_text,
        )
        p.setFont(self._target_font)
        p.drawText(
            inner, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, self.target_text
        )
        p.end()


def _reason_line(code: str, state: ConsoleState) -> str:
    """One hold reason in words; the prediction's learning says how long it has to go."""
    text = describe(code)
    wait = state.prediction_ready_in_s
    if code == "prediction_learning" and math.isfinite(wait) and wait > 0:
        text += f": ready in about {math.ceil(wait)} s"
    return text


# What "inside" means in each gating mode, for the banner while the beam is enabled.
_IN_GATE = {
    "amplitude": "Target in the window",
    "phase": "Breathing phase in the window",
    "breath_hold": "Breath held at the reference",
}


def _target_text(state: ConsoleState) -> str:
    gate = state.gate
    now_col, pred_col = gated_column(gate)
    trace = state.trace
    if gate.mode == "phase":
        start, end = gate.phase_window
        return f"phase gating\nphase window {start:.2f} to {end:.2f}"
    if gate.mode == "breath_hold" and gate.breath_hold_signal == "volume":
        v = state.volume_l
        ref = "not captured" if gate.reference is None else f"{gate.reference:.2f} L"
        volume = "--" if not math.isfinite(v) else f"{v:.2f} L"
        return f"volume: {volume}\nbreath-hold reference {ref} ± {gate.tolerance:g} L"
    if not len(trace["t"]):
        return f"{gate.axis}  --\nwindow {gate.lower_mm:+.1f} to {gate.upper_mm:+.1f} mm"
    if gate.source == "surrogate":
        value, what = trace["surrogate_mm"][-1], "surrogate"
    else:
        value, what = trace[pred_col][-1], f"{gate.axis} predicted +{gate.horizon_s:.1f} s"
    value_text = "--" if not math.isfinite(value) else f"{value:+.1f} mm"
    if gate.mode == "breath_hold":  # on the target position
        ref = "not captured" if gate.reference is None else f"{gate.reference:+.1f} mm"
        return f"{what}: {value_text}\nbreath-hold reference {ref} ± {gate.tolerance:g} mm"
    return f"{what}: {value_text}\nwindow {gate.lower_mm:+.1f} to {gate.upper_mm:+.1f} mm"


# =========================================================================================
# Trace
# =========================================================================================
def _finite_range(arrays) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for a in arrays:
        if a.size:
            a_lo, a_hi = np.fmin.reduce(a), np.fmax.reduce(a)  # NaN only if all are NaN
            if math.isfinite(a_lo):
                lo, hi = min(lo, float(a_lo)), max(hi, float(a_hi))
    return (lo, hi) if lo <= hi else (math.nan, math.nan)


def _stable_range(current: tuple[float, float] | None, lo: float, hi: float, pad: float):
    """A y range that contains [lo, hi] and only changes when it must (no jitter): grows at
    once, shrinks only when the data use less than half of it."""
    want = (lo - pad, hi + pad)
    if current is None:
        return want
    c_lo, c_hi = current
    if lo - pad * 0.25 < c_lo or hi + pad * 0.25 > c_hi:
        return want
    if (hi - lo + 2 * pad) < 0.5 * (c_hi - c_lo):
        return want
    return current


class TracePanel(QWidget):
    """The scrolling trace: target (gated axis now, predicted, uncertainty band, other axes)
    with the gating window, the surrogate, and the beam-on strip.

    ``window_dragged(centre, width)`` is emitted while the operator drags the window's edges
    (or the window itself); it changes nothing until the window is applied.

    Cost per frame is what limits a 30 fps console, so (measured, see
    bench/bench_console.py): time runs on a fixed axis of seconds before now, so the axes
    never re-layout and only the curves are redrawn; the source copies only the visible
    span (clip to view) and the curves are peak-decimated to about two points per pixel
    column (downsampling) before ``setData``; thick and dashed pens, fills of long
    polygons and grids are avoided, as they cost ten times a thin line.
    """

    window_dragged = pyqtSignal(float, float)
    span_changed = pyqtSignal(float)

    MAX_POINTS = 2000  # per curve after decimation (about two per pixel column)
    BAND_STEP = 6  # the uncertainty band is drawn from every 6th sample (5 Hz)

    def __init__(self, gate: GateView, span_s: float = 60.0, parent: QWidget | None = None):
        super().__init__(parent)
        self.gate = gate
        self.span_s = span_s
        self.span_box = QComboBox()
        for span in SPANS_S:
            self.span_box.addItem(f"last {span} s", float(span))
        self.span_box.setCurrentIndex(max(0, self.span_box.findData(float(span_s))))
        self.span_box.currentIndexChanged.connect(self._on_span)
        self.span_box.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        legend = QLabel(self._legend_html(gate))
        legend.setFont(_font(11))
        header = QHBoxLayout()
        header.setContentsMargins(4, 0, 4, 0)
        header.addWidget(legend, 1)
        header.addWidget(self.span_box)

        self.view = pg.GraphicsLayoutWidget()
        self.view.setBackground(BACKGROUND)
        self.view.ci.setSpacing(2)
        axis = gate.axis
        self.target_plot = self._plot(f"target {axis} (mm)", show_time=False)
        self.view.nextRow()
        self.surrogate_plot = self._plot("surrogate (mm)", show_time=False)
        self.view.nextRow()
        self.beam_plot = self._plot("", show_time=True)
        self.beam_plot.setYRange(0, 1, padding=0)
        self.beam_plot.getAxis("left").setTicks([[(0.5, "beam")]])
        self.beam_plot.setMaximumHeight(60)
        layout_ = self.view.ci.layout
        layout_.setRowStretchFactor(0, 5)
        layout_.setRowStretchFactor(1, 2)
        for plot in (self.target_plot, self.surrogate_plot, self.beam_plot):
            plot.setXRange(-span_s, 0, padding=0)

        # The window is drawn on the plot of the signal it is compared with.
        gated_plot = self.surrogate_plot if gate.source == "surrogate" else self.target_plot
        self.gated_plot = gated_plot
        # What gates now: a filled band (not movable); the editable edges are drawn above it.
        self.window_band = pg.LinearRegionItem(
            (gate.lower_mm, gate.upper_mm),
            orientation="horizontal",
            brush=pg.mkBrush(*WINDOW_FILL),
            pen=pg.mkPen(WINDOW_EDGE, width=1),
            movable=False,
        )
        self.window_band.setZValue(-20)
        gated_plot.addItem(self.window_band)
        self.window_edit = pg.LinearRegionItem(
            (gate.lower_mm, gate.upper_mm),
            orientation="horizontal",
            brush=pg.mkBrush(0, 0, 0, 0),
            pen=pg.mkPen("w", width=2),
            hoverBrush=pg.mkBrush(255, 255, 255, 25),
            hoverPen=pg.mkPen(PENDING, width=3),
            movable=gate.mode == "amplitude",
        )
        self.window_edit.setZValue(20)
        self.window_edit.setVisible(gate.mode == "amplitude")
        self.window_band.setVisible(gate.mode == "amplitude")
        self.window_edit.sigRegionChanged.connect(self._on_region)
        gated_plot.addItem(self.window_edit)
        self._setting_region = False
        # Breath-hold: the reference +/- tolerance band (position holds; volume is not drawn).
        self.hold_band = pg.LinearRegionItem(
            (0, 0),
            orientation="horizontal",
            brush=pg.mkBrush(*WINDOW_FILL),
            pen=pg.mkPen(WINDOW_EDGE),
            movable=False,
        )
        self.hold_band.setVisible(False)
        self.target_plot.addItem(self.hold_band)

        # Curves: created once, fed by setData. 'finite' breaks the line at invalid samples.
        now_col, pred_col = gated_column(gate)
        self._now_col, self._pred_col = now_col, pred_col
        self._other_axes = [a for a in ("LR", "SI", "AP") if a != axis]
        self.other_curves = {
            a: self._curve(self.target_plot, pg.mkPen(OTHER_AXES[a], width=1))
            for a in self._other_axes
        }
        # The band's edges are not drawn (no pen), only the fill between them.
        self.band_lo = pg.PlotCurveItem()
        self.band_hi = pg.PlotCurveItem()
        self.band = pg.FillBetweenItem(
            self.band_lo, self.band_hi, brush=pg.mkBrush(255, 213, 79, 34)
        )
        self.target_plot.addItem(self.band)
        self.pred_curve = self._curve(
            self.target_plot,
            pg.mkPen(TARGET_PREDICTED, width=1, style=Qt.PenStyle.DashLine),
        )
        self.now_curve = self._curve(self.target_plot, pg.mkPen(TARGET_NOW, width=2))
        self.surrogate_curve = self._curve(self.surrogate_plot, pg.mkPen(SURROGATE, width=1))
        self.beam_curve = pg.PlotCurveItem(
            pen=pg.mkPen(ENABLED, width=1), fillLevel=0.0, brush=pg.mkBrush(ENABLED)
        )
        self.beam_plot.addItem(self.beam_curve)
        self._y_target: tuple[float, float] | None = None
        self._y_surrogate: tuple[float, float] | None = None

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(header)
        layout.addWidget(self.view, 1)

    @staticmethod
    def _curve(plot: pg.PlotItem, pen) -> pg.PlotCurveItem:
        curve = pg.PlotCurveItem(pen=pen, connect="finite")
        plot.addItem(curve)
        return curve

    def _plot(self, label: str, show_time: bool) -> pg.PlotItem:
        plot = self.view.addPlot()
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=False, y=False)  # the axes follow the session, not the mouse
        plot.hideButtons()
        left = plot.getAxis("left")
        left.setLabel(label, color=MUTED)
        left.setWidth(64)
        for name in ("left", "bottom"):
            ax = plot.getAxis(name)
            ax.setTextPen(MUTED)
            ax.setPen(MUTED)
            ax.enableAutoSIPrefix(False)  # else the label is re-laid-out at every range change
        if show_time:
            plot.getAxis("bottom").setLabel("seconds before now", color=MUTED)
        else:
            plot.getAxis("bottom").setStyle(showValues=False)
        return plot

    @staticmethod
    def _legend_html(gate: GateView) -> str:
        def item(colour: str, text: str, mark: str = "&#9644;") -> str:
            return f'<span style="color:{colour}">{mark}</span>&nbsp;{text}&nbsp;&nbsp;&nbsp;'

        axis = gate.axis
        html = item(TARGET_NOW, f"{axis} now")
        html += item(TARGET_PREDICTED, f"{axis} predicted +{gate.horizon_s:.1f} s", "- -")
        html += item("#5f5838", "uncertainty &plusmn;1&sigma;", "&#9608;")
        for a in ("LR", "SI", "AP"):
            if a != axis:
                html += item(OTHER_AXES[a], a)
        html += item("#4caf50", "gating window", "&#9608;")
        html += item(ENABLED, "beam on", "&#9608;")
        return f'<span style="color:{MUTED}">{html}</span>'

    def set_time_label(self, text: str) -> None:
        self.beam_plot.getAxis("bottom").setLabel(text, color=MUTED)

    def _on_span(self) -> None:
        self.span_s = float(self.span_box.currentData())
        for plot in (self.target_plot, self.surrogate_plot, self.beam_plot):
            plot.setXRange(-self.span_s, 0, padding=0)
        self.span_changed.emit(self.span_s)

    def _on_region(self) -> None:
        if self._setting_region:
            return
        lo, hi = self.window_edit.getRegion()
        self.window_dragged.emit((lo + hi) / 2, hi - lo)

    def set_window_edit(self, center: float, width: float, pending: bool) -> None:
        """Show the window being edited (pending: not applied yet) without re-emitting."""
        lo, hi = center - width / 2, center + width / 2
        self._setting_region = True
        try:
            if (lo, hi) != tuple(self.window_edit.getRegion()):
                self.window_edit.setRegion((lo, hi))
        finally:
            self._setting_region = False
        colour = PENDING if pending else "w"
        style = Qt.PenStyle.DashLine if pending else Qt.PenStyle.SolidLine
        for line in self.window_edit.lines:
            if line.pen.color().name() != QColor(colour).name() or line.pen.style() != style:
                line.setPen(pg.mkPen(colour, width=2, style=style))

    def set_editable(self, editable: bool) -> None:
        self.window_edit.setMovable(editable and self.gate.mode == "amplitude")

    def update_state(self, state: ConsoleState) -> None:
        trace, gate = state.trace, state.gate
        self.gate = gate
        t = trace["t"]
        first = int(np.searchsorted(t, state.t - self.span_s))
        x = t[first:] - state.t  # seconds before now: the axis itself never moves

        def column(name: str) -> np.ndarray:
            return trace[name][first:]

        now, pred = column(self._now_col), column(self._pred_col)
        self.now_curve.setData(*_peak_decimate(x, now, self.MAX_POINTS))
        self.pred_curve.setData(*_peak_decimate(x, pred, self.MAX_POINTS))
        step = self.BAND_STEP
        unc = column("uncertainty_mm")
        band_x, band_pred, band_unc = x[::-step][::-1], pred[::-step][::-1], unc[::-step][::-1]
        self.band_lo.setData(band_x, band_pred - band_unc, connect="finite")
        self.band_hi.setData(band_x, band_pred + band_unc, connect="finite")
        for a, curve in self.other_curves.items():
            curve.setData(*_peak_decimate(x, column(f"{a.lower()}_mm"), self.MAX_POINTS))
        self.surrogate_curve.setData(*_peak_decimate(x, column("surrogate_mm"), self.MAX_POINTS))
        self.beam_curve.setData(*_beam_steps(x, column("beam_on")))
        lo_band, hi_band = gate.lower_mm, gate.upper_mm
        if tuple(self.window_band.getRegion()) != (lo_band, hi_band):
            self.window_band.setRegion((lo_band, hi_band))
        if gate.mode == "breath_hold" and gate.breath_hold_signal == "position":
            ref = gate.reference
            self.hold_band.setVisible(ref is not None)
            if ref is not None:
                self.hold_band.setRegion((ref - gate.tolerance, ref + gate.tolerance))
        self._fit_y(
            now,
            pred,
            [column(f"{a.lower()}_mm") for a in self._other_axes],
            column("surrogate_mm"),
            gate,
        )

    def _fit_y(self, now, pred, others, surrogate, gate: GateView) -> None:
        lo, hi = _finite_range([now, pred, *others])
        if gate.mode == "amplitude" and gate.source != "surrogate":
            lo, hi = min(lo, gate.lower_mm), max(hi, gate.upper_mm)
        if math.isfinite(lo):
            new = _stable_range(self._y_target, lo, hi, pad=1.5)
            if new != self._y_target:
                self._y_target = new
                self.target_plot.setYRange(*new, padding=0)
        lo, hi = _finite_range([surrogate])
        if gate.mode == "amplitude" and gate.source == "surrogate":
            lo, hi = min(lo, gate.lower_mm), max(hi, gate.upper_mm)
        if math.isfinite(lo):
            new = _stable_range(self._y_surrogate, lo, hi, pad=1.0)
            if new != self._y_surrogate:
                self._y_surrogate = new
                self.surrogate_plot.setYRange(*new, padding=0)

    @property
    def target_y_range(self) -> tuple[float, float] | None:
        return self._y_target


def _peak_decimate(x: np.ndarray, y: np.ndarray, max_points: int):
    """At most ``max_points`` points keeping each bin's minimum and maximum (peak mode), so
    that no breath's extreme disappears; short arrays are returned as they are."""
    n = len(x)
    if n <= max_points:
        return x, y
    bins = max_points // 2
    k = n // bins
    start = n - bins * k  # keep the newest samples whole: the right end is what is watched
    yb = y[start:].reshape(bins, k)
    xb = x[start:].reshape(bins, k)
    out_y = np.empty(2 * bins)
    out_y[0::2] = np.fmin.reduce(yb, axis=1)  # fmin: NaN only if the whole bin is NaN
    out_y[1::2] = np.fmax.reduce(yb, axis=1)
    out_x = np.repeat(xb[:, k // 2], 2)
    return out_x, out_y


def _beam_steps(x: np.ndarray, beam_on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The beam-on intervals as a step outline (a few points per interval, not one per
    sample): a filled curve of a few dozen points costs nothing to draw."""
    on = beam_on > 0.5
    if not on.any():
        return np.array([x[0] if len(x) else 0.0]), np.zeros(1)
    edges = np.flatnonzero(np.diff(on.astype(np.int8)))
    starts = np.concatenate(([0] if on[0] else [], edges[~on[edges]] + 1)).astype(int)
    ends = np.concatenate((edges[on[edges]], [len(on) - 1] if on[-1] else [])).astype(int)
    xs = np.column_stack((x[starts], x[starts], x[ends], x[ends])).ravel()
    ys = np.tile([0.0, 1.0, 1.0, 0.0], len(starts))
    return xs, ys


# =========================================================================================
# Gating window editor
# =========================================================================================
class WindowEditor(QGroupBox):
    """Centre and width of the amplitude window, typed or dragged on the trace, applied only
    with Apply. ``apply_requested(centre, width)``; ``edited(centre, width)`` while editing."""

    apply_requested = pyqtSignal(float, float)
    edited = pyqtSignal(float, float)

    def __init__(self, gate: GateView, parent: QWidget | None = None):
        super().__init__("Gating window", parent)
        self.center_box = self._spin(gate.center_mm, -100.0, 100.0)
        self.width_box = self._spin(gate.window_mm, 0.0, 100.0)
        self.bounds_label = _CachedLabel("")
        self.bounds_label.setStyleSheet(f"color: {MUTED}")
        self.apply_button = QPushButton("Apply window")
        self.revert_button = QPushButton("Revert")
        _no_focus(self.apply_button, self.revert_button)
        self.apply_button.clicked.connect(self._on_apply)
        self.revert_button.clicked.connect(self.revert)
        self.message = _CachedLabel("")
        self.message.setWordWrap(True)
        self.message.setMinimumHeight(36)
        grid = QGridLayout(self)
        grid.addWidget(QLabel(f"centre ({gate.axis}, mm)"), 0, 0)
        grid.addWidget(self.center_box, 0, 1)
        grid.addWidget(QLabel("width (mm)"), 1, 0)
        grid.addWidget(self.width_box, 1, 1)
        grid.addWidget(self.bounds_label, 2, 0, 1, 2)
        buttons = QHBoxLayout()
        buttons.addWidget(self.apply_button, 2)
        buttons.addWidget(self.revert_button, 1)
        grid.addLayout(buttons, 3, 0, 1, 2)
        grid.addWidget(self.message, 4, 0, 1, 2)
        self.editing = False
        self._applied = (gate.center_mm, gate.window_mm)
        self._show_bounds()
        self.center_box.valueChanged.connect(self._on_typed)
        self.width_box.valueChanged.connect(self._on_typed)
        if gate.mode != "amplitude":
            self.setEnabled(False)
            self.message.set_text(f"{gate.mode.replace('_', ' ')} gating: no amplitude window")

    @staticmethod
    def _spin(value: float, lo: float, hi: float) -> QDoubleSpinBox:
        # Wide limits on purpose: the controller decides what is allowed and says why.
        box = QDoubleSpinBox()
        box.setRange(lo, hi)
        box.setDecimals(1)
        box.setSingleStep(0.5)
        box.setValue(value)
        box.setKeyboardTracking(True)
        box.setFont(_font(13))
        return box

    @property
    def pending(self) -> tuple[float, float]:
        return self.center_box.value(), self.width_box.value()

    def _show_bounds(self) -> None:
        c, w = self.pending
        self.bounds_label.set_text(f"from {c - w / 2:+.1f} to {c + w / 2:+.1f} mm")

    def _set_boxes(self, center: float, width: float) -> None:
        for box, value in ((self.center_box, center), (self.width_box, width)):
            box.blockSignals(True)
            box.setValue(value)
            box.blockSignals(False)
        self._show_bounds()

    def _on_typed(self) -> None:
        self.editing = True
        self._show_bounds()
        self.show_message("Not applied yet: press Apply window", PENDING)
        self.edited.emit(*self.pending)

    def drag_to(self, center: float, width: float) -> None:
        """The operator dragged the window on the trace."""
        self._set_boxes(round(center, 1), round(width, 1))
        self._on_typed()

    def revert(self) -> None:
        self.editing = False
        self._set_boxes(*self._applied)
        self.show_message("", TEXT)
        self.edited.emit(*self._applied)

    def _on_apply(self) -> None:
        self.apply_requested.emit(*self.pending)

    def show_message(self, text: str, colour: str) -> None:
        self.message.set_text(text)
        self.message.set_style(f"color: {colour}; font-weight: bold;")

    def sync(self, gate: GateView) -> None:
        """Follow the applied window while the operator is not editing it."""
        self._applied = (gate.center_mm, gate.window_mm)
        if not self.editing and self.pending != self._applied:
            self._set_boxes(*self._applied)

    def applied(self) -> None:
        self.editing = False


# =========================================================================================
# Session controls
# =========================================================================================
class SessionControls(QGroupBox):
    """Enable / disable the beam, operator HOLD and release, capture the breath-hold
    reference. ``command(kind)`` carries the operator's choice."""

    command = pyqtSignal(str)

    def __init__(self, gate: GateView, hold_keys: str, parent: QWidget | None = None):
        super().__init__("Session", parent)
        self.enable_button = QPushButton("Enable beam")
        self.disable_button = QPushButton("Disable beam")
        self.hold_button = QPushButton(f"HOLD BEAM\n{hold_keys}")
        self.release_button = QPushButton("Release hold")
        self.capture_button = QPushButton("Capture breath-hold reference")
        buttons = (
            self.enable_button,
            self.disable_button,
            self.hold_button,
            self.release_button,
            self.capture_button,
        )
        _no_focus(*buttons)
        for button in buttons:
            button.setMinimumHeight(34)
        self.hold_button.setMinimumHeight(70)
        self.hold_button.setFont(_font(15, bold=True))
        self.hold_button.setStyleSheet(
            f"QPushButton {{ background: {FAULT_HOLD}; color: white; border-radius: 5px; }}"
            "QPushButton:pressed { background: #a50e0e; }"
        )
        self.enable_button.setStyleSheet(
            "QPushButton:enabled { background: #2e6b3d; color: white; border-color: #3f8a52; }"
        )
        self.enable_button.clicked.connect(lambda: self.command.emit("enable"))
        self.disable_button.clicked.connect(lambda: self.command.emit("disable"))
        self.hold_button.clicked.connect(lambda: self.command.emit("hold"))
        self.release_button.clicked.connect(lambda: self.command.emit("release"))
        self.capture_button.clicked.connect(lambda: self.command.emit("capture_reference"))
        self.capture_button.setVisible(gate.mode == "breath_hold")
        self.message = _CachedLabel("")
        self.message.setWordWrap(True)
        self.message.setStyleSheet(f"color: {FAULT_HOLD}; font-weight: bold;")
        grid = QGridLayout(self)
        grid.addWidget(self.hold_button, 0, 0, 1, 2)
        grid.addWidget(self.enable_button, 1, 0)
        grid.addWidget(self.disable_button, 1, 1)
        grid.addWidget(self.release_button, 2, 0, 1, 2)
        grid.addWidget(self.capture_button, 3, 0, 1, 2)
        grid.addWidget(self.message, 4, 0, 1, 2)

    def update_state(self, state: ConsoleState) -> None:
        enabled = state.operator_enabled
        if self.enable_button.isEnabled() == enabled:
            self.enable_button.setEnabled(not enabled)
            self.disable_button.setEnabled(enabled)
        hold = state.operator_hold
        if self.release_button.isEnabled() != hold:
            self.release_button.setEnabled(hold)

    def set_read_only(self) -> None:
        for button in self.findChildren(QPushButton):
            button.setEnabled(False)


# =========================================================================================
# Devices, interlocks
# =========================================================================================
def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
    table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
    table.setShowGrid(False)
    table.setAlternatingRowColors(False)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(True)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    return table


def _set_cell(table: QTableWidget, row: int, col: int, text: str, colour: str = TEXT) -> None:
    item = table.item(row, col)
    if item is None:
        item = QTableWidgetItem()
        table.setItem(row, col, item)
    if item.text() != text:
        item.setText(text)
    if item.foreground().color().name() != QColor(colour).name():
        item.setForeground(QBrush(QColor(colour)))


RECEIVING_WITHIN_S = 1.0  # a device without a connection state is "receiving" this recently


class DevicesPanel(QGroupBox):
    """Per device: link, sample rate (counted), age of the last sample, malformed frames."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Devices", parent)
        self.table = _table(["device", "link", "rate", "last sample", "corrupt"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setStretchLastSection(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.table)

    def update_devices(self, devices: tuple[DeviceRow, ...]) -> None:
        table = self.table
        if table.rowCount() != len(devices):
            table.setRowCount(len(devices))
        for row, d in enumerate(devices):
            _set_cell(table, row, 0, device_words(d.name))
            if d.name == "beam":
                link = "OK" if d.connected else f"fault: {d.note}"
                _set_cell(table, row, 1, link, ENABLED if d.connected else FAULT_HOLD)
            elif d.connected is None:
                # No connection state (a device whose driver reports none, or a recorded
                # session from before its driver did): say whether data flow.
                receiving = math.isfinite(d.age_s) and d.age_s < RECEIVING_WITHIN_S
                _set_cell(table, row, 1, *(("receiving", ENABLED) if receiving else ("--", MUTED)))
            else:
                text = "connected" if d.connected else "DISCONNECTED"
                _set_cell(table, row, 1, text, ENABLED if d.connected else FAULT_HOLD)
            rate = "" if math.isnan(d.rate_hz) else f"{d.rate_hz:.1f} Hz"
            _set_cell(table, row, 2, rate)
            if math.isnan(d.age_s):
                age_text, colour = ("" if d.name == "beam" else "none yet"), MUTED
            else:
                stale = d.stale_after_s is not None and d.age_s >= d.stale_after_s
                age_text = f"{1e3 * d.age_s:.0f} ms"
                colour = FAULT_HOLD if stale else TEXT
            _set_cell(table, row, 3, age_text, colour)
            _set_cell(table, row, 4, str(d.malformed), FAULT_HOLD if d.malformed else TEXT)


class AlarmsPanel(QGroupBox):
    """Active interlocks (oldest first) then the recently cleared, each with its time and
    reason in words; Acknowledge for those waiting for the operator, Release for a hold.
    In review, a click on a row moves the scrub time there (``seek``)."""

    acknowledge = pyqtSignal(str)
    release = pyqtSignal()
    seek = pyqtSignal(float)

    def __init__(self, read_only: bool = False, parent: QWidget | None = None):
        super().__init__("Interlocks and alarms", parent)
        self.read_only = read_only
        self.table = _table(["time", "interlock", "state", ""])
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setStretchLastSection(False)
        self.table.cellClicked.connect(self._on_click)
        self.empty = QLabel("No interlocks")
        self.empty.setStyleSheet(f"color: {MUTED}")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.table)
        layout.addWidget(self.empty)
        self._rows: tuple[AlarmRow, ...] | None = None  # None: never drawn
        self.buttons: dict[str, QPushButton] = {}

    def update_alarms(self, alarms: tuple[AlarmRow, ...]) -> None:
        if alarms == self._rows:
            return
        self._rows = alarms
        table = self.table
        table.setRowCount(len(alarms))
        self.buttons = {}
        for row, alarm in enumerate(alarms):
            active = alarm.t_cleared is None
            colour = (
                (FAULT_HOLD if not is_routine(alarm.key) else ROUTINE_HOLD) if active else MUTED
            )
            _set_cell(table, row, 0, format_session_time(alarm.t_raised), colour)
            _set_cell(table, row, 1, describe(alarm.key), colour)
            if not active:
                state = f"cleared {format_session_time(alarm.t_cleared)}"
            elif alarm.awaiting_ack:
                state = "needs acknowledgement"
            else:
                state = "active"
            _set_cell(table, row, 2, state, colour)
            table.setCellWidget(row, 3, self._button(alarm) if not self.read_only else None)
        self.empty.setVisible(not alarms)
        self.table.setVisible(bool(alarms))

    def _button(self, alarm: AlarmRow) -> QWidget | None:
        if alarm.t_cleared is not None:
            return None
        if alarm.awaiting_ack:
            button = QPushButton("Acknowledge")
            button.clicked.connect(lambda _=False, k=alarm.key: self.acknowledge.emit(k))
        elif alarm.key == "operator_hold":
            button = QPushButton("Release")
            button.clicked.connect(lambda _=False: self.release.emit())
        else:
            return None
        _no_focus(button)
        self.buttons[alarm.key] = button
        return button

    def _on_click(self, row: int, _col: int) -> None:
        if self.read_only and self._rows and 0 <= row < len(self._rows):
            self.seek.emit(self._rows[row].t_raised)


# =========================================================================================
# Correlation model, imaging
# =========================================================================================
class CorrelationPanel(QGroupBox):
    """Internal target (gated axis) against the surrogate: the model curve (or the prior
    before any X-ray), the model points, the last breaths and the position now."""

    CLOUD_S = 12.0

    def __init__(self, gate: GateView, parent: QWidget | None = None):
        super().__init__("Correlation model", parent)
        self.axis = gate.axis
        self.plot = pg.PlotWidget(background=BACKGROUND)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        for name, label in (("bottom", "surrogate (mm)"), ("left", f"{gate.axis} (mm)")):
            axis = self.plot.getAxis(name)
            axis.setLabel(label, color=MUTED)
            axis.setTextPen(MUTED)
            axis.setPen(MUTED)
        self.cloud = self.plot.plot(pen=pg.mkPen(100, 160, 200, 120, width=1), connect="finite")
        self.curve = self.plot.plot(pen=pg.mkPen("w", width=2), connect="finite")
        self.points = self.plot.plot(
            pen=None, symbol="o", symbolSize=8, symbolBrush=TARGET_PREDICTED, symbolPen=None
        )
        self.now = self.plot.plot(
            pen=None, symbol="o", symbolSize=11, symbolBrush=TARGET_NOW, symbolPen="w"
        )
        self.label = _CachedLabel("")
        self.label.setStyleSheet(f"color: {MUTED}")
        self.label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.label)
        layout.addWidget(self.plot, 1)
        self._model = None

    def update_state(self, state: ConsoleState) -> None:
        model = state.model
        if model is not self._model:
            self._model = model
            self.curve.setData(model.curve_s, model.curve_target)
            self.points.setData(model.points_s, model.points_target)
            self.label.set_text(model.label)
        trace = state.trace
        t = trace["t"]
        if not len(t):
            return
        recent = slice(int(np.searchsorted(t, t[-1] - self.CLOUD_S)), None)
        now_col = gated_column(state.gate)[0]
        s, y = trace["surrogate_mm"][recent], trace[now_col][recent]
        self.cloud.setData(s, y)
        self.now.setData(s[-1:], y[-1:])


class XrayImageView(QWidget):
    """One X-ray image, drawn to its width with its aspect kept, the localised seeds ringed
    and the imager's name in its corner.

    Plain painting (a QImage and a few ellipses), not a pyqtgraph view box: it is redrawn
    about once a second, needs no zoom or pan, and a view box painted after the console
    window was deleted crashed the test process (a known pyqtgraph teardown hazard)."""

    SEED_MARK = "#00e5ff"  # cyan rings: stand out on a grey radiograph, not a beam colour
    RING_RADIUS_PX = 5.0

    def __init__(self, name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.name = name
        self.image: np.ndarray | None = None  # (h, w) uint8, as shown
        self.seeds = np.empty((0, 2))  # x, y in the image's pixels (centres at integers)
        self._qimage: QImage | None = None
        policy = QSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)
        self.setMinimumSize(60, 45)

    def set_image(self, image: np.ndarray | None) -> None:
        if image is None:
            self.image, self._qimage = None, None
        else:
            # QImage reads the array's memory: keep the (contiguous) array alive with it
            self.image = np.ascontiguousarray(image, dtype=np.uint8)
            h, w = self.image.shape
            self._qimage = QImage(
                self.image.data, w, h, self.image.strides[0], QImage.Format.Format_Grayscale8
            )
        self.updateGeometry()
        self.update()

    def set_seeds(self, seeds: np.ndarray) -> None:
        seeds = np.asarray(seeds, dtype=float).reshape(-1, 2)
        seeds = seeds[np.isfinite(seeds).all(axis=1)]
        if seeds.shape != self.seeds.shape or not np.array_equal(seeds, self.seeds):
            self.seeds = seeds
            self.update()

    def hasHeightForWidth(self) -> bool:  # noqa: N802 - Qt's name
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802 - Qt's name
        h, w = self.image.shape if self.image is not None else (3, 4)
        return max(45, math.ceil(width * h / w))

    def _target(self) -> QRectF:
        """Where the image goes: as large as fits, aspect kept, centred."""
        h, w = self.image.shape
        scale = min(self.width() / w, self.height() / h)
        tw, th = w * scale, h * scale
        return QRectF((self.width() - tw) / 2, (self.height() - th) / 2, tw, th)

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(BACKGROUND))
        if self._qimage is None:
            return
        target = self._target()
        p.drawImage(target, self._qimage)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        scale = target.width() / self.image.shape[1]
        pen = QPen(QColor(self.SEED_MARK))
        pen.setWidthF(1.5)
        p.setPen(pen)
        p.setBrush(Qt.BrushStyle.NoBrush)
        r = self.RING_RADIUS_PX
        for x, y in self.seeds:  # pixel (x, y) covers [x, x + 1): ring its centre
            centre = QPointF(target.left() + (x + 0.5) * scale, target.top() + (y + 0.5) * scale)
            p.drawEllipse(centre, r, r)
        p.setFont(_font(8))
        box = p.fontMetrics().boundingRect(self.name).adjusted(-3, -1, 3, 1)
        box.moveTopLeft(target.topLeft().toPoint())
        p.fillRect(box, QColor(0, 0, 0, 140))
        p.setPen(QColor(TEXT))
        p.drawText(box, Qt.AlignmentFlag.AlignCenter, self.name)


class ImagingPanel(QGroupBox):
    """The latest X-ray image of each imager view, the seeds the localiser found marked on
    it, and one line per view: frame, age and what became of it. Without images, a
    placeholder says why ("no X-ray imager in this session", "waiting for the first X-ray
    image", "no X-ray images in the session log")."""

    # As wide as its placeholder made it before it showed images: the panels beside it keep
    # their widths whatever it shows.
    MIN_WIDTH = 272

    def __init__(self, parent: QWidget | None = None):
        super().__init__("X-ray imaging", parent)
        self.setMinimumWidth(self.MIN_WIDTH)
        self.placeholder = QLabel()
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        self.placeholder.setStyleSheet(f"color: {MUTED}; font-size: 13pt;")
        self.images = QHBoxLayout()
        self.images.setContentsMargins(0, 0, 0, 0)
        self.images.setSpacing(4)
        self.captions = QVBoxLayout()
        self.captions.setContentsMargins(2, 0, 2, 0)
        self.captions.setSpacing(0)
        self.frames_page = QWidget()
        page = QVBoxLayout(self.frames_page)
        page.setContentsMargins(0, 0, 0, 0)
        page.setSpacing(2)
        page.addLayout(self.images)
        page.addLayout(self.captions)
        page.addStretch(1)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.placeholder)
        self.stack.addWidget(self.frames_page)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.stack)
        self._items: dict[str, XrayImageView] = {}
        self._caption_labels: dict[str, _CachedLabel] = {}
        self._shown: dict[str, object] = {}  # imager -> the image array it shows
        self.show_placeholder("no X-ray imager in this session")

    def show_placeholder(self, message: str) -> None:
        """No images: say why."""
        text = f"No imaging\n\n{message}"
        if text != self.placeholder.text():
            self.placeholder.setText(text)
        if self.stack.currentWidget() is not self.placeholder:
            self.stack.setCurrentWidget(self.placeholder)

    def show_frames(self, frames, now_t: float = math.nan, message: str = "") -> None:
        """Show the latest frame of each view: ``frames`` are ``state.XrayView``s (imager,
        frame_id, t_rx, image, seeds_px, outcome, accepted); ``now_t`` (session seconds)
        gives their age. No frames: the placeholder with ``message``."""
        if not frames:
            self.show_placeholder(message or "no X-ray frames")
            return
        for view in frames:
            name = view.imager
            item = self._items.get(name)
            if item is None:
                item = self._items[name] = XrayImageView(name)
                self.images.addWidget(item)
                caption = self._caption_labels[name] = _CachedLabel()
                caption.setWordWrap(True)  # a long rejection reason: on two lines, not cut
                # its text never widens the panel
                caption.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
                self.captions.addWidget(caption)
            caption = self._caption_labels[name]
            if view.image is not self._shown.get(name):
                self._shown[name] = view.image
                item.set_image(view.image)
            item.set_seeds(view.seeds_px)
            age = now_t - view.t_rx
            age_text = f", {max(0.0, age):.1f} s ago" if math.isfinite(age) else ""
            text = f"{name} #{view.frame_id}{age_text}: {view.outcome}"
            colour = MUTED if view.accepted is None else TEXT if view.accepted else ROUTINE_HOLD
            caption.set_text(text)
            caption.set_style(f"color: {colour}; font-size: 9pt;")
            caption.setToolTip(text)
        if self.stack.currentWidget() is not self.frames_page:
            self.stack.setCurrentWidget(self.frames_page)


# =========================================================================================
# Patient coaching
# =========================================================================================
class CoachingBar(QWidget):
    """A patient-facing level bar: the current level against the window (or the breath-hold
    tolerance), rising on inhale whatever the axis, with one short instruction.

    Plain painting (no plot) so that it reads from across the room on a second screen.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumSize(120, 220)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.level = math.nan
        self.band = (math.nan, math.nan)
        self.scale = (-10.0, 10.0)
        self.inhale_sign = 1.0
        self.message = ""
        self.inside = False

    def set_level(
        self,
        level: float,
        band: tuple[float, float],
        scale: tuple[float, float],
        inhale_sign: float,
        instruct: bool,
    ) -> None:
        """``instruct``: tell the patient which way to go (breath-hold); in free-breathing
        gating the bar only shows when the target is in the window."""
        inside = math.isfinite(level) and band[0] <= level <= band[1]
        message = ""
        if inside:
            message = "Hold it there" if instruct else "In the window"
        elif instruct and math.isfinite(level):
            above = level > band[1]
            # Above the band on a signal that falls on inhale means too far out.
            breathe_in = above == (inhale_sign < 0)
            message = "Breathe in a little" if breathe_in else "Breathe out a little"
        new = (level, band, scale, inhale_sign, message, inside)
        if new != (self.level, self.band, self.scale, self.inhale_sign, self.message, self.inside):
            self.level, self.band, self.scale, self.inhale_sign, self.message, self.inside = new
            self.update()

    def _y(self, value: float, top: float, height: float) -> float:
        lo, hi = self.scale
        frac = (value - lo) / (hi - lo) if hi > lo else 0.5
        if self.inhale_sign < 0:
            frac = 1.0 - frac  # inhale up on the screen
        return top + height * (1.0 - min(1.0, max(0.0, frac)))

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        p.fillRect(self.rect(), QColor(BACKGROUND))
        text_h = 56
        top, height = 16.0, max(40.0, h - text_h - 24.0)
        bar_w = min(90.0, w * 0.45)
        x = (w - bar_w) / 2
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor("#30343a"))
        p.drawRoundedRect(QRectF(x, top, bar_w, height), 8, 8)
        if all(math.isfinite(v) for v in self.band):
            y1, y2 = self._y(self.band[1], top, height), self._y(self.band[0], top, height)
            p.setBrush(QColor(ENABLED))
            p.drawRect(QRectF(x, min(y1, y2), bar_w, abs(y2 - y1)))
        if math.isfinite(self.level):
            y = self._y(self.level, top, height)
            colour = QColor("white" if self.inside else ROUTINE_HOLD)
            p.setPen(QPen(colour, 6))
            p.drawLine(QPointF(x - 18, y), QPointF(x + bar_w + 18, y))
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(colour)
            p.drawPolygon(
                QPolygonF([QPointF(x - 30, y - 12), QPointF(x - 30, y + 12), QPointF(x - 14, y)])
            )
        p.setPen(QColor(TEXT))
        p.setFont(_font(16, bold=True))
        p.drawText(
            QRectF(0, h - text_h, w, text_h),
            Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
            self.message,
        )
        p.end()


class CoachingPanel(QGroupBox):
    """The coaching bar with a button that moves it to a window of its own (the patient's
    screen), and back when that window is closed."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Patient coaching", parent)
        self.bar = CoachingBar()
        self.detach_button = QPushButton("Show on patient screen")
        _no_focus(self.detach_button)
        self.detach_button.clicked.connect(self.toggle_detached)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(4, 4, 4, 4)
        self._layout.addWidget(self.bar, 1)
        self._layout.addWidget(self.detach_button)
        self.detached: _PatientWindow | None = None

    def toggle_detached(self) -> None:
        if self.detached is None:
            self.detached = _PatientWindow(self)
            self.detached.layout().addWidget(self.bar)
            self.detached.resize(360, 720)
            self.detached.show()
            self.detach_button.setText("Bring back to console")
        else:
            self.detached.close()

    def reattach(self) -> None:
        self._layout.insertWidget(0, self.bar, 1)
        self.detached = None
        self.detach_button.setText("Show on patient screen")


class _PatientWindow(QWidget):
    def __init__(self, panel: CoachingPanel):
        super().__init__(None, Qt.WindowType.Window)
        self.setWindowTitle("motionctl: breathing guide")
        self.setStyleSheet(f"background: {BACKGROUND};")
        self._panel = panel
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._panel.reattach()
        super().closeEvent(event)
