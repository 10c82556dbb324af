"""Simulated surface / IR-marker tracker: an OpenIGTLink server streaming the surrogate point.

It stands in for a surface camera (AlignRT, Catalyst) or an IR-marker block (RPM) behind a
PLUS Server: a TCP server on the loopback address that streams one OpenIGTLink TRANSFORM
message per frame, whose translation is the external marker point (mm, IEC 61217 LR, SI, AP)
of the simulated patient. Messages use header version 2, so each carries a frame counter in
its message id; the header timestamp is the tracker's wall-clock acquisition time.

What it does not model: camera occlusion, 6-DoF surface registration (the rotation is
always identity), more than one tracked point, and incoming requests (GET_/STT_ messages
from clients are read and ignored).

Every frame sent is recorded in ``sent`` (seq, monotonic send time, point) so that the rig's
tests can count both sides and compare what the beam did with what the patient did.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyigtl

log = logging.getLogger("motionctl.sim.surface")


@dataclass(frozen=True, slots=True)
class SentFrame:
    seq: int
    t_sent: float  # monotonic clock of the sending process
    patient_t: float  # patient-model time of the frame
    surrogate_mm: tuple[float, float, float]
    target_mm: tuple[float, float, float]


class SurfaceTrackerSim:
    """OpenIGTLink TRANSFORM server at ``rate_hz``, driven by ``patient.state(t)``."""

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
    ):
        self._patient = patient
        self._host, self._port = host, port
        self._period_s = 1.0 / rate_hz
        self._device_name = igtl_device_name
        self._clock = clock
        self.t0 = t0
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._clients_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._streaming = True  # False: frozen (connected, sending nothing), a fault hook
        self.sent: list[SentFrame] = []
        self._client_connected = threading.Condition()

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("surface tracker simulator not started")
        return self._listener.getsockname()[:2]

    def start(self) -> tuple[str, int]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._port))
        listener.listen(4)
        self._listener = listener
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

    def set_streaming(self, enabled: bool) -> None:
        """Fault hook: stop (freeze) or resume sending frames; connections stay open."""
        self._streaming = enabled

    def wait_for_client(self, timeout: float) -> bool:
        with self._client_connected:
            return self._client_connected.wait_for(lambda: bool(self._clients), timeout)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            # select() with a timeout so that stop() is noticed without closing under accept().
            readable, _, _ = select.select([self._listener], [], [], 0.1)
            if not readable:
                continue
            client, peer = self._listener.accept()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.info("client connected from %s:%d", *peer[:2])
            with self._clients_lock:
                self._clients.append(client)
            with self._client_connected:
                self._client_connected.notify_all()

    def _stream_loop(self) -> None:
        next_t = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now < next_t:
                # Pacing the frame clock, not synchronisation: a real camera's frame period.
                if self._stop.wait(next_t - now):
                    break
            self._send_frame()
            next_t += self._period_s
            if self._clock() - next_t > self._period_s:
                next_t = self._clock()  # fell behind (loaded machine): skip, never burst
            self._drain_requests()

    def _send_frame(self) -> None:
        if not self._streaming:
            return
        with self._clients_lock:
            clients = list(self._clients)
        if not clients:
            return
        assert self.t0 is not None
        patient_t = self._clock() - self.t0
        state = self._patient.state(patient_t)
        matrix = np.eye(4, dtype=np.float32)
        matrix[:3, 3] = state.surrogate_mm
        message = pyigtl.TransformMessage(
            matrix, timestamp=time.time(), device_name=self._device_name
        )
        message.header_version = 2
        message.message_id = self._seq
        data = message.pack()
        t_sent = self._clock()  # before the send: the controller may act before sendall returns
        delivered = False
        for client in clients:
            try:
                client.sendall(data)
                delivered = True
            except OSError as exc:
                log.info("client dropped: %s", exc)
                self._drop(client)
        if delivered:
            self.sent.append(
                SentFrame(
                    self._seq,
                    t_sent,
                    patient_t,
                    tuple(float(v) for v in matrix[:3, 3]),
                    state.target_mm,
                )
            )
            self._seq += 1

    def _drain_requests(self) -> None:
        # Clients may send queries; read and discard them so their send buffers never fill.
        with self._clients_lock:
            clients = list(self._clients)
        if not clients:
            return
        readable, _, _ = select.select(clients, [], [], 0)
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
