"""Shared test fixtures: real data location, and a guard that no test leaves a thread,
simulator or port of ours running."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test with the reason if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (../shared/data beside the repo)")
    return path


@pytest.fixture(autouse=True)
def no_leftover_threads():
    """Fail a test that leaves a non-daemon thread running (an unstopped driver or simulator)."""
    before = set(threading.enumerate())
    yield
    leftover = [
        t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon
    ]
    for thread in leftover:
        thread.join(timeout=2.0)
    still = [t.name for t in leftover if t.is_alive()]
    assert not still, f"threads left running after the test: {still}"
