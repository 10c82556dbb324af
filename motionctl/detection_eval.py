"""Detection evaluation on simulated kV images with ground truth, and KIM-QA log comparison.

What `motionctl evaluate detection` and `bench/bench_detection.py` run. Like the CLI, this
module wires simulators (the patient, the renderer) to the core's detection functions, so
it lives beside the CLI and is never imported by the core. See bench/bench_detection.py for
the method and the figures' definitions.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from motionctl import fiducials as fid
from motionctl import kim
from motionctl.simulators.patient import LujanParams, LujanPatient
from motionctl.simulators.xray_imager import (
    DEFAULT_SEEDS,
    Seed,
    render_projection,
    room_stereo_geometry,
    seed_poses,
)

SOLID4 = (
    Seed((-10.0, 10.0, 5.0), (0.2, 0.9, 0.4), 3.0, 1.0, 1.0, "s1"),
    Seed((12.0, -4.0, -8.0), (0.9, 0.1, 0.4), 3.0, 1.0, 1.0, "s2"),
    Seed((3.0, -12.0, 14.0), (0.1, 0.4, -0.9), 3.0, 1.0, 1.0, "s3"),
    Seed((-6.0, -9.0, -13.0), (0.6, -0.6, 0.5), 3.0, 1.0, 1.0, "s4"),
)
COILS3 = (
    Seed((-12.0, 8.0, 6.0), (0.3, 0.9, 0.3), 10.0, 0.35, 0.5, "c1"),
    Seed((14.0, -6.0, -10.0), (0.8, 0.2, 0.55), 10.0, 0.35, 0.5, "c2"),
    Seed((2.0, -14.0, 16.0), (0.2, 0.5, -0.85), 10.0, 0.35, 0.5, "c3"),
)
SEED_SETS = {"mixed": DEFAULT_SEEDS, "solid4": SOLID4, "coils3": COILS3}
NOISE_LEVELS = (0.5, 1.0, 2.0, 3.0)
FRAME_DT = 0.2
ROTATION_DEG_PER_MM = 0.25


def plan_of(seeds) -> fid.SeedPlan:
    return fid.SeedPlan(
        seeds_mm=tuple(s.center_offset_mm for s in seeds),
        seed_diameter_mm=tuple(s.diameter_mm for s in seeds),
        seed_length_mm=tuple(s.length_mm for s in seeds),
    )


def _segment_distance(p0, p1, q0, q1) -> float:
    """Smallest distance between 2-D segments p0-p1 and q0-q1 (sampled, px)."""
    s = np.linspace(0.0, 1.0, 21)[:, None]
    a = p0 + s * (p1 - p0)
    b = q0 + s * (q1 - q0)
    return float(np.min(np.linalg.norm(a[:, None] - b[None], axis=2)))


def visible(geometry, poses, truth) -> np.ndarray:
    """Seeds projected on the panel and clear of every other seed's projection."""
    ends = []
    for p in poses:
        c, a = np.asarray(p.center_mm), np.asarray(p.axis)
        e = fid.project_points(geometry, [c - 0.5 * p.length_mm * a, c + 0.5 * p.length_mm * a])
        ends.append(e)
    mag = fid.magnification(geometry, truth.seeds_mm)
    pitch = fid.pixel_pitch_mm(geometry)
    ok = truth.inside.copy()
    for i in range(len(poses)):
        for j in range(len(poses)):
            if i == j:
                continue
            clear = (poses[i].diameter_mm + poses[j].diameter_mm) * mag[i] / pitch + 4.0
            if _segment_distance(*ends[i], *ends[j]) < clear:
                ok[i] = False
    return ok


def stats(values) -> dict:
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "median": round(float(np.median(a)), 4),
        "p95": round(float(np.percentile(a, 95)), 4),
        "max": round(float(a.max()), 4),
    }


def rms(errors) -> float:
    e = np.asarray(list(errors), dtype=float).reshape(-1, 3)
    if e.size == 0:
        return math.nan
    return round(float(np.sqrt(np.mean(np.sum(e**2, axis=1)))), 4)


def run_scenario(name: str, seeds, noise: float, n_frames: int, seed: int) -> dict:
    ga, gb = room_stereo_geometry()
    plan = plan_of(seeds)
    rng = np.random.default_rng([seed, 7])
    patient = LujanPatient(LujanParams(drift_mm_per_min=(0.0, 0.5, 0.0)), seed=seed)
    offset = rng.uniform(-5.0, 5.0, 3)
    reference_si = patient.state(0.0).target_mm[1]
    prior = fid.TargetPrior(window=100)
    accepted: list[tuple[float, np.ndarray]] = []
    out = {
        "visible_2d": 0,
        "found_2d": 0,
        "visible_3d": 0,
        "found_3d": 0,
        "frames": 0,
        "accepted": 0,
        "false_locks": 0,
        "err2d": [],
        "err3d": [],
        "t_prior": [],
        "wall_prior": [],
        "wall_full": [],
        "reasons": {},
        "full_frames": 0,
        "full_accepted": 0,
        "full_false_locks": 0,
        "full_err3d": [],
        "t_full": [],
        "mono_frames": 0,
        "mono_accepted": 0,
        "mono_false_locks": 0,
        "mono_err3d": [],
        "mono_uncertainty": [],
        "mono_reasons": {},
        "stereo_uncertainty": [],
        "false_lock_frames": [],
    }
    for k in range(n_frames):
        t = 1.0 + k * FRAME_DT
        state = patient.state(t)
        target = np.asarray(state.target_mm) + offset
        h = 0.005
        vel = (
            np.asarray(patient.state(t + h).target_mm) - np.asarray(patient.state(t - h).target_mm)
        ) / (2 * h)
        rot = ROTATION_DEG_PER_MM * (state.target_mm[1] - reference_si)
        poses = seed_poses(seeds, target, rotation_deg=rot)
        distractor = k % 2 == 1
        views, truths = [], []
        for g in (ga, gb):
            image, truth = render_projection(
                g,
                poses,
                rng=rng,
                velocity_mm_s=vel,
                noise=noise,
                distractor=distractor,
                background_seed=k % 3,
            )
            views.append((image, g))
            truths.append(truth)
        # the tracker's prediction
        frame_prior = prior
        if accepted and t - accepted[-1][0] <= 1.0:
            t1, p1 = accepted[-1]
            pred, age = p1, t - t1
            if len(accepted) >= 2 and t1 - accepted[-2][0] <= 0.5:
                t0, p0 = accepted[-2]
                pred = p1 + (p1 - p0) / (t1 - t0) * age
            frame_prior = prior.with_prediction(pred, 1.0 + 5.0 * age)
        use_prior = frame_prior if frame_prior.n > 0 else None
        t_start, c_start = time.perf_counter(), time.thread_time()
        loc = fid.localise_stereo(views, plan, use_prior, t=t)
        cpu, wall = time.thread_time() - c_start, time.perf_counter() - t_start
        key = "prior" if use_prior is not None else "full"
        out[f"t_{key}"].append(cpu)
        out[f"wall_{key}"].append(wall)
        out["frames"] += 1
        vis = [visible(g, poses, tr) for g, tr in zip((ga, gb), truths, strict=True)]
        both = vis[0] & vis[1]
        for view, (tr, vv) in enumerate(zip(truths, vis, strict=True)):
            cands = (
                np.array([d.xy for d in loc.candidates[view]]).reshape(-1, 2)
                if (loc.candidates)
                else np.zeros((0, 2))
            )
            for i in np.nonzero(vv)[0]:
                out["visible_2d"] += 1
                if len(cands) and np.min(np.linalg.norm(cands - tr.seeds_px[i], axis=1)) < 1.5:
                    out["found_2d"] += 1
        out["visible_3d"] += int(both.sum())
        if loc.accepted:
            seeds_err = np.linalg.norm(loc.seeds_mm - truths[0].seeds_mm, axis=1)
            pos_err = np.asarray(loc.position_mm) - target
            false = np.linalg.norm(pos_err) > 2.0 or bool(np.nanmax(seeds_err) > 2.0)
            out["accepted"] += 1
            out["false_locks"] += int(false)
            if false:
                out["false_lock_frames"].append(
                    {
                        "frame": k,
                        "position_error_mm": np.round(pos_err, 2).tolist(),
                        "seed_errors_mm": np.round(seeds_err, 2).tolist(),
                        "prior": use_prior is not None,
                    }
                )
            out["found_3d"] += int(np.sum(both & (np.nan_to_num(seeds_err, nan=99.0) < 1.0)))
            out["err3d"].append(pos_err.tolist())
            out["stereo_uncertainty"].append(loc.uncertainty_mm)
            for view, tr in enumerate(truths):
                px = loc.seeds_px[view]
                ok = np.isfinite(px[:, 0])
                out["err2d"] += np.linalg.norm(px[ok] - tr.seeds_px[ok], axis=1).tolist()
            if not false:
                accepted.append((t, np.asarray(loc.position_mm)))
                prior = prior.update(loc.position_mm, loc.rotation_deg)
        else:
            out["reasons"][loc.reason] = out["reasons"].get(loc.reason, 0) + 1
        # full-frame acquisition, no prior
        if k % 10 == 5:
            t_start, c_start = time.perf_counter(), time.thread_time()
            full = fid.localise_stereo(views, plan, None, t=t)
            out["t_full"].append(time.thread_time() - c_start)
            out["wall_full"].append(time.perf_counter() - t_start)
            out["full_frames"] += 1
            if full.accepted:
                err = np.asarray(full.position_mm) - target
                seeds_err = np.linalg.norm(full.seeds_mm - truths[0].seeds_mm, axis=1)
                out["full_accepted"] += 1
                out["full_false_locks"] += int(
                    np.linalg.norm(err) > 2.0 or bool(np.nanmax(seeds_err) > 2.0)
                )
                out["full_err3d"].append(err.tolist())
        # mono: view a with the learned Gaussian
        if frame_prior.n >= 10:
            mono = fid.localise_mono(views[0][0], ga, plan, frame_prior, t=t)
            out["mono_frames"] += 1
            if mono.accepted:
                err = np.asarray(mono.position_mm) - target
                out["mono_accepted"] += 1
                out["mono_false_locks"] += int(np.linalg.norm(err) > 5.0)
                out["mono_err3d"].append(err.tolist())
                out["mono_uncertainty"].append(mono.uncertainty_mm)
            else:
                out["mono_reasons"][mono.reason] = out["mono_reasons"].get(mono.reason, 0) + 1
    out["scenario"] = name
    out["noise"] = noise
    return out


def summarise(results: list[dict]) -> dict:
    def total(key):
        return sum(r[key] for r in results)

    def cat(key):
        return [x for r in results for x in r[key]]

    err3d = np.asarray(cat("err3d")).reshape(-1, 3)
    mono = np.asarray(cat("mono_err3d")).reshape(-1, 3)
    reasons: dict[str, int] = {}
    mono_reasons: dict[str, int] = {}
    for r in results:
        for key, n in r["reasons"].items():
            reasons[key] = reasons.get(key, 0) + n
        for key, n in r["mono_reasons"].items():
            mono_reasons[key] = mono_reasons.get(key, 0) + n
    return {
        "frame_pairs": total("frames"),
        "detection_rate_2d": round(total("found_2d") / max(total("visible_2d"), 1), 5),
        "detection_rate_stereo": round(total("found_3d") / max(total("visible_3d"), 1), 5),
        "accepted_rate": round(total("accepted") / max(total("frames"), 1), 5),
        "false_lock_rate": round(total("false_locks") / max(total("frames"), 1), 5),
        "false_locks": total("false_locks"),
        "false_lock_frames": [
            {"scenario": r["scenario"], "noise": r["noise"], **f}
            for r in results
            for f in r["false_lock_frames"]
        ],
        "reject_reasons": reasons,
        "err2d_px": stats(cat("err2d")),
        "stereo_rms_3d_mm": rms(err3d),
        "stereo_rms_per_axis_mm": [
            round(float(np.sqrt(np.mean(err3d[:, k] ** 2))), 4) for k in range(3)
        ]
        if len(err3d)
        else [],
        "stereo_uncertainty_mm": stats(cat("stereo_uncertainty")),
        "time_per_pair_prior_ms": stats(1e3 * np.asarray(cat("t_prior"))),
        "wall_per_pair_prior_ms": stats(1e3 * np.asarray(cat("wall_prior"))),
        "full_frame": {
            "pairs": total("full_frames"),
            "accepted_rate": round(total("full_accepted") / max(total("full_frames"), 1), 5),
            "false_locks": total("full_false_locks"),
            "rms_3d_mm": rms(cat("full_err3d")),
            "time_per_pair_ms": stats(1e3 * np.asarray(cat("t_full"))),
            "wall_per_pair_ms": stats(1e3 * np.asarray(cat("wall_full"))),
        },
        "mono": {
            "frames": total("mono_frames"),
            "accepted_rate": round(total("mono_accepted") / max(total("mono_frames"), 1), 5),
            "false_locks_gt5mm": total("mono_false_locks"),
            "rms_3d_mm": rms(mono),
            "rms_per_axis_mm": [
                round(float(np.sqrt(np.mean(mono[:, k] ** 2))), 4) for k in range(3)
            ]
            if len(mono)
            else [],
            "uncertainty_mm": stats(cat("mono_uncertainty")),
            "reject_reasons": mono_reasons,
        },
    }


def simulated(pairs: int) -> dict:
    cv2.setNumThreads(1)
    scenarios = [
        (name, seeds, noise) for name, seeds in SEED_SETS.items() for noise in NOISE_LEVELS
    ]
    per = max(1, math.ceil(pairs / len(scenarios)))
    results = []
    for idx, (name, seeds, noise) in enumerate(scenarios):
        r = run_scenario(name, seeds, noise, per, seed=100 + idx)
        results.append(r)
        s = summarise([r])
        print(
            f"{name:7s} noise {noise:3.1f}: det2d {s['detection_rate_2d']:.4f} "
            f"det3d {s['detection_rate_stereo']:.4f} acc {s['accepted_rate']:.3f} "
            f"false {s['false_locks']} rms {s['stereo_rms_3d_mm']} mono {s['mono']['rms_3d_mm']} "
            f"t {s['time_per_pair_prior_ms'].get('median')} ms {s['reject_reasons']}",
            file=sys.stderr,
        )
    by_noise = {str(n): summarise([r for r in results if r["noise"] == n]) for n in NOISE_LEVELS}
    by_set = {name: summarise([r for r in results if r["scenario"] == name]) for name in SEED_SETS}
    return {"overall": summarise(results), "by_noise": by_noise, "by_seed_set": by_set}


def kim_comparison(data: Path) -> dict:
    """Every KIM-QA session (Varian Dynamic and Tx interrupt) with a matching robot trace:
    each couch-shift segment aligned and compared on its own (the Tx-interrupt sessions
    outlast the 70 s-pattern traces, and the robot restarts after an interruption)."""
    from motionctl.traces import read_trace

    varian = data / "Test Files" / "Varian"
    if not varian.is_dir():
        return {"skipped": f"KIM-QA data absent: {varian}"}
    coords, _ = kim.read_coords(varian / "co-ords.txt")
    coords_centroid = coords.mean(axis=0)
    rows = []
    for kind in ("Dynamic", "Tx interrupt"):
        for case in sorted(p for p in (varian / kind).iterdir() if p.is_dir()):
            trace_name = kim.KIM_QA_TRACES.get(case.name)
            if trace_name is None:
                rows.append({"session": f"{kind}/{case.name}", "skipped": "no matching trace"})
                continue
            trace = read_trace(data / "Robot traces" / trace_name)
            log = kim.read_kim_session(case)
            for segment in sorted(set(log.segment.tolist())):
                m = log.segment == segment
                c = kim.compare_with_trace(
                    log.t_s[m], log.centroid_mm[m], trace.t_s, np.asarray(trace.values)[:, :3]
                )
                row = {"session": f"{kind}/{case.name}", "segment": segment, "trace": trace_name}
                row.update(c.as_dict())
                row["offset_minus_coords_mm"] = np.round(
                    np.asarray(c.offset_mm) - coords_centroid, 2
                ).tolist()
                rows.append(row)
                print(
                    f"KIM {kind:12s} {case.name:22s} seg {segment}: n {c.n_frames:4d} "
                    f"tau {c.time_offset_s:8.2f} s rms3d {c.rms_3d_mm:.2f} mm "
                    f"(no outliers {c.rms_3d_clipped_mm:.2f}, {c.n_outliers} out) "
                    f"pass {c.kim_qa_pass}",
                    file=sys.stderr,
                )
    return {"coords_centroid_mm": np.round(coords_centroid, 3).tolist(), "sessions": rows}
