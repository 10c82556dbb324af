"""``motionctl``: the command line. The only place, with the controller, that wires
simulators, drivers, core and session log together; the only place that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from motionctl import __version__
from motionctl.config import ConfigError, load_config
from motionctl.sessionlog import LogFormatError, SessionLogWriter, export_csv, summarize

COACH_INTERVAL_S = 0.05  # sim, breath-hold gating: how often the simulated operator looks

DESCRIPTION = """\
motionctl: respiratory motion management and gating for liver SBRT.

  sim          the simulated treatment session: rig + controller + console (the demo)
  rig          the simulated devices alone; prints their addresses
  run          the controller against the devices named in the config
  console      open a recorded session in the operator console (review)
  replay       replay a session log through the core and compare; what-if with --set
  log info     summarise a session log
  log export   write a session log's tables as CSV
  log verify   check a session log's hash chain
  qa           QA report (HTML) of session logs; --batch DIR for a folder, in parallel
  import       import an RPM .vxp, KIM marker log or 6-DoF trace as a session log
  evaluate     prediction and correlation accuracy on recorded traces
"""


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="site config (TOML) over the defaults")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one config key, e.g. --set gating.window_mm=4 (repeatable)",
    )


def _fault_arg(text: str):
    from motionctl.simulators.faults import parse_fault

    try:
        return parse_fault(text)
    except ValueError as exc:  # argparse would otherwise print only "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_fault_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        type=_fault_arg,
        metavar="DEVICE:KIND@START[+DURATION]",
        help="inject a fault into a simulated device, seconds from session start "
        "(repeatable), e.g. surface:freeze@10+2; KIND: disconnect, freeze, garbage, delay, "
        "reorder, nan, jump, clock-skew",
    )


def _add_console_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--headless",
        action="store_true",
        help="no operator console even if a display is available (a live status line instead)",
    )
    parser.add_argument(
        "--screenshot",
        metavar="PNG",
        help="save a PNG of the console at the end (works without a display: offscreen)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motionctl",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"motionctl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser(
        "sim",
        help="run a simulated treatment session (rig + controller)",
        description="Start the simulated patient and devices, connect the controller to them "
        "over their real transports, and record the session. A simulated operator enables "
        "the beam after session.operator_enable_after_s. Ctrl-C stops it.",
    )
    _add_config_options(sim)
    sim.add_argument("--seconds", type=float, help="stop by itself after N seconds")
    sim.add_argument(
        "--log",
        metavar="FILE",
        help="session log to write (default: new file in session.sessions_dir)",
    )
    sim.add_argument("--json", action="store_true", help="end with a JSON summary on stdout")
    _add_console_options(sim)
    _add_fault_option(sim)

    rig = sub.add_parser(
        "rig",
        help="start the simulated devices and print their addresses",
        description="Start the simulated patient, surface tracker (OpenIGTLink on TCP) and "
        "linac gating interface (serial pty), print their addresses, and run until stopped.",
    )
    _add_config_options(rig)
    rig.add_argument("--seconds", type=float, help="stop by itself after N seconds")
    _add_fault_option(rig)

    run = sub.add_parser(
        "run",
        help="run the controller against the devices in the config",
        description="Connect to the surface tracker at devices.surface.host:port and the "
        "gating interface at devices.beam.url, and gate. The beam stays held until an "
        "operator enables it (--enable-after, for rig commissioning without a console).",
    )
    _add_config_options(run)
    run.add_argument("--seconds", type=float, help="stop by itself after N seconds")
    run.add_argument("--log", metavar="FILE", help="session log to write")
    run.add_argument("--json", action="store_true", help="end with a JSON summary on stdout")
    _add_console_options(run)
    run.add_argument(
        "--enable-after",
        type=float,
        metavar="S",
        help="enable the beam S seconds after start (logged as operator 'cli')",
    )

    console = sub.add_parser(
        "console",
        help="open a recorded session in the operator console (review)",
        description="Open a session log in the console's widgets and scrub through it: the "
        "trace, beam-on intervals, holds with their reasons, interlocks.",
    )
    console.add_argument("--log", required=True, metavar="FILE", help="the session log")
    console.add_argument("--screenshot", metavar="PNG", help="save a PNG of the window")
    console.add_argument("--seconds", type=float, help="close by itself after N s (0: at once)")

    rp = sub.add_parser(
        "replay",
        help="replay a session log through the core and compare; what-if with --set",
        description="Verify a session log's hash chain, feed its recorded inputs through the "
        "same estimator, gate and interlocks, and compare every decision and estimate. With "
        "--set KEY=VALUE (repeatable) it answers what-if: the figures with other settings "
        "beside the recorded ones. Exit status: 0 reproduced (or what-if done), 1 divergence "
        "(or an unverified log replayed with --force), 2 refused or bad input.",
    )
    rp.add_argument("file", metavar="LOG")
    rp.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="what-if: override one config key, e.g. --set gating.window_mm=3",
    )
    rp.add_argument(
        "--force",
        action="store_true",
        help="replay a log that fails verification (reported as unverified)",
    )
    rp.add_argument("--json", action="store_true", help="print the result as JSON")

    logp = sub.add_parser(
        "log", help="inspect session logs", description="Inspect a recorded session log."
    )
    logsub = logp.add_subparsers(dest="log_command", metavar="ACTION")
    info = logsub.add_parser("info", help="duration, devices, samples, beam-on time, holds")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON")
    ver = logsub.add_parser("verify", help="check a session log's hash chain")
    ver.add_argument("file")
    ver.add_argument("--json", action="store_true", help="print JSON")
    export = logsub.add_parser("export", help="write every table as CSV")
    export.add_argument("file")
    export.add_argument("--csv", required=True, metavar="DIR", help="output folder")
    qa = sub.add_parser(
        "qa",
        help="QA report of session logs (one HTML file); --batch DIR for a whole folder",
        description="Verify, replay and review session logs: one self-contained HTML report "
        "(summary, trace with beam-on and window, duty cycle, residual motion, holds, "
        "latencies, X-ray checks, interlocks, faults, TG-142 gating timing). With --batch DIR "
        "every *.sqlite in DIR gets OUT/<name>.html and one OUT/summary.csv, in parallel on "
        "local cores or on a Dask cluster (--scheduler). Exit status: 0 all reviewed, "
        "verified and TG-142 not failed; 1 a TG-142 failure, a replay divergence or an "
        "unverified log (--force); 2 a log could not be reviewed, or bad input.",
    )
    qa.add_argument("logs", nargs="*", metavar="LOG", help="session logs for one report")
    qa.add_argument("--batch", metavar="DIR", help="review every *.sqlite log in DIR")
    qa.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the report file (LOG...), or the output folder (--batch)",
    )
    qa.add_argument(
        "--force",
        action="store_true",
        help="review logs that fail verification (every figure marked UNVERIFIED)",
    )
    qa.add_argument(
        "--beam-delay",
        type=float,
        metavar="S",
        help="the beam's delay after the recorded gating edge, for the TG-142 check "
        "(default: the log's tracking.horizon_s)",
    )
    qa.add_argument(
        "--workers", type=int, metavar="N", help="--batch: local worker processes (default: CPUs)"
    )
    qa.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="--batch: run on this existing Dask distributed scheduler instead",
    )
    qa.add_argument("--json", action="store_true", help="print the outcome as JSON")

    imp = sub.add_parser(
        "import",
        help="import an RPM .vxp, KIM marker log or 6-DoF trace as a session log",
        description="Write a new, hash-chained session log from a Varian RPM .vxp (1.5, 1.6), "
        "a KIM marker log (file or session folder), a 6-DoF or HexaMotion trace (ground "
        "truth) or a 2-column surrogate trace. Patient_ID is stored only as its SHA-256. "
        "The log has no decisions: `replay` and `qa` treat it as a what-if.",
    )
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--out", required=True, metavar="LOG", help="the session log to write")
    imp.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="config of the written log (e.g. the gating window a what-if uses); repeatable",
    )
    imp.add_argument("--json", action="store_true", help="print the import summary as JSON")

    evaluate = sub.add_parser(
        "evaluate",
        help="prediction and correlation accuracy on recorded traces",
        description="Evaluate motionctl's methods on your own recorded traces (RPM .vxp, "
        "2-column `t value`, 6-DoF `t x y z rx ry rz`, ExtMarker CSV, HexaMotion).",
    )
    evalsub = evaluate.add_subparsers(dest="evaluate_command", metavar="WHAT")
    pred = evalsub.add_parser(
        "prediction",
        help="latency-compensating prediction error per trace and predictor",
        description="Causal prediction of each trace's breathing signal (SI, or the axis of "
        "largest variance) HORIZON seconds ahead, scored after a 30 s warm-up: RMSE, "
        "relative RMSE (to no prediction), P95 error and jitter.",
    )
    pred.add_argument("traces", nargs="+", metavar="TRACE")
    pred.add_argument("--horizon", type=float, required=True, metavar="S")
    pred.add_argument("--predictor", default="all", metavar="NAME|all")
    pred.add_argument(
        "--inputs",
        choices=("all", "axis"),
        default="all",
        help="all (default): the trace's other position axes are extra predictor inputs "
        "(as the controller gives it the surface marker's other axes); axis: the breathing "
        "axis alone",
    )
    pred.add_argument("--json", action="store_true", help="one JSON object per trace")
    corr = evalsub.add_parser(
        "correlation",
        help="external-to-internal correlation model error",
        description="Fit the correlation model on the internal position sampled every "
        "IMAGING_PERIOD seconds (simulated X-rays) and estimate the internal 3-D position "
        "from the surrogate at every sample: 3-D RMS and P95 error after the first 60 s, "
        "and the correlation error at each image before it updates the model.",
    )
    corr.add_argument("--internal", required=True, metavar="TRACE", help="6-DoF internal trace")
    corr.add_argument("--surrogate", required=True, metavar="TRACE", help="1-D surrogate trace")
    corr.add_argument("--imaging-period", type=float, required=True, metavar="S")
    corr.add_argument("--json", action="store_true")
    det = evalsub.add_parser(
        "detection",
        help="fiducial detection on simulated kV images with ground truth",
        description="Render kV images of a breathing patient's seeds (two gold seeds and a "
        "coiled marker) and localise them: detection rate, false locks, 2-D error (px), "
        "3-D error (mm) and time per frame.",
    )
    det.add_argument("--geometry", choices=("stereo", "mono"), default="stereo")
    det.add_argument("--seed", type=int, default=1, help="random seed of the scenario")
    det.add_argument("--frames", type=int, default=100, metavar="M", help="frame pairs")
    det.add_argument("--noise", type=float, default=1.0, help="noise scale (1 = nominal)")
    det.add_argument("--json", action="store_true")
    kimp = evalsub.add_parser(
        "kim-log",
        help="a KIM marker log against the trace that drove the phantom",
        description="Read a KIM marker log (a MarkerLocations*.txt file or a session folder), "
        "align it in time with the robot trace, remove the static offset and report the 3-D "
        "error per axis as KIM's own QA does.",
    )
    kimp.add_argument("log", metavar="LOG")
    kimp.add_argument("--trace", required=True, metavar="TRACE")
    kimp.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command in ("sim", "run"):
            return _session(args)
        if args.command == "rig":
            return _rig(args)
        if args.command == "log" and args.log_command == "info":
            return _log_info(args)
        if args.command == "log" and args.log_command == "verify":
            return _log_verify(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "console":
            return _console_review(args)
        if args.command == "qa":
            return _qa(args, parser)
        if args.command == "import":
            return _import(args)
        if args.command == "log" and args.log_command == "export":
            for path in export_csv(args.file, args.csv):
                print(path)
            return 0
        if args.command == "evaluate" and args.evaluate_command is not None:
            try:
                return {
                    "prediction": _evaluate_prediction,
                    "correlation": _evaluate_correlation,
                    "detection": _evaluate_detection,
                    "kim-log": _evaluate_kim_log,
                }[args.evaluate_command](args)
            except (OSError, ValueError) as exc:  # unreadable traces, unknown predictor names
                print(f"motionctl: {exc}", file=sys.stderr)
                return 2
    except (ConfigError, LogFormatError, FileExistsError) as exc:
        print(f"motionctl: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2 if args.command else 0


def _stop_event_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _rig(args: argparse.Namespace) -> int:
    from motionctl.simulators.faults import FaultSchedule
    from motionctl.simulators.rig import Rig

    cfg = load_config(args.config, args.overrides)
    stop = _stop_event_on_signals()
    rig = Rig(cfg)
    schedule = FaultSchedule(args.fault, rig.fault_targets())  # refuses bad faults first
    with rig:
        schedule.t0 = rig.t0
        schedule.start()
        try:
            for name, address in rig.addresses().items():
                print(f"{name}: {address}", flush=True)
            print("rig running; Ctrl-C stops it", file=sys.stderr, flush=True)
            stop.wait(args.seconds)
        finally:
            schedule.stop()
    return 0


def _default_log_path(cfg: dict[str, Any]) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(cfg["session"]["sessions_dir"]) / f"session-{stamp}.sqlite"


def _session(args: argparse.Namespace) -> int:
    use_console = _want_console(args)
    from motionctl.controller import Controller

    cfg = load_config(args.config, args.overrides)
    rig = schedule = coach = None
    if args.command == "sim":
        from motionctl.simulators.faults import FaultSchedule
        from motionctl.simulators.rig import Rig

        _coached_breath_holds(cfg)
        rig = Rig(cfg)
        schedule = FaultSchedule(args.fault, rig.fault_targets())  # refuses bad faults first
        rig.start()
        schedule.t0 = rig.t0
        endpoints = rig.endpoints()
        enable_after = cfg["session"]["operator_enable_after_s"]
        operator = "simulated_operator"
        helpers = []
        if cfg["gating"]["mode"] == "breath_hold":
            helpers.append(_BreathHoldCoach(operator))
        if cfg["session"]["operator_ack_after_s"] > 0:
            helpers.append(_Acknowledger(operator, cfg["session"]["operator_ack_after_s"]))
        coach = _OperatorHelpers(*helpers) if helpers else None
    else:
        devices = cfg["devices"]
        surface, xray = devices["surface"], devices["xray"]
        endpoints = {
            "surface_address": (surface["host"], surface["port"]),
            "beam_url": devices["beam"]["url"],
            "spirometer_url": devices["spirometer"]["url"],
            "xray_address": (xray["host"], xray["port"]) if xray["enabled"] else None,
        }
        beam_url = endpoints["beam_url"]
        for name in ("surface", "xray"):
            if (name == "surface" or xray["enabled"]) and not cfg["devices"][name]["port"]:
                raise ConfigError(
                    "the config",
                    f"devices.{name}.port",
                    0,
                    f"the {name} device's TCP port for `run`",
                )
        if not beam_url:
            raise ConfigError(
                "the config",
                "devices.beam.url",
                beam_url,
                "the gating interface's serial device or URL for `run`",
            )
        enable_after = args.enable_after
        operator = "cli"
    log_path = Path(args.log) if args.log else _default_log_path(cfg)
    stop = _stop_event_on_signals()
    controller = writer = None
    try:
        writer = SessionLogWriter(
            log_path,
            cfg,
            t0=time.monotonic(),
            commit_interval_s=cfg["session"]["commit_interval_s"],
        )
        print(f"session log: {log_path}", file=sys.stderr, flush=True)
        controller = Controller(cfg, session_log=writer, **endpoints)
        controller.start()
        if schedule is not None:
            schedule.start()
        if use_console:
            from motionctl.gui.console import run_console

            status = run_console(
                controller,
                seconds=args.seconds,
                screenshot=args.screenshot,
                stop=stop,
                on_tick=_operator_on_tick(controller, enable_after, operator, coach),
            )
            if status != 0:
                print(
                    "motionctl: the console ended abnormally; the session was recorded",
                    file=sys.stderr,
                )
        else:
            _supervise(controller, stop, args.seconds, enable_after, operator, cfg, coach)
    finally:
        if schedule is not None:
            schedule.stop()
        if controller is not None:
            controller.stop()
        faults = []
        if rig is not None:
            rig.stop()
            if writer is not None:
                faults = _record_rig(rig, schedule, writer)
        if writer is not None:
            writer.close()
    summary = summarize(log_path)
    if rig is not None:
        summary["faults"] = faults
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_format_summary(summary), file=sys.stderr)
    return 0


def _want_console(args: argparse.Namespace) -> bool:
    """The console opens when a display is available, unless --headless; --screenshot also
    works without a display (Qt's offscreen platform paints into a buffer)."""
    import os

    if args.headless and not args.screenshot:
        return False
    from motionctl.gui.console import display_available

    if display_available():
        return True
    if args.screenshot:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return True
    return False


COACHED_HOLDS_PER_MIN = 2.0  # sim, breath-hold gating: a coached patient's holds


def _coached_breath_holds(cfg: dict[str, Any]) -> None:
    """sim in breath-hold mode with a model patient that never holds its breath: give it
    the holds a coached patient makes (``COACHED_HOLDS_PER_MIN`` of ``breath_hold_s``), and
    say so. Without them the session holds for ``no_breath_hold_reference`` throughout. The
    session log records the config as run."""
    patient = cfg["patient"]
    if (
        cfg["gating"]["mode"] == "breath_hold"
        and patient["model"] == "lujan"
        and patient["breath_hold_per_min"] == 0
    ):
        patient["breath_hold_per_min"] = COACHED_HOLDS_PER_MIN
        print(
            f"motionctl: breath-hold gating: the simulated patient holds its breath "
            f"{COACHED_HOLDS_PER_MIN:g} times a minute for {patient['breath_hold_s']:g} s "
            "(patient.breath_hold_per_min was 0)",
            file=sys.stderr,
        )


class _BreathHoldCoach:
    """sim, breath-hold gating: the simulated operator captures the breath-hold reference
    each time the simulated patient begins a hold (the spirometer's valve closes), as a
    therapist does once the patient has reached the level. Without it no sim session in
    breath-hold mode could ever enable the beam (no reference). A real operator does this
    by hand in the console (`run` has no coach)."""

    def __init__(self, operator: str) -> None:
        self._operator = operator
        self._closed = False

    def tick(self, controller) -> None:
        from motionctl.session import OperatorCommand

        closed = controller.status.valve_closed
        if closed and not self._closed:
            controller.submit(OperatorCommand("capture_reference", who=self._operator))
        self._closed = closed


class _Acknowledger:
    """sim: the simulated operator acknowledges each interlock awaiting acknowledgement
    ``after_s`` after it began to wait (``session.operator_ack_after_s``; 0, the default:
    never), as a therapist does once the cause has been dealt with; refused, it tries again
    ``after_s`` later. Logged as any acknowledgement, by ``simulated_operator``. Lets a
    commissioning session go on after a fault whose interlock waits for a person."""

    def __init__(self, operator: str, after_s: float, clock: Callable[[], float] = time.monotonic):
        self._operator, self._after_s, self._clock = operator, after_s, clock
        self._since: dict[str, float] = {}

    def tick(self, controller) -> None:
        from motionctl.session import OperatorCommand

        now = self._clock()
        self._since = {k: self._since.get(k, now) for k in controller.status.awaiting_ack}
        for key, since in self._since.items():
            if now - since >= self._after_s:
                controller.submit(OperatorCommand("acknowledge", key, who=self._operator))
                self._since[key] = now


class _OperatorHelpers:
    """The simulated operator's routine actions, each looked at every ``COACH_INTERVAL_S``."""

    def __init__(self, *helpers) -> None:
        self._helpers = helpers

    def tick(self, controller) -> None:
        for helper in self._helpers:
            helper.tick(controller)


def _operator_on_tick(
    controller, enable_after: float | None, operator: str, coach: _OperatorHelpers | None = None
):
    """The simulated (sim) or --enable-after (run) operator, in the console's loop."""
    enabled = False

    def on_tick(elapsed_s: float) -> None:
        nonlocal enabled
        if not enabled and enable_after is not None and elapsed_s >= enable_after:
            controller.set_operator_enable(True, who=operator)
            enabled = True
        if coach is not None:
            coach.tick(controller)

    return on_tick


def _console_review(args: argparse.Namespace) -> int:
    import os

    from motionctl.gui.console import display_available

    if not display_available():
        if not args.screenshot:
            print(
                "motionctl: no display for the console: set DISPLAY or WAYLAND_DISPLAY, or "
                "give --screenshot to render it offscreen",
                file=sys.stderr,
            )
            return 2
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from motionctl.gui.review import run_review

    seconds = args.seconds if args.seconds is not None else (0 if args.screenshot else None)
    return run_review(args.log, args.screenshot, seconds=seconds)


def _record_rig(rig, schedule, writer: SessionLogWriter) -> list[dict]:
    """Write the simulated linac's own record of beam edges (a separate channel) and the
    injected faults into the log; return the commissioning figures of each fault."""
    from motionctl.qa import fault_outcome

    edges = [(t - writer.t0, on) for t, on in rig.linac.edges()]
    for t, beam_on in edges:
        writer.add("beam_edges", (t, int(beam_on), "linac_sim"))
    shift = rig.t0 - writer.t0  # schedule times are from the rig's start
    end = max([t for t, _ in edges] + [time.monotonic() - writer.t0])
    faults = []
    for fault in schedule.applied:
        start_s = fault.start_s + shift
        end_s = None if fault.end_s is None else fault.end_s + shift
        entry = {
            "device": fault.device,
            "kind": fault.kind,
            "start_s": round(start_s, 4),
            "end_s": None if end_s is None else round(end_s, 4),
        }
        entry |= fault_outcome(start_s, end_s, edges, end)
        writer.add("events", (start_s, "rig", "fault", json.dumps(entry)))
        faults.append(entry)
    return faults


def _supervise(
    controller,
    stop: threading.Event,
    seconds: float | None,
    enable_after: float | None,
    operator: str,
    cfg: dict[str, Any],
    coach: _OperatorHelpers | None = None,
) -> None:
    """Main thread: the (simulated) operator, the live status line and the session clock."""
    interval = cfg["session"]["status_interval_s"]
    start = time.monotonic()
    enabled = False
    tty = sys.stderr.isatty()
    next_line = start
    while not stop.is_set():
        elapsed = time.monotonic() - start
        if seconds is not None and elapsed >= seconds:
            break
        if not enabled and enable_after is not None and elapsed >= enable_after:
            controller.set_operator_enable(True, who=operator)
            enabled = True
        if coach is not None:
            coach.tick(controller)
        if start + elapsed >= next_line:
            next_line = max(next_line + interval, start + elapsed)
            line = _status_line(controller, elapsed)
            print(
                ("\r" + line + "\033[K") if tty else line,
                end="" if tty else "\n",
                file=sys.stderr,
                flush=True,
            )
        wait = max(0.0, next_line - (start + elapsed))
        if coach is not None:
            wait = min(wait, COACH_INTERVAL_S)  # notice a hold or an interlock promptly
        if seconds is not None:
            wait = min(wait, max(0.0, seconds - elapsed))
        if not enabled and enable_after is not None:
            wait = min(wait, max(0.0, enable_after - elapsed))
        stop.wait(wait)
    if tty:
        print(file=sys.stderr)


def _status_line(controller, elapsed: float) -> str:
    st = controller.status
    decision = st.decision
    beam = "BEAM ENABLED" if decision is not None and decision.beam_enabled else "BEAM HOLD"
    why = "" if decision is None or decision.beam_enabled else f" ({decision.reason_text})"
    if "prediction_learning" in why:
        wait = controller.core.estimator.prediction_ready_in_s
        if math.isfinite(wait) and wait > 0:
            why = why[:-1] + f", ready in about {math.ceil(wait)} s)"
    device = controller.surrogate_device
    age = st.last_rx.get(device)
    now = controller.session_t(time.monotonic())  # the status holds session times
    age_text = "--" if age is None else f"{(now - age) * 1e3:4.0f} ms"
    return (
        f"t={elapsed:6.1f} s  {beam}{why}  {_gated_quantity(controller)}  "
        f"{device}: {st.samples.get(device, 0)} samples, age {age_text}, "
        f"malformed {st.malformed.get(device, 0)}"
    )


def _gated_quantity(controller) -> str:
    """What the gate compares, against what, in the session's gating mode: the target and
    the amplitude window, the breathing phase and the phase window, or the breath-hold
    level and its reference with the tolerance."""
    from motionctl.types import AXES

    est = controller.status.estimate
    valid = est is not None and est.valid
    settings = controller.gate.settings
    gate = controller.gate
    axis = settings.axis
    target = f"{est.predicted_mm[AXES.index(axis)]:+6.2f} mm" if valid else "--"
    if settings.mode == "phase":
        phase = f"{est.phase:.2f}" if valid and math.isfinite(est.phase) else "--"
        start, end = settings.phase_window
        return f"{axis}={target} phase={phase} phase window=[{start:.2f}, {end:.2f})"
    if settings.mode == "breath_hold":
        if settings.breath_hold_signal == "volume":
            level, unit, tol = controller.status.volume_l, "l", settings.breath_hold_tolerance_l
            level_text = f"volume={level:.2f} l" if math.isfinite(level) else "volume=--"
        else:
            unit, tol = "mm", settings.breath_hold_tolerance_mm
            level_text = f"{axis}={target}"
        ref = gate.reference
        ref_text = "--" if ref is None else f"{ref:.2f} {unit}"
        return f"{level_text} reference={ref_text} +/-{tol:g} {unit}"
    return f"{axis}={target} window=[{gate.lower_mm:+.1f}, {gate.upper_mm:+.1f}]"


def _format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"log:        {summary['log']}",
        f"started:    {summary['started_utc']}",
        f"duration:   {summary['duration_s']:.1f} s",
        f"beam on:    {summary['beam_on_s']:.1f} s",
        "samples:    " + ", ".join(f"{k} {v}" for k, v in summary["samples"].items()),
        "devices:    "
        + ", ".join(f"{k} ({v['kind']} at {v['address']})" for k, v in summary["devices"].items()),
        "holds by reason:",
    ]
    for reason, entry in summary["holds_by_reason"].items():
        lines.append(f"  {reason:32s} {entry['count']:5d} x  {entry['seconds']:8.1f} s")
    return "\n".join(lines)


def _evaluate_prediction(args: argparse.Namespace) -> int:
    from motionctl.prediction import DEFAULT_PREDICTOR, PREDICTORS, evaluate_predictor
    from motionctl.traces import breathing_inputs, read_trace

    names = list(PREDICTORS) if args.predictor == "all" else [args.predictor]
    names = [DEFAULT_PREDICTOR if name == "default" else name for name in names]
    for name in names:
        if name not in PREDICTORS:
            known = ", ".join(PREDICTORS)
            raise ValueError(f"unknown predictor {name!r}; known: {known}, default, all")
    results = []
    for path in args.traces:
        t, x, aux = breathing_inputs(read_trace(path))
        if args.inputs == "axis":
            aux = aux[:, :0]
        for name in names:
            result = evaluate_predictor(t, x, args.horizon, name, aux=aux if aux.size else None)
            results.append(
                {"trace": path, "predictor": name, "horizon_s": args.horizon}
                | {"aux_inputs": aux.shape[1]}
                | result
            )
    if args.json:
        for result in results:
            print(json.dumps(result))
        return 0
    print(
        f"{'trace':40s} {'predictor':10s} {'RMSE mm':>8s} {'rel RMSE':>8s} "
        f"{'P95 mm':>7s} {'jitter':>7s}"
    )
    for r in results:
        print(
            f"{Path(r['trace']).name[:40]:40s} {r['predictor']:10s} {r['rmse_mm']:8.3f} "
            f"{r['relative_rmse']:8.3f} {r['p95_mm']:7.3f} {r['jitter_mm']:7.3f}"
        )
    return 0


def _evaluate_correlation(args: argparse.Namespace) -> int:
    from motionctl.correlation import evaluate_correlation
    from motionctl.traces import read_trace

    internal = read_trace(args.internal)
    surrogate = read_trace(args.surrogate)
    if internal.values.shape[1] < 3:
        raise ValueError(f"{args.internal}: the internal trace needs x y z columns (6-DoF text)")
    result = evaluate_correlation(
        internal.t_s,
        internal.values[:, :3],
        surrogate.t_s,
        surrogate.values[:, 0],
        args.imaging_period,
    )
    result = {
        "internal": args.internal,
        "surrogate": args.surrogate,
        "imaging_period_s": args.imaging_period,
    } | result
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {_plain(value)}")
    return 0


def _evaluate_detection(args: argparse.Namespace) -> int:
    from motionctl.detection_eval import SEED_SETS, run_scenario, summarise

    if args.frames < 1:
        raise ValueError(f"--frames {args.frames}: expected at least 1 frame pair")
    s = summarise(
        [run_scenario("mixed", SEED_SETS["mixed"], args.noise, args.frames, seed=args.seed)]
    )
    if args.geometry == "stereo":
        result = {
            "geometry": "stereo",
            "frames": s["frame_pairs"],
            "detection_rate": s["detection_rate_stereo"],
            "false_lock_rate": s["false_lock_rate"],
            "error_2d_px": s["err2d_px"],
            "rms_3d_mm": s["stereo_rms_3d_mm"],
            "time_per_frame_ms": s["time_per_pair_prior_ms"],
            "rejects": s["reject_reasons"],
        }
    else:
        result = {"geometry": "mono", "frames": s["frame_pairs"]} | s["mono"]
    print(
        json.dumps(result)
        if args.json
        else "\n".join(f"{k:22s} {_plain(v)}" for k, v in result.items())
    )
    return 0


def _evaluate_kim_log(args: argparse.Namespace) -> int:
    from motionctl import kim
    from motionctl.traces import read_trace

    path = Path(args.log)
    log = kim.read_kim_session(path) if path.is_dir() else kim.read_kim_log(path)
    trace = read_trace(args.trace)
    comparison = kim.compare_with_trace(log.t_s, log.centroid_mm, trace.t_s, trace.values[:, :3])
    result = {"log": args.log, "trace": args.trace} | comparison.as_dict()
    print(
        json.dumps(result)
        if args.json
        else "\n".join(f"{k:28s} {_plain(v)}" for k, v in result.items())
    )
    return 0


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return "  ".join(f"{k} {_plain(v)}" for k, v in value.items())
    return str(value)


def _replay(args: argparse.Namespace) -> int:
    from motionctl.replay import format_result, replay

    result = replay(args.file, args.overrides, force=args.force)
    print(result.to_json() if args.json else format_result(result))
    return result.exit_status


def _qa(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if bool(args.batch) == bool(args.logs):
        parser.error("qa: give session logs (LOG...) or --batch DIR, not both or neither")
    if not args.batch and (args.workers is not None or args.scheduler):
        parser.error("qa: --workers and --scheduler go with --batch")
    if args.batch:
        from motionctl.batch import run_batch

        try:
            batch = run_batch(
                args.batch,
                args.out,
                workers=args.workers,
                scheduler=args.scheduler,
                force=args.force,
                beam_delay_s=args.beam_delay,
            )
        except (OSError, TimeoutError, ValueError) as exc:  # no folder, no scheduler
            print(f"motionctl: qa --batch: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(
                json.dumps(
                    {
                        "summary": str(batch.summary_csv),
                        "rows": batch.rows,
                        "skipped": batch.skipped,
                    },
                    indent=2,
                )
            )
        else:
            for row in batch.rows:
                print(
                    f"{row['file']}: {row['status']}, TG-142 {row['tg142']}"
                    + (f" ({row['error']})" if row["error"] else "")
                )
            if batch.skipped:
                print(
                    f"not session logs (no SQLite header), not reviewed: {len(batch.skipped)} "
                    f"files: {', '.join(batch.skipped[:10])}"
                    + (" ..." if len(batch.skipped) > 10 else "")
                )
            print(
                f"{len(batch.rows)} logs, {len(batch.failed)} failed, {batch.wall_s:.1f} s "
                f"({batch.mode}, {batch.workers} workers); summary: {batch.summary_csv}"
            )
        return batch.exit_status
    from motionctl.report import write_report

    report = write_report(args.logs, args.out, force=args.force, beam_delay_s=args.beam_delay)
    if args.json:
        print(
            json.dumps(
                {"report": str(report.out), "sessions": [s.row() for s in report.sessions]},
                indent=2,
            )
        )
    else:
        for s in report.sessions:
            print(
                f"{s.name}: {s.status}, {'verified' if s.verified else 'NOT VERIFIED'}, "
                f"TG-142 {s.tg142}" + (f" ({s.error})" if s.error else "")
            )
        print(f"report: {report.out}")
    return report.exit_status


def _import(args: argparse.Namespace) -> int:
    from motionctl.importers import ImportRefused, import_file

    try:
        summary = import_file(args.file, args.out, overrides=args.overrides)
    except ImportRefused as exc:
        print(f"motionctl: import refused: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"{summary.source} ({summary.format}) -> {summary.log}: {summary.duration_s:.1f} s, "
            f"{summary.samples} samples ({summary.invalid_samples} invalid in "
            f"{summary.invalid_gaps} gaps), {summary.fiducials} fiducial frames, "
            f"{summary.beam_edges} beam edges"
            + (f" from {summary.ttl_source}" if summary.ttl_source else "")
        )
        for note in summary.notes:
            print(f"note: {note}")
    return 0


def _log_verify(args: argparse.Namespace) -> int:
    from motionctl.integrity import verify

    result = verify(args.file)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        closed = "closed" if result.closed else "not closed (killed, or still being written)"
        print(
            f"{args.file}: {'verified' if result.ok else 'FAILED'}: {result.batches} batches, "
            f"{result.rows} rows, {closed}"
        )
        if result.digest:
            print(f"last digest: {result.digest}")
        if not result.ok:
            print(f"reason: {result.reason}")
    return 0 if result.ok else 1


def _log_info(args: argparse.Namespace) -> int:
    summary = summarize(args.file)
    print(json.dumps(summary, indent=2) if args.json else _format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
