"""Latency-compensating predictors: definitions, safety behaviour, and accuracy on signals
whose answer is known by construction. Real-data accuracy is measured by
bench/bench_prediction.py; here one real trace only checks the ranking default > nLMS."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from motionctl.prediction import (
    DEFAULT_PREDICTOR,
    PREDICTORS,
    Predictor,
    evaluate_predictor,
    horizon_samples,
    make_predictor,
)
from tests.conftest import shared_data

LEARNING = [name for name in PREDICTORS if name != "none"]


def sinusoid(rate_hz: float, seconds: float = 80.0, period_s: float = 4.0, noise_mm=0.0):
    t = np.arange(0.0, seconds, 1.0 / rate_hz)
    x = 5.0 * np.sin(2 * np.pi * t / period_s) + 12.0
    if noise_mm:
        x = x + np.random.default_rng(1).normal(0.0, noise_mm, t.size)
    return t, x


def cos4_breathing(rate_hz: float, seconds: float = 80.0, noise_mm: float = 0.1, seed: int = 2):
    """Lujan's model z = z0 - b cos^4(pi t / T): long end-exhale rest, sharp inhale."""
    t = np.arange(0.0, seconds, 1.0 / rate_hz)
    x = -490.0 - 15.0 * np.cos(np.pi * t / 4.2) ** 4  # IR marker far from the origin
    x = x + np.random.default_rng(seed).normal(0.0, noise_mm, t.size)
    return t, x


def run(predictor: Predictor, x) -> np.ndarray:
    return np.array([predictor.step(float(v)) for v in x])


# -- definitions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate_hz, horizon_s, expected",
    [
        (5.0, 0.4, 2),
        (10.0, 0.4, 4),
        (25.0, 0.4, 10),
        (30.0, 0.4, 12),
        (5.0, 0.15, 1),  # 0.75 -> 1
        (10.0, 0.15, 2),  # 1.5 -> 2: halves round up, not to even
        (25.0, 0.15, 4),  # 3.75 -> 4
        (30.0, 0.15, 5),  # 4.5 -> 5
        (30.0, 0.11, 3),  # 3.3 -> 3
        (5.0, 0.05, 1),  # 0.25 would round to 0: at least one sample
        (30.0, 0.0, 0),  # no latency, no horizon
    ],
)
def test_horizon_in_samples_rounds_to_nearest(rate_hz, horizon_s, expected):
    assert horizon_samples(rate_hz, horizon_s) == expected
    for name in PREDICTORS:
        p = make_predictor(name, rate_hz, horizon_s)
        assert p.horizon_samples == expected
        assert p.horizon_s == horizon_s
        assert p.name == name


@pytest.mark.parametrize(
    "rate_hz, horizon_s", [(0.0, 0.4), (-5.0, 0.4), (30.0, -0.1), (math.nan, 0.4), (30.0, math.inf)]
)
def test_bad_rate_or_horizon_is_refused(rate_hz, horizon_s):
    with pytest.raises(ValueError):
        make_predictor(DEFAULT_PREDICTOR, rate_hz, horizon_s)


def test_registry_and_default():
    assert {"none", "nlms", "ridge"} <= set(PREDICTORS)
    assert len(PREDICTORS) >= 4  # at least one method stronger than the linear filters
    assert DEFAULT_PREDICTOR in PREDICTORS
    assert make_predictor("default", 30.0, 0.4).name == DEFAULT_PREDICTOR
    for name in PREDICTORS:
        assert isinstance(make_predictor(name, 30.0, 0.4), Predictor)


def test_unknown_name_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError) as excinfo:
        make_predictor("kalman9000", 30.0, 0.4)
    message = str(excinfo.value)
    assert "kalman9000" in message
    for name in PREDICTORS:
        assert name in message


def test_parameters_are_passed_and_checked():
    assert make_predictor("analogue", 30.0, 0.4, k=8)._analogue.k == 8
    assert make_predictor("ridge", 30.0, 0.4, span_s=2.0).n_taps == 10
    for name, bad in [
        ("analogue", {"k": 0}),
        ("ensemble", {"k": 2.5}),
        ("ridge", {"half_life_s": 0.0}),
        ("ridge", {"alpha": -1.0}),
        ("nlms", {"mu": math.nan}),
        ("ensemble", {"error_half_life_s": -1.0}),
        ("analogue", {"memory_s": 0.0}),
    ]:
        with pytest.raises(ValueError):
            make_predictor(name, 30.0, 0.4, **bad)
    with pytest.raises(TypeError):
        make_predictor("ridge", 30.0, 0.4, no_such_parameter=1)


def test_none_returns_the_current_value():
    p = make_predictor("none", 30.0, 0.4)
    t, x = cos4_breathing(30.0, seconds=20.0)
    assert np.array_equal(run(p, x), x)


def test_zero_horizon_returns_the_current_value():
    t, x = cos4_breathing(10.0, seconds=40.0)
    for name in PREDICTORS:
        assert np.array_equal(run(make_predictor(name, 10.0, 0.0), x), x), name


def test_delay_vector_spans_seconds_not_samples():
    """Rate independence: the same number of taps over the same duration at any rate."""
    taps = {rate: make_predictor(DEFAULT_PREDICTOR, rate, 0.4).n_taps for rate in (5, 10, 30)}
    assert len(set(taps.values())) == 1
    for rate in (5.0, 10.0, 12.5, 25.0, 30.0):
        dl = make_predictor("ridge", rate, 0.4).dl
        span_s = dl.edges[-1] / rate
        assert span_s == pytest.approx(4.0, abs=0.5 / rate + 1e-9)


# -- accuracy where the answer is known -----------------------------------------------------


@pytest.mark.parametrize("name", LEARNING)
@pytest.mark.parametrize("signal", ["sinusoid", "cos4"])
def test_every_predictor_beats_none_on_a_periodic_signal(name, signal):
    if signal == "sinusoid":
        t, x = sinusoid(10.0, noise_mm=0.05)
    else:
        t, x = cos4_breathing(10.0)
    result = evaluate_predictor(t, x, 0.4, name)
    assert result["relative_rmse"] < 0.8, result


def test_the_default_is_rate_independent_on_a_periodic_signal():
    """The same breathing at 10 Hz and at 30 Hz is predicted about equally well."""
    rel = {}
    for rate in (10.0, 30.0):
        t, x = cos4_breathing(rate, noise_mm=0.05)
        rel[rate] = evaluate_predictor(t, x, 0.4, DEFAULT_PREDICTOR)["relative_rmse"]
    assert rel[10.0] < 0.3 and rel[30.0] < 0.3, rel
    assert abs(rel[10.0] - rel[30.0]) < 0.1, rel


# -- safety: finite output, divergence, reset, determinism -----------------------------------


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 1e4]),
    offset=st.sampled_from([0.0, -490.0, 1e5]),
    kind=st.sampled_from(["noise", "walk", "steps", "breathing"]),
)
def test_finite_input_gives_finite_output(seed, scale, offset, kind):
    rng = np.random.default_rng(seed)
    n = 300  # 30 s at 10 Hz: past the delay-line fill and the learning gate
    if kind == "noise":
        x = rng.normal(0.0, 1.0, n)
    elif kind == "walk":
        x = np.cumsum(rng.normal(0.0, 1.0, n))
    elif kind == "steps":
        x = np.repeat(rng.normal(0.0, 1.0, n // 20), 20)
    else:
        x = cos4_breathing(10.0, seconds=30.0, seed=seed)[1] + 490.0
    x = offset + scale * x
    for name in PREDICTORS:
        y = run(make_predictor(name, 10.0, 0.4), x)
        assert np.isfinite(y).all(), name


def test_constant_signal_is_predicted_exactly():
    for name in PREDICTORS:
        y = run(make_predictor(name, 10.0, 0.4), np.full(400, 3.25))
        assert np.all(y == 3.25), name


@pytest.mark.parametrize("name", PREDICTORS)
def test_nan_sample_is_refused(name):
    p = make_predictor(name, 10.0, 0.4)
    p.step(1.0)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            p.step(bad)


@pytest.mark.parametrize("name", PREDICTORS)
def test_diverged_is_false_on_normal_data(name):
    p = make_predictor(name, 10.0, 0.4)
    t, x = cos4_breathing(10.0)
    for v in x:
        p.step(float(v))
        assert not p.diverged


@pytest.mark.parametrize("name", PREDICTORS)
def test_huge_input_latches_diverged_until_reset(name):
    p = make_predictor(name, 10.0, 0.4)
    t, x = cos4_breathing(10.0, seconds=30.0)
    run(p, x)
    assert not p.diverged
    assert p.step(1e12) == 1e12  # a diverged predictor returns the current value
    assert p.diverged
    assert p.step(float(x[-1])) == float(x[-1])
    assert p.diverged  # latched: the caller holds the beam and resets
    p.reset()
    assert not p.diverged
    # and after reset() it behaves exactly as a new predictor
    fresh = make_predictor(name, 10.0, 0.4)
    assert np.array_equal(run(p, x), run(fresh, x))


@pytest.mark.parametrize("name", LEARNING)
def test_non_finite_state_sets_diverged_and_reset_clears_it(name):
    p = make_predictor(name, 10.0, 0.4)
    t, x = cos4_breathing(10.0, seconds=40.0)
    run(p, x[:300])
    assert p.ready and not p.diverged
    for learner in p._learners:  # force a non-finite internal state
        for attribute in ("w", "R", "r", "fut"):
            if hasattr(learner, attribute):
                getattr(learner, attribute)[:] = np.nan
    y = p.step(float(x[300]))
    assert p.diverged
    assert y == float(x[300])  # never NaN out: the current value
    p.reset()
    assert not p.diverged and not p.ready
    assert np.isfinite(run(p, x)).all()


def test_exploding_error_sets_diverged():
    """A model that predicts far worse than no prediction trips the monitor."""
    p = make_predictor("ridge", 10.0, 0.4)
    t, x = cos4_breathing(10.0, seconds=40.0)
    run(p, x[:200])
    p._ridge.w[:] = 0.0
    p._ridge.w[-1] = 50.0  # a constant +50 mm increment: finite, but absurd
    p._ridge.version += 1  # as a refit that produced these weights would
    p._ridge.refit_ticks = 10**9  # keep the broken weights
    for v in x[200:]:
        p.step(float(v))
        if p.diverged:
            break
    assert p.diverged


@pytest.mark.parametrize("name", PREDICTORS)
def test_deterministic(name):
    t, x = cos4_breathing(30.0, seconds=30.0)
    a = run(make_predictor(name, 30.0, 0.4), x)
    b = run(make_predictor(name, 30.0, 0.4), x)
    assert np.array_equal(a, b)


# -- evaluate_predictor: definitions checked where the answer is known ------------------------


class _RampExtrapolator:
    """Exact on a linear ramp: x[n] + H * (x[n] - x[n-1])."""

    name = "ramp"

    def __init__(self, rate_hz, horizon_s):
        self.horizon_s = horizon_s
        self.H = horizon_samples(rate_hz, horizon_s)
        self.reset()

    def step(self, value):
        prev, self._prev = self._prev, value
        return value if prev is None else value + self.H * (value - prev)

    def reset(self):
        self._prev = None

    restart = reset

    @property
    def diverged(self):
        return False


def test_evaluate_none_has_relative_rmse_exactly_one():
    t, x = cos4_breathing(10.0, seconds=60.0)
    result = evaluate_predictor(t, x, 0.4, "none")
    assert result["relative_rmse"] == 1.0
    H = 4
    i = np.arange(300, x.size - H)  # 30 s warm-up at 10 Hz
    expected = np.sqrt(np.mean((x[i] - x[i + H]) ** 2))
    assert result["rmse_mm"] == pytest.approx(expected, rel=1e-12)
    assert result["n_scored"] == i.size
    assert result["horizon_samples"] == H
    assert result["rate_hz"] == pytest.approx(10.0)


def test_evaluate_on_a_ramp(monkeypatch):
    monkeypatch.setitem(PREDICTORS, "ramp", _RampExtrapolator)
    t = np.arange(0.0, 60.0, 0.1)
    x = 0.25 * np.arange(t.size)  # 2.5 mm/s, exact in binary
    exact = evaluate_predictor(t, x, 0.4, "ramp")
    assert exact["rmse_mm"] == 0.0
    assert exact["p95_mm"] == 0.0
    assert exact["relative_rmse"] == 0.0
    assert exact["jitter_mm"] == 0.25  # the prediction moves with the ramp
    lagging = evaluate_predictor(t, x, 0.4, "none")
    assert lagging["rmse_mm"] == 1.0  # 4 samples x 0.25 mm behind
    assert lagging["p95_mm"] == 1.0
    assert lagging["jitter_mm"] == 0.25


def test_evaluate_skips_and_resets_across_nan_sections(monkeypatch):
    monkeypatch.setitem(PREDICTORS, "ramp", _RampExtrapolator)
    t = np.arange(0.0, 60.0, 0.1)
    x = 0.25 * np.arange(t.size)
    x[400:410] = np.nan
    x[500] = np.nan
    result = evaluate_predictor(t, x, 0.4, "ramp")
    assert result["n_resets"] == 2
    # each reset costs the extrapolator one sample (prediction = current value), and a
    # pair n -> n+4 is skipped when any of x[n..n+4] is NaN
    i = np.arange(300, t.size - 4)
    window_clean = np.array([np.isfinite(x[k : k + 5]).all() for k in i])
    assert result["n_scored"] == int(window_clean.sum())
    assert result["rmse_mm"] > 0.0  # the two first samples after each reset lag the ramp
    assert np.isfinite(result["relative_rmse"])


def test_evaluate_refuses_a_trace_shorter_than_the_warm_up():
    t, x = cos4_breathing(10.0, seconds=20.0)
    with pytest.raises(ValueError, match="warm-up"):
        evaluate_predictor(t, x, 0.4, "none")


def test_evaluate_reports_compute_time():
    t, x = cos4_breathing(30.0, seconds=40.0)
    result = evaluate_predictor(t, x, 0.4, DEFAULT_PREDICTOR)
    assert result["mean_us_per_sample"] > 0.0
    assert result["p99_us_per_sample"] >= result["mean_us_per_sample"] * 0.5
    assert result["n_diverged"] == 0


# -- real data ---------------------------------------------------------------------------------


@pytest.mark.data
def test_default_beats_nlms_on_a_lark_liver_trace():
    path = shared_data("interact-paired-internal-external", "LARK_liver", "1.Mean_motion_1_092.txt")
    import motionctl.traces as traces

    trace = traces.read_trace(path)
    if hasattr(traces, "breathing_signal"):
        t, x = traces.breathing_signal(trace)
    else:
        t, x = trace.t_s, trace.values[:, 1]  # SI = y
    default = evaluate_predictor(t, x, 0.4, DEFAULT_PREDICTOR)
    nlms = evaluate_predictor(t, x, 0.4, "nlms")
    assert default["relative_rmse"] < nlms["relative_rmse"]
    assert default["relative_rmse"] < 0.6


# -- extra input channels (aux) ----------------------------------------------------------------

AUX_LEARNING = ["ridge", "analogue", "ensemble"]  # the predictors that use aux channels


def irregular_breathing(rate_hz: float, seconds: float = 120.0, lead_s: float = 0.4, seed=3):
    """A breathing-like signal whose period and amplitude wander (hard to predict from its
    own past), and the same signal ``lead_s`` ahead: an extra channel that leads the main
    one by exactly the horizon. Returns t, x (main), lead (the leading channel)."""
    fine = 100.0
    n = int((seconds + lead_s + 1.0) * fine)
    rng = np.random.default_rng(seed)

    def wander(sd: float, tau_s: float) -> np.ndarray:
        e = rng.normal(0.0, 1.0, n)
        a = math.exp(-1.0 / (tau_s * fine))
        y = np.zeros(n)
        for i in range(1, n):
            y[i] = a * y[i - 1] + e[i]
        return sd * y / y.std()

    period_s = 4.0 * np.exp(wander(0.2, 8.0))
    amplitude = 5.0 * np.exp(wander(0.3, 8.0))
    s = amplitude * np.sin(np.cumsum(2 * np.pi / period_s / fine)) + 12.0
    idx = np.arange(0, int(seconds * fine), round(fine / rate_hz))
    return idx / fine, s[idx], s[idx + round(lead_s * fine)]


def run_aux(predictor: Predictor, x, aux) -> np.ndarray:
    return np.array([predictor.step(float(v), a) for v, a in zip(x, aux.tolist(), strict=True)])


@pytest.mark.parametrize("name", PREDICTORS)
def test_aux_channels_zero_is_the_1d_predictor(name):
    t, x = cos4_breathing(10.0, seconds=60.0)
    plain = make_predictor(name, 10.0, 0.4)
    zero = make_predictor(name, 10.0, 0.4, aux_channels=0)
    assert plain.aux_channels == zero.aux_channels == 0
    junk = np.random.default_rng(4).normal(0.0, 3.0, (x.size, 2))  # ignored with 0 channels
    assert np.array_equal(run(plain, x), run_aux(zero, x, junk))


@pytest.mark.parametrize("name", PREDICTORS)
def test_aux_channels_is_exposed_and_checked(name):
    assert make_predictor(name, 10.0, 0.4, aux_channels=3).aux_channels == 3
    assert isinstance(make_predictor(name, 10.0, 0.4, aux_channels=3), Predictor)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="aux_channels"):
            make_predictor(name, 10.0, 0.4, aux_channels=bad)


@pytest.mark.parametrize("rate_hz", [10.0, 30.0])
@pytest.mark.parametrize("name", ["ensemble", "ridge"])
def test_a_leading_aux_channel_improves_the_prediction(name, rate_hz):
    t, x, lead = irregular_breathing(rate_hz)
    alone = evaluate_predictor(t, x, 0.4, name)["relative_rmse"]
    helped = evaluate_predictor(t, x, 0.4, name, aux=lead[:, None])["relative_rmse"]
    assert alone > 0.2  # the signal is not predictable from its own past alone
    assert helped < 0.5 * alone


def test_a_leading_aux_channel_improves_the_analogue():
    t, x, lead = irregular_breathing(10.0)
    alone = evaluate_predictor(t, x, 0.4, "analogue")["relative_rmse"]
    helped = evaluate_predictor(t, x, 0.4, "analogue", aux=lead[:, None])["relative_rmse"]
    assert helped < 0.75 * alone


@pytest.mark.parametrize("name", AUX_LEARNING)
def test_an_uninformative_aux_channel_costs_little(name):
    t, x = cos4_breathing(10.0, seconds=120.0, noise_mm=0.3)
    alone = evaluate_predictor(t, x, 0.4, name)["relative_rmse"]
    constant = np.full((t.size, 1), -490.0)
    assert evaluate_predictor(t, x, 0.4, name, aux=constant)["relative_rmse"] <= alone + 0.01
    noise = np.random.default_rng(5).normal(0.0, 0.3, (t.size, 2))
    assert evaluate_predictor(t, x, 0.4, name, aux=noise)["relative_rmse"] <= alone + 0.03


@pytest.mark.parametrize("name", PREDICTORS)
def test_bad_aux_is_refused_without_changing_the_state(name):
    t, x = cos4_breathing(10.0, seconds=40.0)
    aux = np.column_stack([np.sin(t), np.cos(t)])
    p = make_predictor(name, 10.0, 0.4, aux_channels=2)
    reference = make_predictor(name, 10.0, 0.4, aux_channels=2)
    run_aux(p, x[:200], aux[:200])
    run_aux(reference, x[:200], aux[:200])
    for bad in (None, [1.0], [1.0, 2.0, 3.0], 5.0):
        with pytest.raises(ValueError, match="expected 2"):
            p.step(1.0, bad)
    for bad in ([math.nan, 1.0], [1.0, math.inf], np.array([0.0, -math.inf])):
        with pytest.raises(ValueError, match="non-finite"):
            p.step(1.0, bad)
    assert np.array_equal(run_aux(p, x[200:], aux[200:]), run_aux(reference, x[200:], aux[200:]))


@pytest.mark.parametrize("name", AUX_LEARNING)
def test_huge_aux_latches_diverged_until_reset(name):
    t, x = cos4_breathing(10.0, seconds=30.0)
    p = make_predictor(name, 10.0, 0.4, aux_channels=1)
    run_aux(p, x, x[:, None])
    assert p.step(float(x[-1]), [1e12]) == float(x[-1])
    assert p.diverged
    p.reset()
    assert not p.diverged


@pytest.mark.parametrize("rate_hz", [10.0, 25.0])
@pytest.mark.parametrize("name", AUX_LEARNING)
def test_aux_is_used_causally(name, rate_hz):
    """Changing the aux channels after sample n0 leaves every prediction up to n0 as is."""
    t, x, lead = irregular_breathing(rate_hz, seconds=60.0)
    aux = np.column_stack([lead, 0.5 * x + 3.0])
    n0 = int(45.0 * rate_hz)
    changed = aux.copy()
    changed[n0 + 1 :] += np.random.default_rng(6).normal(0.0, 5.0, changed[n0 + 1 :].shape)
    a = run_aux(make_predictor(name, rate_hz, 0.4, aux_channels=2), x, aux)
    b = run_aux(make_predictor(name, rate_hz, 0.4, aux_channels=2), x, changed)
    assert np.array_equal(a[: n0 + 1], b[: n0 + 1])
    assert not np.array_equal(a[n0 + 1 :], b[n0 + 1 :])  # the perturbation did reach it


def test_evaluate_treats_a_nan_aux_row_as_a_nan_sample():
    t, x, lead = irregular_breathing(10.0, seconds=90.0)
    aux = np.column_stack([lead, x + 1.0])
    aux_gaps = aux.copy()
    aux_gaps[400:410, 0] = np.nan
    aux_gaps[500, 1] = np.nan
    x_gaps = x.copy()
    x_gaps[400:410] = np.nan
    x_gaps[500] = np.nan
    by_aux = evaluate_predictor(t, x, 0.4, DEFAULT_PREDICTOR, aux=aux_gaps)
    by_x = evaluate_predictor(t, x_gaps, 0.4, DEFAULT_PREDICTOR, aux=aux)
    clean = evaluate_predictor(t, x, 0.4, DEFAULT_PREDICTOR, aux=aux)
    assert by_aux["n_resets"] == 2
    assert by_aux["n_scored"] < clean["n_scored"]
    for key in by_aux:
        if "us_per_sample" not in key:
            assert by_aux[key] == by_x[key], key


def test_evaluate_checks_the_aux_shape():
    t, x = cos4_breathing(10.0, seconds=40.0)
    for bad in (x, np.zeros((x.size - 1, 2)), np.zeros((x.size, 2, 1))):
        with pytest.raises(ValueError, match="aux"):
            evaluate_predictor(t, x, 0.4, DEFAULT_PREDICTOR, aux=bad)
    with pytest.raises(ValueError, match="aux"):
        evaluate_predictor(t, x, 0.4, "ridge", aux=np.zeros((x.size, 1)), aux_channels=1)
    # predictor params still reach the constructor alongside aux
    result = evaluate_predictor(t, x, 0.4, "analogue", aux=np.zeros((x.size, 1)), k=8)
    assert np.isfinite(result["relative_rmse"])


# -- elastic analogue queries -----------------------------------------------------------------


def varying_breathing(rate_hz: float, seconds: float = 150.0, seed: int = 1):
    """cos^4 breathing whose period is drawn afresh for every breath, uniformly in
    3.6-4.4 s: the library rarely holds a twin of the current breath at its own speed."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, seconds, 1.0 / rate_hz)
    starts = np.cumsum(np.concatenate([[0.0], rng.uniform(3.6, 4.4, int(seconds / 3.6) + 2)]))
    j = np.searchsorted(starts, t, side="right") - 1
    phase = j + (t - starts[j]) / (starts[j + 1] - starts[j])
    x = -490.0 - 15.0 * np.cos(np.pi * phase) ** 4
    return t, x + rng.normal(0.0, 0.1, t.size)


def analogue_reference(x, rate_hz, H, first, speeds, queries, k=16, decay_s=0.3):
    """The analogue predictor written out naively (10 Hz: 0.2 s blocks of two samples, a
    sample per learning tick, a memory longer than the trace): the library holds the 2 s
    embedding of every sample ``m >= first`` and ``x[m + H] - x[m]``; a query at ``n``
    embeds ``x`` around ``n`` at every speed (block edges ``s * j * 0.2 s``, the running sum
    interpolated linearly in between), takes the k nearest over all speeds and averages
    their futures with the Gaussian kernel."""
    nb, step = 10, 0.2 * rate_hz
    sw = np.sqrt(np.exp(-(np.arange(nb) + 0.5) * 0.2 / decay_s))
    x0 = x - x[0]
    cs = np.cumsum(x0)

    def embed(m, s):
        e = s * step * np.arange(nb + 1)  # block edges, samples back
        sums = np.interp(m - e, np.arange(m + 1), cs[: m + 1])
        return sw * (x0[m] - (sums[:-1] - sums[1:]) / np.diff(e))

    out = []
    for n in queries:
        lib = np.array([embed(m, 1.0) for m in range(first, n - H + 1)])
        fut = np.array([x[m + H] - x[m] for m in range(first, n - H + 1)])
        d = np.concatenate([((lib - embed(n, s)) ** 2).sum(axis=1) for s in speeds])
        near = np.argsort(d)[:k]
        w = np.exp(-d[near] / d[near].max())
        out.append(x[n] + w @ fut[near % len(fut)] / w.sum())
    return np.array(out)


@pytest.mark.parametrize("speeds", [(1.0,), (0.9, 1.0, 1.11)])
def test_analogue_is_the_method_of_analogues_at_every_speed(speeds):
    """speeds=(1.0,) is the non-elastic analogue; the elastic one searches all speeds."""
    t, x = varying_breathing(10.0, seconds=50.0, seed=4)
    p = make_predictor("analogue", 10.0, 0.2, speeds=speeds)  # H = 2
    assert p.speeds == speeds
    y = run(p, x)
    first = p._need - 1 - p.H  # the first sample learned from
    queries = list(range(300, 500, 13))
    ref = analogue_reference(x, 10.0, p.H, first, speeds, queries)
    assert np.allclose(y[queries], ref, rtol=0.0, atol=1e-9)
    # and the other speeds change the answer
    other = (0.9, 1.0, 1.11) if speeds == (1.0,) else (1.0,)
    assert not np.allclose(analogue_reference(x, 10.0, p.H, first, other, queries), ref)


@pytest.mark.parametrize("rate_hz", [7.0, 10.0, 30.0])
def test_scaled_features_interpolate_the_running_sums(rate_hz):
    from motionctl.prediction import _DelayLine

    tap = 0.2
    n_taps = 10
    dl = _DelayLine(rate_hz, tap, n_taps, 3)
    speeds = (0.8, 1.0, 1.25)
    dl.set_speeds(speeds, n_taps)
    x = np.random.default_rng(8).normal(0.0, 5.0, 200) + 100.0
    out = np.zeros((3, n_taps))
    z = np.zeros(n_taps)
    cs = np.cumsum(x - x[0])
    step = max(tap * rate_hz, 1.0)
    for n, v in enumerate(x):
        dl.push(float(v))
        if not dl.full:
            continue
        dl.scaled_features(out)
        for row, s in zip(out, speeds, strict=True):
            e = s * step * np.arange(n_taps + 1)
            sums = np.interp(n - e, np.arange(n + 1), cs[: n + 1])
            expected = (x[n] - x[0]) - (sums[:-1] - sums[1:]) / np.diff(e)
            assert np.allclose(row, expected, rtol=0.0, atol=1e-9)
        if step == round(step):  # whole-sample blocks: speed 1 is features()
            dl.features(0, z)
            assert np.allclose(out[1], z, rtol=0.0, atol=1e-9)


@pytest.mark.parametrize("rate_hz", [5.0, 10.0, 30.0])
def test_elastic_queries_help_when_the_period_varies_by_breath(rate_hz):
    t, x = varying_breathing(rate_hz)
    plain = evaluate_predictor(t, x, 0.4, "ensemble", speeds=(1.0,))["relative_rmse"]
    elastic = evaluate_predictor(t, x, 0.4, "ensemble")["relative_rmse"]  # the default
    assert make_predictor("ensemble", rate_hz, 0.4).speeds == (0.9, 1.0, 1.11)
    assert elastic < 0.95 * plain


@pytest.mark.parametrize("rate_hz", [10.0, 30.0])
@pytest.mark.parametrize("name", ["analogue", "ensemble"])
def test_elastic_queries_are_causal(name, rate_hz):
    """Changing the signal and the aux channels after n0 leaves the predictions up to n0."""
    t, x, lead = irregular_breathing(rate_hz, seconds=60.0)
    aux = np.column_stack([lead, 0.5 * x + 3.0])
    n0 = int(45.0 * rate_hz)
    rng = np.random.default_rng(9)
    x2, aux2 = x.copy(), aux.copy()
    x2[n0 + 1 :] += rng.normal(0.0, 5.0, x2.size - n0 - 1)
    aux2[n0 + 1 :] += rng.normal(0.0, 5.0, aux2[n0 + 1 :].shape)
    for a, b in [(aux, aux2), (None, None)]:
        k = 0 if a is None else 2
        p = make_predictor(name, rate_hz, 0.4, aux_channels=k, speeds=(0.8, 1.0, 1.25))
        q = make_predictor(name, rate_hz, 0.4, aux_channels=k, speeds=(0.8, 1.0, 1.25))
        y1 = run(p, x) if a is None else run_aux(p, x, a)
        y2 = run(q, x2) if b is None else run_aux(q, x2, b)
        assert p.ready
        assert np.array_equal(y1[: n0 + 1], y2[: n0 + 1])
        assert not np.array_equal(y1[n0 + 1 :], y2[n0 + 1 :])


@pytest.mark.parametrize("name", ["analogue", "ensemble"])
def test_bad_speeds_are_refused(name):
    for bad in [
        (),
        (0.9, 1.1),  # 1.0 missing
        (1.0, 1.0),
        (1.0, 0.0),
        (1.0, -0.9),
        (1.0, math.nan),
        (1.0, math.inf),
        (1.0, 3.0),
        (1.0, True),
        1.0,
        "1.0",
        None,
    ]:
        with pytest.raises(ValueError, match="speeds"):
            make_predictor(name, 10.0, 0.4, speeds=bad)
    assert make_predictor(name, 10.0, 0.4, speeds=[1.1, 1.0]).speeds == (1.1, 1.0)


@pytest.mark.parametrize("name", ["ridge", "analogue", "ensemble"])
def test_restart_refills_the_delay_vector_and_keeps_what_was_learnt(name):
    rate, H = 10.0, 4
    t, x = cos4_breathing(rate, seconds=80.0)
    p = make_predictor(name, rate, 0.4)
    run(p, x[:400])  # 40 s: learnt
    assert p.ready
    p.restart()  # a gap
    assert not p.ready
    after, ready = [], []
    for v in x[400:]:
        after.append(p.step(float(v)))
        ready.append(p.ready)
    after = np.array(after)
    # ready again once the delay vector has refilled (its 4 s span plus the horizon), not
    # after the 14 s of learning from nothing
    ready_at = ready.index(True) / rate
    assert ready_at <= 4.6, ready_at
    # ... with what it learnt before the gap: 5-12 s after it, far better than no
    # prediction, which is all a fresh predictor gives there
    k = np.arange(round(5 * rate), round(12 * rate))
    err = after[k] - x[400 + k + H]
    none = x[400 + k] - x[400 + k + H]
    assert np.sqrt(np.mean(err**2)) < 0.5 * np.sqrt(np.mean(none**2))
    fresh = run(make_predictor(name, rate, 0.4), x[400:])
    np.testing.assert_array_equal(fresh[k], x[400 + k])
    p.reset()
    assert not p.ready


@pytest.mark.parametrize("rate", [5.0, 30.0])
def test_ready_in_s_counts_down_to_the_sample_that_makes_the_predictor_ready(rate):
    # The console says "ready in about N s": the count must be the real one, from the
    # start and after a restart (delay vector only), and 0 exactly when ready.
    t, x = cos4_breathing(rate, seconds=60.0)
    p = make_predictor(DEFAULT_PREDICTOR, rate, 0.4)
    for start in (0, round(30 * rate)):  # from nothing; then after a restart (a gap)
        if start:
            p.restart()
        promised = []
        for v in x[start:]:
            promised.append(p.ready_in_s)
            p.step(float(v))
            if p.ready:
                break
        steps = len(promised)  # the sample that made it ready is the last one stepped
        assert p.ready and p.ready_in_s == 0.0
        assert [round(w * rate) for w in promised] == list(range(steps, 0, -1))
        assert promised[0] <= (15.0 if not start else 5.0)


def test_restart_of_a_diverged_predictor_forgets_everything():
    p = make_predictor("ensemble", 10.0, 0.4)
    t, x = cos4_breathing(10.0, seconds=40.0)
    run(p, x)
    p.step(2e6)  # beyond any physical range: diverged
    assert p.diverged
    p.restart()
    assert not p.diverged and not p.ready
    run(p, x[:60])  # the delay vector refilled, but nothing learnt: still not ready
    assert not p.ready


@pytest.mark.parametrize("aux_channels", [0, 2])
def test_a_deep_copy_predicts_as_the_original(aux_channels):
    # The scenario bench clones a warmed session core with copy.deepcopy; a predictor that
    # kept numpy views as attributes lost them in the copy (a copied view is a separate
    # array) and diverged at its first sample.
    t, x = cos4_breathing(30.0, seconds=40.0)
    aux = np.column_stack([np.roll(x, 5), -x]) if aux_channels else None

    def feed(p, a, b):
        out = []
        for i in range(a, b):
            row = None if aux is None else list(aux[i])
            out.append(p.step(float(x[i]), row))
        return np.array(out)

    original = make_predictor("ensemble", 30.0, 0.4, aux_channels=aux_channels)
    feed(original, 0, 900)  # 30 s: learnt
    copy_ = copy.deepcopy(original)
    np.testing.assert_array_equal(feed(copy_, 900, 1200), feed(original, 900, 1200))
    assert not copy_.diverged
