"""The identification message: what every subscriber parses, and the schema third parties use."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from fieldscope.edge.classify import Prediction as ClassifierPrediction
from fieldscope.edge.errors import MessageError
from fieldscope.edge.message import (
    MAX_SEQ,
    MESSAGE_VERSION,
    SUPPORTED_VERSIONS,
    Candidate,
    Identification,
    ImageRef,
    ModelRef,
    Quality,
    SegmentationSummary,
    Status,
    Timings,
    build_identification,
    build_rejection,
    load_schema,
    schema_path,
)

REPO = Path(__file__).resolve().parents[1]
DOCS_SCHEMA = REPO / "docs" / "identification.schema.json"
WIRE = REPO / "tests" / "data" / "wire"
MODEL_SHA = hashlib.sha256(b"model.tflite").hexdigest()
IMAGE_SHA = hashlib.sha256(b"frame.png").hexdigest()
DELETE = object()


def ok_payload() -> dict[str, Any]:
    """A valid payload with every optional field, as a station publishes it."""
    return {
        "version": 1,
        "device": "scope-a",
        "station": "pond-3",
        "seq": 42,
        "captured_at": "2026-11-23T18:39:00.123456Z",
        "status": "ok",
        "label": "Paramecium",
        "score": 0.91,
        "top_k": [
            {"label": "Paramecium", "score": 0.91},
            {"label": "Euglena", "score": 0.06},
            {"label": "Amoeba", "score": 0.03},
        ],
        "model": {"name": "protists-mnv2", "version": "1.2.0", "sha256": MODEL_SHA},
        "image": {
            "sha256": IMAGE_SHA,
            "width": 1280,
            "height": 960,
            "archived_path": "archive/2026-11-23/000042.png",
        },
        "quality": {"sharpness": 153.2, "exposure": 0.46},
        "reason": "manual test",
        "timings_ms": {
            "capture": 35.1,
            "quality": 2.4,
            "preprocess": 11.8,
            "inference": 3.2,
            "total": 55.0,
        },
    }


def object_payload() -> dict[str, Any]:
    """An ok payload of a segmenting station: object 1 of 2 of a frame, with the summary."""
    p = ok_payload()
    p["object"] = {
        "frame_id": IMAGE_SHA,
        "index": 1,
        "count": 2,
        "bbox": [412, 305, 88, 61],
        "touches_border": False,
        "measurements": {
            "area_px": 4012,
            "area_um2": 10270.72,
            "esd_um": 114.35,
            "perimeter_um": 412.6,
            "major_axis_um": 140.2,
            "minor_axis_um": 93.4,
            "eccentricity": 0.746,
            "solidity": 0.962,
            "mean_intensity": 87.3,
        },
    }
    p["segmentation"] = {
        "found": 4,
        "kept": 2,
        "rejected_by_size": 1,
        "touching_border": 1,
        "dropped_at_border": 1,
        "truncated": 0,
        "background_ready": True,
    }
    return p


def uncertain_payload() -> dict[str, Any]:
    p = ok_payload()
    p.update(status="uncertain", label=None, reason="top score 0.910 is below the threshold")
    return p


def rejected_payload() -> dict[str, Any]:
    p = ok_payload()
    p.update(status="rejected", label=None, score=None, top_k=[], reason="too blurry")
    p["timings_ms"].update(preprocess=0.0, inference=0.0)
    return p


def mutate(payload: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A deep copy of ``payload`` with ``path`` (``a.b``, ``top_k[2].score``) set or deleted."""
    out = copy.deepcopy(payload)
    keys: list[str | int] = []
    for part in path.split("."):
        name, *indexes = re.split(r"\[(\d+)\]", part)
        keys.append(name)
        keys.extend(int(i) for i in indexes if i)
    target: Any = out
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return out


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    checker = Draft202012Validator.FORMAT_CHECKER
    assert "date-time" in checker.checkers, "install rfc3339-validator (jsonschema[format])"
    return Draft202012Validator(schema, format_checker=checker)


def sample() -> Identification:
    return Identification.from_dict(ok_payload())


# --- round trip ------------------------------------------------------------------------------


def test_json_round_trip_gives_an_equal_message_and_stable_bytes() -> None:
    message = sample()
    data = message.to_json()
    assert isinstance(data, bytes)
    assert Identification.from_json(data) == message
    assert Identification.from_json(data.decode()) == message
    assert message.to_json() == data
    assert Identification.from_json(data).to_json() == data
    # Compact, sorted keys: what a subscriber hashing payloads for dedup relies on.
    assert (
        data
        == json.dumps(
            json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )


def test_dict_round_trip_keeps_every_field() -> None:
    payload = ok_payload()
    assert sample().to_dict() == payload


def test_non_ascii_text_travels_as_utf8() -> None:
    payload = mutate(ok_payload(), "label", "Navícula µ")
    payload["top_k"][0]["label"] = "Navícula µ"
    data = Identification.from_dict(payload).to_json()
    assert "Navícula µ".encode() in data
    assert Identification.from_json(data).label == "Navícula µ"


def test_optional_fields_are_omitted_never_null() -> None:
    payload = ok_payload()
    for key in ("quality", "reason"):
        del payload[key]
    del payload["image"]["archived_path"]
    message = Identification.from_dict(payload)
    assert message.quality is None
    assert message.reason is None
    assert message.image.archived_path is None
    out = message.to_dict()
    assert "quality" not in out
    assert "reason" not in out
    assert "archived_path" not in out["image"]


def test_the_upload_key_and_source_name_are_optional_and_checked() -> None:
    payload = ok_payload()
    payload["image"]["upload_sha256"] = "c" * 64
    payload["image"]["source_name"] = "sample-0042.png"
    message = Identification.from_dict(payload)
    assert (message.image.upload_sha256, message.image.source_name) == (
        "c" * 64,
        "sample-0042.png",
    )
    assert Identification.from_json(message.to_json()) == message
    assert not list(Draft202012Validator(load_schema()).iter_errors(message.to_dict()))
    payload["image"]["upload_sha256"] = "C" * 64
    with pytest.raises(MessageError, match=r"image\.upload_sha256"):
        Identification.from_dict(payload)
    payload["image"]["upload_sha256"] = "c" * 64
    payload["image"]["source_name"] = ""
    with pytest.raises(MessageError, match=r"image\.source_name"):
        Identification.from_dict(payload)


def test_identity_is_device_and_seq() -> None:
    message = sample()
    assert message.key == ("scope-a", 42)
    resent = Identification.from_json(message.to_json())
    assert resent.key == message.key
    assert hash(resent) == hash(message)


def test_integer_scores_and_timings_equal_their_float_form() -> None:
    payload = mutate(ok_payload(), "score", 1)
    payload["top_k"] = [{"label": "Paramecium", "score": 1}]
    payload["timings_ms"]["total"] = 55
    message = Identification.from_dict(payload)
    assert message.score == 1.0
    assert isinstance(message.score, float)
    assert isinstance(message.timings_ms.total, float)
    assert b'"score":1.0' in message.to_json()


# --- time ------------------------------------------------------------------------------------


def test_aware_times_are_converted_to_utc_and_written_with_z() -> None:
    base = sample()
    local = datetime(2026, 11, 23, 20, 39, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    message = Identification(**{**msgspec.structs.asdict(base), "captured_at": local})
    assert message.captured_at.utcoffset() == timedelta(0)
    assert message.captured_at == local
    assert message.to_dict()["captured_at"] == "2026-11-23T18:39:00.123456Z"


def test_whole_seconds_keep_six_fraction_digits_and_early_years_four_digits() -> None:
    base = sample()
    for when, text in [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000000Z"),
        (datetime(970, 1, 2, tzinfo=UTC), "0970-01-02T00:00:00.000000Z"),
    ]:
        message = Identification(**{**msgspec.structs.asdict(base), "captured_at": when})
        assert message.to_dict()["captured_at"] == text
        assert Identification.from_json(message.to_json()) == message


def test_naive_time_is_an_error_that_says_what_to_do() -> None:
    base = sample()
    with pytest.raises(MessageError, match=r"captured_at must be timezone-aware.*timezone\.utc"):
        Identification(
            **{**msgspec.structs.asdict(base), "captured_at": datetime(2026, 11, 23, 18, 39)}
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23T18:39:00Z", datetime(2026, 11, 23, 18, 39, tzinfo=UTC)),
        ("2026-11-23T18:39:00.5Z", datetime(2026, 11, 23, 18, 39, 0, 500000, tzinfo=UTC)),
        ("2026-11-23T18:39:00.123Z", datetime(2026, 11, 23, 18, 39, 0, 123000, tzinfo=UTC)),
    ],
)
def test_readers_accept_zero_to_six_fraction_digits(text: str, expected: datetime) -> None:
    message = Identification.from_dict(mutate(ok_payload(), "captured_at", text))
    assert message.captured_at == expected


# --- validation: each rule names the field --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("version", 2, "version 2 is not supported by this reader (supported: 1)"),
        ("version", True, "version must be an integer (supported: 1), got True"),
        ("version", DELETE, "version is required"),
        ("device", "", "device must not be empty"),
        ("device", "a/b", "device must not contain '/'"),
        ("device", "a+b", "device must not contain '+'"),
        ("device", "#", "device must not contain '#'"),
        ("device", "$dev", "device must not start with '$'"),
        ("device", "d\x00", "device must not contain control characters"),
        ("device", "x" * 129, "device must be at most 128 bytes in UTF-8"),
        ("device", 5, "device must be a string"),
        ("station", "st/1", "station must not contain '/'"),
        ("station", DELETE, "station is required"),
        ("seq", -1, "seq must be between 0 and 9007199254740991, got -1"),
        ("seq", 2**53, "seq must be between 0 and 9007199254740991"),
        ("seq", 1.5, "seq must be an integer, got float 1.5"),
        ("seq", "7", "seq must be an integer, got str '7'"),
        ("seq", True, "seq must be an integer, got bool True"),
        ("captured_at", "2026-11-23T18:39:00+00:00", "captured_at must be a UTC time like"),
        ("captured_at", "2026-11-23 18:39:00Z", "captured_at must be a UTC time like"),
        ("captured_at", "2026-11-23T18:39:00.1234567Z", "at most 6 fraction digits"),
        ("captured_at", "2026-13-01T00:00:00Z", "captured_at must be a UTC time like"),
        ("captured_at", "2026-02-30T00:00:00Z", "captured_at is not a valid date and time"),
        ("captured_at", "2026-11-23T18:39:00Z\n", "captured_at must be a UTC time like"),
        ("captured_at", 1764000000, "captured_at must be a UTC time like"),
        ("status", "OK", "status must be one of ok, uncertain, rejected, got 'OK'"),
        ("status", None, "status must be one of ok, uncertain, rejected, got None"),
        ("label", "", "label must not be empty or blank"),
        ("label", "   ", "label must not be empty or blank"),
        ("label", 5, "label must be a string or null, got int 5"),
        ("label", DELETE, "label is required"),
        ("label", None, "label must not be null when status is ok"),
        ("score", 1.7, "score must be between 0 and 1, got 1.7"),
        ("score", -0.1, "score must be between 0 and 1, got -0.1"),
        ("score", "0.9", "score must be a number or null, got str '0.9'"),
        ("score", True, "score must be a number or null, got bool True"),
        ("score", None, "score must be a number when status is ok, got null"),
        ("score", DELETE, "score is required"),
        ("top_k", [], "top_k must have at least one entry when status is ok"),
        ("top_k", "Paramecium", "top_k must be a list, got str"),
        ("top_k[2].score", 1.7, "top_k[2].score must be between 0 and 1, got 1.7"),
        ("top_k[0].label", "", "top_k[0].label must not be empty or blank"),
        ("top_k[1].score", DELETE, "top_k[1].score is required"),
        ("top_k[1]", "Euglena", "top_k[1] must be an object, got str"),
        ("model", "protists", "model must be an object, got str"),
        ("model.sha256", MODEL_SHA.upper(), "model.sha256 must be 64 lowercase hex digits"),
        ("model.sha256", MODEL_SHA[:10], "model.sha256 must be 64 lowercase hex digits"),
        ("model.name", DELETE, "model.name is required"),
        ("model.version", "", "model.version must not be empty"),
        ("image.width", 0, "image.width must be between 1 and 65535, got 0"),
        ("image.height", 70000, "image.height must be between 1 and 65535, got 70000"),
        ("image.width", 1.5, "image.width must be an integer, got float 1.5"),
        ("image.sha256", DELETE, "image.sha256 is required"),
        ("image.archived_path", "", "image.archived_path must not be empty"),
        ("image.archived_path", None, "image.archived_path must be a string, got null"),
        ("quality", "good", "quality must be an object, got str"),
        ("quality.sharpness", -1, "quality.sharpness must be >= 0, got -1"),
        ("quality.exposure", 1.5, "quality.exposure must be between 0 and 1, got 1.5"),
        ("quality.exposure", None, "quality.exposure must be a number, got null"),
        ("reason", "", "reason must not be empty"),
        ("reason", None, "reason must be a string, got null"),
        ("timings_ms", [], "timings_ms must be an object, got list"),
        ("timings_ms.total", -1, "timings_ms.total must be >= 0, got -1"),
        ("timings_ms.inference", "3", "timings_ms.inference must be a number, got str '3'"),
        ("timings_ms.capture", DELETE, "timings_ms.capture is required"),
    ],
)
def test_each_bad_field_is_rejected_by_name(path: str, value: object, expected: str) -> None:
    payload = mutate(ok_payload(), path, value)
    with pytest.raises(MessageError) as info:
        Identification.from_dict(payload)
    assert expected in str(info.value)
    # Through the wire as well: the same one-line error, never a library exception.
    with pytest.raises(MessageError, match=re.escape(expected)):
        Identification.from_json(json.dumps(payload))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            mutate(uncertain_payload(), "label", "Paramecium"),
            "label must be null when status is uncertain",
        ),
        (
            mutate(uncertain_payload(), "score", None),
            "score must be a number when status is uncertain",
        ),
        (
            mutate(uncertain_payload(), "top_k", []),
            "top_k must have at least one entry when status is uncertain",
        ),
        (
            mutate(rejected_payload(), "label", "Paramecium"),
            "label must be null when status is rejected",
        ),
        (
            mutate(rejected_payload(), "score", 0.5),
            "score must be null when status is rejected, got 0.5",
        ),
        (mutate(ok_payload(), "status", "rejected"), "label must be null when status is rejected"),
        (
            mutate(rejected_payload(), "top_k", [{"label": "Amoeba", "score": 0.5}]),
            "top_k must be empty when status is rejected, got 1 entries",
        ),
    ],
)
def test_status_decides_what_label_score_and_top_k_may_be(
    payload: dict[str, Any], expected: str
) -> None:
    with pytest.raises(MessageError, match=re.escape(expected)):
        Identification.from_dict(payload)


# Rules JSON Schema cannot state; the schema's description lists them for third parties.
DATACLASS_ONLY = [
    pytest.param(
        mutate(ok_payload(), "label", "Euglena"),
        "label 'Euglena' must equal top_k[0].label 'Paramecium' when status is ok",
        id="ok-label-is-not-top1",
    ),
    pytest.param(
        mutate(ok_payload(), "score", 0.5),
        "score 0.5 must equal top_k[0].score 0.91",
        id="score-is-not-top1",
    ),
    pytest.param(
        mutate(ok_payload(), "top_k[2].score", 0.5),
        "top_k must be sorted by descending score, but top_k[2].score 0.5 > top_k[1].score 0.06",
        id="top-k-unsorted",
    ),
    pytest.param(
        mutate(ok_payload(), "top_k[2].label", "Euglena"),
        "top_k[2].label 'Euglena' repeats top_k[1]",
        id="top-k-repeated-label",
    ),
    pytest.param(
        mutate(ok_payload(), "device", "é" * 65),
        "device must be at most 128 bytes in UTF-8 (has 130)",
        id="device-130-bytes-in-65-characters",
    ),
    pytest.param(
        mutate(ok_payload(), "reason", "lone \ud800 surrogate"),
        "reason must be valid Unicode",
        id="lone-surrogate",
    ),
]


@pytest.mark.parametrize(("payload", "expected"), DATACLASS_ONLY)
def test_rules_beyond_the_schema_are_enforced_by_the_reader(
    payload: dict[str, Any], expected: str, validator: Draft202012Validator
) -> None:
    with pytest.raises(MessageError, match=re.escape(expected)):
        Identification.from_dict(payload)
    # If the schema learns to state one of these, move the row to the agreement table.
    assert validator.is_valid(payload)


def test_unknown_version_is_refused_before_anything_else() -> None:
    payload = {"version": 2, "completely": "different"}
    with pytest.raises(MessageError, match=r"version 2 is not supported .*\(supported: 1\)"):
        Identification.from_dict(payload)
    assert SUPPORTED_VERSIONS == (MESSAGE_VERSION,)


def test_unknown_fields_of_the_same_version_are_ignored() -> None:
    payload = ok_payload()
    payload["firmware"] = "2.0"
    payload["model"]["threshold"] = 0.6
    payload["top_k"][0]["logit"] = 4.1
    payload["quality"]["noise"] = 0.1
    assert Identification.from_dict(payload) == sample()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xfe", "payload is not UTF-8"),
        (b'{"version": 1', "payload is not JSON this reader accepts"),
        (b"[1, 2]", "the payload must be an object, got list"),
        (b"null", "the payload must be an object, got null"),
        (b'{"version": NaN}', "payload contains NaN, which is not a JSON number"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"seq": ' + b"9" * 5000 + b"}", "payload is not JSON this reader accepts"),
    ],
)
def test_broken_payloads_give_one_clear_error(data: bytes, expected: str) -> None:
    with pytest.raises(MessageError, match=re.escape(expected)):
        Identification.from_json(data)


def test_direct_construction_validates_too() -> None:
    base = sample()
    with pytest.raises(MessageError, match=r"candidate\.score must be between 0 and 1, got 1\.7"):
        Candidate("Amoeba", 1.7)
    bad_part = {"label": "x", "score": 1.7}  # a dict where a Candidate belongs is checked too
    with pytest.raises(MessageError, match=r"top_k\[1\]\.score must be between 0 and 1, got 1\.7"):
        Identification(**{**msgspec.structs.asdict(base), "top_k": (base.top_k[0], bad_part)})
    with pytest.raises(MessageError, match="seq must be between 0 and"):
        Identification(**{**msgspec.structs.asdict(base), "seq": -5})
    with pytest.raises(MessageError, match=r"timings_ms\.total must be a finite number, got nan"):
        Timings(1, 1, 1, 1, float("nan"))


# --- the schema agrees with the dataclass ----------------------------------------------------

GOOD = [
    pytest.param(ok_payload(), id="ok"),
    pytest.param(uncertain_payload(), id="uncertain"),
    pytest.param(rejected_payload(), id="rejected"),
    pytest.param(
        {k: v for k, v in ok_payload().items() if k not in {"quality", "reason"}},
        id="without-optional-fields",
    ),
    pytest.param(mutate(ok_payload(), "image.archived_path", DELETE), id="not-archived"),
    pytest.param(mutate(ok_payload(), "quality", {}), id="empty-quality"),
    pytest.param(mutate(ok_payload(), "firmware", "2.0"), id="unknown-top-level-field"),
    pytest.param(mutate(ok_payload(), "image.exif", {"iso": 100}), id="unknown-nested-field"),
    pytest.param(mutate(ok_payload(), "captured_at", "2026-11-23T18:39:00Z"), id="no-fraction"),
    pytest.param(mutate(ok_payload(), "device", "d" * 128), id="device-128-bytes"),
    pytest.param(mutate(ok_payload(), "device", "scope ä 1"), id="device-unicode-and-space"),
    pytest.param(mutate(ok_payload(), "seq", MAX_SEQ), id="largest-seq"),
]

BAD = [
    pytest.param(mutate(ok_payload(), path, value), id=f"{path}={value!r:.30}")
    for path, value in [
        ("version", 2),
        ("version", True),
        ("version", "1"),
        ("version", DELETE),
        ("device", ""),
        ("device", "a/b"),
        ("device", "a+b"),
        ("device", "a#"),
        ("device", "$dev"),
        ("device", "d\x00"),
        ("device", "d\n"),
        ("device", "d\x85"),
        ("device", "x" * 129),
        ("device", 5),
        ("station", "st/1"),
        ("station", DELETE),
        ("seq", -1),
        ("seq", 1.5),
        ("seq", "7"),
        ("seq", True),
        ("seq", 2**53),
        ("seq", DELETE),
        ("captured_at", "2026-11-23T18:39:00+00:00"),
        ("captured_at", "2026-11-23 18:39:00Z"),
        ("captured_at", "2026-11-23T18:39:00.1234567Z"),
        ("captured_at", "2026-13-01T00:00:00Z"),
        ("captured_at", "2026-02-30T00:00:00Z"),
        ("captured_at", "2026-11-23T18:39:60Z"),
        ("captured_at", "2026-11-23T18:39:00Z\n"),
        ("captured_at", 1764000000),
        ("captured_at", DELETE),
        ("status", "OK"),
        ("status", "maybe"),
        ("status", None),
        ("status", DELETE),
        ("label", ""),
        ("label", "   "),
        ("label", 5),
        ("label", "x" * 201),
        ("label", None),
        ("label", DELETE),
        ("score", 1.7),
        ("score", -0.1),
        ("score", "0.9"),
        ("score", True),
        ("score", None),
        ("score", DELETE),
        ("top_k", []),
        ("top_k", "Paramecium"),
        ("top_k", DELETE),
        ("top_k[2].score", 1.7),
        ("top_k[0].label", ""),
        ("top_k[1].score", DELETE),
        ("top_k[1]", "Euglena"),
        ("model", "protists"),
        ("model", DELETE),
        ("model.sha256", MODEL_SHA.upper()),
        ("model.sha256", MODEL_SHA[:10]),
        ("model.sha256", MODEL_SHA + "\n"),
        ("model.name", DELETE),
        ("model.version", ""),
        ("image.width", 0),
        ("image.height", 70000),
        ("image.width", 1.5),
        ("image.sha256", DELETE),
        ("image.archived_path", ""),
        ("image.archived_path", None),
        ("quality", "good"),
        ("quality.sharpness", -1),
        ("quality.exposure", 1.5),
        ("quality.exposure", None),
        ("reason", ""),
        ("reason", None),
        ("timings_ms", []),
        ("timings_ms.total", -1),
        ("timings_ms.inference", "3"),
        ("timings_ms.capture", DELETE),
    ]
] + [
    pytest.param(mutate(uncertain_payload(), "label", "Paramecium"), id="uncertain-with-label"),
    pytest.param(mutate(uncertain_payload(), "score", None), id="uncertain-without-score"),
    pytest.param(mutate(uncertain_payload(), "top_k", []), id="uncertain-without-top-k"),
    pytest.param(mutate(rejected_payload(), "label", "Amoeba"), id="rejected-with-label"),
    pytest.param(mutate(rejected_payload(), "score", 0.5), id="rejected-with-score"),
    pytest.param(
        mutate(rejected_payload(), "top_k", [{"label": "Amoeba", "score": 0.5}]),
        id="rejected-with-top-k",
    ),
]


@pytest.mark.parametrize("payload", GOOD)
def test_schema_and_reader_accept_the_same_good_payloads(
    payload: dict[str, Any], validator: Draft202012Validator
) -> None:
    errors = [e.message for e in validator.iter_errors(payload)]
    assert errors == []
    Identification.from_dict(payload)


@pytest.mark.parametrize("payload", BAD)
def test_schema_and_reader_reject_the_same_bad_payloads(
    payload: dict[str, Any], validator: Draft202012Validator
) -> None:
    assert not validator.is_valid(payload)
    with pytest.raises(MessageError):
        Identification.from_dict(payload)


def test_schema_names_exactly_the_fields_a_writer_emits() -> None:
    schema = load_schema()
    props = schema["properties"]
    assert props["version"]["const"] == MESSAGE_VERSION
    minimal = rejected_payload()
    for key in ("quality", "reason"):
        del minimal[key]
    del minimal["image"]["archived_path"]
    assert sorted(schema["required"]) == sorted(Identification.from_dict(minimal).to_dict())
    with_site = json.loads((WIRE / "identification-site-sample-v1.json").read_bytes())
    uploaded = json.loads((WIRE / "identification-upload-v1.json").read_bytes())
    full = Identification.from_dict(
        {
            **object_payload(),
            "site": with_site["site"],
            "sample": with_site["sample"],
            "image": uploaded["image"],
        }
    ).to_dict()
    assert sorted(props) == sorted(full)
    defs = schema["$defs"]

    def resolved(node: dict[str, Any]) -> dict[str, Any]:
        return defs[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    parts = ("model", "image", "quality", "timings_ms", "object", "segmentation", "site", "sample")
    # A site is above or below the water, never both: the fixture writes depth_m.
    emitted = {part: set(full[part]) for part in parts}
    emitted["site"] |= {"elevation_m"}
    for part in parts:
        assert sorted(resolved(props[part])["properties"]) == sorted(emitted[part]), part
    assert sorted(resolved(props["timings_ms"])["required"]) == sorted(full["timings_ms"])
    candidate = resolved(props["top_k"]["items"])
    assert sorted(candidate["properties"]) == sorted(full["top_k"][0])


# --- building messages from predictions ------------------------------------------------------

MODEL = ModelRef("protists-mnv2", "1.2.0", MODEL_SHA)
IMAGE = ImageRef(IMAGE_SHA, 1280, 960)
TIMINGS = Timings(capture=35.1234567, quality=2.4, preprocess=11.8, inference=3.2, total=55.0)
WHEN = datetime(2026, 11, 23, 18, 39, tzinfo=UTC)


def classifier_prediction(probabilities: list[float], threshold: float) -> ClassifierPrediction:
    """What fieldscope.edge.classify returns, built the way the classifier builds it."""
    from fieldscope.edge.classify import top_k

    labels = ["Amoeba", "Euglena", "Paramecium"]
    probs = np.asarray(probabilities, dtype=np.float32)
    best = top_k(probs, labels, 3)
    confident = best[0][1] >= threshold
    return ClassifierPrediction(
        label=best[0][0] if confident else None,
        score=best[0][1],
        top_k=best,
        probabilities=probs,
        status="ok" if confident else "uncertain",
    )


@pytest.mark.parametrize(("threshold", "status"), [(0.5, Status.OK), (0.95, Status.UNCERTAIN)])
def test_build_identification_carries_the_classifiers_decision(
    threshold: float, status: Status, validator: Draft202012Validator
) -> None:
    prediction = classifier_prediction([0.03, 0.06, 0.91], threshold)
    message = build_identification(
        device="scope-a",
        station="pond-3",
        seq=7,
        captured_at=WHEN,
        prediction=prediction,
        model=MODEL,
        image=IMAGE,
        timings=TIMINGS,
        quality=Quality(sharpness=153.2, exposure=0.46),
    )
    assert message.status is status
    assert message.label == ("Paramecium" if status is Status.OK else None)
    # float32 noise is rounded away: 0.91 stays 0.91 on the wire.
    assert message.score == 0.91
    assert [(c.label, c.score) for c in message.top_k] == [
        ("Paramecium", 0.91),
        ("Euglena", 0.06),
        ("Amoeba", 0.03),
    ]
    assert message.timings_ms.capture == 35.123
    assert (message.reason is None) == (status is Status.OK)
    assert validator.is_valid(message.to_dict())
    assert Identification.from_json(message.to_json()) == message


def test_build_rejection_has_no_label_score_or_top_k(validator: Draft202012Validator) -> None:
    message = build_rejection(
        device="scope-a",
        station="pond-3",
        seq=8,
        captured_at=WHEN,
        reason="too blurry: sharpness 12.0 < 50.0",
        model=MODEL,
        image=IMAGE,
        timings=Timings(capture=30.0, quality=2.0, preprocess=0, inference=0, total=32.0),
        quality=Quality(sharpness=12.0),
    )
    out = message.to_dict()
    assert (out["status"], out["label"], out["score"], out["top_k"]) == ("rejected", None, None, [])
    assert out["reason"] == "too blurry: sharpness 12.0 < 50.0"
    assert out["quality"] == {"sharpness": 12.0}
    assert validator.is_valid(out)


def test_build_identification_refuses_an_inconsistent_prediction() -> None:
    prediction = classifier_prediction([0.03, 0.06, 0.91], 0.5)
    broken = ClassifierPrediction(
        label="Euglena",
        score=prediction.score,
        top_k=prediction.top_k,
        probabilities=prediction.probabilities,
        status="ok",
    )
    with pytest.raises(MessageError, match=r"label 'Euglena' must equal top_k\[0\]\.label"):
        build_identification(
            device="scope-a",
            station="pond-3",
            seq=9,
            captured_at=WHEN,
            prediction=broken,
            model=MODEL,
            image=IMAGE,
            timings=TIMINGS,
        )


# --- generated messages ----------------------------------------------------------------------

_segment = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#"),
    min_size=1,
    max_size=20,
).filter(lambda s: not s.startswith("$") and len(s.encode()) <= 128)
_label = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    str.strip
)
_ms = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@st.composite
def identifications(draw: st.DrawFn) -> Identification:
    status = draw(st.sampled_from(list(Status)))
    if status is Status.REJECTED:
        top: list[Candidate] = []
    else:
        labels = draw(st.lists(_label, min_size=1, max_size=5, unique=True))
        scores = sorted(
            draw(st.lists(st.floats(0, 1), min_size=len(labels), max_size=len(labels))),
            reverse=True,
        )
        top = [Candidate(label, score) for label, score in zip(labels, scores, strict=True)]
    return Identification(
        device=draw(_segment),
        station=draw(_segment),
        seq=draw(st.integers(0, MAX_SEQ)),
        captured_at=draw(
            st.datetimes(
                min_value=datetime(1, 1, 2),
                max_value=datetime(9999, 12, 30),
                timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))]),
            )
        ),
        status=status,
        label=top[0].label if status is Status.OK else None,
        score=top[0].score if top else None,
        top_k=tuple(top),
        model=ModelRef(draw(_label), draw(_label), MODEL_SHA),
        image=ImageRef(
            IMAGE_SHA,
            draw(st.integers(1, 65535)),
            draw(st.integers(1, 65535)),
            draw(st.none() | _label),
        ),
        timings_ms=Timings(*(draw(_ms) for _ in range(5))),
        quality=draw(
            st.none()
            | st.builds(
                Quality,
                st.none() | st.floats(0, 1e9),
                st.none() | st.floats(0, 1),
            )
        ),
        reason=draw(st.none() | _label),
    )


@settings(max_examples=150, deadline=None)
@given(message=identifications())
def test_every_valid_message_round_trips_and_matches_the_schema(
    message: Identification, validator: Draft202012Validator
) -> None:
    data = message.to_json()
    assert Identification.from_json(data) == message
    assert Identification.from_json(data).to_json() == data
    assert [e.message for e in validator.iter_errors(json.loads(data))] == []


# --- the shipped schema file -----------------------------------------------------------------


def test_schema_is_installed_with_the_package_and_equals_the_published_copy() -> None:
    path = schema_path()
    assert path.name == "identification.schema.json"
    assert path.is_file()
    assert path.read_bytes() == DOCS_SCHEMA.read_bytes()
    assert (REPO / "edge" / "schemas" / path.name).read_bytes() == DOCS_SCHEMA.read_bytes()
    assert load_schema() == json.loads(DOCS_SCHEMA.read_bytes())
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_the_example_in_the_docs_is_a_valid_message(validator: Draft202012Validator) -> None:
    text = (REPO / "docs" / "mqtt.md").read_text(encoding="utf-8")
    match = re.search(r"```json\n(.*?)```", text, re.DOTALL)
    assert match, "docs/mqtt.md lost its example payload"
    example = json.loads(match.group(1))
    assert validator.is_valid(example)
    message = Identification.from_dict(example)
    assert message.to_dict() == example


# --- a segmenting station's objects ----------------------------------------------------------


def test_an_object_message_round_trips_and_the_schema_accepts_it(
    validator: Draft202012Validator,
) -> None:
    payload = object_payload()
    message = Identification.from_dict(payload)
    assert message.object is not None
    assert message.object.bbox == (412, 305, 88, 61)
    assert message.object.measurements.esd_um == 114.35
    assert Identification.from_json(message.to_json()) == message
    assert [e.message for e in validator.iter_errors(payload)] == []


def test_a_frame_without_objects_is_a_rejection_carrying_the_summary(
    validator: Draft202012Validator,
) -> None:
    summary = object_payload()["segmentation"] | {"kept": 0, "dropped_at_border": 3}
    message = build_rejection(
        device="scope-a",
        station="pond-3",
        seq=7,
        captured_at=WHEN,
        reason="no objects",
        model=MODEL,
        image=IMAGE,
        timings=TIMINGS,
        segmentation=SegmentationSummary.from_dict(summary),
    )
    data = json.loads(message.to_json())
    assert data["status"] == "rejected"
    assert data["reason"] == "no objects"
    assert data["segmentation"]["kept"] == 0
    assert "object" not in data
    assert [e.message for e in validator.iter_errors(data)] == []


def test_frame_messages_carry_no_object_parts() -> None:
    data = sample().to_dict()
    assert "object" not in data
    assert "segmentation" not in data


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("object.index", 2, "object.index must be below count (2), got 2"),
        ("object.count", 3, "object.count must equal segmentation.kept (2), got 3"),
        ("object.bbox", [1, 2, 0, 4], "object.bbox[2] must be"),
        ("object.frame_id", "abc", "object.frame_id must be 64 lowercase hex digits"),
        ("object.measurements.eccentricity", 1.5, "object.measurements.eccentricity"),
        ("object.measurements.area_um2", -1.0, "object.measurements.area_um2"),
        ("object.touches_border", None, "object.touches_border"),
        ("segmentation.found", 1, "segmentation.found must be at least"),
        ("segmentation.kept", -1, "segmentation.kept"),
        ("status", "rejected", "must"),
    ],
)
def test_bad_object_fields_are_refused_by_name(path: str, value: object, expected: str) -> None:
    payload = mutate(object_payload(), path, value)
    if path == "status":
        payload.update(label=None, score=None, top_k=[])
    with pytest.raises(MessageError) as info:
        Identification.from_dict(payload)
    assert expected in str(info.value)
    if path == "status":
        assert "object must be absent when status is rejected" in str(info.value)
