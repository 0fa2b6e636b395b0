"""Contract 2 — the model bundle: what ``convert`` writes and every edge device loads.

A bundle is a directory::

    model.tflite    the model; takes raw RGB 0–255 (normalisation is inside the graph)
    manifest.json   everything needed to use it (labels, input, preprocessing, threshold,
                    provenance) and the sha256 and size of every other file
    manifest.sig    optional: a detached ed25519 signature over the exact manifest bytes

Because the manifest carries the checksums of the other files, signing the manifest
covers the whole bundle, and the signature is a raw 64-byte ed25519 signature that
``openssl pkeyutl -verify -rawin`` can check as well. Labels and preprocessing are read
from here and never re-derived at run time. Input shape, dtypes and quantisation are
taken from the model itself when the bundle is written, and :func:`verify_bundle`
checks them against the model again, so a manifest can never silently disagree with
the graph it describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.edge.errors import BundleError, RecipeError
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.runtime import Interpreter, check_min_runtime, make_interpreter, runtime_info
from fieldscope.edge.untrusted import (
    RejectedValueError,
    load_json,
    read_number,
    read_regular_file,
    show_value,
)

__all__ = [
    "DTYPES",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "SUPPORTED_SCHEMA_VERSIONS",
    "Bundle",
    "FileEntry",
    "Manifest",
    "Provenance",
    "QuantParams",
    "Quantization",
    "check_model",
    "generate_keypair",
    "manifest_schema",
    "read_bundle",
    "sign_bundle",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

# Version 2 adds ``output`` (required); a bundle written without it stays version 1, so
# stations that read only version 1 keep loading every bundle that does not need it.
# Version 3 adds ``preprocessing.resample`` (output optional, absent as in version 1): a
# recipe that shrinks with the exact integer box average is version 3, and a station
# that reads only versions 1-2 refuses it instead of resampling with INTER_AREA; a
# recipe that keeps INTER_AREA is written as version 1 or 2 without the field.
SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2, 3)
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
# Tensor element types a bundle's model may take and produce.
DTYPES: tuple[str, ...] = ("uint8", "int8", "float32")

_CHUNK = 1 << 20
# A manifest is a few kilobytes (even 10,000 labels of 200 characters are about 2 MB); a
# bigger one is refused before it is read whole, and so is a model over MAX_MODEL_BYTES.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MODEL_BYTES = 512 * 1024 * 1024
_MAX_KEY_BYTES = 64 * 1024


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_utc_iso(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        offset = datetime.fromisoformat(text).utcoffset()
    except ValueError:
        return False
    return offset is not None and offset.total_seconds() == 0


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


class _Reader:
    """Typed access to a JSON object whose errors name the offending field."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise BundleError(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.where = where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where != "manifest" else key

    def check_keys(self, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        missing = [k for k in required if k not in self.data]
        if missing:
            raise BundleError(
                f"manifest field(s) missing: {', '.join(self._name(k) for k in missing)}"
            )
        unknown = sorted(set(self.data) - set(required) - set(optional))
        if unknown:
            raise BundleError(
                f"unknown manifest field(s): {', '.join(self._name(k) for k in unknown)}"
            )

    def fail(self, key: str, expected: str) -> BundleError:
        return BundleError(
            f"manifest field {self._name(key)} must be {expected}, "
            f"got {show_value(self.data.get(key))}"
        )

    def string(self, key: str) -> str:
        value = self.data[key]
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string")
        return value

    def integer(self, key: str) -> int:
        value = self.data[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, "an integer")
        return value

    def number(self, key: str, low: float = -math.inf, high: float = math.inf) -> float:
        try:  # the shared bounded reader: a 400-digit integer is an error, not OverflowError
            return read_number(self.data[key], low, high)
        except RejectedValueError as exc:
            raise BundleError(f"manifest field {self._name(key)} {exc}") from None

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.data[key]
        if not isinstance(value, Mapping):
            raise self.fail(key, "an object")
        return value


@dataclass(frozen=True)
class QuantParams:
    """Affine quantisation of one tensor: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        return {"scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, data: object, where: str) -> QuantParams:
        """Parse the manifest form; errors name ``where`` (e.g. ``quantization.input``)."""
        r = _Reader(data, where)
        r.check_keys(("scale", "zero_point"))
        scale = r.number("scale", 0.0)
        if scale <= 0:
            raise r.fail("scale", "a positive number")
        return cls(scale, r.integer("zero_point"))


@dataclass(frozen=True)
class Quantization:
    """Quantisation of the model's input and output; ``None`` for a float tensor."""

    input: QuantParams | None
    output: QuantParams | None

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        return {
            "input": None if self.input is None else self.input.to_dict(),
            "output": None if self.output is None else self.output.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: object) -> Quantization:
        """Parse the manifest form."""
        r = _Reader(data, "quantization")
        r.check_keys(("input", "output"))
        parts = [
            None if r.data[k] is None else QuantParams.from_dict(r.data[k], f"quantization.{k}")
            for k in ("input", "output")
        ]
        return cls(parts[0], parts[1])


@dataclass(frozen=True)
class FileEntry:
    """Checksum and size of one bundle file, as listed in the manifest."""

    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: object, where: str) -> FileEntry:
        """Parse the manifest form."""
        r = _Reader(data, where)
        r.check_keys(("sha256", "size"))
        digest = r.string("sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise r.fail("sha256", "64 lowercase hex digits")
        size = r.integer("size")
        if size < 0:
            raise r.fail("size", "a size in bytes >= 0")
        return cls(digest, size)


@dataclass(frozen=True)
class Provenance:
    """Where the model came from: the training run, its metrics, the quantisation fidelity.

    ``training_metrics`` and ``fidelity`` are free-form JSON objects written by
    ``train``/``convert`` (e.g. ``{"top1": 0.93}``, ``{"top1_agreement": 0.96}``);
    ``created_at`` is a UTC ISO-8601 time.
    """

    source_run: str | None = None
    training_metrics: Mapping[str, Any] = field(default_factory=dict)
    fidelity: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_utc_now)

    def __post_init__(self) -> None:
        if not _is_utc_iso(self.created_at):
            raise BundleError(
                "manifest field provenance.created_at must be a UTC ISO-8601 time "
                f"such as 2026-11-02T10:15:00Z, got {self.created_at!r}"
            )
        object.__setattr__(self, "training_metrics", dict(self.training_metrics))
        object.__setattr__(self, "fidelity", dict(self.fidelity))

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        return {
            "source_run": self.source_run,
            "training_metrics": dict(self.training_metrics),
            "fidelity": dict(self.fidelity),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> Provenance:
        """Parse the manifest form."""
        r = _Reader(data, "provenance")
        r.check_keys(("source_run", "training_metrics", "fidelity", "created_at"))
        source_run = r.data["source_run"]
        if source_run is not None and not isinstance(source_run, str):
            raise r.fail("source_run", "a string or null")
        return cls(
            source_run=source_run,
            training_metrics=r.mapping("training_metrics"),
            fidelity=r.mapping("fidelity"),
            created_at=r.string("created_at"),
        )


_MANIFEST_KEYS = (
    "schema_version",
    "model_name",
    "model_version",
    "labels",
    "input_shape",
    "input_dtype",
    "output_dtype",
    "quantization",
    "preprocessing",
    "threshold",
    "min_runtime",
    "provenance",
    "files",
)
# The fields each schema version adds to version 1's.
_ADDED_KEYS: Mapping[int, tuple[str, ...]] = {1: (), 2: ("output",), 3: ()}
_OPTIONAL_KEYS: Mapping[int, tuple[str, ...]] = {1: (), 2: (), 3: ("output",)}
# Versions whose preprocessing has no "resample": always INTER_AREA.
_AREA_ONLY_VERSIONS = (1, 2)
# What the model's output tensor holds. "logits": the edge applies softmax to the
# dequantised values (int8 bundles keep softmax out of the integer graph, so close
# classes are not tied by uint8 steps of 1/256); "probabilities": used as they are.
# Absent (version 1 bundles): the classifier decides from a probe inference.
OUTPUT_KINDS: tuple[str, ...] = ("probabilities", "logits")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parsed ``manifest.json``; constructing one validates it (``BundleError``).

    ``input_shape`` is NHWC with 3 (RGB) channels and must agree with
    ``preprocessing.size``; ``threshold`` is the score below which an identification is
    reported as uncertain; ``min_runtime`` lists the runtimes known to run the model with
    their oldest versions (e.g. ``{"tflite_runtime": "2.14", "ai_edge_litert": "1.2"}``):
    :func:`verify_bundle` refuses a runtime that is not listed or older (``None``: no claim).
    """

    model_name: str
    model_version: str
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    output_dtype: str
    quantization: Quantization | None
    preprocessing: PreprocessRecipe
    threshold: float
    provenance: Provenance
    files: Mapping[str, FileEntry]
    min_runtime: Mapping[str, str] | None = None
    output: str | None = None
    # None: the lowest version that holds the fields given (1 without ``output``).
    schema_version: int | None = None

    def __post_init__(self) -> None:
        if self.schema_version is None:
            version = 1 if self.output is None else 2
            if getattr(self.preprocessing, "resample", "area") != "area":
                version = 3
            object.__setattr__(self, "schema_version", version)
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "files", dict(sorted(self.files.items())))
        if self.min_runtime is not None:
            object.__setattr__(self, "min_runtime", dict(self.min_runtime))
        problems = self.validate()
        if problems:
            raise BundleError("invalid manifest: " + "; ".join(problems))

    def validate(self) -> list[str]:
        """Every problem with this manifest, each naming the field; empty when valid."""
        problems: list[str] = []
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            problems.append(_schema_problem(self.schema_version))
        for name in ("model_name", "model_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name} must be a non-empty string")
        labels = self.labels
        if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            problems.append(f"labels must be at least 2 non-empty strings, got {list(labels)!r}")
        elif len(set(labels)) != len(labels):
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            problems.append(f"labels must be unique, repeated: {', '.join(dupes)}")
        problems += self._input_problems()
        if self.schema_version == 1 and self.output is not None:
            problems.append("output needs schema_version 2 (version 1 has no output field)")
        elif (self.schema_version == 2 or self.output is not None) and (
            self.output not in OUTPUT_KINDS
        ):
            problems.append(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {self.output!r}")
        resample = getattr(self.preprocessing, "resample", "area")
        if self.schema_version in _AREA_ONLY_VERSIONS and resample != "area":
            problems.append(
                f"preprocessing.resample {resample!r} needs schema_version 3 (versions 1 "
                "and 2 always shrink with INTER_AREA)"
            )
        if not _is_number(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be a number in 0..1, got {self.threshold!r}")
        if self.min_runtime is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.min_runtime.items()
        ):
            problems.append(
                "min_runtime must map runtime names to version strings, "
                f"got {dict(self.min_runtime)!r}"
            )
        if MODEL_FILE not in self.files:
            problems.append(f"files must list {MODEL_FILE}")
        problems += [
            f"files may only list plain file names in the bundle, got {name!r}"
            for name in self.files
            if name in (MANIFEST_FILE, SIGNATURE_FILE, ".", "..")
            or Path(name).name != name
            or "\\" in name
        ]
        return problems

    def _input_problems(self) -> list[str]:
        problems: list[str] = []
        shape = self.input_shape
        if len(shape) != 4 or shape[3] != 3 or any(d < 1 for d in shape):
            problems.append(
                f"input_shape must be [batch, height, width, 3] (RGB), got {list(shape)}"
            )
        elif tuple(self.preprocessing.size) != shape[1:3]:
            problems.append(
                f"preprocessing.size {_shape_text(self.preprocessing.size)} does not match "
                f"the model input height x width {_shape_text(shape[1:3])} "
                f"(input_shape {_shape_text(shape)})"
            )
        problems += [
            f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}"
            for name in ("input_dtype", "output_dtype")
            if getattr(self, name) not in DTYPES
        ]
        return problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``manifest.json`` (keys in a readable order)."""
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "labels": list(self.labels),
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "output_dtype": self.output_dtype,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
            "preprocessing": self._preprocessing_dict(),
            "threshold": self.threshold,
            "min_runtime": None if self.min_runtime is None else dict(self.min_runtime),
            "provenance": self.provenance.to_dict(),
            "files": {name: entry.to_dict() for name, entry in self.files.items()},
        }
        if self.output is not None:
            data["output"] = self.output
        return data

    def _preprocessing_dict(self) -> dict[str, Any]:
        recipe = self.preprocessing.to_dict()
        if self.schema_version in _AREA_ONLY_VERSIONS:
            recipe.pop("resample", None)  # implied, and unknown to their readers
        return recipe

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Parse ``manifest.json``; every problem is a ``BundleError`` naming the field.

        The schema version is checked first, so a manifest from a newer ``convert``
        says so instead of failing on a field this version does not know.
        """
        r = _Reader(data, "manifest")
        if "schema_version" not in r.data:
            raise BundleError("manifest field(s) missing: schema_version")
        version = r.integer("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise BundleError(_schema_problem(version))
        r.check_keys((*_MANIFEST_KEYS, *_ADDED_KEYS[version]), _OPTIONAL_KEYS[version])
        output = r.data.get("output")
        if (version == 2 or output is not None) and output not in OUTPUT_KINDS:
            raise r.fail("output", f"one of {', '.join(OUTPUT_KINDS)}")
        labels = r.data["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise r.fail("labels", "a list of strings")
        shape = r.data["input_shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise r.fail("input_shape", "a list of integers")
        quantization = r.data["quantization"]
        recipe = r.mapping("preprocessing")
        if version in _AREA_ONLY_VERSIONS and "resample" in recipe:
            raise BundleError(
                f"manifest field preprocessing.resample needs schema_version 3 (this "
                f"manifest is version {version}, whose recipes always use INTER_AREA)"
            )
        try:
            preprocessing = PreprocessRecipe.from_dict(recipe)
        except RecipeError as exc:
            raise BundleError(f"manifest field preprocessing: {exc}") from exc
        min_runtime = r.data["min_runtime"]
        if min_runtime is not None and not isinstance(min_runtime, Mapping):
            raise r.fail("min_runtime", "an object or null")
        return cls(
            schema_version=version,
            model_name=r.string("model_name"),
            model_version=r.string("model_version"),
            labels=tuple(labels),
            input_shape=tuple(shape),
            input_dtype=r.string("input_dtype"),
            output_dtype=r.string("output_dtype"),
            quantization=None if quantization is None else Quantization.from_dict(quantization),
            preprocessing=preprocessing,
            threshold=r.number("threshold", 0.0, 1.0),
            min_runtime=min_runtime,
            output=output,
            provenance=Provenance.from_dict(r.data["provenance"]),
            files={
                name: FileEntry.from_dict(entry, f"files.{name}")
                for name, entry in r.mapping("files").items()
            },
        )


def _refusal(manifest: Manifest) -> str | None:
    """Why ``fieldscope convert`` left this device's runtime out of min_runtime, if said.

    Recorded as ``provenance.fidelity.<runtime>_<major>_<minor>.refused`` (e.g.
    ``tflite_runtime_2_14``); a free-form field, so anything else there is ignored.
    """
    info = runtime_info()
    parts = info.version.split(".")
    key = f"{info.name}_{'_'.join(parts[:2])}"
    entry = manifest.provenance.fidelity.get(key) if manifest.provenance else None
    reason = entry.get("refused") if isinstance(entry, Mapping) else None
    return reason if isinstance(reason, str) and reason else None


def _schema_problem(version: object) -> str:
    supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
    return (
        f"unsupported manifest schema_version {version!r} (this fieldscope reads version "
        f"{supported}; a newer bundle needs a newer fieldscope on this device)"
    )


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk whose files matched their checksums when it was read.

    ``sha256`` is the model's checksum (published with every identification).
    ``signed`` is True only when :func:`verify_bundle` checked ``manifest.sig`` against a
    public key; :func:`read_bundle` never checks signatures, so it is False there.
    """

    path: Path
    manifest: Manifest
    model_path: Path
    sha256: str
    signed: bool = False
    # The model's bytes exactly as they were checksummed. An interpreter must be built
    # from these (``model_source()``), never by opening ``model_path`` again: a file
    # swapped in between would otherwise be served under the verified sha256.
    model_content: bytes | None = field(default=None, repr=False, compare=False)

    def model_source(self) -> bytes | Path:
        """What to build the interpreter from: the verified bytes (the path only for a
        ``Bundle`` made by hand without them)."""
        return self.model_path if self.model_content is None else self.model_content


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json``, for tools that do not use this package."""
    text = (
        resources.files("fieldscope.edge")
        .joinpath("schemas", "bundle-manifest.schema.json")
        .read_text(encoding="utf-8")
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def _file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(digest.hexdigest(), size)


def _dtype_name(detail: Mapping[str, Any]) -> str:
    return str(np.dtype(detail["dtype"]).name)


def _quant_params(detail: Mapping[str, Any]) -> QuantParams | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        return None
    return QuantParams(float(scale), int(zero_point))


def _single(details: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    if len(details) != 1:
        raise BundleError(
            f"the model has {len(details)} {kind} tensors; a fieldscope classifier has "
            f"exactly one {kind} (an RGB image in, one score per label out)"
        )
    return details[0]


def _quant_text(params: QuantParams | None) -> str:
    if params is None:
        return "not quantised"
    return f"scale {params.scale:g}, zero point {params.zero_point}"


def _same_quant(a: QuantParams | None, b: QuantParams | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.zero_point == b.zero_point and math.isclose(a.scale, b.scale, rel_tol=1e-6)


def check_model(manifest: Manifest, interpreter: Interpreter) -> None:
    """Refuse a manifest that disagrees with the model it describes.

    A label list one entry short, or a manifest written for another input size, would
    otherwise give confidently wrong identifications rather than an error.

    Raises:
        BundleError: naming what differs (manifest value vs the model's).
    """
    inp = _single(interpreter.get_input_details(), "input")
    out = _single(interpreter.get_output_details(), "output")
    model_shape = tuple(int(d) for d in inp["shape"])
    if model_shape != manifest.input_shape:
        raise BundleError(
            f"manifest input_shape {_shape_text(manifest.input_shape)} does not match the "
            f"model's input {_shape_text(model_shape)}"
        )
    if _dtype_name(inp) != manifest.input_dtype:
        raise BundleError(
            f"manifest input_dtype {manifest.input_dtype} does not match the model's input "
            f"{_dtype_name(inp)}"
        )
    if _dtype_name(out) != manifest.output_dtype:
        raise BundleError(
            f"manifest output_dtype {manifest.output_dtype} does not match the model's output "
            f"{_dtype_name(out)}"
        )
    scores = int(np.prod(out["shape"][1:]))
    if scores != len(manifest.labels):
        raise BundleError(
            f"manifest has {len(manifest.labels)} labels but the model outputs {scores} "
            "scores per image"
        )
    q = manifest.quantization or Quantization(None, None)
    for name, params, detail in (("input", q.input, inp), ("output", q.output, out)):
        actual = _quant_params(detail)
        if not _same_quant(params, actual):
            raise BundleError(
                f"manifest quantization.{name} ({_quant_text(params)}) does not match the "
                f"model's ({_quant_text(actual)})"
            )


def _model_fields(interpreter: Interpreter) -> dict[str, Any]:
    """The manifest fields that describe the model's tensors, read from the model."""
    inp = _single(interpreter.get_input_details(), "input")
    out = _single(interpreter.get_output_details(), "output")
    qin, qout = _quant_params(inp), _quant_params(out)
    return {
        "input_shape": tuple(int(d) for d in inp["shape"]),
        "input_dtype": _dtype_name(inp),
        "output_dtype": _dtype_name(out),
        "quantization": None if qin is None and qout is None else Quantization(qin, qout),
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, mode: int = 0o666) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_bundle(
    out_dir: Path,
    model: bytes | Path,
    *,
    model_name: str,
    model_version: str,
    labels: Sequence[str],
    preprocessing: PreprocessRecipe,
    threshold: float = 0.5,
    provenance: Provenance | Mapping[str, Any] | None = None,
    min_runtime: Mapping[str, str] | None = None,
    output: str | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle directory; input shape, dtypes and quantisation come from the model.

    ``output`` says whether the model outputs ``"probabilities"`` or ``"logits"``
    (``OUTPUT_KINDS``); ``None`` leaves it to the classifier's probe, as older bundles do.

    The model is loaded with the edge runtime first, so a bundle that would not verify
    (wrong label count, preprocessing size ≠ model input) is never written. Files go to
    a temporary sibling directory that is renamed into place, so ``out_dir`` is either
    absent, the old bundle, or the complete new one — never half written.

    Raises:
        BundleError: ``out_dir`` is not empty (and not ``overwrite``), the model cannot be
            loaded, or the manifest would be invalid or disagree with the model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BundleError(f"cannot write bundle to {out_dir}: it exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise BundleError(
                f"cannot write bundle to {out_dir}: the directory is not empty "
                "(choose another directory or overwrite it explicitly)"
            )
    if isinstance(model, Path):
        try:
            model_bytes = model.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read model {model}: {exc.strerror or exc}") from exc
    else:
        model_bytes = bytes(model)
    interpreter = make_interpreter(model_bytes)
    if isinstance(provenance, Mapping):
        provenance = Provenance.from_dict(provenance)
    manifest = Manifest(
        model_name=model_name,
        model_version=model_version,
        labels=tuple(labels),
        preprocessing=preprocessing,
        threshold=float(threshold),
        provenance=provenance or Provenance(),
        min_runtime=min_runtime,
        output=output,
        files={MODEL_FILE: FileEntry(hashlib.sha256(model_bytes).hexdigest(), len(model_bytes))},
        **_model_fields(interpreter),
    )
    check_model(manifest, interpreter)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_beside(out_dir, f"tmp-{os.getpid()}", directory=True)
        try:
            _write_file(tmp / MODEL_FILE, model_bytes)
            _write_file(tmp / MANIFEST_FILE, _manifest_bytes(manifest))
            _fsync_dir(tmp)
            _swap_into_place(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(out_dir.parent)
    except OSError as exc:
        raise BundleError(f"cannot write bundle to {out_dir}: {exc.strerror or exc}") from exc
    logger.info("wrote bundle %s (%s %s)", out_dir, model_name, model_version)
    return read_bundle(out_dir)


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside, then removed."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _load_public_key(path: Path) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = read_regular_file(path, _MAX_KEY_BYTES)
    except RejectedValueError as exc:
        raise BundleError(f"public key {path} {exc}") from None
    except OSError as exc:
        raise BundleError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    if b"PRIVATE KEY" in data:
        raise BundleError(
            f"{path} is a private key; give the public key (keep the private key off devices)"
        )
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            f"{path} is not a PEM public key (the ed25519 public key that "
            "generate_keypair wrote, or `openssl pkey -pubout` of the private key)"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} is a {type(key).__name__}, not an ed25519 public key")
    return key


def _load_private_key(path: Path) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read private key {path}: {exc.strerror or exc}") from exc
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise BundleError(f"private key {path} is encrypted; give an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is a {type(key).__name__}, not an ed25519 private key")
    return key


def _check_signature(bundle_dir: Path, manifest_bytes: bytes, public_key: Path) -> None:
    from cryptography.exceptions import InvalidSignature

    key = _load_public_key(public_key)
    sig_path = bundle_dir / SIGNATURE_FILE
    if not sig_path.is_file():
        raise BundleError(
            f"bundle {bundle_dir} is not signed (no {SIGNATURE_FILE}) but a public key was "
            "given, so a signature is required"
        )
    try:
        key.verify(_read_capped(bundle_dir, SIGNATURE_FILE, _MAX_KEY_BYTES), manifest_bytes)
    except InvalidSignature as exc:
        raise BundleError(
            f"bundle {bundle_dir}: {SIGNATURE_FILE} is not a valid signature of "
            f"{MANIFEST_FILE} for public key {public_key} (the manifest was changed after "
            "signing, or it was signed with another key)"
        ) from exc


def _open(path: Path, public_key: Path | None) -> Bundle:
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory (a bundle is a folder)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST_FILE}")
    raw = _read_capped(path, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    # The signature covers the exact bytes, so check it before trusting any of them.
    if public_key is not None:
        _check_signature(path, raw, public_key)
    try:
        data = load_json(raw, max_bytes=MAX_MANIFEST_BYTES)
    except RejectedValueError as exc:
        raise BundleError(f"bundle {path}: {MANIFEST_FILE} {exc}") from None
    try:
        manifest = Manifest.from_dict(data)
    except BundleError as exc:
        raise BundleError(f"bundle {path}: {MANIFEST_FILE}: {exc}") from exc
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Every field has its own check; this is the boundary's guarantee that a manifest
        # nobody foresaw still ends as a BundleError (the old model keeps serving).
        raise BundleError(
            f"bundle {path}: {MANIFEST_FILE} is invalid ({type(exc).__name__}: "
            f"{show_value(str(exc), 200)})"
        ) from exc
    model_content = _check_files(path, manifest)
    return Bundle(
        path=path,
        manifest=manifest,
        model_path=path / MODEL_FILE,
        sha256=manifest.files[MODEL_FILE].sha256,
        signed=public_key is not None,
        model_content=model_content,
    )


def _check_files(path: Path, manifest: Manifest) -> bytes:
    """Check every listed file's size and checksum; return the model's bytes as checked."""
    model_content = b""
    for name, expected in manifest.files.items():
        file_path = path / name
        if not file_path.is_file():
            if file_path.exists():  # a FIFO, a device, a link to /dev/zero: never read
                raise BundleError(f"bundle {path}: {name} is not a regular file")
            raise BundleError(f"bundle {path} is missing {name} (listed in {MANIFEST_FILE})")
        if name == MODEL_FILE:
            # Read once: these bytes are checksummed *and* loaded (Bundle.model_source).
            model_content = _read_model(path, expected)
            actual = FileEntry(hashlib.sha256(model_content).hexdigest(), len(model_content))
        else:
            actual = _file_entry(file_path)
        if actual.size != expected.size:
            raise _size_mismatch(path, name, actual.size, expected.size)
        if actual.sha256 != expected.sha256:
            raise BundleError(
                f"bundle {path}: checksum mismatch for {name}: {MANIFEST_FILE} says sha256 "
                f"{expected.sha256}, the file has {actual.sha256} (changed or damaged)"
            )
    return model_content


def _size_mismatch(path: Path, name: str, actual: int, expected: int) -> BundleError:
    return BundleError(
        f"bundle {path}: {name} is {actual} bytes but {MANIFEST_FILE} says "
        f"{expected} (truncated or replaced)"
    )


def _read_model(path: Path, expected: FileEntry) -> bytes:
    """The model's bytes, read once; a size other than the manifest's (a replaced file,
    a link to /dev/zero) or over ``MAX_MODEL_BYTES`` is refused before reading."""
    if expected.size > MAX_MODEL_BYTES:
        raise BundleError(
            f"bundle {path}: {MANIFEST_FILE} says {MODEL_FILE} is {expected.size:,} bytes, "
            f"more than the limit of {MAX_MODEL_BYTES:,}"
        )
    try:
        on_disk = (path / MODEL_FILE).stat().st_size
    except OSError as exc:
        raise BundleError(
            f"bundle {path}: cannot read {MODEL_FILE}: {exc.strerror or exc}"
        ) from exc
    if on_disk != expected.size:
        raise _size_mismatch(path, MODEL_FILE, on_disk, expected.size)
    return _read_capped(path, MODEL_FILE, expected.size)


def _read_capped(bundle_dir: Path, name: str, max_bytes: int) -> bytes:
    """A bundle file's bytes, refusing special files and anything over ``max_bytes``
    before reading it whole (a 300 MB manifest, a model symlinked to /dev/zero)."""
    try:
        return read_regular_file(bundle_dir / name, max_bytes)
    except RejectedValueError as exc:
        raise BundleError(f"bundle {bundle_dir}: {name} {exc}") from None
    except OSError as exc:
        raise BundleError(
            f"bundle {bundle_dir}: cannot read {name}: {exc.strerror or exc}"
        ) from exc


def read_bundle(path: Path) -> Bundle:
    """Parse a bundle and check that its files are present and match their checksums.

    It does not load the model or check a signature; use :func:`verify_bundle` before
    trusting a bundle that came from elsewhere.

    Raises:
        BundleError: naming what is wrong (missing file, invalid manifest, checksum).
    """
    return _open(Path(path), None)


def verify_bundle(path: Path, public_key: Path | None = None, *, load_model: bool = True) -> Bundle:
    """Everything :func:`read_bundle` checks, plus the signature and the model itself.

    With ``public_key`` a valid ``manifest.sig`` is required (and the returned bundle is
    ``signed``). With ``load_model`` the model is loaded with this device's runtime and
    its input shape, dtypes, quantisation and output size are compared with the
    manifest; this is what a device runs before swapping in a new bundle.

    Raises:
        BundleError: naming the first problem found.
    """
    path = Path(path)
    bundle = _open(path, public_key)
    if load_model:
        manifest = bundle.manifest
        try:
            check_min_runtime(manifest.min_runtime, runtime_info(), _refusal(manifest))
        except BundleError as exc:
            raise BundleError(f"bundle {path}: {exc}") from exc
        try:
            interpreter = make_interpreter(bundle.model_source())
        except BundleError as exc:
            needs = f" (the bundle asks for {manifest.min_runtime})" if manifest.min_runtime else ""
            raise BundleError(f"bundle {path}: {exc}{needs}") from exc
        try:
            check_model(manifest, interpreter)
        except BundleError as exc:
            raise BundleError(f"bundle {path}: {exc}") from exc
    return bundle


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> Path:
    """Sign a bundle's manifest with an ed25519 private key; returns the signature path.

    The bundle is read (checksums checked) first, so a damaged bundle is never signed.

    Raises:
        BundleError: the bundle is invalid or the key cannot be used.
    """
    bundle_dir = Path(bundle_dir)
    read_bundle(bundle_dir)
    key = _load_private_key(private_key_path)
    signature: bytes = key.sign((bundle_dir / MANIFEST_FILE).read_bytes())
    sig_path = bundle_dir / SIGNATURE_FILE
    with _atomic_path(sig_path) as tmp:
        _write_file(tmp, signature)
    logger.info("signed bundle %s", bundle_dir)
    return sig_path


def _create_beside(target: Path, tag: str, *, directory: bool = False, mode: int = -1) -> Path:
    """Create a new, uniquely named file or folder next to ``target`` with ``mode`` less
    the umask (default 0666 / 0777, as any file the user makes). Not mkstemp/mkdtemp:
    their 0600/0700 would stay on a bundle or signature that a web server or another
    user must read (only private keys are meant to be 0600)."""
    import secrets

    if mode < 0:
        mode = 0o777 if directory else 0o666
    for _ in range(100):
        path = target.with_name(f".{target.name}.{tag}.{secrets.token_hex(4)}")
        try:
            if directory:
                path.mkdir(mode=mode)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name beside {target}")


@contextlib.contextmanager
def _atomic_path(target: Path, mode: int = 0o666) -> Iterator[Path]:
    """A temporary path next to ``target`` that replaces it when the block succeeds; the
    file is created with ``mode`` less the umask."""
    tmp = _create_beside(target, "tmp", mode=mode)
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> None:
    """Create an ed25519 key pair as PEM files; the private key is readable by its owner only.

    Raises:
        BundleError: a key file exists (and not ``overwrite``) or cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise BundleError(f"refusing to overwrite existing key file {p}")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # Created 0600 from the start (not chmod-ed afterwards), so it is never readable.
        # The public key is meant to be shared: the umask decides (0644 with umask 022).
        with _atomic_path(private_path, mode=0o600) as tmp:
            _write_file(tmp, private_pem, 0o600)
        with _atomic_path(public_path) as tmp:
            _write_file(tmp, public_pem)
    except OSError as exc:
        raise BundleError(f"cannot write key pair: {exc}") from exc
    logger.info("wrote ed25519 key pair %s, %s", private_path, public_path)
