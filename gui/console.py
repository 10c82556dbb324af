"""The operator console: the main window, and the entry points the CLI calls.

One window shows what the target is doing (the scrolling trace with the gating window and
the beam-on strip), whether the beam is enabled and why it is held (the banner), the
devices, the interlocks, the correlation model, the X-ray panel and the patient's coaching
bar, and carries the therapist's actions: enable, disable, HOLD, release, acknowledge,
capture the breath-hold reference, and the gating window (typed or dragged, applied with
Apply).

Keyboard: **Esc** or **Space** holds the beam at once (operator hold) from anywhere in the
console; Space is typed as a space only while a number field is being edited, Esc always
holds. Release the hold with "Release hold" (or Release in the interlock list).

Threading: all Qt objects live on the GUI thread. A ``QTimer`` at display rate (30 fps)
pulls one ``ConsoleState`` from its source and draws it; nothing is signalled per sample.
Operator actions go into the controller's command queue, which its own thread serves, so
a frozen or closed console leaves the gate exactly as it was: it neither holds nor
enables the beam by itself (the controller holds on its own faults regardless). By
default ``run_console`` puts that GUI thread in a process of its own (``remote.py``), so
that Qt's painting does not compete with the controller for the interpreter lock.

Entry points for the CLI: ``display_available()``, ``run_console(controller, ...)``;
``review.run_review(log_path, ...)`` for recorded sessions.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from PyQt6.QtCore import QEvent, QEventLoop, QObject, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import QColor, QKeySequence, QPalette, QShortcut
from PyQt6.QtWidgets import QApplication, QHBoxLayout, QMainWindow, QVBoxLayout, QWidget

from motionctl.gui import widgets as w
from motionctl.gui.state import (
    ConsoleState,
    LiveSource,
    gated_level,
    inhale_direction,
)

DISPLAY_FPS = 30.0
SLOW_PANEL_EVERY = 6  # devices, interlocks, model, X-ray at 30/6 = 5 Hz: not motion
ANSWER_TIMEOUT_S = 3.0  # how long a sent command waits for the controller's answer
HOLD_KEYS = (Qt.Key.Key_Escape, Qt.Key.Key_Space)
HOLD_KEYS_TEXT = "key: Esc or Space"


def dark_palette() -> QPalette:
    palette = QPalette()
    colours = {
        QPalette.ColorRole.Window: w.BACKGROUND,
        QPalette.ColorRole.WindowText: w.TEXT,
        QPalette.ColorRole.Base: w.PANEL,
        QPalette.ColorRole.AlternateBase: "#2a2d33",
        QPalette.ColorRole.Text: w.TEXT,
        QPalette.ColorRole.Button: "#33373e",
        QPalette.ColorRole.ButtonText: w.TEXT,
        QPalette.ColorRole.Highlight: "#3d6fb6",
        QPalette.ColorRole.HighlightedText: "white",
        QPalette.ColorRole.ToolTipBase: w.PANEL,
        QPalette.ColorRole.ToolTipText: w.TEXT,
    }
    for role, colour in colours.items():
        palette.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.ButtonText, QPalette.ColorRole.Text):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6b7078"))
    return palette


STYLE = f"""
QLabel {{ color: {w.TEXT}; }}
QGroupBox {{ border: 1px solid #3a3e45; border-radius: 6px; margin-top: 14px;
             font-weight: bold; padding-top: 4px; }}
QGroupBox::title {{ subcontrol-origin: margin; left: 10px; padding: 0 4px; color: {w.MUTED}; }}
QTableWidget {{ background: {w.PANEL}; color: {w.TEXT}; border: none; }}
QHeaderView::section {{ background: {w.PANEL}; color: {w.MUTED}; border: none;
                        padding: 2px 6px; }}
QPushButton {{ background: #33373e; color: {w.TEXT}; border: 1px solid #4a4f57;
               border-radius: 4px; padding: 4px 10px; }}
QPushButton:hover {{ background: #3d424a; }}
QPushButton:pressed {{ background: #2a2d33; }}
QPushButton:disabled {{ background: #23262b; color: #5f646b; border-color: #33373e; }}
QDoubleSpinBox, QComboBox {{ background: {w.PANEL}; color: {w.TEXT};
                             border: 1px solid #4a4f57; border-radius: 3px; padding: 2px 4px; }}
QComboBox QAbstractItemView {{ background: {w.PANEL}; color: {w.TEXT}; }}
QSlider::groove:horizontal {{ height: 6px; background: #3a3e45; border-radius: 3px; }}
QSlider::handle:horizontal {{ background: {w.TEXT}; width: 14px; margin: -5px 0;
                              border-radius: 7px; }}
"""


class _PaintCounter(QObject):
    def __init__(self, window: ConsoleWindow):
        super().__init__(window)
        self._window = window

    def eventFilter(self, _obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Paint:
            self._window.paints += 1
        return False


class ConsoleWindow(QMainWindow):
    """The console's main window over a source (``LiveSource`` or ``ReviewSource``)."""

    closed = pyqtSignal()

    def __init__(
        self,
        source,
        *,
        operator: str = "console",
        span_s: float = 60.0,
        fps: float = DISPLAY_FPS,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.source = source
        self.operator = operator
        self.read_only = source.read_only
        self.setWindowTitle("motionctl console" + (" (review)" if self.read_only else ""))
        self.setPalette(dark_palette())
        self.setStyleSheet(STYLE)
        self.screenshot_path: Path | None = None
        self.frames = 0  # refreshes drawn
        self.paints = 0  # paint events of the trace (what the eye sees), for the figures
        self._sent: tuple[str, object, float, str] | None = None  # kind, value, t, refusal

        first = source.state(span_s)
        self.state: ConsoleState = first
        gate = first.gate
        self.banner = w.BeamBanner()
        self.trace = w.TracePanel(gate, span_s)
        self.alarms = w.AlarmsPanel(read_only=self.read_only)
        self.devices = w.DevicesPanel()
        self.correlation = w.CorrelationPanel(gate)
        self.imaging = w.ImagingPanel()
        self.controls = w.SessionControls(gate, HOLD_KEYS_TEXT)
        self.editor = w.WindowEditor(gate)
        self.coaching = w.CoachingPanel()
        self._inhale_sign = inhale_direction(source.cfg, gate)
        self._volume_span = VOLUME_SPAN_L  # the coaching bar's scale in volume holds

        bottom = QHBoxLayout()
        bottom.setContentsMargins(0, 0, 0, 0)
        bottom.addWidget(self.alarms, 5)
        bottom.addWidget(self.devices, 5)
        bottom.addWidget(self.correlation, 3)
        bottom.addWidget(self.imaging, 3)
        bottom_box = QWidget()
        bottom_box.setLayout(bottom)
        bottom_box.setFixedHeight(270)  # the trace gets every pixel the panels do not need
        self.left = QVBoxLayout()
        self.left.addWidget(self.banner)
        self.left.addWidget(self.trace, 1)
        self.left.addWidget(bottom_box)
        right = QVBoxLayout()
        right.addWidget(self.controls)
        right.addWidget(self.editor)
        right.addWidget(self.coaching, 1)
        right_box = self.right_column = QWidget()
        right_box.setLayout(right)
        right_box.setFixedWidth(330)
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.addLayout(self.left, 1)
        layout.addWidget(right_box)
        self.setCentralWidget(central)
        self.resize(1600, 980)

        self.controls.command.connect(self._on_command)
        self.alarms.acknowledge.connect(lambda key: self._send("acknowledge", key))
        self.alarms.release.connect(lambda: self._send("release"))
        self.editor.apply_requested.connect(self._apply_window)
        self.editor.edited.connect(
            lambda c, wd: self.trace.set_window_edit(c, wd, pending=self.editor.editing)
        )
        self.trace.window_dragged.connect(self.editor.drag_to)
        self.trace.span_changed.connect(lambda _span: self.refresh(slow=True))
        if self.read_only:
            # Nothing can be sent to a recorded session: no controls, and the trace takes
            # their place (the coaching bar shows nothing a reviewer needs).
            self.right_column.setVisible(False)
            self.trace.set_editable(False)
            self.trace.set_time_label("seconds before the review time")
        else:
            # Application-wide: the hold key works whichever console window has the focus
            # (the detached coaching window too). Should two consoles ever share the keys,
            # Qt calls it ambiguous: both hold, as holding is always safe.
            self.hold_shortcuts = []
            for key in HOLD_KEYS:
                shortcut = QShortcut(QKeySequence(key), self)
                shortcut.setContext(Qt.ShortcutContext.ApplicationShortcut)
                shortcut.activated.connect(self.operator_hold)
                shortcut.activatedAmbiguously.connect(self.operator_hold)
                self.hold_shortcuts.append(shortcut)

        self._paint_counter = _PaintCounter(self)
        self.trace.view.viewport().installEventFilter(self._paint_counter)

        self.timer = QTimer(self)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.refresh)
        self.timer.start(round(1000.0 / fps))
        self.refresh(slow=True)

    # -- operator actions ---------------------------------------------------------------
    def operator_hold(self) -> None:
        """Hold the beam now (Esc / Space / the HOLD button): straight into the queue."""
        self._send("hold")

    def _on_command(self, kind: str) -> None:
        self._send(kind)

    def _send(self, kind: str, value: object = None) -> None:
        if self.read_only:
            return
        self.source.submit(kind, value, self.operator)
        self._sent = (kind, value, time.monotonic(), self.state.last_refusal)
        self.controls.message.set_text("")
        self.refresh()  # show its effect as soon as the controller has it, not a frame later

    def _apply_window(self, center: float, width: float) -> None:
        # Ask the controller's own rule first: a refused window is explained, never sent.
        refusal = self.source.window_refusal((center, width))
        if refusal:
            self.editor.show_message(f"Not applied: {refusal}", w.FAULT_HOLD)
            return
        self.editor.show_message("Sent: waiting for the controller", w.PENDING)
        self._send("window", (center, width))

    def _check_answer(self, state: ConsoleState) -> None:
        """Show whether the last command was carried out or refused, and why."""
        if self._sent is None:
            return
        kind, value, t_sent, refusal_before = self._sent
        gate = state.gate
        if kind == "window":
            center, width = value
            if math.isclose(gate.center_mm, center) and math.isclose(gate.window_mm, width):
                self.editor.applied()
                self.editor.show_message(
                    f"Applied: {gate.lower_mm:+.1f} to {gate.upper_mm:+.1f} mm", w.ENABLED
                )
                self._sent = None
                return
        refusal = state.last_refusal
        if refusal and refusal != refusal_before:
            target = self.editor if kind == "window" else None
            if target is not None:
                target.show_message(f"Refused: {refusal}", w.FAULT_HOLD)
            else:
                self.controls.message.set_text(f"Refused: {refusal}")
            self._sent = None
        elif time.monotonic() - t_sent > ANSWER_TIMEOUT_S:
            if kind == "window":
                self.editor.show_message("No answer from the controller", w.FAULT_HOLD)
            self._sent = None

    # -- drawing ------------------------------------------------------------------------
    def refresh(self, slow: bool = False) -> None:
        state = self.source.state(self.trace.span_s)
        self.state = state
        self.banner.update_state(state)
        self.trace.update_state(state)
        if not self.read_only:
            self.controls.update_state(state)
        self.editor.sync(state.gate)
        if not self.editor.editing:
            self.trace.set_window_edit(state.gate.center_mm, state.gate.window_mm, False)
        self._check_answer(state)
        self._update_coaching(state)
        if slow or self.frames % SLOW_PANEL_EVERY == 0:
            self.devices.update_devices(state.devices)
            self.alarms.update_alarms(state.alarms)
            self.correlation.update_state(state)
            imaging = state.imaging
            self.imaging.show_frames(imaging.views, state.t, imaging.message)
        self.frames += 1

    def _update_coaching(self, state: ConsoleState) -> None:
        gate = state.gate
        bar = self.coaching.bar
        if gate.mode == "amplitude":
            scale = self.trace.target_y_range if gate.source != "surrogate" else None
            scale = scale or (gate.lower_mm - 8.0, gate.upper_mm + 8.0)
            bar.set_level(
                gated_level(gate, state.trace),
                (gate.lower_mm, gate.upper_mm),
                scale,
                self._inhale_sign,
                instruct=False,
            )
        elif gate.mode == "breath_hold":
            ref = math.nan if gate.reference is None else gate.reference
            band = (ref - gate.tolerance, ref + gate.tolerance)
            if gate.breath_hold_signal == "position":
                level = gated_level(gate, state.trace)
                scale = self.trace.target_y_range or (ref - 10.0, ref + 10.0)
            else:
                # The spirometer's volume, as its own patient display shows it: the level
                # against the captured reference, on a scale of the volumes seen.
                level = state.volume_l
                self._volume_span = _widened(self._volume_span, level, ref)
                scale = self._volume_span
            bar.set_level(level, band, scale, self._inhale_sign, instruct=True)
        else:  # phase gating has no level to hold
            bar.set_level(math.nan, (math.nan, math.nan), (0.0, 1.0), 1.0, instruct=False)

    def save_screenshot(self, path: str | Path) -> Path:
        """Save a PNG of the window as it is now."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.refresh(slow=True)
        if not self.grab().save(str(path), "PNG"):
            raise OSError(f"could not write the screenshot {path}")
        return path

    def display_counters(self) -> dict:
        """Counters for ``display_figures``; call on the GUI thread."""
        return {
            "wall": time.monotonic(),
            "refreshes": self.frames,
            "paints": self.paints,
            "thread_cpu": time.thread_time(),  # this (the GUI) thread only
            "process_cpu": time.process_time(),
        }

    def display_figures(self, since: dict) -> dict:
        """Display rate and CPU since ``since`` (``display_counters()`` taken earlier)."""
        now = self.display_counters()
        wall = max(1e-9, now["wall"] - since["wall"])
        return {
            "wall_s": round(wall, 3),
            "refreshes_per_s": round((now["refreshes"] - since["refreshes"]) / wall, 2),
            "paints_per_s": round((now["paints"] - since["paints"]) / wall, 2),
            "gui_thread_cpu_pct": round(100 * (now["thread_cpu"] - since["thread_cpu"]) / wall, 2),
            "process_cpu_pct": round(100 * (now["process_cpu"] - since["process_cpu"]) / wall, 2),
        }

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if self.screenshot_path is not None:
            self.save_screenshot(self.screenshot_path)
            self.screenshot_path = None
        self.timer.stop()
        if self.coaching.detached is not None:
            self.coaching.detached.close()
        super().closeEvent(event)
        self.closed.emit()


# =========================================================================================
# Entry points
# =========================================================================================
VOLUME_SPAN_L = (-0.1, 0.8)  # litres above end-exhale: one tidal breath, widened as seen


def _widened(span: tuple[float, float], *values: float) -> tuple[float, float]:
    """``span`` grown to hold each finite value with 0.1 l to spare; it never shrinks, so
    the bar does not rescale with every breath."""
    lo, hi = span
    for v in values:
        if math.isfinite(v):
            lo, hi = min(lo, v - 0.1), max(hi, v + 0.1)
    return lo, hi


def display_available() -> bool:
    """True if Qt can show a window here: an X11 or Wayland display, a desktop platform, or
    ``QT_QPA_PLATFORM=offscreen`` set explicitly (headless screenshots, CI)."""
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] == "offscreen":
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def application() -> QApplication:
    """The process's QApplication, created (Fusion style) if there is none yet."""
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
        app.setApplicationName("motionctl")
        app.setStyle("Fusion")
    return app


REPORT_WARMUP_S = 5.0  # display figures are measured after this (start-up excluded)


def run_window(
    window: ConsoleWindow,
    *,
    seconds: float | None = None,
    screenshot: str | Path | None = None,
    on_tick: Callable[[float], None] | None = None,
    stop: threading.Event | None = None,
    report: Callable[[dict], None] | None = None,
) -> int:
    """Show ``window`` and run the Qt event loop until it is closed, ``seconds`` have passed
    or ``stop`` is set; save a PNG to ``screenshot`` at the end; ``report`` receives the
    display figures (``ConsoleWindow.display_figures``)."""
    window.screenshot_path = Path(screenshot) if screenshot is not None else None
    loop = QEventLoop()
    window.closed.connect(loop.quit)
    start = time.monotonic()
    marks: list[dict] = []

    def tick() -> None:
        elapsed = time.monotonic() - start
        if on_tick is not None:
            on_tick(elapsed)
        if not marks and elapsed >= REPORT_WARMUP_S:
            marks.append(window.display_counters())
        if (seconds is not None and elapsed >= seconds) or (stop is not None and stop.is_set()):
            window.close()

    supervisor = QTimer()
    supervisor.timeout.connect(tick)
    supervisor.start(50)
    first = window.display_counters()
    window.show()
    tick()
    if window.isVisible():
        loop.exec()
    supervisor.stop()
    if report is not None:
        report(window.display_figures(marks[0] if marks else first))
    return 0


def run_console(
    controller,
    *,
    seconds: float | None = None,
    screenshot: str | Path | None = None,
    on_tick: Callable[[float], None] | None = None,
    stop: threading.Event | None = None,
    operator: str = "console",
    span_s: float = 60.0,
    isolate: bool = True,
    report: Callable[[dict], None] | None = None,
) -> int:
    """Show the console over a running ``controller`` until the window is closed,
    ``seconds`` have passed or ``stop`` is set (the CLI's Ctrl-C event); returns 0.

    ``on_tick(elapsed_s)`` is called every 50 ms on the calling thread (the CLI's simulated
    operator); ``screenshot`` receives a PNG of the window at the end; ``report`` receives
    the console's display figures (refreshes and paints per second, its CPU).

    ``isolate`` (the default) runs the window in a process of its own, fed by a bridge
    thread here (``remote.py``): Qt's painting then shares no interpreter lock with the
    controller (bench/bench_console.py measures the difference). ``isolate=False`` runs
    it on this thread (creating the QApplication if there is none). Either way the
    controller keeps running after this returns: the caller stops it, as without a console.
    """
    if isolate:
        from motionctl.gui.remote import run_isolated

        return run_isolated(
            controller,
            seconds=seconds,
            screenshot=screenshot,
            on_tick=on_tick,
            stop=stop,
            operator=operator,
            span_s=span_s,
            report=report,
        )
    app = application()  # held for the whole run: a QApplication dies with its last reference
    window = ConsoleWindow(LiveSource(controller), operator=operator, span_s=span_s)
    try:
        return run_window(
            window,
            seconds=seconds,
            screenshot=screenshot,
            on_tick=on_tick,
            stop=stop,
            report=report,
        )
    finally:
        window.deleteLater()
        app.processEvents()


__all__ = ["ConsoleWindow", "application", "display_available", "run_console", "run_window"]
