"""The hardware-in-the-loop rig: the simulated patient and every simulated device, started
together from the config, each on its real transport (loopback TCP, pty).

The rig shares one patient clock: patient time 0 is when ``start()`` is called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from motionctl.simulators.linac import LinacGatingSim
from motionctl.simulators.patient import patient_from_config
from motionctl.simulators.spirometer import SpirometerSim
from motionctl.simulators.surface_tracker import SurfaceTrackerSim

log = logging.getLogger("motionctl.sim.rig")


class Rig:
    def __init__(self, cfg: dict[str, Any], *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.patient = patient_from_config(cfg["patient"])
        surface = cfg["devices"]["surface"]
        self.surface = SurfaceTrackerSim(
            self.patient,
            host=surface["host"],
            port=surface["port"],
            rate_hz=cfg["rig"]["surface_rate_hz"],
            igtl_device_name=surface["igtl_device_name"],
            clock=clock,
        )
        self.linac = LinacGatingSim(watchdog_s=cfg["devices"]["beam"]["watchdog_s"], clock=clock)
        self.spirometer = SpirometerSim(
            self.patient, rate_hz=cfg["rig"]["spirometer_rate_hz"], clock=clock
        )
        self.t0: float | None = None

    def start(self) -> dict[str, str]:
        self.t0 = self._clock()
        self.surface.t0 = self.spirometer.t0 = self.t0
        try:
            self.surface.start()
            self.linac.start()
            self.spirometer.start()
        except Exception:
            self.stop()
            raise
        return self.addresses()

    def fault_targets(self) -> dict:
        """The simulators by their device names in the config, for fault injection."""
        return {"surface": self.surface, "spirometer": self.spirometer, "beam": self.linac}

    def addresses(self) -> dict[str, str]:
        host, port = self.surface.address
        return {
            "surface": f"{host}:{port}",
            "spirometer": self.spirometer.path,
            "beam": self.linac.path,
        }

    def stop(self) -> None:
        self.surface.stop()
        self.spirometer.stop()
        self.linac.stop()

    def __enter__(self) -> Rig:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
