"""What one received MQTT message becomes in the collector's store: a pure function.

:func:`decode` turns a topic and its payload into exactly one record — a stored
identification, a device update, or an :class:`Invalid` that keeps the topic, the
raw payload and the reason. Nothing a broker hands over is dropped silently: a topic
outside the scheme, a payload the schema refuses, a payload whose ``device`` or
``station`` disagree with its topic (a misconfigured or spoofing station) are all
kept apart with the reason, for a person to look at.

The parsing itself is the edge's (``Identification.from_json``, ``Heartbeat.from_json``,
``ModelInfo.from_json``): the collector never re-implements the contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from fieldscope.edge.errors import MessageError
from fieldscope.edge.health import Heartbeat, ModelInfo
from fieldscope.edge.message import Identification
from fieldscope.edge.topics import (
    DeviceStatus,
    ParsedTopic,
    TopicError,
    TopicKind,
    parse,
    show,
    subscription_filters,
)

__all__ = [
    "DeviceHeartbeat",
    "DeviceModel",
    "DeviceStatusChange",
    "Invalid",
    "Record",
    "StoredIdentification",
    "TopicCache",
    "decode",
    "heartbeat_json",
    "model_json",
    "poison_reason",
    "top_k_json",
]

logger = logging.getLogger(__name__)

# Invalid payloads are kept whole up to this size; a larger one is cut (and says so),
# so one hostile publisher cannot fill the collector's disk with a few messages.
MAX_KEPT_PAYLOAD = 256 * 1024


@dataclass(frozen=True)
class StoredIdentification:
    """A valid identification with what the store needs beside the parsed message."""

    message: Identification
    topic: str
    payload: bytes
    payload_sha256: str
    received_at: datetime


@dataclass(frozen=True)
class DeviceStatusChange:
    """A retained ``status`` payload; ``status`` None means the retained message was cleared."""

    station: str
    device: str
    status: DeviceStatus | None
    received_at: datetime


@dataclass(frozen=True)
class DeviceHeartbeat:
    station: str
    device: str
    heartbeat: Heartbeat
    received_at: datetime


@dataclass(frozen=True)
class DeviceModel:
    """A retained ``model`` payload; ``info`` None means the retained message was cleared."""

    station: str
    device: str
    info: ModelInfo | None
    received_at: datetime


@dataclass(frozen=True)
class Invalid:
    """A message the collector could not accept, kept with the reason."""

    topic: str
    kind: str | None
    payload: bytes
    reason: str
    received_at: datetime


Record = StoredIdentification | DeviceStatusChange | DeviceHeartbeat | DeviceModel | Invalid


def _invalid(
    topic: str, kind: TopicKind | None, payload: bytes, reason: str, at: datetime
) -> Invalid:
    if len(payload) > MAX_KEPT_PAYLOAD:
        reason = f"{reason} (payload of {len(payload)} bytes cut to {MAX_KEPT_PAYLOAD})"
        payload = payload[:MAX_KEPT_PAYLOAD]
    return Invalid(topic, None if kind is None else kind.value, payload, reason, at)


class TopicCache:
    """``parse(topic, prefix)`` remembered per topic: a fleet has a few topics per device
    and the collector sees each of them thousands of times. Bounded: when full it is
    emptied, so topics of a hostile publisher cannot grow it without limit."""

    def __init__(self, prefix: str, max_topics: int = 10_000) -> None:
        subscription_filters(prefix)  # validates the prefix once
        self.prefix = prefix
        self._max = max_topics
        self._known: dict[str, ParsedTopic | TopicError] = {}

    def parse(self, topic: str) -> ParsedTopic:
        """The parsed topic; raises TopicError for a topic outside the scheme."""
        found = self._known.get(topic)
        if found is None:
            try:
                found = parse(topic, self.prefix)
            except TopicError as exc:
                found = exc
            if len(self._known) >= self._max:
                self._known.clear()
            self._known[topic] = found
        if isinstance(found, TopicError):
            raise found
        return found


def decode(
    topic: str,
    payload: bytes,
    prefix: str | TopicCache,
    received_at: datetime | None = None,
) -> Record:
    """The record for one received message (never raises for bad input: see the module).

    ``prefix`` is the deployment's topic prefix, or a :class:`TopicCache` for it when
    decoding many messages.
    """
    at = received_at or datetime.now(UTC)
    topics = prefix if isinstance(prefix, TopicCache) else TopicCache(prefix, 1)
    try:
        parsed = topics.parse(topic)
    except TopicError as exc:
        return _invalid(topic, None, payload, f"topic outside the scheme: {exc}", at)
    decoder = _DECODERS.get(parsed.kind)
    if decoder is None:
        # A command or its reply: the collector does not subscribe to them, so one here
        # means a broker or a filter behaves unexpectedly; keep it for a person to see.
        reason = (
            "this collector keeps no images (start it with --images DIR)"
            if parsed.kind is TopicKind.IMAGE
            else "the collector does not store commands"
        )
        return _invalid(topic, parsed.kind, payload, reason, at)
    try:
        return decoder(topic, parsed, payload, at)
    except MessageError as exc:  # PayloadError of the health payloads is one too
        return _invalid(topic, parsed.kind, payload, str(exc), at)
    except Exception as exc:
        # A parser bug or an input no reader bounded (a 400-digit number once raised
        # OverflowError here and killed the writer): keep the message apart, say so.
        logger.warning(
            "%s: unexpected %s while decoding; kept apart as invalid",
            show(topic),
            type(exc).__name__,
            exc_info=True,
        )
        return _invalid(topic, parsed.kind, payload, poison_reason("decoding", exc), at)


def poison_reason(where: str, exc: BaseException) -> str:
    """The reason kept with a message that raised an unexpected error while ``where``:
    the exception's type and its message, cut short (a huge number's digits, a deep
    structure's repr must not fill the invalid_messages table)."""
    text = str(exc)
    if len(text) > 300:
        text = text[:300] + "..."
    return f"unexpected {type(exc).__name__} while {where} (a poison input): {text}"


def _identification(topic: str, parsed: ParsedTopic, payload: bytes, at: datetime) -> Record:
    message = Identification.from_json(payload)
    for field, got, want in (
        ("device", message.device, parsed.device),
        ("station", message.station, parsed.station),
    ):
        if got != want:
            reason = (
                f"payload {field} {show(got)} does not match the topic's {field} "
                f"{show(want)} (a misconfigured station, or one publishing for another)"
            )
            return _invalid(topic, parsed.kind, payload, reason, at)
    digest = hashlib.sha256(payload).hexdigest()
    return StoredIdentification(message, topic, bytes(payload), digest, at)


def _status(topic: str, parsed: ParsedTopic, payload: bytes, at: datetime) -> Record:
    if not payload:  # the retained status was cleared (a decommissioned device)
        return DeviceStatusChange(parsed.station, parsed.device, None, at)
    text = payload.decode("utf-8", "replace")
    try:
        status = DeviceStatus(text)
    except ValueError:
        known = ", ".join(s.value for s in DeviceStatus)
        reason = f"status must be one of {known}, got {show(text)}"
        return _invalid(topic, parsed.kind, payload, reason, at)
    return DeviceStatusChange(parsed.station, parsed.device, status, at)


def _heartbeat(_topic: str, parsed: ParsedTopic, payload: bytes, at: datetime) -> Record:
    return DeviceHeartbeat(parsed.station, parsed.device, Heartbeat.from_json(payload), at)


def _model(_topic: str, parsed: ParsedTopic, payload: bytes, at: datetime) -> Record:
    info = ModelInfo.from_json(payload) if payload else None
    return DeviceModel(parsed.station, parsed.device, info, at)


_DECODERS: Mapping[TopicKind, Callable[[str, ParsedTopic, bytes, datetime], Record]] = {
    TopicKind.IDENTIFICATION: _identification,
    TopicKind.STATUS: _status,
    TopicKind.HEARTBEAT: _heartbeat,
    TopicKind.MODEL: _model,
}


def heartbeat_json(heartbeat: Heartbeat) -> str:
    """The heartbeat as stored in the device table (its own wire form, as text)."""
    return heartbeat.to_json().decode("utf-8")


def model_json(info: ModelInfo) -> str:
    return info.to_json().decode("utf-8")


def top_k_json(message: Identification) -> str:
    return json.dumps([c.to_dict() for c in message.top_k], separators=(",", ":"))
