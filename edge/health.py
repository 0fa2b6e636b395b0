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
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldscope.edge.errors import MessageError
from fieldscope.edge.message import ModelRef
from fieldscope.edge.topics import show
from fieldscope.edge.untrusted import MAX_PAYLOAD_BYTES, RejectedValueError, load_json, read_number

if TYPE_CHECKING:
    from fieldscope.edge.bundle import Bundle
    from fieldscope.edge.runtime import RuntimeInfo

__all__ = [
    "PAYLOAD_VERSION",
    "SUPPORTED_VERSIONS",
    "THERMAL_ZONE",
    "CameraState",
    "CommandReply",
    "FrameCounts",
    "Heartbeat",
    "ModelInfo",
    "PayloadError",
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
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


class PayloadError(MessageError):
    """A heartbeat, model-info or command-reply payload is invalid; names the field."""


class CameraState(StrEnum):
    """What the capture side is doing, as reported in the heartbeat."""

    STARTING = "starting"  # opening the camera for the first time
    OK = "ok"  # delivering frames
    OUTAGE = "outage"  # lost; being reopened with backoff (``camera.outage`` says why)
    STOPPED = "stopped"  # closed on purpose (daemon stopping)


# --- checks that name the field -----------------------------------------------------------


class _Check:
    """Validation helpers that prefix every error with the payload's name."""

    def __init__(self, payload: str) -> None:
        self.payload = payload

    def fail(self, problem: str) -> PayloadError:
        return PayloadError(f"{self.payload}: {problem}")

    def got(self, value: object) -> str:
        return "null" if value is None else f"{type(value).__name__} {show(value)}"

    def text(self, value: object, path: str, max_chars: int = MAX_TEXT_CHARS) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{path} must be a non-empty string, got {self.got(value)}")
        if len(value) > max_chars:
            raise self.fail(f"{path} must be at most {max_chars} characters, got {len(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(f"{path} must be valid Unicode (it has a lone surrogate)") from None
        return value

    def optional_text(self, value: object, path: str) -> str | None:
        return None if value is None else self.text(value, path)

    def number(self, value: object, path: str, low: float, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{path} must be a number, got {self.got(value)}")
        try:  # the shared bounded reader: a 400-digit integer is refused, not OverflowError
            return read_number(value, low, high)
        except RejectedValueError:
            bounds = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise self.fail(f"{path} must be a finite number {bounds}, got {show(value)}") from None

    def optional_number(self, value: object, path: str, low: float) -> float | None:
        return None if value is None else self.number(value, path, low)

    def count(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{path} must be an integer >= 0, got {self.got(value)}")
        return value

    def optional_count(self, value: object, path: str) -> int | None:
        return None if value is None else self.count(value, path)

    def flag(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{path} must be true or false, got {self.got(value)}")
        return value

    def utc(self, value: object, path: str) -> datetime:
        if not isinstance(value, datetime):
            raise self.fail(f"{path} must be a datetime, got {self.got(value)}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise self.fail(
                f"{path} must be timezone-aware (naive times are ambiguous on a Pi), got "
                f"{value.isoformat()}; use datetime.now(timezone.utc)"
            )
        return value.astimezone(UTC)

    def timestamp(self, value: object, path: str) -> datetime:
        if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
            raise self.fail(
                f"{path} must be a UTC time like 2026-11-23T18:39:00.123456Z, got {show(value)}"
            )
        try:
            return datetime.fromisoformat(value).astimezone(UTC)
        except ValueError as exc:
            raise self.fail(f"{path} is not a valid date and time ({exc})") from None

    def mapping(self, value: object, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(f"{path} must be an object, got {self.got(value)}")
        return value

    def required(self, data: Mapping[str, Any], key: str, prefix: str = "") -> Any:
        if key not in data:
            raise self.fail(f"{prefix}{key} is required")
        return data[key]

    def version(self, value: object) -> int:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(
                f"version must be an integer (supported: {supported}), got {show(value)}"
            )
        if value not in SUPPORTED_VERSIONS:
            raise self.fail(
                f"version {value} is not supported by this reader (supported: {supported}); "
                "upgrade fieldscope to read it"
            )
        return value

    def model(self, value: object, path: str) -> ModelRef:
        try:
            return ModelRef.from_dict(value, path)
        except MessageError as exc:
            # ModelRef speaks of "identification message"; say which payload it was.
            text = str(exc).removeprefix("identification message: ")
            raise self.fail(text) from None

    def decode(self, data: object) -> Mapping[str, Any]:
        if not isinstance(data, bytes | bytearray | str):
            raise self.fail(f"payload must be bytes or str, got {type(data).__name__}")
        try:  # bounded in size, depth and number magnitude: never a library error
            decoded = load_json(data, max_bytes=MAX_PAYLOAD_BYTES)
        except RejectedValueError as exc:
            raise self.fail(f"payload {exc}") from None
        obj = self.mapping(decoded, "the payload")
        self.version(self.required(obj, "version"))
        return obj


def utc_text(value: datetime) -> str:
    """A UTC time as the payloads write it: ``2026-11-23T18:39:00.123456Z``."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _dumps(data: Mapping[str, Any]) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _now() -> datetime:
    return datetime.now(UTC)


# --- heartbeat ---------------------------------------------------------------------------

_FRAME_KINDS = ("seen", "accepted", "uncertain", "rejected", "failed")


@dataclass(frozen=True)
class FrameCounts:
    """Frames since the daemon started: ``seen`` = captured; of those, ``accepted``
    (classified with a label), ``uncertain`` (below the threshold), ``rejected`` (by
    the quality gate) and ``failed`` (could not be decoded or classified)."""

    seen: int = 0
    accepted: int = 0
    uncertain: int = 0
    rejected: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        check = _Check("heartbeat")
        for kind in _FRAME_KINDS:
            check.count(getattr(self, kind), f"frames.{kind}")

    def to_dict(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in _FRAME_KINDS}

    @classmethod
    def from_dict(cls, data: object) -> FrameCounts:
        check = _Check("heartbeat")
        obj = check.mapping(data, "frames")
        return cls(
            *(check.count(check.required(obj, k, "frames."), f"frames.{k}") for k in _FRAME_KINDS)
        )


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """Periodic liveness and health, published (QoS 0) on ``.../heartbeat``.

    ``fps`` is the recent capture rate; ``outbox_depth`` the messages waiting for the
    broker and ``outbox_dropped`` those ever lost to the outbox's cap or a full disk;
    ``camera_outage`` says why the camera is in ``outage``; ``warnings`` are short
    lines for people (e.g. "outbox: the disk is full"); ``model`` is null while no
    bundle is loaded.
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

    def __post_init__(self) -> None:
        check = _Check("heartbeat")
        check.version(self.version)
        object.__setattr__(self, "time", check.utc(self.time, "time"))
        object.__setattr__(self, "uptime_s", check.number(self.uptime_s, "uptime_s", 0.0))
        if not isinstance(self.frames, FrameCounts):
            raise check.fail(f"frames must be a FrameCounts, got {check.got(self.frames)}")
        object.__setattr__(self, "fps", check.number(self.fps, "fps", 0.0))
        check.count(self.outbox_depth, "outbox.depth")
        check.count(self.outbox_dropped, "outbox.dropped")
        age = check.optional_number(self.outbox_oldest_age_s, "outbox.oldest_age_s", 0.0)
        object.__setattr__(self, "outbox_oldest_age_s", age)
        try:
            object.__setattr__(self, "camera_state", CameraState(self.camera_state))
        except ValueError:
            states = ", ".join(s.value for s in CameraState)
            raise check.fail(
                f"camera.state must be one of {states}, got {show(self.camera_state)}"
            ) from None
        check.optional_text(self.camera_outage, "camera.outage")
        check.flag(self.paused, "paused")
        check.optional_count(self.disk_free_bytes, "disk_free_bytes")
        temperature = check.optional_number(self.cpu_temperature_c, "cpu_temperature_c", -273.15)
        object.__setattr__(self, "cpu_temperature_c", temperature)
        if self.model is not None and not isinstance(self.model, ModelRef):
            raise check.fail(f"model must be a ModelRef or None, got {check.got(self.model)}")
        warnings = tuple(self.warnings)
        if len(warnings) > MAX_WARNINGS:
            raise check.fail(f"warnings must have at most {MAX_WARNINGS} entries")
        for i, warning in enumerate(warnings):
            check.text(warning, f"warnings[{i}]")
        object.__setattr__(self, "warnings", warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "time": utc_text(self.time),
            "uptime_s": self.uptime_s,
            "frames": self.frames.to_dict(),
            "fps": self.fps,
            "outbox": {
                "depth": self.outbox_depth,
                "dropped": self.outbox_dropped,
                "oldest_age_s": self.outbox_oldest_age_s,
            },
            "camera": {"state": self.camera_state.value, "outage": self.camera_outage},
            "paused": self.paused,
            "disk_free_bytes": self.disk_free_bytes,
            "cpu_temperature_c": self.cpu_temperature_c,
            "model": None if self.model is None else self.model.to_dict(),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with sorted keys."""
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Heartbeat:
        """Parse a received heartbeat; any defect raises PayloadError naming the field."""
        check = _Check("heartbeat")
        obj = check.decode(data)
        outbox = check.mapping(check.required(obj, "outbox"), "outbox")
        camera = check.mapping(check.required(obj, "camera"), "camera")
        model = check.required(obj, "model")
        warnings = check.required(obj, "warnings")
        if not isinstance(warnings, list):
            raise check.fail(f"warnings must be a list, got {check.got(warnings)}")
        return cls(
            version=obj["version"],
            time=check.timestamp(check.required(obj, "time"), "time"),
            uptime_s=check.number(check.required(obj, "uptime_s"), "uptime_s", 0.0),
            frames=FrameCounts.from_dict(check.required(obj, "frames")),
            fps=check.number(check.required(obj, "fps"), "fps", 0.0),
            outbox_depth=check.count(check.required(outbox, "depth", "outbox."), "outbox.depth"),
            outbox_dropped=check.count(
                check.required(outbox, "dropped", "outbox."), "outbox.dropped"
            ),
            outbox_oldest_age_s=check.optional_number(
                outbox.get("oldest_age_s"), "outbox.oldest_age_s", 0.0
            ),
            camera_state=check.required(camera, "state", "camera."),
            camera_outage=check.optional_text(camera.get("outage"), "camera.outage"),
            paused=check.flag(check.required(obj, "paused"), "paused"),
            disk_free_bytes=check.optional_count(
                check.required(obj, "disk_free_bytes"), "disk_free_bytes"
            ),
            cpu_temperature_c=check.optional_number(
                check.required(obj, "cpu_temperature_c"), "cpu_temperature_c", -273.15
            ),
            model=None if model is None else check.model(model, "model"),
            warnings=tuple(warnings),
        )


# --- model info --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The bundle a device serves, published retained (QoS 1) on ``.../model``.

    Retained, so a dashboard that connects later learns at once which model, labels
    and threshold stand behind the identifications it will receive; republished on
    every reconnect because a broker without persistence forgets retained messages.
    """

    model: ModelRef
    labels: tuple[str, ...]
    threshold: float
    loaded_at: datetime
    runtime: str
    runtime_version: str
    signed: bool = False
    version: int = PAYLOAD_VERSION

    def __post_init__(self) -> None:
        check = _Check("model info")
        check.version(self.version)
        if not isinstance(self.model, ModelRef):
            raise check.fail(f"model must be a ModelRef, got {check.got(self.model)}")
        labels = tuple(self.labels) if isinstance(self.labels, list | tuple) else self.labels
        if not isinstance(labels, tuple) or not labels:
            raise check.fail(f"labels must be a non-empty list, got {check.got(self.labels)}")
        if len(labels) > MAX_LABELS:
            raise check.fail(f"labels must have at most {MAX_LABELS} entries, got {len(labels)}")
        for i, label in enumerate(labels):
            check.text(label, f"labels[{i}]", 200)
        if len(set(labels)) != len(labels):
            raise check.fail("labels must be unique")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "threshold", check.number(self.threshold, "threshold", 0.0, 1.0))
        object.__setattr__(self, "loaded_at", check.utc(self.loaded_at, "loaded_at"))
        check.text(self.runtime, "runtime.name", 100)
        check.text(self.runtime_version, "runtime.version", 100)
        check.flag(self.signed, "signed")

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model.to_dict(),
            "labels": list(self.labels),
            "threshold": self.threshold,
            "loaded_at": utc_text(self.loaded_at),
            "runtime": {"name": self.runtime, "version": self.runtime_version},
            "signed": self.signed,
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with sorted keys."""
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> ModelInfo:
        """Parse a received model info; any defect raises PayloadError naming the field."""
        check = _Check("model info")
        obj = check.decode(data)
        runtime = check.mapping(check.required(obj, "runtime"), "runtime")
        labels = check.required(obj, "labels")
        if not isinstance(labels, list):
            raise check.fail(f"labels must be a list, got {check.got(labels)}")
        return cls(
            version=obj["version"],
            model=check.model(check.required(obj, "model"), "model"),
            labels=tuple(labels),
            threshold=check.number(check.required(obj, "threshold"), "threshold", 0.0, 1.0),
            loaded_at=check.timestamp(check.required(obj, "loaded_at"), "loaded_at"),
            runtime=check.text(check.required(runtime, "name", "runtime."), "runtime.name"),
            runtime_version=check.text(
                check.required(runtime, "version", "runtime."), "runtime.version"
            ),
            signed=check.flag(obj.get("signed", False), "signed"),
        )


# --- command reply -----------------------------------------------------------------------


def _json_data(check: _Check, data: object) -> dict[str, Any] | None:
    if data is None:
        return None
    obj = check.mapping(data, "data")
    try:
        encoded = json.dumps(dict(obj), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise check.fail(f"data must be JSON-serialisable ({exc})") from None
    except RecursionError:
        raise check.fail("data is nested too deeply") from None
    if len(encoded.encode("utf-8")) > MAX_DATA_BYTES:
        raise check.fail(f"data must be at most {MAX_DATA_BYTES} bytes as JSON")
    # A private, JSON-shaped copy: the reply cannot change after it was validated.
    copy: dict[str, Any] = json.loads(encoded)
    return copy


@dataclass(frozen=True, kw_only=True)
class CommandReply:
    """The answer to one command, published (QoS 1) on ``.../command/{name}/result``.

    ``ok`` says whether the command was carried out; when it was not, ``error`` says
    why in one line and nothing changed on the station. ``request_id`` echoes the
    command's, so a caller matches replies to requests. ``data`` is the command's
    result (e.g. the status snapshot), or null.
    """

    ok: bool
    command: str
    request_id: str | None = None
    error: str | None = None
    data: Mapping[str, Any] | None = None
    time: datetime = field(default_factory=_now)
    version: int = PAYLOAD_VERSION

    def __post_init__(self) -> None:
        check = _Check("command reply")
        check.version(self.version)
        check.flag(self.ok, "ok")
        check.text(self.command, "command", 200)
        check.optional_text(self.request_id, "request_id")
        if self.ok and self.error is not None:
            raise check.fail(f"error must be null when ok is true, got {show(self.error)}")
        if not self.ok:
            check.text(self.error, "error")
        object.__setattr__(self, "data", _json_data(check, self.data))
        object.__setattr__(self, "time", check.utc(self.time, "time"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ok": self.ok,
            "command": self.command,
            "request_id": self.request_id,
            "error": self.error,
            "data": None if self.data is None else dict(self.data),
            "time": utc_text(self.time),
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with sorted keys."""
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> CommandReply:
        """Parse a received reply; any defect raises PayloadError naming the field."""
        check = _Check("command reply")
        obj = check.decode(data)
        return cls(
            version=obj["version"],
            ok=check.flag(check.required(obj, "ok"), "ok"),
            command=check.text(check.required(obj, "command"), "command", 200),
            request_id=check.optional_text(obj.get("request_id"), "request_id"),
            error=check.optional_text(obj.get("error"), "error"),
            data=obj.get("data"),
            time=check.timestamp(check.required(obj, "time"), "time"),
        )


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
