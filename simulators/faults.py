"""Runtime fault injection for the simulated devices of the rig.

A fault is what a real device, cable or network does wrong: it drops off the line, stops
sending, sends noise, sends late or out of order, sends values that are not numbers or not
physical, or stamps them with a clock that went backwards. Every simulator takes faults at
runtime through the same small control API (``FaultTarget``): ``supported_faults``,
``start_fault(kind)`` and ``stop_fault(kind)``; each simulator's module docstring says what
each kind does on its wire.

Faults are written ``DEVICE:KIND@START[+DURATION]`` (``parse_fault``): START and DURATION are
seconds from the session start (plain decimals, e.g. ``surface:freeze@5+2``,
``beam:disconnect@10``, ``spirometer:nan@3.5+0.5``); without a duration the fault lasts until
the session ends. A ``FaultSchedule`` applies a list of them to named simulators on one timer
thread and records when each fault actually started and ended.

Also here, for the simulators: ``WireQueue`` (frames on their way to the wire under the
``delay`` and ``reorder`` faults), ``noise_line`` and ``fault_label``.

What it does not model: faults that come and go by themselves (intermittent contacts, bursts
of noise at random): a fault is on exactly between its start and its end.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Generic, Protocol, TypeVar, runtime_checkable

__all__ = [
    "FAULT_KINDS",
    "AppliedFault",
    "FaultSchedule",
    "FaultSpec",
    "FaultTarget",
    "WireQueue",
    "check_faults",
    "fault_label",
    "noise_line",
    "parse_fault",
    "unsupported_fault",
]

FAULT_KINDS = ("disconnect", "freeze", "garbage", "delay", "reorder", "nan", "jump", "clock-skew")
FAULT_FORM = "DEVICE:KIND@START[+DURATION]"
MAX_IDLE_WAIT_S = 1.0  # the timer re-reads the injected clock at least this often
JOIN_TIMEOUT_S = 3.0  # a surface disconnect may take up to ~1 s to take effect

log = logging.getLogger("motionctl.sim.faults")

_DEVICE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def _form_hint() -> str:
    return (
        f"expected {FAULT_FORM} (seconds from session start), e.g. 'surface:freeze@5+2'; "
        f"KIND is one of {', '.join(FAULT_KINDS)}"
    )


def _format_seconds(value: float) -> str:
    # The shortest decimal that reads back as the same float, never in exponent form.
    return format(Decimal(repr(value)), "f")


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault: ``kind`` on ``device`` from ``start_s`` for ``duration_s`` (None: to the end)."""

    device: str
    kind: str
    start_s: float
    duration_s: float | None = None

    def __post_init__(self) -> None:
        # Plain floats, and never -0.0, so that equal specs print alike.
        object.__setattr__(self, "start_s", float(self.start_s) + 0.0)
        if self.duration_s is not None:
            object.__setattr__(self, "duration_s", float(self.duration_s))
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(
                f"fault device {self.device!r} is not a name (a letter, then letters, "
                "digits, '_' or '-')"
            )
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"fault start {self.start_s!r} s is not a finite time >= 0")
        if self.duration_s is not None and not (
            math.isfinite(self.duration_s) and self.duration_s > 0
        ):
            raise ValueError(f"fault duration {self.duration_s!r} s is not a finite time > 0")

    @property
    def end_s(self) -> float | None:
        """Scheduled end, seconds from session start; None: until the session ends."""
        return None if self.duration_s is None else self.start_s + self.duration_s

    def __str__(self) -> str:
        text = f"{self.device}:{self.kind}@{_format_seconds(self.start_s)}"
        if self.duration_s is not None:
            text += f"+{_format_seconds(self.duration_s)}"
        return text


def parse_fault(text: str) -> FaultSpec:
    """Parse ``DEVICE:KIND@START[+DURATION]``; raises ValueError saying what was wrong."""

    def bad(what: str) -> ValueError:
        return ValueError(f"bad fault {text!r}: {what}; {_form_hint()}")

    stripped = text.strip()
    device, colon, rest = stripped.partition(":")
    if not colon:
        raise bad("no ':' between DEVICE and KIND")
    if not _DEVICE.fullmatch(device):
        raise bad(f"DEVICE {device!r} is not a name (a letter, then letters, digits, '_' or '-')")
    kind, at, timing = rest.partition("@")
    if not at:
        raise bad("no '@' before START")
    if kind not in FAULT_KINDS:
        raise bad(f"unknown KIND {kind!r}")
    start_text, plus, duration_text = timing.partition("+")
    if not _SECONDS.fullmatch(start_text):
        raise bad(f"START {start_text!r} is not a decimal number of seconds >= 0")
    duration = None
    if plus:
        if not _SECONDS.fullmatch(duration_text):
            raise bad(f"DURATION {duration_text!r} is not a decimal number of seconds > 0")
        duration = float(duration_text)
        if duration <= 0:
            raise bad(f"DURATION {duration_text!r} is not > 0")
    start = float(start_text)
    if not math.isfinite(start) or (duration is not None and not math.isfinite(duration)):
        raise bad("a time is too large")
    return FaultSpec(device, kind, start, duration)


@runtime_checkable
class FaultTarget(Protocol):
    """What a simulator offers to take faults at runtime.

    ``start_fault`` and ``stop_fault`` are thread-safe and idempotent, raise ValueError for a
    kind not in ``supported_faults``, and return once the change is in effect on the wire.
    """

    supported_faults: tuple[str, ...]

    def start_fault(self, kind: str) -> None: ...

    def stop_fault(self, kind: str) -> None: ...


def unsupported_fault(device: str, kind: str, supported: Iterable[str]) -> ValueError:
    """The error for a fault kind a device does not take, listing those it does."""
    return ValueError(
        f"device {device!r} does not support fault {kind!r}; it supports: "
        f"{', '.join(supported) or 'none'}"
    )


def check_faults(specs: Iterable[FaultSpec], targets: Mapping[str, FaultTarget]) -> None:
    """Raise ValueError for a fault on an unknown device, of a kind its simulator does not
    support, or overlapping another of the same kind on the same device."""
    specs = list(specs)
    for spec in specs:
        target = targets.get(spec.device)
        if target is None:
            raise ValueError(
                f"fault {spec}: unknown device {spec.device!r}; devices: "
                f"{', '.join(sorted(targets)) or 'none'}"
            )
        if spec.kind not in target.supported_faults:
            refusal = unsupported_fault(spec.device, spec.kind, target.supported_faults)
            raise ValueError(f"fault {spec}: {refusal}")
    by_channel: dict[tuple[str, str], list[FaultSpec]] = {}
    for spec in specs:
        by_channel.setdefault((spec.device, spec.kind), []).append(spec)
    for same in by_channel.values():
        same.sort(key=lambda s: s.start_s)
        for earlier, later in zip(same, same[1:], strict=False):
            if earlier.end_s is None or earlier.end_s > later.start_s:
                raise ValueError(f"faults {earlier} and {later} overlap")


@dataclass(frozen=True, slots=True)
class AppliedFault:
    """A fault as it happened: session seconds (from ``t0``) measured right after the
    simulator's ``start_fault``/``stop_fault`` returned; ``end_s`` None while it lasts."""

    device: str
    kind: str
    start_s: float
    end_s: float | None
    spec: FaultSpec


@dataclass(frozen=True, slots=True)
class _Action:
    t_s: float
    starts: bool
    index: int  # into the schedule's specs


class FaultSchedule:
    """Applies FaultSpecs to named targets at session times, on one timer thread.

    The thread waits on an Event with timeouts (never longer than ``MAX_IDLE_WAIT_S``, so an
    injected clock is re-read), so ``stop()`` never blocks long. ``t0`` is the session start
    on ``clock``; None means the moment ``start()`` is called. ``stop()`` ends every fault
    still on (recording its end) and raises RuntimeError if a simulator refused a start or
    stop; the error is also logged when it happens.

    Without ``start()``, ``run_due()`` applies what is due at the clock's time now: that is
    how a test drives the schedule with a fake clock.
    """

    def __init__(
        self,
        specs: Iterable[FaultSpec],
        targets: Mapping[str, FaultTarget],
        *,
        clock: Callable[[], float] = time.monotonic,
        t0: float | None = None,
    ) -> None:
        self.specs = tuple(specs)
        check_faults(self.specs, targets)
        self._targets = dict(targets)
        self._clock = clock
        self.t0 = t0
        actions = [_Action(s.start_s, True, i) for i, s in enumerate(self.specs)]
        actions += [_Action(s.end_s, False, i) for i, s in enumerate(self.specs) if s.end_s]
        # At one instant ends go first, so a fault that ends where the next one of the same
        # kind starts does not cancel it.
        self._actions = sorted(actions, key=lambda a: (a.t_s, a.starts, a.index))
        self._next = 0
        self._active: dict[int, int] = {}  # spec index -> index into _applied
        self._applied: list[AppliedFault] = []
        self._errors: list[str] = []
        self._changed = threading.Condition()  # guards _applied, _errors, _next
        self._run_lock = threading.Lock()  # one caller of the targets at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("fault schedule already started")
        if self.t0 is None:
            self.t0 = self._clock()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fault-schedule", daemon=False)
        self._thread.start()
        log.info("fault schedule: %s", ", ".join(map(str, self.specs)) or "no faults")

    def stop(self) -> None:
        """Stop the timer, end every fault still on; idempotent. Raises RuntimeError if a
        simulator failed to take a fault, or the timer thread did not end."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError("fault schedule thread did not stop")
        with self._run_lock:
            for index in sorted(self._active):
                self._end(index)
        with self._changed:
            errors, self._errors = self._errors, []
        if errors:
            raise RuntimeError("fault schedule: " + "; ".join(errors))

    def __enter__(self) -> FaultSchedule:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------------

    @property
    def applied(self) -> list[AppliedFault]:
        """Every fault started so far, in start order; a copy."""
        with self._changed:
            return list(self._applied)

    def wait_for(self, predicate: Callable[[list[AppliedFault]], bool], timeout: float) -> bool:
        """Wait until ``predicate(applied)`` holds; False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._applied)), timeout)

    def wait_done(self, timeout: float) -> bool:
        """Wait until every scheduled start and end has happened (faults without a
        duration stay on until ``stop()``); False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._next >= len(self._actions), timeout)

    # -- applying ----------------------------------------------------------------------------

    def run_due(self) -> None:
        """Start and end every fault due at the clock's time now, in time order."""
        if self.t0 is None:
            raise RuntimeError("fault schedule has no t0: pass it, or call start()")
        with self._run_lock:
            while self._next < len(self._actions):
                action = self._actions[self._next]
                if action.t_s > self._clock() - self.t0:
                    break
                if action.starts:
                    self._begin(action.index)
                elif action.index in self._active:
                    self._end(action.index)
                with self._changed:
                    self._next += 1
                    self._changed.notify_all()

    def _seconds_to_next(self) -> float | None:
        with self._changed:
            if self._next >= len(self._actions):
                return None
            return self._actions[self._next].t_s - (self._clock() - self.t0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_due()
            wait = self._seconds_to_next()
            if wait is None:
                return  # nothing left to do; stop() ends the faults without a duration
            if self._stop.wait(min(max(wait, 0.0), MAX_IDLE_WAIT_S)):
                return

    def _fail(self, spec: FaultSpec, what: str, exc: Exception) -> None:
        log.error("fault %s: %s failed: %r", spec, what, exc)
        with self._changed:
            self._errors.append(f"{spec}: {what} failed: {exc!r}")

    def _begin(self, index: int) -> None:
        spec = self.specs[index]
        # The fault starts when its injection begins: a disconnect can be seen (and held)
        # before start_fault() has returned, and the hold latency counts from here.
        t_s = self._clock() - self.t0
        try:
            self._targets[spec.device].start_fault(spec.kind)
        except Exception as exc:  # noqa: BLE001 - recorded and raised again by stop()
            self._fail(spec, "start_fault", exc)
            return
        log.info("fault %s started at %.3f s", spec, t_s)
        with self._changed:
            self._active[index] = len(self._applied)
            self._applied.append(AppliedFault(spec.device, spec.kind, t_s, None, spec))
            self._changed.notify_all()

    def _end(self, index: int) -> None:
        spec = self.specs[index]
        try:
            self._targets[spec.device].stop_fault(spec.kind)
        except Exception as exc:  # noqa: BLE001 - recorded and raised again by stop()
            self._fail(spec, "stop_fault", exc)
            return
        t_s = self._clock() - self.t0
        log.info("fault %s ended at %.3f s", spec, t_s)
        with self._changed:
            position = self._active.pop(index)
            self._applied[position] = replace(self._applied[position], end_s=t_s)
            self._changed.notify_all()


# -- helpers for the simulators ---------------------------------------------------------------

T = TypeVar("T")


class WireQueue(Generic[T]):
    """Frames on their way to the wire under the ``delay`` and ``reorder`` faults.

    ``push`` a frame when the device makes it; ``pop_due`` gives the frames to send now, in
    wire order. With ``delay_s`` a frame is due that long after it was made (later frames
    keep their order); with ``reorder`` every other frame is held back until the next one
    has gone, so consecutive pairs swap. Not thread-safe: the owner holds its lock.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[float, T]] = deque()
        self._held: tuple[float, T] | None = None
        self._pushed = 0  # frames that entered the queue (not counting one held)

    def push(self, frame: T, now: float, *, delay_s: float = 0.0, reorder: bool = False) -> None:
        due = now + delay_s
        if reorder and self._held is None:
            self._held = (due, frame)
            return
        self._append(due, frame)
        if self._held is not None:
            # The held frame goes right after the one that overtook it, never earlier.
            held_due, held = self._held
            self._held = None
            self._append(max(held_due, due), held)

    def _append(self, due: float, frame: T) -> None:
        if self._queue:
            due = max(due, self._queue[-1][0])  # never overtake a frame queued earlier
        self._queue.append((due, frame))
        self._pushed += 1

    def release_held(self) -> None:
        """The reorder fault ended: the held frame goes out at its own due time."""
        if self._held is not None:
            due, frame = self._held
            self._held = None
            self._append(due, frame)

    def release_all(self, now: float) -> None:
        """The delay fault ended: everything queued is due now (a backlog clears at once)."""
        self._queue = deque((min(due, now), frame) for due, frame in self._queue)

    def pop_due(self, now: float) -> list[T]:
        frames = []
        while self._queue and self._queue[0][0] <= now:
            frames.append(self._queue.popleft()[1])
        return frames

    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def clear(self) -> int:
        """Drop every frame (the line went down); returns how many of those had entered the
        queue (``pushed``), i.e. not counting a held one."""
        dropped = len(self._queue)
        self._queue.clear()
        self._held = None
        return dropped

    @property
    def pushed(self) -> int:
        """Frames that have entered the queue so far (a held frame counts once released)."""
        return self._pushed

    def __len__(self) -> int:
        return len(self._queue) + (self._held is not None)


_NOISE_BYTES = bytes(b for b in range(256) if b != 0x0A)


def noise_line(rng: random.Random, length: int) -> bytes:
    """``length`` random bytes ending in a newline, with no other newline: line noise that
    the receiver sees as exactly one bad line."""
    if length < 1:
        raise ValueError(f"a noise line needs at least one byte, got {length}")
    return bytes(rng.choice(_NOISE_BYTES) for _ in range(length - 1)) + b"\n"


def fault_label(active: Iterable[str]) -> str | None:
    """The fault kinds that shaped a frame, in FAULT_KINDS order, joined by '+'; None if none."""
    kinds = set(active)
    return "+".join(k for k in FAULT_KINDS if k in kinds) or None
