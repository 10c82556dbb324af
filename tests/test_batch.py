"""Batch QA over a folder: local processes, and the same work on a Dask cluster."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from motionctl.batch import SUMMARY_FIELDS, run_batch
from motionctl.config import load_config
from motionctl.replay import stale_timeouts
from motionctl.session import OperatorCommand, SessionCore
from motionctl.sessionlog import SessionLogWriter
from motionctl.simulators.patient import patient_from_config
from motionctl.types import DeviceEvent, SurrogateSample

RATE_HZ = 30.0
LATENCY_S = 0.0002


def synthetic_log(path: Path, seconds: float, seed: int) -> Path:
    """A session log without sockets: the simulated patient's surface marker fed to a
    SessionCore as the controller feeds it, recorded through SessionLogWriter (hash chain)."""
    cfg = load_config(
        None,
        [
            f"patient.seed={seed}",
            "patient.drift_mm_per_min=[0.0, 0.0, 0.0]",
            "devices.xray.enabled=false",  # surrogate only
            "gating.hold_while_prediction_learns=false",  # seconds long: gate from the start
        ],
    )
    patient = patient_from_config(cfg["patient"])
    writer = SessionLogWriter(path, cfg, t0=0.0)
    writer.device("surface", "igtl_tracker", "synthetic")
    core = SessionCore(cfg, writer.add, stale_timeout_s=stale_timeouts(cfg))

    def decide(t: float, latency: float | None) -> None:
        core.set_beam_fault(t, None)
        decision = core.decide(t, new_sample=latency is not None)
        if decision is not None:
            writer.add(
                "decisions", (decision.t, int(decision.beam_enabled), decision.reason_text, latency)
            )

    core.on_device_event(DeviceEvent("surface", 0.01, "connected", "synthetic"))
    decide(0.0101, None)
    enabled = False
    t_rx = 0.0
    for k in range(int(seconds * RATE_HZ)):
        t_rx = k / RATE_HZ + 0.001
        if not enabled and t_rx > 1.0:
            core.on_command(1.0, OperatorCommand("enable", who="test"))
            decide(1.00002, None)
            enabled = True
        surrogate = patient.state(k / RATE_HZ).surrogate_mm
        core.on_surrogate(SurrogateSample("surface", k, 1.7e9 + k / RATE_HZ, t_rx, surrogate))
        decide(t_rx + LATENCY_S, LATENCY_S)
    writer.add("decisions", (t_rx + 0.001, 0, "session_stopped", None))
    writer.close()
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two good logs and one corrupt file (a log cut short, as a failed copy leaves it)."""
    root = tmp_path_factory.mktemp("logs")
    synthetic_log(root / "a_patient.sqlite", 12.0, seed=1)
    synthetic_log(root / "b_patient.sqlite", 8.0, seed=2)
    data = (root / "a_patient.sqlite").read_bytes()
    (root / "c_corrupt.sqlite").write_bytes(data[: len(data) // 3])
    (root / "notes.txt").write_text("not a log: listed as skipped\n")
    return root


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_batch_reports_every_log_and_the_failure_without_stopping(folder, tmp_path):
    out = tmp_path / "qa"
    summary = run_batch(folder, out, workers=2)
    assert summary.mode == "processes" and summary.workers == 2
    rows = _csv(out / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_FIELDS)
    assert [r["file"] for r in rows] == ["a_patient.sqlite", "b_patient.sqlite", "c_corrupt.sqlite"]
    good, other, bad = rows
    for row in (good, other):
        assert row["status"] == "ok" and row["error"] == ""
        assert row["verified"] == "True" and row["divergences"] == "0"
        assert int(row["decisions_compared"]) > 200
        assert 0 < float(row["duty_cycle"]) < 1 and float(row["residual_p95_mm"]) > 0
        assert row["tg142"] in ("PASS", "FAIL")
    assert float(good["duration_s"]) == pytest.approx(12.0, abs=0.1)
    assert float(other["duration_s"]) == pytest.approx(8.0, abs=0.1)
    assert bad["status"] == "failed" and "truncated" in bad["error"]
    assert "c_corrupt.sqlite" in bad["error"] and str(folder) not in bad["error"]
    for name in ("a_patient.html", "b_patient.html"):
        text = (out / name).read_text("utf-8")
        assert "data:image/png;base64," in text and "TG-142" in text
    assert summary.exit_status == 2  # a log could not be reviewed
    assert [r["file"] for r in summary.failed] == ["c_corrupt.sqlite"]


def test_dask_cluster_gives_the_same_summary_rows(folder, tmp_path):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    local = run_batch(folder, tmp_path / "local", workers=1)
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        remote = run_batch(folder, tmp_path / "dask", scheduler=cluster.scheduler_address)
    assert remote.mode == "dask"
    assert remote.rows == local.rows
    assert (tmp_path / "dask" / "summary.csv").read_bytes() == (
        tmp_path / "local" / "summary.csv"
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "dask").glob("*.html")) == sorted(
        p.name for p in (tmp_path / "local").glob("*.html")
    )


def test_a_log_saved_under_another_name_is_reviewed_and_other_files_are_listed(tmp_path):
    # Only *.sqlite was taken: a log saved as .db was passed over without a word.
    logs = tmp_path / "logs"
    logs.mkdir()
    synthetic_log(logs / "saved.db", 4.0, seed=3)
    (logs / "notes.txt").write_text("not a log\n")
    summary = run_batch(logs, tmp_path / "qa", workers=1)
    assert [r["file"] for r in summary.rows] == ["saved.db"]
    assert summary.rows[0]["status"] == "ok" and summary.rows[0]["report"] == "saved.db.html"
    assert summary.skipped == ["notes.txt"]
    assert (tmp_path / "qa" / "saved.db.html").is_file()


def test_an_empty_folder_gives_an_empty_summary(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = run_batch(empty, tmp_path / "out")
    assert summary.rows == [] and summary.exit_status == 0
    assert _csv(tmp_path / "out" / "summary.csv") == []
    with pytest.raises(FileNotFoundError):
        run_batch(tmp_path / "missing", tmp_path / "out2")


def test_batch_input_is_left_untouched(folder, tmp_path):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    run_batch(copy, copy, workers=1)  # the output folder may be the input folder
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.name in before} == before
