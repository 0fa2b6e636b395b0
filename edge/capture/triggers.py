"""Triggers: when the daemon takes the next frame (continuously, on an interval, or
only on the MQTT ``capture`` command, which also works in the other modes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fieldscope.edge.errors import ConfigError

if TYPE_CHECKING:
    from fieldscope.edge.config import CameraConfig

__all__ = ["CommandTrigger", "ContinuousTrigger", "IntervalTrigger", "Trigger", "make_trigger"]

# How often a waiting trigger looks at the stop event. Waits are on events (a fired
# capture wakes them at once); only a stop set without ``wake()`` waits this long.
_STOP_CHECK_S = 0.25


class Trigger:
    """When to take the next frame. :meth:`wait` blocks until a frame is due (True)
    or ``stop`` is set (False). :meth:`fire` asks for one frame now, in any mode: it is
    what the MQTT ``capture`` command calls; requests queue up to ``max_pending``."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_pending: int = 16
    ) -> None:
        self._clock = clock
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._event = threading.Event()

    def fire(self) -> bool:
        """Request one capture now; False when ``max_pending`` requests already wait."""
        with self._lock:
            if self._pending >= self._max_pending:
                return False
            self._pending += 1
            self._event.set()
        return True

    def wake(self) -> None:
        """Make a waiting :meth:`wait` look at its stop event at once (after stop.set())."""
        self._event.set()

    def wait(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            with self._lock:
                if self._pending:
                    self._pending -= 1
                    if not self._pending:
                        self._event.clear()
                    return True
                self._event.clear()
            now = self._clock()
            due = self._due_in(now)
            if due is not None and due <= 0:
                self._taken(now)
                return True
            self._event.wait(_STOP_CHECK_S if due is None else min(due, _STOP_CHECK_S))
        return False

    def _due_in(self, now: float) -> float | None:
        """Seconds until the schedule wants a frame; None: never (command only)."""
        return None

    def _taken(self, now: float) -> None:
        """The schedule's frame was taken at ``now``."""


class ContinuousTrigger(Trigger):
    """As fast as the pipeline takes frames, but at most ``max_rate_hz`` (0: no limit)."""

    def __init__(self, max_rate_hz: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self.period = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0
        self._last = -float("inf")

    def _due_in(self, now: float) -> float:
        return self._last + self.period - now

    def _taken(self, now: float) -> None:
        self._last = now


class IntervalTrigger(Trigger):
    """Every ``interval_s`` on a fixed grid from the first wait (slots missed while
    the pipeline was busy are skipped, not made up in a burst)."""

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._next: float | None = None

    def _due_in(self, now: float) -> float:
        if self._next is None:
            self._next = now
        return self._next - now

    def _taken(self, now: float) -> None:
        assert self._next is not None
        while self._next <= now:
            self._next += self.interval_s


class CommandTrigger(Trigger):
    """Only when asked: each :meth:`fire` (the MQTT ``capture`` command) is one frame."""


def make_trigger(cfg: CameraConfig, *, clock: Callable[[], float] = time.monotonic) -> Trigger:
    """The trigger ``cfg.trigger`` names.

    Raises:
        ConfigError: unknown trigger.
    """
    if cfg.trigger == "continuous":
        return ContinuousTrigger(cfg.max_rate_hz, clock=clock)
    if cfg.trigger == "interval":
        return IntervalTrigger(cfg.interval_s, clock=clock)
    if cfg.trigger == "command":
        return CommandTrigger(clock=clock)
    raise ConfigError(f"camera.trigger: unknown trigger {cfg.trigger!r}")
