"""The console in a process of its own, fed at display rate by a bridge in the controller's.

Why a process: Python threads share one interpreter lock, and Qt's painting of pyqtgraph
items holds it (their ``paint`` methods are Python that calls into Qt). Measured with
``bench/bench_console.py``: with the console on a thread of the controller's process, the
controller's median time per surrogate sample was unchanged but its p99 grew from about
0.7 ms to 2.5-3.5 ms. In a process of its own the console shares nothing with the
controller but a pipe; a console that freezes, is closed or crashes cannot delay a beam
decision, let alone change one.

- ``ConsoleBridge``: a thread in the controller's process. About 30 times a second it
  builds one ``ConsoleState`` with the same ``LiveSource`` the in-process console uses
  (the status, the gate, and the trace rows that are new since the last frame) and sends
  it, only once the console has drawn the previous one (so a slow console gets fewer
  frames, never a backlog). An X-ray image (<= 256 px, uint8: ~50 kB a view) goes out
  in the first frame after it arrived (about once a second), never again. It forwards the
  console's commands to ``controller.submit`` and answers window checks with
  ``controller.core.window_refusal``, before anything is sent. Its cost to the
  controller's process: about 0.2 ms of one core per frame.
- ``RemoteSource``: the console's source in the child process. It appends the new rows to
  a ``LiveTrace`` ring of its own, keeps the last image of each X-ray view, and hands the
  same ``ConsoleWindow`` full frames.
  The child runs at a lower scheduling priority (nice +10), so that on a machine with
  few cores the controller's threads come first.

Messages (pickled tuples over a ``multiprocessing`` pipe):
  bridge -> console: ("state", ConsoleState), ("answer", id, refusal), ("close",)
  console -> bridge: ("ready", span_s), ("submit", kind, value, who),
                     ("check_window", id, (centre, width)), ("figures", dict)

The child is started with the "spawn" method (a fresh interpreter: no threads or Qt state
inherited), so a script that calls ``run_console`` must guard its top level with
``if __name__ == "__main__":``, as any multiprocessing program must.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from motionctl.gui.state import SPANS_S, ConsoleState, LiveSource
from motionctl.livestate import COLUMNS, LiveTrace

log = logging.getLogger("motionctl.gui.remote")

FRAME_PERIOD_S = 1.0 / 30.0
TICK_S = 0.05  # on_tick period, as in the in-process console
FIRST_STATE_TIMEOUT_S = 30.0
ANSWER_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 15.0  # the console saves its screenshot and exits within this


class ConsoleBridge:
    """Runs in the controller's process: states out at display rate, commands in."""

    def __init__(self, source: LiveSource, conn, span_s: float = 60.0):
        self.source = source
        self.conn = conn
        self.span_s = span_s
        self.figures: dict | None = None  # the console's display figures, sent at its end
        self._stop = threading.Event()
        self._close = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-bridge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_close(self) -> None:
        """Ask the console to close (it saves its screenshot first)."""
        self._close.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        ready, next_frame, close_sent = True, time.monotonic(), False
        last_t = -math.inf  # the newest trace row sent
        try:
            while not self._stop.is_set():
                if self._close.is_set() and not close_sent:
                    self.conn.send(("close",))
                    close_sent = True
                now = time.monotonic()
                if ready and now >= next_frame and not close_sent:
                    # Only the rows the console has not had: a frame is then a few
                    # hundred bytes, not the whole span.
                    state = self.source.state(
                        self.span_s,
                        since_t=math.nextafter(last_t, math.inf),
                        new_images_only=True,
                    )
                    if len(state.trace["t"]):
                        last_t = float(state.trace["t"][-1])
                    self.conn.send(("state", state))
                    ready = False
                    next_frame = max(next_frame + FRAME_PERIOD_S, now)
                wait = max(0.0, next_frame - time.monotonic()) if ready else FRAME_PERIOD_S
                if self.conn.poll(wait):
                    ready = self._handle(self.conn.recv()) or ready
        except (EOFError, OSError):
            pass  # the console has gone: nothing of the gate depended on it
        finally:
            self.conn.close()

    def _handle(self, message: tuple) -> bool:
        """Carry out one message from the console; True if it asks for the next state."""
        kind = message[0]
        if kind == "ready":
            self.span_s = float(message[1])
            return True
        if kind == "submit":
            _, command, value, who = message
            self.source.submit(command, value, who)
        elif kind == "check_window":
            _, request_id, value = message
            self.conn.send(("answer", request_id, self.source.window_refusal(value)))
        elif kind == "figures":
            self.figures = message[1]
        else:
            log.warning("unknown message from the console: %r", kind)
        return False


class RemoteSource:
    """The console's source in its own process: the latest state the bridge sent."""

    read_only = False

    def __init__(self, conn, cfg: dict[str, Any]):
        self.conn = conn
        self.cfg = cfg
        self.on_close: Callable[[], None] | None = None
        self.connected = True
        self.close_requested = False
        self._span_s = 60.0
        self._request_id = 0
        self._answers: dict[int, str] = {}
        self._state: ConsoleState | None = None
        self._images: dict[str, tuple[int, np.ndarray]] = {}  # imager -> (frame id, image)
        self._trace = LiveTrace(
            seconds=max(SPANS_S) + 10.0, rate_hz=cfg["tracking"]["surrogate_rate_hz"]
        )
        if not conn.poll(FIRST_STATE_TIMEOUT_S):
            raise TimeoutError("no state from the controller's console bridge")
        self._receive()
        if self._state is None:
            raise ConnectionError("the console bridge closed before its first state")
        self._send(("ready", self._span_s))

    def _receive(self) -> bool:
        """Take every message waiting; True if a new state arrived."""
        new = False
        while self.connected:
            try:
                if not self.conn.poll():
                    break
                message = self.conn.recv()
            except (EOFError, OSError):  # the controller's process has gone
                self.connected = False
                self._request_close()
                break
            if message[0] == "state":
                self._state, new = self._with_images(message[1]), True
                rows = np.column_stack([self._state.trace[name] for name in COLUMNS])
                for row in rows:
                    self._trace.append(row)
            elif message[0] == "answer":
                self._answers[message[1]] = message[2]
            elif message[0] == "close":
                self._request_close()
        return new

    def _with_images(self, state: ConsoleState) -> ConsoleState:
        """The state with each X-ray view's image: the bridge sends an image once."""
        views = []
        for view in state.imaging.views:
            if view.image is not None:
                self._images[view.imager] = (view.frame_id, view.image)
            else:
                frame_id, image = self._images.get(view.imager, (None, None))
                if frame_id == view.frame_id:
                    view = dataclasses.replace(view, image=image)
            views.append(view)
        if not views:
            return state
        imaging = dataclasses.replace(state.imaging, views=tuple(views))
        return dataclasses.replace(state, imaging=imaging)

    def _request_close(self) -> None:
        if not self.close_requested:
            self.close_requested = True
            if self.on_close is not None:
                self.on_close()

    def _send(self, message: tuple) -> None:
        if not self.connected:
            return
        try:
            self.conn.send(message)
        except (EOFError, OSError):
            self.connected = False
            self._request_close()

    def state(self, span_s: float) -> ConsoleState:
        self._span_s = span_s
        if self._receive():
            self._send(("ready", span_s))
        trace = self._trace.snapshot(since_t=self._state.t - span_s - 1.0).columns
        return dataclasses.replace(self._state, trace=trace)

    def submit(self, kind: str, value: Any = None, who: str = "console") -> None:
        self._send(("submit", kind, value, who))

    def window_refusal(self, value: tuple[float, float]) -> str:
        """The controller's own check, asked through the bridge (one round trip)."""
        self._request_id += 1
        request = self._request_id
        self._send(("check_window", request, value))
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while request not in self._answers and self.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.conn.poll(remaining) and self._receive():
                self._send(("ready", self._span_s))  # keep the states coming meanwhile
        return self._answers.pop(request, "no answer from the controller: nothing was sent")


def _console_process(conn, cfg: dict[str, Any], options: dict[str, Any]) -> None:
    """The child process: the console window over a ``RemoteSource``."""
    from PyQt6.QtCore import QTimer

    from motionctl.gui.console import ConsoleWindow, application, run_window

    # Ctrl-C at the terminal reaches this process too: the controller's process decides
    # when the console closes (it sends "close"), so that the screenshot is still taken.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        os.nice(10)  # the controller's process comes first when cores are scarce
    app = application()
    source = RemoteSource(conn, cfg)
    window = ConsoleWindow(source, operator=options["operator"], span_s=options["span_s"])
    # Closing from inside a refresh would re-enter it: close on the next turn of the loop.
    source.on_close = lambda: QTimer.singleShot(0, window.close)
    if source.close_requested:
        source.on_close()
    figures: dict = {}
    run_window(window, screenshot=options["screenshot"], report=figures.update)
    source._send(("figures", figures))  # noqa: SLF001 - its own source
    conn.close()
    app.processEvents()
    sys.stdout.flush()
    sys.stderr.flush()
    # Its work is done (screenshot saved, figures sent). Leave without letting the
    # interpreter destroy the Qt and pyqtgraph objects in its own order: that crashed the
    # process now and then (exit code -11 after a complete run, seen under load). Not
    # through pyqtgraph.exit() either: it runs the atexit callbacks, and importing PyQt6
    # registers two of its own (a crash of the same kind was seen with it, 2 runs in ~25).
    logging.shutdown()
    os._exit(0)


def run_isolated(
    controller,
    *,
    seconds: float | None = None,
    screenshot: str | Path | None = None,
    on_tick: Callable[[float], None] | None = None,
    stop: threading.Event | None = None,
    operator: str = "console",
    span_s: float = 60.0,
    report: Callable[[dict], None] | None = None,
) -> int:
    """``run_console`` with the window in a child process (see the module docstring);
    returns 0, or 1 if the console process failed (the session itself is unaffected)."""
    context = multiprocessing.get_context("spawn")
    parent_conn, child_conn = context.Pipe(duplex=True)
    options = {
        "operator": operator,
        "span_s": span_s,
        "screenshot": None if screenshot is None else str(Path(screenshot).resolve()),
    }
    process = context.Process(
        target=_console_process,
        args=(child_conn, controller.cfg, options),
        name="motionctl-console",
        daemon=True,
    )
    process.start()
    child_conn.close()
    bridge = ConsoleBridge(LiveSource(controller), parent_conn, span_s)
    bridge.start()
    start = time.monotonic()
    try:
        while process.is_alive():
            elapsed = time.monotonic() - start
            if on_tick is not None:
                on_tick(elapsed)
            if (seconds is not None and elapsed >= seconds) or (stop is not None and stop.is_set()):
                bridge.request_close()
                process.join(CLOSE_TIMEOUT_S)
                break
            process.join(TICK_S)
    finally:
        if process.is_alive():
            log.error("the console process did not close; terminating it")
            process.terminate()
            process.join(2.0)
        bridge.stop()
    if report is not None and bridge.figures is not None:
        report(bridge.figures)
    if process.exitcode != 0:
        log.error("the console process ended with exit code %s", process.exitcode)
        return 1
    return 0
