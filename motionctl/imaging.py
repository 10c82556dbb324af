"""The live imaging path: X-ray frames in, fiducial measurements out, off the decision thread.

Localising seeds costs milliseconds per stereo pair (and ~100 ms without a prior), far more
than the controller may spend per surrogate sample, so it runs on its own worker thread:
the image driver hands frames to ``FiducialWorker.submit``; the worker pairs the two views
of a stereo frame by frame id, localises with the pure functions of ``motionctl.fiducials``
(search regions placed around the tracker's latest estimate), and puts one
``FiducialMeasurement`` per frame into the controller's queue. The session core then
checks it against the estimate and adds it to the correlation model; the session log
records the measurement, so replay needs no images.

A frame whose seeds are not found where the tracker expects them is searched again, wider
(stereo: the whole frame; mono: around the positions learned so far, over their spread;
a ``reacquired`` event when that finds them): seeds missing from their
search regions are what a baseline shift the surrogate does not show looks like, and that
is for the session core's fiducial check to judge and hold on, not for the localiser to
discard as "not found" while the beam runs on until the imager is stale.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

from motionctl.fiducials import (
    LocaliserSettings,
    LockReason,
    SeedPlan,
    TargetPrior,
    localise_mono,
    localise_stereo,
)
from motionctl.types import DeviceEvent, FiducialMeasurement, MotionEstimate, XrayFrame

log = logging.getLogger("motionctl.imaging")

_STOP = object()

# Rejections that the target being away from its search regions can cause (a lock found
# but rotated, or with a poor fit, is judged where it was found and not searched again).
_REACQUIRE = frozenset(
    {
        LockReason.NO_CANDIDATES,
        LockReason.SCORE_TOO_LOW,
        LockReason.TOO_FEW_SEEDS,
        LockReason.RAY_DISTANCE,
        LockReason.INTER_SEED_DISTANCE,
        LockReason.OUTSIDE_SEARCH_REGION,
        LockReason.OUTSIDE_FIELD_OF_VIEW,
        LockReason.SEED_SHAPE,
    }
)


def frame_prior(
    learned: TargetPrior,
    estimate: MotionEstimate | None,
    stereo: bool,
    settings: LocaliserSettings,
) -> TargetPrior:
    """What a frame is localised under: the positions learned so far, with the tracker's
    estimate as the prediction (search regions; mono's Gaussian until enough positions are
    learned). Mono with no valid estimate to offer (an X-ray model invalidated before
    ``mono_min_samples`` positions were learned) takes the mean of those few, with
    ``mono_sparse_sd_mm``: else it could never localise again to rebuild the model."""
    if estimate is not None and estimate.valid:
        sigma = estimate.uncertainty_mm if math.isfinite(estimate.uncertainty_mm) else 5.0
        return learned.with_prediction(estimate.position_mm, max(sigma, 1.0))
    if not stereo and 0 < learned.n < settings.mono_min_samples:
        return learned.with_prediction(learned.mean_mm, settings.mono_sparse_sd_mm)
    return learned


class FiducialWorker:
    def __init__(
        self,
        plan: SeedPlan,
        *,
        stereo: bool,
        deliver: Callable[[object], None],
        latest_estimate: Callable[[], MotionEstimate | None],
        pair_timeout_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        settings: LocaliserSettings | None = None,
    ):
        self._plan = plan
        self._stereo = stereo
        self._deliver = deliver
        self._latest_estimate = latest_estimate
        self._pair_timeout_s = pair_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._settings = settings or LocaliserSettings()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, list[XrayFrame]] = {}
        self._prior = TargetPrior()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fiducial-worker")
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout=5.0)
        self._thread = None

    def submit(self, item: XrayFrame | DeviceEvent) -> None:
        """The image driver's sink: frames are localised here, events pass straight on."""
        if isinstance(item, XrayFrame):
            self._queue.put(item)
        else:
            self._deliver(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._frame(item)
            except Exception as exc:  # noqa: BLE001 - a bad frame must not end imaging
                log.exception("localisation failed")
                self._deliver(
                    DeviceEvent(item.device, self._clock(), "localisation_error", repr(exc))
                )

    def _frame(self, frame: XrayFrame) -> None:
        self._drop_unpaired(frame.t_rx)
        if not self._stereo:
            self._localise([frame])
            return
        views = self._pending.setdefault(frame.frame_id, [])
        views.append(frame)
        if len(views) == 2:
            del self._pending[frame.frame_id]
            self._localise(sorted(views, key=lambda f: f.geometry.imager))

    def _drop_unpaired(self, now: float) -> None:
        for frame_id, views in list(self._pending.items()):
            if now - views[0].t_rx > self._pair_timeout_s:
                del self._pending[frame_id]
                self._deliver(
                    DeviceEvent(
                        views[0].device,
                        now,
                        "unpaired_view",
                        f"frame {frame_id}: {views[0].geometry.imager} only",
                    )
                )

    def _localise_under(self, views: list[XrayFrame], prior: TargetPrior, t_acq: float):
        if len(views) == 2:
            pair = [(v.image, v.geometry) for v in views]
            return localise_stereo(pair, self._plan, prior, t=t_acq, settings=self._settings)
        first = views[0]
        return localise_mono(
            first.image, first.geometry, self._plan, prior, t=t_acq, settings=self._settings
        )

    def _wider_prior(self, prior: TargetPrior) -> TargetPrior | None:
        """What a frame not found under ``prior`` is searched again under, or None: stereo,
        the whole frame (no prior: the constellation alone is the test); mono, which needs
        a depth, the positions learned so far without the tracker's prediction (their
        spread over the breath sets the search regions), once there are enough."""
        if prior.search_centre() is None:
            return None  # already the widest
        if self._stereo:
            return TargetPrior()
        if prior.predicted_mm is None or self._prior.n < self._settings.mono_min_samples:
            return None
        return self._prior

    def _localise(self, views: list[XrayFrame]) -> None:
        first = views[0]
        # Mid-exposure on the controller's clock: the device stamps wall-clock time.
        t_acq = first.t_device - (self._wall_clock() - self._clock())
        prior = frame_prior(self._prior, self._latest_estimate(), self._stereo, self._settings)
        loc = self._localise_under(views, prior, t_acq)
        # The wider search costs up to ~100 ms: never for a frame a newer one waits behind.
        if not loc.accepted and loc.reason in _REACQUIRE and self._queue.empty():
            wider = self._wider_prior(prior)
            again = None if wider is None else self._localise_under(views, wider, t_acq)
            if again is not None and again.accepted:
                off = math.dist(again.position_mm, prior.search_centre()[0])
                self._deliver(
                    DeviceEvent(
                        first.device,
                        self._clock(),
                        "reacquired",
                        f"frame {first.frame_id}: wider search after {loc.reason} "
                        f"({loc.detail}); target {off:.1f} mm from the search centre",
                    )
                )
                loc = again
        if loc.accepted:
            self._prior = self._prior.update(loc.position_mm, loc.rotation_deg)
        self._deliver(
            FiducialMeasurement(
                device=first.device,
                frame_id=first.frame_id,
                t_acq=t_acq,
                t_rx=max(v.t_rx for v in views),
                mode=loc.mode,
                accepted=loc.accepted,
                reason="" if loc.accepted else f"{loc.reason}: {loc.detail}".strip(": "),
                position_mm=tuple(float(v) for v in loc.position_mm),
                rotation_deg=tuple(float(v) for v in loc.rotation_deg),
                n_seeds=loc.n_seeds,
                residual_mm=float(loc.residual_mm),
                uncertainty_mm=float(loc.uncertainty_mm),
            )
        )
