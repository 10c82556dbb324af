"""Importers: RPM .vxp, KIM marker logs and 6-DoF traces into verifiable session logs."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from motionctl.importers import ImportRefused, import_file
from motionctl.integrity import verify
from motionctl.kim import read_kim_log, read_kim_session
from motionctl.replay import replay
from motionctl.report import write_report

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATIENT_ID = "PX-93571-ZZ"
STUDY_DATE = "08-30-2007"
RATE = 30
N = 1200  # 40 s: the predictor learns (~15 s) after the gaps, so the what-if gates
INVALID = {range(100, 106): -1, range(250, 253): -2}  # lost track, non-periodic


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (../shared/data beside the repo)")
    return path


def _flag(i: int) -> int:
    return next((flag for span, flag in INVALID.items() if i in span), 0)


def write_vxp(path: Path, version: str) -> dict:
    """A synthetic RPM file as the data README documents the header. Gate output (ttlout)
    on at end-exhale; the linac's beam-on feedback (ttlin) follows it 2 samples later."""
    layout = "amplitude,phase,timestamp,validflag,ttlin,mark"
    if version == "1.6":
        layout += ",ttlout"
    lines = [
        "[Header]",
        "CRC=27051                 ; checksum",
        f"Version={version}",
        f"Data_layout={layout}",
        f"Patient_ID={PATIENT_ID}",
        f"Date={STUDY_DATE}            ; mm-dd-yyyy",
        "Total_study_time=15.0",
        f"Samples_per_second={RATE}",
        "Scale_factor=10.0         ; amplitude unit cm -> mm",
        "[Data]",
    ]
    amp = [0.4 * math.cos(2 * math.pi * (i / RATE) / 4.0) for i in range(N)]  # cm
    gate = [1 if a < -0.2 else 0 for a in amp]
    beam = [0, 0] + gate[:-2]
    for i in range(N):
        fields = [
            f"{amp[i]:.4f}",
            f"{(i / RATE / 4.0 % 1) * 2 * math.pi:.4f}",
            str(5000 + round(1000 * i / RATE)),
            str(_flag(i)),
            str(beam[i] if version == "1.6" else gate[i]),
            "P" if i % 120 == 0 else "",
        ]
        if version == "1.6":
            fields.append(str(gate[i]))
        lines.append(",".join(fields))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"amp_mm": np.array(amp) * 10, "gate": gate, "beam": beam, "lines": lines}


def _edges(signal: list[int]) -> list[tuple[int, int]]:
    """(sample index, state) of each change; an on first sample counts as an edge."""
    out = [(0, 1)] if signal[0] else []
    out += [(i, signal[i]) for i in range(1, len(signal)) if signal[i] != signal[i - 1]]
    return out


@pytest.mark.parametrize("version", ["1.6", "1.5"])
def test_vxp_round_trips_into_a_verifiable_what_if_log(tmp_path, version):
    source = tmp_path / f"rpm_{PATIENT_ID}_fraction1.vxp"  # the ID in the name, as sites do
    made = write_vxp(source, version)
    log = tmp_path / "imported.sqlite"
    summary = import_file(source, log)

    assert verify(log).ok
    assert summary.format == f"varian-rpm-vxp-{version}"
    assert summary.samples == N and summary.invalid_samples == 9 and summary.invalid_gaps == 2
    # 1.6: the gate output (ttlout) is the recorded beam state; 1.5 has only ttlin.
    assert summary.ttl_source == ("ttlout" if version == "1.6" else "ttlin")

    db = sqlite3.connect(log)
    t = [r[0] for r in db.execute("SELECT t FROM samples ORDER BY seq")]
    assert t[0] == 0.0 and t[1] == pytest.approx(1 / RATE, abs=1e-3)
    # the amplitude (cm x Scale_factor) on the AP axis; invalid samples NULL, never filled in
    ap = [r[0] for r in db.execute("SELECT ap_mm FROM samples ORDER BY seq")]
    for i, value in enumerate(ap):
        if _flag(i):
            assert value is None
        else:
            assert value == pytest.approx(made["amp_mm"][i], abs=1e-3)
    gaps = db.execute(
        "SELECT t, detail FROM events WHERE source='import' AND kind='invalid_samples' ORDER BY t"
    ).fetchall()
    assert [json.loads(d)["samples"] for _, d in gaps] == [6, 3]
    assert [json.loads(d)["validflag"] for _, d in gaps] == [[-1], [-2]]
    assert gaps[0][0] == pytest.approx(t[100])
    # the recorded TTL as beam edges (the gate column), and ttlin kept apart in 1.6
    edges = db.execute("SELECT t, beam_on FROM beam_edges WHERE source='rpm_ttl' ORDER BY t")
    assert [(round(a, 4), b) for a, b in edges] == [
        (round(t[i], 4), s) for i, s in _edges(made["gate"])
    ]
    ttlin = db.execute("SELECT COUNT(*) FROM beam_edges WHERE source='rpm_ttlin'").fetchone()[0]
    assert ttlin == (len(_edges(made["beam"])) if version == "1.6" else 0)
    assert db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0
    meta = dict(db.execute("SELECT key, value FROM meta"))
    cfg = json.loads(db.execute("SELECT json FROM config").fetchone()[0])
    db.close()
    assert meta["patient_id_sha256"] == hashlib.sha256(PATIENT_ID.encode()).hexdigest()
    assert meta["source_file"] == "rpm_[patient-id]_fraction1.vxp"
    assert "Patient_ID" in meta["source_header_not_copied"]
    assert (
        cfg["tracking"]["surrogate_device"] == "rpm" and cfg["tracking"]["surrogate_axis"] == "AP"
    )
    # no patient identifier anywhere in the file's bytes (the WAL is checkpointed away)
    raw = log.read_bytes()
    assert PATIENT_ID.encode() not in raw and STUDY_DATE.encode() not in raw
    assert not Path(str(log) + "-wal").exists() or Path(str(log) + "-wal").stat().st_size == 0

    # replay treats it as a what-if: a decision at every sample, holds on the invalid gap
    result = replay(log)
    assert result.what_if and result.verified and result.decisions_compared == 0
    assert any("no decisions" in note for note in result.notes)
    assert result.duty_cycle is not None and 0 < result.duty_cycle < 1
    assert "not_finite:rpm" in result.holds_by_reason  # the NULL samples hold the beam

    # and the report shows the recorded beam state, with no TG-142 verdict it cannot give
    report = write_report([log], tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text("utf-8")
    assert report.sessions[0].tg142 == "NOT ASSESSED" and report.sessions[0].what_if
    assert "recorded (rpm_ttl)" in text and "WHAT-IF" in text
    assert PATIENT_ID not in text


def test_truncated_vxp_is_refused_with_its_line_and_leaves_no_log(tmp_path):
    source = tmp_path / "cut.vxp"
    made = write_vxp(source, "1.6")
    text = "\n".join(made["lines"][:200]) + "\n" + made["lines"][200][:9]  # cut mid-row
    source.write_text(text, encoding="utf-8")
    log = tmp_path / "cut.sqlite"
    with pytest.raises(ImportRefused) as info:
        import_file(source, log)
    assert "cut.vxp:201:" in str(info.value) and "expected 7 fields" in str(info.value)
    assert info.value.line == 201
    assert not log.exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "unknown trace format"),
        (b"patient,fraction,dose\nX,1,2.0\n", "unknown trace format"),
        (b"", "empty file"),
        (b"SQLite format 3\x00" + bytes(200), "SQLite database"),
        (b'"Frame";"Timestamp";"x";"y";"z"\n6;100;1,0;2,0;3,0\n12;200;1,1;2,1;3,1\n', "not IEC"),
    ],
)
def test_foreign_files_are_refused_with_the_reason(tmp_path, content, why):
    source = tmp_path / "other.dat"
    source.write_bytes(content)
    log = tmp_path / "x.sqlite"
    with pytest.raises(ImportRefused, match=why) as info:
        import_file(source, log)
    assert "other.dat:1:" in str(info.value)
    assert not log.exists()


def test_an_existing_log_is_never_overwritten(tmp_path):
    source = tmp_path / "a.vxp"
    write_vxp(source, "1.5")
    log = tmp_path / "a.sqlite"
    log.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        import_file(source, log)
    assert log.read_bytes() == b"precious"


@pytest.mark.data
def test_real_kim_marker_log_becomes_the_fiducial_stream(tmp_path):
    source = shared(
        "kim-qa-trajectories", "Test Files", "Varian", "Dynamic", "Large_SI",
        "MarkerLocationsGA_CouchShift_0.txt",
    )  # fmt: skip
    kim = read_kim_log(source)
    log = tmp_path / "kim.sqlite"
    summary = import_file(source, log)
    assert verify(log).ok
    assert summary.fiducials == len(kim.t_s) > 100
    db = sqlite3.connect(log)
    rows = db.execute(
        "SELECT frame_id, t, t_acq, mode, accepted, lr_mm, si_mm, ap_mm, n_seeds FROM fiducials "
        "ORDER BY n"
    ).fetchall()
    db.close()
    assert {r[3] for r in rows} == {"kim"} and {r[4] for r in rows} == {1}
    assert [r[0] for r in rows] == kim.frame.tolist()
    t = np.array([r[1] for r in rows])
    np.testing.assert_allclose(t, kim.t_s - kim.t_s[0])
    assert [r[1] for r in rows] == [r[2] for r in rows]
    np.testing.assert_allclose(np.array([r[5:8] for r in rows]), kim.centroid_mm)
    assert {r[8] for r in rows} == {kim.n_markers}
    result = replay(log)  # fed to the core as X-ray frames; nothing to gate on
    assert result.what_if and result.verified


@pytest.mark.data
def test_real_kim_session_folder_subtracts_couch_shifts(tmp_path):
    folder = shared(
        "kim-qa-trajectories", "Test Files", "Varian", "Tx interrupt", "Baseline_cardiac"
    )
    kim = read_kim_session(folder)
    log = tmp_path / "kim_session.sqlite"
    summary = import_file(folder, log)
    assert verify(log).ok and summary.format == "kim-marker-session"
    assert summary.fiducials == len(kim.t_s)
    db = sqlite3.connect(log)
    xyz = np.array(db.execute("SELECT lr_mm, si_mm, ap_mm FROM fiducials ORDER BY n").fetchall())
    meta = dict(db.execute("SELECT key, value FROM meta"))
    db.close()
    np.testing.assert_allclose(xyz, kim.centroid_mm)
    assert meta["kim_couch_segments"] == "0,1"


@pytest.mark.data
@pytest.mark.parametrize(
    "parts",
    [
        ("kim-qa-trajectories", "Robot traces", "LiverTraj_LargeSI70s_robot.txt"),
        ("interact-paired-internal-external", "LARK_liver", "1.Mean_motion_1_092.txt"),
    ],
    ids=["kim-qa-robot", "lark-liver"],
)
def test_real_6dof_trace_is_a_ground_truth_channel(tmp_path, parts):
    source = shared(*parts)
    table = np.loadtxt(source)
    log = tmp_path / "gt.sqlite"
    summary = import_file(source, log)
    assert verify(log).ok
    assert summary.device == "ground_truth" and summary.samples == len(table)
    db = sqlite3.connect(log)
    rows = np.array(
        db.execute(
            "SELECT t, t_device, lr_mm, si_mm, ap_mm FROM samples WHERE device='ground_truth' "
            "ORDER BY seq"
        ).fetchall()
    )
    meta = dict(db.execute("SELECT key, value FROM meta"))
    db.close()
    np.testing.assert_allclose(rows[:, 1], table[:, 0])
    np.testing.assert_allclose(rows[:, 2:5], table[:, 1:4])  # x, y, z = LR, SI, AP
    assert "truth" in meta["ground_truth"] and "not a surrogate" in meta["ground_truth"]
    assert float(meta["ground_truth_rotations_max_deg"]) == pytest.approx(
        np.abs(table[:, 4:7]).max()
    )
    result = replay(log)
    assert result.what_if and result.verified
    # ground truth never stands in for the surrogate: the replayed gate has no data
    assert result.residual_samples == 0 and "no_data:surface" in result.holds_by_reason
