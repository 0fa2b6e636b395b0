"""What the store returns and takes: rows, filters, write results, its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from fieldscope.collect.store.image_columns import IMAGE_COLUMNS
from fieldscope.collect.store.object_columns import OBJECT_COLUMNS
from fieldscope.collect.store.site_columns import SITE_COLUMNS
from fieldscope.edge.errors import FieldscopeError

SCHEMA_VERSION = 1
DEFAULT_DB = "fieldscope-collect.sqlite"
BUSY_TIMEOUT_S = 30.0
# A jump in a device's seq larger than this is a new outbox on the station (a new file
# starts at the clock in milliseconds), not lost identifications: see Store.gaps.
MAX_GAP = 1_000_000

# One identification as stored and as exported (export.CSV_COLUMNS is this tuple).
RECORD_COLUMNS: tuple[str, ...] = (
    "device",
    "station",
    "seq",
    "captured_at",
    "received_at",
    "status",
    "label",
    "score",
    "top_k",
    "model_name",
    "model_version",
    "model_sha256",
    "image_sha256",
    "image_width",
    "image_height",
    "archived_path",
    "quality_sharpness",
    "quality_exposure",
    "reason",
    "capture_ms",
    "quality_ms",
    "preprocess_ms",
    "inference_ms",
    "total_ms",
    "message_version",
    # A segmenting station's object, its measurements and its frame's counts (null
    # otherwise): see object_columns.
    *OBJECT_COLUMNS,
    # The station's site and the sample current when it stored the identification
    # (null when the message has none): see site_columns.
    *SITE_COLUMNS,
    # The key of the image the station uploaded, and its file's name: see image_columns.
    *IMAGE_COLUMNS,
)
_IDENT_COLUMNS = (*RECORD_COLUMNS, "topic", "payload", "payload_sha256")
# What a listing reads back (the payload stays in the database).
_ROW_COLUMNS = ("id", *RECORD_COLUMNS, "topic")


class StoreError(FieldscopeError):
    """The collector's database cannot be opened, read or written."""


class StoreDataError(StoreError):
    """A value of the batch cannot be stored (too large, wrong type, a constraint):
    retrying the same batch would fail the same way, so the collector stores its
    records one by one and keeps the one that fails apart as invalid."""


# --- what callers get back -------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    """What one batch did: ``stored`` new identifications, ``duplicates`` already stored
    (same content), ``invalid`` kept apart (including ``conflicts``: a known seq with
    other content), ``device_updates`` applied to the device table."""

    stored: int = 0
    duplicates: int = 0
    invalid: int = 0
    conflicts: int = 0
    device_updates: int = 0


@dataclass(frozen=True)
class Filters:
    """Which identifications an export, a page or a chart covers; empty means any.

    ``since`` is inclusive and ``until`` exclusive, both on the capture time (UTC).
    """

    stations: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    # Sample ids (the ``sample`` command's ``id``): one sample's identifications.
    samples: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    # Inclusive bounds on the top score; an identification without a score (rejected
    # before classification) matches no score bound.
    min_score: float | None = None
    max_score: float | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                if value.tzinfo is None:
                    raise StoreError(f"filter {name} must be timezone-aware, got {value}")
                object.__setattr__(self, name, value.astimezone(UTC))
        if self.since and self.until and self.since >= self.until:
            raise StoreError(
                f"filter since ({self.since.isoformat()}) must be before until "
                f"({self.until.isoformat()})"
            )


class IdentificationRow(msgspec.Struct, frozen=True, kw_only=True):
    """One stored identification, flattened (``top_k`` as (label, score) pairs).

    A ``msgspec.Struct``: the dashboard's API returns it as it is (JSON, OpenAPI)."""

    id: int
    device: str
    station: str
    seq: int
    captured_at: datetime
    received_at: datetime
    status: str
    label: str | None
    score: float | None
    top_k: tuple[tuple[str, float], ...]
    model_name: str
    model_version: str
    model_sha256: str
    image_sha256: str
    image_width: int
    image_height: int
    archived_path: str | None
    quality_sharpness: float | None
    quality_exposure: float | None
    reason: str | None
    capture_ms: float
    quality_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float
    message_version: int
    topic: str
    # A segmenting station's object (null for a one-frame-one-specimen station).
    frame_id: str | None = None
    object_index: int | None = None
    object_count: int | None = None
    bbox_x: int | None = None
    bbox_y: int | None = None
    bbox_width: int | None = None
    bbox_height: int | None = None
    touches_border: bool | None = None
    area_px: int | None = None
    area_um2: float | None = None
    esd_um: float | None = None
    perimeter_um: float | None = None
    major_axis_um: float | None = None
    minor_axis_um: float | None = None
    eccentricity: float | None = None
    solidity: float | None = None
    mean_intensity: float | None = None
    objects_found: int | None = None
    objects_kept: int | None = None
    objects_rejected_by_size: int | None = None
    objects_touching_border: int | None = None
    objects_dropped_at_border: int | None = None
    objects_truncated: int | None = None
    # The station's site and its sample (null when the message carried none).
    site_name: str | None = None
    decimal_latitude: float | None = None
    decimal_longitude: float | None = None
    geodetic_datum: str | None = None
    coordinate_uncertainty_m: float | None = None
    elevation_m: float | None = None
    depth_m: float | None = None
    country_code: str | None = None
    locality: str | None = None
    sample_id: str | None = None
    sample_started_at: str | None = None
    sample_volume_l: float | None = None
    sample_operator: str | None = None
    sample_notes: str | None = None
    # The uploaded image's key in the collector's image store, and the original file name.
    upload_sha256: str | None = None
    source_name: str | None = None


class DeviceRow(msgspec.Struct, frozen=True, kw_only=True):
    """A device as the collector last heard of it (the dashboard's API extends it)."""

    device: str
    station: str
    status: str | None
    status_at: datetime | None
    heartbeat_at: datetime | None
    heartbeat_received_at: datetime | None
    heartbeat: dict[str, Any] | None
    outbox_depth: int | None
    model_name: str | None
    model_version: str | None
    model_sha256: str | None
    model_info: dict[str, Any] | None
    updated_at: datetime


@dataclass(frozen=True)
class InvalidRow:
    id: int
    received_at: datetime
    topic: str
    kind: str | None
    reason: str
    payload: bytes


@dataclass(frozen=True)
class SeqGap:
    """Identifications ``first``..``last`` (inclusive) of ``device`` never arrived,
    although a later one did: lost on the way (a broker that lost its queue, a queue
    limit, a station outbox that dropped its oldest). A gap closes by itself when the
    missing messages arrive late (an outbox replay)."""

    device: str
    station: str
    first: int
    last: int

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


@dataclass
class _Where:
    sql: str = ""
    params: list[Any] = field(default_factory=list)
