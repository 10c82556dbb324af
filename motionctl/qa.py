"""Gating timing QA: compare what the beam did with what the target did.

TG-142 asks that the beam switch within 100 ms of the expected time. Given the target's
positions over time and the gating window, ``expected_transitions`` lists where the beam
should have switched; ``edge_latencies`` pairs those with the beam edges actually recorded
(by the linac, or its simulator) and returns the delay of each. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def expected_transitions(
    samples: Iterable[tuple[float, float]], lower_mm: float, upper_mm: float, t_enable: float
) -> list[tuple[float, bool]]:
    """(time, beam_on) wherever 'target inside the window, beam enabled' changes.

    ``samples`` are (time, target position on the gated axis); the beam is expected off
    before ``t_enable`` (the operator's enable) and the initial state is off.
    """
    state, out = False, []
    previous: float | None = None
    enabled = False
    for t, position in samples:
        if not enabled and t >= t_enable:
            enabled = True
            # The enable itself opens the beam if the target was already inside then.
            if previous is not None and lower_mm <= previous <= upper_mm:
                out.append((t_enable, True))
                state = True
        inside = enabled and lower_mm <= position <= upper_mm
        if inside != state:
            out.append((t, inside))
            state = inside
        previous = position
    return out


class EdgeMismatch(AssertionError):
    """The recorded beam edges do not follow the expected transitions one for one."""


def edge_latencies(
    expected: Sequence[tuple[float, bool]], actual: Sequence[tuple[float, bool]]
) -> list[float]:
    """Delay of each actual edge after the expected transition it answers, in order.

    The two sequences must agree edge for edge in direction; ``actual`` may be one shorter
    (the last transition fell after the recording stopped). Raises EdgeMismatch otherwise.
    """
    if len(actual) > len(expected) or len(actual) < len(expected) - 1:
        raise EdgeMismatch(f"{len(actual)} beam edges for {len(expected)} expected transitions")
    latencies = []
    for i, ((t_edge, on_edge), (t_exp, on_exp)) in enumerate(zip(actual, expected, strict=False)):
        if on_edge != on_exp:
            raise EdgeMismatch(f"edge {i} at {t_edge:.3f} s is {on_edge}, expected {on_exp}")
        latencies.append(t_edge - t_exp)
    return latencies


def fault_outcome(
    start_s: float, end_s: float | None, edges: Sequence[tuple[float, bool]], session_end_s: float
) -> dict:
    """How the beam answered one injected fault, from the linac's own record of edges.

    ``hold_latency_ms``: fault start -> the first beam-off edge (0 if the beam was already
    off at the start; None if it was never held while the fault lasted).
    ``beam_on_edges_during``: beam-on edges while the fault was active.
    """
    end = session_end_s if end_s is None else end_s
    on_at_start = False
    for t, on in edges:
        if t > start_s:
            break
        on_at_start = on
    latency = 0.0 if not on_at_start else None
    if on_at_start:
        off = [t for t, on in edges if not on and start_s <= t <= end]
        latency = (off[0] - start_s) * 1e3 if off else None
    on_edges = sum(1 for t, on in edges if on and start_s <= t <= end)
    return {
        "beam_on_at_start": on_at_start,
        "hold_latency_ms": None if latency is None else round(latency, 3),
        "beam_on_edges_during": on_edges,
    }
