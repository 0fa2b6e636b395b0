"""Contract 3 — the identification message: one JSON payload per classified capture.

The dataclass validates itself, so the edge needs no jsonschema; the JSON Schema
shipped beside this module (``schema_path()``, and docs/identification.schema.json
for third parties) states the same rules for subscribers in other languages.

Decisions a subscriber relies on (also in docs/mqtt.md):

* **Identity** is ``(device, seq)``: ``seq`` grows by one per message of a device
  and survives restarts (the outbox persists it). Delivery is at least once
  (QoS 1 plus a replaying outbox), so a subscriber drops a repeated pair.
* **Versions**: ``version`` is the major version. A reader refuses versions it
  does not know and names the ones it supports; within a version, writers may
  add optional fields, and readers ignore fields they do not know.
* **Time**: ``captured_at`` is UTC on the wire (``2026-11-23T18:39:00.123456Z``).
  A naive datetime is an error, because a Pi's local clock setting is exactly the
  ambiguity the message must not carry; an aware one is converted to UTC.
* **Status**: ``ok`` — ``label`` is ``top_k[0].label``; ``uncertain`` — the top
  score fell below the bundle's threshold, ``label`` is null but ``score`` and
  ``top_k`` say what the model thought; ``rejected`` — the capture failed the
  quality gate and no inference ran, so ``label`` and ``score`` are null,
  ``top_k`` is empty and ``quality``/``reason`` say why.
* **Optional fields** (``quality`` and its members, ``image.archived_path``,
  ``reason``) are omitted when unknown, never null.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from fieldscope.edge.errors import FieldscopeError, MessageError
from fieldscope.edge.topics import segment_problem, show
from fieldscope.edge.untrusted import MAX_PAYLOAD_BYTES, RejectedValueError, load_json, read_number

__all__ = [
    "MAX_SEQ",
    "MESSAGE_VERSION",
    "SCHEMA_FILENAME",
    "SUPPORTED_VERSIONS",
    "Candidate",
    "Identification",
    "ImageRef",
    "ModelRef",
    "Prediction",
    "Quality",
    "Status",
    "Timings",
    "build_identification",
    "build_rejection",
    "load_schema",
    "schema_path",
]

MESSAGE_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
SCHEMA_FILENAME = "identification.schema.json"
# JavaScript subscribers parse JSON numbers as doubles: keep seq exactly representable.
MAX_SEQ = 2**53 - 1
MAX_LABEL_CHARS = 200
MAX_NAME_CHARS = 200
MAX_TEXT_CHARS = 1000
MAX_PATH_CHARS = 4096
MAX_IMAGE_SIDE = 65535
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?Z"
)
# Scores equal to the top candidate's within float noise count as equal.
_SCORE_TOLERANCE = 1e-9
_PREFIX = "identification message: "


class Status(StrEnum):
    """What the station concluded about one capture."""

    OK = "ok"
    UNCERTAIN = "uncertain"
    REJECTED = "rejected"


# --- value checks: each names the field's path and says what was wrong ---------------------


def _fail(problem: str) -> MessageError:
    return MessageError(_PREFIX + problem)


def _typename(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _got(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {show(value)}"


def _string(value: object, path: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise _fail(f"{path} must be a string, got {_got(value)}")
    if not value.strip():
        raise _fail(f"{path} must not be empty or blank, got {show(value)}")
    if len(value) > max_chars:
        raise _fail(f"{path} must be at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{path} must be valid Unicode (it contains a lone surrogate)") from None
    return value


def _segment(value: object, path: str) -> str:
    problem = segment_problem(value)
    if problem is not None:
        raise _fail(f"{path} {problem} (it is a level of the MQTT topic), got {show(value)}")
    assert isinstance(value, str)  # segment_problem returns None only for strings
    return value


def _number(value: object, path: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{path} must be a number, got {_got(value)}")
    try:
        number = read_number(value)  # never OverflowError: a 400-digit integer is refused
    except RejectedValueError:
        raise _fail(f"{path} must be a finite number, got {show(value)}") from None
    if high is None:
        if number < low:
            raise _fail(f"{path} must be >= {low:g}, got {show(value)}")
    elif not low <= number <= high:
        raise _fail(f"{path} must be between {low:g} and {high:g}, got {show(value)}")
    return number


def _integer(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{path} must be an integer, got {_got(value)}")
    if not low <= value <= high:
        raise _fail(f"{path} must be between {low} and {high}, got {show(value)}")
    return value


def _sha256(value: object, path: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _fail(f"{path} must be 64 lowercase hex digits (a SHA-256), got {show(value)}")
    return value


def _object(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(f"{path} must be an object, got {_got(value)}")
    return value


def _required(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data:
        raise _fail(f"{path}{key} is required")
    return data[key]


def _utc(value: object, path: str) -> datetime:
    if not isinstance(value, datetime):
        raise _fail(f"{path} must be a datetime, got {_got(value)}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise _fail(
            f"{path} must be timezone-aware (naive times are ambiguous on a Pi), got "
            f"{value.isoformat()}; use datetime.now(timezone.utc)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise _fail(f"{path} is out of range in UTC, got {value.isoformat()}") from None


def _timestamp(value: object, path: str) -> datetime:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise _fail(
            f"{path} must be a UTC time like 2026-11-23T18:39:00.123456Z "
            f"(at most 6 fraction digits, ending in Z), got {show(value)}"
        )
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError as exc:
        raise _fail(f"{path} is not a valid date and time ({exc}), got {show(value)}") from None


def _format_time(value: datetime) -> str:
    # isoformat, unlike strftime("%Y"), pads years before 1000 to four digits.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# --- the parts of a message ------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One entry of ``top_k``: a label and the model's score for it."""

    label: str
    score: float

    def __post_init__(self) -> None:
        self._check("candidate")

    def _check(self, path: str) -> None:
        _string(self.label, f"{path}.label", MAX_LABEL_CHARS)
        object.__setattr__(self, "score", _number(self.score, f"{path}.score", 0.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score}

    @classmethod
    def from_dict(cls, data: object, path: str = "candidate") -> Candidate:
        obj = _object(data, path)
        label = _string(_required(obj, "label", f"{path}."), f"{path}.label", MAX_LABEL_CHARS)
        score = _number(_required(obj, "score", f"{path}."), f"{path}.score", 0.0, 1.0)
        return cls(label, score)


@dataclass(frozen=True)
class ModelRef:
    """Which model produced the identification: the bundle's name and version, and
    the SHA-256 of its ``model.tflite`` (as listed in the bundle manifest), which
    tells two builds with the same version apart."""

    name: str
    version: str
    sha256: str

    def __post_init__(self) -> None:
        self._check("model")

    def _check(self, path: str) -> None:
        _string(self.name, f"{path}.name", MAX_NAME_CHARS)
        _string(self.version, f"{path}.version", MAX_NAME_CHARS)
        _sha256(self.sha256, f"{path}.sha256")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: object, path: str = "model") -> ModelRef:
        obj = _object(data, path)
        return cls(
            _string(_required(obj, "name", f"{path}."), f"{path}.name", MAX_NAME_CHARS),
            _string(_required(obj, "version", f"{path}."), f"{path}.version", MAX_NAME_CHARS),
            _sha256(_required(obj, "sha256", f"{path}."), f"{path}.sha256"),
        )


@dataclass(frozen=True)
class ImageRef:
    """The captured frame: SHA-256 of its encoded bytes, its size, and where the
    station archived it (a path on the station) when it keeps images."""

    sha256: str
    width: int
    height: int
    archived_path: str | None = None

    def __post_init__(self) -> None:
        self._check("image")

    def _check(self, path: str) -> None:
        _sha256(self.sha256, f"{path}.sha256")
        _integer(self.width, f"{path}.width", 1, MAX_IMAGE_SIDE)
        _integer(self.height, f"{path}.height", 1, MAX_IMAGE_SIDE)
        if self.archived_path is not None:
            _string(self.archived_path, f"{path}.archived_path", MAX_PATH_CHARS)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "width": self.width, "height": self.height}
        if self.archived_path is not None:
            out["archived_path"] = self.archived_path
        return out

    @classmethod
    def from_dict(cls, data: object, path: str = "image") -> ImageRef:
        obj = _object(data, path)
        archived = None
        if "archived_path" in obj:
            archived = _string(obj["archived_path"], f"{path}.archived_path", MAX_PATH_CHARS)
        return cls(
            _sha256(_required(obj, "sha256", f"{path}."), f"{path}.sha256"),
            _integer(_required(obj, "width", f"{path}."), f"{path}.width", 1, MAX_IMAGE_SIDE),
            _integer(_required(obj, "height", f"{path}."), f"{path}.height", 1, MAX_IMAGE_SIDE),
            archived,
        )


@dataclass(frozen=True)
class Quality:
    """Measurements of the quality gate, each optional.

    ``sharpness`` is the variance of the Laplacian of the grey frame (>= 0; higher is
    sharper); ``exposure`` is the mean brightness as a fraction of full scale (0..1).
    """

    sharpness: float | None = None
    exposure: float | None = None

    def __post_init__(self) -> None:
        self._check("quality")

    def _check(self, path: str) -> None:
        if self.sharpness is not None:
            value = _number(self.sharpness, f"{path}.sharpness", 0.0)
            object.__setattr__(self, "sharpness", value)
        if self.exposure is not None:
            value = _number(self.exposure, f"{path}.exposure", 0.0, 1.0)
            object.__setattr__(self, "exposure", value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sharpness is not None:
            out["sharpness"] = self.sharpness
        if self.exposure is not None:
            out["exposure"] = self.exposure
        return out

    @classmethod
    def from_dict(cls, data: object, path: str = "quality") -> Quality:
        obj = _object(data, path)
        sharpness = exposure = None
        if "sharpness" in obj:
            sharpness = _number(obj["sharpness"], f"{path}.sharpness", 0.0)
        if "exposure" in obj:
            exposure = _number(obj["exposure"], f"{path}.exposure", 0.0, 1.0)
        return cls(sharpness, exposure)


_STAGES = ("capture", "quality", "preprocess", "inference", "total")


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage; a stage that did not run (inference of a
    rejected capture) reports 0. ``total`` is from capture to message, wall clock."""

    capture: float
    quality: float
    preprocess: float
    inference: float
    total: float

    def __post_init__(self) -> None:
        self._check("timings_ms")

    def _check(self, path: str) -> None:
        for stage in _STAGES:
            value = _number(getattr(self, stage), f"{path}.{stage}", 0.0)
            object.__setattr__(self, stage, value)

    def to_dict(self) -> dict[str, Any]:
        return {stage: getattr(self, stage) for stage in _STAGES}

    @classmethod
    def from_dict(cls, data: object, path: str = "timings_ms") -> Timings:
        obj = _object(data, path)
        values = [_number(_required(obj, s, f"{path}."), f"{path}.{s}", 0.0) for s in _STAGES]
        return cls(*values)


# --- the message -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Identification:
    """One identification as published on ``.../identification`` (see the module docstring).

    Construction validates every field and the consistency between ``status``,
    ``label``, ``score`` and ``top_k``, raising MessageError that names the field.
    """

    device: str
    station: str
    seq: int
    captured_at: datetime
    label: str | None
    score: float | None
    top_k: tuple[Candidate, ...]
    status: Status
    model: ModelRef
    image: ImageRef
    timings_ms: Timings
    quality: Quality | None = None
    reason: str | None = None
    version: int = MESSAGE_VERSION

    def __post_init__(self) -> None:
        _version(self.version)
        _segment(self.device, "device")
        _segment(self.station, "station")
        _integer(self.seq, "seq", 0, MAX_SEQ)
        object.__setattr__(self, "captured_at", _utc(self.captured_at, "captured_at"))
        object.__setattr__(self, "status", _status(self.status))
        if self.label is not None:
            _string(self.label, "label", MAX_LABEL_CHARS)
        if self.score is not None:
            object.__setattr__(self, "score", _number(self.score, "score", 0.0, 1.0))
        if not isinstance(self.top_k, tuple | list):
            raise _fail(f"top_k must be a list, got {_typename(self.top_k)}")
        object.__setattr__(self, "top_k", tuple(self.top_k))
        for i, candidate in enumerate(self.top_k):
            _part(candidate, Candidate, f"top_k[{i}]")
        _part(self.model, ModelRef, "model")
        _part(self.image, ImageRef, "image")
        _part(self.timings_ms, Timings, "timings_ms")
        if self.quality is not None:
            _part(self.quality, Quality, "quality")
        if self.reason is not None:
            _string(self.reason, "reason", MAX_TEXT_CHARS)
        self._check_ranking()
        self._check_status()

    def _check_ranking(self) -> None:
        top = self.top_k
        seen: dict[str, int] = {}
        for i, candidate in enumerate(top):
            if candidate.label in seen:
                first = seen[candidate.label]
                raise _fail(f"top_k[{i}].label {show(candidate.label)} repeats top_k[{first}]")
            seen[candidate.label] = i
            if i and candidate.score > top[i - 1].score:
                raise _fail(
                    f"top_k must be sorted by descending score, but top_k[{i}].score "
                    f"{show(candidate.score)} > top_k[{i - 1}].score {top[i - 1].score!r}"
                )

    def _check_status(self) -> None:
        top = self.top_k
        status = self.status.value
        if self.status is Status.REJECTED:
            if self.label is not None:
                raise _fail(f"label must be null when status is rejected, got {show(self.label)}")
            if self.score is not None:
                raise _fail(f"score must be null when status is rejected, got {show(self.score)}")
            if top:
                raise _fail(f"top_k must be empty when status is rejected, got {len(top)} entries")
            return
        if not top:
            raise _fail(f"top_k must have at least one entry when status is {status}")
        if self.score is None:
            raise _fail(f"score must be a number when status is {status}, got null")
        if abs(self.score - top[0].score) > _SCORE_TOLERANCE:
            raise _fail(f"score {show(self.score)} must equal top_k[0].score {show(top[0].score)}")
        if self.status is Status.OK:
            if self.label is None:
                raise _fail("label must not be null when status is ok")
            if self.label != top[0].label:
                raise _fail(
                    f"label {show(self.label)} must equal top_k[0].label {show(top[0].label)} "
                    "when status is ok"
                )
        elif self.label is not None:
            raise _fail(f"label must be null when status is uncertain, got {show(self.label)}")

    @property
    def key(self) -> tuple[str, int]:
        """The message's identity, ``(device, seq)``: equal keys are the same message."""
        return (self.device, self.seq)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form; optional fields that are unknown are left out."""
        out: dict[str, Any] = {
            "version": self.version,
            "device": self.device,
            "station": self.station,
            "seq": self.seq,
            "captured_at": _format_time(self.captured_at),
            "status": self.status.value,
            "label": self.label,
            "score": self.score,
            "top_k": [c.to_dict() for c in self.top_k],
            "model": self.model.to_dict(),
            "image": self.image.to_dict(),
            "timings_ms": self.timings_ms.to_dict(),
        }
        if self.quality is not None:
            out["quality"] = self.quality.to_dict()
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with sorted keys: equal messages give equal bytes."""
        return json.dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode("utf-8")

    @classmethod
    def from_dict(cls, data: object) -> Identification:
        """Parse a decoded payload; fields this version does not know are ignored."""
        obj = _object(data, "the payload")
        _version(_required(obj, "version", ""))
        status = _status(_required(obj, "status", ""))
        label = _required(obj, "label", "")
        score = _required(obj, "score", "")
        if label is not None:
            label = _string(label, "label", MAX_LABEL_CHARS)
        if score is not None:
            score = _number(score, "score", 0.0, 1.0)
        raw_top = _required(obj, "top_k", "")
        if not isinstance(raw_top, list):
            raise _fail(f"top_k must be a list, got {_got(raw_top)}")
        top_k = tuple(Candidate.from_dict(c, f"top_k[{i}]") for i, c in enumerate(raw_top))
        quality = None
        if "quality" in obj:
            quality = Quality.from_dict(obj["quality"])
        reason = None
        if "reason" in obj:
            reason = _string(obj["reason"], "reason", MAX_TEXT_CHARS)
        return cls(
            version=obj["version"],
            device=_segment(_required(obj, "device", ""), "device"),
            station=_segment(_required(obj, "station", ""), "station"),
            seq=_integer(_required(obj, "seq", ""), "seq", 0, MAX_SEQ),
            captured_at=_timestamp(_required(obj, "captured_at", ""), "captured_at"),
            status=status,
            label=label,
            score=score,
            top_k=top_k,
            model=ModelRef.from_dict(_required(obj, "model", "")),
            image=ImageRef.from_dict(_required(obj, "image", "")),
            timings_ms=Timings.from_dict(_required(obj, "timings_ms", "")),
            quality=quality,
            reason=reason,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Identification:
        """Parse a received payload; any defect raises MessageError, never a library error."""
        if not isinstance(data, bytes | bytearray | str):
            raise _fail(f"payload must be bytes or str, got {_typename(data)}")
        try:
            decoded = load_json(data, max_bytes=MAX_PAYLOAD_BYTES)
        except RejectedValueError as exc:
            raise _fail(f"payload {exc}") from None
        return cls.from_dict(decoded)


def _status(value: object) -> Status:
    if isinstance(value, str) and value in Status.__members__.values():
        return Status(value)
    names = ", ".join(s.value for s in Status)
    raise _fail(f"status must be one of {names}, got {show(value)}")


def _version(value: object) -> int:
    supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"version must be an integer (supported: {supported}), got {show(value)}")
    if value not in SUPPORTED_VERSIONS:
        raise _fail(
            f"version {value} is not supported by this reader (supported: {supported}); "
            "upgrade fieldscope to read it"
        )
    return value


def _part(
    value: object, cls: type[Candidate | ModelRef | ImageRef | Quality | Timings], path: str
) -> None:
    # Parts validated themselves when they were made; only their type is left to check.
    if not isinstance(value, cls):
        raise _fail(f"{path} must be a {cls.__name__}, got {_got(value)}")


# --- building a message from a prediction ----------------------------------------------------


class Prediction(Protocol):
    """What the classifier decided for one image (``fieldscope.edge.classify.Prediction``
    fits): the message carries that decision and never re-derives it."""

    @property
    def label(self) -> str | None: ...
    @property
    def score(self) -> float: ...
    @property
    def top_k(self) -> Sequence[tuple[str, float]]: ...
    @property
    def status(self) -> str: ...


def build_identification(
    *,
    device: str,
    station: str,
    seq: int,
    captured_at: datetime,
    prediction: Prediction,
    model: ModelRef,
    image: ImageRef,
    timings: Timings,
    quality: Quality | None = None,
    reason: str | None = None,
) -> Identification:
    """The message for a classified capture, from the classifier's prediction.

    Status, label and top-k are the classifier's (it owns the threshold); scores are
    rounded to 6 decimals and timings to the microsecond, which keeps payloads short
    and cannot reorder ``top_k``. An uncertain prediction without a ``reason`` gets
    one that states the top score.
    """
    top_k = tuple(
        Candidate(str(label), round(float(score), 6)) for label, score in prediction.top_k
    )
    status = _status(prediction.status)
    score = round(float(prediction.score), 6)
    if reason is None and status is Status.UNCERTAIN:
        reason = f"top score {score:.3f} is below the model's threshold"
    return Identification(
        device=device,
        station=station,
        seq=seq,
        captured_at=captured_at,
        status=status,
        label=prediction.label,
        score=score,
        top_k=top_k,
        model=model,
        image=image,
        timings_ms=_rounded(timings),
        quality=quality,
        reason=reason,
    )


def build_rejection(
    *,
    device: str,
    station: str,
    seq: int,
    captured_at: datetime,
    reason: str,
    model: ModelRef,
    image: ImageRef,
    timings: Timings,
    quality: Quality | None = None,
) -> Identification:
    """The message for a capture the quality gate turned away before inference.

    It is still published, so subscribers see that the station is working and why
    it produced no label (``reason``, e.g. ``"too blurry: sharpness 12.0 < 50.0"``).
    """
    return Identification(
        device=device,
        station=station,
        seq=seq,
        captured_at=captured_at,
        status=Status.REJECTED,
        label=None,
        score=None,
        top_k=(),
        model=model,
        image=image,
        timings_ms=_rounded(timings),
        quality=quality,
        reason=reason,
    )


def _rounded(timings: Timings) -> Timings:
    return Timings(*(round(getattr(timings, stage), 3) for stage in _STAGES))


# --- the shipped JSON Schema -----------------------------------------------------------------


def schema_path() -> Path:
    """Where the installed package keeps identification.schema.json.

    For tools that want a file (a collector validating with jsonschema, a
    deployment copying it next to a dashboard). Use ``load_schema()`` when the
    package may be imported from a zip archive.
    """
    resource = resources.files("fieldscope.edge").joinpath("schemas", SCHEMA_FILENAME)
    if not isinstance(resource, Path):
        raise FieldscopeError(
            f"the identification schema is inside an archive ({resource}), not a file; "
            "use fieldscope.edge.message.load_schema()"
        )
    if not resource.is_file():
        raise FieldscopeError(
            f"the identification schema is missing from the installed package ({resource}); "
            "reinstall fieldscope"
        )
    return resource


def load_schema() -> dict[str, Any]:
    """The identification JSON Schema (draft 2020-12) as a dict."""
    resource = resources.files("fieldscope.edge").joinpath("schemas", SCHEMA_FILENAME)
    try:
        schema: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FieldscopeError(
            f"cannot read the identification schema from the installed package: {exc}; "
            "reinstall fieldscope"
        ) from exc
    return schema
