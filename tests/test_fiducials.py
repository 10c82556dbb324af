"""Fiducial detection and 3-D localisation (motionctl.fiducials) and the KIM log reader
(motionctl.kim): pure geometry on hand-built geometries, detection on rendered images
(simulators.xray_imager), and the real KIM-QA logs (../shared/data)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from motionctl import fiducials as fid
from motionctl import kim
from motionctl.imaging import frame_prior
from motionctl.types import MotionEstimate, ProjectionGeometry
from tests.conftest import shared_data

# -- a minimal geometry of our own: source at SAD along an angle in the LR-AP plane ------------


def make_geometry(angle_deg: float, name: str = "v", sad=1000.0, sid=1500.0, pitch=0.4):
    phi = math.radians(angle_deg)
    towards = np.array([math.sin(phi), 0.0, math.cos(phi)])
    source = sad * towards
    centre = source - sid * towards
    u = np.cross(-towards, (0.0, 1.0, 0.0)) * pitch
    v = np.array([0.0, -pitch, 0.0])
    w, h = 512, 384
    origin = centre - 0.5 * (w - 1) * u - 0.5 * (h - 1) * v
    return ProjectionGeometry(name, tuple(source), tuple(origin), tuple(u), tuple(v), w, h)


GA = make_geometry(45.0, "a")
GB = make_geometry(-45.0, "b")
PLAN3 = fid.SeedPlan(((-12.0, 8.0, 6.0), (14.0, -6.0, -10.0), (2.0, -14.0, 16.0)))


def dets_of(geometry, points, order=None) -> list[fid.Detection2D]:
    px = fid.project_points(geometry, points)
    idx = range(len(px)) if order is None else order
    return [fid.Detection2D(px[i, 0], px[i, 1], 50.0, 0.0, 5.0, 5.0, 20) for i in idx]


# -- geometry -----------------------------------------------------------------------------------


def test_projection_and_back_projection_agree():
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0], [-30.0, 15.0, -25.0]])
    px = fid.project_points(GA, pts)
    np.testing.assert_allclose(px[0], [(GA.width_px - 1) / 2, (GA.height_px - 1) / 2])
    source, dirs = fid.pixel_rays(GA, px)
    # every point lies on its ray
    rel = pts - source
    perp = rel - np.sum(rel * dirs, axis=1, keepdims=True) * dirs
    assert np.abs(perp).max() < 1e-9
    assert fid.magnification(GA, [0, 0, 0])[0] == pytest.approx(1.5)


def test_triangulation_is_exact_for_noiseless_rays():
    point = np.array([7.0, -3.0, 12.0])
    sa, da = fid.pixel_rays(GA, fid.project_points(GA, point))
    sb, db = fid.pixel_rays(GB, fid.project_points(GB, point))
    mid, dist, _, _ = fid.ray_ray_closest(sa, da[0], sb, db[0])
    np.testing.assert_allclose(mid, point, atol=1e-9)
    assert dist < 1e-9
    p, cov, spread = fid.triangulate([sa, sb], [da[0], db[0]], sigmas_mm=[0.1, 0.1])
    np.testing.assert_allclose(p, point, atol=1e-9)
    assert spread < 1e-9
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_epipolar_matching_with_swapped_candidate_order():
    pts = PLAN3.points + [1.0, 2.0, -1.0]
    da = dets_of(GA, pts)
    db = dets_of(GB, pts, order=[2, 0, 1])  # view b lists the seeds in another order
    pairs = fid.assign_stereo(fid.match_stereo(da, GA, db, GB, max_ray_distance_mm=1.0))
    mapping = {p.ia: p.ib for p in pairs}
    assert mapping == {0: 1, 1: 2, 2: 0}
    for p in pairs:
        np.testing.assert_allclose(p.point_mm, pts[p.ia], atol=1e-6)
        assert p.epipolar_px < 1e-6
    # a pair of different seeds is far from the epipolar line
    epi = fid.epipolar_distance_px(GA, [da[0].xy], GB, [db[0].xy])
    assert epi[0, 0] > 5.0


def test_hungarian_assignment_prefers_the_one_to_one_minimum():
    pts = PLAN3.points
    da, db = dets_of(GA, pts), dets_of(GB, pts)
    good = fid.match_stereo(da, GA, db, GB, max_ray_distance_mm=1.0)
    # a ghost pair (a0 with b1) that is cheaper than nothing but breaks the one-to-one
    ghost = fid.StereoPair(0, 1, np.zeros(3), 0.5, 3.0)
    chosen = fid.assign_stereo([*good, ghost])
    assert sorted((p.ia, p.ib) for p in chosen) == [(0, 0), (1, 1), (2, 2)]


def test_kabsch_recovers_a_known_rotation_and_translation():
    angles = (3.0, -2.0, 5.0)
    r = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    t = np.array([4.0, -7.0, 2.5])
    q = PLAN3.points @ r.T + t
    r_fit, t_fit, rms = fid.fit_rigid(PLAN3.points, q)
    np.testing.assert_allclose(fid.rotation_deg(r_fit), angles, atol=1e-9)
    np.testing.assert_allclose(t_fit, t, atol=1e-9)
    assert rms < 1e-9


def test_stereo_localisation_from_candidates_recovers_pose():
    angles = (2.0, 0.0, -1.0)
    r = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    target = np.array([3.0, -5.0, 1.0])
    pts = PLAN3.points @ r.T + target
    loc = fid.localise_stereo_candidates(
        [dets_of(GA, pts), dets_of(GB, pts, order=[1, 2, 0])], [GA, GB], PLAN3, t=12.5
    )
    assert loc.accepted and loc.reason is None and loc.mode == "stereo"
    assert loc.t == 12.5 and loc.n_seeds == 3
    np.testing.assert_allclose(loc.position_mm, target, atol=1e-6)
    np.testing.assert_allclose(loc.rotation_deg, angles, atol=1e-6)
    np.testing.assert_allclose(loc.seeds_mm, pts, atol=1e-6)
    assert 0 < loc.uncertainty_mm < 0.2
    with pytest.raises(ValueError):
        loc.seeds_mm[0, 0] = 1.0  # results are read-only


def test_rigid_check_rejects_a_wrong_constellation_with_a_reason():
    pts = PLAN3.points.copy()
    pts[2] += [0.0, 4.0, 0.0]  # one seed 4 mm from where the plan puts it
    loc = fid.localise_stereo_candidates([dets_of(GA, pts), dets_of(GB, pts)], [GA, GB], PLAN3)
    assert not loc.accepted
    assert loc.reason == fid.LockReason.INTER_SEED_DISTANCE
    assert "1.5 mm" in loc.detail
    assert all(math.isnan(x) for x in loc.position_mm)  # never invents a position
    assert np.isnan(loc.seeds_mm).all()


def test_stereo_rejections_name_their_reason():
    pts = PLAN3.points
    none = fid.localise_stereo_candidates([[], dets_of(GB, pts)], [GA, GB], PLAN3)
    assert none.reason == "no_candidates" and "view a" in none.detail
    few = fid.localise_stereo_candidates([dets_of(GA, pts[:2]), dets_of(GB, pts)], [GA, GB], PLAN3)
    assert few.reason == "too_few_seeds"
    weak = [fid.Detection2D(d.x_px, d.y_px, 3.0, 0.0, 5.0, 5.0, 20) for d in dets_of(GA, pts)]
    low = fid.localise_stereo_candidates(
        [weak, dets_of(GB, pts)],
        [GA, GB],
        PLAN3,
        settings=fid.LocaliserSettings(candidate_score=2.0),
    )
    assert low.reason == "score_too_low"
    shifted = fid.localise_stereo_candidates(
        [dets_of(GA, pts), dets_of(GB, pts + [0.0, 5.0, 0.0])], [GA, GB], PLAN3
    )
    assert shifted.reason == "ray_distance_too_large"
    far = fid.TargetPrior().update([0, 0, 0]).with_prediction([0.0, 0.0, 0.0], 0.5)
    moved = PLAN3.points + [0.0, 30.0, 0.0]
    gated = fid.localise_stereo_candidates(
        [dets_of(GA, moved), dets_of(GB, moved)], [GA, GB], PLAN3, far
    )
    assert gated.reason == "outside_search_region"
    turned = PLAN3.points @ Rotation.from_euler("x", 25, degrees=True).as_matrix().T
    rot = fid.localise_stereo_candidates(
        [dets_of(GA, turned), dets_of(GB, turned)], [GA, GB], PLAN3
    )
    assert rot.reason == "rotation_too_large"


def test_two_fitting_correspondences_are_rejected_as_ambiguous():
    c, a, b = PLAN3.points  # the axis through seeds 1 and 2 passes 13 mm from the target
    axis = (b - a) / np.linalg.norm(b - a)
    turn = Rotation.from_rotvec(np.radians(10.0) * axis).as_matrix()
    c2 = a + turn @ (c - a)  # same distances to a and b as c: a second constellation
    pts = np.array([c, a, b, c2])
    loc = fid.localise_stereo_candidates([dets_of(GA, pts), dets_of(GB, pts)], [GA, GB], PLAN3)
    assert not loc.accepted and loc.reason == "ambiguous_assignment"
    assert "mm apart" in loc.detail


def test_target_prior_running_statistics_are_pure():
    rng = np.random.default_rng(1)
    xs = rng.normal([1.0, 2.0, 3.0], [0.5, 4.0, 1.0], size=(40, 3))
    prior = fid.TargetPrior(window=100)
    for x in xs:
        new = prior.update(x)
        assert new is not prior and new.n == prior.n + 1
        prior = new
    np.testing.assert_allclose(prior.mean, xs.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(prior.cov, np.cov(xs.T, bias=True), atol=1e-9)
    assert prior.search_centre()[0] is not None
    predicted = prior.with_prediction([0.0, 1.0, 2.0], 1.5)
    np.testing.assert_allclose(predicted.search_centre()[0], [0, 1, 2])
    assert predicted.search_centre()[1] == 1.5 and prior.predicted_mm is None
    with pytest.raises(ValueError):
        prior.update([0.0, math.nan, 0.0])


def _prior(mean, cov, n=20):
    return fid.TargetPrior(
        mean_mm=tuple(mean), cov_mm2=tuple(map(tuple, np.asarray(cov, float))), n=n
    )


def test_mono_fallback_picks_the_point_of_the_ray_closest_to_the_prior_mean():
    plan = fid.SeedPlan(((0.0, 0.0, 0.0),))
    mean = np.array([2.0, 5.0, -3.0])
    prior = _prior(mean, np.eye(3) * 4.0)
    truth = np.array([4.0, 1.0, 2.0])
    settings = fid.LocaliserSettings(min_seeds=1)
    loc = fid.localise_mono_candidates(dets_of(GA, [truth]), GA, plan, prior, settings=settings)
    assert loc.accepted and loc.mode == "mono" and loc.n_seeds == 1
    source, d = fid.pixel_rays(GA, fid.project_points(GA, truth))
    d = d[0]
    closest = source + np.dot(mean - source, d) * d  # isotropic Gaussian: closest point
    np.testing.assert_allclose(loc.position_mm, closest, atol=0.01)
    np.testing.assert_allclose(loc.seeds_mm[0], closest, atol=0.01)
    # honest uncertainty: about the prior's spread along the ray, far above stereo's
    assert 1.0 < loc.uncertainty_mm < 3.0
    # anisotropic: the maximum of the Gaussian along the ray (closed form)
    cov = np.diag([1.0, 25.0, 4.0]) + 0.25 * np.eye(3)
    prior2 = _prior(mean, np.diag([1.0, 25.0, 4.0]))
    loc2 = fid.localise_mono_candidates(dets_of(GA, [truth]), GA, plan, prior2, settings=settings)
    info = np.linalg.inv(cov)
    s = float(d @ info @ (mean - source)) / float(d @ info @ d)
    np.testing.assert_allclose(loc2.position_mm, source + s * d, atol=0.01)


def test_mono_with_the_constellation_and_its_reasons():
    target = np.array([1.0, -2.0, 0.5])
    pts = PLAN3.points + target
    prior = _prior(target + [0.5, 0.5, -0.5], np.diag([1.0, 9.0, 2.0]))
    loc = fid.localise_mono_candidates(dets_of(GA, pts, order=[2, 1, 0]), GA, PLAN3, prior)
    assert loc.accepted and loc.n_seeds == 3
    assert np.linalg.norm(np.asarray(loc.position_mm) - target) < 1.0
    no_prior = fid.localise_mono_candidates(dets_of(GA, pts), GA, PLAN3, fid.TargetPrior())
    assert no_prior.reason == "no_prior"
    wrong = pts.copy()
    wrong[0] += [0.0, 6.0, 0.0]
    bad = fid.localise_mono_candidates(dets_of(GA, wrong), GA, PLAN3, prior)
    assert not bad.accepted and bad.reason == "inter_seed_distance_mismatch"


def _along_ray_error(geometry, position, truth) -> float:
    source, d = fid.pixel_rays(geometry, fid.project_points(geometry, truth))
    return abs(float(np.dot(np.asarray(position) - truth, d[0])))


def test_mono_starts_from_the_trackers_prediction_before_any_position_is_learnt():
    target = np.array([1.0, -6.0, 2.0])
    pts = PLAN3.points + target
    # what the prior correlation model gives at the start: no learnt positions, a prediction
    predicted = fid.TargetPrior().with_prediction(target + [0.8, -0.6, 0.4], 2.0)
    loc = fid.localise_mono_candidates(dets_of(GA, pts), GA, PLAN3, predicted)
    assert loc.accepted and loc.mode == "mono" and loc.n_seeds == 3
    # across the ray measured; along it no further off than the prediction
    assert np.linalg.norm(np.asarray(loc.position_mm) - target) < 1.2
    assert 1.0 < loc.uncertainty_mm < 4.0  # the prediction's spread along the ray
    none = fid.localise_mono_candidates(dets_of(GA, pts), GA, PLAN3, fid.TargetPrior())
    assert none.reason == "no_prior" and "tracking.use_prior" in none.detail


def test_the_frame_prior_of_the_imaging_worker():
    settings = fid.LocaliserSettings()
    target = np.array([1.0, -6.0, 2.0])
    few = fid.TargetPrior().update(target + [0.5, 1.0, 0.0]).update(target - [0.5, 1.0, 0.0])
    estimate = MotionEstimate(
        5.0, (1.2, -5.5, 2.1), (1.0, -3.0, 1.5), 0.4, True, (), uncertainty_mm=0.7
    )
    # a valid estimate is the prediction (1 mm at least), in stereo and mono alike
    for stereo in (True, False):
        p = frame_prior(few, estimate, stereo, settings)
        assert p.predicted_mm == estimate.position_mm and p.predicted_sigma_mm == 1.0
    # no estimate to offer (an early invalidation): mono falls back on the few positions
    # learnt, widened, so that it can localise again and rebuild the model; stereo needs none
    invalid = replace(estimate, valid=False, reasons=("correlation_model_invalid",))
    p = frame_prior(few, invalid, False, settings)
    np.testing.assert_allclose(p.predicted_mm, target)
    assert p.predicted_sigma_mm == settings.mono_sparse_sd_mm
    pts = PLAN3.points + target
    assert fid.localise_mono_candidates(dets_of(GA, pts), GA, PLAN3, p).accepted
    assert not fid.localise_mono_candidates(dets_of(GA, pts), GA, PLAN3, few).accepted
    assert frame_prior(few, invalid, True, settings) is few
    assert frame_prior(fid.TargetPrior(), None, False, settings).predicted_mm is None


def test_mono_depth_is_not_taken_from_a_rotated_constellation():
    # The constellation turned 3 degrees about LR (as breathing turns a liver), which mono
    # cannot measure: the seeds' divergent rays then suggest a depth tens of mm off.
    # Each seed is placed on its ray by the Gaussian instead.
    target = np.array([0.5, -8.0, 3.0])
    turned = Rotation.from_euler("x", 3.0, degrees=True).as_matrix()
    pts = PLAN3.points @ turned.T + target
    prior = _prior(target + [0.3, 0.3, -0.3], np.eye(3) * 4.0)  # learnt, 2 mm
    loc = fid.localise_mono_candidates(dets_of(GA, pts), GA, PLAN3, prior)
    assert loc.accepted
    assert _along_ray_error(GA, loc.position_mm, target) < 1.0


def test_bad_input_is_refused_with_the_reason():
    img = np.zeros((GA.height_px, GA.width_px), np.uint16)
    with pytest.raises(ValueError, match="shape"):
        fid.detect_candidates(img[:-1], GA)
    with pytest.raises(ValueError, match="NaN"):
        fid.detect_candidates(np.full(img.shape, np.nan), GA)
    with pytest.raises(ValueError, match="2-D"):
        fid.detect_candidates(np.zeros(10), GA)
    with pytest.raises(ValueError, match="numeric"):
        fid.detect_candidates(img.astype(object), GA)
    nan_geom = ProjectionGeometry("n", (math.nan, 0, 1000), GA.panel_origin_mm, GA.panel_u_mm,
                                  GA.panel_v_mm, GA.width_px, GA.height_px)  # fmt: skip
    with pytest.raises(ValueError, match="source_mm"):
        fid.detect_candidates(img, nan_geom)
    flat = ProjectionGeometry("f", GA.source_mm, GA.panel_origin_mm, GA.panel_u_mm,
                              GA.panel_u_mm, GA.width_px, GA.height_px)  # fmt: skip
    with pytest.raises(ValueError, match="parallel"):
        fid.project_points(flat, [0, 0, 0])
    with pytest.raises(ValueError, match="2 views"):
        fid.localise_stereo([(img, GA)], PLAN3)
    with pytest.raises(ValueError, match="seeds_mm"):
        fid.SeedPlan(((0.0, 0.0),))
    with pytest.raises(ValueError, match="closer than 1 mm"):
        fid.SeedPlan(((0.0, 0.0, 0.0), (0.0, 0.5, 0.0)))
    with pytest.raises(ValueError, match="positive"):
        fid.SeedPlan(((0.0, 0.0, 0.0),), seed_diameter_mm=0.0)


def test_seed_plan_from_config():
    plan = fid.SeedPlan.from_config(
        {
            "seeds_mm": [[0, 0, 0], [10, 0, 0], [0, 20, 0]],
            "seed_length_mm": [3, 3, 10],
            "seed_diameter_mm": [1, 1, 0.35],
            "centre_on_centroid": True,
        }
    )
    np.testing.assert_allclose(plan.points.mean(axis=0), 0, atol=1e-12)
    assert plan.seed_length_mm == (3.0, 3.0, 10.0) and plan.n == 3


# -- rendered images ----------------------------------------------------------------------------

xray = pytest.importorskip(
    "motionctl.simulators.xray_imager", reason="simulators/xray_imager.py (renderer) is absent"
)


@pytest.fixture(scope="module")
def stereo():
    ga, gb = xray.room_stereo_geometry()
    seeds = xray.DEFAULT_SEEDS
    plan = fid.SeedPlan(
        tuple(s.center_offset_mm for s in seeds),
        tuple(s.diameter_mm for s in seeds),
        tuple(s.length_mm for s in seeds),
    )
    return ga, gb, seeds, plan


def _render(geometries, poses, seed=0, **kw):
    rng = np.random.default_rng(seed)
    out = [xray.render_projection(g, poses, rng=rng, **kw) for g in geometries]
    return [(img, g) for (img, _), g in zip(out, geometries, strict=True)], [t for _, t in out]


def test_detection_finds_every_visible_seed_within_half_a_pixel(stereo):
    ga, gb, seeds, plan = stereo
    target = np.array([2.0, 4.0, -3.0])
    poses = xray.seed_poses(seeds, target, rotation_deg=1.5)
    views, truths = _render((ga, gb), poses, velocity_mm_s=(0.0, 10.0, 3.0))
    prior = fid.TargetPrior().update(target + 1.0).with_prediction(target + 1.0, 1.5)
    for (img, g), truth in zip(views, truths, strict=True):
        centres, radii = fid.search_regions(g, plan, prior)
        dets = fid.detect_candidates(
            img,
            g,
            search_center_px=centres,
            search_radius_px=radii,
            seed_diameter_mm=plan.seed_diameter_mm,
            seed_length_mm=plan.seed_length_mm,
        )
        xy = np.array([d.xy for d in dets])
        for k, p in enumerate(truth.seeds_px):
            assert truth.inside[k]
            assert np.min(np.linalg.norm(xy - p, axis=1)) < 0.5, (g.imager, k)
    loc = fid.localise_stereo(views, plan, prior, t=3.0)
    assert loc.accepted, loc.detail
    assert np.linalg.norm(np.asarray(loc.position_mm) - target) < 0.3
    assert loc.rotation_deg[0] == pytest.approx(1.5, abs=0.5)
    np.testing.assert_allclose(loc.seeds_mm, truths[0].seeds_mm, atol=0.3)


def test_a_frame_without_seeds_is_rejected_not_invented(stereo):
    ga, gb, _, plan = stereo
    views, _ = _render((ga, gb), [], seed=3)
    prior = fid.TargetPrior().update([0, 0, 0]).with_prediction([0, 0, 0], 1.0)
    loc = fid.localise_stereo(views, plan, prior)
    assert not loc.accepted
    assert loc.reason in ("no_candidates", "too_few_seeds", "score_too_low")
    assert all(math.isnan(x) for x in loc.position_mm)
    # full frame: anatomy edges give candidates, but no constellation
    full = fid.localise_stereo(views, plan, None)
    assert not full.accepted and full.reason and full.detail
    assert all(math.isnan(x) for x in full.position_mm)


def test_the_distractor_is_not_taken_for_a_seed(stereo):
    ga, gb, seeds, plan = stereo
    target = np.array([-1.0, 2.0, 1.0])
    poses = xray.seed_poses(seeds, target)
    views, truths = _render((ga, gb), poses, seed=5, distractor=True)
    # full-frame search (no prior): the clip is a candidate, the constellation check
    # keeps it out of the lock
    loc = fid.localise_stereo(views, plan, None)
    assert loc.accepted, loc.detail
    np.testing.assert_allclose(loc.seeds_mm, truths[0].seeds_mm, atol=0.3)
    clip = truths[0].distractor_mm
    assert np.min(np.linalg.norm(loc.seeds_mm - clip, axis=1)) > 20.0
    # with one seed gone, the clip must not stand in for it
    views2, _ = _render((ga, gb), poses[:2], seed=6, distractor=True)
    lost = fid.localise_stereo(views2, plan, None)
    assert not lost.accepted and lost.reason is not None


def test_mono_on_a_rendered_view(stereo):
    ga, _, seeds, plan = stereo
    target = np.array([0.5, 3.0, -1.0])
    rng = np.random.default_rng(2)
    prior = fid.TargetPrior()
    for si in np.linspace(-6, 6, 12):
        prior = prior.update(target + [0.1 * si, si, 0.3 * si] + rng.normal(0, 0.2, 3))
    poses = xray.seed_poses(seeds, target)
    views, _ = _render((ga,), poses, seed=7)
    loc = fid.localise_mono(views[0][0], ga, plan, prior, t=1.0)
    assert loc.accepted, loc.detail
    assert np.linalg.norm(np.asarray(loc.position_mm) - target) < 1.0
    assert loc.uncertainty_mm > 0.3


def _worker_measurements(stereo, target, estimated, sigma=1.0, learned=None):
    """What the imaging worker delivers for one rendered frame of the target at ``target``
    while the tracker's (valid) estimate is ``estimated``: a stereo pair, or with a
    ``learned`` prior (positions localised before) one mono view."""
    from motionctl.imaging import FiducialWorker
    from motionctl.types import XrayFrame

    ga, gb, seeds, plan = stereo
    geometries = (ga, gb) if learned is None else (ga,)
    views, _ = _render(geometries, xray.seed_poses(seeds, target), seed=11)
    estimate = MotionEstimate(
        4.0, tuple(estimated), tuple(estimated), 0.4, True, (), uncertainty_mm=sigma
    )
    out: list = []
    worker = FiducialWorker(
        plan,
        stereo=learned is None,
        deliver=out.append,
        latest_estimate=lambda: estimate,
        clock=lambda: 4.1,
        wall_clock=lambda: 4.1,
    )
    if learned is not None:
        worker._prior = learned
    for img, g in views:  # the worker's own loop, without its thread
        worker._frame(XrayFrame("xray", 7, 4.0, 4.1, img, g))
    return out


def test_seeds_away_from_the_tracked_position_are_found_and_reported_not_discarded(stereo):
    # A baseline shift the surrogate does not show: the seeds 10 mm superior of where the
    # tracker puts the target, beyond the search regions. The frame must reach the session
    # core with the position the images show (whose fiducial check holds the beam), not be
    # rejected as "too few seeds" while the beam runs on until the imager goes stale.
    truth = np.array([1.0, 2.0, -1.0])
    shifted = _worker_measurements(stereo, truth, truth - [0.0, 10.0, 0.0])
    event, measurement = shifted
    assert event.kind == "reacquired" and "wider search" in event.detail
    assert measurement.accepted and measurement.frame_id == 7
    assert np.linalg.norm(np.asarray(measurement.position_mm) - truth) < 0.3
    # where the tracker expects them they are found in the search regions, no second search
    (found,) = _worker_measurements(stereo, truth, truth + [0.3, -0.5, 0.2])
    assert found.accepted
    assert np.linalg.norm(np.asarray(found.position_mm) - truth) < 0.3
    # a frame with no seeds at all is still rejected, with the first search's reason
    ga, gb, _, plan = stereo
    (empty,) = _worker_measurements((ga, gb, [], plan), truth, truth)
    assert not empty.accepted and empty.reason
    # mono (one gantry view): searched again around the positions learned over the breath
    rng = np.random.default_rng(4)
    learned = fid.TargetPrior()
    for si in np.linspace(-6, 6, 12):
        learned = learned.update(
            truth - [0, 10, 0] + [0.1 * si, si, 0.3 * si] + rng.normal(0, 0.2, 3)
        )
    event, mono = _worker_measurements(stereo, truth, truth - [0, 10, 0], learned=learned)
    assert event.kind == "reacquired" and mono.accepted and mono.mode == "mono"
    assert abs(mono.position_mm[1] - truth[1]) < 0.5  # SI, across the ray: measured


# -- KIM logs -----------------------------------------------------------------------------------

KIM_VARIAN = ("kim-qa-trajectories", "Test Files", "Varian")


@pytest.mark.data
def test_kim_log_reader_on_the_real_files():
    path = shared_data(*KIM_VARIAN, "Dynamic", "Large_SI", "MarkerLocationsGA_CouchShift_0.txt")
    log = kim.read_kim_log(path)
    assert len(log.t_s) == 1131 and log.n_markers == 3
    assert log.t_s[1] == pytest.approx(0.517) and log.gantry_deg[0] == pytest.approx(90.02)
    # file order AP, LR, SI -> IEC LR, SI, AP
    np.testing.assert_allclose(
        log.markers_mm[0, 0], [-27.9339744865999, 24.4623458994006, 31.1194751947666]
    )
    np.testing.assert_allclose(log.markers_px[0, 2], [495, 530])
    assert log.filenames[0].endswith("Ch1_0_777_270.02.tiff")
    np.testing.assert_allclose(log.centroid_mm[0], log.markers_mm[0].mean(axis=0))
    coords, _ = kim.read_coords(shared_data(*KIM_VARIAN, "co-ords.txt"))
    np.testing.assert_allclose(coords.mean(axis=0), [-7.2, -3.4333, 3.2667], atol=1e-3)
    # at the start (robot near its origin) the marker centroid is where co-ords.txt puts it
    assert np.linalg.norm(log.centroid_mm[0] - coords.mean(axis=0)) < 1.0


@pytest.mark.data
def test_kim_session_with_a_couch_shift_and_headerless_second_file():
    folder = shared_data(*KIM_VARIAN, "Tx interrupt", "Baseline_cardiac")
    log = kim.read_kim_session(folder)
    assert sorted(set(log.segment.tolist())) == [0, 1]  # *_OL copies ignored
    assert np.all(np.diff(log.t_s) > 0)
    np.testing.assert_allclose(log.couch_shift_mm[1], [-1.5, -5.3, 2.0], atol=1e-9)


@pytest.mark.data
def test_kim_comparison_with_the_robot_trace():
    from motionctl.traces import read_trace

    log = kim.read_kim_log(
        shared_data(*KIM_VARIAN, "Dynamic", "Large_SI", "MarkerLocationsGA_CouchShift_0.txt")
    )
    trace = read_trace(
        shared_data("kim-qa-trajectories", "Robot traces", kim.KIM_QA_TRACES["Large_SI"])
    )
    c = kim.compare_with_trace(log.t_s, log.centroid_mm, trace.t_s, trace.values[:, :3])
    assert c.time_offset_s == pytest.approx(-3.55, abs=0.1)
    assert c.coverage > 0.9 and c.kim_qa_pass
    assert c.rms_3d_mm < 0.6
    assert abs(c.per_axis["SI"]["mean"]) < 0.1 and c.per_axis["SI"]["sd"] < 0.5
    np.testing.assert_allclose(c.offset_mm, [-7.2, -3.1, 3.25], atol=0.2)


def test_kim_format_errors_name_the_file_and_line(tmp_path: Path):
    header = (
        "Frame No, Time (sec), Gantry, Marker_0_AP, Marker_0_LR, Marker_0_SI , Marker_0_X, "
        "Marker_0_Y, Marker_0_Correlation, Filename\n"
    )
    good = "0, 0.000, 90, 1.0, 2.0, 3.0, 10, 20, 0.9, C:\\a,b.tiff\n"
    path = tmp_path / "MarkerLocationsGA_CouchShift_0.txt"
    path.write_text(header + good + "1, 0.5, 91, 1.1, x2, 3.0, 11, 21, 0.9, f.tiff\n")
    with pytest.raises(kim.KimFormatError, match=r"CouchShift_0\.txt:3: .*Marker_0_LR"):
        kim.read_kim_log(path)
    path.write_text(header + good + "1, 0.5, 91\n")
    with pytest.raises(kim.KimFormatError, match=r":3: expected 10 comma-separated fields"):
        kim.read_kim_log(path)
    path.write_text(header + good)
    log = kim.read_kim_log(path)
    assert log.filenames == ("C:\\a,b.tiff",)  # a comma inside the file name survives
    np.testing.assert_allclose(log.markers_mm[0, 0], [2.0, 3.0, 1.0])
    path.write_text("1, 0.5, 91, 1.1, 2, 3.0, 11, 21, 0.9, f.tiff\n")
    with pytest.raises(kim.KimFormatError, match=r":1: header must start"):
        kim.read_kim_log(path)
    with pytest.raises(ValueError, match="overlap"):
        kim.compare_with_trace(np.arange(20.0), np.zeros((20, 3)), [100.0, 101.0], np.zeros((2, 3)))
