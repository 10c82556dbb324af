"""Benchmark: the external-to-internal correlation model on the paired IntERAct traces.

For every paired trace (LARK liver, LIGHT-SABR lung: internal 6-DoF + 1-D respiratory partner,
5 Hz) and imaging period, simulate intermittent imaging with ``evaluate_correlation`` (an image
every period at an internal sample, features from the surrogate history, estimate at every
surrogate sample, scores after the first 60 s) and report per trace and the median:

- 3-D RMS and P95 of the estimate over the valid samples, and the valid fraction;
- the 3-D RMS with the consistency check disabled (same samples as the baseline: shows that the
  gain is not from samples withheld while the model is invalid);
- the plain clinic baseline (least squares over the last 12 images, no drift state, no check);
- the correlation error at the images (held-out residual before each image updates the model),
  the number of images that invalidated the model, the reported uncertainty, the model kinds;
- cost: microseconds per predict() and per features() + predict() (a 30 Hz sample),
  milliseconds per add_point() (features_at included).

Usage: python bench/bench_correlation.py [--periods 3 1] [--noise 0.0] [--latency 0.0]
       [--data DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from motionctl.correlation import (
    CorrelationModel,
    CorrelationParams,
    SurrogateHistory,
    evaluate_correlation,
)
from motionctl.traces import read_trace

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAIRED = "interact-paired-internal-external"
NO_CHECK = 1e6


def paired_traces(data: Path) -> dict[str, list[tuple[str, Path, Path]]]:
    root = data / PAIRED
    lark = [
        (p.stem, p, p.with_name(p.stem + "_resp.txt"))
        for p in sorted((root / "LARK_liver").glob("*.txt"))
        if not p.name.endswith("_resp.txt")
    ]
    light_dir = root / "LIGHT_SABR_lung"
    light = [
        (p.stem, p, light_dir / "Resp" / f"{p.stem}_resp.txt")
        for p in sorted((light_dir / "Internal").glob("*.txt"))
    ]
    return {"LARK liver": lark, "LIGHT-SABR lung": light}


def load(internal: Path, resp: Path):
    a, b = read_trace(internal), read_trace(resp)
    return a.t_s, a.values[:, :3], b.t_s, b.values[:, 0]


def plain_linear_baseline(
    t_int, x, t_sur, s, period, n_points=12, skip_s=60.0, noise_mm=0.0, seed=0, latency_s=0.0
) -> dict:
    """Least squares s -> (LR, SI, AP) over the last 12 images; no drift state, no check.
    Same image schedule, imaging noise (same generator and seed) and latency as
    ``evaluate_correlation``."""
    img = []
    t_next = t_sur[0]
    for i, ti in enumerate(t_int):
        if ti >= t_next - 1e-9 and ti <= t_sur[-1]:
            img.append(i)
            t_next = ti + period
    img = np.asarray(img)
    rng = np.random.default_rng(seed)
    y_img = x[img] + (rng.normal(0.0, noise_mm, (len(img), 3)) if noise_mm > 0 else 0.0)
    s_img = np.interp(t_int[img], t_sur, s)
    truth = np.column_stack([np.interp(t_sur, t_int, x[:, a]) for a in range(3)])
    e3 = []
    for k in range(len(t_sur)):
        if t_sur[k] < t_sur[0] + skip_s or t_sur[k] > t_int[-1]:
            continue
        n_used = int(np.searchsorted(t_int[img] + latency_s, t_sur[k] + 1e-9, side="right"))
        lo = max(0, n_used - n_points)
        if n_used - lo < 3:
            continue
        A = np.column_stack((np.ones(n_used - lo), s_img[lo:n_used]))
        coef, *_ = np.linalg.lstsq(A, y_img[lo:n_used], rcond=None)
        e3.append(float(np.linalg.norm(np.array([1.0, s[k]]) @ coef - truth[k])))
    e = np.asarray(e3)
    return {"rms_3d_mm": float(np.sqrt(np.mean(e**2))), "p95_3d_mm": float(np.percentile(e, 95))}


def timing(t_int, x, t_sur, s, period, params: CorrelationParams) -> dict:
    """Cost of add_point (with features_at) at the images, and of predict at every sample."""
    model = CorrelationModel(params)
    hist = SurrogateHistory.for_params(params)
    add_s = []
    t_next = t_sur[0]
    j = 0
    for k in range(len(t_sur)):
        hist.append(float(t_sur[k]), float(s[k]))
        while j < len(t_int) and t_int[j] <= t_sur[k] + 1e-9:
            if t_int[j] >= t_next - 1e-9:
                t0 = time.perf_counter()
                f = hist.features_at(float(t_int[j]))
                model.add_point(float(t_int[j]), f, tuple(x[j]))
                add_s.append(time.perf_counter() - t0)
                t_next = t_int[j] + period
            j += 1
    feats = [hist.features_ahead(float(v), 0.0) for v in s[-200:]]
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        for f in feats:
            model.predict(f)
    predict_us = (time.perf_counter() - t0) / (reps * len(feats)) * 1e6
    return {
        "add_point_ms_mean": float(np.mean(add_s) * 1e3),
        "add_point_ms_max": float(np.max(add_s) * 1e3),
        "predict_us": predict_us,
        "kind_at_end": model.kind,
    }


def sample_cost_30hz(params: CorrelationParams) -> dict:
    """features() + predict() per surrogate sample at 30 Hz (what the estimator does)."""
    t = np.arange(0.0, 120.0, 1 / 30.0)
    s = 5 * np.sin(2 * np.pi * t / 4.0)
    hist = SurrogateHistory.for_params(params)
    model = CorrelationModel(params)
    for k, (tk, sk) in enumerate(zip(t, s, strict=True)):
        hist.append(float(tk), float(sk))
        if k % 30 == 0:
            model.add_point(float(tk), hist.features(), (0.1 * sk, -1.5 * sk, 0.5 * sk))
    t0 = time.perf_counter()
    n = 0
    for tk, sk in zip(t + 120.0, s, strict=True):
        hist.append(float(tk), float(sk))
        model.predict(hist.features())
        n += 1
    return {"features_plus_predict_us": (time.perf_counter() - t0) / n * 1e6}


def finite(obj):
    """NaN/inf -> None, so that --json output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def med(values) -> float:
    return float(np.median(values))


def run(args) -> dict:
    data = Path(args.data)
    sets = paired_traces(data)
    if not any(sets.values()):
        sys.exit(f"no paired traces under {data / PAIRED}")
    params = CorrelationParams()
    no_check = CorrelationParams(check_threshold_mm=NO_CHECK)
    out: dict = {
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "noise_mm": args.noise,
        "image_latency_s": args.latency,
        "sets": [],
    }
    for name, traces in sets.items():
        loaded = [(n, *load(i, r)) for n, i, r in traces]
        for period in args.periods:
            rows = []
            for n, t_int, x, t_sur, s in loaded:
                kw = dict(noise_mm=args.noise, seed=args.seed, image_latency_s=args.latency)
                res = evaluate_correlation(t_int, x, t_sur, s, period, params, **kw)
                nc = evaluate_correlation(t_int, x, t_sur, s, period, no_check, **kw)
                base = plain_linear_baseline(
                    t_int,
                    x,
                    t_sur,
                    s,
                    period,
                    noise_mm=args.noise,
                    seed=args.seed,
                    latency_s=args.latency,
                )
                cost = timing(t_int, x, t_sur, s, period, no_check)  # valid at the end
                rows.append(
                    {
                        "trace": n,
                        **res,
                        "rms_3d_no_check_mm": nc["rms_3d_mm"],
                        "baseline": base,
                        "cost": cost,
                    }
                )
            summary = {
                "median_rms_3d_mm": med([r["rms_3d_mm"] for r in rows]),
                "median_p95_3d_mm": med([r["p95_3d_mm"] for r in rows]),
                "median_rms_3d_no_check_mm": med([r["rms_3d_no_check_mm"] for r in rows]),
                "median_baseline_rms_3d_mm": med([r["baseline"]["rms_3d_mm"] for r in rows]),
                "median_baseline_p95_3d_mm": med([r["baseline"]["p95_3d_mm"] for r in rows]),
                "median_correlation_error_mm": med(
                    [r["correlation_error_mm"]["median"] for r in rows]
                ),
                "predict_us": max(r["cost"]["predict_us"] for r in rows),
                "add_point_ms_mean": max(r["cost"]["add_point_ms_mean"] for r in rows),
                "add_point_ms_max": max(r["cost"]["add_point_ms_max"] for r in rows),
            }
            out["sets"].append(
                {"dataset": name, "imaging_period_s": period, "traces": rows, "summary": summary}
            )
    out["sample_cost_30hz"] = sample_cost_30hz(params)
    return out


def fmt_kinds(kinds: dict) -> str:
    total = sum(kinds.values()) or 1
    abbrev = {"linear": "lin", "quadratic": "quad", "dual": "dual", "augmented": "aug"}
    return " ".join(
        f"{abbrev.get(k, k)} {100 * v / total:.0f}%" for k, v in Counter(kinds).most_common()
    )


def print_table(out: dict) -> None:
    print(
        f"correlation model: noise {out['noise_mm']} mm/axis, image latency "
        f"{out['image_latency_s']} s, scores after 60 s; median over traces in the last row"
    )
    for block in out["sets"]:
        print(f"\n### {block['dataset']}, one image every {block['imaging_period_s']:g} s\n")
        print(
            "| trace | RMS 3-D | P95 3-D | valid | RMS no check | baseline RMS / P95 "
            "| corr. err. med / p95 / max | invalid | unc. RMS | models | predict µs "
            "| add_point ms |"
        )
        print("|" + "---|" * 12)
        for r in block["traces"]:
            ce = r["correlation_error_mm"]
            c = r["cost"]
            print(
                f"| {r['trace']} | {r['rms_3d_mm']:.2f} | {r['p95_3d_mm']:.2f} "
                f"| {100 * r['valid_fraction']:.0f}% | {r['rms_3d_no_check_mm']:.2f} "
                f"| {r['baseline']['rms_3d_mm']:.2f} / {r['baseline']['p95_3d_mm']:.2f} "
                f"| {ce['median']:.2f} / {ce['p95']:.2f} / {ce['max']:.2f} "
                f"| {r['n_invalid']} | {r['uncertainty_rms_mm']:.2f} | {fmt_kinds(r['kinds'])} "
                f"| {c['predict_us']:.2f} | {c['add_point_ms_mean']:.2f} |"
            )
        m = block["summary"]
        print(
            f"| **median** | **{m['median_rms_3d_mm']:.2f}** | **{m['median_p95_3d_mm']:.2f}** | "
            f"| {m['median_rms_3d_no_check_mm']:.2f} "
            f"| {m['median_baseline_rms_3d_mm']:.2f} / {m['median_baseline_p95_3d_mm']:.2f} "
            f"| {m['median_correlation_error_mm']:.2f} (median) | | | | "
            f"{m['predict_us']:.2f} (max) | {m['add_point_ms_mean']:.2f} "
            f"(max {m['add_point_ms_max']:.2f}) |"
        )
    c = out["sample_cost_30hz"]
    us = c["features_plus_predict_us"]
    print(f"\nper 30 Hz surrogate sample, features() + predict(): {us:.1f} µs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=float, nargs="+", default=[3.0, 1.0])
    ap.add_argument("--noise", type=float, default=0.0, help="imaging noise, mm per axis")
    ap.add_argument("--latency", type=float, default=0.0, help="image latency, s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(finite(out), indent=1))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
