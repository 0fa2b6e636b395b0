"""Commands the MQTT link receives: filtered on paho's network thread, run on their own.

paho delivers a message on its network thread, which must never block; the
:class:`CommandInbox` only checks the topic and queues the command, and its
dispatcher thread hands it to ``on_command(name, payload)``, so a slow handler never
stalls the network. A burst beyond the queue is dropped (and logged) rather than
held in memory. Retained commands are ignored: they would run again on every
reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from fieldscope.edge.topics import TopicError, TopicKind, Topics, parse, show

__all__ = ["COMMAND_QUEUE", "CommandInbox"]

logger = logging.getLogger("fieldscope.edge.link")

# Commands waiting for the dispatcher; more in a burst are dropped (and logged).
COMMAND_QUEUE = 64


class CommandInbox:
    """Queue of this device's commands between paho and the handler."""

    def __init__(
        self,
        topics: Topics,
        on_command: Callable[[str, bytes], None],
        stop: threading.Event,
        wait_s: float,
    ) -> None:
        self.topics = topics
        self._on_command = on_command
        self._stop = stop
        self._wait_s = wait_s
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(COMMAND_QUEUE)

    def _command_name(self, message: mqtt.MQTTMessage) -> str | None:
        """The command this message carries, or None (logged) when it is not one of
        this device's non-retained commands."""
        try:
            parsed = parse(message.topic, self.topics.prefix)
        except TopicError as exc:
            logger.warning("ignoring a message outside the topic scheme: %s", exc)
            return None
        if (
            parsed.kind is not TopicKind.COMMAND
            or parsed.command is None
            or (parsed.station, parsed.device) != (self.topics.station, self.topics.device)
        ):
            logger.warning("ignoring an unexpected message on %s", show(message.topic))
            return None
        if message.retain:
            logger.warning(
                "ignoring retained command %s: a retained command would run again on every "
                "reconnect; clear it by publishing an empty retained message to that topic",
                show(message.topic),
            )
            return None
        return parsed.command

    def offer(self, message: mqtt.MQTTMessage) -> None:
        """paho's ``on_message`` (network thread): queue the command, never block."""
        name = self._command_name(message)
        if name is None:
            return
        try:
            self._queue.put_nowait((name, bytes(message.payload)))
        except queue.Full:
            logger.warning("dropping command %s: %d commands already waiting", name, COMMAND_QUEUE)

    def run(self) -> None:
        """The dispatcher thread's body: until the stop event or :meth:`close`."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=self._wait_s)
            except queue.Empty:
                continue
            if item is None:
                return
            name, payload = item
            try:
                self._on_command(name, payload)
            except Exception:
                logger.exception("the command handler failed on %s", show(name))

    def close(self) -> None:
        """Let the dispatcher finish after the commands already queued."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
