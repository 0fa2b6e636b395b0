"""Contract 2, the manifest: ``manifest.json`` of a model bundle, as msgspec Structs.

:mod:`fieldscope.edge.bundle` reads, writes, checks and signs bundles; this module says
what their manifest holds. Every name here is re-exported from ``bundle``.

Versions: 2 adds ``output`` (required); a bundle written without it stays version 1, so
stations that read only version 1 keep loading every bundle that does not need it.
Version 3 adds ``preprocessing.resample`` (output optional, absent as in version 1): a
recipe that shrinks with the exact integer box average is version 3, and a station that
reads only versions 1-2 refuses it instead of resampling with INTER_AREA; a recipe that
keeps INTER_AREA is written as version 1 or 2 without the field. Version 4 adds
``segmentation`` (optional): the ``[objects]`` settings that cut the training crops, so a
station can warn when its own would cut other crops; a bundle trained without one is
written as before. Version 4 also holds ``taxa`` (optional; :mod:`fieldscope.edge.taxa`):
what each label stands for, for the collector's exports. Unknown fields are errors: a
new field means a new ``schema_version``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import msgspec
from msgspec import Meta

from fieldscope.edge import objects as obj
from fieldscope.edge.errors import BundleError, FieldscopeError, RecipeError
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.taxa import Taxon
from fieldscope.edge.wire import Sha256, WireStruct, from_builtins

__all__ = [
    "DTYPES",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "OUTPUT_KINDS",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "SUPPORTED_SCHEMA_VERSIONS",
    "FileEntry",
    "Manifest",
    "Provenance",
    "QuantParams",
    "Quantization",
    "Segmentation",
    "Taxon",
    "manifest_schema",
]

SCHEMA_VERSION = 4
SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2, 3, 4)
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
# Tensor element types a bundle's model may take and produce.
DTYPES: tuple[str, ...] = ("uint8", "int8", "float32")
# What the model's output tensor holds. "logits": the edge applies softmax to the
# dequantised values (int8 bundles keep softmax out of the integer graph, so close
# classes are not tied by uint8 steps of 1/256); "probabilities": used as they are.
# Absent (version 1 bundles): the classifier decides from a probe inference.
OUTPUT_KINDS: tuple[str, ...] = ("probabilities", "logits")
# Versions whose preprocessing has no "resample": always INTER_AREA.
_AREA_ONLY_VERSIONS = (1, 2)
# The first version with a segmentation record (and taxa).
SEGMENTATION_VERSION = 4
TAXA_VERSION = 4

SchemaVersion = Annotated[
    int,
    Meta(
        description="Version of this manifest format: 1, 2 (adds output), 3 (adds "
        "preprocessing.resample) or 4 (adds segmentation and taxa).",
        extra_json_schema={"enum": list(SUPPORTED_SCHEMA_VERSIONS)},
    ),
]
Output = Annotated[str, Meta(extra_json_schema={"enum": list(OUTPUT_KINDS)})]
Dtype = Literal["uint8", "int8", "float32"]
NonEmpty = Annotated[str, Meta(min_length=1, extra={"must": "be a non-empty string"})]
InputShape = Annotated[
    tuple[int, ...],
    Meta(
        description="The model input, NHWC with 3 (RGB) channels; it takes raw 0-255 pixels.",
        extra_json_schema={
            "prefixItems": [{"type": "integer", "minimum": 1}] * 3 + [{"const": 3}],
            "minItems": 4,
            "maxItems": 4,
        },
    ),
]


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_utc_iso(text: str) -> bool:
    try:
        offset = datetime.fromisoformat(text).utcoffset()
    except ValueError:
        return False
    return offset is not None and offset.total_seconds() == 0


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


class _Part(WireStruct, frozen=True, forbid_unknown_fields=True):
    _error: ClassVar[type[FieldscopeError]] = BundleError
    _prefix: ClassVar[str] = "manifest field "


class QuantParams(_Part, frozen=True):
    """Affine quantisation of one tensor: ``real = scale * (q - zero_point)``."""

    _where: ClassVar[str] = "quantization.input"

    scale: Annotated[float, Meta(gt=0)]
    zero_point: int


class Quantization(_Part, frozen=True):
    """Quantisation of the model's input and output; ``None`` for a float tensor."""

    _where: ClassVar[str] = "quantization"

    input: QuantParams | None
    output: QuantParams | None


class FileEntry(_Part, frozen=True):
    """Checksum and size of one bundle file, as listed in the manifest."""

    _where: ClassVar[str] = "files"

    sha256: Sha256
    size: Annotated[int, Meta(ge=0)]


FileMap = Annotated[
    dict[str, FileEntry],
    Meta(
        description="sha256 and size of every bundle file but manifest.json and manifest.sig.",
        extra_json_schema={
            "required": [MODEL_FILE],
            "propertyNames": {
                "pattern": "^[^/\\\\]+$",
                "not": {"enum": [".", "..", MANIFEST_FILE, SIGNATURE_FILE]},
            },
        },
    ),
]


class Provenance(_Part, frozen=True, kw_only=True):
    """Where the model came from: the training run, its metrics, the quantisation fidelity.

    ``training_metrics`` and ``fidelity`` are free-form JSON objects written by
    ``train``/``convert`` (e.g. ``{"top1": 0.93}``, ``{"top1_agreement": 0.96}``);
    ``created_at`` is a UTC ISO-8601 time.
    """

    _where: ClassVar[str] = "provenance"
    _required: ClassVar[tuple[str, ...]] = (
        "source_run",
        "training_metrics",
        "fidelity",
        "created_at",
    )

    source_run: str | None = None
    training_metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    fidelity: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: str = msgspec.field(default_factory=_utc_now)

    def problems(self) -> list[tuple[str, str]]:
        """``created_at`` is a UTC time (types cannot say that)."""
        if _is_utc_iso(self.created_at):
            return []
        example = "such as 2026-11-02T10:15:00Z"
        return [("created_at", f"must be a UTC ISO-8601 time {example}, got {self.created_at!r}")]


class Segmentation(_Part, frozen=True, kw_only=True):
    """The ``[objects]`` settings (:class:`fieldscope.edge.objects.ObjectsSettings`) that
    cut the crops the model was trained on, without ``mode`` (always "segment") and
    ``blank`` (the path of a workstation's file; a station uses its own blank frame)."""

    _where: ClassVar[str] = "segmentation"
    _omit_none: ClassVar[frozenset[str]] = frozenset({"max_area_um2"})

    background: obj.Background
    median_frames: obj.MedianFrames
    threshold: obj.Threshold
    adaptive_block_px: obj.BlockPx
    adaptive_offset: obj.Offset
    polarity: obj.Polarity
    blur_px: obj.Kernel
    open_px: obj.Kernel
    close_px: obj.Kernel
    fill_holes: bool
    um_per_px: obj.UmPerPx
    min_area_um2: obj.MinArea
    max_area_um2: obj.Area | None = None
    max_objects: obj.MaxObjects
    pad_px: obj.Pad
    drop_border: bool

    @classmethod
    def of(cls, settings: obj.ObjectsSettings) -> Segmentation:
        """The record of ``settings`` (every field but mode and blank)."""
        table = obj.settings_table(settings)
        return cls(**{k: v for k, v in table.items() if k not in ("mode", "blank")})

    def settings(self) -> obj.ObjectsSettings:
        """As station settings (``mode = "segment"``, no blank), to compare with its own."""
        return obj.ObjectsSettings(mode="segment", **msgspec.structs.asdict(self))


class Manifest(_Part, frozen=True, kw_only=True):
    """The parsed ``manifest.json``; constructing one validates it (``BundleError``).

    ``input_shape`` is NHWC with 3 (RGB) channels and must agree with
    ``preprocessing.size``; ``threshold`` is the score below which an identification is
    reported as uncertain; ``min_runtime`` lists the runtimes known to run the model with
    their oldest versions (e.g. ``{"tflite_runtime": "2.14", "ai_edge_litert": "1.2"}``):
    ``verify_bundle`` refuses a runtime that is not listed or older (``None``: no claim).
    ``schema_version`` None: the lowest version that holds the fields given.
    """

    _problems_prefix: ClassVar[str] = "invalid manifest: "
    _omit_none: ClassVar[frozenset[str]] = frozenset(
        {"schema_version", "output", "segmentation", "taxa"}
    )
    _required: ClassVar[tuple[str, ...]] = ("schema_version", "min_runtime")

    schema_version: SchemaVersion | None = None
    model_name: NonEmpty
    model_version: NonEmpty
    labels: Annotated[
        tuple[NonEmpty, ...],
        Meta(min_length=2, description="Class names in the order of the model's output scores."),
    ]
    input_shape: InputShape
    input_dtype: Dtype
    output_dtype: Dtype
    quantization: Annotated[
        Quantization | None,
        Meta(
            description="Affine quantisation (real = scale * (q - zero_point)) of the input and "
            "output tensors; null for a float model, and null for a float tensor."
        ),
    ]
    preprocessing: PreprocessRecipe
    threshold: Annotated[
        float,
        Meta(ge=0, le=1, description="Scores below this are reported as uncertain (label null)."),
    ]
    min_runtime: Annotated[
        Mapping[str, str] | None,
        Meta(
            description="The oldest version of each runtime that can run the model, e.g. "
            '{"tflite_runtime": "2.14", "ai_edge_litert": "1.2"}. verify_bundle refuses a bundle '
            "whose list does not name the installed runtime, or names a newer version of it; "
            "null means no constraint."
        ),
    ] = None
    provenance: Provenance
    files: FileMap
    output: Annotated[
        Output | None,
        Meta(
            description='Version 2: what the model\'s output tensor holds. "logits": the edge '
            "applies softmax to the dequantised values (fieldscope convert exports models this "
            'way, so an int8 model keeps close classes apart); "probabilities": used as they '
            "are. Version 1 has no such field and the classifier decides from a probe inference."
        ),
    ] = None
    segmentation: Annotated[
        Segmentation | None,
        Meta(
            description="Version 4: the [objects] settings (fieldscope segment, "
            "segmentation.toml) that cut the training crops into objects; a station that "
            "segments with other settings, or not at all, warns. Absent: trained on whole "
            "frames, or not recorded."
        ),
    ] = None
    taxa: Annotated[
        tuple[Taxon, ...] | None,
        Meta(
            description="Version 4: what each label stands for (taxa.csv given to fieldscope "
            "train --taxa): scientific name, rank, kingdom, WoRMS AphiaID or GBIF key, and "
            "whether it is a taxon at all; the collector's exports use it. Absent: labels "
            "are used as names."
        ),
    ] = None

    def __post_init__(self) -> None:
        if self.schema_version is None:
            version = 1 if self.output is None else 2
            if getattr(self.preprocessing, "resample", "area") != "area":
                version = 3
            if self.segmentation is not None or self.taxa is not None:
                version = SEGMENTATION_VERSION
            msgspec.structs.force_setattr(self, "schema_version", version)
        if isinstance(self.files, Mapping):
            msgspec.structs.force_setattr(self, "files", dict(sorted(self.files.items())))
        super().__post_init__()

    def problems(self) -> list[tuple[str, str]]:
        """Rules across fields: versions, labels, shapes and the file list."""
        problems: list[tuple[str, str]] = []
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            problems.append(("schema_version", _schema_problem(self.schema_version)))
        problems += self._taxa_problems()
        if len(set(self.labels)) != len(self.labels):
            dupes = sorted({x for x in self.labels if self.labels.count(x) > 1})
            problems.append(("labels", f"must be unique, repeated: {', '.join(dupes)}"))
        return problems + self._input_problems() + self._version_problems() + self._file_problems()

    def validate(self) -> list[str]:
        """Every problem with this manifest, each naming the field; empty when valid."""
        return [f"{key} {message}" for key, message in self.problems()]

    def _taxa_problems(self) -> list[tuple[str, str]]:
        if self.taxa is None:
            return []
        names = [t.label for t in self.taxa]
        unknown = sorted(set(names) - set(self.labels))
        repeated = sorted({x for x in names if names.count(x) > 1})
        problems = []
        if unknown:
            problems.append(("taxa", f"name labels the model does not have: {', '.join(unknown)}"))
        if repeated:
            problems.append(("taxa", f"must name each label once, repeated: {', '.join(repeated)}"))
        return problems

    def _input_problems(self) -> list[tuple[str, str]]:
        shape = self.input_shape
        if len(shape) != 4 or shape[3] != 3 or any(d < 1 for d in shape):
            return [("input_shape", f"must be [batch, height, width, 3] (RGB), got {list(shape)}")]
        if tuple(self.preprocessing.size) != shape[1:3]:
            size = _shape_text(tuple(self.preprocessing.size))
            return [
                (
                    "preprocessing.size",
                    f"{size} does not match the model input height x width "
                    f"{_shape_text(shape[1:3])} (input_shape {_shape_text(shape)})",
                )
            ]
        return []

    def _version_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.schema_version == 1 and self.output is not None:
            problems.append(("output", "needs schema_version 2 (version 1 has no output field)"))
        elif (self.schema_version == 2 or self.output is not None) and (
            self.output not in OUTPUT_KINDS
        ):
            kinds = ", ".join(OUTPUT_KINDS)
            problems.append(("output", f"must be one of {kinds}, got {self.output!r}"))
        resample = getattr(self.preprocessing, "resample", "area")
        if self.schema_version in _AREA_ONLY_VERSIONS and resample != "area":
            problems.append(
                (
                    "preprocessing.resample",
                    f"{resample!r} needs schema_version 3 (versions 1 and 2 always shrink "
                    "with INTER_AREA)",
                )
            )
        version = self.schema_version or 0
        if self.segmentation is not None and version < SEGMENTATION_VERSION:
            needs = f"needs schema_version {SEGMENTATION_VERSION}"
            problems.append(("segmentation", f"{needs} (version {version} has no such field)"))
        if self.taxa is not None and version < TAXA_VERSION:
            needs = f"needs schema_version {TAXA_VERSION}"
            problems.append(("taxa", f"{needs} (version {version} has no such field)"))
        return problems

    def _file_problems(self) -> list[tuple[str, str]]:
        problems = [] if MODEL_FILE in self.files else [("files", f"must list {MODEL_FILE}")]
        return problems + [
            ("files", f"may only list plain file names in the bundle, got {name!r}")
            for name in self.files
            if name in (MANIFEST_FILE, SIGNATURE_FILE, ".", "..")
            or Path(name).name != name
            or "\\" in name
        ]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``manifest.json`` (keys in a readable order)."""
        data = super().to_dict()
        recipe = self.preprocessing.to_dict()
        if self.schema_version in _AREA_ONLY_VERSIONS:
            recipe.pop("resample", None)  # implied, and unknown to their readers
        data["preprocessing"] = recipe
        return data

    @classmethod
    def _precheck(cls, data: dict[str, Any]) -> None:
        # The version first, so a manifest from a newer convert says so instead of
        # failing on a field this version does not know.
        if "schema_version" not in data:
            raise cls._fail("schema_version is required")
        version = data["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise cls._fail(f"schema_version must be an integer, got {version!r}")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise BundleError(_schema_problem(version))
        recipe = data.get("preprocessing")
        if isinstance(recipe, Mapping):
            data["preprocessing"] = _recipe(recipe, version)
        if isinstance(data.get("files"), Mapping):
            files = data["files"].items()
            data["files"] = {n: from_builtins(FileEntry, e, f"files.{n}") for n, e in files}
        if "provenance" in data:
            data["provenance"] = from_builtins(Provenance, data["provenance"], "provenance")
        if "segmentation" in data and data["segmentation"] is not None:
            found = data["segmentation"]
            data["segmentation"] = from_builtins(Segmentation, found, "segmentation")
        if isinstance(data.get("taxa"), list | tuple):
            data["taxa"] = tuple(
                from_builtins(Taxon, t, f"taxa[{i}]") for i, t in enumerate(data["taxa"])
            )

    @classmethod
    def from_dict(cls, data: object, path: str | None = None) -> Self:
        """Parse ``manifest.json``; every problem is a ``BundleError`` naming the field."""
        if not isinstance(data, Mapping):
            raise BundleError(f"manifest must be a JSON object, got {type(data).__name__}")
        return from_builtins(cls, data, path or "")


def _recipe(recipe: Mapping[str, Any], version: int) -> PreprocessRecipe:
    if version in _AREA_ONLY_VERSIONS and "resample" in recipe:
        raise BundleError(
            f"manifest field preprocessing.resample needs schema_version 3 (this "
            f"manifest is version {version}, whose recipes always use INTER_AREA)"
        )
    try:
        return PreprocessRecipe.from_dict(recipe)
    except RecipeError as exc:
        raise BundleError(f"manifest field preprocessing: {exc}") from exc


def _schema_problem(version: object) -> str:
    supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
    return (
        f"unsupported manifest schema_version {version!r} (this fieldscope reads version "
        f"{supported}; a newer bundle needs a newer fieldscope on this device)"
    )


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json``, for tools that do not use this package."""
    text = (
        resources.files("fieldscope.edge")
        .joinpath("schemas", "bundle-manifest.schema.json")
        .read_text(encoding="utf-8")
    )
    schema: dict[str, Any] = json.loads(text)
    return schema
