"""Import recorded motion data from other systems into a motionctl session log.

``import_file(path, out_log)`` reads one recording and writes a new session log through
``SessionLogWriter``, so the log is hash-chained and ``motionctl log verify`` accepts it; the
QA report and ``replay`` then work on it like on any session. The format is chosen by the
file's content, never by its suffix:

=========================  ===================================================================
source                     becomes
=========================  ===================================================================
Varian RPM ``.vxp``        ``samples`` of device ``rpm``: amplitude x Scale_factor in mm on
1.5 and 1.6                the AP axis (``ap_mm``; ``lr_mm``, ``si_mm`` NULL); the config's
                           surrogate device is ``rpm`` (AP axis, rate = Samples_per_second).
                           The recorded gating TTL becomes ``beam_edges`` rows of source
                           ``rpm_ttl``: **ttlout** when the layout has it (1.6: the gate
                           signal RPM sent to the linac, the counterpart of our gating box),
                           else **ttlin** (1.5: its only TTL column). When both exist, ttlin
                           is kept too, as source ``rpm_ttlin``. A TTL value > 0.5 is "on".
2-column text ``t value``  ``samples`` of device ``resp`` (surrogate, AP axis); no beam state.
6-DoF text, HexaMotion     ``samples`` of device ``ground_truth`` (lr/si/ap = x/y/z, IEC mm):
                           the internal target as driven or measured -- truth, NOT a
                           surrogate. Rotations are not stored (the table has no columns for
                           them); their largest magnitude is put in ``meta``.
KIM marker log (file, or   ``fiducials`` rows: device ``kim``, mode ``kim``, accepted, the
a session folder)          marker centroid (IEC LR, SI, AP mm), ``n_seeds`` = the markers;
                           ``t`` = ``t_acq`` = KIM's time (its processing delay is unknown).
=========================  ===================================================================

Decisions (also in ``meta`` and in the QA report):

- **Time**: session time ``t`` starts at the first sample (``t = source time - first source
  time``); ``t_device`` keeps the source's own time (RPM: s since the RPM application
  started; text traces: their time column).
- **No decisions are written.** The log holds what was recorded (the surrogate, and the beam
  state as its TTL), not a motionctl gate, so ``replay`` treats it as a what-if ("what would
  motionctl's gate have done with this breathing") and the report shows the recorded beam
  state from ``beam_edges``. For that what-if one operator ``enable`` event is written,
  ``who = "import"``, at the first TTL-on edge (the recorded treatment had been enabled by
  then), or at the first sample when there is no TTL; its detail says it is synthetic.
- **Invalid RPM samples** (validflag < 0: -1 lost track / bad video, -2 non-periodic) are
  kept at their time with a NULL (NaN) amplitude -- never interpolated, and the replayed
  gate holds on them (``estimate_invalid``) -- and each run of them (a gap) gets one
  ``events`` row (source ``import``, kind ``invalid_samples``; JSON detail: ``until_s``,
  ``samples``, the ``validflag`` codes). The raw amplitude of an invalid sample is not in
  the log; ``meta.source_sha256`` identifies the source file that has it.
- **Patient identifiers are not copied.** Of the VXP header only Version, Data_layout,
  Samples_per_second, Scale_factor, Total_study_time and CRC are kept (``meta.source_header``);
  Patient_ID is stored only as the SHA-256 of its text (``meta.patient_id_sha256``), and
  the names of the other keys left out are listed (``meta.source_header_not_copied``: Date
  is left out too, a treatment date being an identifier under HIPAA Safe Harbor). An
  unsalted hash of a short ID can be reversed by trying every ID: it links files of one
  patient, it does not anonymise. If the file name contains the Patient_ID it is
  replaced by ``[patient-id]`` in ``meta.source_file`` and the device address.
- The config written is the packaged defaults (with ``overrides``, validated as ``--set``),
  adapted to the source: the surrogate device, its rate and a stale timeout of 1.5 sample
  periods. The surrogate sign (``tracking.surrogate_inhale_positive = true``) is assumed:
  check it against your RPM set-up before reading a what-if's window.

Refused (``ImportRefused``, a ValueError, message ``file:line: what``; no log is left
behind): a truncated, corrupt or foreign file (the trace and KIM readers name the line), an
ExtMarker CSV (camera frame, not IEC: no defined axis), a file that is already an SQLite
database. An existing ``out_log`` raises FileExistsError (a log is never overwritten).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from motionctl.config import load_config
from motionctl.kim import KimFormatError, KimLog, read_kim_log, read_kim_session
from motionctl.sessionlog import SessionLogWriter
from motionctl.traces import Trace, TraceFormatError, read_trace

__all__ = [
    "GROUND_TRUTH_DEVICE",
    "ImportRefused",
    "ImportSummary",
    "import_file",
]

GROUND_TRUTH_DEVICE = "ground_truth"  # samples of this device are truth, not a surrogate
RPM_DEVICE = "rpm"
RESP_DEVICE = "resp"
KIM_DEVICE = "kim"
TTL_SOURCE = "rpm_ttl"
TTLIN_SOURCE = "rpm_ttlin"
EVENT_SOURCE = "import"
# VXP header keys copied into meta (lower case); everything else is left out.
VXP_HEADER_KEPT = (
    "version",
    "data_layout",
    "samples_per_second",
    "scale_factor",
    "total_study_time",
    "crc",
)
VALIDFLAG_MEANING = {-1: "lost track / bad video", -2: "non-periodic breathing"}


class ImportRefused(ValueError):
    """A file that cannot be imported; the message says why and, when known, the line."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


@dataclass
class ImportSummary:
    source: str  # the source file name as stored (patient ID redacted)
    format: str
    log: str
    duration_s: float
    samples: int = 0
    device: str | None = None  # the samples' device
    invalid_samples: int = 0
    invalid_gaps: int = 0
    fiducials: int = 0
    beam_edges: int = 0
    ttl_source: str | None = None  # "ttlout" or "ttlin"
    patient_id_sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    """Everything to write, built before the log file is created (a refused file leaves
    nothing behind)."""

    fmt: str
    cfg: dict[str, Any]
    devices: list[tuple[str, str, str]]
    meta: dict[str, str]
    rows: list[tuple[str, tuple]]  # (table, row without n), in write order
    summary: ImportSummary


# -- the entry point ------------------------------------------------------------------------
def import_file(
    path: str | Path, out_log: str | Path, *, overrides: Sequence[str] = ()
) -> ImportSummary:
    """Import one recording into a new session log; see the module docstring.

    ``overrides``: ``key=value`` config settings for the log's config (e.g. the gating
    window a what-if replay should use), validated as ``--set`` is."""
    path = Path(path)
    out_log = Path(out_log)
    if out_log.exists():
        raise FileExistsError(f"session log {out_log} exists; a log is never overwritten")
    cfg = load_config(None, overrides)
    plan = _plan(path, cfg, out_log)
    _write(plan, out_log)
    return plan.summary


def _plan(path: Path, cfg: dict[str, Any], out_log: Path) -> _Plan:
    if not path.exists():
        raise ImportRefused(f"{path}: no such file or folder")
    if path.is_dir():
        try:
            kim = read_kim_session(path)
        except FileNotFoundError:
            try:
                kim = read_kim_session(path, pattern="MarkerLocations_CouchShift_")
            except FileNotFoundError as exc:
                raise ImportRefused(
                    f"{path}: a folder, but no KIM MarkerLocations[GA]_CouchShift_<k>.txt in it"
                ) from exc
        except KimFormatError as exc:
            raise ImportRefused(str(exc), exc.line) from exc
        return _plan_kim(kim, path, cfg, out_log)
    with path.open("rb") as fh:
        head = fh.read(4096)
    if not head.strip():
        raise ImportRefused(f"{path}:1: empty file: nothing to import")
    if head.startswith(b"SQLite format 3\x00"):
        raise ImportRefused(
            f"{path}:1: an SQLite database (a session log already?), not a recording to import"
        )
    first = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if first.startswith("Frame No"):
        try:
            kim = read_kim_log(path)
        except KimFormatError as exc:
            raise ImportRefused(str(exc), exc.line) from exc
        return _plan_kim(kim, path, cfg, out_log)
    try:
        trace = read_trace(path)
    except TraceFormatError as exc:
        raise ImportRefused(f"{exc}; not imported", exc.line) from exc
    except OSError as exc:
        raise ImportRefused(f"{path}: cannot be read ({exc})") from exc
    if trace.format == "vxp":
        return _plan_vxp(trace, path, cfg, out_log)
    if trace.kind in ("6dof", "3d"):
        return _plan_ground_truth(trace, path, cfg, out_log)
    if trace.kind == "1d":
        return _plan_resp(trace, path, cfg, out_log)
    raise ImportRefused(
        f"{path}:1: {trace.format} ({trace.kind}) is in the tracking camera's frame, not IEC "
        "61217: there is no defined axis to store it on; not imported"
    )


# -- Varian RPM -----------------------------------------------------------------------------
def _plan_vxp(trace: Trace, path: Path, cfg: dict[str, Any], out_log: Path) -> _Plan:
    header = {key.lower(): value for key, value in trace.meta.items()}
    version = header.get("version", "?")
    patient_id = header.get("patient_id", "")
    id_hash = hashlib.sha256(patient_id.encode("utf-8")).hexdigest() if patient_id else None
    name = path.name
    notes: list[str] = []
    if patient_id and patient_id in name:
        name = name.replace(patient_id, "[patient-id]")
        notes.append("the file name contains the Patient_ID: stored as [patient-id]")
    kept = {k: v for k, v in trace.meta.items() if k.lower() in VXP_HEADER_KEPT}
    dropped = [k for k in trace.meta if k.lower() not in VXP_HEADER_KEPT]

    t_src = np.asarray(trace.t_s, dtype=float)
    t = t_src - t_src[0]
    amp = np.asarray(trace.values[:, 0], dtype=float)
    valid = np.asarray(trace.valid, dtype=bool)
    rate = _rate(header.get("samples_per_second"), t)
    _adapt_config(cfg, RPM_DEVICE, "varian_rpm", rate)

    rows: list[tuple[str, tuple]] = []
    columns = trace.columns
    ttl_name = "ttlout" if "ttlout" in columns else "ttlin" if "ttlin" in columns else None
    edges = _edges(t, columns[ttl_name]) if ttl_name else []
    first_on = next((te for te, on in edges if on), None)
    t_enable = first_on if first_on is not None else 0.0
    # The what-if's operator: enabled at the first recorded beam-on (or the first sample).
    rows.append(("events", (t_enable, "operator", "enable", _enable_detail(first_on))))
    for i in range(len(t)):
        value = float(amp[i]) if valid[i] else None
        rows.append(("samples", (RPM_DEVICE, i, float(t[i]), float(t_src[i]), None, None, value)))
    gaps = _gap_events(t, valid, columns.get("validflag"))
    rows.extend(("events", row) for row in gaps)
    for te, on in edges:
        rows.append(("beam_edges", (te, int(on), TTL_SOURCE)))
    n_edges = len(edges)
    if ttl_name == "ttlout" and "ttlin" in columns:
        for te, on in _edges(t, columns["ttlin"]):
            rows.append(("beam_edges", (te, int(on), TTLIN_SOURCE)))
    rows.sort(key=lambda item: _row_time(item))  # one time order across the tables

    fmt = f"varian-rpm-vxp-{version}"
    if ttl_name is None:
        notes.append("the layout has no TTL column: no recorded beam state")
    summary = ImportSummary(
        source=name,
        format=fmt,
        log=str(out_log),
        duration_s=float(t[-1]),
        samples=len(t),
        device=RPM_DEVICE,
        invalid_samples=int((~valid).sum()),
        invalid_gaps=len(gaps),
        beam_edges=n_edges,
        ttl_source=ttl_name,
        patient_id_sha256=id_hash,
        notes=notes,
    )
    meta = _meta(path, name, fmt, t_src[0]) | {
        "source_header": json.dumps(kept, sort_keys=True),
        "source_header_not_copied": ",".join(dropped),
        "import_ttl_source": ttl_name or "none",
        "import_ttl": (
            f"beam_edges source {TTL_SOURCE} = the {ttl_name} column (> 0.5 = on)"
            + (f"; ttlin as {TTLIN_SOURCE}" if ttl_name == "ttlout" and "ttlin" in columns else "")
            if ttl_name
            else "no TTL column"
        ),
        "import_invalid_samples": (
            "validflag < 0: amplitude stored as NULL (NaN) at its time, never interpolated; "
            f"one events row ({EVENT_SOURCE}/invalid_samples) per gap"
        ),
        "import_amplitude": (
            f"amplitude x Scale_factor ({header.get('scale_factor', '10 (default)')}) "
            "-> samples.ap_mm, mm"
        ),
    }
    if id_hash is not None:
        meta["patient_id_sha256"] = id_hash
        meta["patient_id_note"] = (
            "Patient_ID is not stored; this is the SHA-256 of its UTF-8 text (unsalted: it "
            "links files of one patient, it does not anonymise a short ID)"
        )
    devices = [(RPM_DEVICE, "varian_rpm", f"imported:{name}")]
    return _Plan(fmt, cfg, devices, meta, rows, summary)


def _edges(t: np.ndarray, ttl: np.ndarray) -> list[tuple[float, bool]]:
    """(time, on) at the first sample of each TTL state, the first sample's state included
    when it is on (an off start is the default state, not an edge)."""
    on = np.asarray(ttl, dtype=float) > 0.5
    out: list[tuple[float, bool]] = []
    if on.size and on[0]:
        out.append((float(t[0]), True))
    for k in np.flatnonzero(on[1:] != on[:-1]) + 1:
        out.append((float(t[k]), bool(on[k])))
    return out


def _gap_events(t: np.ndarray, valid: np.ndarray, flags: np.ndarray | None) -> list[tuple]:
    rows = []
    bad = ~valid
    if not bad.any():
        return rows
    starts = np.flatnonzero(bad & ~np.r_[False, bad[:-1]])
    ends = np.flatnonzero(bad & ~np.r_[bad[1:], False])
    for s, e in zip(starts, ends, strict=True):
        codes = sorted({int(v) for v in flags[s : e + 1]}) if flags is not None else []
        detail = {
            "until_s": float(t[e]),
            "samples": int(e - s + 1),
            "validflag": codes,
            "meaning": [VALIDFLAG_MEANING.get(c, "invalid") for c in codes],
            "stored_as": "NULL amplitude (NaN), not interpolated",
        }
        rows.append((float(t[s]), EVENT_SOURCE, "invalid_samples", json.dumps(detail)))
    return rows


# -- text traces ----------------------------------------------------------------------------
def _plan_ground_truth(trace: Trace, path: Path, cfg: dict[str, Any], out_log: Path) -> _Plan:
    t_src = np.asarray(trace.t_s, dtype=float)
    t = t_src - t_src[0]
    xyz = np.asarray(trace.values[:, :3], dtype=float)
    rows = [
        (
            "samples",
            (
                GROUND_TRUTH_DEVICE,
                i,
                float(t[i]),
                float(t_src[i]),
                float(xyz[i, 0]),
                float(xyz[i, 1]),
                float(xyz[i, 2]),
            ),
        )
        for i in range(len(t))
    ]
    fmt = "6dof-text" if trace.kind == "6dof" else f"{trace.format}-3d"
    notes = ["ground truth (internal target), not a surrogate: replay has no surrogate to gate on"]
    meta = _meta(path, path.name, fmt, t_src[0]) | {
        "ground_truth": (
            f"samples of device {GROUND_TRUTH_DEVICE} are the internal target's position "
            "(IEC LR, SI, AP mm), truth for QA, not a surrogate"
        ),
    }
    if trace.kind == "6dof":
        rot = float(np.max(np.abs(trace.values[:, 3:6]))) if trace.values.shape[1] >= 6 else 0.0
        meta["ground_truth_rotations_max_deg"] = repr(rot)
        notes.append(f"rotations not stored (largest |rotation| {rot:.2f} deg)")
    summary = ImportSummary(
        source=path.name,
        format=fmt,
        log=str(out_log),
        duration_s=float(t[-1]),
        samples=len(t),
        device=GROUND_TRUTH_DEVICE,
        notes=notes,
    )
    devices = [(GROUND_TRUTH_DEVICE, "ground_truth_trace", f"imported:{path.name}")]
    return _Plan(fmt, cfg, devices, meta, rows, summary)


def _plan_resp(trace: Trace, path: Path, cfg: dict[str, Any], out_log: Path) -> _Plan:
    t_src = np.asarray(trace.t_s, dtype=float)
    t = t_src - t_src[0]
    value = np.asarray(trace.values[:, 0], dtype=float)
    _adapt_config(cfg, RESP_DEVICE, "surrogate_trace", _rate(None, t))
    rows: list[tuple[str, tuple]] = [("events", (0.0, "operator", "enable", _enable_detail(None)))]
    rows += [
        ("samples", (RESP_DEVICE, i, float(t[i]), float(t_src[i]), None, None, float(value[i])))
        for i in range(len(t))
    ]
    fmt = "1d-text"
    meta = _meta(path, path.name, fmt, t_src[0]) | {
        "import_amplitude": "the value column -> samples.ap_mm (surrogate, AP axis), mm"
    }
    summary = ImportSummary(
        source=path.name,
        format=fmt,
        log=str(out_log),
        duration_s=float(t[-1]),
        samples=len(t),
        device=RESP_DEVICE,
        notes=["a 1-D surrogate without beam state: replayed as a what-if"],
    )
    devices = [(RESP_DEVICE, "surrogate_trace", f"imported:{path.name}")]
    return _Plan(fmt, cfg, devices, meta, rows, summary)


# -- KIM ------------------------------------------------------------------------------------
def _plan_kim(kim: KimLog, path: Path, cfg: dict[str, Any], out_log: Path) -> _Plan:
    t_src = np.asarray(kim.t_s, dtype=float)
    t = t_src - t_src[0]
    centroid = np.asarray(kim.centroid_mm, dtype=float)
    n_markers = kim.n_markers
    rows = []
    for i in range(len(t)):
        lr, si, ap = (float(v) for v in centroid[i])
        rows.append(
            (
                "fiducials",
                (
                    KIM_DEVICE,
                    int(kim.frame[i]),
                    float(t[i]),
                    float(t[i]),
                    "kim",
                    1,
                    "",
                    lr,
                    si,
                    ap,
                    None,
                    None,
                    None,
                    n_markers,
                    None,
                    None,
                ),
            )
        )
    segments = sorted({int(s) for s in kim.segment})
    fmt = "kim-marker-log" if path.is_file() else "kim-marker-session"
    meta = _meta(path, path.name, fmt, t_src[0]) | {
        "import_kim": (
            "fiducials: device kim, mode kim, accepted, marker centroid (IEC LR, SI, AP mm), "
            "t = t_acq = KIM time - first frame time; gantry angle, 2-D panel positions and "
            "scores not stored; couch shifts subtracted (couchShifts.txt) for a session folder"
        ),
        "kim_markers": str(n_markers),
        "kim_couch_segments": ",".join(map(str, segments)),
    }
    summary = ImportSummary(
        source=path.name,
        format=fmt,
        log=str(out_log),
        duration_s=float(t[-1]),
        fiducials=len(t),
        device=KIM_DEVICE,
        notes=[f"{n_markers} markers per frame, centroid stored; couch segments {segments}"],
    )
    devices = [(KIM_DEVICE, "kim_kv_imaging", f"imported:{path.name}")]
    return _Plan(fmt, cfg, devices, meta, rows, summary)


# -- shared ---------------------------------------------------------------------------------
def _rate(header_value: str | None, t: np.ndarray) -> float:
    rate = math.nan
    if header_value:
        try:
            rate = float(header_value)
        except ValueError:
            rate = math.nan
    if not (math.isfinite(rate) and rate > 0) and len(t) > 1:
        rate = 1.0 / float(np.median(np.diff(t)))
    return float(min(200.0, max(1.0, rate if math.isfinite(rate) else 30.0)))


def _adapt_config(cfg: dict[str, Any], device: str, kind: str, rate_hz: float) -> None:
    """The imported surrogate as the config's surrogate device (AP axis, its rate; 1-D)."""
    cfg["tracking"]["surrogate_device"] = device
    cfg["tracking"]["surrogate_axis"] = "AP"
    cfg["tracking"]["surrogate_rate_hz"] = rate_hz
    cfg["tracking"]["predictor_inputs"] = "axis"  # 1-D: no other axes to help the predictor
    cfg["devices"][device] = {
        "kind": kind,
        "stale_timeout_s": round(1.5 / rate_hz, 6),
        "imported": True,
    }
    # No imported format carries X-ray images: a replay must not wait for them.
    cfg["devices"]["xray"]["enabled"] = False


def _enable_detail(first_on: float | None) -> str:
    why = "synthetic, for the what-if replay: the source records no operator; enabled at the " + (
        "first recorded TTL beam-on" if first_on is not None else "first sample"
    )
    return json.dumps({"who": "import", "value": None, "old": False, "note": why})


def _meta(path: Path, name: str, fmt: str, t_origin: float) -> dict[str, str]:
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
    else:
        for child in sorted(path.iterdir()):
            if child.is_file():
                digest.update(child.name.encode("utf-8") + b"\0" + child.read_bytes())
    return {
        "source_file": name,
        "source_format": fmt,
        "source_sha256": digest.hexdigest(),
        "imported_utc": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "import_time_origin": f"t = source time - {float(t_origin)!r} s (the first sample)",
        "import_decisions": (
            "none: the log is replayed as a what-if; the recorded beam state, if any, is in "
            "beam_edges"
        ),
    }


_TIME_COLUMN = {"samples": 2, "events": 0, "beam_edges": 0, "fiducials": 2}


def _row_time(item: tuple[str, tuple]) -> float:
    table, row = item
    return row[_TIME_COLUMN[table]]


def _write(plan: _Plan, out_log: Path) -> None:
    writer = SessionLogWriter(out_log, plan.cfg, t0=time.monotonic(), commit_interval_s=0.05)
    try:
        for name, kind, address in plan.devices:
            writer.device(name, kind, address)
        for key, value in plan.meta.items():
            writer.set_meta(key, value)
        for table, row in plan.rows:
            writer.add(table, row)
    except BaseException:
        writer.close()
        out_log.unlink(missing_ok=True)
        raise
    writer.close()
    if writer.failed is not None:
        out_log.unlink(missing_ok=True)
        raise OSError(f"{out_log}: the session log could not be written: {writer.failed}")
