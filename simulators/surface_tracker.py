"""Simulated surface / IR-marker tracker: an OpenIGTLink server streaming the surrogate point.

It stands in for a surface camera (AlignRT, Catalyst) or an IR-marker block (RPM) behind a
PLUS Server: a TCP server on the loopback address that streams one OpenIGTLink TRANSFORM
message per frame, whose translation is the external marker point (mm, IEC 61217 LR, SI, AP)
of the simulated patient. Messages use header version 2, so each carries a frame counter in
its message id; the header timestamp is the tracker's wall-clock acquisition time.

What it does not model: camera occlusion, 6-DoF surface registration (the rotation is
always identity), more than one tracked point, and incoming requests (GET_/STT_ messages
from clients are read and ignored).

Every frame sent is recorded in ``sent`` (seq, monotonic send time, point, header timestamp,
the fault that shaped it) so that the rig's tests can count both sides and compare what the
beam did with what the patient did.

Faults (``start_fault(kind)`` / ``stop_fault(kind)``; all of ``FAULT_KINDS``; several may be
on together, the first that applies in this list wins):

============  ==============================================================================
disconnect    every client connection is closed and the listening socket too, so a connect
              is refused (the tracker host went off the network); at the end the server
              listens again on the same port and the driver reconnects with its back-off.
              Frames queued by ``delay``/``reorder`` are lost with the connection.
freeze        connected, but no frames: the camera stopped (frames already queued by
              ``delay`` still arrive).
garbage       ``garbage_bytes`` (200) random bytes per frame period instead of a message.
              That breaks the OpenIGTLink framing: the driver drops the connection and
              reconnects, and gets garbage again while the fault lasts.
delay         every frame is sent ``fault_delay_s`` (0.3 s) after it was made, in order;
              when the fault ends the backlog goes out at once (a congested link clears).
reorder       consecutive frames swap pairwise (seq 1, 0, 3, 2, ...); the held frame goes
              one period late. At the end a held frame goes out at once.
nan           the translation is NaN, NaN, NaN (the tracker lost the marker and says so
              badly); the driver reports them as malformed "non-finite".
jump          the point is offset by ``jump_mm`` ((0, 0, 80): +80 mm AP, physically
              implausible) for the duration; the driver accepts it: the core must not.
clock-skew    the header timestamp is ``clock_skew_s`` (2 s) earlier for the duration: the
              device clock stepped back, then forward again at the end.
============  ==============================================================================

Frame counters: ``seq`` is given to a frame when it is made, so it shows reordering; frames
the camera did not make (no client, freeze, disconnect, garbage) take no seq. Garbage is
recorded with ``seq`` None and a NaN point. ``start_fault``/``stop_fault`` return once the
change is in effect: for ``disconnect`` the listener is closed and every client gone, and at
its end the server listens again; when ``delay`` or ``reorder`` ends, the backlog has been
sent.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyigtl

from motionctl.simulators.faults import (
    FAULT_KINDS,
    WireQueue,
    fault_label,
    unsupported_fault,
)

log = logging.getLogger("motionctl.sim.surface")

FAULT_DELAY_S = 0.3
GARBAGE_BYTES = 200
JUMP_MM = (0.0, 0.0, 80.0)  # +80 mm AP: no abdomen moves like that between two frames
CLOCK_SKEW_S = 2.0
FAULT_SYNC_TIMEOUT_S = 1.0  # start_fault/stop_fault wait at most this for the threads
ACCEPT_IDLE_S = 1.0  # a backstop only: the accept thread is woken through a pipe
_TRANSPORT_KINDS = frozenset({"delay", "reorder"})
_NAN_POINT = (math.nan, math.nan, math.nan)


@dataclass(frozen=True, slots=True)
class SentFrame:
    seq: int | None  # None: not a message (garbage)
    t_sent: float  # monotonic clock of the sending process
    patient_t: float  # patient-model time of the frame (when it was made)
    surrogate_mm: tuple[float, float, float]  # as sent (a fault's offset or NaN included)
    target_mm: tuple[float, float, float]  # the patient's truth at patient_t
    t_device: float = math.nan  # the header timestamp as sent
    fault: str | None = None  # the fault kinds that shaped it ("nan", "jump+delay", ...)


@dataclass(frozen=True, slots=True)
class _Frame:
    """A frame made but perhaps not yet sent (delay, reorder)."""

    data: bytes
    seq: int | None
    patient_t: float
    surrogate_mm: tuple[float, float, float]
    target_mm: tuple[float, float, float]
    t_device: float
    fault: str | None


class SurfaceTrackerSim:
    """OpenIGTLink TRANSFORM server at ``rate_hz``, driven by ``patient.state(t)``."""

    supported_faults: tuple[str, ...] = FAULT_KINDS

    def __init__(
        self,
        patient,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_hz: float = 30.0,
        igtl_device_name: str = "surface",
        clock: Callable[[], float] = time.monotonic,
        t0: float | None = None,
        name: str = "surface",
        fault_seed: int = 0,
    ):
        self._patient = patient
        self._host, self._port = host, port
        self._period_s = 1.0 / rate_hz
        self._device_name = igtl_device_name
        self._clock = clock
        self.t0 = t0
        self.name = name
        # Fault parameters: set them before the fault starts.
        self.fault_delay_s = FAULT_DELAY_S
        self.garbage_bytes = GARBAGE_BYTES
        self.jump_mm = JUMP_MM
        self.clock_skew_s = CLOCK_SKEW_S
        self._listener: socket.socket | None = None  # owned by the accept thread once started
        self._bound: tuple[str, int] | None = None
        self._clients: list[socket.socket] = []
        self._clients_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._seq = 0
        self._streaming = True  # False: frozen (connected, sending nothing), a fault hook
        self.sent: list[SentFrame] = []
        self._client_connected = threading.Condition()
        # Guards the fault state, the wire queue and the listener's state flags.
        self._cond = threading.Condition()
        self._faults: set[str] = set()
        self._wire: WireQueue[_Frame] = WireQueue()
        self._dispatched = 0  # frames out of the wire queue (sent or lost)
        self._kick = False  # the stream thread should look at the wire queue now
        self._refusing = False  # the listener should be closed (disconnect)
        self._listening = False
        self._listen_error: OSError | None = None
        self._fault_calls = threading.Lock()  # one start_fault/stop_fault at a time
        self._rng = random.Random(fault_seed)

    @property
    def address(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError("surface tracker simulator not started")
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
            thread = threading.Thread(target=target, name=f"sim-surface-{name}")
            thread.start()
            self._threads.append(thread)
        log.info("surface tracker simulator on %s:%d", *self.address)
        return self.address

    def stop(self) -> None:
        """Stop streaming and close every connection; idempotent."""
        self._stop.set()
        self._wake_accept()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=2.0)
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

    def set_streaming(self, enabled: bool) -> None:
        """Fault hook: stop (freeze) or resume sending frames; connections stay open."""
        self._streaming = enabled

    def wait_for_client(self, timeout: float) -> bool:
        with self._client_connected:
            return self._client_connected.wait_for(lambda: bool(self._clients), timeout)

    def client_count(self) -> int:
        with self._clients_lock:
            return len(self._clients)

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
            log.info("fault %s started", kind)

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
                            FAULT_SYNC_TIMEOUT_S,
                        )
            if kind == "disconnect":
                self._sync_listener_state(listening=True)
            log.info("fault %s ended", kind)

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
                FAULT_SYNC_TIMEOUT_S,
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
                log.info("accept failed: %s", exc)  # the peer gave up before we got to it
                continue
            with self._cond:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.info("client connected from %s:%d", *peer[:2])
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
                log.error("cannot listen on %s:%d again: %s", *self._bound, exc)
            else:
                self._listener = listener
                log.info("listening again on %s:%d", *self._bound)
        elif not want and self._listener is not None:
            self._listener.close()
            self._listener = None
            log.info("listener closed (disconnect)")
        with self._cond:
            self._listening = self._listener is not None
            self._listen_error = error
            self._cond.notify_all()

    # -- stream thread -----------------------------------------------------------------------

    def _stream_loop(self) -> None:
        next_t = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_t:
                self._make_frame(now)
                next_t += self._period_s
                if self._clock() - next_t > self._period_s:
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
                    # Pacing the frame clock, not synchronisation: a real camera's frame
                    # period; stop() and the end of a delay fault wake it early.
                    self._cond.wait(timeout)
                self._kick = False

    def _make_frame(self, now: float) -> None:
        with self._cond:
            faults = set(self._faults)
        if "disconnect" in faults or "freeze" in faults or not self._streaming:
            return
        with self._clients_lock:
            if not self._clients:
                return
        assert self.t0 is not None
        patient_t = now - self.t0
        state = self._patient.state(patient_t)
        if "garbage" in faults:
            frame = _Frame(
                self._rng.randbytes(self.garbage_bytes),
                None,
                patient_t,
                _NAN_POINT,
                state.target_mm,
                math.nan,
                fault_label({"garbage"} | (faults & _TRANSPORT_KINDS)),
            )
        else:
            frame = self._message(patient_t, state, faults)
        with self._cond:
            self._wire.push(
                frame,
                now,
                delay_s=self.fault_delay_s if "delay" in self._faults else 0.0,
                reorder="reorder" in self._faults,
            )

    def _message(self, patient_t: float, state, faults: set[str]) -> _Frame:
        matrix = np.eye(4, dtype=np.float32)
        point = np.asarray(state.surrogate_mm, dtype=np.float64)
        shaping = faults & (_TRANSPORT_KINDS | {"clock-skew"})
        if "nan" in faults:
            point = np.full(3, np.nan)
            shaping.add("nan")
        elif "jump" in faults:
            point = point + np.asarray(self.jump_mm, dtype=np.float64)
            shaping.add("jump")
        matrix[:3, 3] = point
        t_device = time.time() - (self.clock_skew_s if "clock-skew" in faults else 0.0)
        message = pyigtl.TransformMessage(matrix, timestamp=t_device, device_name=self._device_name)
        message.header_version = 2
        message.message_id = self._seq
        seq, self._seq = self._seq, self._seq + 1
        return _Frame(
            message.pack(),
            seq,
            patient_t,
            tuple(float(v) for v in matrix[:3, 3]),
            state.target_mm,
            t_device,
            fault_label(shaping),
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
                    client.sendall(frame.data)
                    delivered = True
                except OSError as exc:
                    log.info("client dropped: %s", exc)
                    self._drop(client)
            if delivered:
                self.sent.append(
                    SentFrame(
                        frame.seq,
                        t_sent,
                        frame.patient_t,
                        frame.surrogate_mm,
                        frame.target_mm,
                        frame.t_device,
                        frame.fault,
                    )
                )
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
