"""One durable queue the MQTT link drains: the identifications' outbox, or the images'.

Split from :mod:`fieldscope.edge.link`: the link publishes from each lane in turn
and keeps, per lane, what only makes sense within that queue's own ``seq`` numbers
(which entries are in flight, how far it has read, which acknowledged entries are
still to be deleted). The link's condition variable guards all of it.
"""

from __future__ import annotations

from fieldscope.edge.outbox import Outbox

__all__ = ["Lane"]


class Lane:
    """A queue and the link's bookkeeping for it (guarded by the link's lock)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.in_flight: set[int] = set()  # seqs handed to paho, not yet acknowledged
        self.cursor = 0  # highest seq handed to paho since the last rewind
        self.rewind = False  # re-scan the queue from its start on the next fill
        self.unacked_deletes: set[int] = set()  # acknowledged, not yet deleted
