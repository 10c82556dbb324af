"""The session log: schema, summary, CSV export, write failure, and survival of SIGKILL."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from motionctl.config import load_config
from motionctl.sessionlog import LogFormatError, SessionLogWriter, export_csv, summarize


def _write_session(path):
    writer = SessionLogWriter(path, load_config(), t0=100.0, commit_interval_s=0.01)
    writer.device("surface", "igtl_tracker", "127.0.0.1:1")
    for i in range(10):
        writer.add("samples", ("surface", i, 0.1 * i, 1e9 + 0.1 * i, 0.0, 0.0, float(i)))
    # beam on from 0.2 s to 0.6 s; held outside the window 0.6-0.8 s; stale from 0.8 s
    decisions = [
        (0.0, 0, "operator_not_enabled"),
        (0.2, 1, ""),
        (0.6, 0, "outside_window"),
        (0.7, 0, "outside_window"),
        (0.8, 0, "stale_data:surface"),
        (0.9, 0, "outside_window,stale_data:surface"),
    ]
    for t, on, reasons in decisions:
        writer.add("decisions", (t, on, reasons, 0.0005))
    writer.add("events", (0.9, "surface", "disconnected", "connection closed by peer"))
    writer.close()


def test_summary_counts_samples_beam_time_and_hold_episodes(tmp_path):
    path = tmp_path / "s.sqlite"
    _write_session(path)
    summary = summarize(path)
    assert summary["samples"] == {"surface": 10}
    assert summary["duration_s"] == pytest.approx(0.9)
    assert summary["beam_on_s"] == pytest.approx(0.4)
    holds = summary["holds_by_reason"]
    assert holds["outside_window"] == {"count": 2, "seconds": pytest.approx(0.2)}
    assert holds["stale_data:surface"] == {"count": 1, "seconds": pytest.approx(0.1)}
    assert holds["operator_not_enabled"]["count"] == 1
    assert summary["events"] == {"disconnected": 1}
    db = sqlite3.connect(path)  # readable with any SQLite tool
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
    assert '"gating"' in db.execute("SELECT json FROM config").fetchone()[0]


def test_export_writes_a_csv_per_table(tmp_path):
    path = tmp_path / "s.sqlite"
    _write_session(path)
    files = {p.name: p for p in export_csv(path, tmp_path / "csv")}
    assert {"samples.csv", "decisions.csv", "events.csv", "config.csv"} <= set(files)
    rows = list(csv.reader(files["samples.csv"].open()))
    assert rows[0] == ["device", "seq", "t", "t_device", "lr_mm", "si_mm", "ap_mm", "n"]
    assert len(rows) == 11 and rows[10][1] == "9"


def test_a_log_is_never_overwritten(tmp_path):
    path = tmp_path / "s.sqlite"
    _write_session(path)
    with pytest.raises(FileExistsError):
        SessionLogWriter(path, {}, t0=0.0)


def test_foreign_files_are_refused_with_the_reason(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(LogFormatError, match="not an SQLite file"):
        summarize(text)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(LogFormatError, match="not a motionctl session log"):
        summarize(other)


def test_write_failure_is_reported_not_swallowed(tmp_path):
    failures = []
    writer = SessionLogWriter(tmp_path / "s.sqlite", {}, t0=0.0, on_failure=failures.append)
    writer.add("samples", ("surface", 1))  # wrong arity: the insert fails
    writer.close()
    assert writer.failed is not None and failures == [writer.failed]


def test_sigkill_leaves_a_readable_log_up_to_the_last_commit(tmp_path):
    path = tmp_path / "killed.sqlite"
    script = textwrap.dedent(
        f"""
        import sys, threading
        from motionctl.sessionlog import SessionLogWriter
        w = SessionLogWriter({str(path)!r}, {{}}, t0=0.0, commit_interval_s=0.01)
        i = 0
        tick = threading.Event()
        while True:
            w.add("samples", ("surface", i, i * 0.01, 0.0, 0.0, 0.0, 0.0))
            i += 1
            if w.rows_written >= 200:
                print(w.rows_written, flush=True)
                break
            tick.wait(0.001)
        tick.wait(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = int(proc.stdout.readline())  # the writer has committed at least this many
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    summary = summarize(path)
    assert summary["samples"]["surface"] >= committed
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    seqs = [r[0] for r in db.execute("SELECT seq FROM samples ORDER BY rowid")]
    assert seqs == list(range(len(seqs)))  # a prefix: nothing committed is lost or reordered
