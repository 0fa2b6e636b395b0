"""The collector: subscribe to the fleet, store every message once, acknowledge after commit.

How a message travels: paho's network thread hands each PUBLISH to :meth:`Collector._on_message`,
which only puts it on a bounded queue. One writer thread takes whatever has queued
up (a batch: at least one message, at most ``batch_max``), decodes every message
(:func:`fieldscope.collect.records.decode`), stores the batch in one transaction
and only then sends the PUBACKs (paho ``manual_ack``). A collector killed at any
moment has acknowledged only what it committed, and the broker redelivers the rest
— to the same persistent session after a restart (stable client id, clean start
off, a session expiry), so nothing published while it was down is lost either.
Redeliveries are harmless: the store drops a repeated ``(device, seq)``.

Batching needs no timer: under load the queue fills while a batch is written, so
batches grow by themselves; when messages trickle in, each is written at once.

Subscriptions (``fieldscope.edge.topics.subscription_filters``): identifications,
status, heartbeat and model of every device, and images when the collector keeps them
(an :class:`~fieldscope.collect.images.ImageStore`: written and checked before the
batch's PUBACKs, like the rows). With ``share_group`` the
identifications are taken through ``$share/{group}/...`` so several collectors
split them (one database, de-duplicated by the store); status and model are always
subscribed plainly, because brokers do not send retained messages to shared
subscriptions, and heartbeats too (a device update is idempotent).

Acknowledgements are tied to the connection that delivered a message: after a
reconnect the broker redelivers whatever was not acknowledged, with the same
packet ids, so a stale ack for a message of the old connection is never sent
(it could acknowledge a different message that reuses the id).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fieldscope.collect.images import ImageStore, receive_window, take_images
from fieldscope.collect.records import (
    MAX_KEPT_PAYLOAD,
    DeviceHeartbeat,
    DeviceModel,
    DeviceStatusChange,
    Invalid,
    Record,
    StoredIdentification,
    TopicCache,
    decode,
    poison_reason,
)
from fieldscope.collect.store import MAX_GAP, Store, StoreDataError, StoreError, WriteResult
from fieldscope.edge.broker import (
    BrokerSettings,
    Problems,
    describe,
    field_problems,
    make_client,
    route_connection,
)
from fieldscope.edge.errors import ConfigError, FieldscopeError
from fieldscope.edge.topics import (
    TopicError,
    TopicKind,
    shared,
    subscription_filters,
)

__all__ = [
    "BrokerSettings",
    "Collector",
    "CollectorSettings",
    "CollectorStats",
    "default_client_id",
]

logger = logging.getLogger(__name__)

_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 30.0
_PROGRESS_EVERY_S = 10.0
_RECEIVE_MAXIMUM = 5000
_QUEUE_WAIT_S = 0.5


def default_client_id() -> str:
    """A stable id per host, so a restarted collector takes over its own session."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"fieldscope-collect-{host or 'host'}"[:64]


class CollectorSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The collector's own settings; how it reaches the broker is ``broker``.

    ``broker.client_id`` must be stable across restarts (the broker keeps the session
    under it) and different for each collector running at the same time;
    ``broker.session_expiry_s`` is how long the broker keeps messages for a stopped
    collector (MQTT 5; with 3.1.1 the session never expires). ``batch_max`` bounds a
    write transaction, ``queue_max`` the messages waiting for the writer.
    """

    broker: BrokerSettings
    share_group: str | None = None
    batch_max: Annotated[int, msgspec.Meta(ge=1)] = 5000
    queue_max: Annotated[int, msgspec.Meta(ge=1)] = 100_000

    def problems(self) -> Problems:
        """Every problem at once, ``broker.*`` keys for the broker's."""
        out = field_problems(self)
        if self.share_group is not None:
            try:
                shared(self.share_group, "x")
            except TopicError as exc:
                out.append(("share_group", str(exc)))
        out.extend((f"broker.{key}", message) for key, message in self.broker.all_problems())
        return out

    def check(self) -> None:
        """Raise one :class:`ConfigError` listing every problem."""
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(f"{key}: {message}" for key, message in problems))


@dataclass
class CollectorStats:
    """Counters since start (read them under no lock: a snapshot for logs and tests)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    invalid: int = 0
    conflicts: int = 0
    device_updates: int = 0
    batches: int = 0
    write_errors: int = 0
    connects: int = 0
    poisoned: int = 0
    writer_restarts: int = 0
    gaps: int = 0
    missing: int = 0

    def line(self) -> str:
        return (
            f"received {self.received}, stored {self.stored}, duplicates {self.duplicates}, "
            f"invalid {self.invalid} (conflicting seq {self.conflicts}, unexpected errors "
            f"{self.poisoned}), device updates {self.device_updates}, batches {self.batches}, "
            f"seq gaps {self.gaps} ({self.missing} missing)"
        )


_KINDS: Mapping[type, str] = {
    StoredIdentification: "identification",
    DeviceHeartbeat: "heartbeat",
    DeviceModel: "model",
    DeviceStatusChange: "status",
}


@dataclass(frozen=True)
class _Received:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int
    received_at: datetime


class Collector:
    """Subscribe, store in batches, acknowledge after commit. ``start()`` then ``stop()``.

    The store is used only by the writer thread (a store is not thread-safe).
    """

    def __init__(
        self, settings: CollectorSettings, store: Store, images: ImageStore | None = None
    ) -> None:
        """Check the settings and make the (not yet connected) client.

        Raises:
            ConfigError: a setting is invalid, or a TLS or password file is unusable.
        """
        settings.check()
        self.settings = settings
        self.store = store
        self.images = images
        self.stats = CollectorStats()
        self._queue: queue.Queue[_Received | None] = queue.Queue(settings.queue_max)
        self._lock = threading.Lock()
        self._generation = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._started = False
        self._pending_sub: int | None = None
        self._topics = TopicCache(settings.broker.prefix)
        # Per device, the highest seq stored so far (writer thread only): a new one more
        # than one above it reveals a gap (see _check_gaps).
        self._high: dict[str, int] = {}
        self._client = self._make_client()

    # --- set-up ---------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        # Every connection resumes the session, so nothing sent while it was away is lost;
        # the broker may send up to receive_window() unacknowledged messages (acked after
        # commit).
        client = make_client(
            self.settings.broker,
            receive_maximum=receive_window(self.images, _RECEIVE_MAXIMUM),
            manual_ack=True,
            where="broker",
        )
        route_connection(
            client,
            self.settings.broker,
            connected=self._on_connect,
            failed=self._on_connect_failed,
            disconnected=self._on_disconnect,
        )
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def subscriptions(self) -> list[tuple[str, int]]:
        """The filters (with QoS) this collector subscribes to."""
        s = self.settings
        plain = [TopicKind.STATUS, TopicKind.MODEL, TopicKind.HEARTBEAT]
        subs = list(subscription_filters(s.broker.prefix, kinds=plain))
        shareable = [TopicKind.IDENTIFICATION] + ([TopicKind.IMAGE] if self.images else [])
        subs += subscription_filters(s.broker.prefix, kinds=shareable, share_group=s.share_group)
        return [(sub.filter, sub.qos) for sub in subs]

    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start the writer."""
        if self._started:
            raise FieldscopeError("Collector.start() was called twice")
        self._started = True
        s = self.settings
        self._start_writer()
        self._client.loop_start()
        logger.info(
            "collecting from %s (prefix %r%s) into %s",
            describe(s.broker),
            s.broker.prefix,
            f", shared group {s.share_group}" if s.share_group else "",
            self.store.url,
        )

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="collect-writer", daemon=True)
        self._writer.start()

    def _revive_writer(self) -> None:
        """The supervisor: a writer that died anyway (a bug the per-message guards did
        not catch) is started again, so the collector never sits connected and storing
        nothing. Called from the network thread for each message."""
        writer = self._writer
        if writer is None or writer.is_alive() or self._stopping.is_set():
            return
        self.stats.writer_restarts += 1
        logger.error(
            "the writer thread had died; starting it again (restart %d)",
            self.stats.writer_restarts,
        )
        self._start_writer()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker has granted the subscriptions (tests, benchmarks)."""
        return self._subscribed.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what has arrived, then disconnect (the session stays)."""
        if not self._started:
            return
        self._stopping.set()
        # Let the writer catch up while still connected, so its PUBACKs reach the broker.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (self._queue.empty() and self._idle.is_set()):
            self._idle.wait(0.05)
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
        # Whatever arrived meanwhile is stored too; the broker redelivers it (unacknowledged)
        # to the next run, where the store recognises it as a duplicate.
        self._put(None)
        if self._writer is not None:
            self._writer.join(max(1.0, deadline - time.monotonic()))
            if self._writer.is_alive():
                logger.error("the writer did not finish within %.0f s", timeout)
        logger.info("collector stopped: %s", self.stats.line())

    # --- paho callbacks: network thread; hand over, never block for long -----------------

    def _on_connect(self) -> None:
        with self._lock:
            self._generation += 1
        self.stats.connects += 1
        self._connected.set()
        # Subscribing on every connect is harmless with a persistent session and needed on
        # the first; the broker answers with the retained status and model of each device.
        _, mid = self._client.subscribe(self.subscriptions())
        self._pending_sub = mid

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            logger.error("the broker refused subscriptions: %s", ", ".join(refused))
            return
        if mid == self._pending_sub:
            self._subscribed.set()

    def _on_connect_failed(self, text: str, refused: bool) -> None:
        if refused:
            logger.error("%s (check the user name, the password and the broker's ACL)", text)
        else:
            logger.warning("%s; retrying", text)

    def _on_disconnect(self, reason: ReasonCode) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._stopping.is_set():
            logger.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            generation = self._generation
        item = _Received(
            msg.topic, bytes(msg.payload), msg.qos, msg.mid, generation, datetime.now(UTC)
        )
        self.stats.received += 1
        self._revive_writer()
        self._put(item)

    def _put(self, item: _Received | None) -> None:
        # A full queue means the writer is behind: waiting here stops reading from the
        # socket, and the broker holds further messages (back-pressure, never a drop).
        while True:
            try:
                self._queue.put(item, timeout=_QUEUE_WAIT_S)
                return
            except queue.Full:
                if item is not None and self._writer is not None and not self._writer.is_alive():
                    logger.error("the writer has died; message left to the broker")
                    return

    # --- the writer ------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[_Received], bool]:
        """Block for the first message, then take what is already queued."""
        batch: list[_Received] = []
        first = self._queue.get()
        if first is None:
            return batch, True
        self._idle.clear()
        batch.append(first)
        while len(batch) < self.settings.batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _write_loop(self) -> None:
        last_progress = time.monotonic()
        reported = 0
        done = False
        while not done:
            if self._queue.empty():
                self._idle.set()
            batch, done = self._take_batch()
            if batch:
                try:
                    self._store_and_ack(batch)
                except Exception:
                    # Never expected (each message and each write is guarded): the batch
                    # stays unacknowledged, the broker redelivers it after a reconnect,
                    # and the writer goes on with the next one instead of dying.
                    self.stats.poisoned += len(batch)
                    logger.exception(
                        "cannot handle a batch of %d message(s); left unacknowledged",
                        len(batch),
                    )
            now = time.monotonic()
            if now - last_progress >= _PROGRESS_EVERY_S and self.stats.received != reported:
                logger.info("%s; queue %d", self.stats.line(), self._queue.qsize())
                last_progress = now
                reported = self.stats.received
        self._idle.set()

    def _decode(self, m: _Received) -> Record:
        """The record of one message; an unexpected error keeps it apart as invalid."""
        try:
            return decode(m.topic, m.payload, self._topics, m.received_at)
        except Exception as exc:
            logger.warning("unexpected error decoding a message on %s", m.topic, exc_info=True)
            reason = poison_reason("decoding", exc)
            return Invalid(m.topic, None, m.payload[:MAX_KEPT_PAYLOAD], reason, m.received_at)

    def _write(self, batch: list[_Received], records: list[Record]) -> WriteResult:
        """Write the batch in one transaction; when a value of it cannot be stored,
        write its records one by one and keep the one that fails apart as invalid, so
        one poison message never blocks the others (nor the collector) for good.

        Raises:
            StoreError: the database itself failed (the caller retries the batch).
        """
        try:
            return self.store.write(records)
        except StoreDataError as exc:
            logger.warning("%s; storing the batch message by message", exc)
        except StoreError:
            raise
        except Exception:
            logger.warning(
                "unexpected error storing a batch; storing it message by message", exc_info=True
            )
        totals = [0, 0, 0, 0, 0]
        for m, record in zip(batch, records, strict=True):
            try:
                result = self.store.write([record])
            except StoreDataError as exc:
                result = self._quarantine(m, record, exc)
            except StoreError:
                raise
            except Exception as exc:
                result = self._quarantine(m, record, exc)
            for i, n in enumerate(
                (
                    result.stored,
                    result.duplicates,
                    result.invalid,
                    result.conflicts,
                    result.device_updates,
                )
            ):
                totals[i] += n
        return WriteResult(*totals)

    def _quarantine(self, m: _Received, record: Record, exc: Exception) -> WriteResult:
        """Keep one message that cannot be stored apart, with the reason."""
        self.stats.poisoned += 1
        reason = poison_reason("storing", exc)
        logger.error("message on %s kept apart: %s", m.topic, reason)
        kind = _KINDS.get(type(record)) if not isinstance(record, Invalid) else record.kind
        kept = Invalid(m.topic, kind, m.payload[:MAX_KEPT_PAYLOAD], reason, m.received_at)
        try:
            return self.store.write([kept])
        except StoreDataError as exc2:
            # Not even the raw bytes and the reason could be written: say so and let the
            # message go (acknowledged), rather than block every message behind it.
            logger.error("cannot keep the message on %s apart either (%s); dropped", m.topic, exc2)
            return WriteResult()

    def _check_gaps(self, records: list[Record], before: dict[str, int | None]) -> None:
        """Log each gap in a device's ``seq`` that this batch reveals (issue 15: a broker
        that lost its queue lost identifications and nothing noticed). ``before`` holds
        each device's highest stored seq from before the batch. The store's
        :meth:`~fieldscope.collect.store.Store.gaps` is the full, current account; this
        is the log line at the moment a gap appears. With a shared subscription each
        collector sees only part of every device's messages, so nothing is logged here."""
        if self.settings.share_group is not None:
            return
        seqs: dict[str, list[int]] = {}
        stations: dict[str, str] = {}
        for r in records:
            if isinstance(r, StoredIdentification):
                seqs.setdefault(r.message.device, []).append(r.message.seq)
                stations[r.message.device] = r.message.station
        for device, got in seqs.items():
            high = self._high.get(device, before.get(device))
            for seq in sorted(set(got)):
                if high is not None and seq > high + 1 + MAX_GAP:
                    logger.info(
                        "device %s jumped from seq %d to %d: a new outbox on the station "
                        "(reset or replaced), not counted as a gap",
                        device,
                        high,
                        seq,
                    )
                elif high is not None and seq > high + 1:
                    missing = seq - high - 1
                    self.stats.gaps += 1
                    self.stats.missing += missing
                    logger.warning(
                        "seq gap: device %s (station %s) skipped seq %d..%d (%d identification%s "
                        "missing); lost between the station and this collector, or still to "
                        "come from the station's outbox",
                        device,
                        stations[device],
                        high + 1,
                        seq - 1,
                        missing,
                        "" if missing == 1 else "s",
                    )
                high = seq if high is None else max(high, seq)
            if high is not None:
                self._high[device] = high

    def _highs_before(self, records: list[Record]) -> dict[str, int | None]:
        """The highest stored seq of each device of the batch not yet known (one indexed
        query per device, once per run)."""
        before: dict[str, int | None] = {}
        if self.settings.share_group is not None:
            return before
        for r in records:
            if isinstance(r, StoredIdentification):
                device = r.message.device
                if device not in self._high and device not in before:
                    try:
                        before[device] = self.store.max_seq(device)
                    except StoreError as exc:
                        logger.debug("cannot read the highest seq of %s: %s", device, exc)
                        before[device] = None
        return before

    def _store_and_ack(self, everything: list[_Received]) -> None:
        # The batch's images are kept first (unkept: their write failed while stopping).
        batch, unkept = take_images(
            self.images, everything, self.settings.broker.prefix, self._stopping
        )
        records = [self._decode(m) for m in batch]
        before = self._highs_before(records)
        delay = _RETRY_MIN_S
        while True:
            try:
                result = self._write(batch, records)
                break
            except StoreError as exc:
                self.stats.write_errors += 1
                if self._stopping.is_set() and not self._connected.is_set():
                    logger.error(
                        "%s; %d message(s) not stored and not acknowledged: the broker "
                        "redelivers them to the next run",
                        exc,
                        len(batch),
                    )
                    return
                logger.error("%s; retrying in %.1f s", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        st = self.stats
        st.stored += result.stored
        st.duplicates += result.duplicates
        st.invalid += result.invalid
        st.conflicts += result.conflicts
        st.device_updates += result.device_updates
        st.batches += 1
        try:
            self._check_gaps(records, before)
        except Exception:
            logger.exception("cannot check the batch for seq gaps")
        if result.invalid:
            logger.warning(
                "%d message(s) kept apart as invalid (see invalid_messages)", result.invalid
            )
        with self._lock:
            generation = self._generation
        for m in everything:
            if m.qos > 0 and m.generation == generation and m.mid not in unkept:
                self._client.ack(m.mid, m.qos)

    # --- for tests and the CLI ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def info(self) -> dict[str, Any]:
        """A snapshot for logs."""
        return {"connected": self.connected, "queue": self._queue.qsize(), **vars(self.stats)}
