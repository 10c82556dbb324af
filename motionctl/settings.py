"""From the validated config dictionary to the typed settings of the core's components.

The config loader checks types and ranges key by key; the component constructors check
what only makes sense together (e.g. correlation model parameters). This module is the one
place that knows which config key feeds which setting.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from motionctl.correlation import CorrelationParams
from motionctl.estimator import EstimatorSettings
from motionctl.gating import GateSettings
from motionctl.interlocks import SPECS, InterlockSpec


def estimator_settings(cfg: dict[str, Any]) -> EstimatorSettings:
    tr = cfg["tracking"]
    return EstimatorSettings(
        surrogate_axis=tr["surrogate_axis"],
        inhale_positive=tr["surrogate_inhale_positive"],
        rate_hz=tr["surrogate_rate_hz"],
        smoothing_s=tr["smoothing_s"],
        horizon_s=tr["horizon_s"],
        predictor=tr["predictor"],
        # A session log recorded before the key existed predicted from the axis alone.
        predictor_inputs=tr.get("predictor_inputs", "axis"),
        prior_gain=tuple(tr["gain"]),
        prior_offset_mm=tuple(tr["offset_mm"]),
        use_prior=tr["use_prior"],
        prior_uncertainty_mm=tr["prior_uncertainty_mm"],
        fiducial_tolerance_mm=tr["fiducial_tolerance_mm"],
    )


def correlation_params(cfg: dict[str, Any]) -> CorrelationParams:
    return CorrelationParams.from_mapping(cfg["correlation"])


def gate_settings(cfg: dict[str, Any]) -> GateSettings:
    g = cfg["gating"]
    return GateSettings(
        mode=g["mode"],
        source=g["source"],
        axis=g["axis"],
        center_mm=g["center_mm"],
        window_mm=g["window_mm"],
        phase_window=tuple(g["phase_window"]),
        breath_hold_signal=g["breath_hold_signal"],
        breath_hold_tolerance_l=g["breath_hold_tolerance_l"],
        breath_hold_tolerance_mm=g["breath_hold_tolerance_mm"],
        min_stable_s=g["min_stable_s"],
        debounce_samples=g["debounce_samples"],
        # A session log recorded before the key existed gated while the predictor learnt.
        hold_while_prediction_learns=g.get("hold_while_prediction_learns", False),
        dwell_mm=g["dwell_mm"],
        dwell_s=g["dwell_s"],
    )


# The interlocks an X-ray image raises, and clears again when a later image agrees.
FIDUCIAL_INTERLOCKS = ("fiducial_disagreement", "correlation_model_invalid")


def interlock_specs(cfg: dict[str, Any]) -> dict[str, InterlockSpec]:
    """The interlock table for this session. ``gating.fiducial_clears = "image"`` lets the
    X-ray interlocks clear on the agreeing image (or the rebuilt model) without an
    acknowledgement: the beam is held all the while they last, as before, but a transient
    miss (a cough, a mislocalised seed) costs no extra wait for the operator."""
    specs = dict(SPECS)
    if cfg["gating"].get("fiducial_clears", "ack") == "image":
        for code in FIDUCIAL_INTERLOCKS:
            specs[code] = replace(specs[code], clears="auto")
    return specs


def seed_plan(cfg: dict[str, Any]):
    from motionctl.fiducials import SeedPlan

    im = cfg["imaging"]
    return SeedPlan(
        seeds_mm=tuple(tuple(s) for s in im["seeds_mm"]),
        seed_diameter_mm=tuple(im["seed_diameter_mm"]),
        seed_length_mm=tuple(im["seed_length_mm"]),
    )
