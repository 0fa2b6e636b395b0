"""What the MQTT link reports about itself: connection, delivery counters, last error.

:class:`LinkCounters` is counted by the link's paho callbacks and publisher (under
the link's lock); :meth:`LinkCounters.snapshot` freezes it into a :class:`LinkHealth`
for heartbeats, the status command and the daemon's summary log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["LinkCounters", "LinkHealth"]


@dataclass(frozen=True)
class LinkHealth:
    """The link's state for health and logs."""

    connected: bool
    last_connected_at: datetime | None
    last_disconnected_at: datetime | None
    disconnects: int
    connect_failures: int
    in_flight: int
    published: int
    acknowledged: int
    refused: int
    last_error: str | None


@dataclass
class LinkCounters:
    """The counted part of :class:`LinkHealth`, since the link started."""

    last_connected_at: datetime | None = None
    last_disconnected_at: datetime | None = None
    disconnects: int = 0
    connect_failures: int = 0
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    last_error: str | None = None

    def snapshot(self, *, connected: bool, in_flight: int) -> LinkHealth:
        """A frozen copy with the link's current connection state."""
        return LinkHealth(connected=connected, in_flight=in_flight, **vars(self))
