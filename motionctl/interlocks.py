"""Interlocks: every way the inputs can fail, each holding the beam until its rule clears it.

An interlock is identified by its code and, where it concerns one device, the device
(``stale_data:surface``). The controller reports conditions as it sees them
(``InterlockMonitor.report(t, code, subject, active, detail)``); the monitor keeps the state
of each interlock and says which are active. Clearing rules:

- ``auto``: the interlock clears once its condition has been absent for ``clear_after_s``
  (0 = at once). Data faults use a short clean period so a flapping input cannot toggle
  the beam at the input's own rate.
- ``ack``: the interlock stays active after its condition has gone until an operator
  acknowledges it (a re-image, a re-setup or a decision by a person is needed). An
  acknowledgement while the condition is still present is refused.

``SPECS`` is the table of interlocks: ``docs/interlocks.md`` lists each with its trigger,
response, clearing rule and the test that covers it. Pure and clock-injected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InterlockSpec:
    code: str
    trigger: str
    clears: str  # "auto" or "ack"
    clear_after_s: float = 0.0


SPECS: dict[str, InterlockSpec] = {
    spec.code: spec
    for spec in (
        InterlockSpec("no_data", "a required device has sent nothing yet", "auto"),
        InterlockSpec("stale_data", "no sample from a required device within its timeout", "auto"),
        InterlockSpec(
            "disconnected", "a device's connection or port was lost", "auto", clear_after_s=0.2
        ),
        InterlockSpec(
            "malformed_data",
            "a frame failed its checksum, framing or content checks",
            "auto",
            clear_after_s=0.2,
        ),
        InterlockSpec(
            "clock_backwards",
            "a sample's time went backwards or repeated",
            "auto",
            clear_after_s=0.2,
        ),
        InterlockSpec(
            "clock_skew",
            "a device clock stepped away from the controller's by > 0.25 s",
            "auto",
            clear_after_s=0.2,
        ),
        InterlockSpec(
            "out_of_range", "a value outside its physical range", "auto", clear_after_s=0.2
        ),
        InterlockSpec("not_finite", "a NaN or infinite value", "auto", clear_after_s=0.2),
        InterlockSpec("estimate_invalid", "the tracker could not vouch for its estimate", "auto"),
        InterlockSpec(
            "predictor_diverged",
            "the predictor's state or error exploded",
            "auto",
            clear_after_s=1.0,
        ),
        InterlockSpec(
            "correlation_model_invalid",
            "an X-ray fiducial position disagreed with the correlation model",
            "ack",
        ),
        InterlockSpec(
            "fiducial_disagreement",
            "the estimate and an X-ray fiducial position disagree beyond tolerance",
            "ack",
        ),
        InterlockSpec(
            "beam_interface",
            "the gating box did not acknowledge, NAKed or dropped the beam",
            "auto",
        ),
        InterlockSpec("log_write_failure", "the session log could not be written", "ack"),
        InterlockSpec("operator_hold", "the operator pressed hold", "ack"),
        InterlockSpec(
            "dwell_exceeded",
            "the target stayed off by more than the dwell distance too long",
            "ack",
        ),
    )
}


@dataclass
class _State:
    condition: bool = False
    since: float = 0.0  # when the condition last changed
    present_t: float = -math.inf  # the latest time it was reported present
    latched: bool = False  # active (holding the beam)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class InterlockEvent:
    t: float
    key: str  # "code" or "code:subject"
    kind: str  # "raised", "cleared", "awaiting_ack", "acknowledged"
    detail: str = ""


@dataclass
class InterlockMonitor:
    specs: dict[str, InterlockSpec] = field(default_factory=lambda: dict(SPECS))
    _states: dict[str, _State] = field(default_factory=dict)
    # Views recomputed only after a change: the core asks for them at every decision.
    _active: tuple[str, ...] | None = None
    _awaiting: tuple[str, ...] | None = None
    # Keys whose condition is present or that still hold: any other key is quiet.
    live: set[str] = field(default_factory=set)

    @staticmethod
    def key(code: str, subject: str | None = None) -> str:
        return code if not subject else f"{code}:{subject}"

    def report(
        self, t: float, code: str, subject: str | None, active: bool, detail: str = ""
    ) -> list[InterlockEvent]:
        """Report whether a condition holds now; returns what changed."""
        spec = self.specs[code]  # an unknown code is a programming error: KeyError
        key = self.key(code, subject)
        state = self._states.get(key)
        if state is None:
            if not active:
                return []
            state = self._states[key] = _State()
        events: list[InterlockEvent] = []
        if active:
            state.present_t = max(state.present_t, t)
            if not state.condition:
                state.condition, state.since = True, t
                self._awaiting = None
                self.live.add(key)
            if detail:
                state.detail = detail
            if not state.latched:
                state.latched = True
                self._active = self._awaiting = None
                events.append(InterlockEvent(t, key, "raised", state.detail))
            return events
        if state.condition:
            # The clean period never starts before the condition was last seen: inputs from
            # different devices can arrive a little out of time order.
            state.condition, state.since = False, max(t, state.present_t)
            self._awaiting = None
            if spec.clears == "ack" and state.latched:
                events.append(InterlockEvent(t, key, "awaiting_ack", state.detail))
            if not state.latched:
                self.live.discard(key)
        events.extend(self._maybe_clear(t, key, state, spec))
        return events

    def _maybe_clear(
        self, t: float, key: str, state: _State, spec: InterlockSpec
    ) -> list[InterlockEvent]:
        if state.latched and not state.condition and spec.clears == "auto":
            if t - state.since >= spec.clear_after_s:
                state.latched = False
                self._active = self._awaiting = None
                self.live.discard(key)
                return [InterlockEvent(t, key, "cleared", state.detail)]
        return []

    def tick(self, t: float) -> list[InterlockEvent]:
        """Let time-based clearing happen when no report arrives (call at each decision)."""
        if not self.active():
            return []
        events: list[InterlockEvent] = []
        for key, state in self._states.items():
            if state.latched and not state.condition:
                spec = self.specs[key.split(":", 1)[0]]
                events.extend(self._maybe_clear(t, key, state, spec))
        return events

    def acknowledge(self, t: float, key: str) -> tuple[bool, str]:
        """Operator acknowledgement; (accepted, why not)."""
        state = self._states.get(key)
        if state is None or not state.latched:
            return False, f"{key} is not active"
        spec = self.specs[key.split(":", 1)[0]]
        if spec.clears != "ack":
            return False, f"{key} clears by itself when its condition has gone"
        if state.condition:
            return False, f"{key}: its condition is still present ({state.detail})"
        state.latched = False
        self._active = self._awaiting = None
        self.live.discard(key)
        return True, ""

    def active(self) -> tuple[str, ...]:
        if self._active is None:
            self._active = tuple(key for key, state in self._states.items() if state.latched)
        return self._active

    def awaiting_ack(self) -> tuple[str, ...]:
        if self._awaiting is None:
            self._awaiting = tuple(
                key
                for key, state in self._states.items()
                if state.latched
                and not state.condition
                and self.specs[key.split(":", 1)[0]].clears == "ack"
            )
        return self._awaiting
