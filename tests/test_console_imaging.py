"""The console's X-ray panel: the latest image of each imager view with the localised seeds
marked on it and a caption per view, or a placeholder that says why there is none.

Fast tests feed the panel hand-made views; one test runs the simulated rig with stereo
imaging through the console bridge and its pipe, as ``motionctl sim`` does, and then
reviews the session log it wrote.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
from types import SimpleNamespace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported

import numpy as np
import pytest

from motionctl.config import load_config
from motionctl.gui.console import ConsoleWindow
from motionctl.gui.remote import ConsoleBridge, RemoteSource
from motionctl.gui.review import ReviewSource, ReviewWindow
from motionctl.gui.state import (
    NO_IMAGER,
    NO_IMAGES_IN_LOG,
    WAITING_FOR_IMAGE,
    LiveSource,
    XrayView,
    display_image,
)
from motionctl.gui.widgets import ImagingPanel
from motionctl.types import FiducialMeasurement, ProjectionGeometry, XrayFrame

CFG = load_config(None, [])


def _view(imager: str, frame_id: int, seeds, outcome: str = "model point", accepted=True):
    image = np.zeros((192, 256), np.uint8)
    image[50:60, 100:110] = 200
    return XrayView(imager, frame_id, 97.9, image, np.asarray(seeds, float), outcome, accepted)


@pytest.fixture
def panel(qtbot):
    p = ImagingPanel()
    qtbot.addWidget(p)
    p.resize(300, 260)
    p.show()
    return p


def _cyan_near(widget, x: float, y: float, radius: float) -> bool:
    """Whether a seed ring's cyan is on screen within ``radius`` of (x, y) (widget pixels)."""
    shot = widget.grab().toImage()
    for i in range(round(x - radius), round(x + radius) + 1):
        for j in range(round(y - radius), round(y + radius) + 1):
            c = shot.pixelColor(i, j)
            if c.blue() > 150 and c.green() > 120 and c.red() < 100:
                return True
    return False


def test_the_panel_shows_each_view_with_its_seeds_and_caption(panel):
    seeds = [[10.0, 20.0], [30.5, 40.0], [np.nan, np.nan]]  # the third seed not localised
    rejected = "rejected: too few seeds: 1 of 3"
    views = (_view("kv_a", 17, seeds), _view("kv_b", 17, np.empty((0, 2)), rejected, False))
    panel.show_frames(views, 100.0, "")
    assert panel.stack.currentWidget() is panel.frames_page
    for name in ("kv_a", "kv_b"):
        assert panel._items[name].image.shape == (192, 256)
    # the localised seeds are ringed (the one not localised is not), none on a rejected frame
    assert np.allclose(panel._items["kv_a"].seeds, [[10.0, 20.0], [30.5, 40.0]])
    assert len(panel._items["kv_b"].seeds) == 0
    # ... and drawn: cyan on screen at the first seed of kv_a, none on the rejected kv_b
    for name, ring in (("kv_a", True), ("kv_b", False)):
        view = panel._items[name]
        rect = view._target()
        scale = rect.width() / 256
        x, y = rect.left() + 10.5 * scale, rect.top() + 20.5 * scale
        assert _cyan_near(view, x, y, view.RING_RADIUS_PX + 2) is ring, name
    captions = {n: label.text() for n, label in panel._caption_labels.items()}
    assert captions["kv_a"] == "kv_a #17, 2.1 s ago: model point"
    assert captions["kv_b"] == f"kv_b #17, 2.1 s ago: {rejected}"
    # the panels beside it keep the widths they had before it showed images
    assert panel.minimumWidth() >= panel.MIN_WIDTH

    # a newer frame replaces the image; the same array is not set again
    newer = _view("kv_a", 18, seeds)
    panel.show_frames((newer, views[1]), 100.0, "")
    assert panel._items["kv_a"].image is not views[0].image
    assert panel._shown["kv_a"] is newer.image
    assert panel._caption_labels["kv_a"].text().startswith("kv_a #18")


@pytest.mark.parametrize("message", [NO_IMAGER, WAITING_FOR_IMAGE])
def test_without_images_the_panel_says_why(panel, message):
    panel.show_frames((), 100.0, message)
    assert panel.stack.currentWidget() is panel.placeholder
    assert panel.placeholder.text() == f"No imaging\n\n{message}"
    assert panel.placeholder.isVisible()


def test_display_image_is_small_windowed_and_shows_gold_bright():
    rng = np.random.default_rng(0)
    raw = rng.normal(30000, 300, (768, 1024)).clip(0, 65535).astype(np.uint16)
    raw[400:408, 600:608] = 5000  # a seed: dark in raw transmission
    image, factor = display_image(raw)
    assert factor == 4 and image.shape == (192, 256) and image.dtype == np.uint8
    assert image[100:102, 150:152].min() == 255  # the seed, bright as on a radiograph
    assert 60 < np.median(image) < 200  # the background mid-grey, not clipped


def _geometry(imager: str) -> ProjectionGeometry:
    from motionctl.simulators.xray_imager import room_stereo_geometry

    a, b = room_stereo_geometry()
    return a if imager == "kv_a" else b


def _fake_controller(frames, measurements, point_times=(), configured=True):
    estimator = SimpleNamespace(
        correlation=SimpleNamespace(point_times=tuple(point_times)),
        fiducial_reason=None,
        last_check_mm=math.nan,
    )
    xray = SimpleNamespace(configured=configured, frames=frames, measurements=measurements)
    return SimpleNamespace(
        cfg=CFG,
        core=SimpleNamespace(estimator=estimator),
        latest_xray=lambda: xray,
        session_t=lambda t: t - 1000.0,
    )


def test_live_source_marks_the_localised_seeds_and_sends_each_image_once():
    from motionctl.fiducials import project_points
    from motionctl.settings import seed_plan

    position = (1.0, -4.0, 2.0)
    geometries = {name: _geometry(name) for name in ("kv_a", "kv_b")}
    frames = {
        name: XrayFrame(
            "xray", 7, 0.0, 1010.0, np.full((g.height_px, g.width_px), 30000, np.uint16), g
        )
        for name, g in geometries.items()
    }
    m = FiducialMeasurement(
        "xray", 7, 1009.9, 1010.1, "stereo", True, "", position, (0.0, 0.0, 0.0), 3, 0.2, 0.3
    )
    controller = _fake_controller(frames, {7: m}, point_times=(8.0, 9.9))
    source = LiveSource(controller)  # its imaging part only: the controller is a stub
    view = source._imaging_view(12.0, (), new_images_only=True)
    assert [v.imager for v in view.views] == ["kv_a", "kv_b"]
    plan = seed_plan(CFG).points
    for v in view.views:
        g = geometries[v.imager]
        factor = math.ceil(max(g.width_px, g.height_px) / 256)
        assert v.image.shape == (g.height_px // factor, g.width_px // factor)
        full = project_points(g, plan + np.asarray(position))
        assert np.allclose(v.seeds_px * factor + (factor - 1) / 2, full)
        assert v.outcome == "model point" and v.accepted
        assert v.t_rx == pytest.approx(10.0)
    # the bridge's next frame: the same images are not sent again (a few hundred bytes)
    again = source._imaging_view(12.1, (), new_images_only=True)
    assert all(v.image is None for v in again.views)
    assert len(pickle.dumps(again)) < 2000 < len(pickle.dumps(view))

    # a rejected pair, then no result yet, then none at all
    nan3 = (math.nan,) * 3
    reason = "too_few_seeds: 1 of 3"
    bad = FiducialMeasurement(
        "xray", 7, 1009.9, 1010.1, "stereo", False, reason, nan3, nan3, 1, math.nan, math.nan
    )
    source = LiveSource(_fake_controller(frames, {7: bad}))
    v = source._imaging_view(12.0, (), False).views[0]
    assert v.outcome == "rejected: too few seeds: 1 of 3" and len(v.seeds_px) == 0
    source = LiveSource(_fake_controller(frames, {}))
    assert source._imaging_view(10.5, (), False).views[0].outcome == "localising"
    assert source._imaging_view(13.0, (), False).views[0].outcome == "not localised"
    assert LiveSource(_fake_controller({}, {}))._imaging_view(1.0, (), False).message == (
        WAITING_FOR_IMAGE
    )
    no_imager = _fake_controller({}, {}, configured=False)
    assert LiveSource(no_imager)._imaging_view(1.0, (), False).message == NO_IMAGER


@pytest.mark.rig
def test_stereo_images_reach_the_console_in_its_own_process_and_review_says_none(session, qtbot):
    s = session("imaging.rate_hz=4", "gating.hold_while_prediction_learns=false")
    console_end, bridge_end = multiprocessing.Pipe(duplex=True)
    bridge = ConsoleBridge(LiveSource(s.controller), bridge_end)
    bridge.start()
    try:
        source = RemoteSource(console_end, s.cfg)
        window = ConsoleWindow(source)
        qtbot.addWidget(window)
        window.show()
        panel = window.imaging

        def model_points() -> bool:
            views = window.state.imaging.views
            return len(views) == 2 and all(v.outcome == "model point" for v in views)

        qtbot.waitUntil(model_points, timeout=15000)
        window.refresh(slow=True)
        assert panel.stack.currentWidget() is panel.frames_page
        for view in window.state.imaging.views:
            image = panel._items[view.imager].image
            assert image is not None and image.shape == view.image.shape == (192, 256)
            # each mark sits on its seed: the simulator's truth (full-resolution pixels,
            # 4 to a display pixel), within half a display pixel
            truth = next(f for f in s.rig.xray.truth if f.frame_id == view.frame_id)
            seeds_px = (truth.views[view.imager].seeds_px - 1.5) / 4
            assert np.abs(view.seeds_px - seeds_px).max() < 0.5
            assert np.allclose(panel._items[view.imager].seeds, view.seeds_px)
            caption = panel._caption_labels[view.imager].text()
            assert caption.startswith(f"{view.imager} #{view.frame_id}, ")
            assert "s ago: model point" in caption
    finally:
        console_end.close()
        bridge.stop()
    s.close()

    review = ReviewWindow(ReviewSource(s.path))
    qtbot.addWidget(review)
    assert review.state.imaging.message == NO_IMAGES_IN_LOG
    assert review.imaging.stack.currentWidget() is review.imaging.placeholder
    assert review.imaging.placeholder.text().endswith(NO_IMAGES_IN_LOG)
    # ... while its device row counts the localised frames the log holds (it said "none yet")
    xray = next(d for d in review.state.devices if d.name == "xray")
    assert xray.samples > 0 and math.isfinite(xray.age_s)
