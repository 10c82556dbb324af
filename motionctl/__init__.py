"""motionctl: respiratory motion management and image guidance for liver SBRT.

The core (this package's own modules) is pure and clock-injected: tracking and gating take
time as an argument and touch no I/O, threads or Qt, so the live console, the simulated rig
and log replay run identical code.
"""

__version__ = "0.3.2"
