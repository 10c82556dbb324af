"""Shared test fixtures: real data location, a guard that no test leaves a thread,
simulator or port of ours running, the rig session harness, and `motionctl sim` runs with
injected faults."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterable
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


class RigSession:
    """A live session on the simulated rig: every simulated device on its real transport,
    a session log, and a real controller wired to the rig's endpoints."""

    def __init__(self, tmp_path, *overrides: str):
        import time

        from motionctl.config import load_config
        from motionctl.controller import Controller
        from motionctl.sessionlog import SessionLogWriter
        from motionctl.simulators.rig import Rig

        self.cfg = load_config(None, ["devices.surface.port=0", "devices.xray.port=0", *overrides])
        self.rig = Rig(self.cfg)
        self.rig.start()
        self.path = tmp_path / "session.sqlite"
        self.writer = SessionLogWriter(self.path, self.cfg, t0=time.monotonic())
        self.controller = Controller(self.cfg, session_log=self.writer, **self.rig.endpoints())
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
        self.rig.stop()
        self.writer.close()


@pytest.fixture
def session_class():
    """The RigSession class ``session`` builds; a test module may override it."""
    return RigSession


@pytest.fixture
def session(tmp_path, session_class):
    """``session(*overrides)`` starts a RigSession; every one is closed after the test."""
    sessions: list[RigSession] = []

    def start(*overrides: str) -> RigSession:
        sessions.append(session_class(tmp_path, *overrides))
        return sessions[-1]

    yield start
    for s in sessions:
        s.close()


def fault_schedule(names: Iterable[str], first_s: float, spacing_s: float, duration_s: float):
    """``--fault`` values: each ``device:kind`` in turn, ``spacing_s`` apart."""
    return [f"{name}@{first_s + i * spacing_s:g}+{duration_s:g}" for i, name in enumerate(names)]


def run_sim(
    log: Path, seconds: float, settings: Iterable[str] = (), faults: Iterable[str] = ()
) -> tuple[dict, sqlite3.Connection]:
    """``motionctl sim --headless --json`` on free ports, as a physicist runs it on the rig:
    its JSON summary and its session log."""
    command = [sys.executable, "-m", "motionctl.cli", "sim", "--headless"]
    command += ["--seconds", f"{seconds:g}", "--json", "--log", str(log)]
    for setting in ("devices.surface.port=0", "devices.xray.port=0", *settings):
        command += ["--set", setting]
    for fault in faults:
        command += ["--fault", fault]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), sqlite3.connect(log)
