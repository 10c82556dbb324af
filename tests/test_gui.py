"""The operator console on a real controller and the simulated rig (pytest-qt, headless).

The widgets are driven as a therapist would (clicks, typing, dragging the window, the hold
key) and checked against what really happened: the controller's gate, the simulated
linac's own record of beam edges, and the session log. Screenshots of the normal, hold and
review states are saved (to docs/screenshots/ with MOTIONCTL_DOC_SCREENSHOTS=1).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported

import multiprocessing

import numpy as np
import pytest
from conftest import RigSession
from PyQt6.QtCore import Qt

from motionctl.controller import OperatorCommand
from motionctl.gui import widgets
from motionctl.gui.console import ConsoleWindow, display_available, run_console
from motionctl.gui.reasons import describe, format_session_time, is_routine
from motionctl.gui.remote import ConsoleBridge, RemoteSource
from motionctl.gui.review import ReviewSource, open_review, run_review
from motionctl.gui.state import LiveSource

pytestmark = pytest.mark.rig

# MOTIONCTL_DOC_SCREENSHOTS=1 refreshes the screenshots of docs/ (else they go to a tmp dir)
DOC_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
WIDE_WINDOW = ("gating.center_mm=-6", "gating.window_mm=20")  # the target is always inside
OPERATOR = "test_therapist"


class Session(RigSession):
    """The shared rig session without X-ray imaging (the configured prior maps surrogate
    to target, so the tests know where the target is), plus what they read back."""

    def __init__(self, tmp_path, *overrides: str):
        super().__init__(
            tmp_path,
            "devices.xray.enabled=false",
            "gating.hold_while_prediction_learns=false",
            *overrides,
        )

    def operator_events(self, kind: str) -> list[dict]:
        """The operator's ``kind`` events committed to the session log so far."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT detail FROM events WHERE source='operator' AND kind=? ORDER BY n", (kind,)
            ).fetchall()
        finally:
            db.close()
        return [json.loads(r[0]) for r in rows]


@pytest.fixture
def session_class():
    return Session


@pytest.fixture
def console(qtbot):
    def open_(s: Session, span_s: float = 60.0) -> ConsoleWindow:
        window = ConsoleWindow(LiveSource(s.controller), operator=OPERATOR, span_s=span_s)
        qtbot.addWidget(window)
        with qtbot.waitActive(window):  # the therapist's console has the focus
            window.show()
            window.activateWindow()
        return window

    return open_


def _type(qtbot, box, text: str) -> None:
    box.setFocus()
    box.lineEdit().selectAll()
    qtbot.keyClicks(box.lineEdit(), text)


# -- words ----------------------------------------------------------------------------------
def test_hold_reasons_are_shown_in_plain_words():
    assert describe("stale_data:surface") == "No recent data from the surface tracker"
    assert describe("malformed_data:surface") == "Corrupt data from the surface tracker"
    assert describe("operator_not_enabled") == "Beam not enabled by the operator"
    assert describe("outside_window") == "Target outside the gating window"
    assert "stopped answering" in describe("beam_interface:ack_lost")
    assert describe("beam_interface:malformed:checksum").endswith("could not be read (checksum)")
    assert describe("beam_interface:odd").endswith("in doubt (odd)")  # unknown: kept visible
    assert describe("operator_hold").startswith("Operator hold")
    assert describe("debounce").startswith("Target back in the window")
    # a code the console does not know is shown as it is, never hidden
    assert describe("new_interlock:xray") == "new_interlock:xray"
    assert is_routine("outside_window") and not is_routine("stale_data:surface")
    assert format_session_time(65.24) == "1:05.2" and format_session_time(59.96) == "1:00.0"


# -- live console on a real controller ------------------------------------------------------
def test_the_banner_says_when_the_motion_prediction_will_be_ready(session, console, qtbot):
    s = session(*WIDE_WINDOW, "gating.hold_while_prediction_learns=true")
    window = console(s)
    banner = window.banner
    qtbot.mouseClick(window.controls.enable_button, Qt.MouseButton.LeftButton)
    learning = re.compile(r"Motion prediction learning the breathing: ready in about (\d+) s")

    def wait() -> int | None:
        found = learning.search(banner.reasons_text)
        return int(found.group(1)) if found else None

    qtbot.waitUntil(lambda: wait() is not None, timeout=5000)
    first = wait()
    assert 1 <= first <= 15  # 4 s of delay vector and 10 s of learning, from the start
    qtbot.waitUntil(lambda: (wait() or first) < first, timeout=5000)  # counting down
    assert not s.rig.linac.beam_on


def test_banner_follows_the_controller_from_hold_to_enabled(session, console, qtbot):
    s = session(*WIDE_WINDOW)
    window = console(s)
    banner = window.banner
    qtbot.waitUntil(
        lambda: (
            banner.state_text == "BEAM HOLD"
            and banner.reasons_text == "Beam not enabled by the operator"
        ),
        timeout=5000,
    )
    assert banner.colour == widgets.ROUTINE_HOLD  # a routine hold: amber, not red
    assert not s.rig.linac.beam_on

    qtbot.mouseClick(window.controls.enable_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: banner.state_text == "BEAM ENABLED", timeout=5000)
    assert banner.colour == widgets.ENABLED
    assert s.rig.linac.wait_for_edge(True, after=0.0, timeout=2.0) is not None
    assert not window.controls.enable_button.isEnabled()
    # the devices panel shows the tracker streaming
    qtbot.waitUntil(
        lambda: (
            window.devices.table.item(1, 2) is not None
            and window.devices.table.item(1, 2).text().endswith("Hz")
        ),
        timeout=5000,
    )
    # the spirometer's link is its serial port, open (its driver reports each opening)
    table = window.devices.table
    row = next(r for r in range(table.rowCount()) if "pirometer" in table.item(r, 0).text())
    qtbot.waitUntil(lambda: table.item(row, 1).text() == "connected", timeout=2000)
    qtbot.waitUntil(lambda: bool(s.operator_events("enable")), timeout=2000)
    assert s.operator_events("enable")[0]["who"] == OPERATOR

    # the patient's coaching bar moves to a window of its own and back
    coaching = window.coaching
    qtbot.mouseClick(coaching.detach_button, Qt.MouseButton.LeftButton)
    assert coaching.detached is not None and coaching.bar.window() is coaching.detached
    assert coaching.detached.isVisible()
    coaching.detached.close()
    assert coaching.detached is None and coaching.bar.window() is window


def test_the_coaching_bar_shows_the_held_volume_against_the_reference(session, console, qtbot):
    # In volume breath-hold mode the bar was left empty (the spirometer's own display was
    # to coach): the therapist saw a blank box while the patient held.
    s = session(
        "gating.mode=breath_hold",
        "patient.breath_hold_per_min=30",
        "patient.breath_hold_s=3",
    )
    window = console(s)
    bar, banner = window.coaching.bar, window.banner
    qtbot.mouseClick(window.controls.enable_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: s.controller.status.valve_closed, timeout=20000)
    qtbot.mouseClick(window.controls.capture_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: s.controller.gate.reference is not None, timeout=2000)
    reference = s.controller.gate.reference
    tolerance = s.cfg["gating"]["breath_hold_tolerance_l"]
    qtbot.waitUntil(lambda: bar.message == "Hold it there", timeout=2000)
    assert bar.band == pytest.approx((reference - tolerance, reference + tolerance))
    assert abs(bar.level - s.controller.status.volume_l) < 0.1  # litres, as recorded
    assert bar.scale[0] < bar.band[0] < bar.band[1] < bar.scale[1]
    # the banner says what is compared: the volume against the reference, not a window
    qtbot.waitUntil(lambda: banner.state_text == "BEAM ENABLED", timeout=3000)
    assert banner.reasons_text == "Breath held at the reference; every check passes"
    assert banner.target_text.startswith("volume: ")
    assert f"reference {reference:.2f} L ± {tolerance:g} L" in banner.target_text
    # the hold ends: the patient is told which way to go, and the level leaves the band
    qtbot.waitUntil(lambda: not s.controller.status.valve_closed, timeout=6000)
    qtbot.waitUntil(lambda: bar.message.startswith("Breathe"), timeout=3000)
    assert not bar.inside
    # in review, the banner's volume is the one recorded at the review time
    s.close()
    db = sqlite3.connect(s.path)
    t, volume = db.execute(
        "SELECT t, volume_l FROM spirometer_samples ORDER BY n LIMIT 1 OFFSET 40"
    ).fetchone()
    db.close()
    review = ReviewSource(s.path)
    review.t = t
    assert review.state(60.0).volume_l == volume


def test_dragged_and_typed_windows_are_applied_on_confirmation_and_logged(session, console, qtbot):
    s = session()
    window = console(s)
    gate, editor = s.controller.gate, window.editor
    configured = (s.cfg["gating"]["center_mm"], s.cfg["gating"]["window_mm"])

    # drag the window's edges on the trace: nothing changes until Apply
    window.trace.window_edit.setRegion((-6.0, 1.0))
    assert editor.pending == (-2.5, 7.0) and editor.editing
    assert "Not applied" in editor.message.text()
    assert (gate.center_mm, gate.window_mm) == configured
    qtbot.mouseClick(editor.apply_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: (gate.center_mm, gate.window_mm) == (-2.5, 7.0), timeout=2000)
    qtbot.waitUntil(lambda: editor.message.text().startswith("Applied"), timeout=2000)
    assert not editor.editing

    # type centre and width, then Apply
    _type(qtbot, editor.center_box, "-3.5")
    _type(qtbot, editor.width_box, "4")
    assert (gate.center_mm, gate.window_mm) == (-2.5, 7.0)
    qtbot.mouseClick(editor.apply_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: (gate.center_mm, gate.window_mm) == (-3.5, 4.0), timeout=2000)
    # the trace's window follows the applied one
    qtbot.waitUntil(lambda: window.trace.window_band.getRegion() == (-5.5, -1.5), timeout=2000)

    # the controller logged who, when, old and new
    qtbot.waitUntil(lambda: len(s.operator_events("window")) == 2, timeout=2000)
    first, second = s.operator_events("window")
    assert first == {"who": OPERATOR, "value": [-2.5, 7.0], "old": list(configured)}
    assert second == {"who": OPERATOR, "value": [-3.5, 4.0], "old": [-2.5, 7.0]}


def test_an_invalid_typed_window_is_refused_with_a_reason_and_changes_nothing(
    session, console, qtbot
):
    s = session()
    window = console(s)
    editor, gate = window.editor, s.controller.gate
    _type(qtbot, editor.width_box, "30")  # the configured maximum is 20 mm
    qtbot.mouseClick(editor.apply_button, Qt.MouseButton.LeftButton)
    assert editor.message.text().startswith("Not applied")
    assert "exceeds the configured maximum" in editor.message.text()
    _type(qtbot, editor.width_box, "5")
    _type(qtbot, editor.center_box, "80")
    qtbot.mouseClick(editor.apply_button, Qt.MouseButton.LeftButton)
    assert "outside physical limits" in editor.message.text()
    qtbot.wait(300)  # longer than the log's commit interval
    assert (gate.center_mm, gate.window_mm) == (
        s.cfg["gating"]["center_mm"],
        s.cfg["gating"]["window_mm"],
    )
    assert s.operator_events("window") == []  # nothing was sent, so nothing logged
    assert editor.editing  # the operator's values stay, to be corrected


def test_an_interlock_is_listed_and_cleared_by_its_acknowledgement(session, console, qtbot):
    # The dwell rule: a target more than 10 mm off the window centre for 0.3 s holds the
    # beam until the operator acknowledges it. A centre of -30 mm sets it off at once.
    s = session("gating.dwell_mm=10", "gating.dwell_s=0.3", "gating.center_mm=-30")
    window = console(s)
    alarms = window.alarms

    def row_of(key: str) -> int | None:
        for row in range(alarms.table.rowCount()):
            if alarms.table.item(row, 1).text() == describe(key):
                return row
        return None

    qtbot.waitUntil(lambda: row_of("dwell_exceeded") is not None, timeout=5000)
    row = row_of("dwell_exceeded")
    assert alarms.table.item(row, 2).text() == "active"
    assert "Target off position too long" in window.banner.reasons_text
    assert "dwell_exceeded" not in alarms.buttons  # its condition is still there

    # Bring the window to the target: the condition goes, the interlock waits for the operator
    _type(qtbot, window.editor.center_box, "-6")
    qtbot.mouseClick(window.editor.apply_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "dwell_exceeded" in alarms.buttons, timeout=5000)
    assert alarms.table.item(row_of("dwell_exceeded"), 2).text() == "needs acknowledgement"
    assert "dwell_exceeded" in s.controller.status.interlocks

    qtbot.mouseClick(alarms.buttons["dwell_exceeded"], Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "dwell_exceeded" not in s.controller.status.interlocks, timeout=2000)
    qtbot.waitUntil(
        lambda: alarms.table.item(row_of("dwell_exceeded"), 2).text().startswith("cleared"),
        timeout=2000,
    )
    qtbot.waitUntil(lambda: bool(s.operator_events("acknowledge")), timeout=2000)
    assert s.operator_events("acknowledge")[0]["value"] == "dwell_exceeded"


@pytest.mark.parametrize("key", [Qt.Key.Key_Escape, Qt.Key.Key_Space])
def test_the_hold_key_holds_the_linac_at_once(session, console, qtbot, key):
    s = session(*WIDE_WINDOW)
    window = console(s)
    qtbot.mouseClick(window.controls.enable_button, Qt.MouseButton.LeftButton)
    assert s.rig.linac.wait_for_edge(True, after=0.0, timeout=5.0) is not None

    t_key = time.monotonic()
    qtbot.keyClick(window, key)
    t_off = s.rig.linac.wait_for_edge(False, after=t_key, timeout=1.0)
    assert t_off is not None, "the linac was not held"
    assert t_off - t_key < 0.1
    qtbot.waitUntil(lambda: window.banner.reasons_text.startswith("Operator hold"), timeout=2000)
    assert window.controls.release_button.isEnabled()

    t_release = time.monotonic()
    qtbot.mouseClick(window.controls.release_button, Qt.MouseButton.LeftButton)
    assert s.rig.linac.wait_for_edge(True, after=t_release, timeout=2.0) is not None
    qtbot.waitUntil(lambda: bool(s.operator_events("hold")), timeout=2000)
    assert s.operator_events("hold")[0]["who"] == OPERATOR


def test_a_frozen_or_closed_console_leaves_the_gate_alone(session, console, qtbot):
    s = session("patient.period_s=1.5")  # a beam edge every ~0.75 s
    window = console(s)
    s.controller.submit(OperatorCommand("enable", who=OPERATOR))
    assert s.rig.linac.wait_for_edge(True, after=0.0, timeout=5.0) is not None
    t0 = time.monotonic()
    time.sleep(2.0)  # the GUI thread is blocked: no refresh, no event processed
    frozen_edges = [e for e in s.rig.linac.edges() if e[0] > t0]
    assert len(frozen_edges) >= 2, "the gate stopped following the target while frozen"
    window.close()
    t1 = time.monotonic()
    time.sleep(1.5)
    assert len([e for e in s.rig.linac.edges() if e[0] > t1]) >= 2
    assert s.controller.status.operator_enabled  # closing did not disable (nor enable) it


# -- entry points, screenshots and review ---------------------------------------------------
@pytest.mark.parametrize(
    ("isolate", "seconds"), [(True, 3.0), (False, 1.5)], ids=["own_process", "this_thread"]
)
def test_run_console_runs_the_session_and_saves_a_screenshot(
    session, qtbot, tmp_path, isolate, seconds
):
    s = session(*WIDE_WINDOW)
    ticks: list[float] = []

    def simulated_operator(elapsed_s: float) -> None:  # what the CLI's on_tick does
        ticks.append(elapsed_s)
        if elapsed_s >= 0.3 and not s.controller.status.operator_enabled:
            s.controller.set_operator_enable(True, who="simulated_operator")

    shot = tmp_path / "run.png"
    figures: dict = {}
    rc = run_console(
        s.controller,
        seconds=seconds,
        screenshot=shot,
        on_tick=simulated_operator,
        isolate=isolate,
        report=figures.update,
    )
    assert rc == 0
    assert shot.stat().st_size > 10_000
    assert seconds - 0.1 <= ticks[-1] < seconds + 2.0
    assert s.controller.status.operator_enabled
    assert figures["refreshes_per_s"] > 10  # drawing at display rate (30 on a quiet machine)
    assert display_available()  # QT_QPA_PLATFORM=offscreen is set explicitly here


def test_the_console_in_its_own_process_sends_only_what_the_controller_allows(session, qtbot):
    # The bridge and the remote source over a real pipe, the window here so that it can be
    # driven; run_console(isolate=True) puts the same window in a child process.
    s = session(*WIDE_WINDOW)
    console_end, bridge_end = multiprocessing.Pipe(duplex=True)
    bridge = ConsoleBridge(LiveSource(s.controller), bridge_end)
    bridge.start()
    try:
        source = RemoteSource(console_end, s.cfg)
        window = ConsoleWindow(source, operator=OPERATOR)
        qtbot.addWidget(window)
        window.show()
        qtbot.waitUntil(lambda: "Beam not enabled" in window.banner.reasons_text, timeout=5000)
        qtbot.mouseClick(window.controls.enable_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: window.banner.state_text == "BEAM ENABLED", timeout=5000)
        # the trace is rebuilt, in order, from the rows each frame brings
        qtbot.waitUntil(lambda: len(window.state.trace["t"]) > 30, timeout=3000)
        assert np.all(np.diff(window.state.trace["t"]) > 0)

        _type(qtbot, window.editor.width_box, "25")  # refused by the controller's rule
        qtbot.mouseClick(window.editor.apply_button, Qt.MouseButton.LeftButton)
        assert "exceeds the configured maximum" in window.editor.message.text()
        _type(qtbot, window.editor.width_box, "18")
        qtbot.mouseClick(window.editor.apply_button, Qt.MouseButton.LeftButton)
        gate = s.controller.gate
        qtbot.waitUntil(lambda: gate.window_mm == 18.0, timeout=2000)
        qtbot.waitUntil(lambda: window.editor.message.text().startswith("Applied"), timeout=2000)
        qtbot.waitUntil(lambda: len(s.operator_events("window")) == 1, timeout=2000)
    finally:
        console_end.close()
        bridge.stop()


def test_display_available_needs_a_display(monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert not display_available()
    monkeypatch.setenv("DISPLAY", ":0")
    assert display_available()


def test_screenshots_of_normal_hold_and_review(session, console, qtbot, tmp_path):
    SCREENSHOTS = DOC_SCREENSHOTS if os.environ.get("MOTIONCTL_DOC_SCREENSHOTS") else tmp_path
    s = session("patient.period_s=3.5")
    window = console(s, span_s=30)
    qtbot.mouseClick(window.controls.enable_button, Qt.MouseButton.LeftButton)
    qtbot.wait(10000)  # a few breaths on the trace
    qtbot.waitUntil(lambda: window.banner.state_text == "BEAM ENABLED", timeout=5000)
    window.save_screenshot(SCREENSHOTS / "console-normal.png")

    qtbot.keyClick(window, Qt.Key.Key_Escape)
    t_hold = s.controller.session_t(time.monotonic())
    qtbot.waitUntil(lambda: window.banner.reasons_text.startswith("Operator hold"), timeout=2000)
    qtbot.wait(1500)
    window.save_screenshot(SCREENSHOTS / "console-hold.png")
    qtbot.mouseClick(window.controls.release_button, Qt.MouseButton.LeftButton)
    qtbot.wait(1000)
    window.close()
    s.close()

    # Review: the same widgets over the recorded log, scrubbed into the operator hold
    source = ReviewSource(s.path)
    review = open_review(s.path, at_s=t_hold + 1.0)
    qtbot.addWidget(review)
    assert review.read_only and not review.controls.isVisibleTo(review)
    assert review.banner.state_text == "BEAM HOLD"
    assert review.banner.reasons_text.startswith("Operator hold")
    keys = [a.key for a in review.state.alarms]
    assert "operator_hold" in keys
    assert review.state.trace["beam_on"].max() == 1.0  # beam-on intervals before the hold
    review.seek(t_hold - 3.0)
    assert review.state.operator_enabled and "operator_hold" not in [
        a.key for a in review.state.alarms if a.t_cleared is None
    ]
    review.seek(t_hold + 1.0)
    review.save_screenshot(SCREENSHOTS / "console-review.png")
    assert source.t_end > t_hold
    # the CLI's review entry point, non-interactive
    shot = tmp_path / "review.png"
    assert run_review(s.path, shot, seconds=0) == 0 and shot.stat().st_size > 10_000
    for name in ("console-normal.png", "console-hold.png", "console-review.png"):
        assert (SCREENSHOTS / name).stat().st_size > 10_000


def test_sim_cli_saves_a_console_screenshot_without_a_display(tmp_path):
    """`motionctl sim --screenshot` renders the console offscreen when there is no display."""
    import subprocess
    import sys

    png = tmp_path / "console.png"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "motionctl.cli",
            "sim",
            "--seconds",
            "4",
            "--screenshot",
            str(png),
            "--log",
            str(tmp_path / "s.sqlite"),
            "--set",
            "devices.surface.port=0",
            "--set",
            "devices.xray.port=0",
            "--set",
            "session.operator_enable_after_s=0.5",
            "--set",
            "gating.hold_while_prediction_learns=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
