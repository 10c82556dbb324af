"""Readers for recorded motion traces: internal target trajectories and 1-D surrogate signals.

What it reads (whitespace-separated text, no header; blank lines and ``#`` comments skipped):

- **6-DoF** ``t x y z rx ry rz``: seconds, millimetres, degrees, IEC 61217 (x = LR, y = SI,
  z = AP), as in the IntERAct LARK traces and the KIM-QA robot traces. ``kind = "6dof"``.
- **2-column** ``t value``: seconds and one amplitude in millimetres (an internal SI trace or
  an external respiratory partner such as the IntERAct ``*_resp.txt``). ``kind = "1d"``.

The format is detected from the column count of the first data line. Every malformed line is
reported as ``file:line: what`` so a physicist can fix the file. The reader is pure: it reads
the file and returns arrays; it does not resample, filter, re-order axes or check that the
axes are IEC (the file's provenance has to say that). Other formats (RPM ``.vxp``, ExtMarker
CSV, HexaMotion) are not read yet; add them as further readers in ``_READERS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Trace", "TraceFormatError", "read_trace"]


@dataclass(frozen=True)
class Trace:
    """A trace as read: sample times and the values at them (read-only arrays)."""

    t_s: np.ndarray  # shape (N,), seconds, strictly increasing
    values: np.ndarray  # shape (N, k): 6dof -> k = 6 (x, y, z mm, rx, ry, rz deg); 1d -> k = 1
    kind: str  # "6dof" or "1d"
    source: str  # the file path it was read from


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message is ``file:line: what was wrong``."""

    def __init__(self, source: str, line: int, what: str):
        super().__init__(f"{source}:{line}: {what}")
        self.source = source
        self.line = line
        self.what = what


# Column count of a data line -> trace kind. Both formats put time in the first column.
_KIND_BY_COLUMNS = {7: "6dof", 2: "1d"}


def _read_whitespace_table(path: Path) -> Trace:
    """Read the 6-DoF or 2-column whitespace text formats."""
    source = str(path)
    # errors="replace": a stray non-UTF-8 byte then surfaces as a non-numeric field on its
    # line, which is a more useful report than a decode error with a byte offset.
    text = path.read_text(encoding="utf-8", errors="replace")

    times: list[float] = []
    rows: list[list[float]] = []
    n_columns = 0
    previous_line = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if n_columns == 0:
            if len(fields) not in _KIND_BY_COLUMNS:
                raise TraceFormatError(
                    source,
                    line_no,
                    f"unknown trace format: {len(fields)} columns; expected 7 "
                    "(t x y z rx ry rz) or 2 (t value)",
                )
            n_columns = len(fields)
        elif len(fields) != n_columns:
            raise TraceFormatError(
                source, line_no, f"expected {n_columns} columns, found {len(fields)}"
            )
        numbers = []
        for column, field in enumerate(fields, start=1):
            try:
                number = float(field)
            except ValueError:
                raise TraceFormatError(
                    source, line_no, f"column {column}: {field!r} is not a number"
                ) from None
            if not math.isfinite(number):
                raise TraceFormatError(
                    source, line_no, f"column {column}: {field!r} is not a finite number"
                )
            numbers.append(number)
        t = numbers[0]
        if times and t <= times[-1]:
            raise TraceFormatError(
                source,
                line_no,
                f"time {t:g} s is not after {times[-1]:g} s on line {previous_line}",
            )
        times.append(t)
        rows.append(numbers[1:])
        previous_line = line_no

    if len(times) < 2:
        raise TraceFormatError(
            source, max(previous_line, 1), f"a trace needs at least 2 samples, found {len(times)}"
        )

    t_s = np.asarray(times, dtype=np.float64)
    values = np.asarray(rows, dtype=np.float64).reshape(len(times), n_columns - 1)
    t_s.setflags(write=False)
    values.setflags(write=False)
    return Trace(t_s=t_s, values=values, kind=_KIND_BY_COLUMNS[n_columns], source=source)


# File suffix -> reader. The whitespace text formats are the fallback for any other suffix;
# formats with their own suffix (e.g. ".vxp") get an entry here.
_READERS: dict[str, Callable[[Path], Trace]] = {}


def read_trace(path: str | Path) -> Trace:
    """Read a trace file, choosing the reader by suffix and then by content.

    Raises TraceFormatError (a ValueError) naming the file and line for malformed content,
    and OSError if the file cannot be opened.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower(), _read_whitespace_table)
    return reader(path)
