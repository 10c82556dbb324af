"""What the console shows, as plain data, and where it comes from.

``ConsoleState`` is one frame of the console: the trace of the last seconds, the gate's
decision and its reasons, the gating window, the devices, the interlocks, the correlation
model, the breath-hold level and the latest X-ray image of each imager view. Two sources
produce it:

- ``LiveSource`` reads a running ``Controller``: ``controller.status`` (replaced field by
  field by the controller thread, only read here), ``controller.gate`` and a
  ``LiveTrace.snapshot`` copy. It is called by the console's display timer on the GUI
  thread, never per sample, and never blocks the controller: the only lock it takes is the
  trace's, for one array copy. X-ray images are reduced for display (``display_image``:
  <= 256 px, uint8) once per new frame, here, never on the controller's threads.
- ``ReviewSource`` (in ``review.py``) rebuilds the same frame at any time of a recorded
  session log.

The widgets draw a ``ConsoleState`` and nothing else, so live and review look the same.
Pure Python and numpy: no Qt here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from motionctl.correlation import ModelFeatures
from motionctl.livestate import COLUMNS
from motionctl.types import AXES

SPANS_S = (30, 60, 90, 120)  # the trace spans the operator can choose, seconds
RATE_WINDOW_S = 2.0  # sample rates are counted over this much of the recent past
RECENT_CLEARED = 5  # cleared interlocks kept in the list below the active ones
MODEL_CURVE_POINTS = 41
DISPLAY_IMAGE_PX = 256  # longest side of an X-ray image as the console shows it
LOCALISING_S = 2.0  # a frame with no localisation result after this: "not localised"
TAKING_IN_S = 0.5  # a measurement this new may not have reached the correlation model yet

NO_IMAGER = "no X-ray imager in this session"
WAITING_FOR_IMAGE = "waiting for the first X-ray image"
NO_IMAGES_IN_LOG = "no X-ray images in the session log"


@dataclass(frozen=True)
class GateView:
    """The gate's settings as the console draws them (mm, or litres for volume holds)."""

    mode: str  # amplitude, phase or breath_hold
    axis: str  # the gated target axis (LR, SI, AP)
    source: str  # amplitude mode: "predicted" target or "surrogate"
    center_mm: float
    window_mm: float
    horizon_s: float
    breath_hold_signal: str = "volume"
    reference: float | None = None  # breath-hold reference level
    tolerance: float = math.nan  # breath-hold tolerance, in the reference's unit
    phase_window: tuple[float, float] = (math.nan, math.nan)  # phase mode: [start, end)

    @property
    def lower_mm(self) -> float:
        return self.center_mm - self.window_mm / 2

    @property
    def upper_mm(self) -> float:
        return self.center_mm + self.window_mm / 2


@dataclass(frozen=True)
class DeviceRow:
    name: str
    connected: bool | None  # None: the device reports no connection state
    rate_hz: float  # nan until counted
    age_s: float  # since its last sample; nan if none yet
    samples: int
    malformed: int
    stale_after_s: float | None  # its timeout, if the gate requires it
    note: str = ""  # e.g. the beam interface's fault


@dataclass(frozen=True)
class AlarmRow:
    key: str  # interlock key, "code" or "code:subject"
    t_raised: float
    t_cleared: float | None = None  # None while active
    awaiting_ack: bool = False


@dataclass(frozen=True)
class ModelView:
    """The surrogate -> internal relation on the gated axis."""

    label: str
    curve_s: np.ndarray
    curve_target: np.ndarray
    points_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    points_target: np.ndarray = field(default_factory=lambda: np.empty(0))


@dataclass(frozen=True)
class XrayView:
    """The latest image of one imager view and what became of it."""

    imager: str  # the imager's name, e.g. "kv_a"
    frame_id: int
    t_rx: float  # session seconds when the image arrived
    # (h, w) uint8 for display (attenuation bright, as a radiograph), <= DISPLAY_IMAGE_PX on
    # its long side. None only in the bridge's frames: the same image as the last frame
    # that carried one for this view (``RemoteSource`` puts it back).
    image: np.ndarray | None
    # (N, 2) x (column), y (row) in the display image's pixels (centres at integers): where
    # the accepted localisation puts the seeds in this view; empty if none.
    seeds_px: np.ndarray
    outcome: str  # "model point", "rejected: too few seeds ...", "localising", ...
    accepted: bool | None = None  # the localiser's verdict; None while there is none


@dataclass(frozen=True)
class ImagingView:
    """The X-ray panel: the views, or why there are none (``message``)."""

    views: tuple[XrayView, ...] = ()
    message: str = NO_IMAGER


NO_IMAGING = ImagingView()


@dataclass(frozen=True)
class ConsoleState:
    t: float  # session seconds: now (live) or the scrub time (review)
    trace: dict[str, np.ndarray]  # COLUMNS of livestate, oldest first, up to t
    decided: bool  # False until the gate's first decision
    beam_enabled: bool
    reasons: tuple[str, ...]
    operator_enabled: bool
    gate: GateView
    alarms: tuple[AlarmRow, ...]  # active first (oldest first), then recently cleared
    devices: tuple[DeviceRow, ...]
    model: ModelView
    valve_closed: bool = False
    volume_l: float = math.nan  # the spirometer's latest volume (at the review time)
    last_refusal: str = ""
    imaging: ImagingView = NO_IMAGING
    # how long until the motion prediction can forecast (nan: unknown, e.g. in review)
    prediction_ready_in_s: float = math.nan

    @property
    def operator_hold(self) -> bool:
        return any(a.key == "operator_hold" and a.t_cleared is None for a in self.alarms)


def empty_trace() -> dict[str, np.ndarray]:
    return {name: np.empty(0) for name in COLUMNS}


def gated_column(gate: GateView) -> tuple[str, str]:
    """The trace columns (now, predicted) of the gated target axis."""
    axis = gate.axis.lower()
    return f"{axis}_mm", f"pred_{axis}_mm"


def gated_level(gate: GateView, trace: dict[str, np.ndarray]) -> float:
    """The value the amplitude window is compared with at the newest sample (nan if none)."""
    if not len(trace["t"]):
        return math.nan
    if gate.source == "surrogate":
        return float(trace["surrogate_mm"][-1])
    return float(trace[gated_column(gate)[1]][-1])


def prior_target(cfg: dict[str, Any], surrogate_mm: np.ndarray, axis: str) -> np.ndarray:
    """The configured prior (a planning 4DCT fit) on one axis, for the processed surrogate
    (inhale positive), as the estimator computes it before the first X-ray model."""
    tracking = cfg["tracking"]
    sign = 1.0 if tracking["surrogate_inhale_positive"] else -1.0
    i = AXES.index(axis)
    return tracking["offset_mm"][i] + tracking["gain"][i] * sign * surrogate_mm


def surrogate_span(surrogate_mm: np.ndarray) -> tuple[float, float]:
    """The surrogate range the model curve is drawn over: the recent breaths, padded."""
    finite = surrogate_mm[np.isfinite(surrogate_mm)]
    if not finite.size:
        return -2.0, 10.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(1.0, 0.15 * (hi - lo))
    return lo - pad, hi + pad


def inhale_direction(cfg: dict[str, Any], gate: GateView) -> float:
    """+1 if the gated signal rises on inhale, -1 if it falls (SI of the liver: it falls).
    The patient's coaching bar always rises on inhale, whatever the axis."""
    tracking = cfg["tracking"]
    sign = 1.0 if tracking["surrogate_inhale_positive"] else -1.0
    if gate.source == "surrogate" or (
        gate.mode == "breath_hold" and gate.breath_hold_signal == "volume"
    ):
        return 1.0
    gain = tracking["gain"][AXES.index(gate.axis)] * sign
    return -1.0 if gain < 0 else 1.0


def display_image(image: np.ndarray) -> tuple[np.ndarray, int]:
    """An X-ray image for the screen, as a radiograph: block-averaged by an integer factor
    to at most ``DISPLAY_IMAGE_PX`` on its long side; raw transmission turned into
    attenuation (-log, so bone and gold are bright and the soft tissue is not crushed into
    the top grey levels); windowed from its 1st to its 99th percentile, over the pixels the
    body attenuates (saturated open field left out: it would take the window's top).
    Returns (uint8 image, factor)."""
    a = np.asarray(image)
    factor = max(1, math.ceil(max(a.shape) / DISPLAY_IMAGE_PX))
    h, w = a.shape[0] // factor, a.shape[1] // factor
    small = (
        a[: h * factor, : w * factor]
        .reshape(h, factor, w, factor)
        .mean(axis=(1, 3), dtype=np.float32)
    )
    top = float(small.max())
    attenuation = -np.log(np.maximum(small, 1.0) / max(top, 1.0))
    body = attenuation[small < top]
    lo, hi = np.percentile(body if body.size >= 0.01 * small.size else attenuation, (1, 99))
    scaled = (attenuation - lo) * (255.0 / max(float(hi - lo), 1e-6))
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8), factor


def seed_pixels(geometry, plan_mm: np.ndarray, position_mm, rotation_deg) -> np.ndarray:
    """Full-resolution pixels (N, 2) of the planned seeds placed at a localised position and
    rotation (no rotation if it is unknown: fewer than 3 seeds fitted)."""
    from scipy.spatial.transform import Rotation

    from motionctl.fiducials import project_points

    rotation = np.eye(3)
    if all(math.isfinite(a) for a in rotation_deg):
        rotation = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    points = plan_mm @ rotation.T + np.asarray(position_mm, dtype=np.float64)
    return project_points(geometry, points)


def outcome_text(
    measurement, model_point: bool | None, disagreement_mm: float | None, planned: int
) -> str:
    """What became of a localised frame, in a few words. ``model_point``: whether its
    position is one of the correlation model's points (None: not known yet, the controller
    is still taking it in); ``planned``: the planned number of seeds."""
    m = measurement
    if not m.accepted:
        return "rejected: " + (m.reason or "no reason given").replace("_", " ")
    if model_point is None:
        text = "localised"
    elif model_point:
        text = "model point"
    else:
        text = "localised, not a model point"
    if m.n_seeds < planned:
        text += f" ({m.n_seeds} of {planned} seeds)"
    if disagreement_mm is not None:
        text += f"; disagrees with the estimate by {disagreement_mm:.1f} mm"
    return text


class _RateCounter:
    """Per-device sample rates from the sample counts seen over the last seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def update(self, t: float, counts: dict[str, int]) -> dict[str, float]:
        self._history.append((t, counts))
        while len(self._history) > 2 and t - self._history[1][0] >= self.window_s:
            self._history.popleft()
        t_old, old = self._history[0]
        span = t - t_old
        if span < 0.5:  # too short a span for a rate worth showing
            return {}
        return {name: (n - old.get(name, 0)) / span for name, n in counts.items()}


class _AlarmBook:
    """When each interlock was first seen active, and the recently cleared ones: the status
    only says which are active now. Times are those of the frame that first saw the change
    (within 1/30 s); the session log has the exact ones, and review mode shows those."""

    def __init__(self) -> None:
        self._raised: dict[str, float] = {}
        self._cleared: deque[AlarmRow] = deque(maxlen=RECENT_CLEARED)

    def update(
        self, t: float, active: tuple[str, ...], awaiting: tuple[str, ...]
    ) -> tuple[AlarmRow, ...]:
        for key in active:
            self._raised.setdefault(key, t)
        for key in [k for k in self._raised if k not in active]:
            self._cleared.append(AlarmRow(key, self._raised.pop(key), t))
        rows = [AlarmRow(k, t0, None, k in awaiting) for k, t0 in self._raised.items()]
        return (*rows, *reversed(self._cleared))


class LiveSource:
    """Builds a ``ConsoleState`` from a running controller; call it on the GUI thread.

    It only reads: operator actions go to ``submit`` (the controller's queue), so a console
    that freezes or closes cannot change what the gate does.
    """

    def __init__(self, controller, *, clock: Callable[[], float] = time.monotonic):
        self.controller = controller
        self.cfg = controller.cfg
        self._clock = clock
        self._rates = _RateCounter()
        self._alarms = _AlarmBook()
        self._model_key: tuple | None = None
        self._model: ModelView | None = None
        self._plan_mm: np.ndarray | None = None
        # imager -> (frame, display image, factor): each frame is reduced once
        self._displayed: dict[str, tuple[Any, np.ndarray, int]] = {}
        # (imager, frame id, measurement) -> seed pixels: each localisation projected once
        self._marks: dict[str, tuple[tuple, np.ndarray]] = {}
        self._sent: dict[str, Any] = {}  # imager -> the frame whose image was last sent
        self.read_only = False

    # -- commands (forwarded to the controller's queue; its thread carries them out) ------
    def submit(self, kind: str, value: Any = None, who: str = "console") -> None:
        from motionctl.session import OperatorCommand

        self.controller.submit(OperatorCommand(kind, value, who))

    def window_refusal(self, value: tuple[float, float]) -> str:
        return self.controller.core.window_refusal(value)

    # -- the frame ------------------------------------------------------------------------
    def now(self) -> float:
        return self.controller.session_t(self._clock())

    def state(
        self, span_s: float, since_t: float | None = None, new_images_only: bool = False
    ) -> ConsoleState:
        """The frame now; its trace holds the last ``span_s`` seconds, or the rows after
        ``since_t`` if given (the console bridge sends only what is new). With
        ``new_images_only`` (the bridge) an X-ray view carries its image only in the first
        frame built after the image arrived, and ``image=None`` after that."""
        t = self.now()
        st = self.controller.status
        snap = self.controller.live.snapshot(
            since_t=t - span_s - 1.0 if since_t is None else since_t
        )
        trace = snap.columns
        decision = st.decision
        # Copies: the controller thread adds keys to these dicts (dict() is one C call,
        # atomic under the GIL).
        samples, malformed = dict(st.samples), dict(st.malformed)
        connected, last_rx = dict(st.connected), dict(st.last_rx)
        gate = self._gate_view()
        return ConsoleState(
            t=t,
            trace=trace,
            decided=decision is not None,
            beam_enabled=decision is not None and decision.beam_enabled,
            reasons=() if decision is None else decision.reasons,
            operator_enabled=st.operator_enabled,
            gate=gate,
            alarms=self._alarms.update(t, st.interlocks, st.awaiting_ack),
            devices=self._devices(t, samples, malformed, connected, last_rx, st.beam_fault),
            model=self._model_view(gate, trace),
            valve_closed=st.valve_closed,
            volume_l=st.volume_l,
            last_refusal=st.last_refusal,
            imaging=self._imaging_view(t, st.interlocks, new_images_only),
            # read off the controller thread's predictor: a few plain numbers
            prediction_ready_in_s=self.controller.core.estimator.prediction_ready_in_s,
        )

    def _imaging_view(
        self, t: float, interlocks: tuple[str, ...], new_images_only: bool
    ) -> ImagingView:
        latest = getattr(self.controller, "latest_xray", None)
        xray = latest() if latest is not None else None
        if xray is None or not xray.configured:
            return ImagingView(message=NO_IMAGER)
        if not xray.frames:
            return ImagingView(message=WAITING_FOR_IMAGE)
        estimator = self.controller.core.estimator
        point_times = estimator.correlation.point_times[-4:]
        newest = next(reversed(xray.measurements), None)  # the last one delivered
        views = []
        for imager in sorted(xray.frames):
            frame = xray.frames[imager]
            shown = self._displayed.get(imager)
            if shown is None or shown[0] is not frame:
                shown = self._displayed[imager] = (frame, *display_image(frame.image))
            _, image, factor = shown
            m = xray.measurements.get(frame.frame_id)
            t_rx = self.controller.session_t(frame.t_rx)
            seeds = np.empty((0, 2))
            accepted = None
            if m is None:
                outcome = "localising" if t - t_rx < LOCALISING_S else "not localised"
            else:
                accepted = m.accepted
                t_acq = self.controller.session_t(m.t_acq)
                model_point = any(abs(p - t_acq) < 1e-6 for p in point_times) or (
                    None if t - self.controller.session_t(m.t_rx) < TAKING_IN_S else False
                )
                disagrees = None
                if (
                    m.accepted
                    and m.frame_id == newest
                    and estimator.fiducial_reason == "fiducial_disagreement"
                    and math.isfinite(estimator.last_check_mm)
                ):
                    disagrees = estimator.last_check_mm
                outcome = outcome_text(m, model_point, disagrees, len(self._plan()))
                if m.accepted:
                    # display pixel k averages full pixels k*f .. k*f + f - 1
                    seeds = (self._seed_marks(imager, frame, m) - (factor - 1) / 2) / factor
            if new_images_only:
                if self._sent.get(imager) is frame:
                    image = None
                else:
                    self._sent[imager] = frame
            views.append(XrayView(imager, frame.frame_id, t_rx, image, seeds, outcome, accepted))
        return ImagingView(tuple(views), "")

    def _plan(self) -> np.ndarray:
        """The planned seeds (N, 3), relative to the target point (mm)."""
        if self._plan_mm is None:
            from motionctl.settings import seed_plan

            self._plan_mm = seed_plan(self.cfg).points
        return self._plan_mm

    def _seed_marks(self, imager: str, frame, measurement) -> np.ndarray:
        """Full-resolution pixels of the localised seeds in one view (cached per frame)."""
        key = (frame.frame_id, measurement.position_mm, measurement.rotation_deg)
        cached = self._marks.get(imager)
        if cached is not None and cached[0] == key:
            return cached[1]
        px = seed_pixels(
            frame.geometry, self._plan(), measurement.position_mm, measurement.rotation_deg
        )
        self._marks[imager] = (key, px)
        return px

    def _gate_view(self) -> GateView:
        gate, g = self.controller.gate, self.cfg["gating"]
        volume = g["breath_hold_signal"] == "volume"
        return GateView(
            mode=g["mode"],
            axis=g["axis"],
            source=g["source"],
            center_mm=gate.center_mm,
            window_mm=gate.window_mm,
            horizon_s=self.cfg["tracking"]["horizon_s"],
            breath_hold_signal=g["breath_hold_signal"],
            reference=gate.reference,
            tolerance=g["breath_hold_tolerance_l"] if volume else g["breath_hold_tolerance_mm"],
            phase_window=tuple(g["phase_window"]),
        )

    def _devices(self, t, samples, malformed, connected, last_rx, beam_fault):
        required = self.controller.core.stale_timeout_s
        rates = self._rates.update(t, samples)
        names = sorted(set(samples) | set(connected) | set(required))
        rows = [
            DeviceRow(
                name=name,
                connected=connected.get(name),
                rate_hz=rates.get(name, math.nan),
                age_s=t - last_rx[name] if name in last_rx else math.nan,
                samples=samples.get(name, 0),
                malformed=malformed.get(name, 0),
                stale_after_s=required.get(name),
            )
            for name in names
        ]
        rows.append(
            DeviceRow(
                name="beam",
                connected=beam_fault is None,
                rate_hz=math.nan,
                age_s=math.nan,
                samples=0,
                malformed=malformed.get("beam", 0),
                stale_after_s=None,
                note=beam_fault or "",
            )
        )
        return tuple(rows)

    def _model_view(self, gate: GateView, trace: dict[str, np.ndarray]) -> ModelView:
        model = self.controller.core.estimator.correlation
        lo, hi = surrogate_span(trace["surrogate_mm"])
        # Redraw the curve only when the model or the breathing range changed (whole mm).
        key = (
            model.valid,
            model.kind,
            model.n_points,
            model.point_times[-1:],
            round(lo),
            round(hi),
        )
        if key == self._model_key and self._model is not None:
            return self._model
        s = np.linspace(round(lo) - 0.5, round(hi) + 0.5, MODEL_CURVE_POINTS)
        axis = AXES.index(gate.axis)
        n = model.n_points
        if model.valid:
            # The model at rest (zero surrogate velocity): hysteresis models also depend
            # on the velocity, which the trace cloud beside it shows. NaN beyond the range
            # the model speaks for: the curve ends there.
            target = np.array([model.predict(ModelFeatures(float(v), 0.0))[axis] for v in s])
            label = f"{model.kind} model from {n} X-ray point{'s' * (n != 1)}"
        elif self.cfg["tracking"]["use_prior"] and model.state == "collecting":
            target = prior_target(self.cfg, s, gate.axis)
            label = "prior (planning CT): no X-ray model yet"
            if n:
                label += f", {n} point{'s' * (n != 1)} collected"
        else:
            target = np.full_like(s, math.nan)
            label = f"no valid model ({model.state}, {n} points)"
        self._model_key, self._model = key, ModelView(label, s, target)
        return self._model
