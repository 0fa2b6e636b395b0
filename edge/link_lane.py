"""One durable queue the MQTT link drains: the identifications' outbox, or the images'.

Split from :mod:`fieldscope.edge.link`: the link publishes from each lane in turn
and keeps, per lane, what only makes sense within that queue's own ``seq`` numbers
(which entries are in flight, how far it has read, which acknowledged entries are
still to be deleted). The link's condition variable guards all of it.
"""

from __future__ import annotations

from fieldscope.edge.outbox import Outbox

__all__ = ["IMAGES_IN_FLIGHT", "Lane"]

# Images handed to paho at once: each may be max_bytes, and paho keeps every handed-over
# message in memory until its PUBACK (20 at most on the wire, the rest queued).
IMAGES_IN_FLIGHT = 4


class Lane:
    """A queue and the link's bookkeeping for it (guarded by the link's lock)."""

    def __init__(self, outbox: Outbox, limit: int | None = None) -> None:
        self.outbox = outbox
        # At most this many of its entries in flight (None: the link's max_in_flight): an
        # image lane's entries are large, and paho holds all handed-over ones in memory.
        self.limit = limit
        self.waiting = False  # entries wait behind ``limit``: fill again on its next ack
        self.in_flight: set[int] = set()  # seqs handed to paho, not yet acknowledged
        self.cursor = 0  # highest seq handed to paho since the last rewind
        self.rewind = False  # re-scan the queue from its start on the next fill
        self.unacked_deletes: set[int] = set()  # acknowledged, not yet deleted

    def room(self, room: int) -> int:
        """The link's ``room`` within this lane's ``limit``; at 0 the lane waits."""
        if self.limit is not None:
            room = min(room, self.limit - len(self.in_flight))
            self.waiting = room <= 0
        return room

    def acknowledged(self, seq: int) -> bool:
        """``seq`` is no longer in flight; whether the lane must be filled again."""
        self.in_flight.discard(seq)
        waited, self.waiting = self.waiting, False
        return waited
