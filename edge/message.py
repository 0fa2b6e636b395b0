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
  ``image.upload_sha256``, ``image.source_name``, ``reason``, ``object``,
  ``segmentation``, ``site``, ``sample``) are omitted when unknown, never null.
* **Site and sample** (:mod:`fieldscope.edge.site`): the station's ``[site]`` (WGS84
  coordinates, depth or elevation, country, locality) and the sample current when the
  message was stored (started and ended by the ``sample`` command).
* **Objects** (a station with ``[objects] mode = "segment"``): one message per object
  of a frame, with the ``object`` and ``segmentation`` parts; a frame without objects
  is one ``rejected`` message with reason ``"no objects"`` and ``segmentation`` only
  (see :mod:`fieldscope.edge.message_objects`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol

from msgspec import Meta

from fieldscope.edge.errors import FieldscopeError, MessageError
from fieldscope.edge.message_objects import ObjectRef, SegmentationSummary
from fieldscope.edge.site import Sample, Site
from fieldscope.edge.topics import MAX_SEGMENT_BYTES, segment_problem, show
from fieldscope.edge.wire import (
    TIMESTAMP_PATTERN,
    Sha256,
    WireStruct,
    version_problem,
)

__all__ = [
    "MAX_SEQ",
    "MESSAGE_VERSION",
    "SCHEMA_FILENAME",
    "SUPPORTED_VERSIONS",
    "Candidate",
    "Identification",
    "ImageRef",
    "ModelRef",
    "ObjectRef",
    "Prediction",
    "Quality",
    "Sample",
    "SegmentationSummary",
    "Site",
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
# Scores equal to the top candidate's within float noise count as equal.
_SCORE_TOLERANCE = 1e-9
_BLANK = {"must": "not be empty or blank"}


class Status(StrEnum):
    """What the station concluded about one capture."""

    OK = "ok"
    UNCERTAIN = "uncertain"
    REJECTED = "rejected"


# --- the field types: each constraint is stated once, for decoding, checks and the schema ---


Label = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL_CHARS, pattern=r"\S", extra=_BLANK)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"\S", extra=_BLANK)]
Text = Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS, pattern=r"\S", extra=_BLANK)]
PathText = Annotated[
    str, Meta(min_length=1, max_length=MAX_PATH_CHARS, pattern=r"\S", extra=_BLANK)
]
Probability = Annotated[float, Meta(ge=0, le=1)]
Duration = Annotated[float, Meta(ge=0)]
Side = Annotated[int, Meta(ge=1, le=MAX_IMAGE_SIDE)]
# A topic level: segment_problem() checks it (in UTF-8 bytes); the schema says it in characters.
Segment = Annotated[
    str,
    Meta(
        extra_json_schema={
            "minLength": 1,
            "maxLength": MAX_SEGMENT_BYTES,
            "allOf": [
                {"not": {"pattern": "[/+#\\u0000-\\u001f\\u007f-\\u009f]"}},
                {"not": {"pattern": "^\\$"}},
            ],
        },
    ),
]
UtcTime = Annotated[
    datetime, Meta(extra_json_schema={"format": "date-time", "pattern": TIMESTAMP_PATTERN})
]
Version = Annotated[int, Meta(extra_json_schema={"const": MESSAGE_VERSION})]


def _doc(text: str) -> Meta:
    """A field's description in the generated JSON Schema."""
    return Meta(description=text)


class _Part(WireStruct, frozen=True):
    _error: ClassVar[type[FieldscopeError]] = MessageError
    _prefix: ClassVar[str] = "identification message: "


class Candidate(_Part, frozen=True):
    """One entry of ``top_k``: a label and the model's score for it."""

    _where: ClassVar[str] = "candidate"

    label: Label
    score: Probability


class ModelRef(_Part, frozen=True):
    """Which model produced the identification: the bundle's name and version, and
    the SHA-256 of its ``model.tflite`` (as listed in the bundle manifest), which
    tells two builds with the same version apart."""

    _where: ClassVar[str] = "model"

    name: Name
    version: Name
    sha256: Annotated[
        Sha256, _doc("SHA-256 of the bundle's model.tflite, as listed in its manifest.")
    ]


class ImageRef(_Part, frozen=True):
    """The captured frame: SHA-256 of its encoded bytes, its size, where the station
    archived it (a path on the station) when it keeps images, the SHA-256 of the copy it
    publishes on the ``image`` topic when its ``[upload]`` policy chose this frame (the
    key the collector stores it under), and the original file's name for frames read
    from files (folder and replay cameras)."""

    _where: ClassVar[str] = "image"
    _omit_none: ClassVar[frozenset[str]] = frozenset(
        {"archived_path", "upload_sha256", "source_name"}
    )

    sha256: Annotated[Sha256, _doc("SHA-256 of the encoded image bytes.")]
    width: Side
    height: Side
    archived_path: Annotated[
        PathText | None,
        _doc(
            "Where the station archived the image (a path on the station); omitted when it keeps "
            "none."
        ),
    ] = None
    upload_sha256: Annotated[
        Sha256 | None,
        _doc(
            "SHA-256 of the image published on the image topic (.../image/<sha256>), a bounded "
            "JPEG or PNG copy of the frame; the collector stores it under this key. Omitted "
            "when the station's [upload] policy did not choose the frame."
        ),
    ] = None
    source_name: Annotated[
        Name | None,
        _doc(
            "The original file name of a frame read from a file (folder or replay camera); "
            "omitted for camera frames."
        ),
    ] = None


class Quality(_Part, frozen=True):
    """Measurements of the quality gate, each optional.

    ``sharpness`` is the variance of the Laplacian of the grey frame (>= 0; higher is
    sharper); ``exposure`` is the mean brightness as a fraction of full scale (0..1).
    """

    _where: ClassVar[str] = "quality"
    _omit_none: ClassVar[frozenset[str]] = frozenset({"sharpness", "exposure"})

    sharpness: Annotated[
        Duration | None, _doc("Variance of the Laplacian of the grey frame; higher is sharper.")
    ] = None
    exposure: Annotated[
        Probability | None, _doc("Mean brightness as a fraction of full scale.")
    ] = None


_STAGES = ("capture", "quality", "preprocess", "inference", "total")


class Timings(_Part, frozen=True):
    """Milliseconds spent per stage; a stage that did not run (inference of a
    rejected capture) reports 0. ``total`` is from capture to message, wall clock."""

    _where: ClassVar[str] = "timings_ms"

    capture: Duration
    quality: Duration
    preprocess: Duration
    inference: Duration
    total: Duration


# --- the message -----------------------------------------------------------------------------


class Identification(_Part, frozen=True, kw_only=True):
    """One identification as published on ``.../identification`` (see the module docstring).

    Construction validates every field and the consistency between ``status``,
    ``label``, ``score`` and ``top_k``, raising MessageError that names the field.
    """

    _omit_none: ClassVar[frozenset[str]] = frozenset(
        {"quality", "reason", "object", "segmentation", "site", "sample"}
    )
    _required: ClassVar[tuple[str, ...]] = ("version",)

    version: Annotated[Version, _doc("Major version of this message format.")] = MESSAGE_VERSION
    device: Annotated[
        Segment,
        _doc("The device's name, the last-but-one level of the topic; unique in the fleet."),
    ]
    station: Annotated[Segment, _doc("The station (site) the device belongs to, a topic level.")]
    seq: Annotated[
        int,
        Meta(ge=0, le=MAX_SEQ),
        _doc(
            "Sequence number of this device's messages: grows by one per message and survives "
            "restarts. At most 2^53-1 so JavaScript reads it exactly."
        ),
    ]
    captured_at: Annotated[
        UtcTime,
        _doc(
            "When the frame was captured, in UTC, e.g. 2026-11-23T18:39:00.123456Z (writers always"
            " send 6 fraction digits; readers accept 0 to 6)."
        ),
    ]
    status: Annotated[
        Status,
        _doc(
            "ok: label is the model's answer; uncertain: the top score was below the model's "
            "threshold; rejected: the capture failed the quality gate and no inference ran."
        ),
    ]
    label: Annotated[Label | None, _doc("The identified species; null unless status is ok.")]
    score: Annotated[
        Probability | None, _doc("The model's score for top_k[0]; null when status is rejected.")
    ]
    top_k: Annotated[
        tuple[Candidate, ...],
        _doc("The best-scoring labels, by descending score; empty when status is rejected."),
    ]
    model: Annotated[ModelRef, _doc("The bundle that produced this identification.")]
    image: Annotated[ImageRef, _doc("The captured frame.")]
    timings_ms: Annotated[
        Timings,
        _doc(
            "Milliseconds per stage; a stage that did not run reports 0. total is capture to "
            "message, wall clock."
        ),
    ]
    quality: Annotated[
        Quality | None, _doc("Measurements of the quality gate; each member is optional.")
    ] = None
    reason: Annotated[
        Text | None, _doc("Why the status is uncertain or rejected, in words for a person.")
    ] = None
    object: Annotated[
        ObjectRef | None,
        _doc(
            "A segmenting station's object: its frame, place, box and measurements in µm; "
            "omitted when the frame is the specimen."
        ),
    ] = None
    segmentation: Annotated[
        SegmentationSummary | None,
        _doc(
            "A segmenting station's counts for the object's frame; on every object message, "
            "and alone on the rejected 'no objects' message of a frame without objects."
        ),
    ] = None
    site: Annotated[
        Site | None,
        _doc("Where the station is (its [site]); omitted when it has none configured."),
    ] = None
    sample: Annotated[
        Sample | None,
        _doc("The sample current when the message was stored; omitted between samples."),
    ] = None

    def problems(self) -> list[tuple[str, str]]:
        """Topic levels, the ranking of ``top_k`` and what ``status`` allows."""
        problems = [
            (name, f"{problem} (it is a level of the MQTT topic), got {show(value)}")
            for name, value in (("device", self.device), ("station", self.station))
            if (problem := segment_problem(value)) is not None
        ]
        return (
            problems + self._ranking_problems() + self._status_problems() + self._object_problems()
        )

    def _object_problems(self) -> list[tuple[str, str]]:
        obj, summary = self.object, self.segmentation
        if obj is None:
            return []
        if self.status is Status.REJECTED:
            return [("object", "must be absent when status is rejected (objects are classified)")]
        if summary is not None and obj.count != summary.kept:
            return [
                ("object.count", f"must equal segmentation.kept ({summary.kept}), got {obj.count}")
            ]
        return []

    def _ranking_problems(self) -> list[tuple[str, str]]:
        top = self.top_k
        seen: dict[str, int] = {}
        for i, candidate in enumerate(top):
            if candidate.label in seen:
                first = seen[candidate.label]
                return [(f"top_k[{i}].label", f"{show(candidate.label)} repeats top_k[{first}]")]
            seen[candidate.label] = i
            if i and candidate.score > top[i - 1].score:
                order = f"top_k[{i}].score {show(candidate.score)} > top_k[{i - 1}].score"
                return [
                    (
                        "top_k",
                        f"must be sorted by descending score, but {order} {top[i - 1].score!r}",
                    )
                ]
        return []

    def _status_problems(self) -> list[tuple[str, str]]:
        top, label, score, status = self.top_k, self.label, self.score, self.status.value
        if self.status is Status.REJECTED:
            problems = []
            if label is not None:
                problems.append(
                    ("label", f"must be null when status is rejected, got {show(label)}")
                )
            if score is not None:
                problems.append(
                    ("score", f"must be null when status is rejected, got {show(score)}")
                )
            if top:
                problems.append(
                    ("top_k", f"must be empty when status is rejected, got {len(top)} entries")
                )
            return problems
        if not top:
            return [("top_k", f"must have at least one entry when status is {status}")]
        if score is None:
            return [("score", f"must be a number when status is {status}, got null")]
        problems = []
        if abs(score - top[0].score) > _SCORE_TOLERANCE:
            problems.append(
                ("score", f"{show(score)} must equal top_k[0].score {show(top[0].score)}")
            )
        if self.status is Status.UNCERTAIN and label is not None:
            problems.append(("label", f"must be null when status is uncertain, got {show(label)}"))
        elif self.status is Status.OK and label is None:
            problems.append(("label", "must not be null when status is ok"))
        elif self.status is Status.OK and label != top[0].label:
            problems.append(
                (
                    "label",
                    f"{show(label)} must equal top_k[0].label {show(top[0].label)} "
                    "when status is ok",
                )
            )
        return problems

    @classmethod
    def _precheck(cls, data: dict[str, Any]) -> None:
        if "version" in data and (problem := version_problem(data["version"], SUPPORTED_VERSIONS)):
            raise cls._fail(problem)

    @property
    def key(self) -> tuple[str, int]:
        """The message's identity, ``(device, seq)``: equal keys are the same message."""
        return (self.device, self.seq)


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
    object_ref: ObjectRef | None = None,
    segmentation: SegmentationSummary | None = None,
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
        object=object_ref,
        segmentation=segmentation,
    )


def _status(value: str) -> Status:
    try:
        return Status(value)
    except ValueError:
        names = ", ".join(s.value for s in Status)
        raise MessageError(
            f"identification message: status must be one of {names}, got {show(value)}"
        ) from None


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
    segmentation: SegmentationSummary | None = None,
) -> Identification:
    """The message for a capture the quality gate turned away before inference (or, with
    ``segmentation``, a segmented frame without objects).

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
        segmentation=segmentation,
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
