"""The daemon's other payloads: heartbeat, model info and command replies.

The identification message is contract 3 (``fieldscope.edge.message``); these are
the payloads a station publishes beside it (see docs/mqtt.md, "Health, model and
command payloads"). They follow the same rules so one subscriber can read them all:

* compact UTF-8 JSON with sorted keys and an integer ``version`` (the major
  version): a reader refuses versions it does not know, writers may add fields
  within a version and readers ignore fields they do not know;
* times are UTC ending in ``Z``; a naive datetime is an error;
* each dataclass validates itself on construction, and ``from_json`` raises
  :class:`PayloadError` naming the field, never a library error;
* in the heartbeat, a measurement the board cannot make (no thermal sensor) is
  ``null``, so a dashboard can tell "unknown" from a missing key of an old writer.

The ``status`` topic carries plain ``online``/``offline``/``stopped``
(:class:`fieldscope.edge.topics.DeviceStatus`), not JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self

import msgspec
from msgspec import Meta

from fieldscope.edge.errors import FieldscopeError, MessageError
from fieldscope.edge.message import Label, ModelRef, Text, UtcTime
from fieldscope.edge.topics import show
from fieldscope.edge.wire import WireStruct, compact_json, decode_json, utc_text, version_problem

if TYPE_CHECKING:
    from fieldscope.edge.bundle import Bundle
    from fieldscope.edge.runtime import RuntimeInfo

__all__ = [
    "PAYLOAD_VERSION",
    "SUPPORTED_VERSIONS",
    "THERMAL_ZONE",
    "CameraReport",
    "CameraState",
    "CommandReply",
    "FrameCounts",
    "Heartbeat",
    "HeartbeatPayload",
    "ModelInfo",
    "ModelInfoPayload",
    "OutboxReport",
    "PayloadError",
    "RuntimeRef",
    "cpu_temperature_c",
    "disk_free_bytes",
    "utc_text",
]

logger = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
# Where Linux (and Raspberry Pi OS) reports the SoC temperature, in millidegrees Celsius.
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
MAX_TEXT_CHARS = 1000
MAX_WARNINGS = 32
MAX_LABELS = 10_000
MAX_DATA_BYTES = 32 * 1024

Count = Annotated[int, Meta(ge=0)]
Amount = Annotated[float, Meta(ge=0)]
Celsius = Annotated[float, Meta(ge=-273.15)]
ShortText = Annotated[
    str, Meta(min_length=1, max_length=200, pattern=r"\S", extra={"must": "not be empty or blank"})
]
Version = Annotated[int, Meta(extra_json_schema={"const": PAYLOAD_VERSION})]


class PayloadError(MessageError):
    """A heartbeat, model-info or command-reply payload is invalid; names the field."""


class CameraState(StrEnum):
    """What the capture side is doing, as reported in the heartbeat."""

    STARTING = "starting"  # opening the camera for the first time
    OK = "ok"  # delivering frames
    OUTAGE = "outage"  # lost; being reopened with backoff (``camera.outage`` says why)
    STOPPED = "stopped"  # closed on purpose (daemon stopping)


class _Part(WireStruct, frozen=True):
    _error: ClassVar[type[FieldscopeError]] = PayloadError
    _prefix: ClassVar[str] = "heartbeat: "

    @classmethod
    def _precheck(cls, data: dict[str, Any]) -> None:
        if "version" in data and (problem := version_problem(data["version"], SUPPORTED_VERSIONS)):
            raise cls._fail(problem)


def _now() -> datetime:
    return datetime.now(UTC)


class _Flat(msgspec.Struct, frozen=True, kw_only=True):
    """A payload in the flat form the daemon builds; ``_payload`` is its wire Struct,
    whose rules it is checked against on construction. ``_nested`` maps a flat field to
    its place in the wire form (``outbox_depth`` -> ``outbox.depth``), ``_parts`` names
    the Struct of each nested object."""

    _payload: ClassVar[type[_Part]]
    _nested: ClassVar[dict[str, tuple[str, str]]]
    _parts: ClassVar[dict[str, type[_Part]]]

    def __post_init__(self) -> None:
        for name, value in self._flatten(self.payload()).items():
            msgspec.structs.force_setattr(self, name, value)

    def payload(self) -> Any:
        """The wire form, checked (raises PayloadError naming the wire field)."""
        values: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {part: {} for part in self._parts}
        for name in self.__struct_fields__:
            part, key = self._nested.get(name, ("", name))
            (parts[part] if part else values)[key] = getattr(self, name)
        for part, kwargs in parts.items():
            values[part] = self._parts[part](**kwargs)
        return self._payload(**values)

    @classmethod
    def _flatten(cls, payload: Any) -> dict[str, Any]:
        flat = {}
        for name in cls.__struct_fields__:
            part, key = cls._nested.get(name, ("", name))
            flat[name] = getattr(getattr(payload, part) if part else payload, key)
        return flat

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.payload().to_dict()
        return out

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with sorted keys."""
        return compact_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a received payload; any defect raises PayloadError naming the field."""
        return cls(**cls._flatten(decode_json(cls._payload, data)))


# --- heartbeat ---------------------------------------------------------------------------


class FrameCounts(_Part, frozen=True):
    """Frames since the daemon started: ``seen`` = captured; of those, ``accepted``
    (classified with a label), ``uncertain`` (below the threshold), ``rejected`` (by
    the quality gate) and ``failed`` (could not be decoded or classified). A segmenting
    station (``[objects] mode = "segment"``) also sends ``objects``, the objects it
    classified, and then counts ``accepted``/``uncertain``/``rejected`` per message: one
    per object, one ``rejected`` per frame without objects."""

    _where: ClassVar[str] = "frames"
    _required: ClassVar[tuple[str, ...]] = ("seen", "accepted", "uncertain", "rejected", "failed")
    _omit_none: ClassVar[frozenset[str]] = frozenset({"objects"})

    seen: Count = 0
    accepted: Count = 0
    uncertain: Count = 0
    rejected: Count = 0
    failed: Count = 0
    objects: Count | None = None


class OutboxReport(_Part, frozen=True):
    """The outbox in the heartbeat: messages waiting for the broker (``depth``), those
    ever lost to its cap or a full disk (``dropped``), the oldest one's age (or null)."""

    _where: ClassVar[str] = "outbox"

    depth: Count
    dropped: Count
    oldest_age_s: Amount | None = None


class CameraReport(_Part, frozen=True):
    """The camera in the heartbeat: its state, and why when it is in ``outage``."""

    _where: ClassVar[str] = "camera"

    state: CameraState
    outage: Text | None = None


class HeartbeatPayload(_Part, frozen=True, kw_only=True):
    """The heartbeat as it travels (``docs/heartbeat.schema.json``); :class:`Heartbeat`
    is the flat form the daemon builds. A measurement the board cannot make is null."""

    _required: ClassVar[tuple[str, ...]] = ("version",)

    version: Version = PAYLOAD_VERSION
    time: UtcTime
    uptime_s: Amount
    frames: FrameCounts
    fps: Amount
    outbox: OutboxReport
    camera: CameraReport
    paused: bool
    disk_free_bytes: Count | None
    cpu_temperature_c: Celsius | None
    model: ModelRef | None
    warnings: Annotated[tuple[Text, ...], Meta(max_length=MAX_WARNINGS)]


class Heartbeat(_Flat, frozen=True, kw_only=True):
    """Periodic liveness and health, published (QoS 0) on ``.../heartbeat``.

    ``fps`` is the recent capture rate; ``outbox_depth`` the messages waiting for the
    broker and ``outbox_dropped`` those ever lost to the outbox's cap or a full disk;
    ``camera_outage`` says why the camera is in ``outage``; ``warnings`` are short
    lines for people (e.g. "outbox: the disk is full"); ``model`` is null while no
    bundle is loaded. Its rules are :class:`HeartbeatPayload`'s, checked on construction.
    """

    time: datetime
    uptime_s: float
    frames: FrameCounts
    fps: float
    outbox_depth: int
    outbox_dropped: int
    camera_state: CameraState
    paused: bool
    disk_free_bytes: int | None
    cpu_temperature_c: float | None
    model: ModelRef | None
    camera_outage: str | None = None
    outbox_oldest_age_s: float | None = None
    warnings: tuple[str, ...] = ()
    version: int = PAYLOAD_VERSION

    _payload: ClassVar[type[_Part]] = HeartbeatPayload
    _parts: ClassVar[dict[str, type[_Part]]] = {"outbox": OutboxReport, "camera": CameraReport}
    _nested: ClassVar[dict[str, tuple[str, str]]] = {
        "outbox_depth": ("outbox", "depth"),
        "outbox_dropped": ("outbox", "dropped"),
        "outbox_oldest_age_s": ("outbox", "oldest_age_s"),
        "camera_state": ("camera", "state"),
        "camera_outage": ("camera", "outage"),
    }


# --- model info --------------------------------------------------------------------------


class RuntimeRef(_Part, frozen=True):
    """The interpreter serving the model (``ai_edge_litert``, ``tflite_runtime``), its version."""

    _prefix: ClassVar[str] = "model info: "
    _where: ClassVar[str] = "runtime"

    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"\S")]
    version: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"\S")]


class ModelInfoPayload(_Part, frozen=True, kw_only=True):
    """The model info as it travels (``docs/model-info.schema.json``)."""

    _prefix: ClassVar[str] = "model info: "
    _required: ClassVar[tuple[str, ...]] = ("version",)

    version: Version = PAYLOAD_VERSION
    model: ModelRef
    labels: Annotated[tuple[Label, ...], Meta(min_length=1, max_length=MAX_LABELS)]
    threshold: Annotated[float, Meta(ge=0, le=1)]
    loaded_at: UtcTime
    runtime: RuntimeRef
    signed: bool = False

    def problems(self) -> list[tuple[str, str]]:
        """Labels name the model's outputs, so each must be unique."""
        return [] if len(set(self.labels)) == len(self.labels) else [("labels", "must be unique")]


class ModelInfo(_Flat, frozen=True, kw_only=True):
    """The bundle a device serves, published retained (QoS 1) on ``.../model``.

    Retained, so a dashboard that connects later learns at once which model, labels
    and threshold stand behind the identifications it will receive; republished on
    every reconnect because a broker without persistence forgets retained messages.
    Its rules are :class:`ModelInfoPayload`'s, checked on construction.
    """

    model: ModelRef
    labels: tuple[str, ...]
    threshold: float
    loaded_at: datetime
    runtime: str
    runtime_version: str
    signed: bool = False
    version: int = PAYLOAD_VERSION

    _payload: ClassVar[type[_Part]] = ModelInfoPayload
    _parts: ClassVar[dict[str, type[_Part]]] = {"runtime": RuntimeRef}
    _nested: ClassVar[dict[str, tuple[str, str]]] = {
        "runtime": ("runtime", "name"),
        "runtime_version": ("runtime", "version"),
    }

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, runtime: RuntimeInfo, loaded_at: datetime | None = None
    ) -> ModelInfo:
        """The info of a loaded bundle (``loaded_at`` defaults to now)."""
        manifest = bundle.manifest
        return cls(
            model=ModelRef(manifest.model_name, manifest.model_version, bundle.sha256),
            labels=tuple(manifest.labels),
            threshold=manifest.threshold,
            loaded_at=loaded_at or _now(),
            runtime=runtime.name,
            runtime_version=runtime.version,
            signed=bundle.signed,
        )


# --- command reply -----------------------------------------------------------------------


class CommandReply(_Part, frozen=True, kw_only=True):
    """The answer to one command, published (QoS 1) on ``.../command/{name}/result``.

    ``ok`` says whether the command was carried out; when it was not, ``error`` says
    why in one line and nothing changed on the station. ``request_id`` echoes the
    command's, so a caller matches replies to requests. ``data`` is the command's
    result (e.g. the status snapshot), or null.
    """

    _prefix: ClassVar[str] = "command reply: "
    _required: ClassVar[tuple[str, ...]] = ("version", "time")

    version: Version = PAYLOAD_VERSION
    ok: bool
    command: ShortText
    request_id: Text | None = None
    error: Text | None = None
    data: Mapping[str, Any] | None = None
    time: UtcTime = msgspec.field(default_factory=_now)

    def __post_init__(self) -> None:
        super().__post_init__()
        msgspec.structs.force_setattr(self, "data", self._json_data())

    def problems(self) -> list[tuple[str, str]]:
        """``error`` is there exactly when the command failed."""
        if self.ok and self.error is not None:
            return [("error", f"must be null when ok is true, got {show(self.error)}")]
        if not self.ok and self.error is None:
            return [("error", "must be a non-empty string when ok is false, got null")]
        return []

    def _json_data(self) -> dict[str, Any] | None:
        """A private, JSON-shaped copy of ``data``: the reply cannot change after it was
        checked, and it is small enough to publish."""
        if self.data is None:
            return None
        try:
            encoded = json.dumps(self.data, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise self._fail(f"data must be JSON-serialisable ({exc})") from None
        except RecursionError:
            raise self._fail("data is nested too deeply") from None
        if len(encoded.encode("utf-8")) > MAX_DATA_BYTES:
            raise self._fail(f"data must be at most {MAX_DATA_BYTES} bytes as JSON")
        copy: dict[str, Any] = json.loads(encoded)
        return copy


# --- measurements --------------------------------------------------------------------------


def cpu_temperature_c(path: Path = THERMAL_ZONE) -> float | None:
    """The SoC temperature in °C, or None where the board has no thermal zone.

    A Pi throttles above ~80 °C in a closed field box; the heartbeat reports it so
    the fleet can see a station cooking before its frame rate drops.
    """
    try:
        raw = path.read_text(encoding="ascii").strip()
        return int(raw) / 1000.0
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def disk_free_bytes(path: Path | str) -> int | None:
    """Bytes free for the daemon's user on the filesystem holding ``path``; None if unknown.

    The outbox and the image archive share the SD card: a filling disk is the most
    likely way a months-long deployment dies, so it is reported before it happens.
    """
    try:
        return int(shutil.disk_usage(path).free)
    except OSError as exc:
        logger.debug("cannot measure free disk space of %s: %s", path, exc)
        return None
