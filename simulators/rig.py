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
from motionctl.simulators.xray_imager import (
    DEFAULT_SEEDS,
    Seed,
    XrayImagerSim,
    gantry_geometry,
    room_stereo_geometry,
)

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
        self.xray: XrayImagerSim | None = None
        if cfg["devices"]["xray"]["enabled"]:
            imaging = cfg["imaging"]
            geometries = (
                room_stereo_geometry()
                if imaging["geometry"] == "stereo"
                else (gantry_geometry(imaging["gantry_deg"]),)
            )
            self.xray = XrayImagerSim(
                self.patient,
                geometries,
                seeds=_implanted_seeds(imaging),
                host=cfg["devices"]["xray"]["host"],
                port=cfg["devices"]["xray"]["port"],
                rate_hz=imaging["rate_hz"],
                clock=clock,
            )
        self.t0: float | None = None

    def start(self) -> dict[str, str]:
        self.t0 = self._clock()
        self.surface.t0 = self.spirometer.t0 = self.t0
        if self.xray is not None:
            self.xray.t0 = self.t0
        try:
            self.surface.start()
            self.linac.start()
            self.spirometer.start()
            if self.xray is not None:
                self.xray.start()
        except Exception:
            self.stop()
            raise
        return self.addresses()

    def fault_targets(self) -> dict:
        """The simulators by their device names in the config, for fault injection."""
        targets = {"surface": self.surface, "spirometer": self.spirometer, "beam": self.linac}
        return targets | ({"xray": self.xray} if self.xray is not None else {})

    def endpoints(self) -> dict:
        """Where a controller finds each simulated device: ``Controller(cfg,
        session_log=..., **rig.endpoints())``."""
        return {
            "surface_address": self.surface.address,
            "beam_url": self.linac.path,
            "spirometer_url": self.spirometer.path,
            "xray_address": self.xray.address if self.xray is not None else None,
        }

    def addresses(self) -> dict[str, str]:
        host, port = self.surface.address
        addresses = {
            "surface": f"{host}:{port}",
            "spirometer": self.spirometer.path,
            "beam": self.linac.path,
        }
        if self.xray is not None:
            xhost, xport = self.xray.address
            addresses["xray"] = f"{xhost}:{xport}"
        return addresses

    def stop(self) -> None:
        if self.xray is not None:
            self.xray.stop()
        self.surface.stop()
        self.spirometer.stop()
        self.linac.stop()

    def __enter__(self) -> Rig:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _implanted_seeds(imaging: dict[str, Any]) -> tuple[Seed, ...]:
    """The seeds the simulated patient carries: where the plan says, with the sizes it says;
    orientations (not in a plan) borrowed from the simulator's default constellation."""
    seeds = []
    n = len(imaging["seeds_mm"])
    diameters = _per_seed(imaging["seed_diameter_mm"], n)
    lengths = _per_seed(imaging["seed_length_mm"], n)
    for i, offset in enumerate(imaging["seeds_mm"]):
        template = DEFAULT_SEEDS[i % len(DEFAULT_SEEDS)]
        coiled = diameters[i] < 0.5  # thin markers are coiled wire, about half gold
        seeds.append(
            Seed(
                tuple(offset),
                template.axis,
                lengths[i],
                diameters[i],
                0.5 if coiled else 1.0,
                f"seed_{i + 1}",
            )
        )
    return tuple(seeds)


def _per_seed(values: list[float], n: int) -> list[float]:
    return list(values) * n if len(values) == 1 else list(values)
