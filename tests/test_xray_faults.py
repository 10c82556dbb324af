"""X-ray imager faults on the simulated rig, end to end: each fault kind of the kV imager
injected into a live session through `motionctl sim --fault xray:KIND@...`.

For each fault the simulated linac's own record must show the beam held at the latest 50 ms
after the moment the fault became observable to the controller, no beam-on edge from that
moment to the fault's end, and the session log must hold the interlocks that did it, with
their reasons. (Between the fault's start and that moment the controller cannot know of it:
the beam stays on, as it should, and a beam-on edge there -- after a beam-link hiccup of a
loaded machine, say -- is not the imager fault's. The JSON summary's ``hold_latency_ms`` and
``beam_on_edges_during`` count from the fault's start.)

When is an imager fault observable? An image fault can only show when an image is due,
so the hold latency is measured from the first moment the controller could know:

- ``disconnect``: the fault's start (the imager closes the link at once);
- a fault that delivers something wrong (``garbage``, ``nan``, ``delay``, ``reorder``,
  ``clock-skew``, ``jump``): the arrival of the first faulty image (the driver's receipt
  time of its header, as logged), or the stale deadline below if that comes first;
- a fault that delivers nothing (``freeze``; also the gap a ``delay`` opens): the stale
  deadline, the last good image's arrival + ``devices.xray.stale_timeout_s``.

The session images at 8 Hz with a stale timeout of 0.35 s (2.8 frame periods): longer
than the two-period gap a reordered pair leaves (so that the newer frame of the first pair
is not taken for the end of a silence), and at 8 Hz a malformed image comes every 125 ms,
within the 0.2 s clean period of ``malformed_data``, so a stream of bad images holds
without a gap. Two sessions: the link faults, and the content faults with ``jump`` last
(its interlocks wait for an operator's acknowledgement, so the beam stays held after it).
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import fault_schedule, run_sim

pytestmark = pytest.mark.rig

RATE_HZ = 8.0
STALE_S = 0.35
EXPOSURE_S = 0.01  # the rig's imager default
SPACING_S, DURATION_S, FIRST_S = 2.5, 1.0, 3.0
HOLD_WITHIN_MS = 50.0
# A fault takes effect inside start_fault; the applied start is measured when it returned.
EFFECT_MARGIN_S = 0.1
NORMAL_LAG_S = 0.3  # an image on time arrives 50-100 ms after its mid-exposure (rendering)

# kind -> the interlocks that must all be raised while the fault lasts
EXPECTED = {
    "disconnect": ("disconnected:xray",),
    "freeze": ("stale_data:xray",),
    "garbage": ("malformed_data:xray", "disconnected:xray"),
    "delay": ("stale_data:xray", "clock_skew:xray"),
    "reorder": ("clock_backwards:xray",),
    "nan": ("malformed_data:xray",),
    "clock-skew": ("clock_backwards:xray", "clock_skew:xray"),
    "jump": ("correlation_model_invalid", "fiducial_disagreement"),
}
GROUPS = {
    "link": ("disconnect", "freeze", "garbage", "delay", "reorder"),
    "content": ("nan", "clock-skew", "jump"),
}


def run_group(kinds, log) -> tuple[dict, sqlite3.Connection]:
    faults = fault_schedule((f"xray:{k}" for k in kinds), FIRST_S, SPACING_S, DURATION_S)
    seconds = FIRST_S + (len(kinds) - 1) * SPACING_S + DURATION_S + 1.0
    settings = (
        "devices.xray.enabled=true",
        f"imaging.rate_hz={RATE_HZ:g}",
        f"devices.xray.stale_timeout_s={STALE_S:g}",
        "session.operator_enable_after_s=0.5",
        "gating.hold_while_prediction_learns=false",
        # a window wide enough that only the faults can hold the beam
        "gating.center_mm=-6",
        "gating.window_mm=20",
    )
    return run_sim(log, seconds, settings, faults)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """``sessions(name)``: the JSON summary, the open log and its path of group ``name``'s
    session, run once per module."""
    done: dict[str, tuple] = {}

    def get(name: str) -> tuple[dict, sqlite3.Connection, object]:
        if name not in done:
            log = tmp_path_factory.mktemp(f"xray-{name}") / "session.sqlite"
            done[name] = (*run_group(GROUPS[name], log), log)
        return done[name]

    yield get
    for _, db, _ in done.values():
        db.close()


CASES = [(name, kind) for name, kinds in GROUPS.items() for kind in kinds]


def observable_s(db: sqlite3.Connection, kind: str, start: float, end: float) -> float:
    """When the controller could first know of the fault, session seconds (see the module
    docstring)."""
    if kind == "disconnect":
        # The link is closed inside start_fault; the recorded start is when it returned.
        (dropped,) = db.execute(
            "SELECT MIN(t) FROM events WHERE source='xray' AND kind='disconnected' AND t >= ?",
            (start - EFFECT_MARGIN_S,),
        ).fetchone()
        return start if dropped is None else min(start, dropped)
    rows = db.execute(
        "SELECT t, t_acq, accepted FROM fiducials WHERE device='xray' ORDER BY t"
    ).fetchall()
    # Good images: acquired before the fault started (one may arrive after it, in flight),
    # on time and in order (a normal image arrives 50-100 ms after its mid-exposure).
    good = [
        (t, t_acq)
        for t, t_acq, accepted in rows
        if accepted and t_acq + 0.5 * EXPOSURE_S < start and t - t_acq <= NORMAL_LAG_S
    ]
    assert good, "no good image before the fault: the test proves nothing"
    stale_deadline = max(t for t, _ in good) + STALE_S
    after = [(t, t_acq) for t, t_acq, _ in rows if start < t <= end]
    first = None
    if kind in ("garbage", "nan"):
        (first,) = db.execute(
            "SELECT MIN(t) FROM events WHERE source='xray' AND kind='malformed' AND t >= ?",
            (start,),
        ).fetchone()
    elif kind == "delay":
        first = next((t for t, t_acq in after if t - t_acq > NORMAL_LAG_S), None)
    elif kind == "clock-skew":
        first = next((t for t, t_acq in after if t - t_acq > 1.0), None)
    elif kind == "reorder":
        newest = max(t_acq for _, t_acq in good)
        for t, t_acq in after:
            if t_acq < newest:
                first = t
                break
            newest = t_acq
    elif kind == "jump":  # acquired after the fault started
        first = next((t for t, t_acq in after if t_acq + 0.5 * EXPOSURE_S >= start), None)
    if kind != "freeze":
        assert first is not None, f"xray {kind}: no faulty image reached the controller"
    return min(stale_deadline, first) if first is not None else stale_deadline


def linac_edges(db: sqlite3.Connection) -> list[tuple[float, bool]]:
    return [
        (t, bool(on))
        for t, on in db.execute(
            "SELECT t, beam_on FROM beam_edges WHERE source='linac_sim' ORDER BY t"
        )
    ]


def hold_figures(db: sqlite3.Connection, fault: dict) -> dict:
    """From the simulated linac's own record: the moment the fault became observable, the
    beam-off edge that began the hold still in force ``HOLD_WITHIN_MS`` later (earlier than
    the observable moment if another interlock of the same fault held first), the latency
    between the two, and the beam-on edges from the observable moment to the fault's end."""
    start, end = fault["start_s"], fault["end_s"]
    observable = observable_s(db, fault["kind"], start, end)
    edges = linac_edges(db)
    deadline = observable + HOLD_WITHIN_MS / 1e3
    before = [(t, on) for t, on in edges if t <= deadline]
    held = before[-1][0] if before and not before[-1][1] else None
    return {
        "observable_s": observable,
        "held_s": held,
        "latency_ms": None if held is None else (held - observable) * 1e3,
        "beam_on_edges_after_observable": sum(
            1 for t, on in edges if on and observable <= t <= end
        ),
    }


@pytest.mark.parametrize("name", list(GROUPS))
def test_every_fault_ran_and_is_in_the_log(sessions, name):
    summary, db, _ = sessions(name)
    applied = [f["kind"] for f in summary["faults"] if f["device"] == "xray"]
    assert applied == list(GROUPS[name])
    logged = [
        json.loads(d)
        for (d,) in db.execute(
            "SELECT detail FROM events WHERE source='rig' AND kind='fault' ORDER BY t"
        )
    ]
    assert [(f["device"], f["kind"]) for f in logged] == [("xray", k) for k in GROUPS[name]]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_xray_fault_holds_the_beam_and_is_logged(sessions, name, kind):
    summary, db, _ = sessions(name)
    (fault,) = [f for f in summary["faults"] if (f["device"], f["kind"]) == ("xray", kind)]
    assert fault["beam_on_at_start"], f"xray {kind}: beam already off, the test proves nothing"
    figures = hold_figures(db, fault)
    print(f"xray {kind}: {fault} {figures}")
    assert figures["held_s"] is not None, (
        f"xray {kind}: beam on {HOLD_WITHIN_MS} ms after the fault became observable",
        fault,
        figures,
    )
    assert figures["beam_on_edges_after_observable"] == 0, (kind, fault, figures)
    raised = [
        detail
        for (detail,) in db.execute(
            "SELECT detail FROM events WHERE source='interlock' AND kind='raised' "
            "AND t BETWEEN ? AND ?",
            (fault["start_s"] - EFFECT_MARGIN_S, fault["end_s"]),
        )
    ]
    for key in EXPECTED[kind]:
        with_reason = [d for d in raised if d.startswith(key + " ") and d[len(key) :].strip()]
        assert with_reason, (kind, key, raised)


@pytest.mark.parametrize("name", list(GROUPS))
def test_the_session_replays_exactly(sessions, name):
    """The X-ray interlocks are decided by the pure core from logged inputs: replay
    reproduces every decision, estimate and event."""
    from motionctl.replay import replay

    _, _, log = sessions(name)
    result = replay(log)
    assert result.reproduced, result.first_divergence


def test_every_fault_kind_of_the_imager_is_covered():
    from motionctl.simulators.faults import FAULT_KINDS
    from motionctl.simulators.xray_imager import XrayImagerSim

    assert sorted(EXPECTED) == sorted(XrayImagerSim.supported_faults) == sorted(FAULT_KINDS)
    assert sorted(kind for _, kind in CASES) == sorted(EXPECTED)
