"""The session log: one SQLite file per session, written while the session runs.

Every sample, estimate, gate decision, beam acknowledgement, event and the full config are
recorded. Rows are queued by the controller thread and committed by a writer thread in
batches at least every ``commit_interval_s`` (WAL mode), so the decision path never waits
on the disk and a process killed with SIGKILL leaves a readable log up to the last commit.
A log is never edited in place. Times ``t`` are seconds since the session start on the
controller's monotonic clock; ``t_device`` is the device's own timestamp as sent.

The schema is versioned (``meta.schema_version``) and readable with any SQLite tool.

Tamper evidence: each commit also writes, in the same transaction, one row of the ``chain``
table: a SHA-256 over the previous digest and every row of the batch (``integrity``
describes the encoding); the header (meta, config, devices) is chained too. ``verify``
recomputes the chain. ``meta.closed_utc`` is set when the writer closes the log normally.
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from motionctl import __version__, integrity

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE config (json TEXT NOT NULL);
CREATE TABLE devices (name TEXT PRIMARY KEY, kind TEXT NOT NULL, address TEXT NOT NULL);
CREATE TABLE samples (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t REAL NOT NULL, t_device REAL NOT NULL,
    lr_mm REAL, si_mm REAL, ap_mm REAL, n INTEGER NOT NULL);
CREATE TABLE spirometer_samples (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t REAL NOT NULL, t_device REAL NOT NULL,
    volume_l REAL, flow_l_s REAL, valve_closed INTEGER, feedback_level_l REAL,
    n INTEGER NOT NULL);
CREATE TABLE fiducials (
    device TEXT NOT NULL, frame_id INTEGER NOT NULL, t REAL NOT NULL, t_acq REAL NOT NULL,
    mode TEXT NOT NULL, accepted INTEGER NOT NULL, reason TEXT NOT NULL,
    lr_mm REAL, si_mm REAL, ap_mm REAL, rot_lr_deg REAL, rot_si_deg REAL, rot_ap_deg REAL,
    n_seeds INTEGER NOT NULL, residual_mm REAL, uncertainty_mm REAL, n INTEGER NOT NULL);
CREATE TABLE estimates (
    t REAL NOT NULL, lr_mm REAL, si_mm REAL, ap_mm REAL,
    pred_lr_mm REAL, pred_si_mm REAL, pred_ap_mm REAL, horizon_s REAL NOT NULL,
    valid INTEGER NOT NULL, reasons TEXT NOT NULL, phase REAL, amplitude_mm REAL,
    uncertainty_mm REAL, model TEXT NOT NULL, surrogate_mm REAL, n INTEGER NOT NULL);
CREATE TABLE decisions (
    t REAL NOT NULL, beam_enabled INTEGER NOT NULL, reasons TEXT NOT NULL, latency_s REAL,
    n INTEGER NOT NULL);
CREATE TABLE events (
    t REAL NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT, n INTEGER NOT NULL);
CREATE TABLE beam_acks (
    seq INTEGER NOT NULL, command TEXT NOT NULL, t_sent REAL NOT NULL, t_ack REAL NOT NULL,
    beam_on INTEGER NOT NULL, n INTEGER NOT NULL);
CREATE TABLE beam_edges (
    t REAL NOT NULL, beam_on INTEGER NOT NULL, source TEXT NOT NULL, n INTEGER NOT NULL);
CREATE TABLE chain (
    batch INTEGER PRIMARY KEY, n_first INTEGER, n_last INTEGER, rows INTEGER NOT NULL,
    header TEXT, digest TEXT NOT NULL);
"""

TABLES = (
    "samples",
    "spirometer_samples",
    "fiducials",
    "estimates",
    "decisions",
    "events",
    "beam_acks",
    "beam_edges",
)
_INSERT = {
    "samples": "INSERT INTO samples VALUES (?,?,?,?,?,?,?,?)",
    "spirometer_samples": "INSERT INTO spirometer_samples VALUES (?,?,?,?,?,?,?,?,?)",
    "fiducials": "INSERT INTO fiducials VALUES (" + ",".join("?" * 17) + ")",
    "estimates": "INSERT INTO estimates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "decisions": "INSERT INTO decisions VALUES (?,?,?,?,?)",
    "events": "INSERT INTO events VALUES (?,?,?,?,?)",
    "beam_acks": "INSERT INTO beam_acks VALUES (?,?,?,?,?,?)",
    "beam_edges": "INSERT INTO beam_edges VALUES (?,?,?,?)",
}

log = logging.getLogger("motionctl.sessionlog")


class LogFormatError(ValueError):
    """A file that is not a readable motionctl session log."""


class SessionLogWriter:
    """Queues rows from the controller thread; a writer thread commits them in batches."""

    def __init__(
        self,
        path: str | Path,
        config: dict[str, Any],
        *,
        t0: float,
        commit_interval_s: float = 0.05,
        on_failure: Callable[[str], None] | None = None,
    ):
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"session log {self.path} exists; a log is never overwritten")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = t0
        self._interval = commit_interval_s
        self.on_failure = on_failure
        self._pending: dict[str, list[tuple]] = {name: [] for name in TABLES}
        self._n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failed: str | None = None
        self.rows_written = 0
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed batch survives a process kill; only a power loss
        # can lose the last batches, never corrupt the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("BEGIN")
        for statement in SCHEMA.strip().split(";"):
            if statement.strip():
                self._db.execute(statement)
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "motionctl_version": __version__,
            "started_utc": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "t0_monotonic": repr(t0),
            # The wall-clock time of t0, so device timestamps (wall clock) can be placed on
            # the session's time axis when device and controller share a machine clock.
            "t0_wall": repr(time.time() - (time.monotonic() - t0)),
            "integrity": integrity.SCHEME,
        }
        self._db.executemany("INSERT INTO meta VALUES (?,?)", meta.items())
        self._db.execute("INSERT INTO config VALUES (?)", (json.dumps(config, sort_keys=True),))
        # The hash chain: batch 0 covers meta and config (see motionctl.integrity).
        # (next batch, last digest, last header digest, last rowid chained per table)
        self._chain = (0, integrity.GENESIS, None, {name: 0 for name in TABLES})
        self._chain = self._chain_locked({}, header=True)
        self._db.execute("COMMIT")
        self._thread = threading.Thread(target=self._run, name="session-log-writer")
        self._thread.start()

    # -- called from the controller thread -------------------------------------------------
    def add(self, table: str, row: tuple) -> None:
        """Queue a row; the log appends ``n``, the row's place in the session's one order
        across all tables (replay merges the tables by it)."""
        with self._lock:
            self._pending[table].append((*row, self._n))
            self._n += 1

    def device(self, name: str, kind: str, address: str) -> None:
        self._execute_now("INSERT OR REPLACE INTO devices VALUES (?,?,?)", (name, kind, address))

    def set_meta(self, key: str, value: str) -> None:
        self._execute_now("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def close(self) -> None:
        """Commit everything queued, stop the writer thread and close the file; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._commit()
        if self.failed is None:
            try:  # marks a log that ended normally (a killed session's log has no mark)
                self.set_meta("closed_utc", datetime.now(UTC).isoformat(timespec="milliseconds"))
            except sqlite3.Error as exc:
                log.error("session log: could not mark the log closed: %s", exc)
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            # Closed for good: back to a single self-contained file (no -wal/-shm beside
            # it), which a reader opening it read-only does not bring back.
            self._db.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.OperationalError as exc:  # another reader has it open: stays WAL
            log.info("session log stays in WAL mode: %s", exc)
        self._db.close()

    # -- writer thread ---------------------------------------------------------------------
    def _execute_now(self, sql: str, params: tuple) -> None:
        """A header change (meta, devices), committed at once with its own chain row."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(sql, params)
                chain = self._chain_locked({}, header=True)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._chain = chain

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._commit()

    def _commit(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {name: [] for name in TABLES}
        if self.failed is not None:
            return
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    for table, rows in batch.items():
                        if rows:
                            self._db.executemany(_INSERT[table], rows)
                    chain = self._chain_locked(batch, header=False)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._chain = chain
            self.rows_written += sum(len(rows) for rows in batch.values())
        except sqlite3.Error as exc:
            # The record is part of the treatment: losing it holds the beam (via on_failure).
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error("session log write failed: %s", self.failed)
            if self.on_failure is not None:
                self.on_failure(self.failed)

    def _chain_locked(
        self, batch: dict[str, list[tuple]], header: bool
    ) -> tuple[int, str, str | None, dict[str, int]]:
        """Inside the open transaction: the chain row for ``batch`` (rows just inserted) and,
        if ``header``, for the header as it is now. Returns the chain state to keep once
        the transaction has committed (the current one if there is nothing to chain)."""
        number, previous, last_header, last_rowid = self._chain
        new_header = integrity.header_digest(self._db) if header else None
        if new_header == last_header:
            new_header = None
        # Read the rows back as SQLite stores them: that is what a verifier will read.
        parts: list[bytes] = []
        rowids = dict(last_rowid)
        count, n_first, n_last = 0, None, None
        for table, queued in batch.items():  # in TABLES order
            if queued:
                stored = self._db.execute(
                    f"SELECT * FROM {table} WHERE rowid > ? ORDER BY rowid",  # noqa: S608
                    (rowids[table],),
                ).fetchall()
                (rowids[table],) = self._db.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()
                parts.append(integrity.encode_table(table, stored))
                count += len(stored)
                first, last = stored[0][-1], stored[-1][-1]
                n_first = first if n_first is None else min(n_first, first)
                n_last = last if n_last is None else max(n_last, last)
        if not count and new_header is None:
            return self._chain
        digest = integrity.batch_digest(previous, new_header, b"".join(parts))
        self._db.execute(
            "INSERT INTO chain VALUES (?,?,?,?,?,?)",
            (number, n_first, n_last, count, new_header, digest),
        )
        return (number + 1, digest, new_header or last_header, rowids)


def verify(path: str | Path) -> integrity.VerifyResult:
    """Recompute a log's hash chain (``motionctl.integrity.verify``)."""
    return integrity.verify(path)


def open_log(path: str | Path) -> sqlite3.Connection:
    """Open a session log read-only; raises LogFormatError if it is not one we can read."""
    path = Path(path)
    if not path.is_file():
        raise LogFormatError(f"{path}: no such file")
    with path.open("rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise LogFormatError(f"{path}: not an SQLite file (byte 0: wrong header)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise LogFormatError(f"{path}: not a motionctl session log ({exc})") from exc
    if row is None or int(row[0]) > SCHEMA_VERSION:
        db.close()
        raise LogFormatError(f"{path}: unsupported schema version {row and row[0]}")
    return db


def summarize(path: str | Path) -> dict[str, Any]:
    """Duration, devices, sample counts, beam-on time and holds by reason of a session log."""
    db = open_log(path)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        devices = {
            name: {"kind": kind, "address": address}
            for name, kind, address in db.execute("SELECT name, kind, address FROM devices")
        }
        samples = dict(db.execute("SELECT device, COUNT(*) FROM samples GROUP BY device"))
        samples |= dict(
            db.execute("SELECT device, COUNT(*) FROM spirometer_samples GROUP BY device")
        )
        times = [
            row[0]
            for row in db.execute(
                "SELECT MAX(t) FROM (SELECT MAX(t) AS t FROM samples UNION ALL "
                "SELECT MAX(t) FROM decisions UNION ALL SELECT MAX(t) FROM events)"
            )
        ]
        decisions = db.execute("SELECT t, beam_enabled, reasons FROM decisions ORDER BY rowid")
        beam_on_s, holds = _beam_time_and_holds(decisions.fetchall(), end_t=times[0])
        events = db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall()
    finally:
        db.close()
    return {
        "log": str(path),
        "schema_version": int(meta["schema_version"]),
        "started_utc": meta.get("started_utc"),
        "duration_s": round(times[0] or 0.0, 3),
        "devices": devices,
        "samples": samples,
        "beam_on_s": round(beam_on_s, 3),
        "holds_by_reason": holds,
        "events": dict(events),
    }


def _beam_time_and_holds(
    decisions: list[tuple[float, int, str]], end_t: float | None
) -> tuple[float, dict[str, dict[str, float]]]:
    """Beam-on seconds, and per hold reason its episodes and seconds.

    Each decision holds until the next one (the last until the end of the log). An episode
    of a reason is a run of consecutive decisions that carry it.
    """
    beam_on_s = 0.0
    holds: dict[str, dict[str, float]] = {}
    active: frozenset[str] = frozenset()
    # A session has few distinct reason texts and an hour has ~10^5 decisions: each text
    # is split once.
    split: dict[str, frozenset[str]] = {}
    n = len(decisions)
    for i, (t, enabled, reasons) in enumerate(decisions):
        t_next = decisions[i + 1][0] if i + 1 < n else (end_t or t)
        span = max(0.0, t_next - t)
        if enabled:
            beam_on_s += span
        current = split.get(reasons)
        if current is None:
            current = split[reasons] = frozenset(reasons.split(",") if reasons else ())
        for reason in current:
            entry = holds.get(reason)
            if entry is None:
                entry = holds[reason] = {"count": 0, "seconds": 0.0}
            if reason not in active:
                entry["count"] += 1
            entry["seconds"] += span
        active = current
    for entry in holds.values():
        entry["seconds"] = round(entry["seconds"], 3)
    return beam_on_s, dict(sorted(holds.items()))


def export_csv(path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write one CSV per table (with a header row) into ``out_dir``; returns the files."""
    db = open_log(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in names:
            cursor = db.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from the schema
            target = out / f"{table}.csv"
            with target.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow([col[0] for col in cursor.description])
                writer.writerows(cursor)
            written.append(target)
    finally:
        db.close()
    return written
