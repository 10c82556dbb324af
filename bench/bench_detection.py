"""Benchmark: fiducial detection and 3-D localisation on simulated kV images, and the
KIM-QA marker logs compared with the robot traces that drove the phantom.

Simulation: a Lujan breathing patient (``simulators.patient``, 4 s period, peak-to-peak LR
1.5, SI 12, AP 4 mm, seed per scenario, the target offset from the isocentre by a few mm)
moves a seed constellation that rotates with breathing (0.25 deg about LR per mm of SI, as
``XrayImagerSim``); every 0.2 s a stereo pair is rendered on the room-mounted pair
(``room_stereo_geometry``: 1024 x 768, 0.4 mm pixels, magnification 1.64) with motion blur
(10 ms exposure), three anatomy backgrounds, and a ligation clip (the distractor) in every
second frame. Scenarios: three seed sets (two 1 x 3 mm gold seeds + one 0.35 x 10 mm coil;
four 1 x 3 mm seeds; three coils) x four noise levels (0.5, 1, 2, 3 x the renderer's
quantum + electronic noise).

Per frame the tracker is imitated: the search regions are centred on a constant-velocity
prediction from the last two accepted positions (1-sigma 1 mm + 5 mm/s x age), on the
prior's running mean when the last lock is older than 1 s, and the first frame of a
scenario is searched full frame. Every 10th frame is also localised without any prior
(full-frame acquisition), for its timing and false-lock rate. Mono: view a of every pair is
localised alone with the Gaussian prior learned from the accepted stereo positions.

Figures:
- 2-D detection rate: visible seeds (projected on the panel and not overlapping another
  seed's projection) with a candidate within 1.5 px, per view;
- stereo detection rate: visible seeds (in both views) reported within 1 mm of the truth;
- false lock: an accepted frame whose target is > 2 mm off or with any seed > 2 mm off;
- 2-D error of the reported seed centres (px), 3-D RMS error of the target (mm);
- time per stereo pair (localise_stereo, both views): CPU time of the calling thread
  (``time.thread_time``; OpenCV and BLAS limited to one thread) and wall time, with and
  without prior. On a shared machine the CPU time is the figure to compare.

KIM: every KIM log with a matching robot trace (``motionctl.kim``), see its docstring.

Usage: python bench/bench_detection.py [--pairs 2040] [--json] [--kim-data DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from motionctl.detection_eval import kim_comparison, simulated  # noqa: E402

KIM_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kim-qa-trajectories"


def report(result: dict) -> str:
    """The results as markdown tables."""
    sim = result["simulated"]
    o = sim["overall"]
    lines = [
        f"Simulated stereo pairs: {o['frame_pairs']} (room stereo, 1024 x 768, 0.4 mm px)",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| stereo detection of visible seeds | {100 * o['detection_rate_stereo']:.2f} % "
        "| >= 99.5 % |",
        f"| 2-D candidate detection of visible seeds | {100 * o['detection_rate_2d']:.2f} % | |",
        f"| frames accepted | {100 * o['accepted_rate']:.2f} % | |",
        f"| false locks per frame pair | {100 * o['false_lock_rate']:.3f} % "
        f"({o['false_locks']}) | <= 0.1 % |",
        f"| 2-D error of reported seeds, px median / P95 | {o['err2d_px'].get('median')} / "
        f"{o['err2d_px'].get('p95')} | |",
        f"| 3-D RMS error stereo, mm | {o['stereo_rms_3d_mm']} | <= 0.3 |",
        f"| 3-D RMS error mono, mm | {o['mono']['rms_3d_mm']} "
        f"({100 * o['mono']['accepted_rate']:.1f} % accepted) | <= 1.0 |",
        f"| time per stereo pair with prior, CPU ms median / P95 | "
        f"{o['time_per_pair_prior_ms'].get('median')} / {o['time_per_pair_prior_ms'].get('p95')}"
        " | <= 15 |",
        f"| ... wall ms median / P95 (shared machine) | "
        f"{o['wall_per_pair_prior_ms'].get('median')} / {o['wall_per_pair_prior_ms'].get('p95')}"
        " | |",
        f"| full-frame (no prior) pair, CPU ms median / P95 | "
        f"{o['full_frame']['time_per_pair_ms'].get('median')} / "
        f"{o['full_frame']['time_per_pair_ms'].get('p95')} | |",
        f"| full-frame accepted / false locks | "
        f"{100 * o['full_frame']['accepted_rate']:.1f} % / {o['full_frame']['false_locks']} | |",
        f"| rejections by reason | {o['reject_reasons']} | |",
        "",
        "| subset | pairs | stereo det. % | accepted % | false locks | RMS 3-D mm | mono RMS mm |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in ("by_noise", "by_seed_set"):
        for key, v in sim[group].items():
            label = f"noise x{key}" if group == "by_noise" else key
            lines.append(
                f"| {label} | {v['frame_pairs']} | {100 * v['detection_rate_stereo']:.2f} | "
                f"{100 * v['accepted_rate']:.2f} | {v['false_locks']} | "
                f"{v['stereo_rms_3d_mm']} | {v['mono']['rms_3d_mm']} |"
            )
    k = result["kim"]
    lines += ["", "KIM-QA logs vs robot traces (error = KIM centroid - trace - offset):", ""]
    if "skipped" in k:
        lines.append(k["skipped"])
        return "\n".join(lines)
    lines += [
        "| session | seg | frames | tau s | mean LR/SI/AP mm | SD LR/SI/AP mm "
        "| P95 abs LR/SI/AP mm | RMS 3-D mm | outliers | RMS 3-D w/o | KIM-QA pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in k["sessions"]:
        if "skipped" in r:
            lines.append(f"| {r['session']} | | | | {r['skipped']} | | | | | | |")
            continue
        ax = r["per_axis_mm"]

        def triple(key, ax=ax):
            return " / ".join(f"{ax[a][key]:.2f}" for a in ("LR", "SI", "AP"))

        lines.append(
            f"| {r['session']} | {r['segment']} | {r['n_frames']} | {r['time_offset_s']:.2f} | "
            f"{triple('mean')} | {triple('sd')} | {triple('p95_abs')} | {r['rms_3d_mm']:.2f} | "
            f"{r['n_outliers']} | {r['rms_3d_without_outliers_mm']:.2f} | {r['kim_qa_pass']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2040, help="simulated stereo pairs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--kim-data", type=Path, default=KIM_DATA)
    args = parser.parse_args(argv)
    result = {"simulated": simulated(args.pairs), "kim": kim_comparison(args.kim_data)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
