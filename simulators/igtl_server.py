"""The TCP server and transport faults shared by the OpenIGTLink simulators.

``IgtlServerSim`` is the base of ``SurfaceTrackerSim`` (TRANSFORM messages) and
``XrayImagerSim`` (IMAGE messages): a TCP server on a loopback address that sends every frame
a subclass makes to every connected client, and takes the transport side of the runtime
faults (``start_fault``/``stop_fault``, the ``FaultTarget`` protocol of ``faults.py``):

- ``disconnect``: every client connection is closed and the listening socket too (a connect
  is refused); at the end the server listens again on the same port. Frames queued by
  ``delay``/``reorder`` are lost with the connection.
- ``delay`` and ``reorder``: frames go through a ``WireQueue``; when the fault ends the
  backlog is sent before ``stop_fault`` returns.
- every other kind is only recorded here (``_faults``): what it does to a frame is the
  subclass's (each simulator's module docstring has the table for its device).

Two threads: the accept thread (woken through a pipe, so a fault call never waits for its
idle timeout) owns the listener; the stream thread calls the subclass's ``_tick(now)`` every
``tick_s`` seconds, drains what clients send, and sends the frames that are due.

A subclass sets ``_log``, ``_thread_prefix``, ``_description`` and ``_fault_sync_timeout_s``
(and ``_send_timeout_s`` for a per-client send timeout), and ``fault_delay_s`` on the
instance; implements ``_tick(now)``, which makes frames (``_frame_faults`` says whether to,
``_push_locked`` queues one) and ``_record_sent(frame, t_sent)``. A frame is any object with
a ``payloads`` attribute: the bytes to write to each client, in order.

What it does not model: more than a loopback TCP transport (no TLS, no client limit), and
incoming requests (whatever clients send is read and discarded).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from motionctl.simulators.faults import FAULT_KINDS, WireQueue, unsupported_fault

__all__ = ["ACCEPT_IDLE_S", "IgtlServerSim"]

ACCEPT_IDLE_S = 1.0  # a backstop only: the accept thread is woken through a pipe
STOP_JOIN_S = 2.0  # stop() waits this long for each thread (plus a send timeout)


class IgtlServerSim:
    """A TCP server streaming a subclass's frames, with the transport faults (see above)."""

    supported_faults: tuple[str, ...] = FAULT_KINDS
    _log: ClassVar[logging.Logger]
    _thread_prefix: ClassVar[str]  # threads are f"{prefix}-accept" and f"{prefix}-stream"
    _description: ClassVar[str]  # "surface tracker simulator": for messages
    _fault_sync_timeout_s: ClassVar[float]  # start_fault/stop_fault wait at most this
    # A client that cannot take a frame in this time is dropped (None: blocking sends).
    _send_timeout_s: ClassVar[float | None] = None
    fault_delay_s: float  # the delay fault's delay, set by the subclass

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tick_s: float,
        clock: Callable[[], float],
        t0: float | None,
        name: str,
    ):
        self._host, self._port = host, port
        self._tick_s = tick_s
        self._clock = clock
        self.t0 = t0
        self.name = name
        self._listener: socket.socket | None = None  # owned by the accept thread once started
        self._bound: tuple[str, int] | None = None
        self._clients: list[socket.socket] = []
        self._clients_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._client_connected = threading.Condition()
        # Guards the fault state, the wire queue and the listener's state flags.
        self._cond = threading.Condition()
        self._faults: set[str] = set()
        self._wire: WireQueue[Any] = WireQueue()
        self._dispatched = 0  # frames out of the wire queue (sent or lost)
        self._kick = False  # the stream thread should look at the wire queue now
        self._refusing = False  # the listener should be closed (disconnect)
        self._listening = False
        self._listen_error: OSError | None = None
        self._fault_calls = threading.Lock()  # one start_fault/stop_fault at a time

    @property
    def address(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError(f"{self._description} not started")
        return self._bound

    def start(self) -> tuple[str, int]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen(4)
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._bound = listener.getsockname()[:2]
        with self._cond:
            self._listening = True
        if self.t0 is None:
            self.t0 = self._clock()
        self._stop.clear()
        for target, name in ((self._accept_loop, "accept"), (self._stream_loop, "stream")):
            thread = threading.Thread(target=target, name=f"{self._thread_prefix}-{name}")
            thread.start()
            self._threads.append(thread)
        self._log.info("%s on %s:%d", self._description, *self.address)
        return self.address

    def stop(self) -> None:
        """Stop sending and close every connection; idempotent."""
        self._stop.set()
        self._wake_accept()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=STOP_JOIN_S + (self._send_timeout_s or 0.0))
        self._threads.clear()
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for attr in ("_wake_r", "_wake_w"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)
        self._bound = None
        with self._cond:
            self._listening = False
            self._wire.clear()

    def wait_for_client(self, timeout: float) -> bool:
        with self._client_connected:
            return self._client_connected.wait_for(lambda: bool(self._clients), timeout)

    # -- faults ------------------------------------------------------------------------------

    def active_faults(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(k for k in FAULT_KINDS if k in self._faults)

    def start_fault(self, kind: str) -> None:
        """Start a fault (see the module docstring); thread-safe, idempotent."""
        if kind not in self.supported_faults:
            raise unsupported_fault(self.name, kind, self.supported_faults)
        with self._fault_calls:
            with self._cond:
                if kind in self._faults:
                    return
                self._faults.add(kind)
                if kind == "disconnect":
                    self._refusing = True
                    self._dispatched += self._wire.clear()  # lost with the connection
                    self._cond.notify_all()
            if kind == "disconnect":
                # Listener first, so that the driver's reconnect cannot get in between.
                self._sync_listener_state(listening=False)
                with self._clients_lock:
                    clients, self._clients = self._clients, []
                for client in clients:
                    self._close_client(client)
            self._log.info("fault %s started", kind)

    def stop_fault(self, kind: str) -> None:
        """End a fault; thread-safe, idempotent. Raises OSError if the listener cannot be
        opened again after a disconnect (the fault is over; the server retries)."""
        if kind not in self.supported_faults:
            raise unsupported_fault(self.name, kind, self.supported_faults)
        with self._fault_calls:
            with self._cond:
                if kind not in self._faults:
                    return
                self._faults.discard(kind)
                if kind == "disconnect":
                    self._refusing = False
                elif kind in ("delay", "reorder"):
                    if kind == "reorder":
                        self._wire.release_held()
                    else:
                        self._wire.release_all(self._clock())
                    self._kick = True
                    self._cond.notify_all()
                    backlog = self._wire.pushed
                    if self._threads:
                        self._cond.wait_for(
                            lambda: self._dispatched >= backlog or self._stop.is_set(),
                            self._fault_sync_timeout_s,
                        )
            if kind == "disconnect":
                self._sync_listener_state(listening=True)
            self._log.info("fault %s ended", kind)

    def _sync_listener_state(self, listening: bool) -> None:
        if not self._threads:
            return  # not running: the accept thread sets the listener up when it starts
        self._wake_accept()
        with self._cond:
            done = self._cond.wait_for(
                lambda: (
                    self._listening == listening
                    or (listening and self._listen_error is not None)
                    or self._stop.is_set()
                ),
                self._fault_sync_timeout_s,
            )
            error = self._listen_error if listening else None
        if error is not None:
            raise OSError(f"{self.name}: cannot listen on {self._bound} again: {error}")
        if not done:
            raise RuntimeError(f"{self.name}: the accept thread did not answer")

    def _wake_accept(self) -> None:
        if self._wake_w is not None:
            os.write(self._wake_w, b"x")

    # -- accept thread -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._wake_r is not None
        while not self._stop.is_set():
            self._apply_listener_state()
            listener = self._listener
            watched = [self._wake_r] if listener is None else [self._wake_r, listener]
            readable, _, _ = select.select(watched, [], [], ACCEPT_IDLE_S)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
                continue
            if listener is None or listener not in readable:
                continue
            try:
                client, peer = listener.accept()
            except OSError as exc:
                self._log.info("accept failed: %s", exc)  # the peer gave up before we got to it
                continue
            with self._cond:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._send_timeout_s is not None:
                client.settimeout(self._send_timeout_s)  # a stalled client must not stall us
            self._log.info("client connected from %s:%d", *peer[:2])
            with self._clients_lock:
                self._clients.append(client)
            with self._client_connected:
                self._client_connected.notify_all()

    def _apply_listener_state(self) -> None:
        """Close or reopen the listener as the disconnect fault wants; accept thread only."""
        with self._cond:
            want = not self._refusing
        error = None
        if want and self._listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(self._bound)
                listener.listen(4)
            except OSError as exc:
                listener.close()
                error = exc
                self._log.error("cannot listen on %s:%d again: %s", *self._bound, exc)
            else:
                self._listener = listener
                self._log.info("listening again on %s:%d", *self._bound)
        elif not want and self._listener is not None:
            self._listener.close()
            self._listener = None
            self._log.info("listener closed (disconnect)")
        with self._cond:
            self._listening = self._listener is not None
            self._listen_error = error
            self._cond.notify_all()

    # -- stream thread -----------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        """Make (or not) the frames of this tick; the subclass's."""
        raise NotImplementedError

    def _record_sent(self, frame: Any, t_sent: float) -> None:
        """Record a frame that reached at least one client; the subclass's."""
        raise NotImplementedError

    def _stream_loop(self) -> None:
        next_t = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_t:
                self._tick(now)
                next_t += self._tick_s
                if self._clock() - next_t > self._tick_s:
                    next_t = self._clock()  # fell behind (loaded machine): skip, never burst
                self._drain_requests()
            self._send_due()
            with self._cond:
                wake_at = next_t
                due = self._wire.next_due()
                if due is not None:
                    wake_at = min(wake_at, due)
                timeout = wake_at - self._clock()
                if timeout > 0 and not self._kick and not self._stop.is_set():
                    # Pacing the device's clock, not synchronisation: its frame period (or
                    # a trigger's sampling); stop() and the end of a delay fault wake it early.
                    self._cond.wait(timeout)
                self._kick = False

    def _frame_faults(self) -> set[str] | None:
        """The faults on now, or None if no frame is to be made (disconnect, freeze, or no
        client connected)."""
        with self._cond:
            faults = set(self._faults)
        if "disconnect" in faults or "freeze" in faults:
            return None
        with self._clients_lock:
            if not self._clients:
                return None
        return faults

    def _push_locked(self, frame: Any, t_made: float) -> None:
        """Queue a frame for the wire as the delay and reorder faults want; hold ``_cond``."""
        self._wire.push(
            frame,
            t_made,
            delay_s=self.fault_delay_s if "delay" in self._faults else 0.0,
            reorder="reorder" in self._faults,
        )

    def _send_due(self) -> None:
        with self._cond:
            frames = self._wire.pop_due(self._clock())
        if not frames:
            return
        for frame in frames:
            with self._clients_lock:
                clients = list(self._clients)
            t_sent = self._clock()  # before the send: the controller may act before it returns
            delivered = False
            for client in clients:
                try:
                    for data in frame.payloads:
                        client.sendall(data)
                    delivered = True
                except OSError as exc:  # includes a send timeout
                    self._log.info("client dropped: %s", exc)
                    self._drop(client)
            if delivered:
                self._record_sent(frame, t_sent)
        with self._cond:
            self._dispatched += len(frames)
            self._cond.notify_all()

    def _drain_requests(self) -> None:
        # Clients may send queries; read and discard them so their send buffers never fill.
        with self._clients_lock:
            clients = list(self._clients)
        if not clients:
            return
        try:
            readable, _, _ = select.select(clients, [], [], 0)
        except (OSError, ValueError):
            return  # a client closed under us by a disconnect fault: gone already
        for client in readable:
            try:
                if not client.recv(65536):
                    self._drop(client)
            except OSError:
                self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        with self._clients_lock:
            if client in self._clients:
                self._clients.remove(client)
        client.close()

    @staticmethod
    def _close_client(client: socket.socket) -> None:
        try:
            client.shutdown(socket.SHUT_RDWR)  # wakes a send in progress on another thread
        except OSError:
            pass  # the peer has gone already
        client.close()
