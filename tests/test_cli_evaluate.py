"""`motionctl evaluate` on real traces and on bad input."""

from __future__ import annotations

import json

import pytest
from conftest import shared_data

from motionctl.cli import main


def test_evaluate_prediction_json_per_trace_and_predictor(capsys):
    lark = shared_data("interact-paired-internal-external", "LARK_liver")
    trace = str(lark / "1.Mean_motion_1_092.txt")
    assert main(["evaluate", "prediction", trace, "--horizon", "0.4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["predictor"]: r for r in rows}
    assert {"none", "nlms", "ridge"} <= set(by_name)
    for r in rows:
        assert r["trace"] == trace and r["horizon_s"] == 0.4
        assert {"rmse_mm", "relative_rmse", "p95_mm", "jitter_mm"} <= set(r)
    assert by_name["none"]["relative_rmse"] == pytest.approx(1.0)
    assert by_name["ensemble"]["relative_rmse"] < by_name["nlms"]["relative_rmse"] < 1.0


def test_evaluate_correlation_json(capsys):
    lark = shared_data("interact-paired-internal-external", "LARK_liver")
    args = [
        "evaluate",
        "correlation",
        "--internal",
        str(lark / "2.Medium_complexity_093.txt"),
        "--surrogate",
        str(lark / "2.Medium_complexity_093_resp.txt"),
        "--imaging-period",
        "3",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["rms_3d_mm"] < 2.0 and result["p95_3d_mm"] >= result["rms_3d_mm"]
    assert result["n_images"] > 50


def test_unknown_format_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("# a comment\nx y z\n")
    assert main(["evaluate", "prediction", str(bad), "--horizon", "0.4"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "known formats" in err


def test_unknown_predictor_lists_the_known_ones(tmp_path, capsys):
    trace = tmp_path / "t.txt"
    trace.write_text("".join(f"{i * 0.2:.1f} {i % 7}\n" for i in range(400)))
    assert (
        main(["evaluate", "prediction", str(trace), "--horizon", "0.4", "--predictor", "oracle"])
        == 2
    )
    assert "ensemble" in capsys.readouterr().err


@pytest.mark.parametrize("geometry", ["stereo", "mono"])
def test_evaluate_detection_reports_rates_and_errors(capsys, geometry):
    # mono localises with the Gaussian learnt from the first 10 stereo positions
    args = ["evaluate", "detection", "--geometry", geometry, "--frames", "16", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["geometry"] == geometry and result["frames"] > 0
    if geometry == "stereo":
        assert result["detection_rate"] > 0.9 and result["false_lock_rate"] == 0.0
        assert result["rms_3d_mm"] < 0.3
    else:
        assert result["accepted_rate"] > 0.5 and result["rms_3d_mm"] < 1.5


def test_evaluate_kim_log_against_its_robot_trace(capsys):
    kim = shared_data("kim-qa-trajectories")
    session = kim / "Test Files" / "Varian" / "Dynamic" / "Large_SI"
    trace = kim / "Robot traces" / "LiverTraj_LargeSI70s_robot.txt"
    assert main(["evaluate", "kim-log", str(session), "--trace", str(trace), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_frames"] > 500 and result["rms_3d_mm"] < 1.0 and result["kim_qa_pass"]
