"""Tamper evidence for session logs: a SHA-256 hash chain over every committed batch.

The session log writer commits rows in batches. With each batch it writes, in the same
transaction, one row of the ``chain`` table::

    chain(batch INTEGER PRIMARY KEY, n_first, n_last, rows, header, digest)

``digest = SHA-256(previous digest "\n" header "\n" encoded rows)``, where

- the previous digest is the lowercase hex of the batch before (``GENESIS``, 64 zeros, for
  batch 0);
- ``header`` is empty (NULL in the table), or the hex SHA-256 of the log's header -- the
  ``meta`` rows by key, the ``config`` row, the ``devices`` rows by name, each table encoded
  as below -- when the header changed with this batch. Batch 0 is written when the log is
  created and covers ``meta`` and ``config``; registering a device or setting a meta key
  commits a batch of its own with the new header digest;
- the encoded rows are every data row with ``n`` in ``[n_first, n_last]`` (a batch covers a
  contiguous range of ``n``), table by table in the order of ``sessionlog.TABLES``, each
  table's rows in ``n`` order, as SQLite returns them (``n`` included).

The encoding of one table's rows (``encode_table``) is columnar, typed and exact, so a
verifier in any language can reproduce it::

    utf8(table) 0x00  u32 rows  u32 columns        (all integers big-endian)
    then per column, one of
      "D"  rows x f64        every value a REAL (IEEE 754 bits: equal bytes = equal floats)
      "Q"  rows x i64        every value an INTEGER
      "S"  rows x u32 (UTF-8 byte length of each value)  then the values' UTF-8, concatenated
      "M"  per value: "N" (NULL) | "F" f64 | "I" i64 | "S" u32 len + UTF-8 | "B" u32 len + bytes

The writer encodes the rows as it reads them back from the database inside the transaction,
so what is hashed is exactly what a reader gets (SQLite's own conversions included: NaN is
stored as NULL, -0.0 as 0.0, an integer in a REAL column as a float).

The chain row is committed with its rows, so a log killed mid-session has every row covered;
a row outside every chained range is therefore an error (``uncommitted tail``, or an inserted
row). ``verify`` recomputes everything and names the first batch that does not match: an
edited, deleted, inserted or reordered row, edited config or meta, a removed chain row.

What the chain cannot do: anyone with the file can recompute a whole chain after editing it
(there is no secret). Keep ``VerifyResult.digest`` (the last digest) outside the log -- in
the treatment record, or on the QA report -- to make the log tamper-evident against that too.
Deleting whole trailing batches together with their chain rows leaves a consistent shorter
log; ``closed`` says whether the writer closed the log normally (a killed session's log is
not closed).
"""

from __future__ import annotations

import hashlib
import operator
import sqlite3
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEME = "sha256-chain-1"  # meta key "integrity"
GENESIS = "0" * 64

HEADER_QUERIES = (
    ("meta", "SELECT key, value FROM meta ORDER BY key"),
    ("config", "SELECT json FROM config ORDER BY rowid"),
    ("devices", "SELECT name, kind, address FROM devices ORDER BY name"),
)

_SQLITE_MAGIC = b"SQLite format 3\x00"
_FLOAT, _INT, _STR = {float}, {int}, {str}
_pack = struct.pack


# -- the encoding (shared by the writer and verify) ----------------------------------------
def encode_table(table: str, rows: Sequence[tuple]) -> bytes:
    """One table's rows (in ``n`` order) as the bytes the digest covers; see above."""
    if not rows:
        return table.encode("utf-8") + b"\x00" + _pack(">II", 0, 0)
    count = len(rows)
    out = [table.encode("utf-8"), b"\x00", _pack(">II", count, len(rows[0]))]
    for column in zip(*rows, strict=True):
        types = set(map(type, column))
        if types == _FLOAT:
            out += (b"D", _pack(f">{count}d", *column))
        elif types == _INT:
            out += (b"Q", _pack(f">{count}q", *column))
        elif types == _STR:
            joined = "".join(column)
            if joined.isascii():
                lengths: Iterable[int] = map(len, column)
            else:
                lengths = [len(v.encode("utf-8")) for v in column]
            out += (b"S", _pack(f">{count}I", *lengths), joined.encode("utf-8"))
        else:
            out.append(b"M")
            out.extend(map(_encode_value, column))
    return b"".join(out)


def _encode_value(value: Any) -> bytes:
    if value is None:
        return b"N"
    if type(value) is float:
        return b"F" + _pack(">d", value)
    if type(value) is int:
        return b"I" + _pack(">q", value)
    if type(value) is str:
        data = value.encode("utf-8")
        return b"S" + _pack(">I", len(data)) + data
    data = bytes(value)
    return b"B" + _pack(">I", len(data)) + data


def batch_digest(previous: str, header: str | None, encoded_rows: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{previous}\n{header or ''}\n".encode("ascii"))
    h.update(encoded_rows)
    return h.hexdigest()


def header_digest(db: sqlite3.Connection) -> str:
    """SHA-256 of meta, config and devices as they are in ``db`` now."""
    h = hashlib.sha256()
    for table, query in HEADER_QUERIES:
        h.update(encode_table(table, db.execute(query).fetchall()))
    return h.hexdigest()


def query(db: sqlite3.Connection, table: str, sql: str, path: str | Path = "") -> list[tuple]:
    """``db.execute(sql).fetchall()``; a damaged file raises LogFormatError naming ``table``."""
    from motionctl.sessionlog import LogFormatError

    try:
        return db.execute(sql).fetchall()
    except sqlite3.DatabaseError as exc:
        raise LogFormatError(
            f"{path}: table {table}: {exc}; reading stopped there{_damage(db)}"
        ) from exc


def _damage(db: sqlite3.Connection) -> str:
    """Where SQLite's own check locates the damage (page and bytes), if it can."""
    try:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        report = db.execute("PRAGMA integrity_check(3)").fetchall()
    except sqlite3.DatabaseError:
        return ""
    lines = [ln for (text,) in report for ln in str(text).splitlines() if ln.startswith("Page ")]
    if not lines:
        return ""
    page = int(lines[0].split()[1].rstrip(":"))
    first = (page - 1) * page_size
    return f" (SQLite integrity_check: {lines[0]}; bytes {first}..{first + page_size - 1})"


# -- verification --------------------------------------------------------------------------
@dataclass
class VerifyResult:
    ok: bool
    reason: str | None
    batches: int  # chain rows read
    rows: int  # data rows read
    first_bad_batch: int | None = None
    bad_batches: int = 0  # batches whose recomputed digest differs (each checked on its own)
    uncovered_rows: int = 0  # data rows outside every chained batch
    closed: bool = False  # the writer closed the log (not killed mid-session)
    digest: str | None = None  # the last chained digest: keep it outside the log

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(path: str | Path) -> VerifyResult:
    """Recompute the hash chain of a session log. Raises LogFormatError if the file cannot
    be read as a session log at all (truncated, corrupt, foreign); returns ``ok=False``
    with the reason when it can be read but does not match its chain."""
    from motionctl.sessionlog import TABLES

    db = open_checked(path)
    try:
        tables = read_tables(db, TABLES, path)
        return verify_tables(db, tables, path)
    finally:
        db.close()


def open_checked(path: str | Path) -> sqlite3.Connection:
    """``open_log`` after checks that say where a bad file stops being readable."""
    from motionctl.sessionlog import LogFormatError, open_log

    path = Path(path)
    if path.is_file():
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(100)
        if size == 0:
            raise LogFormatError(f"{path}: empty file (0 bytes); not a session log")
        if head[:16] != _SQLITE_MAGIC:
            kind = "a text file" if _looks_like_text(head) else "binary data"
            raise LogFormatError(
                f"{path}: not an SQLite file: bytes 0..15 (the SQLite header) are "
                f"{head[:16]!r}, {kind}; reading stopped at byte 0 (line 1)"
            )
        if len(head) < 100:
            raise LogFormatError(
                f"{path}: truncated: {size} bytes, shorter than the 100-byte SQLite header; "
                f"reading stopped at byte {size}"
            )
        page_size = struct.unpack(">H", head[16:18])[0]
        page_size = 65536 if page_size == 1 else page_size
        (change_counter,) = struct.unpack(">I", head[24:28])
        (pages,) = struct.unpack(">I", head[28:32])
        (valid_for,) = struct.unpack(">I", head[92:96])
        expected = pages * page_size
        # The page count in the header is only valid when its version-valid-for number
        # matches the change counter (it always does for files SQLite >= 3.7 wrote).
        if pages and valid_for == change_counter and size < expected:
            raise LogFormatError(
                f"{path}: truncated: the SQLite header (bytes 28..31) says {pages} pages of "
                f"{page_size} bytes = {expected} bytes, the file has {size} bytes; reading "
                f"stops at byte {size} (in page {size // page_size + 1})"
            )
    return open_log(path)


def read_tables(
    db: sqlite3.Connection, tables: Sequence[str], path: str | Path = ""
) -> dict[str, list[tuple]]:
    """Every row of each data table in storage (rowid) order, as SQLite returns them."""
    from motionctl.sessionlog import LogFormatError

    out: dict[str, list[tuple]] = {}
    for table in tables:
        rows: list[tuple] = []
        try:
            cursor = db.execute(f'SELECT * FROM "{table}" ORDER BY rowid')  # noqa: S608
            while True:
                chunk = cursor.fetchmany(8192)
                if not chunk:
                    break
                rows.extend(chunk)
        except sqlite3.DatabaseError as exc:
            where = f"after row {len(rows)}"
            if rows:
                last = rows[-1]
                where += f" (n={last[-1]!r}, values {last[:4]!r})"
            raise LogFormatError(
                f"{path}: table {table}: {exc}; reading stopped {where}{_damage(db)}"
            ) from exc
        out[table] = rows
    return out


def verify_tables(
    db: sqlite3.Connection, tables: dict[str, list[tuple]], path: str | Path = ""
) -> VerifyResult:
    """Verify the chain against rows already read with ``read_tables`` (every data table,
    in ``sessionlog.TABLES`` order, each in storage order)."""
    total = sum(len(rows) for rows in tables.values())
    meta = dict(query(db, "meta", "SELECT key, value FROM meta", path))
    closed = "closed_utc" in meta
    has_chain = query(
        db, "sqlite_master", "SELECT 1 FROM sqlite_master WHERE type='table' AND name='chain'"
    )
    if not has_chain or "integrity" not in meta:
        return VerifyResult(
            False,
            "no integrity chain: the log was written without one (an older motionctl, or "
            "an import) or its chain table was removed",
            0,
            total,
            closed=closed,
        )
    if meta["integrity"] != SCHEME:
        return VerifyResult(
            False, f"unknown integrity scheme {meta['integrity']!r} (known: {SCHEME})", 0, total
        )
    chain_sql = "SELECT batch, n_first, n_last, rows, header, digest FROM chain ORDER BY batch"
    chain = query(db, "chain", chain_sql, path)
    result = VerifyResult(True, None, len(chain), total, closed=closed)
    problems: list[tuple[int | None, str]] = []  # (batch or None, why)

    def bad(batch: int | None, why: str) -> None:
        if batch is not None:
            result.bad_batches += 1
            if result.first_bad_batch is None:
                result.first_bad_batch = batch
        problems.append((batch, why))

    # Each table in n order, with its n column for slicing. Storage order must agree with
    # n: a row moved elsewhere is a reordered row.
    ordered: dict[str, tuple[list[tuple], list[int]]] = {}
    for table, rows in tables.items():
        ns = [row[-1] for row in rows]
        if not set(map(type, ns)) <= _INT:
            i = next(i for i, n in enumerate(ns) if type(n) is not int)
            problems.append((None, f"table {table}: row {i + 1} has n={ns[i]!r}, not an integer"))
            keep = [i for i, n in enumerate(ns) if type(n) is int]
            rows, ns = [rows[i] for i in keep], [ns[i] for i in keep]
        if not all(map(operator.lt, ns, ns[1:])):  # n strictly increasing (C-level loop)
            i = next(i for i, (a, b) in enumerate(zip(ns, ns[1:], strict=False)) if a >= b)
            problems.append(
                (
                    None,
                    f"table {table}: row {i + 2} (n={ns[i + 1]}) is out of n order "
                    f"after n={ns[i]} (reordered or duplicated)",
                )
            )
            order = sorted(range(len(ns)), key=ns.__getitem__)
            rows, ns = [rows[i] for i in order], [ns[i] for i in order]
        ordered[table] = (rows, ns)

    previous = GENESIS
    next_n = 0
    covered = 0
    for index, (batch, n_first, n_last, count, header, digest) in enumerate(chain):
        if batch != index:
            bad(batch, f"chain batch {index} is missing (found batch {batch} in its place)")
            break
        if count:
            if (
                type(n_first) is not int
                or type(n_last) is not int
                or n_first != next_n
                or n_last - n_first + 1 != count
            ):
                bad(
                    batch,
                    f"batch {batch}: covers n {n_first}..{n_last} ({count} rows); expected "
                    f"it to start at n {next_n} with one row per n",
                )
                previous = digest
                next_n = n_last + 1 if type(n_last) is int else next_n
                continue
            parts = []
            found = 0
            for table, (rows, ns) in ordered.items():
                i0, i1 = bisect_left(ns, n_first), bisect_right(ns, n_last)
                if i1 > i0:
                    parts.append(encode_table(table, rows[i0:i1]))
                    found += i1 - i0
            covered += found
            if found != count:
                bad(batch, _count_problem(batch, n_first, n_last, ordered))
            elif batch_digest(previous, header, b"".join(parts)) != digest:
                bad(
                    batch,
                    f"batch {batch} (n {n_first}..{n_last}, {count} rows"
                    f"{_time_span(ordered, n_first, n_last)}): the rows differ from the "
                    "chained digest (a row was edited or reordered)",
                )
            next_n = n_last + 1
        elif batch_digest(previous, header, b"") != digest:
            bad(batch, f"batch {batch} (header only): differs from its chained digest")
        previous = digest  # each batch is checked against the chain as stored
    result.digest = previous if chain else None

    if not chain:
        bad(None, "the chain table is empty")
    else:
        headers = [(c[0], c[4]) for c in chain if c[4] is not None]
        if not headers:
            bad(0, "no chained header: meta, config and devices are not covered")
        elif _header_digest_checked(db, path) != headers[-1][1]:
            bad(
                headers[-1][0],
                f"meta, config or devices differ from the state chained in batch "
                f"{headers[-1][0]} (edited after it was written)",
            )
    outside: list[tuple[int, str]] = []
    for table, (_rows, ns) in ordered.items():
        # ns is sorted by now: the rows outside [0, next_n) are at either end
        lo = bisect_left(ns, 0)
        hi = max(lo, bisect_left(ns, next_n))
        outside += [(n, table) for n in (*ns[:lo], *ns[hi:])]
    if outside:
        outside.sort()
        n, table = outside[0]
        result.uncovered_rows = len(outside)
        bad(
            None,
            f"{len(outside)} row(s) not covered by the chain, from n={n} (table {table}): "
            f"an uncommitted tail (the chain ends at n={next_n - 1}) or inserted rows",
        )
    if problems:
        result.ok = False
        batched = [p for p in problems if p[0] is not None]
        first = min(batched, key=lambda p: p[0]) if batched else problems[0]
        others = [why for p in problems if p is not first for why in (p[1],)]
        result.reason = first[1]
        if others:
            result.reason += "; also: " + "; ".join(others[:2])
            if len(others) > 2:
                result.reason += f" (and {len(others) - 2} more)"
    return result


def _header_digest_checked(db: sqlite3.Connection, path: str | Path) -> str:
    for table, sql in HEADER_QUERIES:
        query(db, table, sql, path)  # names the damaged table, if one is
    return header_digest(db)


def _count_problem(batch: int, n_first: int, n_last: int, ordered) -> str:
    seen: dict[int, list[str]] = {}
    for table, (_rows, ns) in ordered.items():
        for n in ns[bisect_left(ns, n_first) : bisect_right(ns, n_last)]:
            seen.setdefault(n, []).append(table)
    missing = [n for n in range(n_first, n_last + 1) if n not in seen]
    doubled = sorted(n for n, where in seen.items() if len(where) > 1)
    head = f"batch {batch} (n {n_first}..{n_last})"
    if missing:
        return f"{head}: row n={missing[0]} is missing (deleted){_more(missing)}"
    if doubled:
        where = ", ".join(seen[doubled[0]])
        return f"{head}: two rows with n={doubled[0]} ({where}: inserted){_more(doubled)}"
    return f"{head}: row count differs from the chain"


def _time_span(ordered, n_first: int, n_last: int) -> str:
    """'t a..b s' of the batch, from the rows that have a time column first."""
    times = []
    for table, (rows, ns) in ordered.items():
        if table in ("samples", "spirometer_samples"):
            column = 2
        elif table in ("estimates", "decisions", "events", "beam_edges"):
            column = 0
        else:
            continue
        part = rows[bisect_left(ns, n_first) : bisect_right(ns, n_last)]
        times += [r[column] for r in part if isinstance(r[column], float)]
    return f", t {min(times):.3f}..{max(times):.3f} s" if times else ""


def _more(values: list[int]) -> str:
    return f" and {len(values) - 1} more" if len(values) > 1 else ""


def _looks_like_text(data: bytes) -> bool:
    return all(b >= 0x20 and b != 0x7F or b in b"\t\r\n" for b in data)
