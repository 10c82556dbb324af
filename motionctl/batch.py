"""Batch QA: verify, replay and report every session log of a folder, in parallel.

``run_batch(in_dir, out_dir)`` takes every session log directly in ``in_dir`` (sorted by
name): each ``*.sqlite`` file, and any other file that begins with the SQLite header (a log
saved as ``.db``); the other files are listed in ``skipped``, never silently passed over. For
each one it verifies its hash chain, replays it and writes its QA report
``out_dir/<name>.html`` (``motionctl.report``), then writes ``out_dir/summary.csv``: one row
per log (file, verified, duration_s, duty_cycle, residual_p95_mm, decisions_compared,
divergences, holds, tg142, status, error, then what_if, residual_mean_mm, tg142_edges,
tg142_failures, holds_by_reason, report). A log that cannot be read, fails verification
(without ``force``) or breaks the replay is a row with ``status = failed`` and its reason in
``error``; it never stops the batch. Rows are in file-name order whatever the completion
order, and hold nothing that depends on the machine or the timing, so a local and a cluster
run give the same rows.

Where the work runs
-------------------
- Default: local cores, ``concurrent.futures.ProcessPoolExecutor`` with ``workers``
  processes (default: the CPU count, at most the number of logs). Processes, because the
  replay is pure-Python CPU work (threads would share one GIL); the stdlib pool, not Dask's
  local scheduler, because it adds no scheduler start-up or dependency to the common case
  and its failure modes are plain exceptions. Workers come from a ``forkserver`` (Linux)
  that preloads numpy, matplotlib and motionctl once, so a worker starts in milliseconds
  and without forking a possibly multi-threaded caller; elsewhere ``spawn``.
- ``scheduler="tcp://HOST:PORT"`` (any address ``distributed.Client`` accepts): the same
  work on an existing Dask distributed cluster. The client reads each log and sends its
  bytes (``Client.scatter``); a worker writes them to a private temporary file, reviews it
  and sends the HTML back, which the client writes. So the workers need motionctl (same
  version) installed but no access to the client's disk. At most ``workers`` logs (default:
  twice the cluster's threads) are in flight at once, bounding the memory used for logs.
  An unreachable scheduler raises (OSError / TimeoutError): that is not a per-log failure.

Outputs are written by this process only (reports as each log finishes, the summary at the
end, each through a temporary file and a rename).
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from motionctl.report import ROW_FIELDS, SessionReport

__all__ = ["SUMMARY_FIELDS", "BatchSummary", "run_batch"]

SUMMARY_FIELDS = (*ROW_FIELDS, "report")
PRELOAD = [
    "numpy",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "motionctl.report",
    "motionctl.replay",
]


@dataclass
class BatchSummary:
    in_dir: Path
    out_dir: Path
    summary_csv: Path
    rows: list[dict[str, Any]]
    mode: str  # "processes" or "dask"
    workers: int
    scheduler: str | None = None
    wall_s: float = 0.0
    reports: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files in in_dir that are not logs

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def exit_status(self) -> int:
        """2: a log could not be reviewed; 1: a TG-142 failure, a replay divergence or an
        unverified log; 0 otherwise (as ``motionctl qa`` for one report)."""
        if self.failed:
            return 2
        if any(
            row["tg142"] == "FAIL" or row["divergences"] or not row["verified"] for row in self.rows
        ):
            return 1
        return 0

    @property
    def logs_per_s(self) -> float:
        return len(self.rows) / self.wall_s if self.wall_s > 0 else float("inf")


SQLITE_HEADER = b"SQLite format 3\x00"
# SQLite's own companions of a database (write-ahead log, shared memory, rollback journal).
_COMPANIONS = ("-wal", "-shm", "-journal")


def _session_logs(in_dir: Path) -> tuple[list[Path], list[str]]:
    """(the logs to review, the names of the other files): a log is a ``*.sqlite`` file
    (even a damaged one: it is reviewed and its failure reported) or any file that begins
    with the SQLite header. Hidden files and SQLite's companions are neither."""
    logs, skipped = [], []
    for path in sorted(in_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.endswith(_COMPANIONS):
            continue
        if path.suffix == ".sqlite":
            logs.append(path)
            continue
        try:
            with path.open("rb") as fh:
                is_sqlite = fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER
        except OSError:
            is_sqlite = False
        if is_sqlite:
            logs.append(path)
        else:
            skipped.append(path.name)
    return logs, skipped


def run_batch(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    force: bool = False,
    beam_delay_s: float | None = None,
) -> BatchSummary:
    """Review every session log in ``in_dir`` into ``out_dir``; see the module
    docstring. ``force`` and ``beam_delay_s`` are passed to each report."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: not a folder")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    logs, skipped = _session_logs(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    if scheduler:
        results, n_workers = _run_dask(logs, scheduler, workers, force, beam_delay_s, out_dir)
        mode = "dask"
    else:
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(logs) or 1))
        results = _run_local(logs, n_workers, force, beam_delay_s, out_dir)
        mode = "processes"
    rows = [results[p.name] for p in logs]
    summary_csv = out_dir / "summary.csv"
    _write_csv(summary_csv, rows)
    return BatchSummary(
        in_dir=in_dir,
        out_dir=out_dir,
        summary_csv=summary_csv,
        rows=rows,
        mode=mode,
        workers=n_workers,
        scheduler=scheduler,
        wall_s=time.perf_counter() - wall0,
        reports=[out_dir / row["report"] for row in rows if row["report"]],
        skipped=skipped,
    )


# -- the work of one log (top level: picklable) ------------------------------------------------
def review_path(path: str, force: bool, beam_delay_s: float | None) -> tuple[dict[str, Any], str]:
    from motionctl.report import report_from_path

    session, text = report_from_path(path, force=force, beam_delay_s=beam_delay_s)
    return session.row(), text


def review_bytes(
    name: str, data: bytes, force: bool, beam_delay_s: float | None
) -> tuple[dict[str, Any], str]:
    from motionctl.report import report_from_bytes

    session, text = report_from_bytes(name, data, force=force, beam_delay_s=beam_delay_s)
    return session.row(), text


# -- local processes ---------------------------------------------------------------------------
def _context():
    if sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _run_local(
    logs: list[Path], workers: int, force: bool, beam_delay_s: float | None, out_dir: Path
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    if not logs:
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        futures: dict[Future, Path] = {
            pool.submit(review_path, str(p), force, beam_delay_s): p for p in logs
        }
        for future in as_completed(futures):
            path = futures[future]
            results[path.name] = _collect(path.name, future, out_dir)
    return results


def _collect(name: str, future, out_dir: Path) -> dict[str, Any]:
    try:
        row, text = future.result()
    except BrokenProcessPool as exc:
        return _failed_row(name, f"the worker process died: {exc}")
    except Exception as exc:  # noqa: BLE001 - reported per log, the batch goes on
        return _failed_row(name, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return _finish(name, row, text, out_dir)


def _finish(name: str, row: dict[str, Any], text: str, out_dir: Path) -> dict[str, Any]:
    # a.sqlite -> a.html; any other name keeps its suffix (a.db -> a.db.html: no clash)
    stem = Path(name).stem if name.endswith(".sqlite") else name
    report = out_dir / f"{stem}.html"
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, report)
    return row | {"report": report.name}


def _failed_row(name: str, error: str) -> dict[str, Any]:
    row = SessionReport(log=name, name=name, status="failed", error=error).row()
    return row | {"report": ""}


# -- Dask distributed -----------------------------------------------------------------------
def _run_dask(
    logs: list[Path],
    scheduler: str,
    workers: int | None,
    force: bool,
    beam_delay_s: float | None,
    out_dir: Path,
) -> tuple[dict[str, dict[str, Any]], int]:
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "a Dask scheduler was given but dask.distributed is not installed "
            "(pip install 'dask[distributed]')"
        ) from exc
    results: dict[str, dict[str, Any]] = {}
    with Client(scheduler, timeout="10s") as client:
        threads = sum(client.nthreads().values()) or 1
        limit = workers or 2 * threads
        pending = _submit_stream(client, logs, force, beam_delay_s)
        running = dask_completed()
        names: dict[str, str] = {}
        for future, name in _take(pending, limit):
            running.add(future)
            names[future.key] = name
        for future in running:
            name = names.pop(future.key)
            results[name] = _collect(name, future, out_dir)
            future.release()
            for nxt, nxt_name in _take(pending, 1):
                running.add(nxt)
                names[nxt.key] = nxt_name
    return results, threads


def _submit_stream(client, logs: list[Path], force: bool, beam_delay_s: float | None):
    for path in logs:
        try:
            data = path.read_bytes()
        except OSError as exc:
            future = client.submit(_raise, f"cannot read {path}: {exc}", pure=False)
            yield future, path.name
            continue
        remote = client.scatter(data, hash=False)
        future = client.submit(review_bytes, path.name, remote, force, beam_delay_s, pure=False)
        yield future, path.name


def _take(iterator: Iterator, n: int) -> list:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) >= n:
            break
    return out


def _raise(message: str) -> None:
    raise OSError(message)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in SUMMARY_FIELDS})
    os.replace(tmp, path)
