"""Gating timing QA: expected transitions from a target trace, and edge latencies."""

from __future__ import annotations

import pytest

from motionctl.qa import EdgeMismatch, edge_latencies, expected_transitions


def test_transitions_follow_the_window_after_enable():
    samples = [(0.0, 0.0), (1.0, 5.0), (2.0, 0.5), (3.0, 5.0), (4.0, 0.0)]
    assert expected_transitions(samples, -1.0, 1.0, t_enable=1.5) == [
        (2.0, True),
        (3.0, False),
        (4.0, True),
    ]


def test_enable_while_inside_opens_at_the_enable():
    samples = [(0.0, 0.0), (1.0, 0.2), (2.0, 5.0)]
    assert expected_transitions(samples, -1.0, 1.0, t_enable=1.5) == [(1.5, True), (2.0, False)]


def test_latencies_pair_edges_in_order_and_allow_a_missing_last_edge():
    expected = [(1.0, True), (2.0, False), (3.0, True)]
    assert edge_latencies(expected, [(1.01, True), (2.02, False)]) == pytest.approx([0.01, 0.02])
    with pytest.raises(EdgeMismatch, match="expected True"):
        edge_latencies(expected, [(1.01, False), (2.02, True)])
    with pytest.raises(EdgeMismatch, match="1 beam edges for 3"):
        edge_latencies(expected, [(1.01, True)])
