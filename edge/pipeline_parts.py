"""The pieces the edge pipeline passes between its stages, and its frame counters.

Split from :mod:`fieldscope.edge.pipeline` (which re-exports :class:`FrameCounters`
and :class:`StorageProblem`): what a frame carries from stage to stage, and how the
stored message is built once the outbox hands out its ``seq``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import numpy as np
import numpy.typing as npt

from fieldscope.edge.capture import Frame
from fieldscope.edge.classify import Prediction
from fieldscope.edge.health import FrameCounts
from fieldscope.edge.message import ImageRef, Timings, build_identification, build_rejection
from fieldscope.edge.model_slot import LoadedModel
from fieldscope.edge.pipeline_objects import Segmented
from fieldscope.edge.quality import QualityResult
from fieldscope.edge.topics import Topics

__all__ = ["FrameCounters", "StorageProblem", "message_factory"]

# Frames per second are measured over this window.
_FPS_WINDOW_S = 30.0
# What a frame's image is replaced by once preprocessing is done (frees megabytes).
_NO_IMAGE: Final = np.zeros((0, 0, 3), dtype=np.uint8)


class FrameCounters:
    """Thread-safe frame counts and the recent capture rate, for health messages.

    ``segmenting``: the station cuts frames into objects, so ``objects`` (found and
    classified) is counted and reported too, and the statuses count messages, one per
    object (a frame without objects is one ``rejected``)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, segmenting: bool = False
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = {"seen": 0, "accepted": 0, "uncertain": 0, "rejected": 0, "failed": 0}
        if segmenting:
            self._counts["objects"] = 0
        self._recent: deque[float] = deque(maxlen=1024)

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n
            if kind == "seen":
                self._recent.append(self._clock())

    def stored_one(self, status: str) -> None:
        """A message is committed: count it by its status."""
        kind = {"ok": "accepted", "uncertain": "uncertain", "rejected": "rejected"}[status]
        with self._lock:
            self._counts[kind] += 1

    def snapshot(self) -> FrameCounts:
        with self._lock:
            return FrameCounts(**self._counts)

    def fps(self) -> float:
        """Frames captured per second over the last half minute."""
        now = self._clock()
        with self._lock:
            times = [t for t in self._recent if now - t <= _FPS_WINDOW_S]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(now - times[0], 1e-3)


@dataclass(frozen=True)
class StorageProblem:
    """The outbox has refused to store since ``since`` (UTC, for display): capture is
    held. ``seconds`` is how long, on the monotonic clock (a clock jump does not
    change it); ``attempts`` counts the tries so far; ``error`` is the latest one's."""

    error: str
    since: datetime
    seconds: float
    attempts: int


@dataclass
class _Blocked:
    error: str
    since: datetime
    started: float  # monotonic
    attempts: int


class _Beat:
    """When a stage last started work; None while it waits (idle is healthy)."""

    def __init__(self) -> None:
        self.busy_since: float | None = None

    def busy(self) -> None:
        self.busy_since = time.monotonic()

    def idle(self) -> None:
        self.busy_since = None


@dataclass
class _Captured:
    """A frame taken from the camera, on its way to ``prepare``."""

    source: str
    key: str | None
    done: Callable[[], None] | None
    captured_at: datetime
    digest: str
    width: int
    height: int
    started: float  # monotonic time the camera read began
    capture_ms: float
    image: npt.NDArray[np.uint8]
    frame: Frame | None  # kept only when the archive may want it
    fail: Callable[[str], None] | None = None  # the frame's own ``fail`` (see Frame)
    source_name: str | None = None  # the file's name, for frames read from files

    @property
    def source_frame(self) -> Frame | None:
        """What :meth:`Pipeline._quarantine` needs: the frame, or a stand-in carrying
        only its ``fail`` (the image itself may already be released)."""
        if self.fail is None:
            return None
        return Frame(_NO_IMAGE, self.source, self.captured_at, fail=self.fail)


@dataclass
class _Prepared:
    """A gated (and, if accepted, preprocessed) frame with the model it will use."""

    captured: _Captured
    model: LoadedModel
    quality: QualityResult
    quality_ms: float
    preprocess_ms: float
    tensor: npt.NDArray[np.uint8] | None  # None: rejected by the quality gate
    prediction: Prediction | None = None
    inference_ms: float = 0.0
    segmented: Segmented | None = None  # a segmenting station's accepted frame

    @property
    def source(self) -> str:
        return self.captured.source


def message_factory(work: _Prepared, topics: Topics, image: ImageRef) -> Callable[[int], bytes]:
    """The builder of the frame's identification (or rejection) for the ``seq`` the
    outbox hands out, so the message and its ``seq`` are committed together."""
    captured, prediction, gate = work.captured, work.prediction, work.quality
    model = work.model.ref
    timings = Timings(
        capture=captured.capture_ms,
        quality=work.quality_ms,
        preprocess=work.preprocess_ms,
        inference=work.inference_ms,
        total=(time.monotonic() - captured.started) * 1000.0,
    )
    device, station = topics.device, topics.station
    quality = gate.to_message()

    def payload(seq: int) -> bytes:
        if prediction is None:
            message = build_rejection(
                device=device,
                station=station,
                seq=seq,
                captured_at=captured.captured_at,
                reason=gate.reason or "rejected by the quality gate",
                model=model,
                image=image,
                timings=timings,
                quality=quality,
            )
        else:
            message = build_identification(
                device=device,
                station=station,
                seq=seq,
                captured_at=captured.captured_at,
                prediction=prediction,
                model=model,
                image=image,
                timings=timings,
                quality=quality,
            )
        return message.to_json()

    return payload
