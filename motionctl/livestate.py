"""Live traces for the console: preallocated ring buffers, written by the controller thread,
copied out by the GUI on its own timer at display rate.

The controller appends one row per surrogate sample (cheap: a few array stores under a
lock) and never waits for a reader; the GUI takes ``snapshot()`` copies, never one signal
per sample. Times are session seconds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

COLUMNS = (
    "t",
    "surrogate_mm",
    "lr_mm",
    "si_mm",
    "ap_mm",  # estimated internal position now
    "pred_lr_mm",
    "pred_si_mm",
    "pred_ap_mm",  # predicted at t + horizon
    "uncertainty_mm",
    "beam_on",  # 1.0 / 0.0: the gate's decision at this sample
    "valid",
)


@dataclass(frozen=True)
class TraceSnapshot:
    """Copies of the last ``n`` rows, oldest first; one array per column."""

    columns: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __len__(self) -> int:
        return len(self.columns["t"])


class LiveTrace:
    def __init__(self, seconds: float = 180.0, rate_hz: float = 30.0):
        self.capacity = int(seconds * rate_hz * 1.5)  # headroom for a faster device
        self._data = np.full((self.capacity, len(COLUMNS)), math.nan)
        self._head = 0  # next row to write
        self._count = 0
        self._lock = threading.Lock()

    def append(self, row: tuple[float, ...]) -> None:
        with self._lock:
            self._data[self._head] = row
            self._head = (self._head + 1) % self.capacity
            self._count = min(self._count + 1, self.capacity)

    def snapshot(self, since_t: float | None = None) -> TraceSnapshot:
        with self._lock:
            if self._count < self.capacity:
                rows = self._data[: self._count].copy()
            else:
                rows = np.concatenate((self._data[self._head :], self._data[: self._head]))
        if since_t is not None and len(rows):
            rows = rows[np.searchsorted(rows[:, 0], since_t) :]
        return TraceSnapshot({name: rows[:, i] for i, name in enumerate(COLUMNS)})
