"""Generate the JSON Schemas of the wire formats from their msgspec Structs.

``python -m fieldscope.edge.wire_schemas`` writes every schema to ``docs/`` and to
``edge/schemas/`` (the copies the installed package ships); ``--check`` writes nothing
and exits 1 when a committed file differs from what the models generate, which is what
the test suite runs. The models are the one declaration: a rule changes there, and the
schemas follow by running this command.

What the generator adds to ``msgspec.json.schema``: the draft, ``$id``, title and
description of each document; ``required`` for keys a reader demands although Python
gives them a default (``version``); optional fields left out when unknown lose their
``null`` branch (they are never null on the wire); and the rules across fields that JSON
Schema can state (``if``/``then`` on ``status`` and ``schema_version``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from msgspec import inspect as mi

from fieldscope.edge.health import CommandReply, HeartbeatPayload, ModelInfoPayload
from fieldscope.edge.manifest import Manifest
from fieldscope.edge.message import Identification, Label, Probability
from fieldscope.edge.wire import WireStruct

__all__ = ["SCHEMAS", "SchemaDoc", "generate", "main", "render"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_IDENTIFICATION_RULES = (
    "One identification published by a fieldscope station on "
    "{prefix}/{station}/{device}/identification (QoS 1, not retained), as compact UTF-8 "
    "JSON. Identity: the pair (device, seq); delivery is at least once, so drop a repeated "
    "pair. Versioning: 'version' is the major version; a reader refuses other versions, and "
    "within version 1 writers may add optional fields, which readers ignore (hence no "
    "additionalProperties: false). Optional fields are omitted when unknown, never null. "
    "Rules this schema cannot express, which fieldscope's reader also enforces: when status "
    "is ok or uncertain, score equals top_k[0].score and, when ok, label equals "
    "top_k[0].label; top_k is sorted by descending score and its labels are unique; device "
    "and station are at most 128 bytes in UTF-8 (the schema checks 128 characters); "
    "captured_at is a real calendar date and time (the date-time format). Patterns are "
    "written to mean the same in ECMA-262 and Python regular expressions. Added within "
    "version 1 for a segmenting station ([objects] mode = segment): one message per object, "
    "with the optional parts object (frame_id, the frame's image.sha256; index; count; bbox; "
    "measurements in micrometres) and segmentation (the frame's counts); a frame without "
    "objects is one message with status rejected, reason 'no objects' and segmentation only. "
    "object is absent when status is rejected, object.index is below object.count, and "
    "object.count equals segmentation.kept. Added within version 1 for the scientific "
    "record: the optional parts site (the station's place: decimal_latitude and "
    "decimal_longitude together, in decimal degrees on geodetic_datum WGS84, which is "
    "present exactly when they are; coordinate_uncertainty_m; elevation_m or depth_m, not "
    "both; country_code ISO 3166-1 alpha-2; name; locality) and sample (the sample current "
    "when the message was stored: id, started_at, volume_l in litres, operator, notes)."
)
_MANIFEST_RULES = (
    "The manifest of a fieldscope model bundle: a directory holding model.tflite, this "
    "manifest.json and optionally manifest.sig, a raw 64-byte ed25519 signature over the "
    "exact bytes of manifest.json. The manifest holds the sha256 of every other file, so "
    "the signature covers the whole bundle. Unknown fields are errors: a new field means a "
    "new schema_version. Version 2 adds the required field output; a bundle that does not "
    "need it is still written as version 1, so older stations keep reading it. Version 3 "
    "adds preprocessing.resample (output optional, as in version 1); a recipe that shrinks "
    "with INTER_AREA is still written as version 1 or 2 without it. Version 4 adds the "
    "optional segmentation (the [objects] settings that cut the training crops); a bundle "
    "without one is written as before. Rules this schema "
    "cannot express, which fieldscope's reader also enforces: labels are unique; "
    "preprocessing.size equals input_shape[1:3]; input_shape, dtypes, quantization and the "
    "number of labels match the model itself; every listed file exists with that size and "
    "sha256; provenance.created_at has a UTC offset of zero."
)
_PAYLOAD_RULES = (
    "Published by a fieldscope station as compact UTF-8 JSON (see docs/mqtt.md). "
    "'version' is the major version: a reader refuses others, and within a version writers "
    "may add fields, which readers ignore. Times are UTC ending in Z."
)
# The recipe's rules live in fieldscope.edge.preprocess (a dataclass, not a Struct yet).
_RECIPE = {
    "description": "The preprocessing recipe (fieldscope.edge.preprocess.PreprocessRecipe) "
    "that turns a decoded frame into the model input.",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "size": {
            "type": "array",
            "items": {"type": "integer", "minimum": 8, "maximum": 4096},
            "minItems": 2,
            "maxItems": 2,
        },
        "denoise": {"enum": ["none", "bilateral", "median", "gaussian", "nlmeans"]},
        "denoise_params": {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "resize": {"enum": ["stretch", "center-crop", "letterbox"]},
        "fill": {
            "oneOf": [
                {"const": "border"},
                {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 255},
                    "minItems": 3,
                    "maxItems": 3,
                },
            ]
        },
        "resample": {
            "description": "How shrinking resamples: exact (the box average of INTER_AREA in "
            "integers, the same pixels on x86_64 and ARM) or area (OpenCV's INTER_AREA, which "
            "rounds differently on ARM). Absent: area.",
            "enum": ["exact", "area"],
        },
    },
}


def _status_rules() -> list[dict[str, Any]]:
    label, probability = msgspec.json.schema(Label), msgspec.json.schema(Probability)

    def when(status: str, then: dict[str, Any]) -> dict[str, Any]:
        condition = {"properties": {"status": {"const": status}}, "required": ["status"]}
        return {"if": condition, "then": {"properties": then}}

    return [
        when("ok", {"label": label, "score": probability, "top_k": {"minItems": 1}}),
        when(
            "uncertain", {"label": {"type": "null"}, "score": probability, "top_k": {"minItems": 1}}
        ),
        when(
            "rejected",
            {"label": {"type": "null"}, "score": {"type": "null"}, "top_k": {"maxItems": 0}},
        ),
    ]


def _version_rules() -> list[dict[str, Any]]:
    def version(value: Any) -> dict[str, Any]:
        return {"properties": {"schema_version": value}}

    return [
        {"if": version({"const": 2}), "then": {"required": ["output"]}},
        {"if": version({"const": 1}), "then": {"not": {"required": ["output"]}}},
        {
            "if": version({"enum": [1, 2]}),
            "then": {"properties": {"preprocessing": {"not": {"required": ["resample"]}}}},
        },
        {"if": version({"enum": [1, 2, 3]}), "then": {"not": {"required": ["segmentation"]}}},
    ]


@dataclass(frozen=True)
class SchemaDoc:
    """One generated schema: the file name, the Struct, and what the generator adds."""

    filename: str
    model: type[WireStruct]
    schema_id: str
    title: str
    description: str
    rules: Callable[[], list[dict[str, Any]]] | None = None


SCHEMAS: tuple[SchemaDoc, ...] = (
    SchemaDoc(
        "identification.schema.json",
        Identification,
        "urn:fieldscope:schema:identification:1",
        "fieldscope identification message, version 1",
        _IDENTIFICATION_RULES,
        _status_rules,
    ),
    SchemaDoc(
        "heartbeat.schema.json",
        HeartbeatPayload,
        "urn:fieldscope:schema:heartbeat:1",
        "fieldscope heartbeat ({prefix}/{station}/{device}/heartbeat), version 1",
        _PAYLOAD_RULES + " A measurement the board cannot make is null.",
    ),
    SchemaDoc(
        "model-info.schema.json",
        ModelInfoPayload,
        "urn:fieldscope:schema:model-info:1",
        "fieldscope model info ({prefix}/{station}/{device}/model, retained), version 1",
        _PAYLOAD_RULES + " Labels are unique (which this schema cannot state).",
    ),
    SchemaDoc(
        "command-reply.schema.json",
        CommandReply,
        "urn:fieldscope:schema:command-reply:1",
        "fieldscope command reply (.../command/{name}/result), version 1",
        _PAYLOAD_RULES + " error is null exactly when ok is true.",
    ),
    SchemaDoc(
        "bundle-manifest.schema.json",
        Manifest,
        "urn:fieldscope:schema:bundle-manifest:4",
        "fieldscope model bundle manifest (manifest.json), schema versions 1, 2, 3 and 4",
        _MANIFEST_RULES,
        _version_rules,
    ),
)


def _structs(model: type[WireStruct]) -> dict[str, type[WireStruct]]:
    """Every WireStruct reachable from ``model``, by the name msgspec gives its $def."""
    found: dict[str, type[WireStruct]] = {}

    def visit(info: mi.Type) -> None:
        if isinstance(info, mi.StructType) and issubclass(info.cls, WireStruct):
            if info.cls.__name__ in found:
                return
            found[info.cls.__name__] = info.cls
            for f in info.fields:
                visit(f.type)
        for child in ("type", "item_type", "value_type"):
            if isinstance(getattr(info, child, None), mi.Type):
                visit(getattr(info, child))
        for member in getattr(info, "types", ()):
            visit(member)

    visit(mi.type_info(model))
    return found


def _adjust(node: dict[str, Any], cls: type[WireStruct]) -> None:
    """What msgspec cannot know: keys readers require, and optional fields never null."""
    props = node.get("properties", {})
    for name in cls._omit_none:
        branches = props[name].pop("anyOf", None)
        props[name].pop("default", None)
        if branches:
            props[name].update(next(b for b in branches if b != {"type": "null"}))
    required = [
        *node.get("required", []),
        *(k for k in cls._required if k not in node.get("required", [])),
    ]
    if required:
        node["required"] = required


def generate(doc: SchemaDoc) -> dict[str, Any]:
    """The schema of one document, as it is committed."""
    generated = msgspec.json.schema(doc.model)
    defs: dict[str, Any] = generated.get("$defs", {})
    for name, cls in _structs(doc.model).items():
        _adjust(defs[name], cls)
    top = defs.pop(doc.model.__name__)
    top.pop("title", None)
    top.pop("description", None)
    if "preprocessing" in top.get("properties", {}):
        top["properties"]["preprocessing"] = _RECIPE
        defs.pop("PreprocessRecipe", None)
    schema: dict[str, Any] = {
        "$schema": DRAFT,
        "$id": doc.schema_id,
        "title": doc.title,
        "description": doc.description,
        **top,
    }
    if doc.rules is not None:
        schema["allOf"] = doc.rules()
    if defs:
        schema["$defs"] = defs
    return schema


def render(doc: SchemaDoc) -> str:
    """The file's text: two-space indentation, UTF-8, a final newline."""
    return json.dumps(generate(doc), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or, with ``--check``, compare) every schema; 1 when a file is out of date."""
    parser = argparse.ArgumentParser(prog="python -m fieldscope.edge.wire_schemas")
    parser.add_argument("--repo", type=Path, default=Path(), help="the checkout (default: .)")
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    if not (args.repo / "docs").is_dir():
        parser.error(f"{args.repo} has no docs/ folder; run it in the fieldscope checkout")
    for doc in SCHEMAS:
        text = render(doc)
        for folder in ("docs", "edge/schemas"):
            path = args.repo / folder / doc.filename
            current = path.read_text(encoding="utf-8") if path.is_file() else None
            if current == text:
                continue
            stale.append(path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    for path in stale:
        verb = "differs from the models" if args.check else "written"
        print(f"{path}: {verb}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
