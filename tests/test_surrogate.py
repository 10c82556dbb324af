"""Surrogate processing: cycles, baseline and drift, phase, despiking, and bad samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from motionctl.surrogate import SurrogateParams, SurrogateProcessor, spike_window_samples


def breathing(t, period=4.0, amplitude=10.0, drift_mm_per_s=0.0):
    """cos^4-shaped breathing, inhale positive, end-exhale (0) at t = 0, period, 2*period..."""
    return amplitude * np.sin(np.pi * t / period) ** 4 + drift_mm_per_s * t


def run(t, x):
    proc = SurrogateProcessor()
    return [proc.step(float(a), float(b)) for a, b in zip(t, x, strict=True)]


def test_period_amplitude_and_phase_of_regular_breathing():
    t = np.arange(0, 60, 1 / 30)
    states = run(t, breathing(t, period=4.0, amplitude=10.0))
    last = states[-1]
    assert last.period_s == pytest.approx(4.0, abs=0.05)
    assert last.amplitude_mm == pytest.approx(10.0, rel=0.05)
    assert last.baseline_mm == pytest.approx(0.0, abs=0.2)
    assert last.irregularity < 0.05
    # end-exhale events fall near multiples of the period (the turn is confirmed later)
    exhales = [s.t for s in states if s.event == "end_exhale"]
    assert len(exhales) >= 12
    # phase rises through the cycle: 0.5 near end-inhale (t = 2 mod 4)
    at_inhale = [s.phase for s in states if s.t > 20 and abs((s.t % 4.0) - 2.0) < 0.02]
    assert np.median(at_inhale) == pytest.approx(0.5, abs=0.05)


def test_baseline_drift_rate():
    t = np.arange(0, 90, 1 / 25)
    states = run(t, breathing(t, drift_mm_per_s=0.05))
    assert states[-1].drift_mm_per_s == pytest.approx(0.05, rel=0.2)
    assert states[-1].baseline_mm == pytest.approx(0.05 * 86, abs=0.6)


def test_irregular_breathing_scores_higher():
    rng = np.random.default_rng(3)
    t = np.arange(0, 120, 1 / 30)
    # period and amplitude modulated per cycle
    phase = np.cumsum(1 / 30 / (4.0 * (1 + 0.25 * np.sin(t / 7))))
    x = (8 + 3 * np.sin(t / 5)) * np.sin(np.pi * phase) ** 4 + rng.normal(0, 0.1, t.size)
    regular = run(t, breathing(t))[-1].irregularity
    irregular = run(t, x)[-1].irregularity
    assert irregular > 3 * regular and irregular > 0.1


def test_a_spike_is_replaced_not_passed_on():
    t = np.arange(0, 20, 1 / 30)
    x = breathing(t)
    x[300] += 25.0
    states = run(t, x)
    assert "spike_replaced" in states[300].reasons
    assert abs(states[300].value_mm - breathing(t[300])) < 1.0


def test_a_fast_breath_sampled_at_5_hz_is_not_a_spike_but_a_glitch_still_is():
    # A large surrogate (55 mm peak to peak, as a LIGHT-SABR lung partner) at 5 Hz: with
    # 7 samples (1.4 s) in the Hampel window, the first samples of each inhale stood far
    # from the end-exhale plateau's median and were replaced and raised as jumps (each an
    # interlock and a predictor restart). The window now follows the rate.
    t = np.arange(0, 60, 1 / 5)
    x = breathing(t, period=4.0, amplitude=55.0) + np.random.default_rng(1).normal(0, 0.2, t.size)
    x[200] += 40.0  # and one genuine glitch

    def flagged(window: int) -> tuple[set[int], set[int]]:
        proc = SurrogateProcessor(SurrogateParams(spike_window=window))
        states = [proc.step(float(a), float(b)) for a, b in zip(t, x, strict=True)]
        spikes = {i for i, s in enumerate(states) if "spike_replaced" in s.reasons}
        return spikes, {i for i, s in enumerate(states) if "surrogate_jump" in s.reasons}

    assert spike_window_samples(30.0) == 7 and spike_window_samples(5.0) == 3
    spikes_7, _ = flagged(7)  # the old window at 5 Hz: ordinary breaths replaced
    spikes, jumps = flagged(spike_window_samples(5.0))
    assert jumps == {200} and 200 in spikes
    assert len(spikes) < len(spikes_7) / 4


def test_a_jump_is_a_step_faster_than_breathing_whatever_the_rate():
    # A 55 mm lung surrogate that leaves its end-exhale rest at 60 mm/s, the fastest of the
    # recorded surrogates: 12 mm between samples at 5 Hz, away from a flat median. In
    # samples ("5 mm in one sample") every inhale raised a jump at 5 Hz; in seconds
    # (100 mm/s) none does, at 5 Hz or 30 Hz, while a 40 mm step of the marker still is one.
    def jumps(rate: float, step_at: float | None = None) -> list[float]:
        t = np.arange(0, 40, 1 / rate)
        # per 4 s breath: rest until 1.5 s, up at 60 mm/s, down at 30 mm/s
        x = np.interp(t % 4.0, [0.0, 1.5, 1.5 + 55 / 60, 4.0 - 0.25, 4.0], [0, 0, 55, 0, 0])
        if step_at is not None:
            x[t >= step_at] += 40.0
        proc = SurrogateProcessor(SurrogateParams(spike_window=spike_window_samples(rate)))
        states = [proc.step(float(a), float(b)) for a, b in zip(t, x, strict=True)]
        return [float(a) for a, s in zip(t, states, strict=True) if "surrogate_jump" in s.reasons]

    assert jumps(5.0) == [] and jumps(30.0) == []
    for rate in (5.0, 30.0):  # the marker steps during an end-exhale rest
        assert jumps(rate, step_at=20.5)[:1] == [pytest.approx(20.5, abs=1 / rate)]


def test_a_jump_after_erratic_samples_is_still_a_jump():
    # bench_scenarios --seed 53: after a marker jump of -9.5 mm and back, a sample 18 mm
    # below the previous one (550 mm/s) and then one 17 mm above it again (130 mm/s) were
    # neither spikes nor jumps: the erratic samples in the Hampel window made its spike limit
    # 50 mm, and a jump had to be a spike too. The beam came on 67 ms after the second.
    proc = SurrogateProcessor(SurrogateParams(spike_window=spike_window_samples(30.0)))
    values = [3.9, 3.83, -5.63, -5.86, -5.83, 3.17, -15.19]
    states = [proc.step(k / 30, v) for k, v in enumerate(values)]
    back = proc.step(len(values) / 30 + 0.1, 2.27)  # after 0.133 s
    assert "surrogate_jump" in states[2].reasons  # caught before, with a clean window
    assert "surrogate_jump" in states[-1].reasons
    assert "surrogate_jump" in back.reasons
    assert not states[-1].value_mm < -10  # replaced by the median, as a spike is


def test_a_sample_out_of_time_is_still_judged_for_a_jump():
    # bench_scenarios --seed 191: a sample received "before" the previous one (its time
    # cannot be used) 19 mm off the breathing was dropped for its time alone; the next good
    # sample let the beam on at once, where a jump holds for its clean period.
    proc = SurrogateProcessor(SurrogateParams(spike_window=spike_window_samples(15.0)))
    for k in range(8):
        proc.step(k / 15, 0.1 * k)
    wild = proc.step(0.4, 19.1)  # out of time and far from the recent median
    near = proc.step(0.4, 0.9)  # out of time, as close as breathing
    assert not wild.valid and {"clock_backwards", "surrogate_jump"} <= set(wild.reasons)
    assert not near.valid and near.reasons == ("clock_backwards",)
    assert proc.step(8 / 15, 0.8).valid  # and neither is kept: the next one is no jump


def test_noise_is_smoothed():
    rng = np.random.default_rng(1)
    t = np.arange(0, 30, 1 / 30)
    clean = breathing(t)
    noisy = clean + rng.normal(0, 0.3, t.size)
    out = np.array([s.value_mm for s in run(t, noisy)])
    # sample-to-sample roughness (noise) well down; the breathing itself kept
    assert np.std(np.diff(out)) < 0.6 * np.std(np.diff(noisy))
    assert np.ptp(out[60:]) == pytest.approx(np.ptp(clean[60:]), rel=0.1)


@pytest.mark.parametrize(
    ("value", "t", "reason"),
    [
        (math.nan, 10.0, "surrogate_not_finite"),
        (math.inf, 10.0, "surrogate_not_finite"),
        (1e6, 10.0, "surrogate_out_of_range"),
        (1.0, 5.0, "clock_backwards"),
        (1.0, 9.0, "time_repeated"),
    ],
)
def test_bad_samples_never_reach_the_state(value, t, reason):
    proc = SurrogateProcessor()
    times = np.arange(0, 9.01, 0.1)
    for a in times:
        proc.step(float(a), float(breathing(a)))
    before = proc.step(9.05, float(breathing(9.05)))
    bad = proc.step(t, value) if t != 9.0 else proc.step(9.05, value)
    assert not bad.valid and reason in bad.reasons
    after = proc.step(9.1, float(breathing(9.1)))
    assert after.valid
    assert after.value_mm == pytest.approx(before.value_mm, abs=0.5)


def test_a_gap_restarts_the_breathing_state():
    proc = SurrogateProcessor()
    for a in np.arange(0, 30, 0.1):
        proc.step(float(a), float(breathing(a)))
    resumed = proc.step(31.0, float(breathing(31.0)))
    assert "gap" in resumed.reasons
    assert math.isnan(resumed.period_s) and "no_breathing_cycle_yet" in resumed.reasons


def test_the_phase_does_not_run_on_through_a_held_breath():
    # 20 s of 4 s breaths, then the breath held at end-inhale for 4 s, then breathing again.
    # Phase as time since end-exhale over the period wrapped through end-exhale (0.8-1.0,
    # then 0-0.2: an end-exhale gating window) while the target stood at end-inhale.
    t = np.arange(0, 40, 1 / 30)
    held = (t >= 22.0) & (t < 26.0)
    shifted = np.where(t >= 26.0, t - 4.0, t)
    x = np.where(held, 10.0, breathing(shifted, period=4.0, amplitude=10.0))
    states = run(t, x)
    during = [s.phase for s in states if 22.3 <= s.t < 26.0]
    assert all(0.3 <= p <= 0.5 for p in during), (min(during), max(during))
    # a long end-exhale rest runs on into the next breath, never past its end-inhale
    t2 = np.arange(0, 40, 1 / 30)
    rest = (t2 >= 24.0) & (t2 < 30.0)
    x2 = np.where(rest, 0.0, breathing(np.where(t2 >= 30.0, t2 - 6.0, t2), 4.0, 10.0))
    states2 = run(t2, x2)
    during2 = [s.phase for s in states2 if 24.0 <= s.t < 30.0]
    assert all(p >= 0.9 or p <= 0.5 for p in during2), (min(during2), max(during2))
    assert during2[-1] == 0.5
    # regular breathing keeps its phase (0.5 at end-inhale, tested above)
    at_exhale = [s.phase for s in states if s.t > 30 and abs(s.t % 4.0 - 2.0) > 1.9]
    assert np.median([min(p, 1 - p) for p in at_exhale]) < 0.06
