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
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyigtl

from motionctl.simulators.faults import fault_label
from motionctl.simulators.igtl_server import IgtlServerSim

log = logging.getLogger("motionctl.sim.surface")

FAULT_DELAY_S = 0.3
GARBAGE_BYTES = 200
JUMP_MM = (0.0, 0.0, 80.0)  # +80 mm AP: no abdomen moves like that between two frames
CLOCK_SKEW_S = 2.0
FAULT_SYNC_TIMEOUT_S = 1.0  # start_fault/stop_fault wait at most this for the threads
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

    payloads: tuple[bytes, ...]  # one message, or the noise that replaced it
    seq: int | None
    patient_t: float
    surrogate_mm: tuple[float, float, float]
    target_mm: tuple[float, float, float]
    t_device: float
    fault: str | None


class SurfaceTrackerSim(IgtlServerSim):
    """OpenIGTLink TRANSFORM server at ``rate_hz``, driven by ``patient.state(t)``."""

    _log = log
    _thread_prefix = "sim-surface"
    _description = "surface tracker simulator"
    _fault_sync_timeout_s = FAULT_SYNC_TIMEOUT_S

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
        super().__init__(host=host, port=port, tick_s=1.0 / rate_hz, clock=clock, t0=t0, name=name)
        self._patient = patient
        self._device_name = igtl_device_name
        # Fault parameters: set them before the fault starts.
        self.fault_delay_s = FAULT_DELAY_S
        self.garbage_bytes = GARBAGE_BYTES
        self.jump_mm = JUMP_MM
        self.clock_skew_s = CLOCK_SKEW_S
        self._seq = 0
        self._streaming = True  # False: frozen (connected, sending nothing), a fault hook
        self.sent: list[SentFrame] = []
        self._rng = random.Random(fault_seed)

    def set_streaming(self, enabled: bool) -> None:
        """Fault hook: stop (freeze) or resume sending frames; connections stay open."""
        self._streaming = enabled

    def client_count(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    # -- stream thread -----------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        faults = self._frame_faults()
        if faults is None or not self._streaming:
            return
        assert self.t0 is not None
        patient_t = now - self.t0
        state = self._patient.state(patient_t)
        if "garbage" in faults:
            frame = _Frame(
                (self._rng.randbytes(self.garbage_bytes),),
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
            self._push_locked(frame, now)

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
            (message.pack(),),
            seq,
            patient_t,
            tuple(float(v) for v in matrix[:3, 3]),
            state.target_mm,
            t_device,
            fault_label(shaping),
        )

    def _record_sent(self, frame: _Frame, t_sent: float) -> None:
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
