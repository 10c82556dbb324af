"""Benchmark: the operator console's display rate and CPU, and its effect on the controller.

Each run is a fresh process holding what ``motionctl sim`` holds -- the simulated rig
(surface tracker at 30 Hz on loopback OpenIGTLink, spirometer and linac on ptys), the
session log writer and the controller -- with the simulated operator enabling the beam
after 1 s. Kinds of run, alternated (headless, console, ...) so that drift of the shared
machine falls on all alike:

- *headless*: no console (the baseline);
- *console*: ``run_console(controller)`` as the CLI calls it: the window in a process of
  its own, fed by the bridge thread (``gui/remote.py``);
- *inprocess* (``--inprocess``): ``run_console(controller, isolate=False)``, the window on
  the main thread of the controller's process, for comparison;
- *loaded* (``--control``): headless, beside a process that only burns CPU the way the
  console does (4 ms every 33 ms, about 12 % of one core, at nice +10). A control: on a
  machine with few cores, how much of the console's effect on the controller's tail
  comes from sharing the cores at all, whatever the program.

The console is really painted (Qt's offscreen platform paints into an off-screen backing
store, as a screen's would be). What is measured, after a warm-up (start-up, first
breaths excluded):

- display rate: paint events of the trace's view per second (what the eye sees) and
  refreshes (display-timer ticks that drew a new state), counted by the console itself;
- console CPU: the CPU time of the GUI thread (``time.thread_time`` on that thread: the
  Python refresh and Qt's painting both run there) as % of one core, and of the whole
  console process; plus the extra CPU of the controller's process against the headless
  runs (the bridge's cost: one LiveTrace copy and one pickled state per frame);
- controller time per surrogate sample from each run's session log
  (``decisions.latency_s``: receipt stamp -> beam command issued), percentiles pooled
  over the runs of each kind, and each kind's ratio to headless.

Usage: python bench/bench_console.py [--seconds 30] [--runs 3] [--span 60] [--inprocess]
       [--json]     (QT_QPA_PLATFORM defaults to offscreen)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def percentiles_ms(values) -> dict[str, float]:
    a = np.asarray(list(values), dtype=float) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
    }


# -- one run (child process) ----------------------------------------------------------------
def run_once(mode: str, seconds: float, warmup: float, span_s: float, log: Path) -> dict:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from motionctl.config import load_config
    from motionctl.controller import Controller
    from motionctl.sessionlog import SessionLogWriter
    from motionctl.simulators.rig import Rig

    cfg = load_config(None, ["devices.surface.port=0", "devices.xray.enabled=false"])
    rig = Rig(cfg)
    rig.start()
    writer = SessionLogWriter(log, cfg, t0=time.monotonic())
    controller = Controller(cfg, session_log=writer, **rig.endpoints())
    controller.start()
    marks: dict[str, dict] = {}

    def mark(name: str) -> None:
        marks[name] = {
            "wall": time.monotonic(),
            "session_t": controller.session_t(time.monotonic()),
            "process_cpu": time.process_time(),  # this process: controller, rig, log (+GUI)
        }

    figures: dict = {}
    load = None
    if mode == "loaded":
        load = subprocess.Popen([sys.executable, "-c", CPU_LOAD])
    try:
        if mode in ("headless", "loaded"):
            start = time.monotonic()
            enabled = False
            while (elapsed := time.monotonic() - start) < seconds:
                if not enabled and elapsed >= 1.0:
                    controller.set_operator_enable(True, who="bench")
                    enabled = True
                if "start" not in marks and elapsed >= warmup:
                    mark("start")
                threading.Event().wait(0.05)  # what _supervise does, minus the status line
            mark("end")
        else:
            from motionctl.gui.console import run_console

            def on_tick(elapsed: float) -> None:  # the CLI's simulated operator, as in sim
                if elapsed >= 1.0 and not controller.status.operator_enabled:
                    controller.set_operator_enable(True, who="bench")
                if "start" not in marks and elapsed >= warmup:
                    mark("start")
                mark("end")  # the last tick before the console closes

            run_console(
                controller,
                seconds=seconds,
                on_tick=on_tick,
                span_s=span_s,
                isolate=mode == "console",
                report=figures.update,
            )
    finally:
        controller.stop()
        rig.stop()
        writer.close()
        if load is not None:
            load.kill()
            load.wait()
    a, b = marks["start"], marks["end"]
    wall = b["wall"] - a["wall"]
    db = sqlite3.connect(log)
    latency = [
        r[0]
        for r in db.execute(
            "SELECT latency_s FROM decisions WHERE latency_s >= 0 AND t BETWEEN ? AND ?",
            (a["session_t"], b["session_t"]),
        )
    ]
    db.close()
    return {
        "mode": mode,
        "wall_s": wall,
        "process_cpu_pct": 100 * (b["process_cpu"] - a["process_cpu"]) / wall,
        "console": figures,  # measured by the console in its own process (or thread)
        "latency_s": latency,
    }


# -- the comparison (parent process) ---------------------------------------------------------
MODES = ("headless", "console", "inprocess", "loaded")

# The control load: bursts like a console's frames, at the console process's priority.
CPU_LOAD = """
import os, time
os.nice(10)
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.004:
        pass
    time.sleep(0.029)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    parser.add_argument("--warmup", type=float, default=5.0, help="not measured, s")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind")
    parser.add_argument("--span", type=float, default=60.0, help="trace span, s (30-120)")
    parser.add_argument(
        "--inprocess", action="store_true", help="also run the console on a thread (isolate=False)"
    )
    parser.add_argument(
        "--control", action="store_true", help="also run headless beside a CPU load like it"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_once(
                args.child, args.seconds, args.warmup, args.span, Path(tmp) / "bench.sqlite"
            )
        Path(args.out).write_text(json.dumps(result))
        return 0

    modes = [m for m in MODES if m in ("headless", "console")]
    modes += ["inprocess"] if args.inprocess else []
    modes += ["loaded"] if args.control else []
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for mode in modes:  # alternating, so that machine drift falls on all alike
                out = Path(tmp) / f"{mode}-{i}.json"
                command = [sys.executable, __file__, "--child", mode, "--out", str(out)]
                command += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
                command += ["--span", str(args.span)]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    return done.returncode
                runs[mode].append(json.loads(out.read_text()))

    def median(values) -> float:
        return round(float(np.median(list(values))), 2)

    headless_cpu = float(np.mean([r["process_cpu_pct"] for r in runs["headless"]]))
    latency = {
        mode: percentiles_ms(v for r in runs[mode] for v in r["latency_s"]) for mode in modes
    }
    result: dict = {
        "runs_each": args.runs,
        "seconds_measured_each": round(args.seconds - args.warmup, 1),
        "span_s": args.span,
        "controller_process_cpu_pct_headless": median(
            r["process_cpu_pct"] for r in runs["headless"]
        ),
        "controller_time_per_sample_ms": latency,
    }
    for mode in modes[1:]:
        ratio = {
            k: round(latency[mode][k] / latency["headless"][k], 3)
            for k in ("p50", "p90", "p99")
            if latency["headless"].get(k)
        }
        cpu = median(r["process_cpu_pct"] for r in runs[mode])
        result[mode] = {
            "controller_process_cpu_pct": cpu,
            "controller_process_extra_cpu_pct": round(cpu - headless_cpu, 2),
            "latency_ratio_to_headless": ratio,
        }
        if mode != "loaded":  # the console's own figures
            figures = [r["console"] for r in runs[mode]]
            result[mode] |= {
                "paints_per_s": median(f["paints_per_s"] for f in figures),
                "refreshes_per_s": median(f["refreshes_per_s"] for f in figures),
                "gui_thread_cpu_pct": median(f["gui_thread_cpu_pct"] for f in figures),
                "gui_process_cpu_pct": median(f["process_cpu_pct"] for f in figures),
            }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.runs} runs of each kind, {result['seconds_measured_each']} s measured each, "
        f"trace span {args.span:.0f} s; controller process CPU headless "
        f"{result['controller_process_cpu_pct_headless']:.1f} % of one core"
    )
    for mode in (m for m in modes if m in ("console", "inprocess")):
        r = result[mode]
        where = "own process" if mode == "console" else "thread of the controller's process"
        print(f"console ({where}):")
        print(
            f"  paints of the trace / refreshes  {r['paints_per_s']:6.1f} / "
            f"{r['refreshes_per_s']:.1f} per s"
        )
        print(f"  GUI thread CPU                   {r['gui_thread_cpu_pct']:6.1f} % of one core")
        if mode == "console":
            print(f"  console process CPU              {r['gui_process_cpu_pct']:6.1f} %")
        print(
            f"  controller process CPU, extra    {r['controller_process_extra_cpu_pct']:6.1f} %"
            f"  (vs headless)"
        )
    for mode in modes:
        p = latency[mode]
        print(
            f"controller time/sample {mode:9s} n={p['n']:6d}  p50 {p.get('p50', 0):6.3f}  "
            f"p90 {p.get('p90', 0):6.3f}  p99 {p.get('p99', 0):6.3f}  max {p.get('max', 0):6.3f} ms"
        )
    for mode in modes[1:]:
        ratio = result[mode]["latency_ratio_to_headless"]
        print(f"ratio {mode:9s}/headless  " + "  ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
