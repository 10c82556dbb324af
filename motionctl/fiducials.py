"""Fiducial detection and 3-D localisation from kV projections (stereo pair or one view).

Pure functions of image + geometry + plan + prior: no I/O, threads or clock reads (the
caller passes the acquisition time ``t``). OpenCV for filtering and connected components,
numpy / scipy for geometry and assignment. Millimetres, IEC 61217 patient coordinates
(LR, SI, AP), isocentre at the origin; pixel (i, j) = (column, row) of the panel, see
`motionctl.types.ProjectionGeometry`.

Pipeline and API
----------------
``detect_candidates(image, geometry, *, search_center_px=None, search_radius_px=None,
seed_diameter_mm=1.0, seed_length_mm=3.0, magnification_at_seed=None, polarity="dark",
min_score=5.0, max_candidates=12)`` -> ``list[Detection2D]``, best score first.
    1. Attenuation ``-log(I)`` (``polarity="dark"``, raw counts) so that a seed's contrast
       does not depend on the background level; smoothed at the thinnest seed's projected
       width (sigma >= 0.7 px).
    2. Background: a morphological opening with a disc wider than the widest seed (it
       removes seeds and keeps steps, ramps, rib and lung edges); the top-hat (image -
       opening) divided by the local noise of the smoothed image (median absolute high-pass
       in 32 x 32 px blocks, so that a seed does not inflate its own noise), its median
       removed, is the contrast-to-noise (CNR) map.
    3. Hysteresis: connected components of CNR >= max(2.5, 0.4 min_score) holding a pixel
       >= ``min_score``; fragments of one faint coil on a common axis with signal in the gap
       are re-joined; a component too long / wide for any planned seed (a seed touching a
       rib edge) is split by re-thresholding at 30/50/70 % of its peak, an elongated part
       grown back along its own axis.
    4. Per part: the signal above a local background interpolated ACROSS the part's long
       axis (a rib edge running along a coil does not bias it); intensity-weighted
       centroid and second moments (orientation, width); elongated markers (coils, seeds
       seen side-on): the centre along the axis is the midpoint of the two ends, each at
       the steepest rise / fall of the across-summed profile near the half-plateau point
       (a coil whose contrast differs between its ends, or a faint structure touching an
       end, does not pull it). Score = peak CNR. Parts longer or wider than a seed can
       project are dropped.
    With a search region (one or several discs: ``search_center_px`` (2,) or (K, 2),
    ``search_radius_px`` scalar or (K,)) only the bounding box of the discs, padded by the
    filters' reach, is processed and only candidates whose centre lies inside a disc are
    returned; without one the whole frame is searched (acquisition; ~4x slower).

``match_stereo(dets_a, geom_a, dets_b, geom_b, *, max_ray_distance_mm)``
    -> ``list[StereoPair]``: every candidate pair whose back-projected rays pass within
    ``max_ray_distance_mm``, with the midpoint of closest approach, the ray-ray distance and
    the epipolar distance (px in view b). ``assign_stereo(pairs)`` is the one-to-one
    Hungarian assignment (`scipy.optimize.linear_sum_assignment` on the ray distance),
    useful when no constellation is known.

``triangulate(sources, directions, sigmas_mm=None)`` -> point, covariance, ray distance:
    least squares over any number of rays (for two equally weighted rays: the midpoint of
    their closest approach); its covariance is ``(sum_v (I - d d^T) / sigma_v^2)^-1``.

``fit_rigid(plan_points, detected_points)`` (Kabsch / Umeyama without scale) -> R, t, rms;
``rotation_deg(R)`` -> angles about LR, SI, AP (extrinsic x-y-z, degrees).

``localise_stereo(views, plan, prior=None, *, t=0.0, settings=LocaliserSettings())``
    ``views`` = two ``(image, ProjectionGeometry)`` pairs (or two `XrayFrame`-like objects
    with ``.image`` and ``.geometry``). Detects candidates in both views (in the search
    regions of the prior's predicted seed projections when the prior has a position, else
    full frame), then searches jointly over stereo pairs and planned seeds: each planned
    seed gets one stereo pair (each candidate used once) or is left out (at most
    ``n_planned - min_seeds`` of them), every two assigned seeds must be as far apart as
    planned within ``distance_tolerance_mm``, and an elongated marker's 3-D length (from
    the two views' end-to-end lengths and the 3-D axis where the two back-projected planes
    meet) must match the planned length; the solution with most seeds, then a plausible
    rigid fit, then least chi-square (ray distances and distance errors), then smallest
    rotation wins; a second plausible solution with nearly the same chi-square and a target
    more than ``ambiguity_mm`` away rejects the frame. Each seed is re-triangulated by
    weighted least squares; Kabsch of the plan onto the seeds gives the rotation and the
    target point (the plan's origin); residual, rotation and the distance from the
    prediction are checked. -> ``Localisation`` (mode "stereo").

``localise_stereo_candidates(candidates, geometries, plan, prior, ...)`` and
``localise_mono_candidates(candidates, geometry, plan, prior, ...)`` do the same from
candidates found elsewhere (another detector, tests).

``localise_mono(image, geometry, plan, prior, *, t=0.0, settings=...)``
    One view. The Gaussian of where the target is (``TargetPrior.mono_gaussian``): the mean
    and covariance of recent accepted positions once ``settings.mono_min_samples`` have been
    accepted; before that the tracker's prediction at this frame with its 1-sigma (the prior
    correlation model gives one from the start, as KIM starts from its pre-treatment CBCT;
    ``motionctl.imaging.frame_prior`` also stands in the mean of the few positions learnt
    when the tracker has no estimate to offer); plus a floor. Each matched seed
    is placed on its detected ray where that Gaussian, moved by the seed's planned offset
    ``R p_i``, is largest (Poulsen et al. 2008, as in KIM: across the ray measured, along it
    the Gaussian's best guess); the target is the mean of the seeds less their offsets. The
    seeds' divergent rays carry a little depth information too, but it is not used: an
    unmeasured rotation of the constellation biases it (on the rig, fitted jointly with the
    prior model's 2 mm Gaussian, by up to 21 mm along the ray). ``R`` is the prior's
    rotation (the last stereo estimate), not estimated in mono. Correspondence: all
    injective seed -> candidate maps consistent with the projected planned separations,
    best by reprojection chi-square at the target. The reported uncertainty is the
    posterior covariance with the depth from the Gaussian alone (root of its trace) plus
    the fit residual, i.e. the along-ray spread of the Gaussian: honestly larger than
    stereo. -> ``Localisation`` (mode "mono").

``TargetPrior`` (frozen, pure): running mean / covariance of recent accepted positions
    (``update(position_mm, rotation_deg=None)`` returns a new prior; exact running
    statistics for the first ``window`` samples, then exponential forgetting with weight
    1/window) plus the tracker's predicted position and its 1-sigma
    (``with_prediction(predicted_mm, sigma_mm)``) for the search regions.

``SeedPlan`` (frozen): planned seed positions relative to the target point (IEC mm, at
    planning orientation), seed diameter and length; ``SeedPlan.from_config(mapping)``.

``Localisation`` (frozen): ``t, accepted, reason, detail, mode, position_mm (3-tuple),
    rotation_deg (3-tuple), seeds_mm (N, 3) in plan order (NaN rows: seed not found),
    n_seeds, residual_mm (RMS rigid-fit residual; mono: reprojection residual in mm at the
    seed), uncertainty_mm (1-sigma, root of the trace of the 3-D covariance), seeds_px
    (per view, (N, 2) in plan order), candidates (per view, all candidates seen)``.
    A rejected localisation has ``accepted=False``, ``reason`` a `LockReason` code, a
    human ``detail``, and NaN position / rotation: it never invents a position.

Rejection reasons (`LockReason`): ``no_candidates``, ``score_too_low``, ``too_few_seeds``,
``ray_distance_too_large``, ``inter_seed_distance_mismatch``, ``ambiguous_assignment``,
``outside_search_region`` (the fitted target is further from the prediction than the search
margin), ``rotation_too_large``, ``fit_residual_too_large``, ``seed_length_mismatch`` (the
constellation fits only with an elongated marker measured shorter or longer than planned in
3-D: truncated by an edge or merged with a structure in a view), ``no_prior`` (mono with
neither accepted positions nor a prediction), ``outside_field_of_view`` (the predicted
seeds project off the panel).

Bad input raises ``ValueError`` with the reason: an image that is not 2-D, not of the
geometry's size, not numeric, or holds NaN / inf; a geometry with non-finite or degenerate
vectors (zero pixel step, parallel steps, source on the panel plane, non-positive size); a
plan with fewer than one seed, duplicate seeds or non-positive seed dimensions.

Image convention: ``polarity="dark"`` (default) for raw detector counts, where gold
attenuates and a seed is darker than its surroundings; ``"bright"`` for attenuation
(log / inverted) images. See `simulators.xray_imager` for the simulated images.

What this module does NOT handle
--------------------------------
- Seeds overlapping in one view (their projections merge into one candidate): that seed is
  missing in that view; with too few remaining seeds the frame is rejected.
- Seed migration or deformation: the plan is rigid; a constellation that changed by more
  than the tolerance is rejected every frame (re-plan).
- Symmetric constellations (e.g. an equilateral triangle about the target point): the
  rotation is ambiguous; the target point is reported if every plausible correspondence
  gives the same point (the one with the smallest rotation is used), else the frame is
  rejected as ambiguous.
- A seed seen end-on is compact in that view, so its length cannot be checked there.
- Detection in the simulator is limited by anatomy clutter (the top-hat's response to
  smooth rib and lung edges) more than by noise; real images add overlying bowel gas,
  surgical clips, contrast and metal that this detector has not been tuned on.
- Fewer than 3 seeds fitted: translation only (rotation NaN).
- A shift of the target along the ray in mono mode: one view cannot see it (the position
  along the ray is the Gaussian's), so neither can the estimate check of a mono position;
  KIM has the same blind axis between its gantry angles.
- Rotation in mono mode (taken from the prior), scatter/beam-hardening, image lag, panel
  distortion or gantry flex (geometry is taken as exact), motion blur beyond the seed width.
- Learning the plan from images (a plan must come from the treatment plan / config).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

from motionctl.types import ProjectionGeometry

__all__ = [
    "Detection2D",
    "LocaliserSettings",
    "Localisation",
    "LockReason",
    "SeedPlan",
    "StereoPair",
    "TargetPrior",
    "assign_stereo",
    "detect_candidates",
    "epipolar_distance_px",
    "fit_rigid",
    "localise_mono",
    "localise_mono_candidates",
    "localise_stereo",
    "localise_stereo_candidates",
    "magnification",
    "match_stereo",
    "pixel_pitch_mm",
    "pixel_rays",
    "project_points",
    "ray_ray_closest",
    "rotation_deg",
    "search_regions",
    "triangulate",
]

_NAN3 = (math.nan, math.nan, math.nan)


class LockReason(StrEnum):
    """Why a frame gave no accepted position. Each code is logged and shown to the operator."""

    NO_CANDIDATES = "no_candidates"  # nothing seed-like in a view's search region
    SCORE_TOO_LOW = "score_too_low"  # seed-like blobs, but not confident enough
    TOO_FEW_SEEDS = "too_few_seeds"  # fewer seeds found than the minimum for a lock
    RAY_DISTANCE = "ray_distance_too_large"  # no candidates whose rays meet in 3-D
    INTER_SEED_DISTANCE = "inter_seed_distance_mismatch"  # no subset matches the plan
    AMBIGUOUS = "ambiguous_assignment"  # two correspondences fit, different targets
    OUTSIDE_SEARCH_REGION = "outside_search_region"  # target too far from the prediction
    ROTATION_TOO_LARGE = "rotation_too_large"  # fitted rotation beyond the limit
    FIT_RESIDUAL = "fit_residual_too_large"  # rigid fit / reprojection residual too large
    SEED_SHAPE = "seed_length_mismatch"  # an elongated marker truncated or merged in a view
    NO_PRIOR = "no_prior"  # mono needs a learned 3-D Gaussian of recent positions or a prediction
    OUTSIDE_FIELD_OF_VIEW = "outside_field_of_view"  # predicted seeds off the panel


# -- plan, prior, settings, results -----------------------------------------------------------


def _vec3(value: Any, name: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    if a.shape != (3,) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be 3 finite numbers (LR, SI, AP), got {value!r}")
    return a


@dataclass(frozen=True)
class SeedPlan:
    """The planned seed constellation: positions relative to the target point (IEC mm).

    ``seeds_mm[i]`` is seed i's centre minus the target point at planning orientation; the
    target point (the origin of the plan frame) is what `Localisation.position_mm` reports.
    Use the constellation's centroid as origin (subtract it) to track the seed centroid.
    ``seed_diameter_mm`` / ``seed_length_mm``: one value for every seed or one per seed
    (e.g. 1 x 3 mm solid seeds and a 0.35 x 10 mm coiled marker); detection filters at the
    thinnest diameter and searches around each seed with its own half-length.
    """

    seeds_mm: tuple[tuple[float, float, float], ...]
    seed_diameter_mm: float | tuple[float, ...] = 1.0
    seed_length_mm: float | tuple[float, ...] = 3.0

    def __post_init__(self) -> None:
        try:
            seeds = np.asarray(self.seeds_mm, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"seeds_mm must be a list of (LR, SI, AP) mm: {exc}") from None
        if seeds.ndim != 2 or seeds.shape[1] != 3 or len(seeds) < 1:
            raise ValueError(f"seeds_mm must have shape (N >= 1, 3), got {seeds.shape}")
        if not np.isfinite(seeds).all():
            raise ValueError("seeds_mm must be finite")
        d = np.linalg.norm(seeds[:, None] - seeds[None], axis=2)
        if len(seeds) > 1 and d[np.triu_indices(len(seeds), 1)].min() < 1.0:
            raise ValueError("seeds_mm has two seeds closer than 1 mm (a duplicate?)")
        object.__setattr__(self, "seeds_mm", tuple(tuple(map(float, s)) for s in seeds))
        for name in ("seed_diameter_mm", "seed_length_mm"):
            value = getattr(self, name)
            try:
                arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (len(seeds),))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{name} must be a positive number or one per seed, got {value!r}"
                ) from None
            if not (np.isfinite(arr).all() and (arr > 0).all()):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
            object.__setattr__(self, name, tuple(map(float, arr)))
        if any(ln < dm for ln, dm in zip(self.seed_length_mm, self.seed_diameter_mm, strict=True)):
            raise ValueError("seed_length_mm must be >= seed_diameter_mm for every seed")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> SeedPlan:
        """From a config mapping: ``seeds_mm`` (list of [LR, SI, AP]) and optionally
        ``seed_diameter_mm``, ``seed_length_mm`` (a number or one per seed);
        ``centre_on_centroid = true`` makes the seed centroid the target point."""
        if "seeds_mm" not in section:
            raise ValueError("seed plan: 'seeds_mm' is missing")
        seeds = np.asarray(section["seeds_mm"], dtype=np.float64)
        if section.get("centre_on_centroid", False) and seeds.ndim == 2 and len(seeds):
            seeds = seeds - seeds.mean(axis=0)
        return cls(
            seeds_mm=tuple(map(tuple, seeds)) if seeds.ndim == 2 else section["seeds_mm"],
            seed_diameter_mm=section.get("seed_diameter_mm", 1.0),
            seed_length_mm=section.get("seed_length_mm", 3.0),
        )

    @property
    def points(self) -> np.ndarray:
        return np.asarray(self.seeds_mm, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.seeds_mm)


@dataclass(frozen=True)
class TargetPrior:
    """What is known of the target before this frame. Immutable: ``update`` and
    ``with_prediction`` return new priors.

    ``mean_mm`` / ``cov_mm2``: running mean and (population) covariance of the last accepted
    3-D positions -- exact for the first ``window`` samples, then exponentially forgetting
    with weight ``1 / window`` per sample. ``predicted_mm`` / ``predicted_sigma_mm``: the
    tracker's prediction at this frame's time and its 1-sigma (per axis), used to place the
    search regions; when absent the running mean and the largest standard deviation of
    the covariance are used. ``rotation_deg``: the last accepted rotation (mono uses it).
    """

    mean_mm: tuple[float, float, float] = _NAN3
    cov_mm2: tuple[tuple[float, float, float], ...] = ((0.0,) * 3,) * 3
    n: int = 0
    window: int = 100
    predicted_mm: tuple[float, float, float] | None = None
    predicted_sigma_mm: float = math.nan
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.predicted_mm is not None:
            _vec3(self.predicted_mm, "predicted_mm")
            s = self.predicted_sigma_mm
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"predicted_sigma_mm must be finite and >= 0, got {s!r}")

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.mean_mm, dtype=np.float64)

    @property
    def cov(self) -> np.ndarray:
        return np.asarray(self.cov_mm2, dtype=np.float64)

    def update(
        self, position_mm: Any, rotation_deg: Any | None = None
    ) -> TargetPrior:  # pure: a new prior
        x = _vec3(position_mm, "position_mm")
        if self.n == 0:
            mean, cov = x, np.zeros((3, 3))
        else:
            alpha = max(1.0 / (self.n + 1), 1.0 / self.window)
            delta = x - self.mean
            mean = self.mean + alpha * delta
            cov = (1.0 - alpha) * (self.cov + alpha * np.outer(delta, delta))
        rot = self.rotation_deg
        if rotation_deg is not None and np.isfinite(np.asarray(rotation_deg, float)).all():
            rot = tuple(map(float, _vec3(rotation_deg, "rotation_deg")))
        return TargetPrior(
            mean_mm=tuple(map(float, mean)),
            cov_mm2=tuple(tuple(map(float, row)) for row in cov),
            n=self.n + 1,
            window=self.window,
            predicted_mm=self.predicted_mm,
            predicted_sigma_mm=self.predicted_sigma_mm,
            rotation_deg=rot,
        )

    def with_prediction(self, predicted_mm: Any, sigma_mm: float) -> TargetPrior:
        return TargetPrior(
            mean_mm=self.mean_mm,
            cov_mm2=self.cov_mm2,
            n=self.n,
            window=self.window,
            predicted_mm=tuple(map(float, _vec3(predicted_mm, "predicted_mm"))),
            predicted_sigma_mm=float(sigma_mm),
            rotation_deg=self.rotation_deg,
        )

    def mono_gaussian(self, min_samples: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, covariance) of the 3-D Gaussian a mono localisation maximises under: the
        learned one once ``min_samples`` positions have been accepted, else the tracker's
        prediction (isotropic, its 1-sigma), else None. The prediction is what a mono session
        starts from: the prior correlation model (``tracking.use_prior``, the planning 4D-CT's
        surrogate-to-target fit) gives one before any X-ray position exists, as KIM starts
        from the pre-treatment CBCT (see ``motionctl.imaging.frame_prior``)."""
        if self.n >= min_samples:
            return self.mean, self.cov
        if self.predicted_mm is not None:
            return (
                np.asarray(self.predicted_mm, float),
                self.predicted_sigma_mm**2 * np.eye(3),
            )
        return None

    def search_centre(self) -> tuple[np.ndarray, float] | None:
        """(centre mm, 1-sigma mm) for the search regions, or None (search the full frame)."""
        if self.predicted_mm is not None:
            return np.asarray(self.predicted_mm, float), float(self.predicted_sigma_mm)
        if self.n >= 1:
            sd = math.sqrt(max(float(np.linalg.eigvalsh(self.cov).max()), 0.0))
            return self.mean, sd
        return None


@dataclass(frozen=True)
class LocaliserSettings:
    """Thresholds of detection and of the lock checks (defaults tuned on the simulator)."""

    polarity: str = "dark"  # "dark": seeds darker than background (raw counts)
    min_score: float = 6.0  # candidate peak contrast-to-noise for use in a lock
    candidate_score: float = 5.0  # lower bar: seen, reported, counted for "score_too_low"
    max_candidates: int = 12  # per view in the search regions, best scores kept
    max_candidates_full: int = 40  # per view in a full-frame search (no prior position)
    max_ray_distance_mm: float = 1.0  # stereo: rays of one seed must pass this close
    distance_tolerance_mm: float = 1.5  # inter-seed distance vs plan
    max_fit_residual_mm: float = 1.0  # RMS of the rigid fit (stereo)
    min_seeds: int = 3  # fewer planned seeds than this: all of them are required
    max_rotation_deg: float = 15.0  # largest rotation of the constellation accepted
    search_sigmas: float = 3.0  # search radius = this many prediction sigmas (+ margins)
    search_margin_mm: float = 2.0  # + this, + the seed half-length, + rotation lever arm
    search_rotation_deg: float = 5.0  # rotation allowed for in the search radius
    gate_sigmas: float = 5.0  # target further than this many sigmas (+margin): rejected
    pixel_sigma_px: float = 0.3  # 1-sigma of a detected centre (for uncertainties / chi2)
    ambiguity_mm: float = 1.0  # alternative fits whose targets differ by more: ambiguous
    ambiguity_chi2: float = 9.0  # ... when their chi-square is within this of the best
    mono_min_samples: int = 10  # accepted positions before the Gaussian prior is trusted
    mono_sparse_sd_mm: float = 5.0  # mono, fewer and no estimate: their mean, this 1-sigma
    prior_floor_mm: float = 0.5  # added to the prior's standard deviations (model error)
    max_reprojection_mm: float = 1.0  # mono: seed reprojection residual at the seed


@dataclass(frozen=True)
class Detection2D:
    """A seed candidate in one projection (pixel coordinates: x = column, y = row)."""

    x_px: float
    y_px: float
    score: float  # peak contrast-to-noise ratio (top-hat / local noise)
    angle_deg: float  # image-plane orientation of the long axis, from +x towards +y
    length_px: float  # end to end: edge-to-edge if elongated, else sqrt(12) x SD along
    width_px: float  # across: sqrt(12) x the second-moment SD across the axis
    area_px: int  # pixels of the component (above the hysteresis threshold)

    @property
    def xy(self) -> np.ndarray:
        return np.array((self.x_px, self.y_px))


@dataclass(frozen=True)
class StereoPair:
    """Candidate ``ia`` of view a and ``ib`` of view b, triangulated."""

    ia: int
    ib: int
    point_mm: np.ndarray  # midpoint of the rays' closest approach
    ray_distance_mm: float
    epipolar_px: float  # distance of candidate b from candidate a's epipolar line (px)


@dataclass(frozen=True)
class Localisation:
    """The result of one frame (stereo pair or single view). See the module docstring."""

    t: float
    accepted: bool
    mode: str  # "stereo" | "mono"
    reason: str | None = None  # a LockReason code when rejected
    detail: str = ""
    position_mm: tuple[float, float, float] = _NAN3
    rotation_deg: tuple[float, float, float] = _NAN3
    seeds_mm: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))
    n_seeds: int = 0
    residual_mm: float = math.nan
    uncertainty_mm: float = math.nan
    seeds_px: tuple[np.ndarray, ...] = ()
    candidates: tuple[tuple[Detection2D, ...], ...] = ()

    def __post_init__(self) -> None:
        for name in ("seeds_mm",):
            a = np.array(getattr(self, name), dtype=np.float64)
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        views = []
        for px in self.seeds_px:
            a = np.array(px, dtype=np.float64)
            a.setflags(write=False)
            views.append(a)
        object.__setattr__(self, "seeds_px", tuple(views))


# -- geometry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geom:
    source: np.ndarray
    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    normal: np.ndarray  # unit normal of the panel
    pinv: np.ndarray  # (2, 3): panel offset -> (i, j)
    width: int
    height: int
    pitch: float  # mean pixel pitch at the panel, mm
    source_to_panel: float  # perpendicular distance, mm


def _build_geom(g: ProjectionGeometry) -> _Geom:
    if not isinstance(g, ProjectionGeometry):
        raise ValueError(f"geometry must be a ProjectionGeometry, got {type(g).__name__}")
    vecs = {}
    for name in ("source_mm", "panel_origin_mm", "panel_u_mm", "panel_v_mm"):
        try:
            a = np.asarray(getattr(g, name), dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"geometry {g.imager!r}: {name} is not numeric") from None
        if a.shape != (3,) or not np.isfinite(a).all():
            raise ValueError(f"geometry {g.imager!r}: {name} must be 3 finite numbers, got {a}")
        vecs[name] = a
    for name in ("width_px", "height_px"):
        value = getattr(g, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"geometry {g.imager!r}: {name} must be a positive integer")
    u, v = vecs["panel_u_mm"], vecs["panel_v_mm"]
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu < 1e-6 or nv < 1e-6:
        raise ValueError(f"geometry {g.imager!r}: zero pixel step")
    n = np.cross(u, v)
    if np.linalg.norm(n) < 1e-3 * nu * nv:
        raise ValueError(f"geometry {g.imager!r}: panel_u_mm and panel_v_mm are parallel")
    n = n / np.linalg.norm(n)
    dist = float(np.dot(vecs["panel_origin_mm"] - vecs["source_mm"], n))
    if abs(dist) < 1.0:
        raise ValueError(f"geometry {g.imager!r}: the source lies on the panel plane")
    if dist < 0:
        n, dist = -n, -dist
    m = np.stack([u, v], axis=1)  # (3, 2)
    return _Geom(
        source=vecs["source_mm"],
        origin=vecs["panel_origin_mm"],
        u=u,
        v=v,
        normal=n,
        pinv=np.linalg.pinv(m),
        width=int(g.width_px),
        height=int(g.height_px),
        pitch=float(math.sqrt(nu * nv)),
        source_to_panel=dist,
    )


@functools.lru_cache(maxsize=128)
def _geom_cached(g: ProjectionGeometry) -> _Geom:
    return _build_geom(g)


def _geom(g: ProjectionGeometry) -> _Geom:
    try:
        return _geom_cached(g)
    except TypeError:  # unhashable contents (lists): validate without the cache
        return _build_geom(g)


def project_points(geometry: ProjectionGeometry, points_mm: Any) -> np.ndarray:
    """Pixel coordinates (N, 2) = (column, row) of 3-D points (N, 3); NaN for a point at or
    behind the source plane."""
    g = _geom(geometry)
    p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    d = p - g.source
    denom = d @ g.normal
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(denom > 1e-9, g.source_to_panel / denom, np.nan)
    x = g.source + s[:, None] * d
    return (x - g.origin) @ g.pinv.T


def pixel_rays(geometry: ProjectionGeometry, px: Any) -> tuple[np.ndarray, np.ndarray]:
    """The source point (3,) and unit directions (N, 3) of the rays through pixels (N, 2)."""
    g = _geom(geometry)
    p = np.asarray(px, dtype=np.float64).reshape(-1, 2)
    x = g.origin + p[:, :1] * g.u + p[:, 1:2] * g.v
    d = x - g.source
    return g.source, d / np.linalg.norm(d, axis=1, keepdims=True)


def magnification(geometry: ProjectionGeometry, points_mm: Any) -> np.ndarray:
    """Source-to-panel over source-to-point distance (along the panel normal), per point."""
    g = _geom(geometry)
    p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    return g.source_to_panel / ((p - g.source) @ g.normal)


def pixel_pitch_mm(geometry: ProjectionGeometry) -> float:
    """Geometric mean of the pixel steps at the panel (mm)."""
    return _geom(geometry).pitch


def ray_ray_closest(
    s1: np.ndarray, d1: np.ndarray, s2: np.ndarray, d2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closest approach of lines ``s1 + a d1`` and ``s2 + b d2`` (broadcasting over leading
    axes of the unit directions). Returns (midpoint, distance, a, b)."""
    w = s1 - s2
    b = np.sum(d1 * d2, axis=-1)
    d = np.sum(d1 * w, axis=-1)
    e = np.sum(d2 * w, axis=-1)
    denom = np.maximum(1.0 - b * b, 1e-12)
    a1 = (b * e - d) / denom
    b2 = (e - b * d) / denom
    p1 = s1 + a1[..., None] * d1
    p2 = s2 + b2[..., None] * d2
    return 0.5 * (p1 + p2), np.linalg.norm(p1 - p2, axis=-1), a1, b2


def triangulate(
    sources: Any, directions: Any, sigmas_mm: Any | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares intersection of V >= 2 rays (sources (V, 3), directions (V, 3)).

    Minimises ``sum_v |(I - d_v d_v^T)(P - s_v)|^2 / sigma_v^2``; for two equally weighted
    rays this is the midpoint of their closest approach. Returns the point, its covariance
    ``(sum_v (I - d_v d_v^T) / sigma_v^2)^-1`` (mm^2, for lateral 1-sigmas ``sigmas_mm``,
    default 1) and the largest distance of the point from a ray.
    """
    s = np.asarray(sources, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    if len(d) < 2 or len(s) != len(d):
        raise ValueError("triangulate needs >= 2 rays with one source each")
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    sig = np.ones(len(d)) if sigmas_mm is None else np.broadcast_to(sigmas_mm, (len(d),))
    proj = np.eye(3)[None] - d[:, :, None] * d[:, None, :]  # (V, 3, 3)
    w = proj / (np.asarray(sig, float) ** 2)[:, None, None]
    a = w.sum(axis=0)
    if np.linalg.cond(a) > 1e12:
        raise ValueError("triangulate: the rays are parallel")
    point = np.linalg.solve(a, np.einsum("vij,vj->i", w, s))
    off = np.einsum("vij,vj->vi", proj, point - s)
    return point, np.linalg.inv(a), float(np.linalg.norm(off, axis=1).max())


def epipolar_distance_px(
    geom_a: ProjectionGeometry, px_a: Any, geom_b: ProjectionGeometry, px_b: Any
) -> np.ndarray:
    """Distance (px in view b) of each ``px_b`` from the epipolar line of each ``px_a``:
    matrix (len(px_a), len(px_b))."""
    sa, da = pixel_rays(geom_a, px_a)
    ga = _geom(geom_a)
    gb = _geom(geom_b)
    pb = np.asarray(px_b, dtype=np.float64).reshape(-1, 2)
    # two points on each ray a, around the isocentre depth of view b's source
    depth = np.linalg.norm(gb.source - sa) * 0.5 + np.linalg.norm(ga.source) * 0.5
    e1 = project_points(geom_b, sa + da * (depth - 100.0))
    e2 = project_points(geom_b, sa + da * (depth + 100.0))
    line = e2 - e1
    line /= np.maximum(np.linalg.norm(line, axis=1, keepdims=True), 1e-12)
    rel = pb[None, :, :] - e1[:, None, :]
    cross = rel[..., 0] * line[:, None, 1] - rel[..., 1] * line[:, None, 0]
    return np.abs(cross)


def fit_rigid(plan_points: Any, detected: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Kabsch (Umeyama without scale): R, t minimising ``sum |R p_i + t - q_i|^2``.

    Returns (R (3, 3), t (3,), RMS residual mm). With fewer than 3 points (or collinear
    ones) the rotation is undetermined: R = I and t = mean(q - p), translation only.
    """
    p = np.asarray(plan_points, dtype=np.float64).reshape(-1, 3)
    q = np.asarray(detected, dtype=np.float64).reshape(-1, 3)
    if len(p) != len(q) or len(p) == 0:
        raise ValueError("fit_rigid needs equal, non-zero numbers of points")
    pc, qc = p.mean(axis=0), q.mean(axis=0)
    r = np.eye(3)
    if len(p) >= 3:
        h = (p - pc).T @ (q - qc)
        sv = np.linalg.svd(p - pc, compute_uv=False)
        if sv[1] > 1e-6 * max(sv[0], 1e-12):  # not collinear
            uu, _, vt = np.linalg.svd(h)
            sign = np.sign(np.linalg.det(vt.T @ uu.T)) or 1.0
            r = vt.T @ np.diag([1.0, 1.0, sign]) @ uu.T
    t = qc - r @ pc
    res = q - (p @ r.T + t)
    return r, t, float(np.sqrt(np.mean(np.sum(res**2, axis=1))))


def rotation_deg(r: np.ndarray) -> tuple[float, float, float]:
    """Angles (degrees) about LR, SI, AP of R = Rz(AP) Ry(SI) Rx(LR) (extrinsic x-y-z)."""
    angles = Rotation.from_matrix(np.asarray(r, dtype=np.float64)).as_euler("xyz", degrees=True)
    return tuple(float(a) for a in angles)


def _rotation_angle_deg(r: np.ndarray) -> float:
    return float(math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0)))))


# -- detection ----------------------------------------------------------------------------------


def _check_image(image: Any, g: _Geom, name: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (height, width), got shape {a.shape}")
    if a.shape != (g.height, g.width):
        raise ValueError(
            f"{name} has shape {a.shape}, the geometry says (height, width) = "
            f"({g.height}, {g.width})"
        )
    if a.dtype.kind not in "uif":
        raise ValueError(f"{name} must be numeric (uint16 or float), got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def detect_candidates(
    image: Any,
    geometry: ProjectionGeometry,
    *,
    search_center_px: Any | None = None,
    search_radius_px: Any | None = None,
    seed_diameter_mm: float | Sequence[float] = 1.0,
    seed_length_mm: float | Sequence[float] = 3.0,
    magnification_at_seed: float | None = None,
    polarity: str = "dark",
    min_score: float = 5.0,
    max_candidates: int = 12,
) -> list[Detection2D]:
    """Seed candidates in one projection, best score first (see the module docstring).

    ``magnification_at_seed`` defaults to the geometry's magnification at the isocentre.
    ``search_center_px`` / ``search_radius_px``: one disc ((2,), scalar) or several
    ((K, 2), scalar or (K,)); None: the whole frame.
    """
    g = _geom(geometry)
    img = _check_image(image, g)
    if polarity not in ("dark", "bright"):
        raise ValueError(f"polarity must be 'dark' or 'bright', got {polarity!r}")
    mag = magnification_at_seed
    if mag is None:
        mag = float(magnification(geometry, np.zeros(3))[0])
    diameters = np.atleast_1d(np.asarray(seed_diameter_mm, dtype=np.float64))
    lengths = np.atleast_1d(np.asarray(seed_length_mm, dtype=np.float64))
    if not (np.isfinite(diameters).all() and (diameters > 0).all() and np.isfinite(lengths).all()):
        raise ValueError("seed diameters must be positive and lengths finite")
    if not (math.isfinite(mag) and mag > 0):
        raise ValueError(f"magnification_at_seed must be positive, got {mag!r}")
    w_min = float(diameters.min()) * mag / g.pitch  # thinnest seed, px
    w_max = float(diameters.max()) * mag / g.pitch
    l_max = float(lengths.max()) * mag / g.pitch
    sigma1 = max(0.7, 0.35 * w_min)  # smoothing matched to the thinnest seed
    k_open = int(round(w_max + 5.0)) | 1  # opening disc: wider than any seed (+ blur)
    max_length = 1.25 * l_max + 2.0 * w_max + 6.0  # longer components are not seeds
    max_width = 1.6 * w_max + 4.0  # wider ones neither (ribs, edges, bowel gas)
    reach = k_open + int(math.ceil(3.0 * sigma1)) + 2

    # region of interest: bounding box of the search discs, padded by the filter's reach
    centres = radii = None
    if search_center_px is not None:
        centres = np.asarray(search_center_px, dtype=np.float64).reshape(-1, 2)
        if search_radius_px is None:
            raise ValueError("search_radius_px is required with search_center_px")
        radii = np.broadcast_to(np.asarray(search_radius_px, dtype=np.float64), (len(centres),))
        if not (np.isfinite(centres).all() and np.isfinite(radii).all() and (radii > 0).all()):
            raise ValueError("search region: centres and radii must be finite, radii > 0")
        x0 = int(math.floor((centres[:, 0] - radii).min())) - reach
        x1 = int(math.ceil((centres[:, 0] + radii).max())) + reach + 1
        y0 = int(math.floor((centres[:, 1] - radii).min())) - reach
        y1 = int(math.ceil((centres[:, 1] + radii).max())) + reach + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, g.width), min(y1, g.height)
        if x1 - x0 < 2 * k_open or y1 - y0 < 2 * k_open:
            return []
    else:
        x0, y0, x1, y1 = 0, 0, g.width, g.height
    roi = img[y0:y1, x0:x1].astype(np.float32)
    if polarity == "dark":  # transmission: work on attenuation, -log(I), gold is positive
        att = -cv2.log(np.maximum(roi, 1.0))
    else:
        att = roi
    z, smooth = _tophat_cnr(att, sigma1, k_open)
    low = max(2.5, 0.4 * min_score)
    mask = (z >= low).astype(np.uint8)
    n_lab, labels, stats, comp_centres = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n_lab <= 1:
        return []
    ids = np.unique(labels[z >= min_score])
    ids = ids[ids > 0]
    grow = max(2, int(round(2.0 * sigma1)))
    across = 0.5 * w_max + 3.0 + sigma1  # background samples this far across the axis
    pad = grow + int(math.ceil(across)) + 3
    inner_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    min_area = max(2, int(0.25 * w_min * w_min))
    max_area = int(1.5 * (l_max + 2 * grow) * (w_max + 2 * grow)) + 20
    # no upper size limit here: a seed merged with a rib edge is split below
    ids = ids[stats[ids, cv2.CC_STAT_AREA] >= min_area]
    if centres is not None and len(ids):  # components that cannot end up in a disc
        cc = comp_centres[ids] + (x0, y0)
        extent = np.hypot(stats[ids, cv2.CC_STAT_WIDTH], stats[ids, cv2.CC_STAT_HEIGHT])
        gap = np.min(
            np.hypot(cc[:, None, 0] - centres[None, :, 0], cc[:, None, 1] - centres[None, :, 1])
            - radii[None, :],
            axis=1,
        )
        ids = ids[gap <= 0.5 * extent + 2.0]
    if len(ids) == 0:
        return []
    # peak CNR per component, from the few pixels above min_score: strongest first
    hot = np.flatnonzero(z >= min_score)
    hot = hot[np.argsort(-z.flat[hot])]
    hot_labels, first = np.unique(labels.flat[hot], return_index=True)
    keep = np.isin(hot_labels, ids)
    order = np.argsort(first[keep])[: 2 * max_candidates + 16]
    cand_ids = hot_labels[keep][order]
    found: list[Detection2D] = []
    h, w = z.shape
    limits = (max_length, max_width, min_area, max_area)
    for group in _link_fragments(labels, stats, cand_ids, max_length, w_max, z, 0.4 * low):
        bx = min(int(stats[g, cv2.CC_STAT_LEFT]) for g in group)
        by = min(int(stats[g, cv2.CC_STAT_TOP]) for g in group)
        bx1 = max(int(stats[g, cv2.CC_STAT_LEFT] + stats[g, cv2.CC_STAT_WIDTH]) for g in group)
        by1 = max(int(stats[g, cv2.CC_STAT_TOP] + stats[g, cv2.CC_STAT_HEIGHT]) for g in group)
        ax0, ay0 = max(bx - pad, 0), max(by - pad, 0)
        ax1, ay1 = min(bx1 + pad, w), min(by1 + pad, h)
        sub_z = z[ay0:ay1, ax0:ax1]
        sub_lab = np.isin(labels[ay0:ay1, ax0:ax1], group)
        for part, peak in _split_component(
            sub_lab, sub_z, low, min_score, limits, 0.5 * w_max + 2.0
        ):
            wts, _ = _seed_signal(smooth[ay0:ay1, ax0:ax1], part, inner_k, across)
            det = _refine(wts, peak, int(part.sum()), limits)
            if det is None:
                continue
            x_full, y_full = det.x_px + ax0 + x0, det.y_px + ay0 + y0
            if centres is not None:
                dist = np.hypot(centres[:, 0] - x_full, centres[:, 1] - y_full)
                if not (dist <= radii).any():
                    continue
            found.append(
                Detection2D(
                    x_full,
                    y_full,
                    det.score,
                    det.angle_deg,
                    det.length_px,
                    det.width_px,
                    det.area_px,
                )
            )
        if len(found) >= max_candidates:
            break
    found.sort(key=lambda d: -d.score)
    return found[:max_candidates]


def _link_fragments(
    labels: np.ndarray,
    stats: np.ndarray,
    ids: np.ndarray,
    max_length: float,
    w_max: float,
    z: np.ndarray,
    gap_level: float,
) -> list[list[int]]:
    """Group candidate components that are fragments of one elongated marker (noise cut a
    faint coil): an elongated component and another one on its axis line (within 15 deg and
    0.5 x seed width + 1.5 px of it), their facing ends at most 6 px apart, signal in the
    gap (median CNR between them >= ``gap_level``: a coil dipping below the threshold, not
    background) and the union no longer than a marker. Two compact blobs are never joined
    (two seeds side by side). Groups keep the order of ``ids`` (strongest first)."""
    n = len(ids)
    if n < 2:
        return [[int(i)] for i in ids]
    cen = np.zeros((n, 2))
    axis = np.zeros(n)
    length = np.zeros(n)
    elongated = np.zeros(n, dtype=bool)
    for k, lab in enumerate(ids):
        x, y, bw, bh, _ = (int(v) for v in stats[lab])
        mom = cv2.moments((labels[y : y + bh, x : x + bw] == lab).astype(np.uint8), True)
        cen[k] = x + mom["m10"] / mom["m00"], y + mom["m01"] / mom["m00"]
        lam1, lam2, axis[k] = _moment_axes(mom)
        length[k] = math.sqrt(12.0 * lam1) + 1.0
        elongated[k] = length[k] > 1.5 * (math.sqrt(12.0 * lam2) + 1.0) + 2.0
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    dist = np.linalg.norm(cen[:, None] - cen[None], axis=2)
    reach = 0.5 * (length[:, None] + length[None]) + 6.0
    near = np.argwhere(np.triu(dist <= reach, 1))
    for i, j in near:
        if not (elongated[i] or elongated[j]):
            continue
        d = dist[i, j]
        if d + 0.5 * (length[i] + length[j]) > max_length:
            continue
        u = (cen[j] - cen[i]) / max(d, 1e-9)
        ok = True
        for k, other in ((i, j), (j, i)):
            if not elongated[k]:
                continue
            a = np.array([math.cos(axis[k]), math.sin(axis[k])])
            off = cen[other] - cen[k]
            if abs(u[0] * a[1] - u[1] * a[0]) > 0.26 or abs(off[0] * a[1] - off[1] * a[0]) > (
                0.5 * w_max + 1.5
            ):
                ok = False
        if ok:
            steps = np.linspace(0.0, 1.0, max(3, int(d * 2)))
            xs = np.rint(cen[i, 0] + steps * (cen[j, 0] - cen[i, 0])).astype(int)
            ys = np.rint(cen[i, 1] + steps * (cen[j, 1] - cen[i, 1])).astype(int)
            between = ~np.isin(labels[ys, xs], (ids[i], ids[j]))
            if between.any() and float(np.median(z[ys[between], xs[between]])) < gap_level:
                ok = False
        if ok:
            parent[root(int(j))] = root(int(i))
    groups: dict[int, list[int]] = {}
    for k in range(n):
        groups.setdefault(root(k), []).append(int(ids[k]))
    return sorted(groups.values(), key=lambda g: list(ids).index(g[0]))


def _moment_axes(mom: Mapping[str, float]) -> tuple[float, float, float]:
    """(major variance, minor variance, angle of the major axis) from cv2.moments."""
    m00 = mom["m00"]
    if m00 <= 0:
        return 0.0, 0.0, 0.0
    cxx, cyy, cxy = mom["mu20"] / m00, mom["mu02"] / m00, mom["mu11"] / m00
    half_tr = 0.5 * (cxx + cyy)
    disc = math.sqrt(max(0.25 * (cxx - cyy) ** 2 + cxy * cxy, 0.0))
    return half_tr + disc, max(half_tr - disc, 0.0), 0.5 * math.atan2(2.0 * cxy, cxx - cyy)


def _mask_shape(mask: np.ndarray) -> tuple[float, float]:
    """(length, width) of a pixel set: 4 x the square roots of its second-moment
    eigenvalues (for a uniform bar of length L: ~1.15 L)."""
    lam1, lam2, _ = _moment_axes(cv2.moments(mask.astype(np.uint8), True))
    return 4.0 * math.sqrt(lam1) + 1.0, 4.0 * math.sqrt(lam2) + 1.0


def _split_component(
    mask: np.ndarray,
    z: np.ndarray,
    low: float,
    min_score: float,
    limits: tuple[float, float, int, int],
    half_width: float,
) -> list[tuple[np.ndarray, float]]:
    """The seed-shaped parts of one connected component, with their peak CNR.

    A component that is too long, too wide or too big for a seed (a seed touching a rib
    edge or another seed) is re-thresholded inside at 30, 50 and 70 % of its peak; the first
    level that gives seed-shaped parts (each with a pixel >= min_score) wins, and each part
    is grown back over the component's pixels within ``half_width`` of its axis (so that
    the faint end of a coil is not lost to the split, and the edge it touched stays out)."""
    max_length, max_width, min_area, max_area = limits
    peak = float(z[mask].max())

    def fits(part: np.ndarray) -> bool:
        n = int(part.sum())
        if n < min_area or n > max_area:
            return False
        length, width = _mask_shape(part)
        return length <= 1.2 * max_length and width <= max_width

    if fits(mask):
        return [(mask.astype(np.uint8), peak)]
    for frac in (0.3, 0.5, 0.7):
        level = max(low, frac * peak)
        if level >= peak:
            break
        sub = (mask & (z >= level)).astype(np.uint8)
        n, lab = cv2.connectedComponents(sub, connectivity=8)
        parts = []
        for i in range(1, n):
            part = lab == i
            part_peak = float(z[part].max())
            if part_peak < min_score or not fits(part):
                continue
            parts.append((_regrow(part, mask, lab, i, half_width, max_length, fits), part_peak))
        if parts:
            return parts
    return []


def _regrow(
    part: np.ndarray,
    mask: np.ndarray,
    lab: np.ndarray,
    index: int,
    half_width: float,
    max_length: float,
    fits: Any,
) -> np.ndarray:
    """An elongated part (a coil fragment after a split) grown back over the component's
    pixels within ``half_width`` of its axis and ``0.6 x max_length`` of its centre, never
    into another part; compact parts (and growths that are not seed-shaped) unchanged."""
    py, px = np.nonzero(part)
    length, width = _mask_shape(part)
    if len(px) < 2 or length <= 1.5 * width + 2.0:
        return part.astype(np.uint8)
    cx, cy = px.mean(), py.mean()
    cov = np.cov(np.stack([px, py]).astype(np.float64))
    theta = 0.5 * math.atan2(2.0 * cov[0, 1], cov[0, 0] - cov[1, 1])
    my, mx = np.nonzero(mask)
    free = (lab[my, mx] == 0) | (lab[my, mx] == index)
    perp = np.abs((mx - cx) * -math.sin(theta) + (my - cy) * math.cos(theta))
    along = np.abs((mx - cx) * math.cos(theta) + (my - cy) * math.sin(theta))
    inside = free & (perp <= half_width) & (along <= 0.6 * max_length)
    band = np.zeros(mask.shape, dtype=np.uint8)
    band[my[inside], mx[inside]] = 1
    _, band_lab = cv2.connectedComponents(band, connectivity=8)
    grown = band_lab == band_lab[py[0], px[0]]
    return (grown if fits(grown) else part).astype(np.uint8)


def _refine(
    wts: np.ndarray, peak: float, area: int, limits: tuple[float, float, int, int]
) -> Detection2D | None:
    """Sub-pixel centre, orientation and size of one part from its background-free signal
    (patch coordinates), or None when it is not seed-shaped."""
    max_length, max_width, _, _ = limits
    total = float(wts.sum())
    if total <= 0:
        return None
    ys, xs = np.mgrid[0 : wts.shape[0], 0 : wts.shape[1]]
    cx = float((wts * xs).sum() / total)
    cy = float((wts * ys).sum() / total)
    dx, dy = xs - cx, ys - cy
    mxx = float((wts * dx * dx).sum() / total)
    myy = float((wts * dy * dy).sum() / total)
    mxy = float((wts * dx * dy).sum() / total)
    tr, det = mxx + myy, mxx * myy - mxy * mxy
    disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
    lam1, lam2 = tr / 2 + disc, max(tr / 2 - disc, 0.0)
    length, width = 4.0 * math.sqrt(lam1), 4.0 * math.sqrt(lam2)
    if length > max_length or width > max_width:
        return None
    phi = 0.5 * math.atan2(2 * mxy, mxx - myy)
    # lengths: sqrt(12) x the second-moment SD (the length of a uniform bar)
    end_to_end = math.sqrt(12.0 * lam1)
    if length > 1.5 * width + 2.0:  # elongated: centre = midpoint of the half-max ends
        cx, cy, fwhm = _axis_midpoint(wts, cx, cy, phi, length, width)
        end_to_end = fwhm if fwhm > 0 else end_to_end
    return Detection2D(
        cx, cy, float(peak), math.degrees(phi), end_to_end, math.sqrt(12.0 * lam2), area
    )


def _axis_midpoint(
    wts: np.ndarray, cx: float, cy: float, phi: float, length: float, width: float
) -> tuple[float, float, float]:
    """Centre of an elongated candidate: along its axis, the midpoint of its two ends, each
    at the steepest rise / fall of the across-summed signal profile (robust to a contrast
    that varies along the marker, e.g. a coil crossing a rib edge); across, the centroid.
    Returns (x, y, end-to-end length); length 0 and the centroid when the ends are unclear."""
    ux, uy = math.cos(phi), math.sin(phi)
    half_len = 0.5 * length + 4.0
    half_wid = 0.5 * width + 2.0
    t = np.arange(-half_len, half_len + 0.25, 0.5, dtype=np.float32)
    s = np.arange(-half_wid, half_wid + 0.25, 0.5, dtype=np.float32)
    tt, ss = np.meshgrid(t, s)  # (across, along)
    map_x = (cx + tt * ux - ss * uy).astype(np.float32)
    map_y = (cy + tt * uy + ss * ux).astype(np.float32)
    samples = cv2.remap(
        wts.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    profile = samples.sum(axis=0).astype(np.float64)
    peak = float(profile.max())
    if peak <= 0:
        return cx, cy, 0.0
    # each end at the steepest rise / fall of the profile near it: the half-maximum of a
    # blurred end, independent of the plateau level (the contrast of a coil may differ
    # between its ends: background curvature across a rib edge) and of a faint structure
    # touching an end (a gentle tail, not a step)
    # near the coarse ends: the outermost samples at half the median plateau
    plateau = float(np.median(profile[profile > 0.25 * peak]))
    above = np.nonzero(profile >= 0.5 * plateau)[0]
    a0, a1 = int(above[0]), int(above[-1])
    if a1 - a0 < 12:
        return cx, cy, 0.0
    smooth = np.convolve(profile, [0.0625, 0.25, 0.375, 0.25, 0.0625], mode="same")
    grad = np.gradient(smooth)
    lo0, lo1 = max(a0 - 6, 1), min(a0 + 6, a1 - 1)
    hi0, hi1 = max(a1 - 6, a0 + 1), min(a1 + 6, len(profile) - 2)
    i0 = lo0 + int(np.argmax(grad[lo0 : lo1 + 1]))
    i1 = hi0 + int(np.argmin(grad[hi0 : hi1 + 1]))
    if not (0 < i0 < i1 < len(profile) - 1) or grad[i0] <= 0 or grad[i1] >= 0:
        return cx, cy, 0.0

    def vertex(i: int) -> float:  # sub-sample peak of |gradient| (parabola)
        den = grad[i - 1] - 2.0 * grad[i] + grad[i + 1]
        return float(np.clip(0.5 * (grad[i - 1] - grad[i + 1]) / den, -0.5, 0.5)) if den else 0.0

    t_lo = t[i0] + 0.5 * vertex(i0)
    t_hi = t[i1] + 0.5 * vertex(i1)
    mid = 0.5 * float(t_lo + t_hi)
    return cx + mid * ux, cy + mid * uy, float(t_hi - t_lo)


def _tophat_cnr(att: np.ndarray, sigma1: float, k_open: int) -> tuple[np.ndarray, np.ndarray]:
    """Contrast-to-noise map of small bright structures in an attenuation image.

    Smooth at the seed scale, subtract the morphological opening (a flat square wider than
    any seed: it removes seeds, keeps steps, ramps and broad structures such as rib edges),
    divide by the local noise of the smoothed image (robust: median absolute high-pass in
    blocks of 32 x 32 px, so a seed does not inflate its own noise) and remove the opening's
    positive bias (the median). Returns (CNR map, noise map of the smoothed image).
    """
    smooth = cv2.GaussianBlur(att, (0, 0), sigma1, borderType=cv2.BORDER_REFLECT)
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_open, k_open))
    background = cv2.morphologyEx(smooth, cv2.MORPH_OPEN, element, borderType=cv2.BORDER_REFLECT)
    tophat = smooth - background
    k_white, k_smooth = _noise_factors(sigma1)
    sigma_white = _local_noise(att - smooth) / k_white
    noise = sigma_white * k_smooth
    positive = noise[noise > 0]
    floor = 0.25 * float(np.median(positive)) if positive.size else 1e-6
    noise = np.maximum(noise, max(floor, 1e-9))
    z = tophat / noise
    z -= float(np.median(z[::3, ::3]))
    return z, smooth


def _seed_signal(
    smooth: np.ndarray, core: np.ndarray, inner_k: np.ndarray, across_px: float
) -> tuple[np.ndarray, float]:
    """A candidate's signal above its local background, and its long-axis angle (rad).

    The background at each pixel is interpolated linearly ACROSS the candidate's long axis
    (the mean of the smoothed image ``across_px`` and ``across_px`` + 1.5 px to either
    side): unbiased by noise, exact for a background that is linear across the marker over
    that distance whatever it does along it (a rib edge crossing a coil lengthwise).
    Weights are the positive part inside the component grown by ``inner_k``, else zero.
    """
    _, _, theta = _moment_axes(cv2.moments(core, True))
    nx, ny = -math.sin(theta), math.cos(theta)  # unit normal to the long axis
    h, w = smooth.shape
    background = np.zeros_like(smooth)
    for sign in (-1.0, 1.0):
        for dist in (across_px, across_px + 1.5):
            # background(x) += smooth(x + sign * dist * n): a sub-pixel translation
            shift = np.float32([[1, 0, -sign * dist * nx], [0, 1, -sign * dist * ny]])
            background += cv2.warpAffine(
                smooth, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
    background *= 0.25
    inner = cv2.dilate(core, inner_k).astype(bool)
    return np.where(inner, np.clip(smooth - background, 0.0, None), 0.0), theta


@functools.lru_cache(maxsize=16)
def _noise_factors(sigma1: float) -> tuple[float, float]:
    """For white noise of unit sigma: the sigma of (x - G*x) and of G*x (discrete kernel)."""
    k1 = cv2.getGaussianKernel(2 * int(math.ceil(4 * sigma1)) + 1, sigma1).ravel()
    kernel = np.outer(k1, k1)
    centre = float(kernel[kernel.shape[0] // 2, kernel.shape[1] // 2])
    sum_sq = float((kernel**2).sum())
    return math.sqrt(1.0 - 2.0 * centre + sum_sq), math.sqrt(sum_sq)


def _local_noise(highpass: np.ndarray, block: int = 8) -> np.ndarray:
    """Robust local sigma of a zero-mean high-pass image: 1.4826 x median |x| in blocks of
    ``block`` x ``block`` samples of the 4x subsampled image (32 x 32 px), bilinearly
    resized to the image."""
    sub = np.abs(highpass[::4, ::4])
    h, w = sub.shape
    bh, bw = h // block, w // block
    if bh < 2 or bw < 2:
        value = 1.4826 * float(np.median(sub))
        return np.full(highpass.shape, value, dtype=np.float32)
    blocks = sub[: bh * block, : bw * block].reshape(bh, block, bw, block)
    med = np.median(blocks.transpose(0, 2, 1, 3).reshape(bh, bw, -1), axis=2)
    grid = (1.4826 * med).astype(np.float32)
    return cv2.resize(grid, (highpass.shape[1], highpass.shape[0]), interpolation=cv2.INTER_LINEAR)


def search_regions(
    geometry: ProjectionGeometry,
    plan: SeedPlan,
    prior: TargetPrior | None,
    settings: LocaliserSettings = LocaliserSettings(),
) -> tuple[np.ndarray, np.ndarray] | None:
    """Search discs (centres (N, 2) px, radii (N,) px) at the projections of the planned
    seeds placed at the prior's predicted position (rotated by the prior's rotation), or
    None when the prior has no position (search the full frame).

    Radius = magnification / pitch x (search_sigmas x sigma + search_margin_mm + seed
    half-length + lever arm x sin(search_rotation_deg)).
    """
    if prior is None:
        return None
    centre = prior.search_centre()
    if centre is None:
        return None
    pos, sigma = centre
    r = Rotation.from_euler("xyz", prior.rotation_deg, degrees=True).as_matrix()
    seeds = pos + plan.points @ r.T
    g = _geom(geometry)
    px = project_points(geometry, seeds)
    mag = magnification(geometry, seeds)
    lever = np.linalg.norm(plan.points, axis=1) * math.sin(
        math.radians(settings.search_rotation_deg)
    )
    mm = (
        settings.search_sigmas * sigma
        + settings.search_margin_mm
        + 0.5 * np.asarray(plan.seed_length_mm)
        + lever
    )
    return px, mm * mag / g.pitch


# -- stereo -------------------------------------------------------------------------------------


def match_stereo(
    dets_a: Sequence[Detection2D],
    geom_a: ProjectionGeometry,
    dets_b: Sequence[Detection2D],
    geom_b: ProjectionGeometry,
    *,
    max_ray_distance_mm: float = 1.0,
) -> list[StereoPair]:
    """Every pair of candidates whose rays pass within ``max_ray_distance_mm``, closest first."""
    if not dets_a or not dets_b:
        return []
    pa = np.array([d.xy for d in dets_a])
    pb = np.array([d.xy for d in dets_b])
    sa, da = pixel_rays(geom_a, pa)
    sb, db = pixel_rays(geom_b, pb)
    mid, dist, a1, b2 = ray_ray_closest(sa, da[:, None, :], sb, db[None, :, :])
    ok = (dist <= max_ray_distance_mm) & (a1 > 0) & (b2 > 0)
    if not ok.any():
        return []
    epi = epipolar_distance_px(geom_a, pa, geom_b, pb)
    pairs = [
        StereoPair(int(i), int(j), mid[i, j], float(dist[i, j]), float(epi[i, j]))
        for i, j in zip(*np.nonzero(ok), strict=True)
    ]
    pairs.sort(key=lambda p: p.ray_distance_mm)
    return pairs


def assign_stereo(pairs: Sequence[StereoPair]) -> list[StereoPair]:
    """One-to-one assignment (Hungarian, minimum total ray distance) among gated pairs."""
    if not pairs:
        return []
    ia = sorted({p.ia for p in pairs})
    ib = sorted({p.ib for p in pairs})
    big = 1e6
    cost = np.full((len(ia), len(ib)), big)
    lookup = {}
    for p in pairs:
        r, c = ia.index(p.ia), ib.index(p.ib)
        cost[r, c] = p.ray_distance_mm
        lookup[(r, c)] = p
    rows, cols = linear_sum_assignment(cost)
    return [lookup[(r, c)] for r, c in zip(rows, cols, strict=True) if cost[r, c] < big]


@dataclass
class _Solution:
    seeds: tuple[int, ...]  # planned seed indices used
    items: tuple[int, ...]  # pair / candidate index per used seed
    chi2: float
    r: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rms: float = 0.0


def _constellation_search(
    plan_pts: np.ndarray,
    points: np.ndarray,
    item_cost: np.ndarray,
    uses: list[tuple[tuple[int, int], ...]],
    tol: float,
    sigma_d: float,
    min_seeds: int,
    allowed: np.ndarray | None = None,
    max_solutions: int = 5000,
) -> list[_Solution]:
    """All injective maps planned seed -> item (or missing) such that every two assigned
    seeds are as far apart as planned within ``tol`` and no two items share a resource
    (``uses[k]``: the (view, candidate) pairs item k consumes). Only solutions with the
    largest attainable number of seeds (>= min_seeds) are returned."""
    n = len(plan_pts)
    m = len(points)
    plan_d = np.linalg.norm(plan_pts[:, None] - plan_pts[None], axis=2)
    det_d = np.linalg.norm(points[:, None] - points[None], axis=2) if m else np.zeros((0, 0))
    allowed_missing = n - min_seeds
    solutions: list[_Solution] = []
    best_k = [min_seeds]

    def rec(s: int, chosen: list[int], seeds: list[int], used: set, chi2: float) -> None:
        if len(solutions) >= max_solutions:
            return
        missing = s - len(seeds)
        if len(seeds) + (n - s) < best_k[0]:
            return
        if s == n:
            k = len(seeds)
            if k > best_k[0]:
                best_k[0] = k
                solutions.clear()
            solutions.append(_Solution(tuple(seeds), tuple(chosen), chi2))
            return
        for k in range(m):
            if any(u in used for u in uses[k]) or (allowed is not None and not allowed[k, s]):
                continue
            add = item_cost[k]
            ok = True
            for s_prev, k_prev in zip(seeds, chosen, strict=True):
                err = det_d[k, k_prev] - plan_d[s, s_prev]
                if abs(err) > tol:
                    ok = False
                    break
                add += (err / sigma_d) ** 2
            if not ok:
                continue
            rec(s + 1, [*chosen, k], [*seeds, s], used | set(uses[k]), chi2 + add)
        if missing < allowed_missing:
            rec(s + 1, chosen, seeds, used, chi2)

    rec(0, [], [], set(), 0.0)
    return [sol for sol in solutions if len(sol.seeds) == best_k[0]]


def _reject(mode: str, t: float, reason: LockReason, detail: str, n_plan: int, **kw) -> Any:
    return Localisation(
        t=t,
        accepted=False,
        mode=mode,
        reason=str(reason),
        detail=detail,
        seeds_mm=np.full((n_plan, 3), np.nan),
        **kw,
    )


def _views(views: Any) -> list[tuple[Any, ProjectionGeometry]]:
    out = []
    for v in views:
        if hasattr(v, "image") and hasattr(v, "geometry"):
            out.append((v.image, v.geometry))
        else:
            image, geometry = v
            out.append((image, geometry))
    return out


def _detect_view(
    image: Any,
    geometry: ProjectionGeometry,
    plan: SeedPlan,
    prior: TargetPrior | None,
    settings: LocaliserSettings,
    name: str,
) -> tuple[list[Detection2D], str | None]:
    """Candidates of one view (score >= candidate_score), and a field-of-view problem."""
    g = _geom(geometry)
    _check_image(image, g, f"image of view {name}")
    region = search_regions(geometry, plan, prior, settings)
    mag = None
    if region is not None:
        centres, radii = region
        inside = (
            (centres[:, 0] >= -radii)
            & (centres[:, 0] <= g.width - 1 + radii)
            & (centres[:, 1] >= -radii)
            & (centres[:, 1] <= g.height - 1 + radii)
            & np.isfinite(centres).all(axis=1)
        )
        if not inside.any():
            return [], f"view {name}: every predicted seed projects off the panel"
        centres, radii = centres[inside], radii[inside]
        pos = prior.search_centre()[0] if prior is not None else np.zeros(3)
        mag = float(magnification(geometry, pos)[0])
    else:
        centres = radii = None
    dets = detect_candidates(
        image,
        geometry,
        search_center_px=centres,
        search_radius_px=radii,
        seed_diameter_mm=plan.seed_diameter_mm,
        seed_length_mm=plan.seed_length_mm,
        magnification_at_seed=mag,
        polarity=settings.polarity,
        min_score=settings.candidate_score,
        max_candidates=(
            settings.max_candidates if region is not None else settings.max_candidates_full
        ),
    )
    return dets, None


def _gate_prediction(
    prior: TargetPrior | None, position: np.ndarray, settings: LocaliserSettings
) -> str | None:
    if prior is None or prior.search_centre() is None:
        return None
    centre, sigma = prior.search_centre()
    limit = settings.gate_sigmas * sigma + settings.search_margin_mm
    off = float(np.linalg.norm(position - centre))
    if off > limit:
        return f"target {off:.1f} mm from the prediction, limit {limit:.1f} mm"
    return None


def localise_stereo(
    views: Sequence[Any],
    plan: SeedPlan,
    prior: TargetPrior | None = None,
    *,
    t: float = 0.0,
    settings: LocaliserSettings = LocaliserSettings(),
) -> Localisation:
    """3-D target position and rotation from a stereo pair (see the module docstring)."""
    vs = _views(views)
    if len(vs) != 2:
        raise ValueError(f"localise_stereo needs exactly 2 views, got {len(vs)}")
    all_dets = []
    for name, (img, geom) in zip("ab", vs, strict=True):
        dets, fov = _detect_view(img, geom, plan, prior, settings, name)
        if fov is not None:
            return _reject("stereo", t, LockReason.OUTSIDE_FIELD_OF_VIEW, fov, plan.n)
        all_dets.append(dets)
    return localise_stereo_candidates(
        all_dets, (vs[0][1], vs[1][1]), plan, prior, t=t, settings=settings
    )


def localise_stereo_candidates(
    candidates: Sequence[Sequence[Detection2D]],
    geometries: Sequence[ProjectionGeometry],
    plan: SeedPlan,
    prior: TargetPrior | None = None,
    *,
    t: float = 0.0,
    settings: LocaliserSettings = LocaliserSettings(),
) -> Localisation:
    """The stereo localisation from already detected candidates (two lists, two
    geometries): matching, constellation search, rigid fit and every check of
    `localise_stereo`. For another detector, or tests."""
    if len(candidates) != 2 or len(geometries) != 2:
        raise ValueError("localise_stereo_candidates needs 2 candidate lists and 2 geometries")
    geom_a, geom_b = geometries
    _geom(geom_a), _geom(geom_b)  # validate
    n = plan.n
    min_seeds = min(settings.min_seeds, n)
    cands = (tuple(candidates[0]), tuple(candidates[1]))
    rej = functools.partial(_reject, "stereo", t, n_plan=n, candidates=cands)
    good = [[d for d in dets if d.score >= settings.min_score] for dets in cands]
    for name, dets, ok in zip("ab", cands, good, strict=True):
        if not dets:
            return rej(LockReason.NO_CANDIDATES, f"view {name}: no seed-like candidate")
        if len(ok) < min_seeds:
            if len(dets) >= min_seeds:
                best = max(d.score for d in dets)
                return rej(
                    LockReason.SCORE_TOO_LOW,
                    f"view {name}: {len(ok)} candidates score >= {settings.min_score:g} "
                    f"(best {best:.1f}), {min_seeds} needed",
                )
            return rej(
                LockReason.TOO_FEW_SEEDS,
                f"view {name}: {len(dets)} candidates, {min_seeds} seeds needed",
            )
    pairs = match_stereo(
        good[0], geom_a, good[1], geom_b, max_ray_distance_mm=settings.max_ray_distance_mm
    )
    if len(assign_stereo(pairs)) < min_seeds:
        return rej(
            LockReason.RAY_DISTANCE,
            f"{len(assign_stereo(pairs))} candidate pairs with rays within "
            f"{settings.max_ray_distance_mm:g} mm, {min_seeds} needed",
        )
    # lateral 1-sigma of each ray at the seed (for chi-square and uncertainty)
    ga, gb = _geom(geom_a), _geom(geom_b)
    points = np.array([p.point_mm for p in pairs])
    lat_a = settings.pixel_sigma_px * ga.pitch / magnification(geom_a, points)
    lat_b = settings.pixel_sigma_px * gb.pitch / magnification(geom_b, points)
    sigma_ray = np.hypot(lat_a, lat_b)
    item_cost = np.array(
        [(p.ray_distance_mm / s) ** 2 for p, s in zip(pairs, sigma_ray, strict=True)]
    )
    uses = [((0, p.ia), (1, p.ib)) for p in pairs]
    sigma_d = max(float(np.median(sigma_ray)), 0.05) * math.sqrt(2.0)
    shape_ok, shape_why = _length_compatibility(pairs, good, geom_a, geom_b, plan, settings)
    search = functools.partial(
        _constellation_search,
        plan.points,
        points,
        item_cost,
        uses,
        settings.distance_tolerance_mm,
        sigma_d,
        min_seeds,
    )
    sols = search(allowed=shape_ok)
    if not sols and search(allowed=None):
        # the constellation fits only if a seed takes a candidate of the wrong length
        bad = [why for why in shape_why if why]
        return rej(LockReason.SEED_SHAPE, bad[0] if bad else "seed length mismatch")
    if not sols:
        return rej(
            LockReason.INTER_SEED_DISTANCE,
            f"no {min_seeds} of {len(pairs)} triangulated candidates match the planned "
            f"inter-seed distances within {settings.distance_tolerance_mm:g} mm",
        )
    best = _rank_solutions(sols, plan, points, settings)
    alt = _ambiguous(sols, best, settings)
    if alt is not None:
        return rej(LockReason.AMBIGUOUS, alt)
    used_pairs = [pairs[k] for k in best.items]
    # least-squares triangulation of each used pair with per-view weights
    seeds = np.full((n, 3), np.nan)
    px_a = np.full((n, 2), np.nan)
    px_b = np.full((n, 2), np.nan)
    cov_sum = np.zeros((3, 3))
    for s, p in zip(best.seeds, used_pairs, strict=True):
        da, db = good[0][p.ia], good[1][p.ib]
        sa, ra = pixel_rays(geom_a, da.xy)
        sb, rb = pixel_rays(geom_b, db.xy)
        pt = p.point_mm
        sig = settings.pixel_sigma_px * np.array(
            [
                ga.pitch / magnification(geom_a, pt)[0],
                gb.pitch / magnification(geom_b, pt)[0],
            ]
        )
        point, cov, _ = triangulate(np.stack([sa, sb]), np.stack([ra[0], rb[0]]), sig)
        seeds[s] = point
        cov_sum += cov
        px_a[s], px_b[s] = da.xy, db.xy
    used = np.array(best.seeds)
    r, tvec, rms = fit_rigid(plan.points[used], seeds[used])
    extra = {
        "candidates": cands,
        "seeds_px": (px_a, px_b),
    }
    k = len(used)
    if rms > settings.max_fit_residual_mm:
        return _reject(
            "stereo",
            t,
            LockReason.FIT_RESIDUAL,
            f"rigid fit RMS {rms:.2f} mm > {settings.max_fit_residual_mm:g} mm",
            n,
            **extra,
        )
    angle = _rotation_angle_deg(r)
    if angle > settings.max_rotation_deg:
        return _reject(
            "stereo",
            t,
            LockReason.ROTATION_TOO_LARGE,
            f"constellation rotated {angle:.1f} deg > {settings.max_rotation_deg:g} deg",
            n,
            **extra,
        )
    gate = _gate_prediction(prior, tvec, settings)
    if gate is not None:
        return _reject("stereo", t, LockReason.OUTSIDE_SEARCH_REGION, gate, n, **extra)
    # 1-sigma 3-D: mean seed covariance / k plus the fit residual spread
    var = float(np.trace(cov_sum / k)) / k + rms**2 / max(k, 1)
    return Localisation(
        t=t,
        accepted=True,
        mode="stereo",
        position_mm=tuple(map(float, tvec)),
        rotation_deg=rotation_deg(r) if k >= 3 else _NAN3,
        seeds_mm=seeds,
        n_seeds=k,
        residual_mm=rms,
        uncertainty_mm=math.sqrt(var),
        **extra,
    )


def _length_compatibility(
    pairs: Sequence[StereoPair],
    dets: Sequence[Sequence[Detection2D]],
    geom_a: ProjectionGeometry,
    geom_b: ProjectionGeometry,
    plan: SeedPlan,
    settings: LocaliserSettings,
) -> tuple[np.ndarray, list[str]]:
    """Which stereo pair may be which planned seed, by length (elongated markers).

    When a pair's candidates are elongated in both views, the marker's 3-D axis is the
    intersection of the two planes (source, 2-D axis); its 3-D length follows from each
    view's end-to-end length. A pair is compatible with seed s if both lengths are within
    ``max(1.5 mm, 25 %)`` of the planned length (+ one diameter above it: the outline of a
    tilted cylinder): a coil truncated in one view by an edge, or merged with one, fails.
    With one elongated view only, the projected length must not exceed the planned length
    (+ diameter + tolerance). Returns (allowed (n_pairs, n_plan), a reason per pair).
    """
    lengths = np.asarray(plan.seed_length_mm)
    diameters = np.asarray(plan.seed_diameter_mm)
    allowed = np.ones((len(pairs), plan.n), dtype=bool)
    why = [""] * len(pairs)
    geoms = (geom_a, geom_b)
    for k, p in enumerate(pairs):
        ds = (dets[0][p.ia], dets[1][p.ib])
        elong = [d.length_px > 1.5 * d.width_px + 2.0 for d in ds]
        if not any(elong):
            continue
        normals, panel_dirs = [], []
        for d, g in zip(ds, geoms, strict=True):
            gg = _geom(g)
            phi = math.radians(d.angle_deg)
            e3 = math.cos(phi) * gg.u + math.sin(phi) * gg.v
            x3 = gg.origin + d.x_px * gg.u + d.y_px * gg.v
            normals.append(np.cross(x3 - gg.source, e3))
            panel_dirs.append(e3)
        axis = np.cross(normals[0], normals[1])
        sin_planes = np.linalg.norm(axis) / (
            np.linalg.norm(normals[0]) * np.linalg.norm(normals[1])
        )
        measured = np.full(2, np.nan)  # 3-D length from each view
        bound = 0.0  # lower bound on the 3-D length
        for v, (d, g) in enumerate(zip(ds, geoms, strict=True)):
            if not elong[v]:
                continue
            mm_per_px = _geom(g).pitch / float(magnification(g, p.point_mm)[0])
            bound = max(bound, d.length_px * mm_per_px)
            if all(elong) and sin_planes > 0.25:
                unit = axis / np.linalg.norm(axis)
                ends = project_points(g, [p.point_mm - 0.5 * unit, p.point_mm + 0.5 * unit])
                px_per_mm = float(np.linalg.norm(ends[1] - ends[0]))
                if px_per_mm > 0.2 * (1.0 / mm_per_px):
                    measured[v] = d.length_px / px_per_mm
        for s in range(plan.n):
            tol = max(1.5, 0.25 * lengths[s])
            if bound > lengths[s] + diameters[s] + tol:
                allowed[k, s] = False
            elif np.isfinite(measured).any() and (
                # the outline of a tilted cylinder is up to one diameter longer
                np.nanmin(measured) < lengths[s] - tol
                or np.nanmax(measured) > lengths[s] + diameters[s] + tol
            ):
                allowed[k, s] = False
        if not allowed[k].all():
            shown = ", ".join(f"{x:.1f}" for x in measured if np.isfinite(x)) or f"{bound:.1f}"
            why[k] = (
                f"candidates ({ds[0].x_px:.0f}, {ds[0].y_px:.0f}) / ({ds[1].x_px:.0f}, "
                f"{ds[1].y_px:.0f}) measure {shown} mm, no planned seed length fits "
                f"(truncated or merged?)"
            )
    return allowed, why


def _plausible(sol: _Solution, settings: LocaliserSettings) -> bool:
    """A rigid fit that could be accepted: small residual (a mirrored correspondence of a
    symmetric constellation has equal distances but no proper rotation) and rotation."""
    return (
        sol.rms <= settings.max_fit_residual_mm
        and _rotation_angle_deg(sol.r) <= settings.max_rotation_deg
    )


def _rank_solutions(
    sols: list[_Solution], plan: SeedPlan, points: np.ndarray, settings: LocaliserSettings
) -> _Solution:
    """Fit every solution; best = plausible first, then least chi-square, then smallest
    rotation (a symmetric constellation)."""
    for sol in sols:
        idx = np.array(sol.seeds)
        sol.r, sol.t, sol.rms = fit_rigid(plan.points[idx], points[np.array(sol.items)])
    return min(
        sols,
        key=lambda s: (not _plausible(s, settings), round(s.chi2, 6), _rotation_angle_deg(s.r)),
    )


def _ambiguous(sols: list[_Solution], best: _Solution, settings: LocaliserSettings) -> str | None:
    """An alternative plausible correspondence, nearly as good, with another target."""
    for sol in sols:
        if sol is best or sol.chi2 - best.chi2 > settings.ambiguity_chi2:
            continue
        if not _plausible(sol, settings):
            continue
        off = float(np.linalg.norm(sol.t - best.t))
        if off > settings.ambiguity_mm:
            return (
                f"two correspondences fit the plan (chi2 {best.chi2:.1f} vs {sol.chi2:.1f}) "
                f"with targets {off:.1f} mm apart"
            )
    return None


# -- mono ---------------------------------------------------------------------------------------


def localise_mono(
    image: Any,
    geometry: ProjectionGeometry,
    plan: SeedPlan,
    prior: TargetPrior,
    *,
    t: float = 0.0,
    settings: LocaliserSettings = LocaliserSettings(),
) -> Localisation:
    """3-D target position from one view and the prior's 3-D Gaussian (module docstring)."""
    _check_image(image, _geom(geometry))
    if prior is None or prior.mono_gaussian(settings.mono_min_samples) is None:
        return localise_mono_candidates((), geometry, plan, prior, t=t, settings=settings)
    dets, fov = _detect_view(image, geometry, plan, prior, settings, "mono")
    if fov is not None:
        return _reject("mono", t, LockReason.OUTSIDE_FIELD_OF_VIEW, fov, plan.n)
    return localise_mono_candidates(dets, geometry, plan, prior, t=t, settings=settings)


def localise_mono_candidates(
    candidates: Sequence[Detection2D],
    geometry: ProjectionGeometry,
    plan: SeedPlan,
    prior: TargetPrior | None,
    *,
    t: float = 0.0,
    settings: LocaliserSettings = LocaliserSettings(),
) -> Localisation:
    """The mono localisation from already detected candidates of one view (see
    `localise_mono`)."""
    n = plan.n
    min_seeds = min(settings.min_seeds, n)
    g = _geom(geometry)
    gaussian = None if prior is None else prior.mono_gaussian(settings.mono_min_samples)
    if gaussian is None:
        return _reject(
            "mono",
            t,
            LockReason.NO_PRIOR,
            "mono needs the tracker's estimate (a prior correlation model, tracking.use_prior, "
            f"or an X-ray model) or {settings.mono_min_samples} accepted 3-D positions, "
            f"has neither ({prior.n if prior is not None else 0} positions)",
            n,
        )
    dets = list(candidates)
    cands = (tuple(dets),)
    rej = functools.partial(_reject, "mono", t, n_plan=n, candidates=cands)
    good = [d for d in dets if d.score >= settings.min_score]
    if not dets:
        return rej(LockReason.NO_CANDIDATES, "no seed-like candidate")
    if len(good) < min_seeds:
        if len(dets) >= min_seeds:
            return rej(
                LockReason.SCORE_TOO_LOW,
                f"{len(good)} candidates score >= {settings.min_score:g}, {min_seeds} needed",
            )
        return rej(LockReason.TOO_FEW_SEEDS, f"{len(dets)} candidates, {min_seeds} needed")

    r = Rotation.from_euler("xyz", prior.rotation_deg, degrees=True).as_matrix()
    offsets = plan.points @ r.T  # seed i = T + offsets[i]
    centre = prior.search_centre()[0]
    # 2-D consistency: detected separations vs planned separations projected at the
    # predicted position (rotation as in the prior)
    pred_px = project_points(geometry, centre + offsets)
    mag = magnification(geometry, centre + offsets)
    tol_px = settings.distance_tolerance_mm * float(mag.mean()) / g.pitch
    det_px = np.array([d.xy for d in good])
    lat = settings.pixel_sigma_px * g.pitch / mag  # per seed, mm at the seed
    sols = _mono_search(pred_px, det_px, tol_px, settings.pixel_sigma_px, min_seeds)
    if not sols:
        return rej(
            LockReason.INTER_SEED_DISTANCE,
            f"no {min_seeds} of {len(good)} candidates match the projected plan within "
            f"{tol_px:.1f} px",
        )
    mu, cov = gaussian
    info_prior = np.linalg.inv(cov + settings.prior_floor_mm**2 * np.eye(3))
    source = g.source
    fitted = []
    for sol in sols:
        idx = np.array(sol.seeds)
        _, dirs = pixel_rays(geometry, det_px[np.array(sol.items)])
        # Each seed on its own ray where the Gaussian, moved to that seed, is largest; the
        # target is their mean less the planned offsets. Not one joint fit: the seeds'
        # divergent rays also carry a little depth, but an unmeasured rotation of the
        # constellation biases it (on the rig, with the prior model's 2 mm Gaussian, by up
        # to 21 mm along the ray).
        idir = dirs @ info_prior
        lam = np.einsum("ki,ki->k", idir, mu + offsets[idx] - source) / np.einsum(
            "ki,ki->k", idir, dirs
        )
        target = (source + lam[:, None] * dirs - offsets[idx]).mean(axis=0)
        proj = np.eye(3)[None] - dirs[:, :, None] * dirs[:, None, :]
        off = np.einsum("kij,kj->ki", proj, target + offsets[idx] - source)
        res = np.linalg.norm(off, axis=1)
        chi2 = float(np.sum((res / lat[idx]) ** 2))
        fitted.append((chi2, sol, target, res, dirs))
    fitted.sort(key=lambda f: f[0])
    chi2, sol, target, res, dirs = fitted[0]
    for other in fitted[1:]:
        if other[0] - chi2 > settings.ambiguity_chi2:
            break
        off = float(np.linalg.norm(other[2] - target))
        if off > settings.ambiguity_mm:
            return rej(
                LockReason.AMBIGUOUS,
                f"two correspondences fit (chi2 {chi2:.1f} vs {other[0]:.1f}) with targets "
                f"{off:.1f} mm apart",
            )
    idx = np.array(sol.seeds)
    rms = float(np.sqrt(np.mean(res**2)))
    seeds_px = np.full((n, 2), np.nan)
    seeds_px[idx] = det_px[np.array(sol.items)]
    extra = {"candidates": cands, "seeds_px": (seeds_px,)}
    if float(res.max()) > settings.max_reprojection_mm:
        return _reject(
            "mono",
            t,
            LockReason.FIT_RESIDUAL,
            f"seed reprojection residual {res.max():.2f} mm > {settings.max_reprojection_mm:g} mm",
            n,
            **extra,
        )
    gate = _gate_prediction(prior, target, settings)
    if gate is not None:
        return _reject("mono", t, LockReason.OUTSIDE_SEARCH_REGION, gate, n, **extra)
    # each seed: the point on its ray where the Gaussian N(T + offset, S) is largest
    seeds = np.full((n, 3), np.nan)
    for k, s in enumerate(idx):
        d = dirs[k]
        m_i = target + offsets[s]
        lam = float(d @ info_prior @ (m_i - source)) / float(d @ info_prior @ d)
        seeds[s] = source + lam * d
    # posterior covariance with the depth taken from the Gaussian alone (the rays as parallel)
    d_mean = dirs.mean(axis=0)
    d_mean /= np.linalg.norm(d_mean)
    across = (np.eye(3) - np.outer(d_mean, d_mean)) * float(np.sum(lat[idx] ** -2.0))
    cov_post = np.linalg.inv(info_prior + across)
    var = float(np.trace(cov_post)) + rms**2 / len(idx)
    return Localisation(
        t=t,
        accepted=True,
        mode="mono",
        position_mm=tuple(map(float, target)),
        rotation_deg=tuple(map(float, prior.rotation_deg)),
        seeds_mm=seeds,
        n_seeds=len(idx),
        residual_mm=rms,
        uncertainty_mm=math.sqrt(var),
        **extra,
    )


def _mono_search(
    pred_px: np.ndarray, det_px: np.ndarray, tol_px: float, sigma_px: float, min_seeds: int
) -> list[_Solution]:
    """Seed -> candidate maps whose 2-D separation vectors match the projected plan."""
    n, m = len(pred_px), len(det_px)
    solutions: list[_Solution] = []
    best_k = [min(min_seeds, n)]
    allowed_missing = n - best_k[0]
    sig2 = 2.0 * sigma_px**2

    def rec(s: int, chosen: list[int], seeds: list[int], chi2: float) -> None:
        if len(seeds) + (n - s) < best_k[0] or len(solutions) >= 5000:
            return
        if s == n:
            if len(seeds) > best_k[0]:
                best_k[0] = len(seeds)
                solutions.clear()
            solutions.append(_Solution(tuple(seeds), tuple(chosen), chi2))
            return
        for k in range(m):
            if k in chosen:
                continue
            add = 0.0
            ok = True
            for s_prev, k_prev in zip(seeds, chosen, strict=True):
                err = (det_px[k] - det_px[k_prev]) - (pred_px[s] - pred_px[s_prev])
                e2 = float(err @ err)
                if e2 > tol_px * tol_px:
                    ok = False
                    break
                add += e2 / sig2
            if ok:
                rec(s + 1, [*chosen, k], [*seeds, s], chi2 + add)
        if s - len(seeds) < allowed_missing:
            rec(s + 1, chosen, seeds, chi2)

    rec(0, [], [], 0.0)
    return [sol for sol in solutions if len(sol.seeds) == best_k[0]]
