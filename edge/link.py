"""The MQTT link: drains the durable outbox to the broker and listens for commands.

How a message travels: the classify thread stores it in the :class:`Outbox` (which
wakes the link through :meth:`MqttLink.notify`); the link's publisher thread
publishes the backlog oldest-first with at most ``max_in_flight`` messages
unacknowledged, remembers which paho ``mid`` carries which ``seq``, and deletes an
entry only when its PUBACK arrives. paho's callbacks run on paho's network thread
and only hand events over to the publisher through one condition variable; they
never touch SQLite and never block.

Decisions:

* **The session** (set up by :func:`fieldscope.edge.broker.make_client`) starts
  clean when the process starts (commands queued for a previous run are stale) and
  then persists across reconnects for ``session_expiry_s`` (MQTT 5), so a command
  sent during a short outage still arrives while a week-old one does not. MQTT 5
  also lets the broker refuse a message in its PUBACK (e.g. not authorised): the
  entry then stays in the outbox and is retried with backoff.
* **A stable client id** (from the configuration), required by persistent sessions
  and so that a restarted daemon takes over its own session at the broker.
* **Redelivery.** Messages unacknowledged when the connection drops stay in the
  outbox; paho retransmits them (same ``mid``, DUP flag) after the reconnect and
  the link re-scans its backlog on every reconnect as a safety net. After a process
  restart the whole backlog is sent again from the outbox. Duplicates are expected:
  subscribers drop repeats by ``(device, seq)``.
* **Retained state is republished on every connect** — subscription to
  ``command/+``, the retained ``model`` info, then retained ``online`` — because a
  broker restarted without persistence has forgotten them. ``online`` comes last,
  so a subscriber that sees it already has the model. The last will is retained
  ``offline``; a clean stop publishes retained ``stopped`` first, since the broker
  does not send the will after a clean DISCONNECT.
* **At most ``max_in_flight`` unacknowledged**, the rest waits on disk, not in memory.
* **Images** (``[upload]``) wait in their own durable queue, a second :class:`Outbox`
  (:class:`~fieldscope.edge.link_lane.Lane`), drained the same way with the room the
  identifications leave: identifications go first, and neither queue's cap can push
  out the other's messages. Each lane keeps its own seqs, cursor and deletions.
* **Commands** (``.../command/+``) are handed to ``on_command(name, payload)`` on
  the link's own dispatcher thread, so a slow handler never stalls the network.
  Retained commands are ignored: they would run again on every reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fieldscope.edge.broker import (
    PAHO_MAX_INFLIGHT,
    BrokerSettings,
    MqttProtocol,
    PahoLog,
    describe,
    make_client,
    route_connection,
)
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.link_commands import CommandInbox
from fieldscope.edge.link_health import LinkCounters, LinkHealth
from fieldscope.edge.link_lane import IMAGES_IN_FLIGHT, Lane
from fieldscope.edge.outbox import Entry, Outbox, OutboxError
from fieldscope.edge.topics import (
    TOPIC_SPECS,
    DeviceStatus,
    TopicError,
    TopicKind,
    Topics,
    show,
)

__all__ = [
    "PAHO_MAX_INFLIGHT",
    "BrokerSettings",
    "LinkError",
    "LinkHealth",
    "MqttLink",
    "MqttProtocol",
    "SupportsJson",
]

logger = logging.getLogger(__name__)

# The longest the publisher sleeps without an event; only bounds how late it sees
# the shared stop event, which cannot wake a condition variable.
_MAX_WAIT_S = 1.0
# Backoff before re-sending messages the broker refused.
_REFUSED_RETRY_MIN_S = 5.0
_REFUSED_RETRY_MAX_S = 300.0


class LinkError(FieldscopeError):
    """The MQTT link was misused (bad settings and files raise ``ConfigError``)."""


class SupportsJson(Protocol):
    """A payload dataclass (``Heartbeat``, ``ModelInfo``, ``CommandReply``)."""

    def to_json(self) -> bytes: ...


def _as_bytes(payload: bytes | SupportsJson) -> bytes:
    return payload if isinstance(payload, bytes) else payload.to_json()


class MqttLink:
    """Publishes the outbox and the device's state; receives its commands.

    Lifecycle: ``start()`` once; the daemon sets its ``stop`` event when shutting
    down, then calls ``stop_clean()``, which flushes what it can, publishes the
    retained ``stopped`` status and disconnects. ``on_command(name, payload)``
    receives raw commands (parse them with ``fieldscope.edge.commands``) on the
    link's dispatcher thread; ``retained_model()`` returns the current model-info
    payload, or None while no model is loaded, and is called on every connect from
    the publisher thread, so it must return at once (a cached value).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        topics: Topics,
        outbox: Outbox,
        *,
        on_command: Callable[[str, bytes], None],
        retained_model: Callable[[], bytes | None],
        stop: threading.Event,
        images: Outbox | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.outbox = outbox
        self._inbox = CommandInbox(topics, on_command, stop, _MAX_WAIT_S)
        self._retained_model = retained_model
        self._stop = stop
        self._cv = threading.Condition()
        # State below is guarded by self._cv.
        self._connected = False
        self._announce = False
        self._dirty = True
        self._closing = False
        self._acks: list[tuple[int, ReasonCode | None]] = []
        self._lanes = [Lane(outbox)] + ([] if images is None else [Lane(images, IMAGES_IN_FLIGHT)])
        self._in_flight: dict[int, tuple[Lane, int]] = {}  # paho mid -> lane and seq
        self._retry_at: float | None = None
        self._retry_delay = _REFUSED_RETRY_MIN_S
        self._online_mid: int | None = None
        self._online = False
        self._stopped_mid: int | None = None
        self._stopped_acked = False
        self._n = LinkCounters()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stop_result: bool | None = None
        self._client = self._make_client()
        for lane in self._lanes:
            lane.outbox.add_listener(self.notify)

    # --- set-up ---------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = make_client(
            self.settings,
            fresh_session=True,
            paho_logger=PahoLog(f"{__name__}.paho", lambda: self._closing),
        )
        client.will_set(*self.topics.last_will())
        route_connection(
            client,
            self.settings,
            connected=self._handle_connect,
            failed=self._handle_connect_failed,
            disconnected=self._handle_disconnect,
        )
        client.on_publish = self._handle_publish
        client.on_message = lambda _client, _userdata, message: self._inbox.offer(message)
        return client

    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start the threads.

        Returns at once: a broker that is down at boot is simply retried, and the
        outbox keeps everything meanwhile.
        """
        if self._started:
            raise LinkError("MqttLink.start() was called twice")
        self._started = True
        self._client.loop_start()
        logger.info("connecting to %s", describe(self.settings))
        for name, target in (("publisher", self.run), ("commands", self._inbox.run)):
            thread = threading.Thread(target=target, name=f"fieldscope-mqtt-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # --- paho callbacks: network thread; record and hand over, never block -----------------

    def _handle_connect(self) -> None:
        with self._cv:
            self._connected = True
            self._announce = True
            self._dirty = True
            self._rewind_lanes()  # re-scan the backlog for anything not in flight
            self._retry_at = None
            self._retry_delay = _REFUSED_RETRY_MIN_S
            self._n.last_connected_at = datetime.now(UTC)
            self._n.last_error = None
            self._cv.notify_all()

    def _handle_connect_failed(self, text: str, refused: bool) -> None:
        with self._cv:
            self._n.connect_failures += 1
            new = self._n.last_error != text
            self._n.last_error = text
        if new and refused:
            logger.error("%s (check mqtt.username/password and the broker's ACL)", text)
        elif new:
            logger.warning("%s; retrying with backoff", text)

    def _handle_disconnect(self, reason: ReasonCode) -> None:
        with self._cv:
            was_connected = self._connected
            self._connected = False
            self._online = False
            if was_connected:
                self._n.disconnects += 1
                self._n.last_disconnected_at = datetime.now(UTC)
                if self._closing:
                    was_connected = False  # our own disconnect: not worth a warning
                else:
                    self._n.last_error = f"disconnected from the broker: {reason}"
            in_flight = len(self._in_flight)
            self._cv.notify_all()
        if was_connected:
            logger.warning(
                "disconnected from %s:%d (%s); %d message(s) in flight stay in the outbox",
                self.settings.host,
                self.settings.port,
                reason,
                in_flight,
            )

    def _handle_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode | None,
        _properties: Properties | None,
    ) -> None:
        with self._cv:
            self._acks.append((mid, reason))
            self._cv.notify_all()

    # --- the publisher thread ---------------------------------------------------------------

    def notify(self) -> None:
        """Wake the publisher: there is something new in the outbox."""
        with self._cv:
            self._dirty = True
            self._cv.notify_all()

    def rewind(self) -> None:
        """Wake the publisher to read the outbox from its oldest entry again: entries
        older than those already published were put back (``Outbox.requeue``)."""
        with self._cv:
            self._rewind_lanes()
            self._dirty = True
            self._cv.notify_all()

    def _rewind_lanes(self) -> None:
        """Re-scan every queue from its oldest entry on the next fill. Needs self._cv."""
        for lane in self._lanes:
            lane.rewind = True

    def run(self) -> None:
        """The publisher thread's body (started by :meth:`start`): drain the outbox to
        the broker until the stop event is set or :meth:`stop_clean` takes over."""
        while True:
            with self._cv:
                if self._closing or self._stop.is_set():
                    return
            try:
                self._step(_MAX_WAIT_S)
            except Exception:  # the publisher must outlive any surprise; log it loudly
                logger.exception("unexpected error in the MQTT publisher; continuing")
                with self._cv:
                    self._cv.wait(_MAX_WAIT_S)

    def _has_work(self) -> bool:
        # Called with self._cv held. The stop event cannot wake the condition: run()
        # sees it within _MAX_WAIT_S, and stop_clean() notifies.
        if self._acks:
            return True
        if not self._connected:
            return False
        if self._announce:
            return True
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            return True
        return self._dirty and len(self._in_flight) < self.settings.max_in_flight

    def _step(self, max_wait_s: float) -> None:
        """Wait for an event (at most ``max_wait_s``), then act on everything pending."""
        with self._cv:
            wait = max_wait_s
            if self._retry_at is not None:
                wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
            if not self._has_work():
                self._cv.wait(wait)
            acks, self._acks = self._acks, []
            done = self._resolve_acks(acks)
            announce = self._connected and self._announce
            self._announce = False
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
                self._rewind_lanes()
                self._dirty = True
        self._delete(done)
        if announce:
            self._announce_state()
        self._fill()

    def _resolve_acks(self, acks: list[tuple[int, ReasonCode | None]]) -> list[tuple[Lane, int]]:
        """Map PUBACKs to queued seqs; a refusal schedules a retry. Needs self._cv."""
        done: list[tuple[Lane, int]] = []
        for mid, reason in acks:
            if mid == self._online_mid:
                self._online = True
                self._cv.notify_all()
            if mid == self._stopped_mid:
                self._stopped_acked = True
                self._cv.notify_all()
            found = self._in_flight.pop(mid, None)
            if found is None:
                continue
            lane, seq = found
            if lane.acknowledged(seq):
                self._dirty = True
            if reason is not None and reason.is_failure:
                self._n.refused += 1
                self._n.last_error = f"the broker refused message seq {seq}: {reason}"
                logger.warning("%s; it stays in the outbox and is retried", self._n.last_error)
                if self._retry_at is None:
                    self._retry_at = time.monotonic() + self._retry_delay
                    self._retry_delay = min(2 * self._retry_delay, _REFUSED_RETRY_MAX_S)
                continue
            self._n.acknowledged += 1
            done.append((lane, seq))
        return done

    def _delete(self, done: list[tuple[Lane, int]]) -> None:
        """Delete acknowledged entries; keep them for the next try if the disk refuses."""
        for lane in self._lanes:
            with self._cv:
                batch = lane.unacked_deletes | {seq for at, seq in done if at is lane}
            if not batch:
                continue
            try:
                lane.outbox.ack_many(batch)
            except OutboxError as exc:
                with self._cv:
                    lane.unacked_deletes = batch
                    self._n.last_error = str(exc)
                logger.warning("cannot delete acknowledged messages (they will be resent): %s", exc)
                continue
            with self._cv:
                lane.unacked_deletes -= batch

    def _announce_state(self) -> None:
        """Subscribe to commands, republish the retained model, then retained ``online``."""
        client = self._client
        client.subscribe(self.topics.command_filter, qos=TOPIC_SPECS[TopicKind.COMMAND].qos)
        try:
            model = self._retained_model()
        except Exception:
            logger.exception("retained_model() failed; the model info is not republished")
            model = None
        if model is not None:
            self._publish(TopicKind.MODEL, self.topics.model, model)
        info = self._publish(
            TopicKind.STATUS, self.topics.status, DeviceStatus.ONLINE.value.encode()
        )
        with self._cv:
            self._online_mid = info.mid

    def _publish(self, kind: TopicKind, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        spec = TOPIC_SPECS[kind]
        return self._client.publish(topic, payload, qos=spec.qos, retain=spec.retain)

    def _fill(self) -> None:
        """Hand queued entries to paho, oldest first, identifications before images,
        up to ``max_in_flight``."""
        while True:
            with self._cv:
                room = self.settings.max_in_flight - len(self._in_flight)
                if not self._connected or room <= 0 or not self._dirty:
                    return
                self._dirty = False
            if not all(self._fill_lane(lane) for lane in self._lanes):
                return

    def _fill_lane(self, lane: Lane) -> bool:
        """Hand one queue's entries to paho with the room left; False to stop filling."""
        with self._cv:
            room = self.settings.max_in_flight - len(self._in_flight)
            if room <= 0:
                self._dirty = True  # the rest waits for acknowledgements
                return False
            room = lane.room(room)
            if room <= 0:
                return True  # filled again when one of its own is acknowledged
            if lane.rewind:
                lane.rewind = False
                lane.cursor = 0
            after = lane.cursor
        try:
            entries = lane.outbox.pending(room, after=after)
        except OutboxError as exc:
            with self._cv:
                self._n.last_error = str(exc)
                self._retry_at = time.monotonic() + self._retry_delay
            logger.error("cannot read the outbox: %s", exc)
            return False
        for entry in entries:
            if not self._hand_over(lane, entry):
                return False
        if len(entries) == room:
            with self._cv:
                self._dirty = True  # a full batch: there may be more behind it
        return True

    def _hand_over(self, lane: Lane, entry: Entry) -> bool:
        """Publish one queued entry and remember its ``mid``; False to stop filling."""
        with self._cv:
            if not self._connected:
                self._dirty = True
                return False
            if entry.seq in lane.in_flight or entry.seq in lane.unacked_deletes:
                lane.cursor = max(lane.cursor, entry.seq)
                return True
        info = self._client.publish(entry.topic, entry.payload, qos=entry.qos)
        with self._cv:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and entry.qos == 0:
                # paho drops QoS 0 while disconnected: send it again after reconnect.
                lane.rewind = True
                self._dirty = True
                return False
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._n.last_error = f"paho refused seq {entry.seq}: {mqtt.error_string(info.rc)}"
                logger.warning("%s; retrying later", self._n.last_error)
                self._retry_at = time.monotonic() + self._retry_delay
                return False
            # With NO_CONN paho keeps a QoS 1 message and sends it on reconnect.
            self._in_flight[info.mid] = (lane, entry.seq)
            lane.in_flight.add(entry.seq)
            lane.cursor = max(lane.cursor, entry.seq)
            self._n.published += 1
        return True

    # --- publishing state ----------------------------------------------------------------

    def _publish_now(self, kind: TopicKind, topic: str, payload: bytes) -> bool:
        with self._cv:
            if not self._connected:
                return False
        info = self._publish(kind, topic, payload)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish_heartbeat(self, payload: bytes | SupportsJson) -> bool:
        """Publish a heartbeat (QoS 0); False when not connected (it is not kept)."""
        return self._publish_now(TopicKind.HEARTBEAT, self.topics.heartbeat, _as_bytes(payload))

    def publish_model(self, payload: bytes | SupportsJson) -> bool:
        """Publish new retained model info now (after a swap); False when not connected.

        Either way ``retained_model()`` is published again on the next connect, so
        keep what it returns in step with this.
        """
        return self._publish_now(TopicKind.MODEL, self.topics.model, _as_bytes(payload))

    def publish_command_result(self, name: str, payload: bytes | SupportsJson) -> bool:
        """Publish the reply to command ``name`` (QoS 1); False when not connected or
        when ``name`` cannot be a topic level (then there is nowhere to reply)."""
        try:
            topic = self.topics.command_result(name)
        except TopicError as exc:
            logger.warning("cannot reply to command %s: %s", show(name), exc)
            return False
        with self._cv:
            if not self._connected:
                return False
        info = self._client.publish(topic, _as_bytes(payload), qos=1, retain=False)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # --- state and health ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self._cv:
            return self._connected

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._in_flight)

    def wait_online(self, timeout: float) -> bool:
        """Wait until the broker acknowledged this connection's retained ``online``
        (so the model info is there too); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._online, timeout)

    def health(self) -> LinkHealth:
        """A snapshot of the link's state and counters since start."""
        with self._cv:
            return self._n.snapshot(connected=self._connected, in_flight=len(self._in_flight))

    # --- stopping ---------------------------------------------------------------------

    def stop_clean(self, timeout: float = 5.0) -> bool:
        """Flush the outbox, publish retained ``stopped``, disconnect; within ``timeout``.

        True when everything was acknowledged and ``stopped`` was delivered. What is
        not flushed stays in the outbox for the next start; if the broker is not
        reachable, its last will (``offline``) stands.
        """
        if self._stop_result is not None:
            return self._stop_result
        deadline = time.monotonic() + timeout
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        publisher_done = True
        for thread in self._threads:
            if thread.name.endswith("publisher"):
                # It wakes at once (notified above); only a hung disk could delay it.
                thread.join(max(2.0, deadline - time.monotonic()))
                publisher_done = not thread.is_alive()
        if not publisher_done:
            logger.error("the MQTT publisher thread did not stop; not flushing the outbox")
        usable = self._started and publisher_done
        flushed = usable and self._flush(deadline)
        # "stopped" gets a moment even when flushing used up the time.
        stopped = usable and self._publish_stopped(max(deadline, time.monotonic() + 1.0))
        with contextlib.suppress(Exception):
            self._client.disconnect()
        if self._started:
            self._client.loop_stop()
        self._inbox.close()
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        left = sum(lane.outbox.depth() for lane in self._lanes)
        logger.info(
            "MQTT link stopped (%s; %d message(s) left in the outbox)",
            "clean" if flushed and stopped else "not everything was delivered",
            left,
        )
        self._stop_result = flushed and stopped
        return self._stop_result

    def _flush(self, deadline: float) -> bool:
        self.notify()
        while True:
            with self._cv:
                deleting = any(lane.unacked_deletes for lane in self._lanes)
                idle = not self._in_flight and not deleting and not self._acks
            if idle and all(lane.outbox.depth() == 0 for lane in self._lanes):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._step(min(remaining, _MAX_WAIT_S))

    def _publish_stopped(self, deadline: float) -> bool:
        with self._cv:
            if not self._connected:
                return False
            self._stopped_acked = False
        info = self._publish(
            TopicKind.STATUS, self.topics.status, DeviceStatus.STOPPED.value.encode()
        )
        with self._cv:
            self._stopped_mid = info.mid
        while True:
            with self._cv:
                if self._stopped_acked:
                    return True
                if not self._connected:
                    return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._step(min(remaining, _MAX_WAIT_S))
