"""KIM marker logs: reader, and comparison with the robot trace that drove the phantom.

KIM (Kilovoltage Intrafraction Monitoring) localises implanted markers in 3-D from single
gantry-mounted kV projections. Its QA (Image-X Institute, KIM-QA-Analysis) moves a phantom
with implanted markers on a 6-DoF robot along a known trace and compares KIM's marker
positions with the trace. This module reads the public KIM-QA test files and repeats that
comparison, so that the same figures can be computed for our own fiducial stream.

Files
-----
``MarkerLocationsGA_CouchShift_<k>.txt`` (one per couch position k = 0, 1, ...; ``*_OL``
copies are ignored by `read_kim_session`, as by the KIM-QA MATLAB code): comma separated,
one header line naming the columns, then one row per frame::

    Frame No, Time (sec), Gantry, Marker_0_AP, Marker_0_LR, Marker_0_SI , Marker_1_AP, ...,
    Marker_0_X, Marker_0_Y, ..., Marker_0_Correlation, Marker_0_Segmentation, ...,
    Joint Template, Processing Time (ms), Read Time (ms), HeaderTimeTag, Filename

(29 columns for 3 markers; ``MarkerLocations_CouchShift_<k>.txt`` is the same without
``Gantry``). Columns are found by name (surrounding blanks ignored), the number of markers
from the header. Positions are mm in IEC 61217 room coordinates about the isocentre; the file
orders them AP, LR, SI and `KimLog.markers_mm` reorders them to (LR, SI, AP). ``X, Y`` are
panel pixels (0-based). ``Filename`` is last and may itself contain commas (it is re-joined).
``Time (sec)`` is KIM's clock: seconds from the first frame of the session, shared by all
couch-shift files of one session. Every malformed line raises `KimFormatError`
``file:line: what``.

``couchShifts.txt``: a header, then the couch position (VRT, LNG, LAT in cm; LAT > 950 means
LAT - 1000) before the session and after each shift. For Varian the shift k maps to IEC as
LR = +dLAT, SI = +dLNG, AP = -dVRT (x 10 mm), as in ``AnalyseKIMqa.m``.

``co-ords.txt``: the planned marker positions and, on the last row, the isocentre: DICOM
patient coordinates in cm, columns x (RL), y (AP), z (IS); IEC (mm) = (10 dx, 10 dz, -10 dy)
relative to the isocentre.

Robot traces (``LiverTraj_*_robot.txt``): ``t x y z rx ry rz``, seconds, mm (IEC, x = LR,
y = SI, z = AP), degrees; read with `motionctl.traces.read_trace`. Only the translation is
compared (the KIM-QA liver traces have zero rotations).

Comparison (`compare_with_trace`)
---------------------------------
The two clocks differ (KIM's starts with the first image, the robot's with the trace; KIM
adds its processing latency). Conventions, so that every figure can be reproduced:

1. KIM position = the centroid of the markers in each frame; couch shifts are subtracted
   from the frames after each shift (`read_kim_session`).
2. Time offset ``tau`` (robot time = KIM time + tau): the lag that maximises the agreement
   of the two 3-D traces -- a cross-correlation made robust to KIM outliers: for each lag on
   a 0.05 s grid the trace is interpolated at the KIM times, the median difference is
   removed, and the cost is the mean truncated squared residual ``min(|r|^2, (3 mm)^2)``;
   the best lag is refined on a 0.005 s grid. Only lags at which at least ``min_overlap``
   (90 %) of the KIM frames fall inside the trace are considered (the KIM-QA liver traces
   repeat a ~70 s pattern, so lags that differ by a period fit almost equally well; coverage
   decides). The KIM-QA MATLAB tool asks the user to align by hand (sliders) instead.
3. Static offset: the marker centroid is not the robot's origin. Default: the median of
   KIM - trace after alignment (``offset="median"``). ``offset=<3 numbers>`` uses a given
   offset, e.g. the centroid from ``co-ords.txt`` (what ``AnalyseKIMqa.m`` subtracts); both
   the used and the co-ords offset are reported, since the phantom set-up of some sessions
   differs from the co-ords file by several mm.
4. Error = KIM centroid - (trace(t + tau) + offset), per axis LR, SI, AP: mean, SD (n - 1),
   RMS, 5th and 95th percentiles (as KIM-QA reports: mean, SD, percentiles 5/95), P95 of
   |error|; and the 3-D RMS. Outliers: frames whose 3-D error exceeds median + 3 scaled MAD
   (``rmoutliers(..., 'median')`` in the MATLAB code, which applies it to a norm
   difference); figures are given with and without them. ``kim_qa_pass``: every axis with
   ``|mean| <= 1 mm`` and ``SD <= 2 mm`` (the thresholds coded in ``AnalyseKIMqa.m``).

What it does not do: treatment-start detection (all frames are compared), the 2-D pixel
trajectories, rotations, Elekta log variants (untested), and the static-test analysis (no
trace: the expected couch offsets are typed in by the user in KIM-QA).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "KIM_QA_TRACES",
    "KimComparison",
    "KimFormatError",
    "KimLog",
    "compare_with_trace",
    "read_coords",
    "read_couch_shifts",
    "read_kim_log",
    "read_kim_session",
]

# KIM-QA test folders (Test Files/Varian/{Dynamic,Tx interrupt}/<case>) and the robot trace
# that drove the phantom, after Test Files/README.md ("Baseline_cardiac matches with
# LiverTraj_BaselineWanderWithCardiac70s_robot.txt") and the trace names.
KIM_QA_TRACES: Mapping[str, str] = {
    "Large_SI": "LiverTraj_LargeSI70s_robot.txt",
    "Dyn_Large_SI": "LiverTraj_LargeSI70s_robot.txt",
    "Large_SI_AP": "LiverTraj_LargeSIandAP70s_robot.txt",
    "Large_SI_AP_Breathhold": "LiverTraj_LargeSIandAPWithBreathHold_robot.txt",
    "Baseline_cardiac": "LiverTraj_BaselineWanderWithCardiac70s_robot.txt",
    "Breath_hold_1_1": "LiverTraj_BreathHold1_robot.txt",
    "Erratic": "LiverTraj_Erratic70s_robot.txt",
    "Transient": "LiverTraj_Transient70s_robot.txt",
}

_AXES_IN_FILE = ("AP", "LR", "SI")
_IEC_ORDER = ("LR", "SI", "AP")


class KimFormatError(ValueError):
    """A KIM file that cannot be read; the message is ``file:line: what was wrong``."""

    def __init__(self, source: str, line: int, what: str):
        super().__init__(f"{source}:{line}: {what}")
        self.source = source
        self.line = line
        self.what = what


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class KimLog:
    """A KIM marker log (one or several couch-shift files of one session), as read."""

    source: str
    frame: np.ndarray  # (N,) int, KIM's frame counter
    t_s: np.ndarray  # (N,) s, KIM clock (from the session's first frame)
    gantry_deg: np.ndarray  # (N,) degrees, NaN when the file has no Gantry column
    markers_mm: np.ndarray  # (N, M, 3) IEC (LR, SI, AP) mm about the isocentre
    markers_px: np.ndarray  # (N, M, 2) panel pixels (X, Y), 0-based
    correlation: np.ndarray  # (N, M) template correlation per marker
    segment: np.ndarray  # (N,) int: which couch-shift file the frame came from
    filenames: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()  # the header (of the session's first file)
    couch_shift_mm: np.ndarray = field(default_factory=lambda: np.zeros((1, 3)))

    def __post_init__(self) -> None:
        for name in (
            "frame",
            "t_s",
            "gantry_deg",
            "markers_mm",
            "markers_px",
            "correlation",
            "segment",
            "couch_shift_mm",
        ):
            object.__setattr__(self, name, _ro(np.array(getattr(self, name))))

    @property
    def n_markers(self) -> int:
        return int(self.markers_mm.shape[1])

    @property
    def centroid_mm(self) -> np.ndarray:
        """(N, 3) marker centroid per frame, IEC (LR, SI, AP) mm."""
        return self.markers_mm.mean(axis=1)


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip())


def read_kim_log(
    path: str | Path, *, segment: int = 0, columns: Sequence[str] | None = None
) -> KimLog:
    """Read one ``MarkerLocations[GA]_CouchShift_<k>.txt`` file (see the module docstring).

    KIM writes the header only in the first file of a session (``CouchShift_0``); a later
    file starts with data and is read with ``columns`` = the first file's `KimLog.columns`
    (`read_kim_session` does this).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig", errors="strict")
    except UnicodeDecodeError as exc:
        raise KimFormatError(source, 1, f"not a text file ({exc.reason})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise KimFormatError(source, 1, "empty file: expected a header 'Frame No, Time (sec), ...'")
    header = [_norm(h) for h in lines[0].split(",")]
    first_data = 1
    if header[:2] != ["Frame No", "Time (sec)"]:
        if columns is None:
            raise KimFormatError(
                source, 1, f"header must start with 'Frame No, Time (sec)', got {lines[0][:60]!r}"
            )
        header, first_data = [_norm(h) for h in columns], 0
    index = {name: k for k, name in enumerate(header)}
    n_markers = 0
    while all(f"Marker_{n_markers}_{ax}" in index for ax in _AXES_IN_FILE):
        n_markers += 1
    if n_markers == 0:
        raise KimFormatError(source, 1, "header names no Marker_0_AP, Marker_0_LR, Marker_0_SI")
    for m in range(n_markers):
        for col in (f"Marker_{m}_X", f"Marker_{m}_Y"):
            if col not in index:
                raise KimFormatError(source, 1, f"header lacks column {col!r}")
    has_file = header[-1] == "Filename"
    n_fields = len(header)
    numeric = n_fields - 1 if has_file else n_fields
    frames, times, gantry, pos, px, corr, names = [], [], [], [], [], [], []
    pos_cols = [
        [index[f"Marker_{m}_{ax}"] for ax in _IEC_ORDER]  # reorder AP, LR, SI -> LR, SI, AP
        for m in range(n_markers)
    ]
    px_cols = [[index[f"Marker_{m}_X"], index[f"Marker_{m}_Y"]] for m in range(n_markers)]
    corr_cols = [index.get(f"Marker_{m}_Correlation") for m in range(n_markers)]
    g_col = index.get("Gantry")
    for no, line in enumerate(lines[first_data:], start=first_data + 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) < n_fields:
            raise KimFormatError(
                source, no, f"expected {n_fields} comma-separated fields, got {len(fields)}"
            )
        if not has_file and len(fields) > n_fields:
            raise KimFormatError(
                source, no, f"expected {n_fields} comma-separated fields, got {len(fields)}"
            )
        values = []
        for k in range(numeric):
            try:
                value = float(fields[k])
            except ValueError:
                raise KimFormatError(
                    source, no, f"column {header[k]!r} is not a number: {fields[k].strip()!r}"
                ) from None
            if not math.isfinite(value):
                raise KimFormatError(source, no, f"column {header[k]!r} is not finite")
            values.append(value)
        frames.append(int(values[0]))
        times.append(values[1])
        gantry.append(values[g_col] if g_col is not None else math.nan)
        pos.append([[values[c] for c in cols] for cols in pos_cols])
        px.append([[values[c] for c in cols] for cols in px_cols])
        corr.append([values[c] if c is not None else math.nan for c in corr_cols])
        names.append(",".join(fields[numeric:]).strip() if has_file else "")
        if len(times) >= 2 and times[-1] < times[-2]:
            raise KimFormatError(
                source, no, f"time goes backwards ({times[-1]} s after {times[-2]} s)"
            )
    if not frames:
        raise KimFormatError(source, len(lines), "no data rows after the header")
    n = len(frames)
    return KimLog(
        source=source,
        frame=np.array(frames, dtype=np.int64),
        t_s=np.array(times),
        gantry_deg=np.array(gantry),
        markers_mm=np.array(pos).reshape(n, n_markers, 3),
        markers_px=np.array(px).reshape(n, n_markers, 2),
        correlation=np.array(corr).reshape(n, n_markers),
        segment=np.full(n, segment, dtype=np.int64),
        filenames=tuple(names),
        columns=tuple(header),
    )


def read_couch_shifts(path: str | Path, *, vendor: str = "Varian") -> np.ndarray:
    """Cumulative couch shifts (K+1, 3) in IEC (LR, SI, AP) mm; row 0 is zero (the position
    before the first shift). Varian: LR = dLAT, SI = dLNG, AP = -dVRT; other vendors AP = dVRT."""
    path = Path(path)
    source = str(path)
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip() or no == 1 and not re.match(r"\s*[-+0-9.]", line):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise KimFormatError(source, no, f"expected 3 fields VRT, LNG, LAT, got {len(fields)}")
        try:
            vrt, lng, lat = (float(f) for f in fields)
        except ValueError:
            raise KimFormatError(source, no, f"not numbers: {line.strip()!r}") from None
        if lat > 950:
            lat -= 1000.0
        rows.append((vrt, lng, lat))
    if not rows:
        raise KimFormatError(source, 1, "no couch positions")
    a = np.array(rows) * 10.0  # cm -> mm
    d = a - a[0]
    ap = -d[:, 0] if vendor.lower() == "varian" else d[:, 0]
    return np.stack([d[:, 2], d[:, 1], ap], axis=1)


def read_coords(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """KIM-QA ``co-ords.txt``: (markers (M, 3) IEC mm relative to the isocentre, isocentre
    (3,) DICOM cm as given). Rows ``x y z`` (DICOM cm: RL, AP, IS); the last row is the
    isocentre."""
    path = Path(path)
    source = str(path)
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.replace(",", " ").split()
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise KimFormatError(source, no, f"not numbers: {line.strip()!r}") from None
        if len(values) != 3:
            raise KimFormatError(source, no, f"expected 3 numbers x y z, got {len(values)}")
        rows.append(values)
    if len(rows) < 2:
        raise KimFormatError(source, 1, "need marker rows and an isocentre row")
    a = np.array(rows)
    rel = a[:-1] - a[-1]
    iec = np.stack([10.0 * rel[:, 0], 10.0 * rel[:, 2], -10.0 * rel[:, 1]], axis=1)
    return iec, a[-1]


def read_kim_session(
    folder: str | Path, *, vendor: str = "Varian", pattern: str = "MarkerLocationsGA_CouchShift_"
) -> KimLog:
    """All couch-shift files of one session folder, in shift order (``*_OL`` ignored), with
    the cumulative couch shift (``couchShifts.txt``, if present) subtracted from the marker
    positions of the frames after each shift."""
    folder = Path(folder)
    files = []
    for p in folder.glob(f"{pattern}*.txt"):
        m = re.fullmatch(re.escape(pattern) + r"(\d+)\.txt", p.name)
        if m:
            files.append((int(m.group(1)), p))
    if not files:
        raise FileNotFoundError(f"{folder}: no {pattern}<k>.txt file")
    files.sort()
    logs = [read_kim_log(files[0][1], segment=files[0][0])]
    for k, p in files[1:]:
        logs.append(read_kim_log(p, segment=k, columns=logs[0].columns))
    n_markers = {log.n_markers for log in logs}
    if len(n_markers) != 1:
        raise KimFormatError(str(folder), 0, f"files disagree on the marker count {n_markers}")
    shifts = np.zeros((max(k for k, _ in files) + 1, 3))
    shift_file = folder / "couchShifts.txt"
    if shift_file.exists():
        table = read_couch_shifts(shift_file, vendor=vendor)
        rows = min(len(table), len(shifts))
        shifts[:rows] = table[:rows]
    segment = np.concatenate([log.segment for log in logs])
    markers = np.concatenate([log.markers_mm for log in logs], axis=0)
    markers = markers - shifts[segment][:, None, :]
    return KimLog(
        source=str(folder),
        frame=np.concatenate([log.frame for log in logs]),
        t_s=np.concatenate([log.t_s for log in logs]),
        gantry_deg=np.concatenate([log.gantry_deg for log in logs]),
        markers_mm=markers,
        markers_px=np.concatenate([log.markers_px for log in logs], axis=0),
        correlation=np.concatenate([log.correlation for log in logs], axis=0),
        segment=segment,
        filenames=tuple(name for log in logs for name in log.filenames),
        columns=logs[0].columns,
        couch_shift_mm=shifts,
    )


@dataclass(frozen=True)
class KimComparison:
    """KIM centroid vs robot trace; see the module docstring for every convention."""

    n_frames: int
    time_offset_s: float  # robot time = KIM time + this
    coverage: float  # fraction of KIM frames inside the trace at that offset
    offset_mm: tuple[float, float, float]  # static offset removed (LR, SI, AP)
    per_axis: Mapping[str, Mapping[str, float]]  # LR/SI/AP -> mean, sd, rms, p5, p95, p95_abs
    rms_3d_mm: float
    p95_3d_mm: float
    n_outliers: int
    per_axis_clipped: Mapping[str, Mapping[str, float]]
    rms_3d_clipped_mm: float
    kim_qa_pass: bool
    errors_mm: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 3)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_frames": self.n_frames,
            "time_offset_s": round(self.time_offset_s, 3),
            "coverage": round(self.coverage, 4),
            "offset_mm": [round(x, 3) for x in self.offset_mm],
            "per_axis_mm": {k: dict(v) for k, v in self.per_axis.items()},
            "rms_3d_mm": round(self.rms_3d_mm, 3),
            "p95_3d_mm": round(self.p95_3d_mm, 3),
            "n_outliers": self.n_outliers,
            "per_axis_without_outliers_mm": {k: dict(v) for k, v in self.per_axis_clipped.items()},
            "rms_3d_without_outliers_mm": round(self.rms_3d_clipped_mm, 3),
            "kim_qa_pass": self.kim_qa_pass,
        }


def _axis_stats(e: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for k, axis in enumerate(_IEC_ORDER):
        x = e[:, k]
        out[axis] = {
            "mean": round(float(np.mean(x)), 3),
            "sd": round(float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, 3),
            "rms": round(float(np.sqrt(np.mean(x**2))), 3),
            "p5": round(float(np.percentile(x, 5)), 3),
            "p95": round(float(np.percentile(x, 95)), 3),
            "p95_abs": round(float(np.percentile(np.abs(x), 95)), 3),
        }
    return out


def _interp3(t: np.ndarray, trace_t: np.ndarray, trace_xyz: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(t, trace_t, trace_xyz[:, k]) for k in range(3)], axis=1)


def _lag_cost(
    t: np.ndarray,
    pos: np.ndarray,
    trace_t: np.ndarray,
    trace_xyz: np.ndarray,
    lags: np.ndarray,
    min_overlap: float,
    clip_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    costs = np.full(len(lags), np.inf)
    cover = np.zeros(len(lags))
    for i, lag in enumerate(lags):
        tt = t + lag
        inside = (tt >= trace_t[0]) & (tt <= trace_t[-1])
        cover[i] = inside.mean()
        if cover[i] < min_overlap or inside.sum() < 10:
            continue
        r = pos[inside] - _interp3(tt[inside], trace_t, trace_xyz)
        r = r - np.median(r, axis=0)
        costs[i] = float(np.mean(np.minimum(np.sum(r * r, axis=1), clip_mm**2)))
    return costs, cover


def compare_with_trace(
    t_s: Sequence[float],
    positions_mm: Any,
    trace_t_s: Sequence[float],
    trace_xyz_mm: Any,
    *,
    offset: str | Sequence[float] = "median",
    min_overlap: float = 0.9,
    max_lag_s: float | None = None,
    clip_mm: float = 3.0,
) -> KimComparison:
    """Align KIM positions (N, 3) at KIM times with a trace (T, 3) and report the errors.

    ``max_lag_s`` bounds the lag search (default: every lag with ``min_overlap``
    coverage; if none has it, the lags with the best coverage found).
    """
    t = np.asarray(t_s, dtype=np.float64)
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    tr_t = np.asarray(trace_t_s, dtype=np.float64)
    tr = np.asarray(trace_xyz_mm, dtype=np.float64).reshape(-1, 3)
    if len(t) != len(pos) or len(t) < 10:
        raise ValueError("need >= 10 KIM frames with one position each")
    if len(tr_t) != len(tr) or len(tr_t) < 2 or np.any(np.diff(tr_t) <= 0):
        raise ValueError("the trace needs >= 2 samples with increasing times")
    if not (np.isfinite(pos).all() and np.isfinite(t).all() and np.isfinite(tr).all()):
        raise ValueError("positions, times and trace must be finite")
    span = tr_t[-1] - tr_t[0]
    lo = tr_t[0] - t[-1]
    hi = tr_t[-1] - t[0]
    if max_lag_s is not None:
        lo, hi = max(lo, -max_lag_s), min(hi, max_lag_s)
    lags = np.arange(lo, hi + 1e-9, 0.05)
    need = min_overlap
    costs, cover = _lag_cost(t, pos, tr_t, tr, lags, need, clip_mm)
    if not np.isfinite(costs).any():  # the KIM session is longer than the trace
        need = float(cover.max()) - 1e-9
        costs, cover = _lag_cost(t, pos, tr_t, tr, lags, need, clip_mm)
    if not np.isfinite(costs).any():
        raise ValueError(
            f"no overlap between {t[-1] - t[0]:.0f} s of KIM and {span:.0f} s of trace"
        )
    best = float(lags[int(np.argmin(costs))])
    fine = np.arange(best - 0.1, best + 0.1 + 1e-9, 0.005)
    fcost, fcover = _lag_cost(t, pos, tr_t, tr, fine, need, clip_mm)
    k = int(np.argmin(fcost))
    lag, coverage = float(fine[k]), float(fcover[k])
    tt = t + lag
    inside = (tt >= tr_t[0]) & (tt <= tr_t[-1])
    expected = _interp3(tt[inside], tr_t, tr)
    diff = pos[inside] - expected
    if isinstance(offset, str):
        if offset != "median":
            raise ValueError(f"offset must be 'median' or 3 numbers, got {offset!r}")
        off = np.median(diff, axis=0)
    else:
        off = np.asarray(offset, dtype=np.float64).reshape(3)
    err = diff - off
    norm = np.linalg.norm(err, axis=1)
    med = float(np.median(norm))
    mad = 1.4826 * float(np.median(np.abs(norm - med)))
    outlier = norm > med + 3.0 * max(mad, 1e-6)
    per_axis = _axis_stats(err)
    clipped = err[~outlier] if (~outlier).sum() >= 2 else err
    passed = all(abs(v["mean"]) <= 1.0 and v["sd"] <= 2.0 for v in per_axis.values())
    return KimComparison(
        n_frames=int(inside.sum()),
        time_offset_s=lag,
        coverage=coverage,
        offset_mm=tuple(float(x) for x in off),
        per_axis=per_axis,
        rms_3d_mm=float(np.sqrt(np.mean(norm**2))),
        p95_3d_mm=float(np.percentile(norm, 95)),
        n_outliers=int(outlier.sum()),
        per_axis_clipped=_axis_stats(clipped),
        rms_3d_clipped_mm=float(np.sqrt(np.mean(np.sum(clipped**2, axis=1)))),
        kim_qa_pass=passed,
        errors_mm=err,
    )
