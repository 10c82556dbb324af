"""Benchmark: batch QA throughput (verify + replay + HTML report per log) on 1 and 2 workers.

1. Synthesise one replayable session log of ``--minutes`` (default 3) the way
   ``bench/bench_replay.py`` does (the simulated patient fed to a ``SessionCore``, written
   through ``SessionLogWriter``: hash-chained, operator window changes, holds, a tracker
   dropout every 5 minutes), then copy it ``--copies`` times (default 8) into a folder.
2. Warm up once (the forkserver starts and preloads numpy, matplotlib and motionctl; this
   one-off cost, about a second, is left out of both measurements alike).
3. ``motionctl.batch.run_batch`` over the folder with 1 worker and 2 (``--workers``),
   interleaved, best of ``--repeat`` (default 3) wall times each: logs/s and the speed-up
   over 1 worker (target >= 1.8x from 1 to 2). Also the time of one log in this process,
   by stage, and the machine's own ceiling: the same worker counts on pure-Python CPU
   tasks (on a shared virtual machine the second core is not always all there).
4. ``--dask``: the same batch through a local Dask cluster (2 worker processes, 1 thread
   each) via ``scheduler=``, for comparison.

Usage: python bench/bench_batch.py [--minutes 3] [--copies 8] [--workers 1 2] [--repeat 3]
       [--dask] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from motionctl.batch import run_batch
from motionctl.report import analyse_session, write_html

HERE = Path(__file__).resolve().parent


def _synthesise(path: Path, minutes: float) -> dict:
    spec = importlib.util.spec_from_file_location("bench_replay", HERE / "bench_replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthesise(path, minutes, [])


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _ceiling(workers: int, tasks: int = 8, n: int = 3_000_000) -> float:
    """Wall time of ``tasks`` pure-Python CPU tasks on ``workers`` processes: the machine's
    own scaling at the time of the run (a shared VM's cores are not always all there)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_spin, [1000] * workers))
        start = time.perf_counter()
        list(pool.map(_spin, [n] * tasks))
        return time.perf_counter() - start


def _stages(log: Path, out: Path) -> dict[str, float]:
    """One log in this process, stage by stage (the replay includes its own verification)."""
    from motionctl.integrity import verify
    from motionctl.replay import replay

    t0 = time.perf_counter()
    verify(log)
    t1 = time.perf_counter()
    replay(log)
    t2 = time.perf_counter()
    session, section = analyse_session(log)
    t3 = time.perf_counter()
    write_html(out, [session], [section])
    t4 = time.perf_counter()
    return {
        "verify_s": t1 - t0,
        "replay_s": t2 - t1,
        "report_s (verify + replay + figures + HTML)": t3 - t2,
        "write_s": t4 - t3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dask", action="store_true", help="also through a local Dask cluster")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        start = time.perf_counter()
        counts = _synthesise(root / "session.sqlite", args.minutes)
        synth_s = time.perf_counter() - start
        for k in range(args.copies):
            shutil.copy(root / "session.sqlite", logs / f"session-{k:02d}.sqlite")
        stages = _stages(root / "session.sqlite", root / "one.html")
        run_batch(logs, root / "warmup", workers=max(args.workers))  # forkserver + preload
        runs: dict[int, list[float]] = {}
        rows = None
        for r in range(args.repeat):  # interleaved, so that drift hits both alike
            for workers in args.workers:
                summary = run_batch(logs, root / f"out-{workers}-{r}", workers=workers)
                runs.setdefault(workers, []).append(summary.wall_s)
                assert not summary.failed, summary.failed
                rows = rows or summary.rows
                assert summary.rows == rows  # same figures whatever the worker count
        dask_s = None
        if args.dask:
            from distributed import LocalCluster

            with LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster:
                run_batch(logs, root / "dask-warm", scheduler=cluster.scheduler_address)
                summary = run_batch(logs, root / "dask", scheduler=cluster.scheduler_address)
                assert summary.rows == rows
                dask_s = summary.wall_s
        report_kb = (root / "one.html").stat().st_size / 1024
    ceiling = {w: min(_ceiling(w) for _ in range(args.repeat)) for w in args.workers}

    base = min(runs[args.workers[0]])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "log_minutes": args.minutes,
        "log_mb": round(counts["bytes"] / 1e6, 2),
        "samples_per_log": counts["samples"],
        "copies": args.copies,
        "synthesis_s": round(synth_s, 2),
        "one_log_stages_s": {k: round(v, 3) for k, v in stages.items()},
        "report_kb": round(report_kb),
        "runs": {
            w: {
                "wall_s_best": round(min(v), 3),
                "wall_s_all": [round(x, 3) for x in v],
                "logs_per_s": round(args.copies / min(v), 3),
                "speedup": round(base / min(v), 2),
            }
            for w, v in runs.items()
        },
        "target_speedup_1_to_2": 1.8,
        "cpu_ceiling_speedup": {
            w: round(ceiling[args.workers[0]] / v, 2) for w, v in ceiling.items()
        },
    }
    if dask_s is not None:
        result["dask_local_2_workers"] = {
            "wall_s": round(dask_s, 3),
            "logs_per_s": round(args.copies / dask_s, 3),
            "speedup": round(base / dask_s, 2),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {result['machine']}")
    print(
        f"log: {args.minutes:g} min synthetic session, {counts['samples']} samples, "
        f"{result['log_mb']} MB; {args.copies} copies; report {result['report_kb']} kB"
    )
    print("one log in-process: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    print(f"{'workers':>8s} {'wall s':>8s} {'logs/s':>8s} {'speed-up':>9s}")
    for w, r in result["runs"].items():
        print(f"{w:8d} {r['wall_s_best']:8.2f} {r['logs_per_s']:8.2f} {r['speedup']:8.2f}x")
    print(
        "machine ceiling (pure-Python CPU tasks, same worker counts): "
        + ", ".join(f"{w} workers {v:.2f}x" for w, v in result["cpu_ceiling_speedup"].items())
    )
    if dask_s is not None:
        d = result["dask_local_2_workers"]
        print(f"{'dask 2':>8s} {d['wall_s']:8.2f} {d['logs_per_s']:8.2f} {d['speedup']:8.2f}x")
    if 2 in result["runs"] and 1 in result["runs"]:
        ok = result["runs"][2]["speedup"] >= 1.8
        print(f"target >= 1.8x from 1 to 2 workers: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
