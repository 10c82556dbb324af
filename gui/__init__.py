"""The PyQt6 + pyqtgraph operator console of motionctl.

- ``console``: the main window and the CLI's entry points ``run_console(controller, ...)``
  and ``display_available()``; hold the beam with Esc or Space;
- ``review``: a recorded session log in the same window with a scrub bar,
  ``run_review(log_path, ...)`` and ``open_review(log_path)``;
- ``remote``: the console in a process of its own, fed by a bridge thread in the
  controller's process (what ``run_console`` does by default);
- ``state``: what the console shows, as plain data, read from a live controller;
- ``widgets``: the panels; ``reasons``: hold reasons and interlocks in plain words.

The console only reads the controller's published state and sends operator commands
through ``controller.submit``; it never calls a driver. Nothing here is imported by the
core, and importing this package does not import Qt.
"""
