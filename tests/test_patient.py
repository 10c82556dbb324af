"""The simulated patient: breathing statistics, hysteresis, surrogate, events, traces, config.

The statistics are measured from ``state(t)`` sampled as a device simulator would, not taken
from the model's internals, so that they check what the rig will actually see.
"""

from __future__ import annotations

import math
import random
import threading
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import find_peaks

from motionctl.simulators.patient import (
    LujanParams,
    LujanPatient,
    PatientState,
    TraceParams,
    TracePatient,
    patient_from_config,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LARK = DATA / "interact-paired-internal-external" / "LARK_liver"

# The [patient] table as the design issue specifies it: the config keys and their defaults.
PATIENT_TOML = """
[patient]
model = "lujan"
seed = 1
period_s = 4.0
period_cv = 0.10
amplitude_mm = [1.5, 12.0, 4.0]
amplitude_cv = 0.10
shape_n = 2
exhale_mm = [0.0, 0.0, 0.0]
drift_mm_per_min = [0.0, 0.5, 0.0]
hysteresis_rad = 0.35
cough_per_min = 0.0
deep_breath_per_min = 0.0
pause_per_min = 0.0
breath_hold_per_min = 0.0
breath_hold_s = 20.0
lung_volume_l = 0.6
surrogate_lead_s = 0.15
surrogate_amplitude_mm = [0.5, 1.0, 8.0]
surrogate_noise_mm = 0.1
surrogate_drift_mm_per_min = [0.0, 0.0, 0.3]
trace = ""
surrogate_trace = ""
"""

FS = 25.0  # Hz, a surface camera's rate
LONG_S = 600.0


def default_section() -> dict:
    return tomllib.loads(PATIENT_TOML)["patient"]


class Run:
    """``state(t)`` sampled on a regular grid, as arrays."""

    def __init__(self, patient, duration_s: float, fs: float = FS):
        self.fs = fs
        self.t = np.arange(0.0, duration_s, 1.0 / fs)
        states = [patient.state(float(t)) for t in self.t]
        self.target = np.array([s.target_mm for s in states])
        self.surrogate = np.array([s.surrogate_mm for s in states])
        self.volume = np.array([s.lung_volume_l for s in states])
        self.hold = np.array([s.breath_hold for s in states])

    @property
    def si(self) -> np.ndarray:
        return self.target[:, 1]


def inhale_peaks(run: Run, params: LujanParams) -> np.ndarray:
    """Sample indices of end-inhale (SI minima) of each breathing cycle."""
    idx, _ = find_peaks(
        -run.si,
        distance=int(0.5 * params.period_s * run.fs),
        prominence=0.4 * params.amplitude_mm[1],
    )
    return idx


def cycle_amplitudes(run: Run, params: LujanParams) -> tuple[np.ndarray, np.ndarray]:
    """(SI peak-to-peak, end-exhale SI level) of each cycle, from each end-inhale back to the
    highest (end-exhale) point since the previous end-inhale."""
    peaks = inhale_peaks(run, params)
    exhale = np.array([run.si[a:b].max() for a, b in zip(peaks[:-1], peaks[1:], strict=True)])
    return exhale - run.si[peaks[1:]], exhale


def detrend(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return x - np.polyval(np.polyfit(t, x, 1), t)


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def lag_of_peak_correlation(a: np.ndarray, b: np.ndarray, fs: float, max_lag_s: float) -> float:
    """The lag tau (s) maximising corr(a(t), b(t + tau)): positive when b follows a."""
    lags = range(-int(max_lag_s * fs), int(max_lag_s * fs) + 1)
    n = len(a)

    def corr(k: int) -> float:
        x, y = (a[: n - k], b[k:]) if k >= 0 else (a[-k:], b[: n + k])
        return np.corrcoef(x, y)[0, 1]

    best = max(lags, key=corr)
    return best / fs


@pytest.fixture(scope="module")
def params() -> LujanParams:
    return LujanParams()


@pytest.fixture(scope="module")
def long_run(params) -> Run:
    return Run(LujanPatient(params, seed=1), LONG_S)


# -- breathing statistics -----------------------------------------------------------------------


def test_mean_period_and_its_variation(long_run, params):
    intervals = np.diff(inhale_peaks(long_run, params)) / long_run.fs
    assert intervals.mean() == pytest.approx(params.period_s, rel=0.05)
    # End-inhale sits mid-cycle, so an interval is half of one cycle plus half of the next:
    # its CV is period_cv / sqrt(2).
    cv = intervals.std() / intervals.mean()
    assert cv == pytest.approx(params.period_cv / math.sqrt(2), rel=0.35)


def test_mean_amplitude_and_its_variation(long_run, params):
    p2p, _ = cycle_amplitudes(long_run, params)
    assert len(p2p) > 100
    assert p2p.mean() == pytest.approx(params.amplitude_mm[1], rel=0.10)
    assert p2p.std() / p2p.mean() == pytest.approx(params.amplitude_cv, rel=0.35)


def test_no_variation_when_cvs_are_zero(params):
    steady = replace(params, period_cv=0.0, amplitude_cv=0.0)
    run = Run(LujanPatient(steady, seed=1), 120.0)
    intervals = np.diff(inhale_peaks(run, steady)) / run.fs
    p2p, _ = cycle_amplitudes(run, steady)
    assert np.ptp(intervals) <= 1.01 / run.fs
    assert np.ptp(p2p) < 0.05


def test_baseline_drift_from_end_exhale_levels(long_run, params):
    peaks = inhale_peaks(long_run, params)
    _, exhale = cycle_amplitudes(long_run, params)
    t_cycle = long_run.t[peaks[1:]]
    slope_mm_per_min = np.polyfit(t_cycle, exhale, 1)[0] * 60.0
    assert slope_mm_per_min == pytest.approx(params.drift_mm_per_min[1], rel=0.25)


def time_near_exhale_and_inhale(params: LujanParams) -> tuple[float, float]:
    """Fractions of time in the quarter of the excursion nearest exhale and nearest inhale."""
    run = Run(LujanPatient(replace(params, drift_mm_per_min=(0.0, 0.0, 0.0)), seed=2), 300.0)
    depth = (params.exhale_mm[1] - run.si) / params.amplitude_mm[1]
    return float(np.mean(depth < 0.25)), float(np.mean(depth > 0.75))


def test_end_exhale_is_the_rest_position(params):
    near_exhale, near_inhale = time_near_exhale_and_inhale(params)
    assert near_exhale > 1.5 * near_inhale
    # A larger n lengthens the end-exhale rest; n = 1 (sin^2) is symmetric.
    longer_rest, _ = time_near_exhale_and_inhale(replace(params, shape_n=4))
    assert longer_rest > near_exhale + 0.05
    sym_exhale, sym_inhale = time_near_exhale_and_inhale(replace(params, shape_n=1))
    assert sym_exhale == pytest.approx(sym_inhale, abs=0.05)


def test_target_moves_inferior_and_anterior_on_inhale(long_run, params):
    peak = inhale_peaks(long_run, params)[5]
    rest = int(peak - 0.5 * params.period_s * long_run.fs)  # end-exhale before this inhale
    moved = long_run.target[peak] - long_run.target[rest]
    assert moved[1] < -0.5 * params.amplitude_mm[1]
    assert moved[2] > 0.3 * params.amplitude_mm[2]
    surface_moved = long_run.surrogate[peak] - long_run.surrogate[rest]
    assert surface_moved[2] > 0.5 * params.surrogate_amplitude_mm[2]  # abdomen rises


def loop_area_per_cycle(params: LujanParams) -> float:
    """Signed area (mm^2) enclosed per cycle by the SI-AP trajectory (shoelace formula)."""
    run = Run(LujanPatient(params, seed=3), 120.0, fs=50.0)
    si, ap = run.target[:, 1], run.target[:, 2]
    area = 0.5 * np.sum(si[:-1] * ap[1:] - si[1:] * ap[:-1])
    return float(area / (120.0 / params.period_s))


def test_hysteresis_opens_the_si_ap_loop(params):
    still = replace(params, drift_mm_per_min=(0.0, 0.0, 0.0))
    with_loop = loop_area_per_cycle(still)
    without = loop_area_per_cycle(replace(still, hysteresis_rad=0.0))
    assert abs(with_loop) > 1.0  # mm^2 per cycle, for 12 mm SI x 4 mm AP
    assert abs(without) < 0.01 * abs(with_loop)


def test_ap_lags_si_by_the_hysteresis_phase(params):
    run = Run(LujanPatient(params, seed=4), 120.0, fs=100.0)
    lag = lag_of_peak_correlation(-run.si, run.target[:, 2], run.fs, 0.6)
    expected = params.hysteresis_rad / (2 * math.pi) * params.period_s
    assert lag == pytest.approx(expected, abs=0.04)


# -- surrogate and lung volume ------------------------------------------------------------------


def test_surrogate_correlates_with_target_but_is_not_a_copy(long_run):
    # The drifts of target and surface are deliberately independent; correlate the breathing.
    ap = detrend(long_run.surrogate[:, 2], long_run.t)
    si = detrend(long_run.si, long_run.t)
    r = np.corrcoef(ap, si)[0, 1]
    assert -0.999 < r < -0.9


def test_surrogate_leads_the_target(params):
    run = Run(LujanPatient(params, seed=5), 120.0, fs=100.0)
    lag = lag_of_peak_correlation(run.surrogate[:, 2], -run.si, run.fs, 0.6)
    assert lag == pytest.approx(params.surrogate_lead_s, abs=0.03)


def test_surrogate_noise_and_drift(long_run, params):
    # Sample-to-sample differences of LR are dominated by the white noise: sd * sqrt(2).
    lr_steps = np.diff(long_run.surrogate[:, 0])
    assert lr_steps.std() / math.sqrt(2) == pytest.approx(params.surrogate_noise_mm, rel=0.25)
    ap_slope = np.polyfit(long_run.t, long_run.surrogate[:, 2], 1)[0] * 60.0
    assert ap_slope == pytest.approx(params.surrogate_drift_mm_per_min[2], abs=0.1)


def test_lung_volume_follows_the_breathing(long_run, params):
    volume = long_run.volume
    peaks = inhale_peaks(long_run, params)
    assert volume.min() > -0.01
    assert volume[peaks].mean() == pytest.approx(params.lung_volume_l, rel=0.1)
    r = np.corrcoef(volume, detrend(long_run.surrogate[:, 2], long_run.t))[0, 1]
    assert r > 0.99
    assert not long_run.hold.any()


# -- determinism --------------------------------------------------------------------------------

EVENTFUL = LujanParams(
    cough_per_min=3.0, deep_breath_per_min=1.0, pause_per_min=1.0, breath_hold_per_min=0.5
)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    times=st.lists(st.floats(0.0, 400.0, allow_nan=False), min_size=1, max_size=30),
)
def test_same_seed_same_states_in_any_query_order(seed, times):
    in_order = LujanPatient(EVENTFUL, seed)
    expected = {t: in_order.state(t) for t in sorted(times)}
    shuffled = LujanPatient(EVENTFUL, seed)
    shuffled.state(max(times) + 100.0)  # generate far ahead first
    for t in reversed(times):
        assert shuffled.state(t) == expected[t]


def test_concurrent_callers_see_the_same_patient():
    times = [i * 0.037 for i in range(4000)]
    serial = [LujanPatient(EVENTFUL, 9).state(t) for t in times]
    shared = LujanPatient(EVENTFUL, 9)
    results: dict[int, list[PatientState]] = {}

    def worker(k: int) -> None:
        order = times[:]
        random.Random(k).shuffle(order)
        got = {t: shared.state(t) for t in order}
        results[k] = [got[t] for t in times]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[k] == serial for k in range(4))


def test_different_seeds_differ(params):
    a, b = LujanPatient(params, 1), LujanPatient(params, 2)
    times = np.arange(10.0, 60.0, 0.5)
    assert any(a.state(t).target_mm != b.state(t).target_mm for t in times)
    assert a.state(30.0).surrogate_mm != b.state(30.0).surrogate_mm


def test_state_rejects_negative_or_nan_time(params):
    patient = LujanPatient(params)
    for t in (-0.01, math.nan, math.inf):
        with pytest.raises(ValueError, match="t must be"):
            patient.state(t)


# -- irregular events ---------------------------------------------------------------------------


def test_coughs_are_short_sharp_spikes(params):
    coughing = replace(params, cough_per_min=6.0)
    quiet, noisy = Run(LujanPatient(params, 7), 300.0), Run(LujanPatient(coughing, 7), 300.0)
    # Coughs draw from their own random stream, so the breathing underneath is unchanged.
    si_jolt = noisy.si - quiet.si
    spikes = runs_of(si_jolt > 1.0)
    assert 15 <= len(spikes) <= 50  # Poisson, mean 30
    assert max(b - a for a, b in spikes) / noisy.fs < 0.6
    assert si_jolt.max() > 0.4 * params.amplitude_mm[1]  # superior kick
    assert (noisy.target[:, 2] - quiet.target[:, 2]).min() < -1.0  # posterior
    assert (noisy.surrogate[:, 2] - quiet.surrogate[:, 2]).min() < -2.0  # the surface sees it
    assert np.mean(np.abs(si_jolt) > 0.01) < 0.2  # and between coughs nothing changed


def test_deep_breaths_are_visible(long_run, params):
    sighing = replace(params, deep_breath_per_min=2.0)
    run = Run(LujanPatient(sighing, 1), LONG_S)
    p2p, _ = cycle_amplitudes(run, sighing)
    deep = p2p[p2p > 1.5 * params.amplitude_mm[1]]
    assert 8 <= len(deep) <= 35  # Poisson, mean ~19
    assert np.median(deep) == pytest.approx(1.8 * params.amplitude_mm[1], rel=0.15)
    regular, _ = cycle_amplitudes(long_run, params)
    assert np.sum(regular > 1.5 * params.amplitude_mm[1]) == 0


def rest_runs_s(run: Run, params: LujanParams) -> list[float]:
    """Durations of stretches resting at end-exhale (within 0.2 mm of the exhale level)."""
    at_exhale = np.abs(run.si - params.exhale_mm[1]) < 0.2
    return [(b - a) / run.fs for a, b in runs_of(at_exhale)]


def test_pauses_rest_at_end_exhale(params):
    still = replace(params, drift_mm_per_min=(0.0, 0.0, 0.0))
    pausing = replace(still, pause_per_min=2.0)
    pauses = [d for d in rest_runs_s(Run(LujanPatient(pausing, 8), 300.0), still) if d > 3.0]
    assert 4 <= len(pauses) <= 20  # Poisson, mean ~9
    assert max(pauses) < 2.0 * params.period_s + 1.5  # 1-2 periods, plus the usual rest
    assert not [d for d in rest_runs_s(Run(LujanPatient(still, 8), 300.0), still) if d > 3.0]


def test_breath_holds_freeze_the_target_near_end_inhale(params):
    holding = replace(params, breath_hold_per_min=1.0, breath_hold_s=15.0)
    run = Run(LujanPatient(holding, 11), LONG_S)
    speed = np.abs(np.gradient(run.si, 1.0 / run.fs))
    baseline = params.exhale_mm[1] + params.drift_mm_per_min[1] * run.t / 60.0
    deep = run.si < baseline - 0.6 * params.amplitude_mm[1]
    frozen = [(a, b) for a, b in runs_of((speed < 0.2) & deep) if (b - a) / run.fs > 5.0]
    assert 3 <= len(frozen) <= 12
    for a, b in frozen:
        assert (b - a) / run.fs == pytest.approx(15.0, rel=0.1)
        assert run.hold[a + 5 : b - 5].all()
        # The surface marker and the lung volume hold too (apart from noise and the leak).
        assert np.ptp(run.surrogate[a + 5 : b - 10, 2]) < 2.0
        assert run.volume[a:b].min() > 0.5 * params.lung_volume_l
    held = [(b - a) / run.fs for a, b in runs_of(run.hold)]
    assert len(held) == len(frozen)
    assert held == pytest.approx([15.0] * len(held), abs=0.05)


# -- trace mode ---------------------------------------------------------------------------------


def write_6dof(tmp_path: Path, n: int = 50, dt: float = 0.2) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(n) * dt
    values = np.column_stack([t, rng.normal(0.0, 3.0, (n, 6))])
    path = tmp_path / "internal.txt"
    np.savetxt(path, values, fmt="%.6f")
    return path, np.round(values, 6)


def test_trace_reproduces_its_samples_and_loops(tmp_path):
    path, rows = write_6dof(tmp_path)
    patient = TracePatient(TraceParams(trace=str(path), surrogate_noise_mm=0.0))
    loop_s = rows[-1, 0] + 0.2  # the loop closes over one sample interval
    for k in range(len(rows)):
        for n_loops in (0, 1, 7):
            got = patient.state(rows[k, 0] + n_loops * loop_s).target_mm
            np.testing.assert_allclose(got, rows[k, 1:4], atol=1e-9)
    # Between the last sample and the restart the trace runs linearly back to the first.
    between = patient.state(rows[-1, 0] + 0.1).target_mm
    np.testing.assert_allclose(between, (rows[-1, 1:4] + rows[0, 1:4]) / 2, atol=1e-9)
    # And linearly between samples.
    np.testing.assert_allclose(
        patient.state(rows[3, 0] + 0.05).target_mm,
        0.75 * rows[3, 1:4] + 0.25 * rows[4, 1:4],
        atol=1e-9,
    )


def test_trace_derived_surrogate_leads_and_scales_the_si(tmp_path):
    path, rows = write_6dof(tmp_path)
    params = TraceParams(trace=str(path), surrogate_lead_s=0.2, surrogate_noise_mm=0.0)
    patient = TracePatient(params)
    scale = params.surrogate_amplitude_mm[2] / params.amplitude_mm[1]
    for k in range(len(rows) - 1):
        state = patient.state(rows[k, 0])
        assert state.surrogate_mm[2] == pytest.approx(-rows[k + 1, 2] * scale, abs=1e-9)
        assert state.surrogate_mm[:2] == (0.0, 0.0)
        assert not state.breath_hold
    noisy = TracePatient(replace(params, surrogate_noise_mm=0.3), seed=4)
    lr = np.array([noisy.state(t).surrogate_mm[0] for t in np.arange(0, 200, 0.04)])
    assert lr.std() == pytest.approx(0.3, rel=0.1)


def test_trace_1d_internal_and_paired_surrogate(tmp_path):
    internal = tmp_path / "si.txt"
    internal.write_text("0 0\n1 -10\n2 -4\n3 0\n")
    resp = tmp_path / "si_resp.txt"
    resp.write_text("0 0\n1 5\n2 2\n3 0\n")
    patient = TracePatient(
        TraceParams(
            trace=str(internal),
            surrogate_trace=str(resp),
            surrogate_noise_mm=0.0,
            lung_volume_l=0.5,
        )
    )
    state = patient.state(1.5)
    assert state.target_mm == pytest.approx((0.0, -7.0, 0.0))
    assert state.surrogate_mm == pytest.approx((0.0, 0.0, 3.5))  # replayed as is: no lead
    volumes = [patient.state(t).lung_volume_l for t in np.arange(0.0, 4.0, 0.05)]
    assert min(volumes) == pytest.approx(0.0, abs=0.02)
    assert max(volumes) == pytest.approx(0.5, rel=0.1)


def test_trace_surrogate_must_be_2_column(tmp_path):
    path, _ = write_6dof(tmp_path)
    with pytest.raises(ValueError, match="patient.surrogate_trace"):
        TracePatient(TraceParams(trace=str(path), surrogate_trace=str(path)))


@pytest.mark.data
@pytest.mark.skipif(not LARK.is_dir(), reason=f"real trace data not present at {LARK}")
def test_lark_liver_pair_replays():
    internal = LARK / "1.Mean_motion_1_092.txt"
    resp = LARK / "1.Mean_motion_1_092_resp.txt"
    section = default_section() | {
        "model": "trace",
        "trace": str(internal),
        "surrogate_trace": str(resp),
    }
    patient = patient_from_config(section)
    assert isinstance(patient, TracePatient)
    rows = np.loadtxt(internal)
    for k in range(0, len(rows), 97):
        np.testing.assert_allclose(patient.state(rows[k, 0]).target_mm, rows[k, 1:4], atol=1e-9)
    run = Run(patient, 300.0, fs=5.0)
    assert np.corrcoef(run.surrogate[:, 2], run.si)[0, 1] < -0.8
    assert np.percentile(run.volume, 50) > 0.0


# -- config -------------------------------------------------------------------------------------


def test_default_config_builds_the_default_lujan_patient():
    patient = patient_from_config(default_section())
    assert isinstance(patient, LujanPatient)
    assert patient.params == LujanParams()  # lists from TOML become tuples; same defaults
    assert patient.seed == 1


def test_config_builds_a_trace_patient(tmp_path):
    path, rows = write_6dof(tmp_path)
    patient = patient_from_config(default_section() | {"model": "trace", "trace": str(path)})
    assert isinstance(patient, TracePatient)
    np.testing.assert_allclose(patient.state(rows[2, 0]).target_mm, rows[2, 1:4], atol=1e-9)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("period_s", -4.0),
        ("period_s", 0),
        ("period_s", "4"),
        ("period_cv", -0.1),
        ("amplitude_mm", [1.0, 12.0]),
        ("amplitude_mm", [1.0, -12.0, 4.0]),
        ("amplitude_cv", 1.5),
        ("shape_n", 0),
        ("shape_n", 1.5),
        ("exhale_mm", [0.0, "x", 0.0]),
        ("drift_mm_per_min", [0.0, math.nan, 0.0]),
        ("hysteresis_rad", 4.0),
        ("cough_per_min", -1.0),
        ("breath_hold_per_min", -0.5),
        ("breath_hold_s", 0.0),
        ("lung_volume_l", -0.6),
        ("surrogate_noise_mm", -0.1),
        ("surrogate_lead_s", math.inf),
        ("model", "spline"),
        ("seed", -1),
        ("seed", True),
        ("trace", 3),
    ],
)
def test_config_rejects_a_bad_value_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"patient\.{key}\b"):
        patient_from_config(default_section() | {key: value})


def test_config_trace_problems_name_the_key(tmp_path):
    trace = default_section() | {"model": "trace"}
    with pytest.raises(ValueError, match=r"patient\.trace\b"):
        patient_from_config(trace)  # model = "trace" but no trace file
    with pytest.raises(ValueError, match=r"patient\.trace: cannot read"):
        patient_from_config(trace | {"trace": str(tmp_path / "absent.txt")})
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n0.2 oops\n")
    with pytest.raises(ValueError, match=rf"patient\.trace: {bad}:2: column 2"):
        patient_from_config(trace | {"trace": str(bad)})
    good, _ = write_6dof(tmp_path)
    with pytest.raises(ValueError, match=rf"patient\.surrogate_trace: {bad}:2:"):
        patient_from_config(trace | {"trace": str(good), "surrogate_trace": str(bad)})


def test_config_rejects_missing_and_unknown_keys():
    section = default_section()
    del section["breath_hold_s"]
    with pytest.raises(ValueError, match=r"patient\.breath_hold_s is missing"):
        patient_from_config(section)
    with pytest.raises(ValueError, match=r"patient\.perod_s is not"):
        patient_from_config(default_section() | {"perod_s": 4.0})


def test_params_validate_when_built_directly():
    with pytest.raises(ValueError, match=r"patient\.period_s"):
        LujanParams(period_s=-1.0)
    with pytest.raises(ValueError, match=r"patient\.trace"):
        TraceParams()
    assert LujanParams(amplitude_mm=[1, 2, 3]).amplitude_mm == (1.0, 2.0, 3.0)
