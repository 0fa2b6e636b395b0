"""The MQTT link: drains the durable outbox to the broker and listens for commands.

How a message travels: the classify thread stores it in the :class:`Outbox` (which
wakes the link through :meth:`MqttLink.notify`); the link's publisher thread
publishes the backlog oldest-first with at most ``max_in_flight`` messages
unacknowledged, remembers which paho ``mid`` carries which ``seq``, and deletes an
entry only when its PUBACK arrives. paho's callbacks run on paho's network thread
and only hand events over to the publisher through one condition variable; they
never touch SQLite and never block.

Decisions:

* **MQTT 5 by default** (``protocol="3.1.1"`` for old brokers). The session starts
  clean when the process starts (commands queued for a previous run are stale) and
  then persists across reconnects for ``session_expiry_s``, so a command sent
  during a short outage still arrives while a week-old one does not; 3.1.1 has no
  expiry, so there the session is simply persistent (``clean_session=False``).
  MQTT 5 also lets the broker refuse a message in its PUBACK (e.g. not
  authorised): the entry then stays in the outbox and is retried with backoff.
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
* **paho sends at most 20 messages at once** (mosquitto's default receive
  maximum; paho does not honour a smaller one announced by an MQTT 5 broker), the
  link hands it at most ``max_in_flight``; the rest waits on disk, not in memory.
* **Commands** (``.../command/+``) are handed to ``on_command(name, payload)`` on
  the link's own dispatcher thread, so a slow handler never stalls the network.
  Retained commands are ignored: they would run again on every reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fieldscope.edge.errors import ConfigError, FieldscopeError
from fieldscope.edge.outbox import Outbox, OutboxError
from fieldscope.edge.topics import (
    TOPIC_SPECS,
    DeviceStatus,
    TopicError,
    TopicKind,
    Topics,
    check_segment,
    parse,
    show,
)

__all__ = [
    "PAHO_MAX_INFLIGHT",
    "LinkError",
    "LinkHealth",
    "MqttLink",
    "MqttProtocol",
    "MqttSettings",
    "SupportsJson",
]

logger = logging.getLogger(__name__)

# What paho puts on the wire at once; mosquitto's default receive maximum.
PAHO_MAX_INFLIGHT = 20
# Commands waiting for the dispatcher; more in a burst are dropped (and logged).
_COMMAND_QUEUE = 64
# The longest the publisher sleeps without an event; only bounds how late it sees
# the shared stop event, which cannot wake a condition variable.
_MAX_WAIT_S = 1.0
# Backoff before re-sending messages the broker refused.
_REFUSED_RETRY_MIN_S = 5.0
_REFUSED_RETRY_MAX_S = 300.0


class LinkError(FieldscopeError):
    """The MQTT link cannot be set up (bad TLS files) or was misused."""


class MqttProtocol(StrEnum):
    """The MQTT protocol version spoken to the broker."""

    V5 = "5"
    V311 = "3.1.1"


class SupportsJson(Protocol):
    """A payload dataclass (``Heartbeat``, ``ModelInfo``, ``CommandReply``)."""

    def to_json(self) -> bytes: ...


def _field_error(name: str, problem: str, value: object) -> ConfigError:
    return ConfigError(f"mqtt.{name} {problem}, got {show(value)}")


def _int_in(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _field_error(name, f"must be an integer from {low} to {high}", value)


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker; built once from the configuration's ``[mqtt]`` section.

    TLS is on when ``tls`` is true or any of ``tls_ca``/``tls_cert``/``tls_key`` is
    set (without ``tls_ca`` the system's CAs verify the broker). ``tls_insecure``
    skips the host-name check only (the certificate chain is still verified); use
    it for a broker reached by IP address, never to silence a wrong certificate.

    Raises:
        ConfigError: a value is out of range or inconsistent; the message names it.
    """

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    keepalive: int = 60
    tls: bool = False
    protocol: MqttProtocol = MqttProtocol.V5
    session_expiry_s: int = 3600
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    max_in_flight: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise _field_error("host", "must be a host name or address", self.host)
        _int_in("port", self.port, 1, 65535)
        try:
            check_segment("client_id", self.client_id)
        except TopicError as exc:
            raise ConfigError(f"mqtt.{exc}") from None
        if self.username is not None and (not isinstance(self.username, str) or not self.username):
            raise _field_error("username", "must be a non-empty string when set", self.username)
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt.password is set but mqtt.username is not; set both")
        if self.password is not None and not isinstance(self.password, str):
            raise ConfigError(f"mqtt.password must be a string, got {type(self.password).__name__}")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mqtt.tls_cert and mqtt.tls_key go together: set both or neither")
        for name in ("tls_insecure", "tls"):
            if not isinstance(getattr(self, name), bool):
                raise _field_error(name, "must be true or false", getattr(self, name))
        _int_in("keepalive", self.keepalive, 5, 65535)
        try:
            object.__setattr__(self, "protocol", MqttProtocol(self.protocol))
        except ValueError:
            raise _field_error("protocol", 'must be "5" or "3.1.1"', self.protocol) from None
        _int_in("session_expiry_s", self.session_expiry_s, 0, 2**32 - 1)
        _int_in("reconnect_min_s", self.reconnect_min_s, 1, 3600)
        _int_in("reconnect_max_s", self.reconnect_max_s, self.reconnect_min_s, 3600)
        _int_in("max_in_flight", self.max_in_flight, 1, 10_000)

    @property
    def tls_enabled(self) -> bool:
        return self.tls or any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))


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


def _tls_context(settings: MqttSettings) -> ssl.SSLContext:
    def missing(name: str, path: Path | None) -> None:
        if path is not None and not path.is_file():
            raise LinkError(f"mqtt.{name}: no such file {path}")

    missing("tls_ca", settings.tls_ca)
    missing("tls_cert", settings.tls_cert)
    missing("tls_key", settings.tls_key)
    try:
        context = ssl.create_default_context(
            cafile=None if settings.tls_ca is None else str(settings.tls_ca)
        )
    except (ssl.SSLError, OSError) as exc:
        raise LinkError(f"mqtt.tls_ca {settings.tls_ca} is not a usable CA file ({exc})") from exc
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
        except (ssl.SSLError, OSError) as exc:
            raise LinkError(
                f"mqtt.tls_cert {settings.tls_cert} / mqtt.tls_key {settings.tls_key} are not "
                f"a usable certificate and key ({exc})"
            ) from exc
    return context


def _now() -> datetime:
    return datetime.now(UTC)


class _PahoLog(logging.LoggerAdapter[logging.Logger]):
    """paho's log on ``fieldscope.edge.link.paho``, minus the ERROR paho 2.2 writes
    after every deliberate disconnect ("Client is not connected"), which would
    otherwise end each clean shutdown in journald with a false alarm."""

    def __init__(self, closing: Callable[[], bool]) -> None:
        super().__init__(logging.getLogger(f"{__name__}.paho"), {})
        self._closing = closing

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self._closing() and str(msg).startswith("Client is not connected"):
            return
        super().log(level, msg, *args, **kwargs)


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
        settings: MqttSettings,
        topics: Topics,
        outbox: Outbox,
        *,
        on_command: Callable[[str, bytes], None],
        retained_model: Callable[[], bytes | None],
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.outbox = outbox
        self._on_command = on_command
        self._retained_model = retained_model
        self._stop = stop
        self._cv = threading.Condition()
        # State below is guarded by self._cv.
        self._connected = False
        self._announce = False
        self._dirty = True
        self._closing = False
        self._acks: list[tuple[int, ReasonCode | None]] = []
        self._in_flight: dict[int, int] = {}  # paho mid -> outbox seq
        self._in_flight_seqs: set[int] = set()
        self._cursor = 0  # highest seq handed to paho since the last rewind
        self._rewind = False  # re-scan the backlog from the start on the next fill
        self._retry_at: float | None = None
        self._retry_delay = _REFUSED_RETRY_MIN_S
        self._unacked_deletes: set[int] = set()
        self._online_mid: int | None = None
        self._online = False
        self._stopped_mid: int | None = None
        self._stopped_acked = False
        self._last_connected_at: datetime | None = None
        self._last_disconnected_at: datetime | None = None
        self._disconnects = 0
        self._connect_failures = 0
        self._published = 0
        self._acknowledged = 0
        self._refused = 0
        self._last_error: str | None = None
        self._commands: queue.Queue[tuple[str, bytes] | None] = queue.Queue(_COMMAND_QUEUE)
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stop_result: bool | None = None
        self._client = self._make_client()
        outbox.add_listener(self.notify)

    # --- set-up ---------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol is MqttProtocol.V5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
        )
        client.enable_logger(cast(logging.Logger, _PahoLog(lambda: self._closing)))
        client.suppress_exceptions = True  # a bug in a callback must not kill the network
        client.will_set(*self.topics.last_will())
        client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_max_s)
        client.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls_enabled:
            client.tls_set_context(_tls_context(s))
            if s.tls_insecure:
                logger.warning("mqtt.tls_insecure: the broker's host name is not verified")
                client.tls_insecure_set(True)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        return client

    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start the threads.

        Returns at once: a broker that is down at boot is simply retried, and the
        outbox keeps everything meanwhile.
        """
        if self._started:
            raise LinkError("MqttLink.start() was called twice")
        self._started = True
        s = self.settings
        properties = None
        kwargs: dict[str, Any] = {}
        if s.protocol is MqttProtocol.V5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
            kwargs["clean_start"] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        self._client.connect_async(s.host, s.port, s.keepalive, properties=properties, **kwargs)
        self._client.loop_start()
        logger.info(
            "connecting to mqtt%s://%s:%d as %s (MQTT %s)",
            "s" if s.tls_enabled else "",
            s.host,
            s.port,
            s.client_id,
            s.protocol.value,
        )
        for name, target in (("publisher", self.run), ("commands", self._dispatch_commands)):
            thread = threading.Thread(target=target, name=f"fieldscope-mqtt-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # --- paho callbacks: network thread; record and hand over, never block -----------------

    def _handle_connect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            text = f"the broker refused the connection: {reason}"
            with self._cv:
                new = text != self._last_error
                self._last_error = text
                self._connect_failures += 1
            if new:
                logger.error("%s (check mqtt.username/password and the broker's ACL)", text)
            return
        with self._cv:
            self._connected = True
            self._announce = True
            self._dirty = True
            self._rewind = True  # re-scan the backlog for anything not in flight
            self._retry_at = None
            self._retry_delay = _REFUSED_RETRY_MIN_S
            self._last_connected_at = _now()
            self._last_error = None
            self._cv.notify_all()
        logger.info(
            "connected to %s:%d (session present: %s)",
            self.settings.host,
            self.settings.port,
            flags.session_present,
        )

    def _handle_connect_fail(self, _client: mqtt.Client, _userdata: object) -> None:
        text = f"cannot reach the broker at {self.settings.host}:{self.settings.port}"
        with self._cv:
            self._connect_failures += 1
            first = self._last_error != text
            self._last_error = text
        if first:
            logger.warning("%s; retrying with backoff", text)

    def _handle_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._cv:
            was_connected = self._connected
            self._connected = False
            self._online = False
            if was_connected:
                self._disconnects += 1
                self._last_disconnected_at = _now()
                if self._closing:
                    was_connected = False  # our own disconnect: not worth a warning
                else:
                    self._last_error = f"disconnected from the broker: {reason}"
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

    def _handle_message(
        self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        try:
            parsed = parse(message.topic, self.topics.prefix)
        except TopicError as exc:
            logger.warning("ignoring a message outside the topic scheme: %s", exc)
            return
        if (
            parsed.kind is not TopicKind.COMMAND
            or parsed.command is None
            or (parsed.station, parsed.device) != (self.topics.station, self.topics.device)
        ):
            logger.warning("ignoring an unexpected message on %s", show(message.topic))
            return
        if message.retain:
            logger.warning(
                "ignoring retained command %s: a retained command would run again on every "
                "reconnect; clear it by publishing an empty retained message to that topic",
                show(message.topic),
            )
            return
        try:
            self._commands.put_nowait((parsed.command, bytes(message.payload)))
        except queue.Full:
            logger.warning(
                "dropping command %s: %d commands already waiting", parsed.command, _COMMAND_QUEUE
            )

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
            self._rewind = True
            self._dirty = True
            self._cv.notify_all()

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
                self._rewind = True
                self._dirty = True
        self._delete(done)
        if announce:
            self._announce_state()
        self._fill()

    def _resolve_acks(self, acks: list[tuple[int, ReasonCode | None]]) -> list[int]:
        """Map PUBACKs to outbox seqs; a refusal schedules a retry. Needs self._cv."""
        done: list[int] = []
        for mid, reason in acks:
            if mid == self._online_mid:
                self._online = True
                self._cv.notify_all()
            if mid == self._stopped_mid:
                self._stopped_acked = True
                self._cv.notify_all()
            seq = self._in_flight.pop(mid, None)
            if seq is None:
                continue
            self._in_flight_seqs.discard(seq)
            if reason is not None and reason.is_failure:
                self._refused += 1
                self._last_error = f"the broker refused message seq {seq}: {reason}"
                logger.warning("%s; it stays in the outbox and is retried", self._last_error)
                if self._retry_at is None:
                    self._retry_at = time.monotonic() + self._retry_delay
                    self._retry_delay = min(2 * self._retry_delay, _REFUSED_RETRY_MAX_S)
                continue
            self._acknowledged += 1
            done.append(seq)
        return done

    def _delete(self, seqs: list[int]) -> None:
        """Delete acknowledged entries; keep them for the next try if the disk refuses."""
        with self._cv:
            batch = self._unacked_deletes | set(seqs)
        if not batch:
            return
        try:
            self.outbox.ack_many(batch)
        except OutboxError as exc:
            with self._cv:
                self._unacked_deletes = batch
                self._last_error = str(exc)
            logger.warning("cannot delete acknowledged messages (they will be resent): %s", exc)
            return
        with self._cv:
            self._unacked_deletes -= batch
        if self._unacked_deletes:
            logger.debug("%d deletions still pending", len(self._unacked_deletes))

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
        """Hand outbox entries to paho, oldest first, up to ``max_in_flight``."""
        while True:
            with self._cv:
                room = self.settings.max_in_flight - len(self._in_flight)
                if not self._connected or room <= 0 or not self._dirty:
                    return
                self._dirty = False
                if self._rewind:
                    self._rewind = False
                    self._cursor = 0
                after = self._cursor
            try:
                entries = self.outbox.pending(room, after=after)
            except OutboxError as exc:
                with self._cv:
                    self._last_error = str(exc)
                    self._retry_at = time.monotonic() + self._retry_delay
                logger.error("cannot read the outbox: %s", exc)
                return
            for entry in entries:
                with self._cv:
                    if not self._connected:
                        self._dirty = True
                        return
                    if entry.seq in self._in_flight_seqs or entry.seq in self._unacked_deletes:
                        self._cursor = max(self._cursor, entry.seq)
                        continue
                info = self._client.publish(entry.topic, entry.payload, qos=entry.qos)
                with self._cv:
                    if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and entry.qos == 0:
                        # paho drops QoS 0 while disconnected: send it again after reconnect.
                        self._rewind = True
                        self._dirty = True
                        return
                    if info.rc not in (
                        MQTTErrorCode.MQTT_ERR_SUCCESS,
                        MQTTErrorCode.MQTT_ERR_NO_CONN,
                    ):
                        self._last_error = (
                            f"paho refused seq {entry.seq}: {mqtt.error_string(info.rc)}"
                        )
                        logger.warning("%s; retrying later", self._last_error)
                        self._retry_at = time.monotonic() + self._retry_delay
                        return
                    # With NO_CONN paho keeps a QoS 1 message and sends it on reconnect.
                    self._in_flight[info.mid] = entry.seq
                    self._in_flight_seqs.add(entry.seq)
                    self._cursor = max(self._cursor, entry.seq)
                    self._published += 1
            if len(entries) == room:
                with self._cv:
                    self._dirty = True  # a full batch: there may be more behind it

    # --- the command dispatcher thread ------------------------------------------------------

    def _dispatch_commands(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._commands.get(timeout=_MAX_WAIT_S)
            except queue.Empty:
                continue
            if item is None:
                return
            name, payload = item
            try:
                self._on_command(name, payload)
            except Exception:
                logger.exception("the command handler failed on %s", show(name))

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
        with self._cv:
            return LinkHealth(
                connected=self._connected,
                last_connected_at=self._last_connected_at,
                last_disconnected_at=self._last_disconnected_at,
                disconnects=self._disconnects,
                connect_failures=self._connect_failures,
                in_flight=len(self._in_flight),
                published=self._published,
                acknowledged=self._acknowledged,
                refused=self._refused,
                last_error=self._last_error,
            )

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
        with contextlib.suppress(queue.Full):
            self._commands.put_nowait(None)
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        left = self.outbox.depth()
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
                idle = not self._in_flight and not self._unacked_deletes and not self._acks
            if idle and self.outbox.depth() == 0:
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
