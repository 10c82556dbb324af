"""Simulated kV X-ray imaging of implanted gold fiducials, and an OpenIGTLink IMAGE server.

Three layers, each usable on its own:

- **Geometry builders** return ``motionctl.types.ProjectionGeometry`` (point source, flat
  panel, IEC 61217 patient coordinates with the isocentre at the origin, mm), and
  ``project`` maps 3-D points to panel pixels by perspective projection.
- **The renderer** ``render_projection`` draws one 16-bit kV projection of a set of gold
  seeds over a smooth, static abdominal anatomy, returning the image and its ground truth.
- **The simulator** ``XrayImagerSim`` images a simulated patient at a fixed rate or on a
  breathing trigger and streams every view as an OpenIGTLink IMAGE message (the protocol
  is documented in ``drivers/xray.py``). Ground truth stays in the object (``truth``).

Geometry conventions
--------------------
Patient axes (IEC 61217, patient supine head-first, couch at 0): x = LR (+left),
y = SI (+superior), z = AP (+anterior). A source at *source angle* ``phi`` sits at
``SAD * (sin phi, 0, cos phi)``: phi = 0 above the patient, phi = +90 at the patient's left.
For a gantry this is the IEC 61217 gantry angle (clockwise seen from the foot of the couch,
0 = source up, 90 = source at the patient's left for head-first supine).

Panel axes: rows run inferior (``panel_v`` = -SI * pitch) and columns run towards the right
of the image as seen *from the source* (``panel_u`` = beam direction x SI * pitch), so the
images read like a beam's-eye view with the head at the top; ``panel_u x panel_v`` points
along the beam, away from the source. The panel is centred on the source-isocentre line:
the isocentre projects to pixel ((width-1)/2, (height-1)/2).

- ``room_stereo_geometry``: two room-mounted source/panel pairs in the transverse plane, at
  +angle_deg ("kv_a", source above the patient's left) and -angle_deg ("kv_b", above the
  patient's right) from vertical, orthogonal at 45 deg. Sources in the ceiling, panels in
  the floor, as on a CyberKnife: source to isocentre 2200 mm, source to panel 3600 mm
  (approximately CyberKnife-like; magnification 1.64 at the isocentre). ExacTrac is similar
  in scale but floor-mounted sources, panels above, and non-coplanar: set values per site.
- ``gantry_geometry``: one gantry-mounted on-board kV imager (Varian OBI / Elekta XVI-like),
  source at 1000 mm, panel at 1500 mm from the source. Its source angle is
  ``gantry_deg + kv_offset_deg``: the kV arm is at 90 deg to the MV beam; whether it leads
  or trails the MV source is vendor-specific, so the offset (default +90) is a parameter.

Image convention (polarity)
---------------------------
Pixel values are **raw transmitted intensity** of a gain/offset (flat-field) corrected
panel: high value = many photons = little attenuation. Gold seeds, bone and clips are
**dark**; lung and bowel gas are bright; rays that miss the body saturate at 65535. To get
the log-normalised attenuation image (gold bright), use ``-log((value - OFFSET) / I0)``.

Physics (approximate but honest)
--------------------------------
- Beer-Lambert attenuation of an effective mono-energetic beam (~70 keV effective energy):
  line integrals through soft tissue (elliptic-cylinder body, analytic chord), lungs above a
  curved diaphragm dome and a stomach gas bubble (ellipsoids, analytic chords), a spine
  (cylinder) and ribs (curved bands of bone, ray-marched), computed on a 4x coarser grid and
  cubically upsampled, so the background is smooth with no seed-like blobs. Deterministic per
  ``background_seed``; cached per (geometry, background_seed): the first frame of a geometry
  costs ~0.3 s, later ones ~15-20 ms (1024 x 768). A rotating gantry would pay the 0.3 s
  for every new angle.
- Gold seeds are finite cylinders (exact ray-cylinder chords, 2x2 supersampled per pixel),
  so perspective magnification and foreshortening of the projected length follow the seed's
  axis. A coiled marker (Visicoil-like) is a thin cylinder with a gold fill fraction.
- Focal-spot penumbra (1.0 mm focal spot, scaled by the seed's magnification) and detector
  blur (scintillator, 0.15 mm) as one Gaussian on the seed's transmission.
- Motion blur: the transmission is averaged over sub-positions along velocity x exposure,
  centred on the mid-exposure position (the truth).
- Scatter only as a smooth additive fluence (scatter-to-primary ratio 0.5, behind a grid).
- Noise: quantum noise with Poisson variance (normal approximation: counts are in the
  thousands behind the body) plus Gaussian electronic noise, both scaled by ``noise``;
  quantum noise grows as exposure falls (fixed tube current), image brightness does not.

What it does NOT model: polychromatic spectra and beam hardening, object-dependent scatter,
the heel effect and inverse-square fall-off (the image is flat-field corrected), panel lag
and ghosting, dead pixels, gantry sag and flex, breathing of the anatomy background (only
the seeds move: ribs, diaphragm and gas are static), seed migration, deformation of the
constellation beyond a small breathing-correlated rotation, tube warm-up or dose limits,
and imaging-system latency beyond the exposure itself.

Faults
------
``XrayImagerSim`` takes runtime faults (``start_fault(kind)`` / ``stop_fault(kind)``, the
``FaultTarget`` protocol of ``simulators/faults.py``; all of ``FAULT_KINDS``; several may be
on together, the first that applies in this list wins). A fault acts on frames (one frame =
every view of one acquisition, sharing a frame id); an image fault can only show when the
next frame is due, so at ``rate_hz`` the receiver sees it up to one frame period after it
started (a breathing trigger: up to one breathing cycle).

============  ==============================================================================
disconnect    every client connection is closed and the listening socket too, so a connect
              is refused (the imaging workstation went off the network); no client, no
              acquisitions. At the end the server listens again on the same port and the
              driver reconnects with its back-off. Frames queued by ``delay``/``reorder``
              are lost with the connection.
freeze        connected, but the imager stops acquiring: no images, no frame ids used (a
              tube or generator interlock, a stalled acquisition chain).
garbage       each frame is replaced by ``garbage_bytes`` (200) random bytes: more than an
              OpenIGTLink header (58 bytes), so the receiver reads a header of noise, loses
              the framing, drops the connection and reconnects, and gets noise again at the
              next frame while the fault lasts. No frame id is used (nothing imaged).
delay         every frame is sent ``fault_delay_s`` (0.5 s) after it was ready, in order,
              stamped with its true acquisition time (a congested link or a slow
              reconstruction); when the fault ends the backlog goes out at once.
reorder       consecutive frames swap pairwise (frame ids 1, 0, 3, 2, ...; the views of one
              frame stay together); the held frame goes one frame period late. At the end a
              held frame goes out at once.
nan           the geometry is lost: the panel origin (the translation of ijk_to_world) is
              NaN, NaN, NaN and the ``t_acquisition`` metadata reads "nan" (the pixels are
              uint16 and cannot be NaN). The driver reports such images as malformed.
jump          the imaged target -- the whole seed constellation -- is ``jump_mm``
              ((0, 10, 0): 10 mm superior) away from where the patient model has it, while
              the surrogate (another simulator, driven by the same model) does not move: an
              internal baseline shift the surrogate does not show, which is exactly what
              the fiducial check and the correlation model must catch. The
              breathing-correlated rotation is unchanged; ``truth`` records the shifted
              target (``TruthFrame.fault`` says so).
clock-skew    ``t_acquisition`` (and the header timestamp) are ``clock_skew_s`` (2 s) early
              for the duration: the imaging system's clock stepped back, then forward again
              at the end.
============  ==============================================================================

Every frame sent is recorded in ``sent`` (``SentImage``: frame id, send time, the fault
that shaped it), so a test can find the first faulty frame the receiver got.
``start_fault``/``stop_fault`` return once the change is in effect on the wire: for
``disconnect`` the listener is closed and every client gone, and at its end the server
listens again; when ``delay`` or ``reorder`` ends, the backlog has been sent; the other
kinds shape every frame made after the call returns (a frame already being rendered goes
out as it was begun, except under ``freeze``/``disconnect``, which drop it; a frame already
queued for the wire under ``freeze`` still goes out: it was acquired before).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyigtl

from motionctl.simulators.faults import fault_label
from motionctl.simulators.igtl_server import IgtlServerSim
from motionctl.types import ProjectionGeometry

log = logging.getLogger("motionctl.sim.xray")

__all__ = [
    "DEFAULT_SEEDS",
    "OFFSET",
    "RenderTruth",
    "Seed",
    "SeedPose",
    "SentImage",
    "TruthFrame",
    "XrayImagerSim",
    "gantry_geometry",
    "ijk_to_world",
    "image_message",
    "project",
    "render_projection",
    "room_stereo_geometry",
    "seed_poses",
]

Vec3 = tuple[float, float, float]

# --------------------------------------------------------------------------------------------
# Geometry


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _tuple3(v) -> Vec3:
    return (float(v[0]), float(v[1]), float(v[2]))


def _geometry_at_angle(
    imager: str,
    source_angle_deg: float,
    sad_mm: float,
    sid_mm: float,
    width_px: int,
    height_px: int,
    pitch_mm: float,
) -> ProjectionGeometry:
    if not (0 < sad_mm < sid_mm):
        raise ValueError(f"need 0 < sad_mm < sid_mm, got sad {sad_mm}, sid {sid_mm}")
    if width_px < 2 or height_px < 2 or not pitch_mm > 0:
        raise ValueError("panel must be at least 2x2 pixels with a positive pitch")
    phi = math.radians(source_angle_deg)
    towards_source = np.array([math.sin(phi), 0.0, math.cos(phi)])
    beam = -towards_source
    source = sad_mm * towards_source
    centre = source + sid_mm * beam
    u = np.cross(beam, (0.0, 1.0, 0.0)) * pitch_mm  # right, seen from the source
    v = np.array([0.0, -pitch_mm, 0.0])  # rows run inferior: head at the top
    origin = centre - 0.5 * (width_px - 1) * u - 0.5 * (height_px - 1) * v
    return ProjectionGeometry(
        imager=imager,
        source_mm=_tuple3(source),
        panel_origin_mm=_tuple3(origin),
        panel_u_mm=_tuple3(u),
        panel_v_mm=_tuple3(v),
        width_px=int(width_px),
        height_px=int(height_px),
    )


def room_stereo_geometry(
    sad_mm: float = 2200.0,
    sid_mm: float = 3600.0,
    angle_deg: float = 45.0,
    width_px: int = 1024,
    height_px: int = 768,
    pitch_mm: float = 0.4,
    names: tuple[str, str] = ("kv_a", "kv_b"),
) -> tuple[ProjectionGeometry, ProjectionGeometry]:
    """A room-mounted stereoscopic pair: sources at +/-``angle_deg`` from vertical.

    "kv_a" has its source above the patient's left (source angle +angle_deg), "kv_b" above
    the patient's right; with 45 deg the two beams cross at 90 deg at the isocentre.
    """
    return (
        _geometry_at_angle(names[0], angle_deg, sad_mm, sid_mm, width_px, height_px, pitch_mm),
        _geometry_at_angle(names[1], -angle_deg, sad_mm, sid_mm, width_px, height_px, pitch_mm),
    )


def gantry_geometry(
    gantry_deg: float,
    sad_mm: float = 1000.0,
    sid_mm: float = 1500.0,
    width_px: int = 1024,
    height_px: int = 768,
    pitch_mm: float = 0.388,
    kv_offset_deg: float = 90.0,
    name: str = "kv",
) -> ProjectionGeometry:
    """The on-board kV imager at IEC 61217 gantry angle ``gantry_deg`` (of the MV beam).

    The kV source sits at source angle ``gantry_deg + kv_offset_deg``; with the default +90,
    gantry 0 puts the kV source at the patient's left. The default panel is a 1024 x 768,
    0.388 mm flat panel (a PaxScan 4030-class detector in 2x2 binning).
    """
    return _geometry_at_angle(
        name, gantry_deg + kv_offset_deg, sad_mm, sid_mm, width_px, height_px, pitch_mm
    )


def _panel_frame(geometry: ProjectionGeometry):
    s = np.asarray(geometry.source_mm, dtype=float)
    o = np.asarray(geometry.panel_origin_mm, dtype=float)
    u = np.asarray(geometry.panel_u_mm, dtype=float)
    v = np.asarray(geometry.panel_v_mm, dtype=float)
    return s, o, u, v


def project(geometry: ProjectionGeometry, points_mm) -> np.ndarray:
    """Pixel coordinates (N, 2) = (i column, j row) of 3-D points (N, 3), mm.

    The ray from the source through each point is intersected with the panel plane; pixel
    centres are at integer coordinates.
    """
    pts = np.atleast_2d(np.asarray(points_mm, dtype=float))
    s, o, u, v = _panel_frame(geometry)
    n = np.cross(u, v)
    rays = pts - s
    t = ((o - s) @ n) / (rays @ n)
    hit = s + t[:, None] * rays - o
    gram = np.array([[u @ u, u @ v], [u @ v, v @ v]])
    rhs = np.stack([hit @ u, hit @ v], axis=1)
    return np.linalg.solve(gram, rhs.T).T


def _pixel_points(geometry: ProjectionGeometry, i, j) -> np.ndarray:
    """Panel points (..., 3) of (fractional) pixel coordinates i, j (broadcast)."""
    _, o, u, v = _panel_frame(geometry)
    i = np.asarray(i, dtype=float)[..., None]
    j = np.asarray(j, dtype=float)[..., None]
    return o + i * u + j * v


def _magnification(geometry: ProjectionGeometry, point_mm) -> float:
    s, o, u, v = _panel_frame(geometry)
    n = _unit(np.cross(u, v))
    return float(((o - s) @ n) / ((np.asarray(point_mm, dtype=float) - s) @ n))


# --------------------------------------------------------------------------------------------
# Seeds


@dataclass(frozen=True, slots=True)
class Seed:
    """One implanted marker, placed relative to the target (LR, SI, AP mm) in the body.

    ``fill_fraction`` is the fraction of the cylinder that is gold (1 for a solid seed, about
    half for a coiled wire marker).
    """

    center_offset_mm: Vec3
    axis: Vec3
    length_mm: float
    diameter_mm: float
    fill_fraction: float = 1.0
    name: str = ""


@dataclass(frozen=True, slots=True)
class SeedPose:
    """A seed in world (patient) coordinates: centre (mm), unit axis, size (mm)."""

    center_mm: Vec3
    axis: Vec3
    length_mm: float
    diameter_mm: float
    fill_fraction: float = 1.0
    name: str = ""


def _seed(offset, axis, length, diameter, fill, name) -> Seed:
    return Seed(_tuple3(offset), _tuple3(_unit(axis)), length, diameter, fill, name)


# Two 1.0 x 3 mm solid gold seeds and one 0.35 x 10 mm coiled marker, 28-34 mm apart
# around the target, as implanted percutaneously in the liver.
DEFAULT_SEEDS: tuple[Seed, ...] = (
    _seed((-12.0, 8.0, 6.0), (0.3, 0.9, 0.3), 3.0, 1.0, 1.0, "seed_1"),
    _seed((14.0, -6.0, -10.0), (0.8, 0.2, 0.55), 3.0, 1.0, 1.0, "seed_2"),
    _seed((2.0, -14.0, 16.0), (0.2, 0.5, -0.85), 10.0, 0.35, 0.5, "coil"),
)


def _rotation(axis, angle_deg: float) -> np.ndarray:
    k = _unit(axis)
    a = math.radians(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * (kx @ kx)


def seed_poses(
    seeds: Sequence[Seed],
    target_mm,
    *,
    rotation_deg: float = 0.0,
    rotation_axis=(1.0, 0.0, 0.0),
) -> list[SeedPose]:
    """World poses of ``seeds`` when the target is at ``target_mm``.

    The constellation is rotated by ``rotation_deg`` about ``rotation_axis`` (default LR:
    the liver's breathing pitch) through the target, then translated with it.
    """
    r = _rotation(rotation_axis, rotation_deg)
    t = np.asarray(target_mm, dtype=float)
    out = []
    for s in seeds:
        centre = t + r @ np.asarray(s.center_offset_mm)
        axis = r @ np.asarray(s.axis)
        out.append(
            SeedPose(
                _tuple3(centre),
                _tuple3(axis),
                s.length_mm,
                s.diameter_mm,
                s.fill_fraction,
                s.name,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Renderer constants

OFFSET = 64.0  # panel dark offset, pixel value
I0 = 8.0e5  # pixel value of an unattenuated ray (saturates; behind the body ~ 3-15k)
QUANTA_AT_I0 = 5.0e5  # detected quanta per pixel for an unattenuated ray at 10 ms
REFERENCE_EXPOSURE_S = 0.01
ELECTRONIC_NOISE = 6.0  # pixel value, 1 sigma
SCATTER_TO_PRIMARY = 0.5
MU_TISSUE = 0.020  # 1/mm: water-like soft tissue at ~70 keV effective
MU_LUNG = 0.005
MU_GAS = 0.0
MU_BONE_RIB = 0.040
MU_BONE_SPINE = 0.034
MU_GOLD = 6.0  # 1/mm: gold at ~70 keV effective (NIST ~3.1 cm2/g x 19.3 g/cm3)
MU_CLIP = 1.0  # 1/mm: stainless steel ligation clip
FOCAL_SPOT_MM = 1.0
DETECTOR_BLUR_MM = 0.15
_BACKGROUND_DOWNSAMPLE = 4
_RIB_SAMPLES = 128
_SUPERSAMPLE = 2
_MAX_SUBPOSITIONS = 16
_SUBPOSITION_STEP_MM = 0.2
# The clip sits at this offset from the seeds' centroid (mm): 40+ mm inferior, so that in
# every view whose rays are perpendicular to SI it projects well away from every seed.
CLIP_OFFSET_MM: Vec3 = (18.0, -48.0, 8.0)


@dataclass(frozen=True, slots=True)
class RenderTruth:
    """Ground truth of one rendered projection.

    ``seeds_px`` (N, 2) is the perspective projection (column i, row j) of each seed's 3-D
    centre ``seeds_mm`` (N, 3) at mid-exposure; ``inside`` says whether it lies on the panel.
    ``projected_length_px`` is the length of each seed's projected axis.
    """

    seeds_px: np.ndarray
    seeds_mm: np.ndarray
    names: tuple[str, ...]
    inside: np.ndarray
    projected_length_px: np.ndarray
    distractor_px: np.ndarray | None = None
    distractor_mm: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# Anatomy background


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _chord_ellipsoid(s, d, centre, semi) -> np.ndarray:
    """Chord length of rays s + t d (d unit, (M, 3)) through an axis-aligned ellipsoid.

    An infinite semi-axis (np.inf) makes an elliptic cylinder along that axis.
    """
    inv = np.where(np.isfinite(semi), 1.0 / np.asarray(semi, dtype=float), 0.0)
    w = (s - centre) * inv
    dd = d * inv
    a = np.sum(dd * dd, axis=-1)
    b = 2.0 * (dd @ w)
    c = w @ w - 1.0
    disc = b * b - 4.0 * a * c
    ok = (disc > 0) & (a > 1e-18)
    root = np.sqrt(np.where(ok, disc, 0.0))
    safe_a = np.where(ok, a, 1.0)
    return np.where(ok, root / safe_a, 0.0)


@dataclass(frozen=True, slots=True)
class _Anatomy:
    body_centre: np.ndarray  # (x, z) of the body's elliptic cross-section
    body_semi: np.ndarray  # (a LR, b AP)
    lungs: tuple  # ((centre (3,), semi (3,)), ...)
    gas: tuple  # (centre, semi)
    spine: tuple  # (centre x, z, radius)
    rib_levels: np.ndarray  # SI of each rib's posterior end, mm
    rib_drop_mm: float
    rib_radius: float  # elliptic radius (fraction of the body ellipse)


def _anatomy(background_seed: int) -> _Anatomy:
    rng = np.random.default_rng([background_seed, 0x61A7])
    a = rng.uniform(150.0, 175.0)
    b = rng.uniform(105.0, 125.0)
    # The liver target is right-sided: the body's centre is to the patient's left of it.
    cx, cz = rng.uniform(55.0, 80.0), rng.uniform(-15.0, 10.0)
    dome_right = rng.uniform(55.0, 75.0)
    dome_left = dome_right - rng.uniform(10.0, 25.0)
    lung_semi = np.array([0.36 * a, 150.0, 0.72 * b])
    lungs = (
        (np.array([cx - 0.45 * a, dome_right + lung_semi[1], cz - 0.05 * b]), lung_semi),
        (np.array([cx + 0.45 * a, dome_left + lung_semi[1], cz - 0.05 * b]), lung_semi * 0.95),
    )
    gas = (
        np.array([cx + 0.35 * a, dome_left - 35.0, cz + 0.25 * b]),
        np.array([rng.uniform(30, 45), rng.uniform(20, 30), rng.uniform(25, 35)]),
    )
    spine = (cx, cz - b + 40.0, 18.0)
    first = rng.uniform(-120.0, -100.0)
    spacing = rng.uniform(26.0, 32.0)
    levels = first + spacing * np.arange(12) + rng.normal(0.0, 2.0, 12)
    return _Anatomy(
        body_centre=np.array([cx, cz]),
        body_semi=np.array([a, b]),
        lungs=lungs,
        gas=gas,
        spine=spine,
        rib_levels=levels,
        rib_drop_mm=rng.uniform(50.0, 80.0),
        rib_radius=0.92,
    )


def _rib_integral(anat: _Anatomy, s: np.ndarray, d: np.ndarray, t0, t1) -> np.ndarray:
    """Ray-marched excess attenuation of the ribs along each ray's body chord [t0, t1]."""
    n = _RIB_SAMPLES
    frac = (np.arange(n) + 0.5) / n
    step = (t1 - t0) / n  # (M,)
    t = t0[:, None] + (t1 - t0)[:, None] * frac[None, :]  # (M, n)
    x = s[0] + t * d[:, 0:1]
    y = s[1] + t * d[:, 1:2]
    z = s[2] + t * d[:, 2:3]
    cx, cz = anat.body_centre
    a, b = anat.body_semi
    ex, ez = (x - cx) / a, (z - cz) / b
    r = np.sqrt(ex * ex + ez * ez)
    half_thick = 5.0 / (0.5 * (a + b))  # a rib is ~10 mm thick, in elliptic-radius units
    edge = 2.0 / (0.5 * (a + b))
    radial = _smoothstep((half_thick + edge - np.abs(r - anat.rib_radius)) / edge)
    total = np.zeros_like(t0)
    hit = np.nonzero(radial > 0)
    if hit[0].size == 0:
        return total
    rr = radial[hit]
    yy = y[hit]
    # Angle around the body from the posterior midline: 0 at the spine, pi anteriorly.
    theta = np.abs(np.arctan2(ex[hit], -ez[hit])) / math.pi
    # Ribs end anteriorly at the costal cartilage (fade out from 0.72 to 0.82 of the way).
    fade = _smoothstep((0.82 - theta) / 0.1)
    centre_shift = anat.rib_drop_mm * theta**1.5
    occupancy = np.zeros_like(yy)
    for level in anat.rib_levels:
        dy = np.abs(yy - (level - centre_shift))
        occupancy += _smoothstep((6.0 + 1.5 - dy) / 3.0)
    density = MU_BONE_RIB - MU_TISSUE
    contrib = density * rr * np.minimum(occupancy, 1.0) * fade
    sample_sum = np.zeros(t.shape)
    sample_sum[hit] = contrib
    total = sample_sum.sum(axis=1) * step
    return total


def _line_integrals(anat: _Anatomy, s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Total attenuation (dimensionless) along rays s + t d through the anatomy."""
    a, b = anat.body_semi
    cx, cz = anat.body_centre
    body_c = np.array([cx, 0.0, cz])
    body_semi = np.array([a, np.inf, b])
    chord = _chord_ellipsoid(s, d, body_c, body_semi)
    total = MU_TISSUE * chord
    for centre, semi in anat.lungs:
        total += (MU_LUNG - MU_TISSUE) * _chord_ellipsoid(s, d, centre, semi)
    total += (MU_GAS - MU_TISSUE) * _chord_ellipsoid(s, d, *anat.gas)
    sx, sz, sr = anat.spine
    total += (MU_BONE_SPINE - MU_TISSUE) * _chord_ellipsoid(
        s, d, np.array([sx, 0.0, sz]), np.array([sr, np.inf, sr])
    )
    # Entry and exit of the body cross-section, for the ribs' ray marching.
    inv = 1.0 / body_semi
    w = (s - body_c) * inv
    dd = d * inv
    qa = np.sum(dd * dd, axis=-1)
    qb = 2.0 * (dd @ w)
    qc = w @ w - 1.0
    disc = np.maximum(qb * qb - 4.0 * qa * qc, 0.0)
    root = np.sqrt(disc)
    t0 = (-qb - root) / (2.0 * qa)
    t1 = (-qb + root) / (2.0 * qa)
    inside = chord > 0
    ribs = np.zeros_like(total)
    if np.any(inside):
        ribs[inside] = _rib_integral(anat, s, d[inside], t0[inside], t1[inside])
    return total + ribs


@functools.lru_cache(maxsize=8)
def _background(geometry: ProjectionGeometry, background_seed: int) -> tuple:
    """Primary and scatter fluence (pixel values above the offset), float32, read-only."""
    anat = _anatomy(background_seed)
    f = _BACKGROUND_DOWNSAMPLE
    wl = -(-geometry.width_px // f)
    hl = -(-geometry.height_px // f)
    # Low-resolution pixel centres in full-resolution pixel coordinates (cv2.resize's
    # half-pixel alignment).
    il = (np.arange(wl) + 0.5) * (geometry.width_px / wl) - 0.5
    jl = (np.arange(hl) + 0.5) * (geometry.height_px / hl) - 0.5
    jj, ii = np.meshgrid(jl, il, indexing="ij")
    s = np.asarray(geometry.source_mm, dtype=float)
    p = _pixel_points(geometry, ii, jj).reshape(-1, 3)
    d = p - s
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    integral = np.empty(len(d))
    chunk = 8192
    for k in range(0, len(d), chunk):
        integral[k : k + chunk] = _line_integrals(anat, s, d[k : k + chunk])
    low = (I0 * np.exp(-integral)).reshape(hl, wl).astype(np.float32)
    primary = cv2.resize(
        low, (geometry.width_px, geometry.height_px), interpolation=cv2.INTER_CUBIC
    )
    primary = np.clip(primary, 0.0, None)
    # Scatter: a heavily smoothed copy of the primary (~40 mm at the panel).
    sigma_low = 40.0 / (np.linalg.norm(geometry.panel_u_mm) * f)
    scatter_low = SCATTER_TO_PRIMARY * cv2.GaussianBlur(
        np.minimum(low, 65535.0), (0, 0), sigma_low, borderType=cv2.BORDER_REFLECT
    )
    scatter = cv2.resize(
        scatter_low, (geometry.width_px, geometry.height_px), interpolation=cv2.INTER_LINEAR
    )
    primary.setflags(write=False)
    scatter.setflags(write=False)
    return primary, scatter


# --------------------------------------------------------------------------------------------
# Seeds in the image


def _cylinder_chords(s, d, centre, axis, radius, half_length) -> np.ndarray:
    """Chord lengths of rays s + t d (d unit, (M, 3)) through a finite solid cylinder."""
    w = s - centre
    wa = w @ axis
    da = d @ axis
    w_perp = w - wa * axis
    d_perp = d - da[:, None] * axis
    qa = np.sum(d_perp * d_perp, axis=1)
    qb = d_perp @ w_perp  # half of the usual b
    qc = w_perp @ w_perp - radius * radius
    disc = qb * qb - qa * qc
    ok = (disc > 0) & (qa > 1e-12)
    root = np.sqrt(np.where(ok, disc, 0.0))
    safe_a = np.where(ok, qa, 1.0)
    t_lo = (-qb - root) / safe_a
    t_hi = (-qb + root) / safe_a
    with np.errstate(divide="ignore", invalid="ignore"):
        c1 = (-half_length - wa) / da
        c2 = (half_length - wa) / da
    parallel = np.abs(da) < 1e-12
    cap_lo = np.where(
        parallel, np.where(abs(wa) <= half_length, -np.inf, np.inf), np.minimum(c1, c2)
    )
    cap_hi = np.where(
        parallel, np.where(abs(wa) <= half_length, np.inf, -np.inf), np.maximum(c1, c2)
    )
    chord = np.minimum(t_hi, cap_hi) - np.maximum(t_lo, cap_lo)
    return np.where(ok, np.clip(chord, 0.0, None), 0.0)


@dataclass(frozen=True, slots=True)
class _Rod:
    """A solid cylinder with a linear attenuation coefficient (seed, coil, clip arm)."""

    centre: np.ndarray
    axis: np.ndarray
    length_mm: float
    diameter_mm: float
    mu_per_mm: float


def _rods_for_seed(pose: SeedPose) -> list[_Rod]:
    return [
        _Rod(
            np.asarray(pose.center_mm, dtype=float),
            _unit(pose.axis),
            float(pose.length_mm),
            float(pose.diameter_mm),
            MU_GOLD * float(pose.fill_fraction),
        )
    ]


def _clip_rods(apex_mm: np.ndarray) -> list[_Rod]:
    """A ligation clip: a 'V' of two 5 mm stainless-steel arms, 1 mm thick, 40 deg apart."""
    half = math.radians(20.0)
    rods = []
    for sign in (-1.0, 1.0):
        arm = _unit((sign * math.sin(half), -math.cos(half) * 0.8, math.cos(half) * 0.6))
        rods.append(_Rod(apex_mm + 2.5 * arm, arm, 5.0, 1.0, MU_CLIP))
    return rods


def _render_group(
    geometry: ProjectionGeometry,
    rods: list[_Rod],
    shifts: np.ndarray,
    primary: np.ndarray,
) -> None:
    """Multiply ``primary`` in place by the motion-averaged, blurred transmission of rods."""
    s, _, u, _ = _panel_frame(geometry)
    pitch = float(np.linalg.norm(u))
    ends = []
    for rod in rods:
        for sign in (-0.5, 0.5):
            ends.append(rod.centre + sign * rod.length_mm * rod.axis + shifts)
    ends_px = project(geometry, np.concatenate(ends))
    centre = np.mean([r.centre for r in rods], axis=0)
    mag = _magnification(geometry, centre)
    focal_sigma_mm = FOCAL_SPOT_MM * (mag - 1.0) / 2.355
    sigma_px = math.hypot(focal_sigma_mm, DETECTOR_BLUR_MM) / pitch
    radius_px = max(r.diameter_mm for r in rods) * 0.5 * mag / pitch
    margin = radius_px + 3.0 * sigma_px + 3.0
    i0 = max(int(math.floor(ends_px[:, 0].min() - margin)), 0)
    i1 = min(int(math.ceil(ends_px[:, 0].max() + margin)) + 1, geometry.width_px)
    j0 = max(int(math.floor(ends_px[:, 1].min() - margin)), 0)
    j1 = min(int(math.ceil(ends_px[:, 1].max() + margin)) + 1, geometry.height_px)
    if i1 <= i0 or j1 <= j0:
        return  # entirely off the panel
    ss = _SUPERSAMPLE
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    ii = np.arange(i0, i1)[None, :, None, None] + sub[None, None, None, :]
    jj = np.arange(j0, j1)[:, None, None, None] + sub[None, None, :, None]
    ii, jj = np.broadcast_arrays(ii, jj)
    points = _pixel_points(geometry, ii, jj).reshape(-1, 3)
    d = points - s
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    transmission = np.zeros(len(d))
    for shift in shifts:
        integral = np.zeros(len(d))
        for rod in rods:
            integral += rod.mu_per_mm * _cylinder_chords(
                s, d, rod.centre + shift, rod.axis, 0.5 * rod.diameter_mm, 0.5 * rod.length_mm
            )
        transmission += np.exp(-integral)
    transmission /= len(shifts)
    box = transmission.reshape(j1 - j0, i1 - i0, ss * ss).mean(axis=2).astype(np.float32)
    box = cv2.GaussianBlur(box, (0, 0), sigma_px, borderType=cv2.BORDER_REPLICATE)
    primary[j0:j1, i0:i1] *= box


def _subposition_shifts(velocity_mm_s, exposure_s: float) -> np.ndarray:
    travel = np.asarray(velocity_mm_s, dtype=float) * float(exposure_s)
    distance = float(np.linalg.norm(travel))
    n = int(min(_MAX_SUBPOSITIONS, max(1, math.ceil(distance / _SUBPOSITION_STEP_MM) + 1)))
    if n == 1:
        return np.zeros((1, 3))
    return np.linspace(-0.5, 0.5, n)[:, None] * travel[None, :]


def _projected_length_px(geometry: ProjectionGeometry, pose: SeedPose) -> float:
    c, a = np.asarray(pose.center_mm), np.asarray(pose.axis)
    ends = project(geometry, [c - 0.5 * pose.length_mm * a, c + 0.5 * pose.length_mm * a])
    return float(np.linalg.norm(ends[1] - ends[0]))


def render_projection(
    geometry: ProjectionGeometry,
    seeds_world: list[SeedPose],
    *,
    rng: np.random.Generator,
    exposure_s: float = 0.01,
    velocity_mm_s=(0.0, 0.0, 0.0),
    noise: float = 1.0,
    distractor: bool = False,
    background_seed: int = 0,
) -> tuple[np.ndarray, RenderTruth]:
    """One kV projection of ``seeds_world`` (poses at mid-exposure), uint16 (height, width).

    Raw transmitted intensity: gold is dark (see the module docstring). The seeds move by
    ``velocity_mm_s`` during ``exposure_s`` (motion blur); ``noise`` scales quantum and
    electronic noise (0 gives the noiseless expected image). ``distractor`` adds a
    ligation clip ``CLIP_OFFSET_MM`` from the seeds' centroid. The anatomy depends only on
    ``background_seed``; every random draw comes from ``rng``.
    """
    if not exposure_s > 0:
        raise ValueError(f"exposure_s must be > 0, got {exposure_s}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    primary_bg, scatter = _background(geometry, int(background_seed))
    primary = primary_bg.copy()
    shifts = _subposition_shifts(velocity_mm_s, exposure_s)
    for pose in seeds_world:
        _render_group(geometry, _rods_for_seed(pose), shifts, primary)

    centres = np.array([p.center_mm for p in seeds_world], dtype=float).reshape(-1, 3)
    clip_mm = None
    clip_px = None
    if distractor:
        anchor = centres.mean(axis=0) if len(centres) else np.zeros(3)
        clip_mm = anchor + np.asarray(CLIP_OFFSET_MM)
        _render_group(geometry, _clip_rods(clip_mm), shifts, primary)
        clip_px = project(geometry, clip_mm)[0]

    mean = primary + scatter
    if noise > 0:
        # Variance in pixel units: value-per-quantum x mean (Poisson) + electronic.
        value_per_quantum = I0 / (QUANTA_AT_I0 * exposure_s / REFERENCE_EXPOSURE_S)
        sd = np.sqrt(value_per_quantum * mean + ELECTRONIC_NOISE**2)
        z = rng.standard_normal(mean.shape, dtype=np.float32)
        mean = mean + np.float32(noise) * sd * z
    image = np.clip(np.rint(mean + np.float32(OFFSET)), 0, 65535).astype(np.uint16)

    seeds_px = project(geometry, centres) if len(centres) else np.zeros((0, 2))
    inside = (
        (seeds_px[:, 0] >= -0.5)
        & (seeds_px[:, 0] <= geometry.width_px - 0.5)
        & (seeds_px[:, 1] >= -0.5)
        & (seeds_px[:, 1] <= geometry.height_px - 0.5)
    )
    truth = RenderTruth(
        seeds_px=seeds_px,
        seeds_mm=centres,
        names=tuple(p.name for p in seeds_world),
        inside=inside,
        projected_length_px=np.array([_projected_length_px(geometry, p) for p in seeds_world]),
        distractor_px=clip_px,
        distractor_mm=clip_mm,
    )
    return image, truth


# --------------------------------------------------------------------------------------------
# The imaging system: an OpenIGTLink IMAGE server

TRIGGERS = ("time", "phase", "amplitude")
PHASE_DIRECTIONS = ("exhale", "inhale")
_POLL_HZ = 50.0  # how often a breathing trigger samples the patient
_SEND_TIMEOUT_S = 0.5  # a client that cannot take a frame in this time is dropped
FAULT_DELAY_S = 0.5  # well beyond a controller's clock tolerance (0.25 s) plus render jitter
GARBAGE_BYTES = 200  # more than one 58-byte header: the receiver reads a header of noise
JUMP_MM = (0.0, 10.0, 0.0)  # the imaged target 10 mm superior, the surrogate unmoved
CLOCK_SKEW_S = 2.0
# start_fault/stop_fault wait at most this for the threads: a backlog of images takes a
# few ms per view to write.
FAULT_SYNC_TIMEOUT_S = 2.0
_TRANSPORT_KINDS = frozenset({"delay", "reorder"})
COORDINATES = "IEC61217_patient_mm"


@dataclass(frozen=True, slots=True)
class TruthFrame:
    """Ground truth of one acquisition (one frame id, every view). Never sent on the wire."""

    frame_id: int
    t_clock: float  # simulator clock at mid-exposure
    t_patient: float  # patient-model time at mid-exposure
    t_acquisition: float  # wall clock at mid-exposure, as sent
    target_mm: Vec3
    rotation_deg: float
    velocity_mm_s: Vec3
    seeds: tuple[SeedPose, ...]
    views: dict  # imager name -> RenderTruth
    images: dict  # imager name -> image (only with keep_images=True)
    fault: str | None = None  # the fault kinds that shaped it; with "jump", target_mm and
    # seeds are where the image shows them (shifted), not where the patient model has them


def ijk_to_world(geometry: ProjectionGeometry) -> np.ndarray:
    """The 4x4 IMAGE matrix: columns panel_u, panel_v, unit normal (u x v), panel origin."""
    _, o, u, v = _panel_frame(geometry)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = u, v, _unit(np.cross(u, v)), o
    return m


def _vec_text(v) -> str:
    return " ".join(repr(float(x)) for x in v)


def image_message(
    geometry: ProjectionGeometry,
    image: np.ndarray,
    *,
    frame_id: int,
    t_acquisition: float,
    exposure_s: float,
    geometry_name: str,
) -> pyigtl.ImageMessage:
    """The OpenIGTLink IMAGE message (header version 2) for one view, as the sim sends it."""
    message = pyigtl.ImageMessage(
        image[np.newaxis, :, :],
        ijk_to_world_matrix=ijk_to_world(geometry),
        timestamp=t_acquisition,
        device_name=geometry.imager,
    )
    message.header_version = 2
    message.message_id = frame_id
    message.metadata = {
        "source_mm": _vec_text(geometry.source_mm),
        "frame_id": str(int(frame_id)),
        "t_acquisition": repr(float(t_acquisition)),
        "exposure_s": repr(float(exposure_s)),
        "geometry": geometry_name,
        "coordinates": COORDINATES,
        "polarity": "transmission",
    }
    return message


@dataclass(frozen=True, slots=True)
class SentImage:
    """One frame as it went on the wire (every view of it, or the noise that replaced it)."""

    frame_id: int | None  # None: not an image (garbage)
    t_sent: float  # simulator clock just before the first byte was written
    t_made: float  # simulator clock when the frame was ready to go (before a delay)
    t_acquisition: float  # wall clock at mid-exposure, as sent (NaN for garbage and nan)
    fault: str | None = None  # the fault kinds that shaped it ("jump", "nan+delay", ...)


@dataclass(frozen=True, slots=True)
class _Frame:
    """A frame made but perhaps not yet sent (delay, reorder)."""

    payloads: tuple[bytes, ...]
    frame_id: int | None
    t_made: float
    t_acquisition: float
    truth: TruthFrame | None
    fault: str | None


class XrayImagerSim(IgtlServerSim):
    """A kV imaging system (one view, or a stereo pair sharing frame ids) over OpenIGTLink.

    At each acquisition the patient is sampled at mid-exposure; the seed constellation is
    placed at the target (plus a breathing-correlated rotation of ``rotation_deg_per_mm``
    degrees about LR per mm of SI excursion from the t = 0 position) and moves at the
    target's velocity during the exposure. One image per geometry is rendered and sent to
    every connected client. Acquisitions happen only while a client is connected (no client,
    no dose).

    Triggers (``rate_hz`` is the frame rate, or for breathing triggers the highest rate):

    - ``"time"``: every ``1 / rate_hz`` seconds.
    - ``"amplitude"``: whenever the target's SI crosses ``trigger_si_mm`` in either
      direction (sampled at 50 Hz, so up to 20 ms late).
    - ``"phase"``: only crossings in ``trigger_direction``: "exhale" (SI rising: the liver
      moves superior on exhale) or "inhale" -- one image per breathing cycle at one phase.

    ``truth`` holds a ``TruthFrame`` per acquisition sent (images too with ``keep_images``);
    ``sent`` a ``SentImage`` per frame sent (garbage included). Faults: see the module
    docstring (``start_fault`` / ``stop_fault``).
    """

    _log = log
    _thread_prefix = "sim-xray"
    _description = "X-ray imager simulator"
    _fault_sync_timeout_s = FAULT_SYNC_TIMEOUT_S
    _send_timeout_s = _SEND_TIMEOUT_S  # a stalled viewer must not stall imaging

    def __init__(
        self,
        patient,
        geometries: Sequence[ProjectionGeometry],
        *,
        seeds: Sequence[Seed] = DEFAULT_SEEDS,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_hz: float = 2.0,
        trigger: str = "time",
        trigger_si_mm: float = 0.0,
        trigger_direction: str = "exhale",
        exposure_s: float = 0.01,
        noise: float = 1.0,
        distractor: bool = False,
        background_seed: int = 0,
        rotation_deg_per_mm: float = 0.25,
        geometry_name: str = "kv",
        rng_seed: int = 0,
        keep_images: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        t0: float | None = None,
        name: str = "xray",
        fault_seed: int = 0,
    ):
        if not 0.05 <= rate_hz <= 15.0:  # as imaging.rate_hz: an image every 20 s to 15 Hz
            raise ValueError(f"rate_hz must be within 0.05-15 Hz, got {rate_hz}")
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {list(TRIGGERS)}, got {trigger!r}")
        if trigger_direction not in PHASE_DIRECTIONS:
            raise ValueError(
                f"trigger_direction must be one of {list(PHASE_DIRECTIONS)}, "
                f"got {trigger_direction!r}"
            )
        if not 0.0 < exposure_s < 1.0:
            raise ValueError(f"exposure_s must be within (0, 1) s, got {exposure_s}")
        names = [g.imager for g in geometries]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need one or more geometries with distinct imager names: {names}")
        period_s = 1.0 / rate_hz
        tick_s = period_s if trigger == "time" else 1.0 / _POLL_HZ  # a breathing trigger polls
        super().__init__(host=host, port=port, tick_s=tick_s, clock=clock, t0=t0, name=name)
        self._patient = patient
        self.geometries = tuple(geometries)
        self.seeds = tuple(seeds)
        self._period_s = period_s
        self._trigger = trigger
        self._trigger_si_mm = float(trigger_si_mm)
        self._trigger_direction = trigger_direction
        self.exposure_s = float(exposure_s)
        self._noise = float(noise)
        self._distractor = bool(distractor)
        self._background_seed = int(background_seed)
        self._rotation_deg_per_mm = float(rotation_deg_per_mm)
        self._geometry_name = geometry_name
        self._rng = np.random.default_rng(rng_seed)
        self._keep_images = keep_images
        self._wall_clock = wall_clock
        # Fault parameters: set them before the fault starts.
        self.fault_delay_s = FAULT_DELAY_S
        self.garbage_bytes = GARBAGE_BYTES
        self.jump_mm = JUMP_MM
        self.clock_skew_s = CLOCK_SKEW_S
        self._reference_si = float(patient.state(0.0).target_mm[1])
        self._frame_id = 0
        self.truth: list[TruthFrame] = []
        self.sent: list[SentImage] = []
        self._fault_rng = random.Random(fault_seed)
        # The breathing trigger's state, reset by start().
        self._last_si: float | None = None
        self._last_acquired = -math.inf

    def start(self) -> tuple[str, int]:
        for geometry in self.geometries:  # the anatomy once, before the first frame is due
            _background(geometry, self._background_seed)
        self._last_si = None
        self._last_acquired = -math.inf
        return super().start()

    @property
    def client_count(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    # -- stream thread -----------------------------------------------------------------------

    def _target_si(self, now: float) -> float | None:
        assert self.t0 is not None
        t = now - self.t0
        return float(self._patient.state(t).target_mm[1]) if t >= 0 else None

    def _tick(self, now: float) -> None:
        if self._trigger == "time":
            self._acquire(now)
            return
        si = self._target_si(now)
        crossed = self._crossed(self._last_si, si)
        self._last_si = si
        if crossed and now - self._last_acquired >= self._period_s - 1e-9:
            if self._acquire(now):
                self._last_acquired = now

    def _crossed(self, before: float | None, after: float | None) -> bool:
        if before is None or after is None:
            return False
        level = self._trigger_si_mm
        rising = before < level <= after
        falling = before >= level > after
        if self._trigger == "amplitude":
            return rising or falling
        return rising if self._trigger_direction == "exhale" else falling

    def _acquire(self, now: float) -> bool:
        """Image every view with its exposure ending at ``now`` and queue the frame for the
        wire; True if a frame was made (a client connected, the imager not stopped)."""
        faults = self._frame_faults()
        if faults is None:
            return False
        assert self.t0 is not None
        t_mid = now - self.t0 - 0.5 * self.exposure_s
        if t_mid < 0:
            return False
        transport = faults & _TRANSPORT_KINDS
        if "garbage" in faults:
            frame = _Frame(
                (self._fault_rng.randbytes(self.garbage_bytes),),
                None,
                self._clock(),
                math.nan,
                None,
                fault_label({"garbage"} | transport),
            )
        else:
            frame = self._render_frame(now, t_mid, faults)
        with self._cond:
            if self._faults & {"disconnect", "freeze"}:
                # Stopped while this frame was being rendered: it never left the imager.
                if frame.frame_id is not None:
                    self._frame_id = frame.frame_id  # no frame id spent
                return False
            self._push_locked(frame, frame.t_made)
        return True

    def _render_frame(self, now: float, t_mid: float, faults: set[str]) -> _Frame:
        shaping = faults & (_TRANSPORT_KINDS | {"clock-skew", "jump", "nan"})
        skew_s = self.clock_skew_s if "clock-skew" in faults else 0.0
        t_wall = self._wall_clock() - 0.5 * self.exposure_s - skew_s
        state = self._patient.state(t_mid)
        h = 0.005
        before = self._patient.state(max(t_mid - h, 0.0)).target_mm
        after = self._patient.state(t_mid + h).target_mm
        dt = t_mid + h - max(t_mid - h, 0.0)
        velocity = _tuple3((np.asarray(after) - np.asarray(before)) / dt)
        target = _tuple3(state.target_mm)
        # The breathing-correlated rotation follows the breathing, not a shift of the target.
        rotation = self._rotation_deg_per_mm * (target[1] - self._reference_si)
        if "jump" in faults:
            target = _tuple3(np.asarray(target) + np.asarray(self.jump_mm, dtype=float))
        poses = seed_poses(self.seeds, target, rotation_deg=rotation)
        frame_id = self._frame_id
        self._frame_id += 1
        views: dict = {}
        images: dict = {}
        payloads = []
        for geometry in self.geometries:
            image, truth = render_projection(
                geometry,
                poses,
                rng=self._rng,
                exposure_s=self.exposure_s,
                velocity_mm_s=velocity,
                noise=self._noise,
                distractor=self._distractor,
                background_seed=self._background_seed,
            )
            views[geometry.imager] = truth
            if self._keep_images:
                images[geometry.imager] = image
            message = image_message(
                geometry,
                image,
                frame_id=frame_id,
                t_acquisition=t_wall,
                exposure_s=self.exposure_s,
                geometry_name=self._geometry_name,
            )
            if "nan" in faults:
                matrix = np.array(message.ijk_to_world_matrix, dtype=float)
                matrix[:3, 3] = math.nan  # the panel position is lost ...
                message.ijk_to_world_matrix = matrix
                message.metadata["t_acquisition"] = "nan"  # ... and the acquisition time
            payloads.append(message.pack())
        label = fault_label(shaping)
        truth_frame = TruthFrame(
            frame_id,
            now - 0.5 * self.exposure_s,
            t_mid,
            t_wall,
            target,
            rotation,
            velocity,
            tuple(poses),
            views,
            images,
            label,
        )
        t_sent_as = math.nan if "nan" in faults else t_wall
        return _Frame(tuple(payloads), frame_id, self._clock(), t_sent_as, truth_frame, label)

    def _record_sent(self, frame: _Frame, t_sent: float) -> None:
        self.sent.append(
            SentImage(frame.frame_id, t_sent, frame.t_made, frame.t_acquisition, frame.fault)
        )
        if frame.truth is not None:
            self.truth.append(frame.truth)
