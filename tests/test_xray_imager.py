"""kV X-ray imaging: projection geometry, the fiducial renderer, and the IMAGE simulator and
driver over real loopback sockets (including pyigtl's own client and a misbehaving server)."""

from __future__ import annotations

import math
import queue
import socket
import struct
import threading
import time
from dataclasses import replace

import cv2
import numpy as np
import pyigtl
import pytest
from pyigtl.messages import CRC64

from motionctl.drivers.xray import (
    FramingError,
    MalformedMessage,
    XrayImageDriver,
    parse_header,
    parse_image,
)
from motionctl.simulators.patient import LujanParams, LujanPatient
from motionctl.simulators.xray_imager import (
    DEFAULT_SEEDS,
    OFFSET,
    XrayImagerSim,
    gantry_geometry,
    image_message,
    project,
    render_projection,
    room_stereo_geometry,
    seed_poses,
)
from motionctl.types import DeviceEvent, XrayFrame

TIMEOUT = 5.0
STEREO = room_stereo_geometry()
GANTRY_VIEWS = [gantry_geometry(g) for g in (0.0, 90.0, 180.0, 270.0, 33.0)]
ALL_VIEWS = [*STEREO, *GANTRY_VIEWS]


def _vec(v) -> np.ndarray:
    return np.asarray(v, dtype=float)


def _pitch(g) -> float:
    return float(np.linalg.norm(g.panel_u_mm))


# --------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("geometry", ALL_VIEWS, ids=lambda g: f"{g.imager}-{g.source_mm}")
def test_isocentre_projects_to_panel_centre(geometry):
    centre = ((geometry.width_px - 1) / 2, (geometry.height_px - 1) / 2)
    assert project(geometry, [[0.0, 0.0, 0.0]])[0] == pytest.approx(centre, abs=1e-9)


@pytest.mark.parametrize("geometry", ALL_VIEWS, ids=lambda g: f"{g.imager}-{g.source_mm}")
def test_points_along_one_ray_project_to_one_pixel(geometry):
    rng = np.random.default_rng(3)
    points = rng.uniform(-60, 60, (20, 3))
    source = _vec(geometry.source_mm)
    base = project(geometry, points)
    for scale in (0.7, 1.3):
        moved = source + scale * (points - source)
        assert project(geometry, moved) == pytest.approx(base, abs=1e-7)
    # ... and moving off the ray does move the pixel.
    assert not np.allclose(project(geometry, points + [0.0, 1.0, 0.0]), base)


@pytest.mark.parametrize(
    ("geometry", "sad", "sid"),
    [(STEREO[0], 2200.0, 3600.0), (STEREO[1], 2200.0, 3600.0), (GANTRY_VIEWS[4], 1000, 1500)],
)
def test_magnification_at_isocentre_is_sid_over_sad(geometry, sad, sid):
    expected_px = 10.0 * sid / sad / _pitch(geometry)
    for direction in (_vec(geometry.panel_u_mm), _vec(geometry.panel_v_mm)):
        half = 5.0 * direction / np.linalg.norm(direction)
        ends = project(geometry, [-half, half])
        assert np.linalg.norm(ends[1] - ends[0]) == pytest.approx(expected_px, rel=1e-9)
    assert np.linalg.norm(_vec(geometry.source_mm)) == pytest.approx(sad)


def test_stereo_sources_are_orthogonal_and_panels_face_them():
    a, b = (_vec(g.source_mm) for g in STEREO)
    assert a @ b == pytest.approx(0.0, abs=1e-9)
    assert (a[0], b[0]) == (pytest.approx(2200 / math.sqrt(2)), pytest.approx(-2200 / math.sqrt(2)))
    assert a[2] > 0 and b[2] > 0  # ceiling sources: both above the patient (anterior)
    for g in STEREO:
        normal = np.cross(g.panel_u_mm, g.panel_v_mm)
        # The panel is perpendicular to the central ray and u x v points away from the source.
        beam = -_vec(g.source_mm) / np.linalg.norm(g.source_mm)
        assert normal / np.linalg.norm(normal) == pytest.approx(beam, abs=1e-12)


def test_gantry_convention():
    # IEC 61217: gantry 0 = MV source up; the kV source is kv_offset_deg further round.
    assert gantry_geometry(0.0).source_mm == pytest.approx((1000.0, 0.0, 0.0), abs=1e-9)
    assert gantry_geometry(90.0).source_mm == pytest.approx((0.0, 0.0, -1000.0), abs=1e-9)
    assert gantry_geometry(0.0, kv_offset_deg=0.0).source_mm == pytest.approx((0, 0, 1000))
    assert gantry_geometry(90.0, kv_offset_deg=0.0).source_mm == pytest.approx((1000, 0, 0))
    # Head at the top of the image: a superior point has a smaller row.
    g = gantry_geometry(0.0)
    up, down = project(g, [[0, 10, 0], [0, -10, 0]])
    assert up[1] < down[1]


# --------------------------------------------------------------------------------------------
# Renderer

POSES = seed_poses(DEFAULT_SEEDS, (0.0, 0.0, 0.0))


def _render(geometry=STEREO[0], poses=POSES, seed=0, **kwargs):
    return render_projection(geometry, poses, rng=np.random.default_rng(seed), **kwargs)


def _deficit(geometry, poses, **kwargs) -> np.ndarray:
    """Noise-free loss of signal caused by ``poses`` (positive where they attenuate)."""
    empty, _ = _render(geometry, [], noise=0.0, **kwargs)
    with_seeds, _ = _render(geometry, poses, noise=0.0, **kwargs)
    return empty.astype(float) - with_seeds.astype(float)


@pytest.mark.parametrize("geometry", [*STEREO, GANTRY_VIEWS[0]], ids=lambda g: g.imager)
def test_render_shape_type_polarity_and_truth(geometry):
    image, truth = _render(geometry)
    assert image.dtype == np.uint16 and image.shape == (geometry.height_px, geometry.width_px)
    assert truth.seeds_px.shape == (3, 2) and truth.inside.all()
    assert truth.seeds_mm == pytest.approx(np.array([p.center_mm for p in POSES]))
    assert truth.names == ("seed_1", "seed_2", "coil")
    empty, _ = _render(geometry, [], noise=0.0)
    for i, j in truth.seeds_px:
        i, j = round(i), round(j)
        darkest = image[j - 1 : j + 2, i - 1 : i + 2].min()
        assert darkest < 0.8 * empty[j, i]  # transmission image: gold is dark
        assert empty[j, i] > 5 * OFFSET  # behind the body, well above the dark offset
        assert image[j, i] > OFFSET  # ... and the seed does not black out the panel


def test_truth_centre_is_the_centre_of_the_seed_shadow():
    geometry = STEREO[1]
    deficit = _deficit(geometry, POSES)
    for (i, j), pose in zip(_render(geometry)[1].seeds_px, POSES, strict=True):
        if pose.name == "coil":
            continue
        i0, j0 = round(i), round(j)
        box = deficit[j0 - 12 : j0 + 13, i0 - 12 : i0 + 13].clip(0)
        jj, ii = np.mgrid[j0 - 12 : j0 + 13, i0 - 12 : i0 + 13]
        centroid = (np.sum(ii * box) / box.sum(), np.sum(jj * box) / box.sum())
        assert centroid == pytest.approx((i, j), abs=0.3)


def _extent_px(deficit: np.ndarray, centre, radius=40, fraction=0.25) -> float:
    i0, j0 = round(centre[0]), round(centre[1])
    box = deficit[j0 - radius : j0 + radius + 1, i0 - radius : i0 + radius + 1]
    jj, ii = np.nonzero(box > fraction * box.max())
    points = np.stack([ii, jj], axis=1).astype(float)
    return float(max(np.linalg.norm(points - p, axis=1).max() for p in points))


def test_motion_blur_widens_the_seed_profile():
    geometry = STEREO[0]
    seed = [POSES[1]]  # a 1 x 3 mm seed
    _, truth = _render(geometry, seed)
    # Move along SI, i.e. down the panel's columns: the profile along j must widen.
    still = _deficit(geometry, seed, exposure_s=0.1)
    moving = _deficit(geometry, seed, exposure_s=0.1, velocity_mm_s=(0.0, 60.0, 0.0))
    i, j = np.round(truth.seeds_px[0]).astype(int)

    def width_j(d):
        column = d[j - 40 : j + 41, i - 2 : i + 3].max(axis=1)
        return int(np.sum(column > 0.5 * column.max()))

    assert width_j(moving) > width_j(still) + 0.6 * 6.0 * 1.64 / _pitch(geometry)
    assert moving.max() < still.max()  # the same gold spread over a longer track
    assert moving.sum() == pytest.approx(still.sum(), rel=0.05)


def test_coiled_marker_projects_longer_than_a_short_seed():
    geometry = STEREO[0]
    _, truth = _render(geometry)
    deficit = _deficit(geometry, POSES)
    seed_len = _extent_px(deficit, truth.seeds_px[0])
    coil_len = _extent_px(deficit, truth.seeds_px[2])
    assert truth.projected_length_px[2] > 2 * truth.projected_length_px[0]
    assert coil_len > 2 * seed_len
    assert coil_len == pytest.approx(truth.projected_length_px[2], abs=6)
    # A seed seen end-on foreshortens; seen side-on it shows its full magnified length.
    end_on = replace(POSES[0], axis=tuple(-_vec(geometry.source_mm) / 2200.0))
    side_on = replace(POSES[0], axis=tuple(_vec(geometry.panel_v_mm) / _pitch(geometry)))
    assert _render(geometry, [end_on])[1].projected_length_px[0] < 0.2
    full = 3.0 * 3600 / 2200 / _pitch(geometry)
    assert _render(geometry, [side_on])[1].projected_length_px[0] == pytest.approx(full, rel=0.02)


def test_distractor_appears_only_when_asked_and_away_from_the_seeds():
    geometry = STEREO[1]
    plain, truth_plain = _render(geometry, noise=0.0)
    clipped, truth = _render(geometry, noise=0.0, distractor=True)
    assert truth_plain.distractor_px is None and truth.distractor_px is not None
    i, j = np.round(truth.distractor_px).astype(int)
    diff = plain.astype(float) - clipped.astype(float)
    assert diff[j - 15 : j + 16, i - 15 : i + 16].max() > 0.2 * plain[j, i]
    assert np.linalg.norm(truth.seeds_px - truth.distractor_px, axis=1).min() > 40
    for si, sj in np.round(truth.seeds_px).astype(int):  # seeds untouched by the clip
        assert np.array_equal(
            plain[sj - 5 : sj + 6, si - 5 : si + 6], clipped[sj - 5 : sj + 6, si - 5 : si + 6]
        )


def test_background_is_smooth_without_seed_like_blobs():
    geometry = STEREO[0]
    empty, _ = _render(geometry, [], noise=0.0)
    seeded, truth = _render(geometry, noise=0.0)

    def blob_response(img):  # Laplacian of Gaussian at a 1 mm seed's scale, on -log(I)
        log_img = np.log(img.astype(np.float32) - OFFSET + 1.0)
        return np.abs(cv2.Laplacian(cv2.GaussianBlur(log_img, (0, 0), 2.0), cv2.CV_32F))

    background = blob_response(empty)[20:-20, 20:-20].max()
    seeds = blob_response(seeded)
    solid = [
        seeds[j - 3 : j + 4, i - 3 : i + 4].max()
        for i, j in np.round(truth.seeds_px[:2]).astype(int)
    ]
    assert background < 0.25 * min(solid)


def test_render_is_deterministic_for_a_seeded_rng_and_noise_scales():
    a, _ = _render(seed=7)
    b, _ = _render(seed=7)
    c, _ = _render(seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    clean, _ = _render(noise=0.0)
    loud, _ = _render(noise=3.0)
    patch = (slice(300, 340), slice(700, 740))
    quiet_sd = np.std(a[patch].astype(float) - clean[patch])
    loud_sd = np.std(loud[patch].astype(float) - clean[patch])
    assert 0 < quiet_sd and loud_sd == pytest.approx(3 * quiet_sd, rel=0.2)
    other_anatomy, _ = _render(noise=0.0, background_seed=5)
    assert not np.array_equal(clean, other_anatomy)


def test_overlapping_seeds_in_projection_add_up():
    geometry = STEREO[0]
    beam = -_vec(geometry.source_mm) / 2200.0
    near = replace(POSES[0], center_mm=(0.0, 0.0, 0.0))
    far = replace(POSES[0], center_mm=tuple(30.0 * beam))  # on the same central ray
    one = _deficit(geometry, [near])
    two = _deficit(geometry, [near, far])
    assert two.max() > one.max()


def test_render_time_per_frame():
    rng = np.random.default_rng(0)
    for geometry in STEREO:
        render_projection(geometry, POSES, rng=rng)  # background cached
    n = 10
    start = time.perf_counter()
    for k in range(n):
        render_projection(STEREO[k % 2], POSES, rng=rng, velocity_mm_s=(0, 20, 5))
    per_frame_ms = (time.perf_counter() - start) / n * 1e3
    print(f"render_projection 1024x768: {per_frame_ms:.1f} ms per frame")
    assert per_frame_ms > 0


# --------------------------------------------------------------------------------------------
# Simulator and driver over loopback sockets


def _collect(q: queue.Queue, n: int, kind=XrayFrame) -> list:
    out = []
    while len(out) < n:
        item = q.get(timeout=TIMEOUT)
        if isinstance(item, kind):
            out.append(item)
    return out


def _geometry_close(a, b) -> bool:
    return (
        a.imager == b.imager
        and (a.width_px, a.height_px) == (b.width_px, b.height_px)
        and all(
            np.allclose(getattr(a, f), getattr(b, f), rtol=1e-6, atol=2e-4)
            for f in ("source_mm", "panel_origin_mm", "panel_u_mm", "panel_v_mm")
        )
    )


def test_stereo_frames_end_to_end():
    patient = LujanPatient(LujanParams(), seed=4)
    wall_offset = 1.7e9
    sim = XrayImagerSim(
        patient,
        STEREO,
        rate_hz=15.0,
        keep_images=True,
        exposure_s=0.02,
        geometry_name="room_stereo",
        wall_clock=lambda: time.monotonic() + wall_offset,
    )
    received: queue.Queue = queue.Queue()
    driver = XrayImageDriver(
        *sim.start(), received.put, wall_clock=lambda: time.monotonic() + wall_offset
    )
    driver.start()
    try:
        frames = _collect(received, 6)
    finally:
        driver.stop()
        sim.stop()
    truth = {t.frame_id: t for t in sim.truth}
    by_id: dict[int, dict[str, XrayFrame]] = {}
    for frame in frames:
        by_id.setdefault(frame.frame_id, {})[frame.geometry.imager] = frame
    complete = [fid for fid, views in by_id.items() if len(views) == 2]
    assert len(complete) == 3  # each acquisition arrives as a pair sharing its frame id
    builders = {g.imager: g for g in STEREO}
    for frame in frames:
        t = truth[frame.frame_id]
        assert frame.device == "xray"
        assert _geometry_close(frame.geometry, builders[frame.geometry.imager])
        assert np.array_equal(frame.image, t.images[frame.geometry.imager])
        assert frame.exposure_s == pytest.approx(0.02)
        # Mid-exposure: the exposure ends when the image is read out.
        assert frame.t_device == pytest.approx(t.t_acquisition, abs=1e-6)
        assert frame.t_device - wall_offset == pytest.approx(t.t_clock, abs=2e-3)
        assert t.t_patient == pytest.approx(t.t_clock - sim.t0, abs=1e-9)
        assert t.target_mm == pytest.approx(patient.state(t.t_patient).target_mm)
        assert frame.t_rx >= t.t_clock
        view = t.views[frame.geometry.imager]
        assert view.seeds_px == pytest.approx(project(frame.geometry, view.seeds_mm), abs=1e-2)
    assert [t.frame_id for t in sim.truth] == list(range(len(sim.truth)))


def test_pyigtl_client_reads_simulator_images():
    geometry = gantry_geometry(30.0)
    sim = XrayImagerSim(LujanPatient(LujanParams()), [geometry], rate_hz=10.0, keep_images=True)
    host, port = sim.start()
    client = pyigtl.OpenIGTLinkClient(host, port)
    try:
        message = client.wait_for_message("kv", timeout=TIMEOUT)
    finally:
        client.stop()
        sim.stop()
    assert message is not None and message.message_type == "IMAGE"
    assert message.header_version == 2
    assert message.image.shape == (1, 768, 1024) and message.image.dtype.kind == "u"
    frame_id = int(message.metadata["frame_id"])
    assert message.message_id == frame_id
    assert np.array_equal(message.image[0], sim.truth[frame_id].images["kv"])
    m = message.ijk_to_world_matrix
    assert m[:3, 0] == pytest.approx(geometry.panel_u_mm, abs=1e-6)
    assert m[:3, 1] == pytest.approx(geometry.panel_v_mm, abs=1e-6)
    assert m[:3, 3] == pytest.approx(geometry.panel_origin_mm, abs=2e-4)
    source = [float(x) for x in message.metadata["source_mm"].split()]
    assert source == pytest.approx(geometry.source_mm)
    for key in ("t_acquisition", "exposure_s", "geometry"):
        assert key in message.metadata


class _SinePatient:
    """Target SI = 10 sin(2 pi t / period): exhale (rising SI) through 0 once a period."""

    def __init__(self, period_s: float):
        self.period_s = period_s

    def state(self, t):
        from types import SimpleNamespace

        si = 10.0 * math.sin(2 * math.pi * t / self.period_s)
        return SimpleNamespace(target_mm=(0.0, si, 0.0), surrogate_mm=(0.0, 0.0, si))


@pytest.mark.parametrize("trigger", ["phase", "amplitude"])
def test_breathing_triggered_acquisition(trigger):
    period = 0.5
    sim = XrayImagerSim(
        _SinePatient(period), [STEREO[0]], rate_hz=15.0, trigger=trigger, trigger_si_mm=2.0
    )
    received: queue.Queue = queue.Queue()
    driver = XrayImageDriver(*sim.start(), received.put)
    driver.start()
    try:
        frames = _collect(received, 4)
    finally:
        driver.stop()
        sim.stop()
    truth = [t for t in sim.truth if t.frame_id in {f.frame_id for f in frames}]
    assert len(truth) == 4
    rising = math.asin(2.0 / 10.0) / (2 * math.pi) * period  # SI crosses 2 mm going up
    falling = period / 2 - rising  # ... and going down
    crossings = []
    for t in truth:
        end = t.t_patient + 0.5 * sim.exposure_s  # the exposure ends when it is triggered
        last = max(
            (k * period + offset, kind)
            for k in range(-1, int(end / period) + 2)
            for offset, kind in ((rising, "exhale"), (falling, "inhale"))
            if k * period + offset <= end
        )
        # Triggered at the first 50 Hz poll after the crossing (0.1 s allows for a busy CPU).
        assert 0.0 <= end - last[0] < 0.1
        crossings.append(last)
    kinds = {kind for _, kind in crossings}
    if trigger == "phase":
        assert kinds == {"exhale"}  # exhale only, once per cycle
        assert all(np.diff([c for c, _ in crossings]) >= period - 1e-9)
    else:
        assert kinds == {"exhale", "inhale"}


def test_simulator_rejects_bad_settings():
    patient = _SinePatient(1.0)
    with pytest.raises(ValueError, match="rate_hz"):
        XrayImagerSim(patient, STEREO, rate_hz=30.0)
    with pytest.raises(ValueError, match="trigger"):
        XrayImagerSim(patient, STEREO, trigger="gated")
    with pytest.raises(ValueError, match="distinct"):
        XrayImagerSim(patient, [STEREO[0], STEREO[0]])


def test_a_client_that_never_reads_is_dropped_and_never_stalls_imaging():
    sim = XrayImagerSim(_SinePatient(1.0), STEREO, rate_hz=15.0)
    host, port = sim.start()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((host, port))
    received: queue.Queue = queue.Queue()
    driver = XrayImageDriver(host, port, received.put)
    try:
        assert sim.wait_for_client(TIMEOUT)
        driver.start()
        # Far more image bytes than two sockets' buffers hold: the stalled client must have
        # been dropped (after the send timeout) for the frames to keep coming.
        while _collect(received, 1)[0].frame_id < 14:
            pass
        assert sim.client_count == 1
        start = time.monotonic()
        sim.stop()
        assert time.monotonic() - start < 1.5
    finally:
        driver.stop()
        stalled.close()
        sim.stop()


# --------------------------------------------------------------------------------------------
# Malformed input from a misbehaving server

SMALL = gantry_geometry(0.0, width_px=64, height_px=48, pitch_mm=0.4)


def _image_bytes(
    *,
    geometry=SMALL,
    image=None,
    frame_id=1,
    t_acquisition=None,
    source=None,
    metadata_drop=(),
    header_version=2,
):
    if image is None:
        image = np.full((geometry.height_px, geometry.width_px), 1000 + frame_id, np.uint16)
    t = time.time() if t_acquisition is None else t_acquisition
    message = image_message(
        geometry, image, frame_id=frame_id, t_acquisition=t, exposure_s=0.01, geometry_name="g"
    )
    if source is not None:
        message.metadata["source_mm"] = source
    for key in metadata_drop:
        del message.metadata[key]
    message.header_version = header_version
    return message.pack()


def _parse(data: bytes, **kwargs):
    fields, crc = parse_header(data[:58])
    body = data[58 : 58 + fields["body_size"]]
    kwargs.setdefault("wall_now", time.time())
    kwargs.setdefault("expected_size", (64, 48))
    return parse_image(fields, body, crc, **kwargs)


def test_image_round_trip_on_bytes():
    frame_id, t_acq, exposure, image, geometry = _parse(
        _image_bytes(frame_id=9, t_acquisition=1234.5), wall_now=2000.0
    )
    assert (frame_id, t_acq, exposure) == (9, 1234.5, 0.01)
    assert image.shape == (48, 64) and image.dtype == np.uint16 and image[0, 0] == 1009
    assert not image.flags.writeable
    assert _geometry_close(geometry, SMALL)
    assert _parse(_big_endian(_image_bytes(frame_id=513)))[3][5, 5] == 1513


def _big_endian(data: bytes) -> bytes:
    """The same IMAGE with its pixels sent big-endian (pyigtl only packs native order)."""
    fields, _ = parse_header(data[:58])
    body = bytearray(data[58:])
    ext_size, meta_header, meta_size, _ = struct.unpack(">HHII", body[:12])
    content_end = len(body) - meta_header - meta_size
    assert body[ext_size + 4] == 2  # endianness byte: little
    body[ext_size + 4] = 1
    pixels = slice(ext_size + 72, content_end)
    body[pixels] = np.frombuffer(bytes(body[pixels]), "<u2").astype(">u2").tobytes()
    header = bytearray(data[:58])
    header[50:58] = struct.pack(">Q", CRC64(bytes(body)))
    return bytes(header) + bytes(body)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"image": np.zeros((48, 64), np.float32)}, "uint16"),
        ({"image": np.zeros((48, 64), np.uint8)}, "uint16"),
        ({"image": np.zeros((40, 64), np.uint16)}, "size 64x40"),
        ({"geometry": replace(SMALL, panel_u_mm=(math.nan, 0.0, 0.0))}, "non-finite"),
        ({"geometry": replace(SMALL, panel_u_mm=(0.0, 0.0, 5.0))}, "pitch"),
        ({"geometry": replace(SMALL, panel_v_mm=(0.0, 0.0, -0.01))}, "pitch"),
        ({"source": "-500 0 0"}, "panel plane"),
        ({"source": "1 2"}, "3 numbers"),
        ({"source": "1 nan 2"}, "non-finite"),
        ({"metadata_drop": ("t_acquisition",)}, "t_acquisition missing"),
        ({"metadata_drop": ("frame_id",)}, "frame_id missing"),
        ({"t_acquisition": time.time() + 3600.0}, "future"),
        ({"header_version": 1}, "version 2 required"),
    ],
)
def test_bad_images_are_malformed(kwargs, what):
    with pytest.raises(MalformedMessage, match=what):
        _parse(_image_bytes(**kwargs))


def test_future_limit_and_header_framing():
    data = _image_bytes(t_acquisition=1000.5)
    assert _parse(data, wall_now=1000.0, max_future_s=1.0)[1] == 1000.5
    with pytest.raises(MalformedMessage, match="future"):
        _parse(data, wall_now=1000.0, max_future_s=0.1)
    with pytest.raises(FramingError, match="body size"):
        parse_header(data[:58], max_body_bytes=100)
    with pytest.raises(FramingError, match="version"):
        parse_header(b"\x00\x07" + data[2:58])


class _RawServer:
    """A loopback server that sends exactly the bytes a test gives it (a misbehaving device)."""

    def __init__(self, payloads: list[bytes]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.payloads = payloads
        self.thread = threading.Thread(target=self._serve, name="raw-server")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def _serve(self) -> None:
        self.listener.settimeout(TIMEOUT)
        for payload in self.payloads:
            conn, _ = self.listener.accept()
            with conn:
                try:
                    conn.sendall(payload)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # until the driver closes its side
                except OSError:
                    # The driver hung up first (framing lost on the garbage at the end, or
                    # bytes left unread): expected; serve the next connection.
                    pass

    def close(self) -> None:
        self.thread.join(timeout=TIMEOUT)
        self.listener.close()


def test_driver_rejects_bad_images_with_a_reason_and_keeps_running():
    corrupt = bytearray(_image_bytes(frame_id=6))
    corrupt[-200] ^= 0xFF
    transform = pyigtl.TransformMessage(np.eye(4), device_name="kv").pack()
    stream = b"".join(
        [
            _image_bytes(frame_id=1),
            _image_bytes(frame_id=2, image=np.zeros((96, 128), np.uint16)),
            _image_bytes(frame_id=3, image=np.zeros((48, 64), np.float32)),
            _image_bytes(frame_id=4, geometry=replace(SMALL, panel_origin_mm=(0, math.nan, 0))),
            _image_bytes(frame_id=5, t_acquisition=time.time() + 60.0),
            bytes(corrupt),
            transform,
            _image_bytes(frame_id=7),
            b"\xde\xad" * 40,  # garbage: framing lost, reconnect
        ]
    )
    server = _RawServer([stream, _image_bytes(frame_id=8)])
    received: queue.Queue = queue.Queue()
    driver = XrayImageDriver(
        "127.0.0.1", server.port, received.put, expected_size=(64, 48), reconnect_max_s=0.2
    )
    driver.start()
    items = []
    try:
        while not any(isinstance(i, XrayFrame) and i.frame_id == 8 for i in items):
            items.append(received.get(timeout=TIMEOUT))
    finally:
        driver.stop()
        server.close()
    frames = [i.frame_id for i in items if isinstance(i, XrayFrame)]
    malformed = [i.detail for i in items if isinstance(i, DeviceEvent) and i.kind == "malformed"]
    assert frames == [1, 7, 8]
    assert len(malformed) == 6
    for detail, what in zip(
        malformed, ["size 128x96", "uint16", "non-finite", "future", "CRC", "header"], strict=True
    ):
        assert what in detail
    assert all("'kv'" in d for d in malformed[:5])
    counts = dict(driver.counts)
    # A third connect may race the stop: the listener's backlog accepts it after frame 8.
    assert counts.pop("connects") >= 2
    assert counts == {"frames": 3, "malformed": 6, "ignored": 1}
    assert any(isinstance(i, DeviceEvent) and i.kind == "disconnected" for i in items)


# --------------------------------------------------------------------------------------------
# Runtime faults of the simulator (the FaultTarget protocol), seen through the driver


class _Imaging:
    """A small fast imager (64 x 48 px, 15 Hz) and a driver reading it into a queue."""

    def __init__(self, patient=None, **kwargs):
        from motionctl.simulators.patient import LujanParams as _P

        self.patient = patient or LujanPatient(_P(), seed=2)
        self.sim = XrayImagerSim(self.patient, [SMALL], rate_hz=15.0, **kwargs)
        self.items: queue.Queue = queue.Queue()
        self.driver = XrayImageDriver(
            *self.sim.start(), self.items.put, expected_size=(64, 48), reconnect_max_s=0.1
        )
        self.driver.start()

    def frames(self, n: int) -> list[XrayFrame]:
        return [i for i in self.until(lambda got: _count(got, XrayFrame) >= n) if _is_frame(i)]

    def until(self, done, timeout: float = TIMEOUT) -> list:
        got: list = []
        deadline = time.monotonic() + timeout
        while not done(got):
            got.append(self.items.get(timeout=max(0.01, deadline - time.monotonic())))
        return got

    def drain(self) -> list:
        got = []
        while True:
            try:
                got.append(self.items.get_nowait())
            except queue.Empty:
                return got

    def close(self) -> None:
        self.driver.stop()
        self.sim.stop()


def _is_frame(item) -> bool:
    return isinstance(item, XrayFrame)


def _count(items, kind, event: str | None = None) -> int:
    return sum(1 for i in items if isinstance(i, kind) and (event is None or i.kind == event))


@pytest.fixture
def imaging():
    made: list[_Imaging] = []

    def start(**kwargs) -> _Imaging:
        made.append(_Imaging(**kwargs))
        return made[-1]

    yield start
    for m in made:
        m.close()


def test_fault_api_refuses_unknown_kinds_and_is_idempotent():
    from motionctl.simulators.faults import FAULT_KINDS, FaultTarget

    sim = XrayImagerSim(_SinePatient(1.0), [SMALL])
    assert isinstance(sim, FaultTarget)
    assert sim.supported_faults == FAULT_KINDS
    with pytest.raises(ValueError, match="does not support fault 'melt'"):
        sim.start_fault("melt")
    with pytest.raises(ValueError, match="does not support"):
        sim.stop_fault("melt")
    for kind in FAULT_KINDS:  # not running: the state changes, nothing to wait for
        sim.start_fault(kind)
        sim.start_fault(kind)
    assert sim.active_faults() == FAULT_KINDS
    for kind in FAULT_KINDS:
        sim.stop_fault(kind)
        sim.stop_fault(kind)
    assert sim.active_faults() == ()


def test_freeze_stops_imaging_and_uses_no_frame_ids(imaging):
    im = imaging()
    im.frames(2)
    im.sim.start_fault("freeze")
    time.sleep(0.05)  # a frame queued for the wire before the freeze may still go out
    made = len(im.sim.sent)
    sent_ids = {s.frame_id for s in im.sim.sent}
    time.sleep(0.3)  # 4.5 frame periods
    assert len(im.sim.sent) == made
    assert all(f.frame_id in sent_ids for f in im.drain() if _is_frame(f))
    im.sim.stop_fault("freeze")
    im.frames(2)
    ids = [t.frame_id for t in im.sim.truth]
    assert ids == list(range(len(ids)))  # no frame id was spent while frozen


def test_disconnect_closes_the_link_refuses_connects_and_recovers(imaging):
    im = imaging()
    im.frames(1)
    im.sim.start_fault("disconnect")
    # Effective when start_fault returns: the client is gone and a connect is refused.
    assert im.sim.client_count == 0
    with pytest.raises(OSError):
        socket.create_connection(im.sim.address, timeout=1.0).close()
    got = im.until(lambda g: _count(g, DeviceEvent, "disconnected") >= 1)
    sent = len(im.sim.sent)
    time.sleep(0.25)
    assert len(im.sim.sent) == sent  # no client, no acquisitions
    im.sim.stop_fault("disconnect")
    got = im.until(lambda g: _count(g, XrayFrame) >= 1)
    assert _count(got, DeviceEvent, "connected") >= 1
    assert im.driver.counts["connects"] >= 2


def test_garbage_loses_the_framing_at_every_frame_and_images_resume(imaging):
    im = imaging()
    im.frames(1)
    im.sim.start_fault("garbage")
    got = im.until(lambda g: _count(g, DeviceEvent, "malformed") >= 2)
    im.sim.stop_fault("garbage")
    malformed = [i.detail for i in got if isinstance(i, DeviceEvent) and i.kind == "malformed"]
    assert all(d.startswith("header") for d in malformed)
    assert _count(got, DeviceEvent, "disconnected") >= 1  # framing lost: reconnect
    noise = [s for s in im.sim.sent if s.fault == "garbage"]
    assert noise and all(s.frame_id is None for s in noise)
    im.frames(1)  # and images again once the fault has ended


def test_nan_geometry_and_time_are_malformed(imaging):
    im = imaging()
    im.frames(1)
    im.sim.start_fault("nan")
    got = im.until(lambda g: _count(g, DeviceEvent, "malformed") >= 1)
    im.sim.stop_fault("nan")
    detail = next(i.detail for i in got if isinstance(i, DeviceEvent) and i.kind == "malformed")
    assert "non-finite ijk_to_world" in detail and "'kv'" in detail
    assert any(s.fault == "nan" and math.isnan(s.t_acquisition) for s in im.sim.sent)
    im.frames(1)


def test_delay_sends_frames_late_in_order_and_the_backlog_at_the_end(imaging):
    im = imaging()
    im.frames(1)
    im.sim.fault_delay_s = 0.2
    im.sim.start_fault("delay")
    time.sleep(0.5)
    im.sim.stop_fault("delay")
    delayed = [s for s in im.sim.sent if s.fault == "delay"]
    assert len(delayed) >= 4
    late = [s.t_sent - s.t_made for s in delayed]
    assert max(late) >= 0.19  # the full delay while the fault lasted ...
    assert min(late) >= 0.0  # ... and the backlog went out at once when it ended
    ids = [s.frame_id for s in im.sim.sent]
    assert ids == sorted(ids)  # in order
    # Every frame made was sent by the time stop_fault returned.
    assert im.sim.truth[-1].frame_id == delayed[-1].frame_id
    frames = [f for f in im.frames(len(ids)) if f.frame_id in {s.frame_id for s in delayed}]
    for frame in frames:  # stamped with the true acquisition time, not the send time
        sent = next(s for s in delayed if s.frame_id == frame.frame_id)
        assert frame.t_device == pytest.approx(sent.t_acquisition, abs=1e-6)


def test_reorder_swaps_frames_pairwise(imaging):
    im = imaging()
    im.frames(1)
    im.sim.start_fault("reorder")
    time.sleep(0.45)
    im.sim.stop_fault("reorder")
    shaped = [s.frame_id for s in im.sim.sent if s.fault == "reorder"]
    assert len(shaped) >= 4
    swapped = [(a, b) for a, b in zip(shaped[::2], shaped[1::2], strict=False)]
    assert all(b == a - 1 for a, b in swapped), shaped
    frames = im.frames(len(im.sim.sent))
    received = [f.frame_id for f in frames if f.frame_id in set(shaped)]
    assert received[:2] == shaped[:2]  # the driver sees them in wire order


def test_jump_moves_the_imaged_seeds_but_not_the_patient(imaging):
    patient = _SinePatient(1.0)
    im = imaging(patient=patient)
    im.frames(1)
    im.sim.start_fault("jump")
    im.until(lambda g: _count(g, XrayFrame) >= 3)
    im.sim.stop_fault("jump")
    jumped = [t for t in im.sim.truth if t.fault == "jump"]
    assert jumped
    for t in jumped:
        model = patient.state(t.t_patient).target_mm
        assert np.subtract(t.target_mm, model) == pytest.approx(im.sim.jump_mm)
        # The seeds are drawn where the shifted constellation is.
        assert np.mean([p.center_mm for p in t.seeds], axis=0) - np.mean(
            [p.center_mm for p in seed_poses(im.sim.seeds, model, rotation_deg=t.rotation_deg)],
            axis=0,
        ) == pytest.approx(im.sim.jump_mm, abs=1e-9)


def test_clock_skew_steps_the_acquisition_time_back(imaging):
    im = imaging()
    im.frames(1)
    im.sim.start_fault("clock-skew")
    got = [i for i in im.until(lambda g: _count(g, XrayFrame) >= 3) if _is_frame(i)]
    im.sim.stop_fault("clock-skew")
    skewed = {s.frame_id for s in im.sim.sent if s.fault == "clock-skew"}
    frames = [f for f in got if f.frame_id in skewed]
    assert frames
    for frame in frames:
        lag = time.time() - frame.t_device
        assert 1.9 < lag < 2.5  # two seconds early (plus the transfer)
