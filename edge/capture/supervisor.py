"""Keeping a camera open: :class:`CameraSupervisor` reopens a failed camera with
exponential backoff (waiting on the stop event, never sleeping) and reports the
outage through callbacks, so health messages can say "camera down since 03:12"."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from fieldscope.edge.capture.base import Camera, CameraError, Frame, utc_now

__all__ = ["CameraSupervisor", "Outage", "open_with_backoff"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outage:
    """A camera that is down: the latest error, since when, how many failed tries."""

    error: str
    since: datetime
    attempts: int


class _Backoff:
    """Exponential delays from ``low`` doubling up to ``high``."""

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low <= high:
            raise ValueError(f"backoff needs 0 < min <= max, got {low}, {high}")
        self.low, self.high = low, high
        self.delay = low

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.high)
        return delay

    def reset(self) -> None:
        self.delay = self.low


class CameraSupervisor:
    """Keeps a camera working: reopens a failed one with exponential backoff.

    :meth:`read` never raises :class:`CameraError`: when the camera fails it is closed,
    the outage is recorded (``outage``, and ``on_outage(error, down_since)`` on every
    failed try) and reopening is tried after ``backoff_min_s``, doubling up to
    ``backoff_max_s``. Waits are on ``stop`` and bounded by ``read``'s timeout, so the
    capture thread stays responsive. The camera counts as recovered after its first
    successful read (not merely open: a camera that opens and then fails at once
    must keep backing off); ``on_recovered(down_since, seconds_down)`` is called then.
    ``MissingDependencyError`` is not retried: no wait can install a package.
    """

    def __init__(
        self,
        camera: Camera,
        stop: threading.Event,
        *,
        backoff_min_s: float = 1.0,
        backoff_max_s: float = 60.0,
        on_outage: Callable[[str, datetime], None] | None = None,
        on_recovered: Callable[[datetime, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.camera = camera
        self._stop = stop
        self._backoff = _Backoff(backoff_min_s, backoff_max_s)
        self._on_outage = on_outage
        self._on_recovered = on_recovered
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._retry_at = -float("inf")
        self._outage: Outage | None = None
        self._outage_started = 0.0  # on ``clock``: a wall-clock jump must not skew it

    @property
    def outage(self) -> Outage | None:
        """The current outage, or None while the camera works (for health messages)."""
        with self._lock:
            return self._outage

    def read(self, timeout: float) -> Frame | None:
        """A frame, or None: nothing yet, camera down (retrying), or ``stop`` is set."""
        if self._stop.is_set():
            return None
        if not self._open and not self._try_open(timeout):
            return None
        try:
            frame = self.camera.read(timeout)
        except CameraError as exc:
            self._failed(str(exc))
            return None
        except Exception as exc:
            # A bug or a library's own exception: treated as a camera failure (closed,
            # reopened with backoff), never allowed to end the capture thread.
            logger.error("camera %s: unexpected error", self.camera.name, exc_info=True)
            self._failed(f"unexpected {type(exc).__name__}: {str(exc)[:200]}")
            return None
        self._recovered()
        return frame

    def _try_open(self, timeout: float) -> bool:
        wait = self._retry_at - self._clock()
        if wait > 0 and (
            self._stop.wait(min(wait, max(0.0, timeout))) or self._clock() < self._retry_at
        ):
            return False
        try:
            self.camera.open()
        except CameraError as exc:
            self._failed(str(exc))
            return False
        self._open = True
        return True

    def _failed(self, error: str) -> None:
        self.camera.close()
        self._open = False
        delay = self._backoff.next()
        self._retry_at = self._clock() + delay
        with self._lock:
            if self._outage is None:
                self._outage = Outage(error, utc_now(), 1)
                self._outage_started = self._clock()
            else:
                self._outage = Outage(error, self._outage.since, self._outage.attempts + 1)
            outage = self._outage
        logger.warning(
            "camera %s is down (try %d, since %s): %s; retrying in %.1f s",
            self.camera.name,
            outage.attempts,
            outage.since.isoformat(timespec="seconds"),
            error,
            delay,
        )
        if self._on_outage is not None:
            self._on_outage(error, outage.since)

    def _recovered(self) -> None:
        if self._outage is None:
            return
        with self._lock:
            outage, self._outage = self._outage, None
        self._backoff.reset()
        seconds = self._clock() - self._outage_started
        logger.warning("camera %s is back after %.1f s", self.camera.name, seconds)
        if self._on_recovered is not None:
            self._on_recovered(outage.since, seconds)

    def close(self) -> None:
        self.camera.close()
        self._open = False


def open_with_backoff(
    camera: Camera,
    stop: threading.Event,
    *,
    backoff_min_s: float = 1.0,
    backoff_max_s: float = 60.0,
    on_outage: Callable[[str, datetime], None] | None = None,
) -> bool:
    """Open ``camera``, retrying with exponential backoff until it opens (True) or
    ``stop`` is set (False). Waits on ``stop``, so a shutdown is never delayed."""
    backoff = _Backoff(backoff_min_s, backoff_max_s)
    since: datetime | None = None
    while not stop.is_set():
        try:
            camera.open()
        except CameraError as exc:
            since = since or utc_now()
            delay = backoff.next()
            logger.warning("camera %s cannot open: %s; retrying in %.1f s", camera.name, exc, delay)
            if on_outage is not None:
                on_outage(str(exc), since)
            stop.wait(delay)
            continue
        return True
    return False
