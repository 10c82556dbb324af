"""Benchmark: log replay speed on a synthetic one-hour session, and where the time goes.

1. Synthesise a session log without sockets: the simulated patient
   (``motionctl.simulators.patient``) gives the surface marker at 30 Hz; a ``SessionCore``
   is fed exactly as the live controller feeds it (sample -> ``on_surrogate``, then
   ``set_beam_fault`` + ``decide(new_sample=True)``; deadline and heartbeat wake-ups ->
   ``decide(new_sample=False)``, recorded only when the decision changed; operator commands
   -> ``on_command`` + a decide) and writes through ``SessionLogWriter`` (so the log has its
   hash chain). Decisions are recorded as the controller records them (latency for sample
   decisions, NULL otherwise, a forced ``session_stopped`` at the end). The operator enables
   the beam at 2 s, changes the window and holds/releases now and then; the tracker drops
   out for 0.3 s every 5 minutes (stale data).
2. Time ``motionctl.replay.replay(log)`` on one core (best of ``--repeat``): wall time,
   speed (session duration / wall time), decisions and estimates reproduced.
3. The floor: the same inputs fed straight into a fresh core with nothing else (no log
   reading, verification or comparison): what the core itself costs.
4. ``--profile``: cProfile of one replay, grouped by module and the top functions.

X-ray fiducial positions arrive at 5 Hz (the issue's imaging rate): the simulated target at
mid-exposure plus 0.3 mm of localisation noise, received 0.1 s later, each one a correlation
model point. Not in the synthetic log: the spirometer, beam ACKs.

Usage: python bench/bench_replay.py [--minutes 60] [--repeat 3] [--profile] [--json]
       [--keep LOG] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from motionctl.config import load_config
from motionctl.replay import replay, stale_timeouts
from motionctl.session import OperatorCommand, SessionCore
from motionctl.sessionlog import SessionLogWriter
from motionctl.simulators.patient import patient_from_config
from motionctl.types import DeviceEvent, FiducialMeasurement, SurrogateSample

RATE_HZ = 30.0
IMAGING_HZ = 5.0
IMAGE_LATENCY_S = 0.1  # mid-exposure -> localised position received
IMAGE_NOISE_MM = 0.3
HEARTBEAT_S = 0.05
DECIDE_LATENCY_S = 0.00015  # receipt -> decision, as the rig measures it (~0.15 ms)
DROPOUT_EVERY_S = 300.0
DROPOUT_S = 0.3


# A steady patient: no baseline drift over the hour (with the default 0.5 mm/min the target
# leaves a fixed window within minutes; a real session re-images and re-centres).
PATIENT = [
    "patient.drift_mm_per_min=[0.0, 0.0, 0.0]",
    "patient.surrogate_drift_mm_per_min=[0.0, 0.0, 0.0]",
]


def synthesise(path: Path, minutes: float, overrides: list[str]) -> dict:
    cfg = load_config(None, [*PATIENT, *overrides])
    patient = patient_from_config(cfg["patient"])
    device = cfg["tracking"]["surrogate_device"]
    writer = SessionLogWriter(path, cfg, t0=0.0, commit_interval_s=0.05)
    writer.device(device, cfg["devices"][device]["kind"], "synthetic")
    writer.device("beam", cfg["devices"]["beam"]["kind"], "synthetic")
    core = SessionCore(cfg, writer.add, stale_timeout_s=stale_timeouts(cfg))
    counts = {"samples": 0, "decisions": 0, "images": 0}

    def decide(t: float, latency: float | None) -> None:
        core.set_beam_fault(t, None)
        decision = core.decide(t, new_sample=latency is not None)
        if decision is not None:
            writer.add(
                "decisions", (decision.t, int(decision.beam_enabled), decision.reason_text, latency)
            )
            counts["decisions"] += 1

    # Operator actions: (time, command).
    duration = minutes * 60.0
    commands = [(2.0, OperatorCommand("enable", who="bench"))]
    for k, start in enumerate(range(600, int(duration), 600)):
        width = (4.0, 5.0, 6.0)[k % 3]
        commands.append((start + 0.123, OperatorCommand("window", (-2.0, width), who="bench")))
        commands.append((start + 300.0, OperatorCommand("hold", who="bench")))
        commands.append((start + 310.0, OperatorCommand("release", who="bench")))
    commands.sort(key=lambda c: c[0])

    core.on_device_event(DeviceEvent(device, 0.0, "connected", "synthetic"))
    writer.device("xray", cfg["devices"]["xray"]["kind"], "synthetic")
    noise = np.random.default_rng(7)
    next_image = 1.0 / IMAGING_HZ  # mid-exposure time of the next image
    frame = 0

    def deliver_image() -> float:
        """The next localised image (controller: on_fiducial, then a decision without a new
        sample); returns when it was received."""
        nonlocal next_image, frame
        t_acq, t_rx = next_image, next_image + IMAGE_LATENCY_S
        target = patient.state(t_acq).target_mm
        position = tuple(float(v) for v in np.add(target, noise.normal(0, IMAGE_NOISE_MM, 3)))
        core.on_fiducial(
            FiducialMeasurement(
                "xray", frame, t_acq, t_rx, "stereo", True, "",
                position, (0.0, 0.0, 0.0), 3, 0.2, IMAGE_NOISE_MM,
            )
        )  # fmt: skip
        decide(t_rx, None)
        frame += 1
        counts["images"] += 1
        next_image = (frame + 1) / IMAGING_HZ
        return t_rx

    decide(0.0, None)
    next_heartbeat = 0.0
    ci = 0
    k = 0
    n_samples = int(duration * RATE_HZ)
    t_last_decide = 0.0
    while k < n_samples:
        t_patient = k / RATE_HZ
        # receipt jitter 0-2 ms, deterministic
        t_rx = t_patient + 0.002 * ((k * 2654435761) % 1000) / 1000.0
        in_dropout = (t_patient % DROPOUT_EVERY_S) > DROPOUT_EVERY_S - DROPOUT_S
        # Wake-ups before this sample: heartbeats and stale deadlines (the controller's loop).
        while True:
            wake = min(next_heartbeat, core.next_deadline(t_last_decide))
            image_rx = next_image + IMAGE_LATENCY_S
            if image_rx < min(wake, t_rx):
                t_last_decide = deliver_image()
                continue
            if wake >= t_rx:
                break
            if ci < len(commands) and commands[ci][0] <= wake:
                t_cmd, command = commands[ci]
                ci += 1
                core.on_command(t_cmd, command)
                decide(t_cmd + 0.00002, None)
                t_last_decide = t_cmd + 0.00002
                continue
            decide(wake, None)
            t_last_decide = wake
            if wake == next_heartbeat:
                next_heartbeat += HEARTBEAT_S
        if ci < len(commands) and commands[ci][0] <= t_rx:
            t_cmd, command = commands[ci]
            ci += 1
            core.on_command(t_cmd, command)
            decide(t_cmd + 0.00002, None)
            t_last_decide = t_cmd + 0.00002
        k += 1
        if in_dropout:
            continue
        sample = SurrogateSample(
            device, k, 1.7e9 + t_patient, t_rx, patient.state(t_patient).surrogate_mm
        )
        core.on_surrogate(sample)
        t_dec = t_rx + DECIDE_LATENCY_S
        decide(t_dec, DECIDE_LATENCY_S)
        t_last_decide = t_dec
        counts["samples"] += 1
    # The controller's own final hold.
    writer.add("decisions", (t_last_decide + 0.001, 0, "session_stopped", None))
    writer.close()
    counts["bytes"] = path.stat().st_size
    return counts


def core_floor(path: Path) -> float:
    """Seconds to feed the log's samples and decisions to a bare core: the lower bound."""
    import sqlite3

    db = sqlite3.connect(path)
    cfg = json.loads(db.execute("SELECT json FROM config").fetchone()[0])
    samples = db.execute("SELECT device, seq, t, t_device, lr_mm, si_mm, ap_mm, n FROM samples")
    decisions = db.execute("SELECT t, latency_s, n FROM decisions")
    rows = sorted(
        [(r[-1], 0, r) for r in samples.fetchall()] + [(r[-1], 1, r) for r in decisions.fetchall()]
    )
    db.close()
    items = [
        (0, SurrogateSample(r[0], r[1], r[3], r[2], (r[4], r[5], r[6]))) if kind == 0 else (1, r)
        for _, kind, r in rows
    ]
    core = SessionCore(cfg, lambda table, row: None, stale_timeout_s=stale_timeouts(cfg))
    core.on_command(2.0, OperatorCommand("enable"))
    start = time.perf_counter()
    for kind, item in items:
        if kind == 0:
            core.on_surrogate(item)
        else:
            core.set_beam_fault(item[0], None)
            core.decide(item[0], item[1] is not None)
    return time.perf_counter() - start


def profile_replay(path: Path) -> dict:
    profiler = cProfile.Profile()
    profiler.enable()
    replay(path)
    profiler.disable()
    stats = pstats.Stats(profiler)
    by_module: dict[str, float] = defaultdict(float)
    total = 0.0
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        name = Path(filename).name if filename.startswith("/") else filename
        by_module[name] += tottime
        total += tottime
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return {
        "total_s": total,
        "by_module_s": dict(sorted(by_module.items(), key=lambda kv: -kv[1])[:15]),
        "top": out.getvalue(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", metavar="LOG", help="write the synthetic log here and keep it")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="K=V")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "synthetic.sqlite"
        if path.exists():
            path.unlink()
        start = time.perf_counter()
        counts = synthesise(path, args.minutes, args.overrides)
        synth_s = time.perf_counter() - start
        runs = []
        for _ in range(max(1, args.repeat)):
            runs.append(replay(path))
        best = min(runs, key=lambda r: r.wall_s)
        floor = core_floor(path)
        prof = profile_replay(path) if args.profile else None
    walls = sorted(r.wall_s for r in runs)
    result = {
        "minutes": args.minutes,
        "samples": counts["samples"],
        "images": counts["images"],
        "decisions_recorded": counts["decisions"],
        "log_mb": round(counts["bytes"] / 1e6, 1),
        "synthesis_s": round(synth_s, 2),
        "duration_s": round(best.duration_s, 1),
        "wall_s_best": round(walls[0], 3),
        "wall_s_median": round(walls[len(walls) // 2], 3),
        "speed_x_best": round(best.speed_x),
        "target_speed_x": 1000,
        "reproduced": best.reproduced,
        "divergences": best.divergences,
        "decisions_compared": best.decisions_compared,
        "estimates_compared": best.estimates_compared,
        "events_compared": best.events_compared,
        "silent_decides": best.silent_decides,
        "timing_best_s": {k: round(v, 3) for k, v in best.timing.items()},
        "core_floor_s": round(floor, 3),
        "core_floor_us_per_sample": round(1e6 * floor / max(1, counts["samples"]), 1),
        "outside_core_s": round(walls[0] - floor, 3),
        "duty_cycle": best.duty_cycle,
    }
    if prof is not None:
        result["profile_by_module_s"] = {k: round(v, 3) for k, v in prof["by_module_s"].items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value}")
        if prof is not None:
            print(prof["top"])
    ok = best.reproduced and not math.isnan(best.speed_x)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
