"""The session log's hash chain: every committed batch is chained, and verify() finds an
edited, deleted, inserted or reordered row, an edited config, and a truncated or foreign file."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from motionctl import integrity
from motionctl.config import load_config
from motionctl.integrity import verify
from motionctl.sessionlog import LogFormatError, SessionLogWriter


def _wait_committed(writer: SessionLogWriter, rows: int) -> None:
    """Until the writer thread has committed ``rows`` rows (so the next ones form a new batch)."""
    tick = threading.Event()
    for _ in range(2000):
        if writer.rows_written >= rows:
            return
        tick.wait(0.005)
    raise AssertionError(f"the writer committed {writer.rows_written} of {rows} rows")


def _write_log(path, chunks: int = 5, per_chunk: int = 40) -> None:
    """A log of several batches, with the values SQLite converts (NaN, -0.0, ints in REAL
    columns), NULLs, and non-ASCII text."""
    writer = SessionLogWriter(path, load_config(), t0=0.0, commit_interval_s=0.01)
    writer.device("surface", "igtl_tracker", "127.0.0.1:1")
    added = 0
    for c in range(chunks):
        for i in range(per_chunk):
            k = c * per_chunk + i
            t = k / 30.0
            x = math.nan if k % 17 == 0 else -0.0 if k % 13 == 0 else 0.1 * k
            writer.add("samples", ("surface", k, t, 1.7e9 + t, x, 2, 3.25 + k))
            writer.add("decisions", (t + 1e-4, k % 2, "" if k % 2 else "outside_window", 1e-4))
            added += 2
        writer.add("events", (t, "operator", "window", '{"who": "Zoë", "value": [-2.0, 4.0]}'))
        writer.add("decisions", (t + 2e-4, 0, "operator_hold", None))
        added += 2
        _wait_committed(writer, added)
    writer.close()


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "s.sqlite"
    _write_log(path)
    return path


def _alter(path, *statements: str, params=()) -> None:
    db = sqlite3.connect(path)
    for sql in statements:
        db.execute(sql, params)
    db.commit()
    db.close()


def _batch_of(path, n: int) -> int:
    db = sqlite3.connect(path)
    (batch,) = db.execute(
        "SELECT batch FROM chain WHERE n_first <= ? AND ? <= n_last", (n, n)
    ).fetchone()
    db.close()
    return batch


def _n_of(path, table: str, rowid: int) -> int:
    db = sqlite3.connect(path)
    (n,) = db.execute(f"SELECT n FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
    db.close()
    return n


def test_a_fresh_log_verifies_and_every_row_is_chained(log):
    result = verify(log)
    assert result.ok, result.reason
    assert result.rows == 5 * (2 * 40 + 2)
    assert result.batches >= 5  # header batches + at least one per chunk
    assert result.closed and result.uncovered_rows == 0
    assert len(result.digest) == 64
    db = sqlite3.connect(log)
    chained = db.execute("SELECT SUM(rows), MIN(n_first), MAX(n_last) FROM chain").fetchone()
    assert chained == (result.rows, 0, result.rows - 1)
    # batch 0 covers meta and config; the device registration has a header batch of its own
    headers = db.execute("SELECT batch FROM chain WHERE header IS NOT NULL").fetchall()
    assert headers[0] == (0,) and len(headers) >= 3  # creation, device, close


def test_the_encoding_is_exact_and_typed():
    # equal floats encode equally; 1 and 1.0 and "1" do not; NULL is not NaN is not 0
    enc = integrity.encode_table
    assert enc("t", [(0.1 + 0.2,)]) == enc("t", [(0.30000000000000004,)])
    assert enc("t", [(0.1 + 0.2,)]) != enc("t", [(0.3,)])
    assert len({enc("t", [(v,)]) for v in (1, 1.0, "1", None, b"1")}) == 5
    assert enc("t", [(1.0, None)]) != enc("t", [(None, 1.0)])
    assert enc("a", [("bc",)]) != enc("ab", [("c",)])
    assert enc("t", [("ab", "c")]) != enc("t", [("a", "bc")])


def test_an_edited_row_is_found_with_its_batch(log):
    n = _n_of(log, "samples", 101)
    _alter(log, "UPDATE samples SET ap_mm = ap_mm + 0.001 WHERE rowid = 101")
    result = verify(log)
    assert not result.ok
    assert result.first_bad_batch == _batch_of(log, n)
    assert result.bad_batches == 1
    assert f"batch {result.first_bad_batch} " in result.reason and "edited" in result.reason


def test_a_deleted_row_is_found(log):
    n = _n_of(log, "decisions", 50)
    _alter(log, "DELETE FROM decisions WHERE rowid = 50")
    result = verify(log)
    assert not result.ok and result.first_bad_batch == _batch_of(log, n)
    assert f"row n={n} is missing (deleted)" in result.reason


def test_an_inserted_row_is_found(log):
    # a copy of an event placed among the chained rows (its n taken by a sample)
    n = _n_of(log, "samples", 60)
    _alter(log, "INSERT INTO events SELECT t, source, kind, detail, ? FROM events", params=(n,))
    result = verify(log)
    assert not result.ok and result.first_bad_batch == _batch_of(log, n)
    assert f"two rows with n={n}" in result.reason and "inserted" in result.reason


def test_a_row_after_the_chain_is_an_uncovered_tail(log):
    _alter(log, "INSERT INTO decisions VALUES (99.0, 1, '', 0.0001, 100000)")
    result = verify(log)
    assert not result.ok and result.uncovered_rows == 1
    assert "not covered by the chain, from n=100000 (table decisions)" in result.reason


def test_reordered_rows_are_found(log):
    # two samples exchange their places in the session's order
    a, b = _n_of(log, "samples", 10), _n_of(log, "samples", 110)
    db = sqlite3.connect(log)
    db.execute("UPDATE samples SET n = ? WHERE rowid = 10", (b,))
    db.execute("UPDATE samples SET n = ? WHERE rowid = 110", (a,))
    db.commit()
    db.close()
    result = verify(log)
    assert not result.ok
    assert result.first_bad_batch == _batch_of(log, a)
    assert "reordered" in result.reason
    assert "table samples: row 11" in result.reason  # storage order disagrees with n


def test_edited_config_is_found(log):
    _alter(
        log, "UPDATE config SET json = replace(json, '\"window_mm\": 5.0', '\"window_mm\": 6.0')"
    )
    result = verify(log)
    assert not result.ok
    assert "meta, config or devices differ" in result.reason


def test_edited_meta_or_devices_are_found(log, tmp_path):
    other = tmp_path / "other.sqlite"
    shutil.copy(log, other)
    _alter(log, "UPDATE meta SET value = '2020-01-01' WHERE key = 'started_utc'")
    assert "meta, config or devices differ" in verify(log).reason
    _alter(other, "UPDATE devices SET address = '10.0.0.9:1'")
    assert not verify(other).ok


def test_a_removed_chain_row_is_found(log):
    _alter(log, "DELETE FROM chain WHERE batch = 3")
    result = verify(log)
    assert not result.ok and "chain batch 3 is missing" in result.reason


def test_a_log_without_a_chain_does_not_verify(log):
    _alter(log, "DROP TABLE chain")
    result = verify(log)
    assert not result.ok and "no integrity chain" in result.reason


def test_a_killed_session_log_verifies_up_to_its_last_commit(tmp_path):
    path = tmp_path / "killed.sqlite"
    script = textwrap.dedent(
        f"""
        import threading
        from motionctl.sessionlog import SessionLogWriter
        w = SessionLogWriter({str(path)!r}, {{}}, t0=0.0, commit_interval_s=0.01)
        w.device("surface", "igtl_tracker", "x")
        i = 0
        tick = threading.Event()
        while True:
            w.add("samples", ("surface", i, i * 0.01, 0.0, 0.0, 0.1 * i, 0.0))
            i += 1
            if w.rows_written >= 300:
                print(w.rows_written, flush=True)
                break
            tick.wait(0.001)
        while True:  # keep writing until killed
            w.add("samples", ("surface", i, i * 0.01, 0.0, 0.0, 0.1 * i, 0.0))
            i += 1
            tick.wait(0.001)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    result = verify(path)
    assert result.ok, result.reason  # every committed row is chained: no uncovered tail
    assert result.rows >= committed
    assert not result.closed  # but the log says it was not closed normally


def test_a_truncated_file_is_refused_with_the_byte(log):
    size = log.stat().st_size
    with log.open("r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(LogFormatError, match=rf"truncated: .* reading stops at byte {size - 1000}"):
        verify(log)


def test_a_damaged_page_is_refused_naming_the_table(log):
    db = sqlite3.connect(log)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'samples'").fetchone()
    (page,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    data = bytearray(log.read_bytes())
    data[(root - 1) * page : root * page] = b"\xff" * page
    log.write_bytes(bytes(data))
    with pytest.raises(LogFormatError, match=r"table samples: database disk image is malformed"):
        verify(log)


def test_a_text_file_is_refused_at_byte_0(tmp_path):
    text = tmp_path / "notes.csv"
    text.write_text("t,value\n0.0,1.0\n")
    with pytest.raises(LogFormatError, match=r"not an SQLite file.*a text file.*byte 0 \(line 1\)"):
        verify(text)
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(LogFormatError, match="empty file"):
        verify(empty)
