"""Readers for recorded motion traces: internal target trajectories and 1-D surrogate signals.

The format is chosen by the file's CONTENT (its first non-blank line), never by its suffix:

- **6-DoF text** ``t x y z rx ry rz``: whitespace-separated, no header, blank lines and ``#``
  comments skipped; seconds, millimetres, degrees, IEC 61217 (x = LR, y = SI, z = AP), as in
  the IntERAct LARK traces and the KIM-QA robot traces. ``kind = "6dof"``.
- **2-column text** ``t value``: same layout; seconds and one amplitude in millimetres (an
  internal SI trace or an external respiratory partner such as the IntERAct ``*_resp.txt``).
  ``kind = "1d"``. The two text formats are told apart by the column count of the first data
  line.
- **Varian RPM .vxp**, versions 1.5 and 1.6 (first line ``[Header]``). ``kind = "1d"``: the
  amplitude in mm, see `_read_vxp` for the header, the units and the extra columns.
- **ExtMarker CSV** (Krilavicius et al.; first line ``"Frame";"Timestamp";"x";"y";"z"``):
  3-D position of one external marker in mm in the TRACKING-CAMERA frame, which is not IEC.
  ``kind = "marker3d"``; see `_read_extmarker`.
- **HexaMotion** (first line ``trajectory``): 3 columns LR, IS, PA in mm, one row per 20 ms.
  Converted to IEC (x = LR +left, y = SI +superior, z = AP +anterior). ``kind = "3d"``; see
  `_read_hexamotion`.

Every malformed line is reported as ``file:line: what`` so a physicist can fix the file; a
file that starts like none of the formats is refused with the list of known formats. The
readers are pure: they read the file and return arrays; they do not resample, filter or
re-order axes beyond the documented per-format conversion to mm, seconds and (HexaMotion)
IEC. Samples that the recording system flagged as bad stay in ``values`` and are marked
False in ``valid``; `breathing_signal` turns them into NaN.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

__all__ = [
    "KNOWN_FORMATS",
    "Trace",
    "TraceFormatError",
    "breathing_inputs",
    "breathing_signal",
    "read_trace",
]

# What `read_trace` recognises, as listed in the error for a file of unknown format.
KNOWN_FORMATS: tuple[str, ...] = (
    "6-DoF text 't x y z rx ry rz'",
    "2-column text 't value'",
    "Varian RPM .vxp 1.5/1.6 (first line '[Header]')",
    'ExtMarker CSV (first line \'"Frame";"Timestamp";"x";"y";"z"\')',
    "HexaMotion (first line 'trajectory')",
)


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view (the caller's array, if any, keeps its own flags)."""
    view = np.asarray(array).view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True)
class Trace:
    """A trace as read: sample times and the values at them (read-only arrays).

    ``valid``, ``columns``, ``format`` and ``meta`` have defaults, so a trace built from just
    the first four fields is a valid-everywhere trace with no extra columns.
    """

    t_s: np.ndarray  # shape (N,), seconds, strictly increasing
    # shape (N, k): 6dof -> k = 6 (x, y, z mm, rx, ry, rz deg, IEC); 1d -> k = 1 (mm);
    # 3d -> k = 3 (x, y, z mm, IEC); marker3d -> k = 3 (x, y, z mm, camera frame, NOT IEC)
    values: np.ndarray
    kind: str  # "6dof", "1d", "3d" or "marker3d"
    source: str  # the file path it was read from
    # shape (N,) bool: False where the recording system flagged the sample (RPM validflag < 0).
    # None when constructing means "all valid"; after construction it is always an array.
    valid: np.ndarray | None = None
    # Extra per-sample columns of the format, each shape (N,), e.g. the RPM "phase".
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    format: str = "text"  # "text", "vxp", "extmarker" or "hexamotion"
    meta: Mapping[str, str] = field(default_factory=dict)  # e.g. the .vxp [Header] as read

    def __post_init__(self) -> None:
        n = len(self.t_s)
        valid = np.ones(n, dtype=bool) if self.valid is None else np.asarray(self.valid)
        if valid.dtype != bool or valid.shape != (n,):
            raise ValueError(f"valid must be a bool array of shape ({n},), got {valid.shape}")
        object.__setattr__(self, "valid", _read_only(valid))
        columns = {}
        for name, column in self.columns.items():
            column = np.asarray(column)
            if column.shape != (n,):
                raise ValueError(f"column {name!r} must have shape ({n},), got {column.shape}")
            columns[name] = _read_only(column)
        object.__setattr__(self, "columns", MappingProxyType(columns))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message is ``file:line: what was wrong``."""

    def __init__(self, source: str, line: int, what: str):
        super().__init__(f"{source}:{line}: {what}")
        self.source = source
        self.line = line
        self.what = what


def _known_formats() -> str:
    return "known formats: " + ", ".join(KNOWN_FORMATS)


# -- shared parsing ----------------------------------------------------------------------------

# A non-blank line of the file: (1-based line number, text).
_Numbered = list[tuple[int, str]]


def _numbered(lines: list[str], start: int) -> _Numbered:
    """The non-blank lines from index ``start`` on, with their 1-based line numbers."""
    return [(no, line) for no, line in enumerate(lines[start:], start + 1) if line.strip()]


def _split_table(
    source: str,
    rows: _Numbered,
    sep: str | None,
    names: tuple[str, ...],
    text_names: frozenset[str] = frozenset(),
    decimal_comma: bool = False,
) -> dict[str, np.ndarray]:
    """Split every row into ``len(names)`` fields; numeric columns as float64 (finite).

    ``sep=None`` splits on whitespace. Columns in ``text_names`` come back as arrays of the
    stripped field text. ``decimal_comma`` reads ``-490,7`` as -490.7. The fast path splits
    the whole table at once; only when a field count or a number is wrong is the offending
    line looked up, so the error names its line.
    """
    n = len(names)
    if not rows:
        return {name: np.empty(0) for name in names}
    texts = [line for _, line in rows]
    if sep is None and not text_names:
        try:  # fastest for whitespace; anything odd goes through the checks below
            table = np.loadtxt(texts, dtype=np.float64, comments=None, ndmin=2)
        except ValueError:
            table = None
        if table is not None and table.shape == (len(rows), n) and np.isfinite(table).all():
            return {name: np.ascontiguousarray(table[:, k]) for k, name in enumerate(names)}
    if sep is None:
        split_rows = [line.split() for line in texts]
        counts = np.fromiter(map(len, split_rows), dtype=np.intp, count=len(rows))
    else:
        counter = operator.methodcaller("count", sep)
        counts = np.fromiter(map(counter, texts), dtype=np.intp, count=len(rows)) + 1
    wrong = np.flatnonzero(counts != n)
    if wrong.size:
        i = int(wrong[0])
        raise TraceFormatError(
            source, rows[i][0], f"expected {n} fields ({', '.join(names)}), found {counts[i]}"
        )
    if sep is None:
        flat = [cell for cells in split_rows for cell in cells]
    else:
        joined = sep.join(texts)
        flat = (joined.replace(",", ".") if decimal_comma else joined).split(sep)

    def original_cell(i: int, k: int) -> str:
        return rows[i][1].split(sep)[k].strip()

    columns: dict[str, np.ndarray] = {}
    problems: list[tuple[int, int, str]] = []  # (row, column, what): the first in the file wins
    for k, name in enumerate(names):
        cells = flat[k::n]
        if name in text_names:
            columns[name] = np.array([cell.strip() for cell in cells], dtype=str)
            continue
        try:
            column = np.array(cells, dtype=np.float64)
        except ValueError:
            column = np.zeros(len(cells))  # the rest stays 0 after the first bad cell
            for i, cell in enumerate(cells):
                try:
                    column[i] = float(cell)
                except ValueError:
                    what = f"{original_cell(i, k)!r} is not a number"
                    problems.append((i, k, f"column {k + 1} ({name}): {what}"))
                    break
        bad = np.flatnonzero(~np.isfinite(column))
        if bad.size:
            i = int(bad[0])
            what = f"{original_cell(i, k)!r} is not a finite number"
            problems.append((i, k, f"column {k + 1} ({name}): {what}"))
        columns[name] = column
    if problems:
        i, _, what = min(problems)
        raise TraceFormatError(source, rows[i][0], what)
    return columns


def _check_increasing(
    source: str, rows: _Numbered, times: np.ndarray, label: str, unit: str = ""
) -> None:
    """Refuse a time (or frame) column that is not strictly increasing, naming the line."""
    bad = np.flatnonzero(np.diff(times) <= 0)
    if bad.size:
        i = int(bad[0]) + 1
        raise TraceFormatError(
            source,
            rows[i][0],
            f"{label} {times[i]:g}{unit} is not after {times[i - 1]:g}{unit} "
            f"on line {rows[i - 1][0]}",
        )


def _check_enough(source: str, rows: _Numbered, n: int, fallback_line: int) -> None:
    if n < 2:
        line = rows[-1][0] if rows else fallback_line
        raise TraceFormatError(source, line, f"a trace needs at least 2 samples, found {n}")


# -- whitespace text: 6-DoF and 2-column -----------------------------------------------------

# Column count of a data line -> trace kind. Both formats put time in the first column.
_KIND_BY_COLUMNS = {7: "6dof", 2: "1d"}


def _read_whitespace_table(source: str, lines: list[str], start: int) -> Trace:
    """Read the 6-DoF or 2-column whitespace text formats.

    Fast path: one ``np.loadtxt`` over the lines. If it fails or its result breaks a rule
    (column count, finite, strictly increasing time, at least 2 samples), the line-by-line
    reader runs instead and reports the first bad line exactly.
    """
    table = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "input contained no data" -> fall back
        try:
            table = np.loadtxt(lines[start:], dtype=np.float64, comments="#", ndmin=2)
        except (ValueError, UserWarning):
            table = None
    if (
        table is None
        or table.shape[1] not in _KIND_BY_COLUMNS
        or len(table) < 2
        or not np.isfinite(table).all()
        or not np.all(np.diff(table[:, 0]) > 0)
    ):
        return _read_whitespace_table_by_line(source, lines, start)
    t_s = np.ascontiguousarray(table[:, 0])
    values = np.ascontiguousarray(table[:, 1:])
    return Trace(
        t_s=_read_only(t_s),
        values=_read_only(values),
        kind=_KIND_BY_COLUMNS[table.shape[1]],
        source=source,
    )


def _read_whitespace_table_by_line(source: str, lines: list[str], start: int) -> Trace:
    """The line-by-line reader of the text formats: slow, but names the first bad line."""
    times: list[float] = []
    rows: list[list[float]] = []
    n_columns = 0
    previous_line = 0
    for line_no, line in enumerate(lines[start:], start=start + 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if n_columns == 0:
            if len(fields) not in _KIND_BY_COLUMNS:
                raise TraceFormatError(
                    source,
                    line_no,
                    f"unknown trace format: {len(fields)} columns; expected 7 "
                    f"(t x y z rx ry rz) or 2 (t value); {_known_formats()}",
                )
            n_columns = len(fields)
        elif len(fields) != n_columns:
            raise TraceFormatError(
                source, line_no, f"expected {n_columns} columns, found {len(fields)}"
            )
        numbers = []
        for column, text in enumerate(fields, start=1):
            try:
                number = float(text)
            except ValueError:
                raise TraceFormatError(
                    source, line_no, f"column {column}: {text!r} is not a number"
                ) from None
            if not math.isfinite(number):
                raise TraceFormatError(
                    source, line_no, f"column {column}: {text!r} is not a finite number"
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
    return Trace(
        t_s=_read_only(t_s),
        values=_read_only(values),
        kind=_KIND_BY_COLUMNS[n_columns],
        source=source,
    )


# -- Varian RPM .vxp ------------------------------------------------------------------------------

_VXP_VERSIONS = ("1.5", "1.6")
_VXP_DEFAULT_LAYOUT = {
    "1.5": ("amplitude", "phase", "timestamp", "validflag", "ttlin", "mark"),
    "1.6": ("amplitude", "phase", "timestamp", "validflag", "ttlin", "mark", "ttlout"),
}
_VXP_COLUMNS = _VXP_DEFAULT_LAYOUT["1.6"]
_VXP_DEFAULT_SCALE = 10.0
# `mark` text -> code: 0 no mark, 1 "Z" (phase closest to 0), 2 "P" (phase closest to pi).
_VXP_MARKS = {"": 0, "Z": 1, "P": 2}


def _read_vxp(source: str, lines: list[str], start: int) -> Trace:
    """Read a Varian RPM ``.vxp`` file, version 1.5 or 1.6.

    Layout: a ``[Header]`` line; ``key=value`` lines (anything after ``;`` is a comment and is
    dropped, so a header value cannot contain ``;``; keys are matched case-insensitively);
    a ``[Data]`` line; then one comma-separated row per sample in the order that
    ``Data_layout`` gives. Refused, naming the line: a ``Version`` other than 1.5 or 1.6 (or
    none), a ``Data_layout`` without ``amplitude`` or ``timestamp`` or with an unknown or
    repeated column name, a non-numeric or non-positive ``Scale_factor``, a row with the wrong
    field count, a non-numeric or non-finite number, a ``mark`` other than empty/Z/P, and a
    timestamp that does not increase.

    Conventions chosen:

    - ``values`` (N, 1) = amplitude x ``Scale_factor``. RPM writes the amplitude in cm and
      ``Scale_factor=10`` converts it to mm (plastimatch ``readrpm.m`` reads the same header
      this way). Without a ``Scale_factor`` line the amplitude is taken to be in cm, i.e. the
      factor is 10, as ``readrpm.m`` also assumes; ``meta`` then has no ``Scale_factor``.
    - Without a ``Data_layout`` line the version's standard order is used: ``amplitude,
      phase, timestamp, validflag, ttlin, mark`` and, for 1.6, ``ttlout``.
    - ``t_s`` = timestamp / 1000 (the file's ms since the RPM application started; not
      shifted to start at 0).
    - ``valid`` = ``validflag >= 0`` (-1 lost track or bad video, -2 non-periodic breathing,
      e.g. a cough); all True when the layout has no ``validflag``.
    - ``columns`` holds every other column of the layout (``phase`` rad, ``validflag``,
      ``ttlin``, ``ttlout`` as float64; ``mark`` as int8 codes 0 none, 1 "Z", 2 "P").
    - ``meta`` holds the header as read: original key -> value, comments stripped.
    """
    header: dict[str, tuple[int, str, str]] = {}  # lower-case key -> (line, key, value)
    data_start = None
    for index in range(start + 1, len(lines)):
        line_no = index + 1
        content = lines[index].split(";", 1)[0].strip()
        if not content:
            continue
        if content.lower() == "[data]":
            data_start = index + 1
            break
        if content.startswith("["):
            raise TraceFormatError(
                source, line_no, f"unexpected section {content}: a .vxp file has [Header], [Data]"
            )
        key, equals, value = content.partition("=")
        key = key.strip()
        if not equals or not key:
            raise TraceFormatError(
                source, line_no, f"expected key=value in [Header], found {content!r}"
            )
        if key.lower() in header:
            first = header[key.lower()][0]
            raise TraceFormatError(source, line_no, f"{key} given twice (first on line {first})")
        header[key.lower()] = (line_no, key, value.strip())
    if data_start is None:
        raise TraceFormatError(source, len(lines), "no [Data] line after [Header]")

    if "version" not in header:
        raise TraceFormatError(source, start + 1, "no Version in [Header]")
    version_line, _, version = header["version"]
    if version not in _VXP_VERSIONS:
        raise TraceFormatError(
            source,
            version_line,
            f"VXP version {version!r} is not supported; this reader knows "
            f"{' and '.join(_VXP_VERSIONS)}",
        )

    if "data_layout" in header:
        layout_line, _, text = header["data_layout"]
        layout = tuple(name.strip().lower() for name in text.split(","))
        for name in layout:
            if name not in _VXP_COLUMNS:
                raise TraceFormatError(
                    source,
                    layout_line,
                    f"Data_layout: unknown column {name!r}; known: {', '.join(_VXP_COLUMNS)}",
                )
            if layout.count(name) > 1:
                raise TraceFormatError(source, layout_line, f"Data_layout: {name!r} repeated")
        for needed in ("amplitude", "timestamp"):
            if needed not in layout:
                raise TraceFormatError(source, layout_line, f"Data_layout has no {needed!r}")
    else:
        layout = _VXP_DEFAULT_LAYOUT[version]

    scale = _VXP_DEFAULT_SCALE
    if "scale_factor" in header:
        scale_line, _, text = header["scale_factor"]
        try:
            scale = float(text)
        except ValueError:
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise TraceFormatError(
                source, scale_line, f"Scale_factor {text!r} is not a positive number"
            )

    rows = _numbered(lines, data_start)
    table = _split_table(source, rows, ",", layout, text_names=frozenset({"mark"}))
    _check_enough(source, rows, len(rows), data_start)
    timestamp = table.pop("timestamp")
    _check_increasing(source, rows, timestamp, "timestamp", " ms")
    amplitude = table.pop("amplitude")

    if "mark" in table:
        marks = table["mark"]
        codes = np.array([_VXP_MARKS.get(m.upper(), -1) for m in marks], dtype=np.int8)
        bad = np.flatnonzero(codes < 0)
        if bad.size:
            i = int(bad[0])
            k = layout.index("mark") + 1
            raise TraceFormatError(
                source, rows[i][0], f"column {k} (mark): {str(marks[i])!r} is not empty, 'Z' or 'P'"
            )
        table["mark"] = codes
    valid = table["validflag"] >= 0 if "validflag" in table else None

    return Trace(
        t_s=timestamp / 1000.0,
        values=(amplitude * scale).reshape(-1, 1),
        kind="1d",
        source=source,
        valid=valid,
        columns=table,
        format="vxp",
        meta={key: value for _, key, value in header.values()},
    )


# -- ExtMarker CSV --------------------------------------------------------------------------------

_EXTMARKER_HEADER = ["frame", "timestamp", "x", "y", "z"]
_EXTMARKER_FRAME_HZ = 60.0


def _read_extmarker(source: str, lines: list[str], start: int) -> Trace:
    """Read an ExtMarker CSV file (Krilavicius et al. 2015, CC BY 4.0).

    ``"Frame";"Timestamp";"x";"y";"z"`` then ``;``-separated rows with a decimal comma.

    - ``t_s`` = Frame / 60 for EVERY row, not the Timestamp column. Frame counts a 60 Hz
      camera clock (it steps by 6, sometimes 7, so the data are at about 10 Hz) and
      Timestamp is Frame x 1000/60 rounded to the ms, except where a locale bug has written
      a different number with a decimal comma (e.g. ``25,6`` where 12800 belongs; the
      ``201205101534-*`` files have 7 such cells). Frame is monotonic and exact in every
      row, so it is used throughout rather than patching only the bad cells, which would
      mix two roundings. The file is refused if most Timestamp cells disagree with
      Frame/60 by more than 1 ms: then the frame clock is not 60 Hz and Frame/60 is wrong.
    - A last row of all zeros (``0;0;0;0;0``, the recorder's trailer) is dropped. An
      all-zero row anywhere else is refused (its Frame does not increase).
    - ``values`` (N, 3) = x, y, z in mm in the tracking camera's frame. That is NOT IEC
      61217: which axis is SI depends on the set-up (z or x carries the breathing in these
      files), so ``kind = "marker3d"`` and `breathing_signal` picks the axis of largest
      variance. No sample is flagged: ``valid`` is all True (values that repeat to the
      0.05 mm in places look like dropout filling but are not marked in the file).
    - ``columns``: ``frame`` and ``timestamp_ms`` as written (with the corrupt cells as
      they are, read with the decimal comma), for checking.
    """
    rows = _numbered(lines, start + 1)
    table = _split_table(
        source, rows, ";", ("Frame", "Timestamp", "x", "y", "z"), decimal_comma=True
    )
    n = len(rows)
    if n >= 1 and all(table[name][-1] == 0 for name in table):
        n -= 1  # the trailer row
        rows = rows[:n]
        table = {name: column[:n] for name, column in table.items()}
    _check_enough(source, rows, n, start + 1)
    frame, timestamp = table["Frame"], table["Timestamp"]
    not_whole = np.flatnonzero(frame != np.round(frame))
    if not_whole.size:
        i = int(not_whole[0])
        raise TraceFormatError(source, rows[i][0], f"Frame {frame[i]:g} is not a whole number")
    _check_increasing(source, rows, frame, "Frame")
    t_s = frame / _EXTMARKER_FRAME_HZ
    disagree = np.abs(timestamp - t_s * 1000.0) > 1.0
    if disagree.mean() > 0.5:
        i = int(np.flatnonzero(disagree)[0])
        raise TraceFormatError(
            source,
            rows[i][0],
            f"Timestamp disagrees with Frame/{_EXTMARKER_FRAME_HZ:g} s on "
            f"{disagree.sum()} of {n} rows (first here): the frame clock is not "
            f"{_EXTMARKER_FRAME_HZ:g} Hz, so time cannot be rebuilt from Frame",
        )
    values = np.column_stack([table["x"], table["y"], table["z"]])
    return Trace(
        t_s=t_s,
        values=values,
        kind="marker3d",
        source=source,
        columns={"frame": frame, "timestamp_ms": timestamp},
        format="extmarker",
    )


# -- HexaMotion -----------------------------------------------------------------------------------

_HEXAMOTION_DT_S = 0.02


def _read_hexamotion(source: str, lines: list[str], start: int) -> Trace:
    """Read a HexaMotion platform trajectory and convert it to IEC 61217.

    ``trajectory`` then 3 whitespace-separated columns LR, IS, PA in mm with R, S and A
    positive, one row per 20 ms (50 Hz) and no time column (as the KIM-QA analysis code
    ``AnalyseKIMqa.m`` reads it; it notes 0.0225 s fitted its KIM data better, but 0.02 s is
    the HexaMotion documentation's period and is used here). ``t_s`` = 0, 0.02, 0.04, ...

    ``values`` (N, 3) = IEC x = -LR (+left), y = IS (+superior), z = PA (+anterior);
    ``kind = "3d"``. Note on the KIM-QA files: their ``ConvertRobot2Hexamotion.m`` copies
    the IEC robot trace's x, y, z into the three columns unchanged, so the phantom moved
    mirrored in LR with respect to the robot trace it came from; read here, such a file
    gives the robot trace with x negated, which is what the platform did.
    """
    rows = _numbered(lines, start + 1)
    table = _split_table(source, rows, None, ("LR", "IS", "PA"))
    _check_enough(source, rows, len(rows), start + 1)
    values = np.column_stack([-table["LR"], table["IS"], table["PA"]])
    return Trace(
        t_s=np.arange(len(rows)) * _HEXAMOTION_DT_S,
        values=values,
        kind="3d",
        source=source,
        format="hexamotion",
    )


# -- detection --------------------------------------------------------------------------------

_Reader = Callable[[str, list[str], int], Trace]


def _sniff(source: str, lines: list[str]) -> tuple[_Reader, int]:
    """The reader for the file and the index of its first line that matters."""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and (text-format) comments
        lowered = stripped.lower()
        if lowered == "[header]":
            return _read_vxp, index
        if [cell.strip().strip('"').lower() for cell in stripped.split(";")] == _EXTMARKER_HEADER:
            return _read_extmarker, index
        if lowered == "trajectory":
            return _read_hexamotion, index
        try:
            float(stripped.split("#", 1)[0].split()[0])
        except ValueError:
            shown = stripped if len(stripped) <= 60 else stripped[:57] + "..."
            raise TraceFormatError(
                source,
                index + 1,
                f"unknown trace format: {shown!r} does not start any format this reader "
                f"knows; {_known_formats()}",
            ) from None
        return _read_whitespace_table, index
    return _read_whitespace_table, 0  # nothing but blanks/comments: it reports "no samples"


def read_trace(path: str | Path) -> Trace:
    """Read a trace file, choosing the reader by the file's content (not its suffix).

    Raises TraceFormatError (a ValueError) naming the file and line for malformed content
    or an unknown format, and OSError if the file cannot be opened.
    """
    path = Path(path)
    source = str(path)
    # errors="replace": a stray non-UTF-8 byte then surfaces as a non-numeric field on its
    # line, which is a more useful report than a decode error with a byte offset.
    text = path.read_text(encoding="utf-8", errors="replace").removeprefix("\ufeff")
    lines = text.splitlines()
    reader, start = _sniff(source, lines)
    return reader(source, lines, start)


# -- the breathing signal ---------------------------------------------------------------------

_IEC_AXES = {"LR": 0, "SI": 1, "AP": 2}


def breathing_signal(trace: Trace, axis: str | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(t_s, value_mm)``: the 1-D breathing signal of a trace, used for prediction.

    - IEC traces (``"6dof"``, ``"3d"``): the SI axis, unless ``axis`` names another one
      (``"LR"``, ``"SI"``, ``"AP"``, case-insensitive) or gives a column index of ``values``.
    - ``"1d"`` traces: the value (``axis`` must be None or 0).
    - ``"marker3d"`` (camera frame, not IEC): the column of largest variance over the valid
      samples, unless ``axis`` gives a column index; axis names are refused.

    Invalid samples are NOT dropped: they come back as NaN at their time, so that a caller
    sees the gap (and its length) and decides how to bridge it. ``t_s`` is the trace's own
    read-only array; ``value_mm`` is a new array. Raises ValueError for an axis that does
    not apply to the trace.
    """
    column = _breathing_column(trace, axis)
    return trace.t_s, np.where(trace.valid, trace.values[:, column], np.nan)


def breathing_inputs(
    trace: Trace, axis: str | int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t_s, value_mm, aux_mm)``: the breathing signal of ``breathing_signal`` and, as
    extra predictor inputs, the trace's other position axes (shape (N, k): the two other
    translations of a 3-D or 6-DoF trace or marker, none for a 1-D trace; rotations are
    left out). The same marker's other axes move with the breathing and carry its phase
    (the loop between them), which a predictor of the breathing axis can use. NaN where the
    sample is invalid, as the value."""
    column = _breathing_column(trace, axis)
    t, value = trace.t_s, np.where(trace.valid, trace.values[:, column], np.nan)
    others = [c for c in range(min(3, trace.values.shape[1])) if c != column]
    if trace.kind == "1d" or column >= 3:
        others = []
    aux = np.where(trace.valid[:, None], trace.values[:, others], np.nan)
    return t, value, aux


def _breathing_column(trace: Trace, axis: str | int | None) -> int:
    """The column of ``trace.values`` that ``breathing_signal`` takes (see there)."""
    k = trace.values.shape[1]
    if isinstance(axis, str):
        if trace.kind not in ("6dof", "3d"):
            raise ValueError(
                f"axis {axis!r}: a {trace.kind} trace has no IEC axes; give a column index"
            )
        if axis.upper() not in _IEC_AXES:
            raise ValueError(f"axis {axis!r} is not one of {', '.join(_IEC_AXES)}")
        return _IEC_AXES[axis.upper()]
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not 0 <= axis < k:
            raise ValueError(f"axis {axis!r} is not a column index 0..{k - 1} of this trace")
        return int(axis)
    if trace.kind in ("6dof", "3d"):
        return _IEC_AXES["SI"]
    if trace.kind == "1d":
        return 0
    if trace.kind == "marker3d":
        if not trace.valid.any():
            raise ValueError(f"{trace.source}: no valid sample to choose the breathing axis from")
        return int(np.argmax(np.var(trace.values[trace.valid], axis=0)))
    raise ValueError(f"{trace.source}: unknown trace kind {trace.kind!r}")
