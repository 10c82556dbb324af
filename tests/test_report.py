"""QA report: one self-contained HTML file from a real recorded session, and the TG-142
timing check on hand-made edges."""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from motionctl.report import FAIL, NOT_ASSESSED, PASS, gating_timing, write_report

SECTIONS = (
    "Summary",
    "Trace, beam-on intervals and gating window",
    "Duty cycle and residual motion in the gate",
    "Holds by reason",
    "Latency",
    "TG-142 gating timing",
    "Correlation model checks at each X-ray",
    "Fiducial acceptance",
    "Interlock events",
    "Injected faults",
)


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory):
    """A ~5 s session recorded on the simulated rig (real sockets, ptys, X-ray imager), with
    a tracker freeze injected so that the interlock and fault sections have content."""
    log = tmp_path_factory.mktemp("sim") / "session.sqlite"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "motionctl.cli",
            "sim",
            "--headless",
            "--seconds",
            "5",
            "--log",
            str(log),
            "--set",
            "devices.surface.port=0",
            "--set",
            "devices.xray.port=0",
            "--set",
            "session.operator_enable_after_s=0.5",
            "--set",
            "gating.hold_while_prediction_learns=false",
            "--fault",
            "surface:freeze@3+0.4",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return log


def _sources(text: str) -> list[str]:
    return re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", text)


def test_report_is_one_self_contained_html_with_every_section(sim_log, tmp_path):
    out_dir = tmp_path / "out"
    summary = write_report([sim_log], out_dir / "report.html")
    assert [p.name for p in out_dir.iterdir()] == ["report.html"]  # nothing beside it
    text = (out_dir / "report.html").read_text("utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # Every figure embedded; nothing fetched from anywhere.
    sources = _sources(text)
    assert len(sources) >= 5
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    for s in sources:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<link" not in text and "<script" not in text and "url(" not in text
    for heading in SECTIONS:
        assert f"<h3>{heading}" in text, heading
    session = summary.sessions[0]
    assert session.status == "ok" and session.verified and session.error == ""
    assert not session.what_if and session.decisions_compared > 50
    assert session.divergences == 0
    # A TG-142 verdict, in words and colour, agreeing with the summary.
    assert session.tg142 in (PASS, FAIL)
    assert (
        f"<span class='badge {'pass' if session.tg142 == PASS else 'fail'}'>{session.tg142}<"
        in text
    )
    assert session.tg142_edges > 0
    # The definition of "expected" is in the report itself, with the delay used.
    assert "Expected time, as used here" in text and "minus" in text
    # The injected freeze is reported with its hold latency, and the interlock it raised.
    assert "surface:freeze" in text and "stale_data:surface" in text
    # The duty cycle shown is the replay's recorded figure.
    assert 0.0 < session.duty_cycle < 1.0
    assert f"{session.duty_cycle:.1%}" in text


def test_timing_verdicts_follow_the_100_ms_rule_on_the_linac_edges(sim_log, tmp_path):
    summary = write_report([sim_log], tmp_path / "r.html", beam_delay_s=0.0)
    timing = summary.sessions[0].timing
    db = sqlite3.connect(sim_log)
    edges = db.execute("SELECT t, beam_on FROM beam_edges WHERE source='linac_sim' ORDER BY t")
    edges = [(t, bool(on)) for t, on in edges]
    db.close()
    assert timing.edge_source == "linac_sim" and timing.beam_delay_s == 0.0
    assert [(e.t, e.beam_on) for e in timing.edges] == edges  # every linac edge is judged
    for e in timing.edges:
        if e.latency_s is None:
            assert e.verdict in (FAIL, NOT_ASSESSED)
        else:
            assert e.verdict == (PASS if abs(e.latency_s) <= 0.100 else FAIL)
    assert summary.sessions[0].tg142 == (FAIL if timing.failures else PASS)
    text = (tmp_path / "r.html").read_text("utf-8")
    assert "0 ms</b> (given for this report)" in text


def test_unverified_log_is_not_replayed_unless_forced(sim_log, tmp_path):
    tampered = tmp_path / "tampered.sqlite"
    shutil.copy(sim_log, tampered)
    db = sqlite3.connect(tampered)
    db.execute("UPDATE decisions SET beam_enabled = 1 - beam_enabled WHERE rowid = 10")
    db.commit()
    db.close()
    summary = write_report([tampered], tmp_path / "refused.html")
    session = summary.sessions[0]
    assert not session.verified and session.status == "failed"
    assert "replay refused" in session.error
    assert session.tg142 == NOT_ASSESSED
    text = (tmp_path / "refused.html").read_text("utf-8")
    assert "NOT VERIFIED" in text and "Replay refuses an unverified log" in text
    assert "data:image/png" not in text  # no figures from an unverified log
    assert summary.exit_status == 2

    forced = write_report([tampered], tmp_path / "forced.html", force=True)
    session = forced.sessions[0]
    assert not session.verified and session.status == "ok"
    assert session.divergences > 0  # the flipped decision does not replay
    assert "UNVERIFIED LOG, reviewed by force" in (tmp_path / "forced.html").read_text("utf-8")
    assert forced.exit_status == 1


def test_a_file_that_is_not_a_log_gets_a_section_saying_why(sim_log, tmp_path):
    junk = tmp_path / "notes.sqlite"
    junk.write_text("not a database\n")
    summary = write_report([junk, sim_log], tmp_path / "two.html")
    bad, good = summary.sessions
    assert bad.status == "failed" and "not an SQLite file" in bad.error
    assert str(tmp_path) not in bad.error  # named by file name only
    assert good.status == "ok"
    text = (tmp_path / "two.html").read_text("utf-8")
    assert text.count("<section") == 2 and "could not be reviewed" in text


# -- the timing check on hand-made data -------------------------------------------------------
WINDOW = (np.array([-np.inf]), np.array([-1.0]), np.array([1.0]))


def _target():
    """A target at 10 Hz entering the window [-1, 1] at t = 1.05 s and leaving at 3.05 s."""
    t = np.arange(0.0, 5.0, 0.1)
    x = np.where((t > 1.0) & (t < 3.0), 0.0, 5.0)
    x[10], x[30] = 2.0, 0.0  # t=1.0: 2.0 -> t=1.1: 0.0 crosses 1.0 at 1.05; 3.0 -> 3.1 at 3.05
    x[31] = 2.0
    return t, x


def _decisions(on_t, off_t):
    return [(0.0, False, "outside_window"), (on_t, True, ""), (off_t, False, "outside_window")]


def test_edges_within_100_ms_of_the_target_crossing_pass():
    t, x = _target()
    check = gating_timing(
        t, x, t, x, WINDOW, _decisions(1.1, 3.1), [(1.12, True), (3.14, False)], beam_delay_s=0
    )
    assert check.verdict == PASS
    assert [round(e.latency_s, 3) for e in check.edges] == [0.07, 0.09]
    assert [round(e.chain_s, 3) for e in check.edges] == [0.02, 0.04]


def test_a_late_edge_fails_and_the_beam_delay_moves_the_expectation():
    t, x = _target()
    edges = [(1.2, True), (3.3, False)]
    late = gating_timing(t, x, t, x, WINDOW, _decisions(1.1, 3.1), edges, beam_delay_s=0.0)
    assert late.verdict == FAIL
    assert [e.verdict for e in late.edges] == [FAIL, FAIL]
    assert "late" in late.edges[1].note
    # A 0.2 s beam delay expects the gating box 0.2 s before the crossings: later still.
    shifted = gating_timing(t, x, t, x, WINDOW, _decisions(1.1, 3.1), edges, beam_delay_s=0.2)
    assert [round(e.latency_s, 3) for e in shifted.edges] == [0.35, 0.45]


def test_gate_chatter_and_a_missed_beam_off_fail():
    t, x = _target()
    decisions = [
        (0.0, False, "outside_window"),
        (1.1, True, ""),
        (2.0, False, "outside_window"),  # the gate switches off mid-window ...
        (2.03, True, ""),  # ... and on again: chatter, no target crossing near
    ]
    edges = [(1.11, True), (2.0, False), (2.03, True)]  # and never off when the target leaves
    check = gating_timing(t, x, t, x, WINDOW, decisions, edges, beam_delay_s=0.0)
    assert check.verdict == FAIL
    assert [e.verdict for e in check.edges] == [PASS, FAIL, FAIL]
    assert "no target crossing" in check.edges[1].note
    assert len(check.missed) == 1 and not check.missed[0]["beam_on"]
    assert "stayed ON" in check.missed[0]["note"]


def test_an_edge_whose_crossing_would_be_after_the_trace_ends_is_not_assessed():
    # The gate switches off on a prediction 0.4 s ahead; the session stops before the
    # target gets there: that edge cannot be judged. The same edge earlier is chatter.
    t, x = _target()
    x[30:] = 0.0  # the target stays in the window to the end (4.9 s)
    for off_t, verdict, overall in ((4.7, NOT_ASSESSED, PASS), (4.0, FAIL, FAIL)):
        decisions = [
            (0.0, False, "outside_window"),
            (0.7, True, ""),  # the crossing at 1.05 s minus the 0.4 s beam delay
            (off_t, False, "outside_window"),
        ]
        edges = [(0.71, True), (off_t + 0.01, False)]
        check = gating_timing(t, x, t, x, WINDOW, decisions, edges, beam_delay_s=0.4)
        assert check.edges[1].verdict == verdict, off_t
        assert check.verdict == overall


def test_an_interlock_edge_is_judged_against_its_decision():
    t, x = _target()
    decisions = [
        (0.0, False, "outside_window"),
        (1.1, True, ""),
        (2.0, False, "stale_data:surface"),
        (2.5, True, ""),
        (3.1, False, "outside_window"),
    ]
    edges = [(1.11, True), (2.05, False), (2.7, True), (3.11, False)]
    check = gating_timing(t, x, t, x, WINDOW, decisions, edges, beam_delay_s=0.0)
    interlock = check.edges[1:3]
    assert [e.cause for e in interlock] == ["stale_data:surface", "stale_data:surface"]
    assert [round(e.latency_s, 3) for e in interlock] == [0.05, 0.2]
    assert [e.verdict for e in interlock] == [PASS, FAIL]  # 200 ms after the decision


def test_an_xray_fault_held_at_the_next_image_passes_and_a_beam_on_during_any_fault_fails():
    # At 1 Hz an imager's fault can only show in its next image, up to a second after it
    # starts: the report called every X-ray fault of a default commissioning run CHECK.
    from motionctl.report import fault_verdict

    def fault(device, kind, latency, edges=0, on=True):
        return {
            "device": device,
            "kind": kind,
            "beam_on_at_start": on,
            "hold_latency_ms": latency,
            "beam_on_edges_during": edges,
        }

    assert fault_verdict(fault("surface", "freeze", 40.0), 1.0) == ("HELD ≤ 100 ms", "pass")
    assert fault_verdict(fault("surface", "freeze", 140.0), 1.0)[1] == "fail"
    assert fault_verdict(fault("xray", "nan", 960.0), 1.0) == ("HELD at the next image", "pass")
    assert fault_verdict(fault("xray", "nan", 960.0), 8.0)[1] == "fail"  # 8 Hz: 225 ms
    assert fault_verdict(fault("xray", "reorder", 1997.0), 1.0)[1] == "pass"  # two images
    assert fault_verdict(fault("xray", "jump", 1300.0), 1.0)[1] == "fail"
    assert fault_verdict(fault("xray", "nan", 500.0, edges=1), 1.0)[1] == "fail"
    assert fault_verdict(fault("xray", "freeze", None), 1.0)[1] == "fail"
    assert fault_verdict(fault("xray", "nan", 0.0, on=False), 1.0)[1] == "na"
    assert fault_verdict(fault("xray", "nan", 960.0), None)[1] == "fail"  # rate unknown
