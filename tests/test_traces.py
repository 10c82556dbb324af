"""Trace readers: the 6-DoF and 2-column text formats, their error reports, and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from motionctl.traces import Trace, TraceFormatError, read_trace

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LARK = DATA / "interact-paired-internal-external" / "LARK_liver"
ROBOT = DATA / "kim-qa-trajectories" / "Robot traces"


def write(tmp_path: Path, text: str, name: str = "trace.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_6dof(tmp_path):
    path = write(
        tmp_path,
        "0 0 0 0 -0 0 0\n0.2 0.0258 0.1341 -0.0041 -0.0001 0.017 0.0019\n"
        "\n# a comment line\n0.4 1 -2.5 3 4 5 6\n",
    )
    trace = read_trace(path)
    assert trace.kind == "6dof"
    assert trace.source == str(path)
    np.testing.assert_array_equal(trace.t_s, [0.0, 0.2, 0.4])
    assert trace.values.shape == (3, 6)
    np.testing.assert_array_equal(trace.values[2], [1, -2.5, 3, 4, 5, 6])
    assert trace.values[1, 1] == pytest.approx(0.1341)  # column y = SI


def test_reads_2_column_with_tabs_and_crlf(tmp_path):
    path = write(tmp_path, "0\t0\r\n0.2\t0.0139\r\n0.4\t-1e-1\r\n")
    trace = read_trace(str(path))
    assert trace.kind == "1d"
    assert trace.values.shape == (3, 1)
    np.testing.assert_allclose(trace.values[:, 0], [0.0, 0.0139, -0.1])


def test_arrays_are_read_only(tmp_path):
    trace = read_trace(write(tmp_path, "0 1\n1 2\n"))
    with pytest.raises(ValueError):
        trace.values[0, 0] = 5.0


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("0 0 0 0 0 0 0\n0.2 0 0.1 abc 0 0 0\n", 2, "column 4: 'abc' is not a number"),
        ("0 1\n0.2 2\n0.4 3 4\n", 3, "expected 2 columns, found 3"),
        ("0 1 2 3\n0.2 1 2 3\n", 1, "unknown trace format: 4 columns"),
        ("0 1\n0.2 2\n\n0.1 3\n", 4, "time 0.1 s is not after 0.2 s on line 2"),
        ("0 1\n0.2 2\n0.2 3\n", 3, "is not after"),
        ("0 1\n0.2 nan\n", 2, "not a finite number"),
        ("# only a comment\n0 1\n", 2, "at least 2 samples"),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path, text, "bad_trace.txt")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert what in message
    assert info.value.line == line
    assert isinstance(info.value, ValueError)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        read_trace(tmp_path / "absent.txt")


# -- real data ---------------------------------------------------------------------------------

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real trace data not present at {DATA} (../shared/data)"
)


def check_regular_grid(trace: Trace, dt: float) -> None:
    assert np.all(np.diff(trace.t_s) > 0)
    assert np.median(np.diff(trace.t_s)) == pytest.approx(dt)


@pytest.mark.data
@needs_data
def test_lark_liver_pairs_read():
    internals = sorted(p for p in LARK.glob("*.txt") if not p.name.endswith("_resp.txt"))
    assert len(internals) == 3
    for internal_path in internals:
        internal = read_trace(internal_path)
        resp = read_trace(internal_path.with_name(internal_path.stem + "_resp.txt"))
        assert (internal.kind, resp.kind) == ("6dof", "1d")
        check_regular_grid(internal, 0.2)
        np.testing.assert_array_equal(internal.t_s, resp.t_s)
        assert 300 <= internal.t_s[-1] <= 360
        # SI (column y) carries the largest motion: 13-30 mm peak-to-peak in these patients.
        p2p = np.ptp(internal.values[:, :3], axis=0)
        assert p2p.argmax() == 1 and 10 < p2p[1] < 35
        # The external partner moves the opposite way to SI (inhale: SI down, surface up).
        assert np.corrcoef(internal.values[:, 1], resp.values[:, 0])[0, 1] < -0.8


@pytest.mark.data
@needs_data
def test_kim_robot_liver_traces_read():
    paths = sorted(ROBOT.glob("LiverTraj_*_robot.txt"))
    assert len(paths) >= 8
    for path in paths:
        trace = read_trace(path)
        assert trace.kind == "6dof"
        assert trace.values.shape == (len(trace.t_s), 6)
        check_regular_grid(trace, 0.2)
        assert trace.t_s[-1] > 200
