"""Trace readers: the 6-DoF and 2-column text formats, their error reports, and real files."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from motionctl.traces import (
    KNOWN_FORMATS,
    Trace,
    TraceFormatError,
    breathing_inputs,
    breathing_signal,
    read_trace,
)

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


# -- Trace fields added for the new formats ----------------------------------------------------


def test_trace_built_from_the_four_original_fields_is_all_valid():
    trace = Trace(np.array([0.0, 1.0]), np.array([[1.0], [2.0]]), "1d", "made")
    np.testing.assert_array_equal(trace.valid, [True, True])
    assert trace.valid.dtype == bool
    assert dict(trace.columns) == {} and dict(trace.meta) == {}
    assert trace.format == "text"
    with pytest.raises(ValueError):
        trace.valid[0] = False


def test_trace_extra_columns_are_read_only_and_checked():
    phase = np.array([0.1, 0.2])
    trace = Trace(np.array([0.0, 1.0]), np.zeros((2, 1)), "1d", "made", columns={"phase": phase})
    with pytest.raises(ValueError):
        trace.columns["phase"][0] = 5.0
    with pytest.raises(TypeError):
        trace.columns["other"] = phase  # type: ignore[index]
    phase[0] = 9.0  # the caller's own array stays writable
    with pytest.raises(ValueError, match="column 'phase'"):
        Trace(np.array([0.0, 1.0]), np.zeros((2, 1)), "1d", "made", columns={"phase": phase[:1]})
    with pytest.raises(ValueError, match="valid"):
        Trace(np.array([0.0, 1.0]), np.zeros((2, 1)), "1d", "made", valid=np.array([1, 0]))


def test_text_fast_path_reads_the_same_numbers_as_float(tmp_path):
    rng = np.random.default_rng(3)
    rows = np.column_stack([np.arange(500) * 0.2, rng.normal(0, 7, (500, 6))])
    lines = [" ".join(repr(float(v)) for v in row) for row in rows]
    lines.insert(10, "# a comment in the middle")
    lines[20] += "  # trailing comment"
    trace = read_trace(write(tmp_path, "\n".join(lines) + "\n"))
    assert trace.kind == "6dof" and trace.format == "text"
    np.testing.assert_array_equal(trace.t_s, rows[:, 0])
    np.testing.assert_array_equal(trace.values, rows[:, 1:])  # exact, not approximate


# -- Varian RPM .vxp ---------------------------------------------------------------------------

# The header exactly as in the data README's reference (lines 1-10), then [Data] rows at 11.
VXP_16_HEADER = """\
[Header]
CRC=27051                 ; checksum
Version=1.6
Data_layout=amplitude,phase,timestamp,validflag,ttlin,mark,ttlout
Patient_ID=000000
Date=08-30-2007           ; mm-dd-yyyy
Total_study_time=247.582  ; s
Samples_per_second=30     ; NTSC 30 or 15, CCIR 25 or 12.5
Scale_factor=10.0         ; amplitude unit cm -> mm
[Data]
"""
VXP_16_ROWS = """\
-0.6249,3.0659,111424,0,1,,0
-0.6198,3.1169,111458,0,1,P,0
-0.6168,3.1916,111491,-1,1,,1
0.1500,3.2500,111524,-2,0,Z,0
0.2000,3.3000,111558,0,0,,0
"""
VXP_15 = """\
[Header]
CRC=4242 ; checksum
Version=1.5
Data_layout=amplitude,phase,timestamp,validflag,ttlin,mark
Patient_ID=000001
Date=01-15-2006
Total_study_time=0.1
Samples_per_second=30
Scale_factor=10.0
[Data]
-0.6249,3.0659,111424,0,1,
-0.6198,3.1169,111458,0,1,P
-0.6168,3.1916,111491,-1,1,
"""


def test_reads_vxp_16(tmp_path):
    path = write(tmp_path, VXP_16_HEADER + VXP_16_ROWS, "session.vxp")
    trace = read_trace(path)
    assert (trace.kind, trace.format, trace.source) == ("1d", "vxp", str(path))
    np.testing.assert_allclose(trace.t_s, [111.424, 111.458, 111.491, 111.524, 111.558])
    np.testing.assert_allclose(trace.values[:, 0], [-6.249, -6.198, -6.168, 1.5, 2.0])  # cm -> mm
    np.testing.assert_array_equal(trace.valid, [True, True, False, False, True])
    np.testing.assert_array_equal(trace.columns["mark"], [0, 2, 0, 1, 0])  # "", P, "", Z, ""
    np.testing.assert_array_equal(trace.columns["validflag"], [0, 0, -1, -2, 0])
    np.testing.assert_array_equal(trace.columns["ttlin"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(trace.columns["ttlout"], [0, 0, 1, 0, 0])
    np.testing.assert_allclose(trace.columns["phase"], [3.0659, 3.1169, 3.1916, 3.25, 3.3])
    assert set(trace.columns) == {"phase", "validflag", "ttlin", "mark", "ttlout"}
    # The header as read, with the `;` comments stripped.
    assert trace.meta["CRC"] == "27051"
    assert trace.meta["Date"] == "08-30-2007"
    assert trace.meta["Scale_factor"] == "10.0"
    assert trace.meta["Version"] == "1.6"
    with pytest.raises(ValueError):
        trace.columns["mark"][0] = 1


def test_reads_vxp_15_with_crlf_and_no_ttlout(tmp_path):
    path = tmp_path / "old.vxp"
    path.write_bytes(VXP_15.replace("\n", "\r\n").encode())
    trace = read_trace(path)
    assert trace.format == "vxp" and trace.meta["Version"] == "1.5"
    np.testing.assert_allclose(trace.t_s, [111.424, 111.458, 111.491])
    np.testing.assert_allclose(trace.values[:, 0], [-6.249, -6.198, -6.168])
    np.testing.assert_array_equal(trace.valid, [True, True, False])
    np.testing.assert_array_equal(trace.columns["mark"], [0, 2, 0])
    assert "ttlout" not in trace.columns


def test_vxp_scale_factor_is_applied_and_defaults_to_10(tmp_path):
    one = read_trace(write(tmp_path, VXP_16_HEADER.replace("=10.0 ", "=1.0  ") + VXP_16_ROWS))
    np.testing.assert_allclose(one.values[:, 0], [-0.6249, -0.6198, -0.6168, 0.15, 0.2])
    # No Scale_factor and no Data_layout: amplitude in cm (x 10) and the 1.6 standard order.
    header = "".join(
        line + "\n"
        for line in VXP_16_HEADER.splitlines()
        if not line.startswith(("Scale_factor", "Data_layout"))
    )
    bare = read_trace(write(tmp_path, header + VXP_16_ROWS, "bare.vxp"))
    assert "Scale_factor" not in bare.meta
    np.testing.assert_allclose(bare.values[:, 0], [-6.249, -6.198, -6.168, 1.5, 2.0])
    np.testing.assert_array_equal(bare.columns["ttlout"], [0, 0, 1, 0, 0])


def test_vxp_follows_the_data_layout_order(tmp_path):
    text = """\
[Header]
Version=1.6
Data_layout=timestamp, amplitude ,validflag
Scale_factor=10
[Data]
1000,0.5,0
1040,0.7,-1

1080,0.6,0
"""
    trace = read_trace(write(tmp_path, text, "reordered.vxp"))
    np.testing.assert_allclose(trace.t_s, [1.0, 1.04, 1.08])
    np.testing.assert_allclose(trace.values[:, 0], [5.0, 7.0, 6.0])
    np.testing.assert_array_equal(trace.valid, [True, False, True])
    assert set(trace.columns) == {"validflag"}


@pytest.mark.parametrize(
    ("old", "new", "line", "what"),
    [
        ("Version=1.6", "Version=1.7", 3, "VXP version '1.7' is not supported"),
        ("Version=1.6", "Version=2", 3, "knows 1.5 and 1.6"),
        ("Version=1.6\n", "", 1, "no Version in [Header]"),
        ("=amplitude,phase,", "=phase,", 4, "Data_layout has no 'amplitude'"),
        ("phase,timestamp,", "phase,", 4, "Data_layout has no 'timestamp'"),
        (",ttlout\n", ",beam\n", 4, "Data_layout: unknown column 'beam'"),
        (",ttlout\n", ",phase\n", 4, "Data_layout: 'phase' repeated"),
        ("Scale_factor=10.0", "Scale_factor=ten", 9, "Scale_factor 'ten' is not a positive"),
        ("Scale_factor=10.0", "Scale_factor=0", 9, "Scale_factor '0' is not a positive"),
        ("Scale_factor=10.0", "Scale_factor=nan", 9, "is not a positive number"),
        ("Patient_ID=000000", "Patient_ID", 5, "expected key=value in [Header]"),
        ("Patient_ID=000000", "CRC=1", 5, "CRC given twice (first on line 2)"),
        ("Patient_ID=000000", "[Extra]", 5, "unexpected section [Extra]"),
        ("[Data]\n" + VXP_16_ROWS, "", 9, "no [Data] line after [Header]"),
        ("[Data]\n", "", 10, "expected key=value in [Header], found '-0.6249,"),
        ("111458,0,1,P,0", "111458,0,1,P", 12, "expected 7 fields (amplitude, phase,"),
        ("111491,-1,1,,1", "111491,-1,1,,1,", 13, "found 8"),
        ("-0.6198,", "abc,", 12, "column 1 (amplitude): 'abc' is not a number"),
        ("0.1500,3.2500", "0.1500,", 14, "column 2 (phase): '' is not a number"),
        ("-0.6168,", "nan,", 13, "column 1 (amplitude): 'nan' is not a finite number"),
        ("111558,0,0,,0", "111558,0,0,X,0", 15, "column 6 (mark): 'X' is not empty, 'Z' or 'P'"),
        ("111491", "111400", 13, "timestamp 111400 ms is not after 111458 ms on line 12"),
    ],
)
def test_vxp_errors_name_file_and_line(tmp_path, old, new, line, what):
    text = VXP_16_HEADER + VXP_16_ROWS
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1), "bad.vxp")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert what in str(info.value)


def test_vxp_first_bad_line_wins_across_columns(tmp_path):
    rows = VXP_16_ROWS.replace("111524", "x1").replace("-0.6168", "y2")  # lines 14 and 13
    with pytest.raises(TraceFormatError, match=r":13: column 1 \(amplitude\): 'y2'"):
        read_trace(write(tmp_path, VXP_16_HEADER + rows))


def test_vxp_needs_two_samples(tmp_path):
    with pytest.raises(TraceFormatError, match=r":11: a trace needs at least 2 samples, found 1"):
        read_trace(write(tmp_path, VXP_16_HEADER + VXP_16_ROWS.splitlines()[0] + "\n"))
    with pytest.raises(TraceFormatError, match="found 0"):
        read_trace(write(tmp_path, VXP_16_HEADER))


# -- ExtMarker CSV -----------------------------------------------------------------------------

EXTMARKER = """\
"Frame";"Timestamp";"x";"y";"z"\r
0;0;-490,7;4,1;64,7\r
6;100;-490,5;4,3;66,2\r
13;217;-490,25;4,3;69,9\r
19;0,6333333333;-490,5;4,2;66,0\r
25;417;-490,6;4,1;64,1\r
0;0;0;0;0\r
"""


def test_reads_extmarker_with_decimal_comma_and_trailer(tmp_path):
    path = write(tmp_path, EXTMARKER, "201205101519-LAC-1-T-222-6.csv")
    trace = read_trace(path)
    assert (trace.kind, trace.format) == ("marker3d", "extmarker")
    # Time from Frame/60, including the row whose Timestamp is corrupt (0,633 for 316.7 ms).
    np.testing.assert_allclose(trace.t_s, np.array([0, 6, 13, 19, 25]) / 60.0)
    assert trace.values.shape == (5, 3)  # the 0;0;0;0;0 trailer is dropped
    np.testing.assert_allclose(trace.values[3], [-490.5, 4.2, 66.0])
    np.testing.assert_allclose(trace.values[2], [-490.25, 4.3, 69.9])
    np.testing.assert_array_equal(trace.columns["frame"], [0, 6, 13, 19, 25])
    np.testing.assert_allclose(trace.columns["timestamp_ms"], [0, 100, 217, 0.6333333333, 417])
    assert trace.valid.all()


def test_extmarker_keeps_a_last_row_that_is_not_all_zero(tmp_path):
    trace = read_trace(write(tmp_path, EXTMARKER.replace("0;0;0;0;0\r\n", "")))
    assert len(trace.t_s) == 5
    trace = read_trace(write(tmp_path, EXTMARKER.replace("0;0;0;0;0", "31;517;0;0;0")))
    assert len(trace.t_s) == 6 and trace.values[-1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("old", "new", "line", "what"),
    [
        ("13;217;", "0;0;0;0;0\r\n13;217;", 4, "Frame 0 is not after 6 on line 3"),
        ("0;0;0;0;0\r\n", "0;0;0;0;0\r\n0;0;0;0;0\r\n", 7, "Frame 0 is not after 25 on line 6"),
        ("13;217;-490,25;4,3;69,9", "13;217;-490,25;4,3", 4, "expected 5 fields (Frame,"),
        ("-490,5;4,2", "-490.5.1;4,2", 5, "column 3 (x): '-490.5.1' is not a number"),
        ("13;217", "13,5;217", 4, "Frame 13.5 is not a whole number"),
    ],
)
def test_extmarker_errors_name_file_and_line(tmp_path, old, new, line, what):
    assert old in EXTMARKER
    path = write(tmp_path, EXTMARKER.replace(old, new, 1), "bad.csv")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert what in str(info.value)


def test_extmarker_refuses_a_frame_clock_that_is_not_60_hz(tmp_path):
    rows = "".join(f"{6 * k};{200 * k};1;2;{3 + k % 2}\n" for k in range(10))  # 30 Hz frames
    with pytest.raises(TraceFormatError, match=r":3: Timestamp disagrees with Frame/60 s"):
        read_trace(write(tmp_path, '"Frame";"Timestamp";"x";"y";"z"\n' + rows))


# -- HexaMotion --------------------------------------------------------------------------------


def test_reads_hexamotion_into_iec(tmp_path):
    text = "trajectory\n1.000000\t2.000000\t3.000000\r\n-1.5\t0.5\t-2.0\r\n0\t0\t0\r\n"
    trace = read_trace(write(tmp_path, text, "hexa_case.txt"))
    assert (trace.kind, trace.format) == ("3d", "hexamotion")
    np.testing.assert_allclose(trace.t_s, [0.0, 0.02, 0.04])
    # File: LR (+right), IS (+superior), PA (+anterior) -> IEC x = -LR (+left), y = IS, z = PA.
    np.testing.assert_array_equal(trace.values, [[-1.0, 2.0, 3.0], [1.5, 0.5, -2.0], [0, 0, 0]])


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("trajectory\n1 2 3\n4 5\n", 3, "expected 3 fields (LR, IS, PA), found 2"),
        ("trajectory\n1 2 3\n4 5 z\n", 3, "column 3 (PA): 'z' is not a number"),
        ("trajectory\n1 2 3\n", 2, "at least 2 samples, found 1"),
    ],
)
def test_hexamotion_errors_name_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert what in str(info.value)


# -- detection by content ----------------------------------------------------------------------

SAMPLES = {
    "6dof": ("0 0 0 0 0 0 0\n0.2 1 2 3 4 5 6\n", "text"),
    "1d": ("# resp\n0 0\n0.2 1\n", "text"),
    "vxp": (VXP_16_HEADER + VXP_16_ROWS, "vxp"),
    "vxp15": ("\n" + VXP_15, "vxp"),
    "extmarker": (EXTMARKER, "extmarker"),
    "hexamotion": ("trajectory\n1 2 3\n4 5 6\n", "hexamotion"),
}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
@pytest.mark.parametrize("name", ["trace.txt", "trace.vxp", "trace.csv", "trace.dat", "trace"])
def test_format_is_chosen_by_content_not_suffix(tmp_path, sample, name):
    text, expected = SAMPLES[sample]
    assert read_trace(write(tmp_path, text, name)).format == expected


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("hello world\n1 2\n", 1, "'hello world'"),
        ("\n# comment\nFrame;Time;x\n0;0;1\n", 3, "'Frame;Time;x'"),
        ("CRC=1234\nVERSION = 1.4\n", 1, "'CRC=1234'"),  # RPM DAT is not read
        ("Frame No, Time (sec), Gantry\n", 1, "'Frame No, Time (sec), Gantry'"),
        ("0 1 2 3\n0.2 1 2 3\n", 1, "4 columns"),
    ],
)
def test_unknown_format_names_file_line_and_known_formats(tmp_path, text, line, shown):
    path = write(tmp_path, text, "mystery.vxp")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: unknown trace format: ")
    assert shown in message
    for known in KNOWN_FORMATS:
        assert known in message
    assert len(KNOWN_FORMATS) == 5


def test_binary_file_is_an_unknown_format(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(TraceFormatError, match=r"image\.png:1: unknown trace format"):
        read_trace(path)


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.vxp"
    path.write_bytes(b"\xef\xbb\xbf" + (VXP_16_HEADER + VXP_16_ROWS).encode())
    assert read_trace(path).format == "vxp"


# -- breathing_signal --------------------------------------------------------------------------


def test_breathing_signal_takes_si_of_iec_traces(tmp_path):
    trace = read_trace(write(tmp_path, "0 1 2 3 4 5 6\n0.2 7 8 9 10 11 12\n"))
    t, value = breathing_signal(trace)
    assert t is trace.t_s
    np.testing.assert_array_equal(value, [2, 8])
    np.testing.assert_array_equal(breathing_signal(trace, "ap")[1], [3, 9])
    np.testing.assert_array_equal(breathing_signal(trace, "LR")[1], [1, 7])
    np.testing.assert_array_equal(breathing_signal(trace, 4)[1], [5, 11])  # ry
    value[0] = 99.0  # a new array: the trace is untouched
    assert trace.values[0, 1] == 2.0
    hexa = read_trace(write(tmp_path, "trajectory\n1 2 3\n4 5 6\n", "hexa.txt"))
    np.testing.assert_array_equal(breathing_signal(hexa)[1], [2, 5])
    np.testing.assert_array_equal(breathing_signal(hexa, "LR")[1], [-1, -4])


def test_breathing_signal_of_1d_trace_and_rpm_gaps_as_nan(tmp_path):
    resp = read_trace(write(tmp_path, "0 0.5\n0.2 1.5\n"))
    np.testing.assert_array_equal(breathing_signal(resp)[1], [0.5, 1.5])
    rpm = read_trace(write(tmp_path, VXP_16_HEADER + VXP_16_ROWS, "a.vxp"))
    t, value = breathing_signal(rpm)
    assert len(t) == len(value) == 5  # invalid samples are kept, as NaN
    np.testing.assert_allclose(value, [-6.249, -6.198, np.nan, np.nan, 2.0])
    assert not np.isnan(rpm.values).any()  # the trace itself keeps what was recorded


def test_breathing_inputs_add_the_other_translations_as_nan_where_invalid(tmp_path):
    trace = read_trace(write(tmp_path, "0 1 2 3 4 5 6\n0.2 7 8 9 10 11 12\n"))
    t, value, aux = breathing_inputs(trace)
    np.testing.assert_array_equal(value, breathing_signal(trace)[1])
    np.testing.assert_array_equal(aux, [[1, 3], [7, 9]])  # LR, AP; not the rotations
    np.testing.assert_array_equal(breathing_inputs(trace, "LR")[2], [[2, 3], [8, 9]])
    assert breathing_inputs(trace, 4)[2].shape == (2, 0)  # a rotation: no position partners
    rpm = read_trace(write(tmp_path, VXP_16_HEADER + VXP_16_ROWS, "a.vxp"))
    assert breathing_inputs(rpm)[2].shape == (5, 0)  # 1-D
    marker = read_trace(write(tmp_path, EXTMARKER, "m.csv"))
    t, value, aux = breathing_inputs(marker)
    np.testing.assert_array_equal(value, breathing_signal(marker)[1])
    assert aux.shape == (5, 2) and not np.isin(value, aux).all()
    cut = dataclasses.replace(marker, valid=np.array([True, False, True, True, True]))
    assert np.isnan(breathing_inputs(cut)[2][1]).all()


def test_breathing_signal_of_camera_frame_takes_largest_variance(tmp_path):
    trace = read_trace(write(tmp_path, EXTMARKER, "m.csv"))
    np.testing.assert_allclose(breathing_signal(trace)[1], [64.7, 66.2, 69.9, 66.0, 64.1])
    swapped = EXTMARKER.replace(";4,3;69,9", ";9,3;64,9")  # now y varies most
    np.testing.assert_allclose(breathing_signal(read_trace(write(tmp_path, swapped)))[1][2], 9.3)
    np.testing.assert_allclose(breathing_signal(trace, 0)[1][2], -490.25)


@pytest.mark.parametrize(
    ("sample", "axis", "what"),
    [
        ("extmarker", "SI", "no IEC axes"),
        ("1d", "SI", "no IEC axes"),
        ("1d", 1, "not a column index 0..0"),
        ("6dof", "XY", "is not one of LR, SI, AP"),
        ("6dof", 6, "not a column index 0..5"),
        ("6dof", -1, "not a column index"),
        ("6dof", True, "not a column index"),
        ("hexamotion", 1.0, "not a column index"),
    ],
)
def test_breathing_signal_refuses_an_axis_that_does_not_apply(tmp_path, sample, axis, what):
    trace = read_trace(write(tmp_path, SAMPLES[sample][0]))
    with pytest.raises(ValueError, match=what):
        breathing_signal(trace, axis)


# -- speed -------------------------------------------------------------------------------------


def test_300k_row_files_read_quickly(tmp_path):
    n = 300_000
    rng = np.random.default_rng(1)
    amplitude = rng.normal(0, 0.5, n)
    marks = np.where(np.arange(n) % 100 == 0, "Z", "")
    rows = [
        f"{a:.4f},1.5,{100000 + 33 * k},{-(k % 97 == 0)},0,{m},0"
        for k, (a, m) in enumerate(zip(amplitude, marks, strict=True))
    ]
    vxp = write(tmp_path, VXP_16_HEADER + "\n".join(rows) + "\n", "long.vxp")
    table = np.column_stack([np.arange(n) * 0.2, rng.normal(0, 5, (n, 6))])
    text = tmp_path / "long.txt"
    np.savetxt(text, table, fmt="%.5f")
    for path, rows_expected in ((vxp, n), (text, n)):
        start = time.perf_counter()
        trace = read_trace(path)
        elapsed = time.perf_counter() - start
        assert len(trace.t_s) == rows_expected
        assert elapsed < 1.0, f"{path.name}: {elapsed:.2f} s for {n} rows"
    assert read_trace(vxp).valid.sum() == n - len(range(0, n, 97))


# -- real data: ExtMarker and HexaMotion -----------------------------------------------------------

EXTMARKER_DIR = DATA / "extmarker-krilavicius"
HEXA_LUNG = ROBOT / "Hexa_TypicalLung_Tx.txt"
HEXA_DIR = ROBOT / "Hexamotion traces"


def file_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.data
@needs_data
def test_extmarker_real_files_read():
    paths = sorted(EXTMARKER_DIR.glob("*.csv"))
    assert len(paths) == 27
    total = trailers = 0
    frames_by_recording: dict[str, np.ndarray] = {}
    for path in paths:
        trace = read_trace(path)
        assert (trace.kind, trace.format) == ("marker3d", "extmarker")
        rows = file_rows(path)[1:]
        has_trailer = rows[-1] == "0;0;0;0;0"
        trailers += has_trailer
        assert len(trace.t_s) == len(rows) - has_trailer
        assert trace.columns["frame"][-1] > 0 and trace.values[-1].any()
        total += len(rows)
        steps = np.diff(trace.t_s)
        assert np.all(steps > 0)
        assert np.median(steps) == pytest.approx(0.1)  # 10 Hz
        np.testing.assert_allclose(np.unique(steps.round(6)), [0.1, 0.116667], atol=1e-6)
        # The breathing axis moves 3-45 mm peak to peak (data README).
        assert 2.5 < np.ptp(breathing_signal(trace)[1]) < 46
        recording = path.name.split("-")[0]
        frames = frames_by_recording.setdefault(recording, trace.columns["frame"])
        np.testing.assert_array_equal(trace.columns["frame"], frames)  # 3 markers, one clock
    assert (total, trailers) == (47_385, 15)  # data README: 47,385 rows, 15 trailer rows
    assert len(frames_by_recording) == 9


@pytest.mark.data
@needs_data
def test_extmarker_corrupt_timestamps_are_rebuilt_from_frames():
    paths = sorted(EXTMARKER_DIR.glob("201205101534-*.csv"))
    assert len(paths) == 3
    for path in paths:
        trace = read_trace(path)
        raw = trace.columns["timestamp_ms"]
        assert np.any(np.diff(raw) <= 0)  # the file's own Timestamp goes backwards ...
        steps = np.diff(trace.t_s)
        assert np.all(steps > 0)  # ... the rebuilt time does not
        assert np.all((np.abs(steps - 0.1) < 1e-9) | (np.abs(steps - 7 / 60) < 1e-9))
        disagree = np.abs(raw - trace.t_s * 1000) > 1.0
        assert disagree.sum() == 5  # frames 768, 774, 1352, 7533, 7539
        np.testing.assert_array_equal(
            trace.columns["frame"][disagree], [768, 774, 1352, 7533, 7539]
        )


@pytest.mark.data
@needs_data
def test_hexamotion_real_files_read_at_50_hz():
    paths = [HEXA_LUNG, *sorted(HEXA_DIR.glob("*.txt"))]
    assert len(paths) == 2
    for path in paths:
        trace = read_trace(path)
        assert (trace.kind, trace.format) == ("3d", "hexamotion")
        assert len(trace.t_s) == len(file_rows(path)) - 1
        np.testing.assert_allclose(np.diff(trace.t_s), 0.02, atol=1e-9)
        assert np.ptp(trace.values, axis=0).argmax() == 1  # SI moves most
    assert read_trace(HEXA_LUNG).t_s[-1] == pytest.approx(298.9)  # about 299 s


@pytest.mark.data
@needs_data
def test_hexamotion_liver_trace_is_the_robot_trace_mirrored_in_lr():
    # KIM-QA's ConvertRobot2Hexamotion.m copied the IEC robot columns unchanged into the
    # HexaMotion file, whose LR column is +right: read as IEC, LR comes out negated.
    hexa = read_trace(HEXA_DIR / "hexa_LiverTraj_BaselineWanderWithCardiac70s_robot.txt")
    robot = read_trace(ROBOT / "LiverTraj_BaselineWanderWithCardiac70s_robot.txt")
    every_10th = hexa.values[::10]  # 0.2 s robot grid
    assert len(every_10th) == len(robot.t_s)
    np.testing.assert_allclose(hexa.t_s[::10], robot.t_s, atol=1e-9)
    np.testing.assert_allclose(every_10th[:, 0], -robot.values[:, 0], atol=1e-6)
    np.testing.assert_allclose(every_10th[:, 1:], robot.values[:, 1:3], atol=1e-6)
