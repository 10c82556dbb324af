"""Layered TOML configuration, validated at load.

Layers, later wins: the packaged defaults (``config/default.toml``) < a site file
(``--config FILE``) < ``--set key=value`` flags. The packaged defaults are also the schema:
a key that is not in them is an error (a typo in a gating setting must never be ignored),
and a value must have the default's type. A few keys carry extra rules (ranges, choices).
Every error names the file (or flag), the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULTS_SOURCE = "motionctl/defaults/default.toml"

AXIS_NAMES = ("LR", "SI", "AP")

# Extra rules beyond "same type as the default": key -> (check, what was expected).
_RULES: dict[str, tuple[Any, str]] = {
    "session.commit_interval_s": (lambda v: 0 < v <= 0.1, "a number in (0, 0.1] s"),
    "session.operator_enable_after_s": (lambda v: v >= 0, "a number >= 0 s"),
    "session.operator_ack_after_s": (lambda v: v >= 0, "a number >= 0 s"),
    "session.status_interval_s": (lambda v: v > 0, "a number > 0 s"),
    "tracking.surrogate_axis": (lambda v: v in AXIS_NAMES, "one of LR, SI, AP"),
    "tracking.horizon_s": (lambda v: 0 <= v <= 2, "a number in [0, 2] s"),
    "tracking.unmeasured_latency_s": (lambda v: 0 <= v <= 1.5, "a number in [0, 1.5] s"),
    "tracking.surrogate_rate_hz": (lambda v: 1 <= v <= 200, "a rate in [1, 200] Hz"),
    "tracking.smoothing_s": (lambda v: 0 <= v <= 0.5, "a time constant in [0, 0.5] s"),
    "tracking.predictor_inputs": (lambda v: v in ("all", "axis"), 'one of "all", "axis"'),
    "gating.mode": (
        lambda v: v in ("amplitude", "phase", "breath_hold"),
        "one of amplitude, phase, breath_hold",
    ),
    "gating.source": (lambda v: v in ("predicted", "surrogate"), "predicted or surrogate"),
    "gating.breath_hold_signal": (lambda v: v in ("volume", "position"), "volume or position"),
    "gating.debounce_samples": (lambda v: 1 <= v <= 100, "an integer in [1, 100]"),
    "gating.fiducial_clears": (lambda v: v in ("ack", "image"), "ack or image"),
    "gating.phase_window": (lambda v: all(0 <= p <= 1 for p in v), "two phases in [0, 1]"),
    "gating.axis": (lambda v: v in AXIS_NAMES, "one of LR, SI, AP"),
    "gating.window_mm": (lambda v: v > 0, "a window width > 0 mm"),
    "gating.max_window_mm": (lambda v: v > 0, "a number > 0 mm"),
    "rig.surface_rate_hz": (lambda v: 1 <= v <= 200, "a rate in [1, 200] Hz"),
    "imaging.geometry": (lambda v: v in ("stereo", "mono"), 'one of "stereo", "mono"'),
    "imaging.rate_hz": (lambda v: 0.05 <= v <= 15, "a rate in [0.05, 15] Hz"),
    "imaging.pair_timeout_s": (lambda v: 0 < v <= 5, "a timeout in (0, 5] s"),
    "rig.spirometer_rate_hz": (lambda v: 1 <= v <= 100, "a rate in [1, 100] Hz"),
    "patient.model": (lambda v: v in ("lujan", "trace"), 'one of "lujan", "trace"'),
}
_DEVICE_RULES: dict[str, tuple[Any, str]] = {
    "port": (lambda v: 0 <= v <= 65535, "a TCP port in [0, 65535]"),
    "stale_timeout_s": (lambda v: 0 <= v <= 60, "a timeout in [0, 60] s"),
    "heartbeat_period_s": (lambda v: 0 < v <= 1, "a period in (0, 1] s"),
    "ack_timeout_s": (lambda v: 0 < v <= 1, "a timeout in (0, 1] s"),
    "watchdog_s": (lambda v: 0 < v <= 5, "a timeout in (0, 5] s"),
    "reconnect_max_s": (lambda v: 0 < v <= 60, "a number in (0, 60] s"),
}


class ConfigError(ValueError):
    """A configuration value that cannot be used, with where it came from."""

    def __init__(self, source: str, key: str, value: Any, expected: str):
        self.source, self.key, self.value, self.expected = source, key, value, expected
        super().__init__(f"config error in {source}: {key} = {value!r}: expected {expected}")


def load_defaults() -> dict[str, Any]:
    text = resources.files("motionctl.defaults").joinpath("default.toml").read_text("utf-8")
    return tomllib.loads(text)


def load_config(
    site_file: str | Path | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Merge the layers and validate the result; raises ConfigError on any bad value."""
    defaults = load_defaults()
    cfg = copy.deepcopy(defaults)
    if site_file is not None:
        path = Path(site_file)
        try:
            site = tomllib.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise ConfigError(str(path), "(file)", str(path), f"a readable file ({exc})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), "(file)", str(path), f"valid TOML ({exc})") from exc
        _merge(cfg, defaults, site, str(path), prefix="")
    for item in overrides:
        key, value = _parse_override(item)
        _merge(cfg, defaults, _nest(key, value), f"--set {item}", prefix="")
    _check_components(cfg)
    return cfg


def _check_components(cfg: dict[str, Any]) -> None:
    """Rules that involve several keys are the components' own: build them once now."""
    from motionctl.settings import (
        correlation_params,
        estimator_settings,
        gate_settings,
        seed_plan,
    )

    source = "the merged config (defaults, site file, --set)"
    for table, build in (
        ("correlation", correlation_params),
        ("tracking", estimator_settings),
        ("gating", gate_settings),
        ("imaging", seed_plan),
    ):
        try:
            build(cfg)
        except ValueError as exc:
            raise ConfigError(source, table, "(table)", f"consistent settings: {exc}") from exc


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}", item, item, "key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: --set tracking.surrogate_axis=SI
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(cfg: dict, schema: dict, layer: dict, source: str, prefix: str) -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema)) or "(none)"
            raise ConfigError(source, dotted, value, f"a known key (known here: {known})")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, value, "a table")
            _merge(cfg[key], expected, value, source, prefix=f"{dotted}.")
            continue
        cfg[key] = _check_value(source, dotted, value, expected)


def _check_value(source: str, dotted: str, value: Any, default: Any) -> Any:
    value = _check_type(source, dotted, value, default)
    rule = _RULES.get(dotted)
    if rule is None and dotted.startswith("devices."):
        rule = _DEVICE_RULES.get(dotted.rsplit(".", 1)[-1])
    if rule is not None and not rule[0](value):
        raise ConfigError(source, dotted, value, rule[1])
    return value


def _check_type(source: str, dotted: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(source, dotted, value, "true or false")
        return value
    if isinstance(default, float | int):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, dotted, value, "a number")
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float):
                raise ConfigError(source, dotted, value, "an integer")
            return value
        if not math.isfinite(value):
            raise ConfigError(source, dotted, value, "a finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(source, dotted, value, "a string")
        return value
    if isinstance(default, list) and default and isinstance(default[0], str):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, dotted, value, "a non-empty list of strings")
        return value
    if isinstance(default, list) and default and isinstance(default[0], list):
        if not isinstance(value, list) or not value:
            raise ConfigError(source, dotted, value, "a non-empty list of [LR, SI, AP] lists")
        return [_check_type(source, f"{dotted}[{i}]", v, default[0]) for i, v in enumerate(value)]
    if isinstance(default, list) and dotted.startswith("imaging.seed_"):
        # one entry per planned seed: any length (the plan checks it against seeds_mm)
        if not isinstance(value, list) or not value:
            raise ConfigError(source, dotted, value, "a non-empty list of numbers")
        return [_check_type(source, f"{dotted}[{i}]", v, default[0]) for i, v in enumerate(value)]
    if isinstance(default, list):
        if not isinstance(value, list) or len(value) != len(default):
            raise ConfigError(source, dotted, value, f"a list of {len(default)} numbers")
        return [
            _check_type(source, f"{dotted}[{i}]", v, d)
            for i, (v, d) in enumerate(zip(value, default, strict=True))
        ]
    raise ConfigError(source, dotted, value, f"a value like {default!r}")
