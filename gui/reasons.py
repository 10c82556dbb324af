"""Hold reasons and interlock keys in the therapist's words.

The gate names each hold with a code (``outside_window``) or an interlock key
(``stale_data:surface``: a code and the device it concerns). The console shows a short
plain sentence for each, so that the therapist knows at once whether to coach the patient,
wait, or call the physicist. A code this table does not know is shown as it is: a new
interlock must never be hidden behind a generic message.

Pure: no Qt, so the wording can be tested and reused by reports.
"""

from __future__ import annotations

# The devices by the names the config gives them, as the therapist knows them.
DEVICE_WORDS = {
    "surface": "surface tracker",
    "spirometer": "spirometer",
    "beam": "linac gating interface",
    "xray": "X-ray imager",
    "session_log": "session record",
}

# Beam interface faults (the detail after ``beam_interface:``), as the driver names them.
BEAM_FAULT_WORDS = {
    "ack_lost": "the linac gating interface stopped answering",
    "box_hold": "the linac gating interface held the beam by itself",
    "not_open": "the linac gating interface is not connected",
    "nak": "the linac gating interface refused a command",
    "malformed": "the linac gating interface sent a line that could not be read",
    "port_error": "the port to the linac gating interface failed",
    "reader_error": "reading from the linac gating interface failed",
}

# {device} is filled with the subject of the key (``stale_data:surface``).
_SENTENCES = {
    # the routine reasons of gating, that coaching or waiting resolves
    "operator_not_enabled": "Beam not enabled by the operator",
    "outside_window": "Target outside the gating window",
    "outside_phase_window": "Breathing phase outside the gating window",
    "debounce": "Target back in the window: confirming",
    "phase_unknown": "Breathing phase not known yet",
    "prediction_learning": "Motion prediction learning the breathing",
    "no_breath_hold_reference": "No breath-hold reference captured",
    "breath_hold_level_unknown": "Breath-hold level not known",
    "outside_breath_hold_tolerance": "Breath-hold level outside tolerance",
    "breath_hold_not_stable": "Breath hold not stable yet",
    "operator_hold": "Operator hold: press Release to continue",
    # data and device faults
    "no_data": "No data yet from the {device}",
    "stale_data": "No recent data from the {device}",
    "disconnected": "The {device} is disconnected",
    "malformed_data": "Corrupt data from the {device}",
    "clock_backwards": "The {device}'s clock went backwards",
    "out_of_range": "Implausible position from the {device}",
    "not_finite": "Invalid number from the {device}",
    # tracking and imaging
    "estimate_invalid": "Target position cannot be estimated",
    "predictor_diverged": "Motion prediction failed: restarting",
    "correlation_model_invalid": "X-ray disagrees with the correlation model: re-image",
    "fiducial_disagreement": "Fiducials on X-ray disagree with the estimate",
    "dwell_exceeded": "Target off position too long: acknowledge to continue",
    # the beam link, the record and the controller itself
    "beam_interface": "The linac gating interface is in doubt",
    "log_write_failure": "The session record cannot be written",
    "controller_error": "Controller error: see the session log",
    "session_stopped": "Session stopped",
}

# Holds that are part of normal gating or of the operator's own actions. Anything else is
# a fault, and the console shows it in red rather than amber.
ROUTINE = frozenset(
    {
        "operator_not_enabled",
        "outside_window",
        "outside_phase_window",
        "debounce",
        "phase_unknown",
        "prediction_learning",
        "no_breath_hold_reference",
        "outside_breath_hold_tolerance",
        "breath_hold_not_stable",
        "operator_hold",
    }
)


def split_key(key: str) -> tuple[str, str]:
    """``"stale_data:surface"`` -> ``("stale_data", "surface")``; no subject -> ``""``."""
    code, _, subject = key.partition(":")
    return code, subject


def device_words(name: str) -> str:
    return DEVICE_WORDS.get(name, name)


def describe(key: str) -> str:
    """A short plain sentence for a hold reason or interlock key; unknown keys as they are."""
    code, subject = split_key(key)
    sentence = _SENTENCES.get(code)
    if sentence is None:
        return key
    if "{device}" in sentence:
        return sentence.format(device=device_words(subject) if subject else "a device")
    if code == "beam_interface" and subject:
        kind, _, detail = subject.partition(":")
        fault = BEAM_FAULT_WORDS.get(kind)
        if fault is None:
            return f"{sentence} ({subject})"
        fault = f"{fault} ({detail})" if detail else fault
        return fault[0].upper() + fault[1:]
    if subject:  # a subject the sentence has no place for: keep it visible
        return f"{sentence} ({subject})"
    return sentence


def is_routine(key: str) -> bool:
    """True for the holds of normal gating and operator actions; False for faults."""
    return split_key(key)[0] in ROUTINE


def format_session_time(t: float) -> str:
    """Session seconds as ``m:ss.s`` (``1:05.2``), the way the console shows times."""
    if t != t:  # nan
        return "--"
    sign = "-" if t < 0 else ""
    t = round(abs(t), 1)  # before divmod, so 59.96 s reads 1:00.0 and never 0:60.0
    minutes, seconds = divmod(t, 60.0)
    return f"{sign}{int(minutes)}:{seconds:04.1f}"
