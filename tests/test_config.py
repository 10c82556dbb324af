"""Configuration layers and validation errors."""

from __future__ import annotations

import pytest

from motionctl.config import ConfigError, load_config, load_defaults


def test_defaults_name_the_simulated_devices():
    cfg = load_config()
    assert set(cfg["devices"]) >= {"surface", "beam"}
    assert cfg["devices"]["surface"]["host"] == "127.0.0.1"
    assert cfg == load_defaults() | {}  # no layer: the defaults themselves


def test_layers_site_file_then_flags(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("[gating]\nwindow_mm = 4.0\ncenter_mm = -1.0\n")
    cfg = load_config(site, ["gating.window_mm=3", "tracking.surrogate_axis=SI"])
    assert cfg["gating"]["window_mm"] == 3.0  # flag beats site file
    assert cfg["gating"]["center_mm"] == -1.0  # site file beats defaults
    assert cfg["tracking"]["surrogate_axis"] == "SI"
    assert cfg["gating"]["axis"] == "SI"  # untouched default


def test_integer_accepted_for_float_and_lists_checked():
    cfg = load_config(None, ["patient.amplitude_mm=[1, 10, 3]"])
    assert cfg["patient"]["amplitude_mm"] == [1.0, 10.0, 3.0]
    with pytest.raises(ConfigError, match=r"patient.amplitude_mm.*a list of 3"):
        load_config(None, ["patient.amplitude_mm=[1, 2]"])


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("[gating]\nwindow_with_typo = 4.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(site)
    message = str(err.value)
    assert str(site) in message and "gating.window_with_typo" in message
    assert "known key" in message


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("gating.window_mm=-2", "gating.window_mm", "> 0 mm"),
        ("gating.window_mm=wide", "gating.window_mm", "a number"),
        ("devices.surface.port=70000", "devices.surface.port", "TCP port"),
        ("devices.surface.port=1.5", "devices.surface.port", "an integer"),
        ("tracking.surrogate_axis=XY", "tracking.surrogate_axis", "LR, SI, AP"),
        ("gating=3", "gating", "a table"),
        ("nonsense", "nonsense", "key=value"),
    ],
)
def test_bad_values_name_flag_key_value_and_expectation(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"--set {override}" in message
    assert key in message and expected in message


def test_unreadable_or_invalid_site_file(tmp_path):
    with pytest.raises(ConfigError, match="readable file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gating\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(bad)


def test_sim_in_breath_hold_mode_gives_a_patient_that_never_holds_coached_holds(capsys):
    # `motionctl sim --set gating.mode=breath_hold` with the default patient (no breath
    # holds) held for no_breath_hold_reference for the whole session: nothing to capture.
    from motionctl.cli import COACHED_HOLDS_PER_MIN, _coached_breath_holds

    cfg = load_config(None, ["gating.mode=breath_hold"])
    _coached_breath_holds(cfg)
    assert cfg["patient"]["breath_hold_per_min"] == COACHED_HOLDS_PER_MIN > 0
    assert "patient.breath_hold_per_min was 0" in capsys.readouterr().err
    # holds the user asked for, another mode, or a recorded trace: left alone
    for overrides in (
        ["gating.mode=breath_hold", "patient.breath_hold_per_min=0.5"],
        ["gating.mode=amplitude"],
        ["gating.mode=breath_hold", 'patient.model="trace"'],
    ):
        cfg = load_config(None, overrides)
        before = cfg["patient"]["breath_hold_per_min"]
        _coached_breath_holds(cfg)
        assert cfg["patient"]["breath_hold_per_min"] == before
    assert capsys.readouterr().err == ""


def test_the_simulated_operator_acknowledges_after_the_configured_time():
    # session.operator_ack_after_s: a commissioning session goes on after a fault whose
    # interlock waits for a person; each acknowledgement is the operator's, and a refused
    # one is tried again later. 0 (the default) never acknowledges.
    from types import SimpleNamespace

    from motionctl.cli import _Acknowledger

    assert load_config()["session"]["operator_ack_after_s"] == 0
    now = [0.0]
    sent = []
    status = SimpleNamespace(awaiting_ack=())
    controller = SimpleNamespace(status=status, submit=sent.append)
    ack = _Acknowledger("simulated_operator", 2.0, clock=lambda: now[0])
    for t, awaiting in [
        (0.0, ()),
        (1.0, ("fiducial_disagreement",)),
        (2.9, ("fiducial_disagreement",)),
    ]:
        now[0], status.awaiting_ack = t, awaiting
        ack.tick(controller)
    assert sent == []  # waiting 1.9 s of 2
    now[0] = 3.0
    ack.tick(controller)
    assert [(c.kind, c.value, c.who) for c in sent] == [
        ("acknowledge", "fiducial_disagreement", "simulated_operator")
    ]
    now[0] = 4.0
    ack.tick(controller)  # still waiting (refused): again only 2 s after the last try
    assert len(sent) == 1
    now[0] = 5.0
    ack.tick(controller)
    assert len(sent) == 2
    status.awaiting_ack = ()
    now[0] = 9.0
    ack.tick(controller)
    assert len(sent) == 2
    with pytest.raises(ConfigError, match="operator_ack_after_s"):
        load_config(None, ["session.operator_ack_after_s=-1"])
