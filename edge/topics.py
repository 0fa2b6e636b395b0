"""Contract 4 — the MQTT topic scheme, built in this one module and nowhere else.

Every topic a station publishes or listens to hangs under
``{prefix}/{station}/{device}/``, so one prefix per deployment keeps fieldscope
apart from whatever else shares the broker, and a collector can subscribe to a
whole site, one station or one device with ``+`` wildcards. QoS and retain
belong to the *kind* of topic, not to the caller, so they live in
``TOPIC_SPECS`` next to the names and a publisher never chooses them ad hoc.

Segments are checked before any topic is built: a ``/`` in a device name would
silently shift every level, a ``+`` or ``#`` would turn a topic into a filter,
and a leading ``$`` collides with the broker's own ``$SYS`` and ``$share``
namespaces. docs/mqtt.md describes the scheme for third-party subscribers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from fieldscope.edge.errors import ConfigError
from fieldscope.edge.untrusted import show_value

__all__ = [
    "COLLECTED_KINDS",
    "DEFAULT_PREFIX",
    "MAX_PREFIX_BYTES",
    "MAX_SEGMENT_BYTES",
    "TOPIC_SPECS",
    "DeviceStatus",
    "ParsedTopic",
    "Subscription",
    "TopicError",
    "TopicKind",
    "TopicSpec",
    "Topics",
    "Will",
    "check_segment",
    "parse",
    "segment_problem",
    "shared",
    "show",
    "subscription_filters",
]

DEFAULT_PREFIX = "fieldscope"
# MQTT allows 65,535 bytes per topic; these limits keep every topic far below it
# and keep names readable in logs and dashboards.
MAX_SEGMENT_BYTES = 128
MAX_PREFIX_BYTES = 256
_COMMAND_LEVEL = "command"
# Kinds whose topic has one more level: the command's name, the image's SHA-256.
_NAMED_KINDS: Mapping[str, str] = MappingProxyType(
    {_COMMAND_LEVEL: "command name", "image": "image sha256"}
)


class TopicError(ConfigError):
    """A topic segment, prefix, filter or received topic does not fit the scheme.

    A subclass of ConfigError because station, device and prefix come from the
    station's configuration: a bad one is a configuration mistake.
    """


class TopicKind(StrEnum):
    """The last level of a topic (``command`` is followed by the command's name)."""

    IDENTIFICATION = "identification"
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    MODEL = "model"
    COMMAND = "command"
    IMAGE = "image"


class DeviceStatus(StrEnum):
    """Payloads of the retained ``status`` topic (UTF-8, no JSON).

    ``offline`` is only ever sent by the broker, as the last will after an unclean
    disconnect; a daemon that exits cleanly publishes ``stopped`` itself, because
    the broker does not send the will on a clean DISCONNECT.
    """

    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"


@dataclass(frozen=True)
class TopicSpec:
    """How one kind of topic is published: by whom, with which QoS, retained or not."""

    kind: TopicKind
    qos: int
    retain: bool
    inbound: bool
    description: str


TOPIC_SPECS: Mapping[TopicKind, TopicSpec] = MappingProxyType(
    {
        TopicKind.IDENTIFICATION: TopicSpec(
            TopicKind.IDENTIFICATION,
            qos=1,
            retain=False,
            inbound=False,
            description="one identification message (JSON, see identification.schema.json); "
            "at least once, so subscribers drop duplicates by (device, seq)",
        ),
        TopicKind.STATUS: TopicSpec(
            TopicKind.STATUS,
            qos=1,
            retain=True,
            inbound=False,
            description="online | offline | stopped; the last will is offline",
        ),
        TopicKind.HEARTBEAT: TopicSpec(
            TopicKind.HEARTBEAT,
            qos=0,
            retain=False,
            inbound=False,
            description="periodic liveness and health; a lost one is replaced by the next, "
            "so it is not worth an acknowledgement",
        ),
        TopicKind.MODEL: TopicSpec(
            TopicKind.MODEL,
            qos=1,
            retain=True,
            inbound=False,
            description="the bundle the device is serving; retained so a new subscriber "
            "learns it at once",
        ),
        TopicKind.IMAGE: TopicSpec(
            TopicKind.IMAGE,
            qos=1,
            retain=False,
            inbound=False,
            description="an identification's image (JPEG or PNG bytes), named by the last "
            "level: the SHA-256 of the payload, which the identification's "
            "image.upload_sha256 names; at least once, so a repeat is the same file",
        ),
        TopicKind.COMMAND: TopicSpec(
            TopicKind.COMMAND,
            qos=1,
            retain=False,
            inbound=True,
            description="a command to the device, named by the last level; never retained, "
            "or it would run again on every reconnect",
        ),
    }
)

# What a collector subscribes to: everything a device publishes, never the commands, and
# images only when it keeps them (``fieldscope collect run --images DIR`` adds them).
COLLECTED_KINDS: tuple[TopicKind, ...] = tuple(
    k for k, s in TOPIC_SPECS.items() if not s.inbound and k is not TopicKind.IMAGE
)


class Will(NamedTuple):
    """A last will in the order ``paho`` takes it: ``client.will_set(*topics.last_will())``."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class Subscription(NamedTuple):
    """A filter with its QoS; a list of these can be passed to ``client.subscribe``."""

    filter: str
    qos: int


class ParsedTopic(NamedTuple):
    """What a subscriber learns from a received topic name."""

    station: str
    device: str
    kind: TopicKind
    command: str | None  # the command's name, or an image topic's SHA-256


def segment_problem(value: object) -> str | None:
    """Why ``value`` cannot be one topic level, or None when it can.

    Shared with the identification message, whose ``device`` and ``station`` must
    be publishable as topic levels. Control characters are refused as well: MQTT
    forbids NUL and advises against the rest, and they garble every log line.
    """
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    wildcard = next((c for c in "/+#" if c in value), "")
    size = len(value.encode("utf-8", "surrogatepass"))
    rules = (
        (not value, "must not be empty"),
        (bool(wildcard), f"must not contain {wildcard!r}"),
        (any(map(_is_control, value)), "must not contain control characters (NUL, newline, ...)"),
        (value.startswith("$"), "must not start with '$' (reserved for the broker: $SYS, $share)"),
        (any(0xD800 <= ord(c) <= 0xDFFF for c in value), "must not contain lone surrogates"),
        (
            size > MAX_SEGMENT_BYTES,
            f"must be at most {MAX_SEGMENT_BYTES} bytes in UTF-8 (has {size})",
        ),
    )
    return next((problem for failed, problem in rules if failed), None)


def check_segment(what: str, value: object) -> str:
    """Return ``value`` if it is a valid topic level, else raise TopicError naming ``what``."""
    problem = segment_problem(value)
    if problem is not None:
        raise TopicError(f"{what} {problem}, got {show(value)}")
    assert isinstance(value, str)  # segment_problem returns None only for strings
    return value


def show(value: object, limit: int = 80) -> str:
    """``repr(value)``, shortened so one bad value cannot flood a log line; never raises
    (a huge integer is described by its digit count, see ``show_value``)."""
    return show_value(value, limit)


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TopicError(f"prefix must be a string, got {type(prefix).__name__}")
    if not prefix:
        raise TopicError(f"prefix must not be empty (e.g. {DEFAULT_PREFIX!r})")
    levels = prefix.split("/")
    if "" in levels:
        raise TopicError(
            f"prefix must not start or end with '/' nor contain '//', got {show(prefix)}"
        )
    for i, level in enumerate(levels, start=1):
        problem = segment_problem(level)
        if problem is not None:
            where = "prefix" if len(levels) == 1 else f"prefix level {i} ({show(level)})"
            raise TopicError(f"{where} {problem}, got {show(prefix)}")
    size = len(prefix.encode("utf-8"))
    if size > MAX_PREFIX_BYTES:
        raise TopicError(f"prefix must be at most {MAX_PREFIX_BYTES} bytes in UTF-8 (has {size})")
    return prefix


def _check_level_or_wildcard(what: str, value: object) -> str:
    if value == "+":
        return "+"
    return check_segment(what, value)


@dataclass(frozen=True)
class Topics:
    """All topics of one device, from the deployment's prefix and the device's names.

    ``Topics("fieldscope", "pond-3", "scope-a").identification`` is
    ``"fieldscope/pond-3/scope-a/identification"``. The prefix may have several
    levels (``"lab/fieldscope"``); station and device are one level each.
    """

    prefix: str
    station: str
    device: str

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)
        check_segment("station", self.station)
        check_segment("device", self.device)

    @property
    def base(self) -> str:
        """The level every topic of this device starts with."""
        return f"{self.prefix}/{self.station}/{self.device}"

    @property
    def identification(self) -> str:
        return self.topic(TopicKind.IDENTIFICATION)

    @property
    def status(self) -> str:
        return self.topic(TopicKind.STATUS)

    @property
    def heartbeat(self) -> str:
        return self.topic(TopicKind.HEARTBEAT)

    @property
    def model(self) -> str:
        return self.topic(TopicKind.MODEL)

    def image(self, sha256: str) -> str:
        """The topic an image is published on, named by the SHA-256 (64 lower-case hex
        digits) of its payload."""
        return self.topic(TopicKind.IMAGE, sha256)

    def command(self, name: str) -> str:
        """The topic a command called ``name`` arrives on."""
        return self.topic(TopicKind.COMMAND, name)

    def command_result(self, name: str) -> str:
        """Where the device replies to the command ``name`` (``.../command/{name}/result``).

        One level below the command, so the device's ``command/+`` filter never
        receives its own replies. Published with QoS 1, not retained.
        """
        return f"{self.command(name)}/result"

    @property
    def command_filter(self) -> str:
        """What the device subscribes to in order to receive every command."""
        return f"{self.base}/{_COMMAND_LEVEL}/+"

    def topic(self, kind: TopicKind | str, command: str | None = None) -> str:
        """The topic of ``kind``; ``command`` names the command (or the image's SHA-256)
        and is required for those two kinds only."""
        kind = _kind(kind)
        what = _NAMED_KINDS.get(kind.value)
        if what is not None:
            if command is None:
                needs = "the command's name" if kind is TopicKind.COMMAND else "the image's sha256"
                raise TopicError(f"a {kind.value} topic needs {needs}")
            return f"{self.base}/{kind.value}/{_check_named(what, command)}"
        if command is not None:
            raise TopicError(
                "only command topics take a command name (and image topics a sha256), "
                f"not {kind.value!r}"
            )
        return f"{self.base}/{kind.value}"

    def spec(self, kind: TopicKind | str) -> TopicSpec:
        """QoS and retain for ``kind`` (the same for every device; here for convenience)."""
        return TOPIC_SPECS[_kind(kind)]

    def last_will(self) -> Will:
        """The will to register before connecting: retained ``offline`` on ``status``."""
        spec = TOPIC_SPECS[TopicKind.STATUS]
        return Will(self.status, DeviceStatus.OFFLINE.value.encode(), spec.qos, spec.retain)


def _check_named(what: str, value: object) -> str:
    """A command's name, or an image's SHA-256 (which must be one: 64 lower-case hex)."""
    name = check_segment(what, value)
    if what == "image sha256" and not _is_sha256(name):
        raise TopicError(f"{what} must be 64 lower-case hex digits, got {show(name)}")
    return name


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _kind(kind: TopicKind | str) -> TopicKind:
    try:
        return TopicKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in TopicKind)
        raise TopicError(f"unknown topic kind {show(kind)} (known: {known})") from None


def parse(topic: str, prefix: str) -> ParsedTopic:
    """Split a received topic name into station, device, kind and command name.

    For subscribers such as the collector, which know the prefix but learn station
    and device from each message. Raises TopicError for a topic outside the scheme,
    so a collector can log and skip it instead of storing it under a wrong device.
    """
    _check_prefix(prefix)
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    expected = (
        f"{prefix}/STATION/DEVICE/KIND, {prefix}/STATION/DEVICE/command/NAME "
        f"or {prefix}/STATION/DEVICE/image/SHA256"
    )
    if not topic.startswith(prefix + "/"):
        raise TopicError(f"topic {show(topic)} is not under the prefix {show(prefix)}")
    levels = topic[len(prefix) + 1 :].split("/")
    if len(levels) == 4 and levels[2] in _NAMED_KINDS:
        station, device, last, name = levels
        command: str | None = name
        kind = TopicKind(last)
    elif len(levels) == 3 and levels[2] not in _NAMED_KINDS:
        station, device, last = levels
        command = None
        try:
            kind = TopicKind(last)
        except ValueError:
            raise TopicError(
                f"topic {show(topic)} ends in unknown kind {show(last)}, expected {expected}"
            ) from None
    else:
        raise TopicError(f"topic {show(topic)} does not fit the scheme {expected}")
    try:
        check_segment("station", station)
        check_segment("device", device)
        if command is not None:
            _check_named(_NAMED_KINDS[kind.value], command)
    except TopicError as exc:
        raise TopicError(f"topic {show(topic)}: {exc}") from None
    return ParsedTopic(station, device, kind, command)


def subscription_filters(
    prefix: str,
    station: str = "+",
    device: str = "+",
    *,
    kinds: Iterable[TopicKind | str] = COLLECTED_KINDS,
    share_group: str | None = None,
) -> tuple[Subscription, ...]:
    """Filters (with their QoS) a collector subscribes to, one per kind.

    ``station`` and ``device`` are a name or ``+`` (any). With ``share_group`` each
    filter takes the ``$share/{group}/`` form, so that several collectors split the
    messages between them. Brokers do not send retained messages to shared
    subscriptions, so take only ``identification`` (and ``heartbeat``) shared and
    subscribe to ``status`` and ``model`` plainly.
    """
    _check_prefix(prefix)
    _check_level_or_wildcard("station", station)
    _check_level_or_wildcard("device", device)
    subs: list[Subscription] = []
    for kind in dict.fromkeys(_kind(k) for k in kinds):
        last = f"{kind.value}/+" if kind.value in _NAMED_KINDS else kind.value
        flt = f"{prefix}/{station}/{device}/{last}"
        if share_group is not None:
            flt = shared(share_group, flt)
        subs.append(Subscription(flt, TOPIC_SPECS[kind].qos))
    return tuple(subs)


def shared(group: str, topic_filter: str) -> str:
    """The MQTT 5 shared-subscription form ``$share/{group}/{filter}`` of a filter."""
    check_segment("share group", group)
    if not isinstance(topic_filter, str) or not topic_filter or topic_filter.startswith("$"):
        raise TopicError(
            f"a shared subscription needs a plain topic filter, got {show(topic_filter)}"
        )
    return f"$share/{group}/{topic_filter}"
