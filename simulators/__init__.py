"""Simulated patient and devices for the hardware-in-the-loop rig.

Simulators speak the drivers' wire protocols over real transports (ptys, loopback TCP), as
real devices would; they import no driver and no core logic.
"""
