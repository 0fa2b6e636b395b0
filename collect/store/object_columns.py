"""The columns of a segmenting station's objects (``[objects] mode = "segment"``), and
the migration that adds them to a database made before them.

Each identification of a segmenting station is one object of a frame: its frame, place,
box and measurements in µm, and its frame's counts (docs/mqtt.md, "Objects"). They are
nullable columns of ``identifications`` (null for a one-frame-one-specimen station), so
the per-object records stay one row each, exports carry them as columns, and a count or
a size distribution per label and sample is one ``GROUP BY`` away.

Migration: a database created before these columns gets them the next time a collector
opens it for writing (``ALTER TABLE ... ADD COLUMN``, in the same transaction as the
schema, idempotent, safe with several collectors starting together). A reader opening
an older database without writing (an export, the dashboard) reads them as null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fieldscope.edge.message import Identification
from fieldscope.edge.message_objects import ObjectMeasurements, SegmentationSummary

__all__ = [
    "OBJECT_BOOL_COLUMNS",
    "OBJECT_COLUMNS",
    "OBJECT_FLOAT_COLUMNS",
    "OBJECT_INT_COLUMNS",
    "add_columns",
    "add_object_columns",
    "existing_columns",
    "object_values",
]

# name, SQLite type, PostgreSQL type; in the order of RECORD_COLUMNS (and the CSV export).
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("frame_id", "TEXT", "TEXT"),
    ("object_index", "INTEGER", "INTEGER"),
    ("object_count", "INTEGER", "INTEGER"),
    ("bbox_x", "INTEGER", "INTEGER"),
    ("bbox_y", "INTEGER", "INTEGER"),
    ("bbox_width", "INTEGER", "INTEGER"),
    ("bbox_height", "INTEGER", "INTEGER"),
    ("touches_border", "INTEGER", "BOOLEAN"),
    ("area_px", "INTEGER", "BIGINT"),
    ("area_um2", "REAL", "DOUBLE PRECISION"),
    ("esd_um", "REAL", "DOUBLE PRECISION"),
    ("perimeter_um", "REAL", "DOUBLE PRECISION"),
    ("major_axis_um", "REAL", "DOUBLE PRECISION"),
    ("minor_axis_um", "REAL", "DOUBLE PRECISION"),
    ("eccentricity", "REAL", "DOUBLE PRECISION"),
    ("solidity", "REAL", "DOUBLE PRECISION"),
    ("mean_intensity", "REAL", "DOUBLE PRECISION"),
    ("objects_found", "INTEGER", "INTEGER"),
    ("objects_kept", "INTEGER", "INTEGER"),
    ("objects_rejected_by_size", "INTEGER", "INTEGER"),
    ("objects_touching_border", "INTEGER", "INTEGER"),
    ("objects_dropped_at_border", "INTEGER", "INTEGER"),
    ("objects_truncated", "INTEGER", "INTEGER"),
)
OBJECT_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _COLUMNS)
# Their types, for the exports.
OBJECT_BOOL_COLUMNS = frozenset(n for n, _, pg in _COLUMNS if pg == "BOOLEAN")
OBJECT_INT_COLUMNS = frozenset(
    n for n, lite, pg in _COLUMNS if lite == "INTEGER" and pg != "BOOLEAN"
)
OBJECT_FLOAT_COLUMNS = frozenset(n for n, lite, _ in _COLUMNS if lite == "REAL")
# The message parts' fields, in their order (the counts without background_ready).
_MEASUREMENTS = ObjectMeasurements.__struct_fields__
_COUNTS = tuple(f for f in SegmentationSummary.__struct_fields__ if f != "background_ready")
_NONE_OBJECT = (None,) * (8 + len(_MEASUREMENTS))


def object_values(message: Identification) -> tuple[Any, ...]:
    """The message's values for :data:`OBJECT_COLUMNS` (nulls where it has no parts)."""
    obj, summary = message.object, message.segmentation
    part: tuple[Any, ...] = _NONE_OBJECT
    if obj is not None:
        m = obj.measurements
        part = (
            obj.frame_id,
            obj.index,
            obj.count,
            *obj.bbox,
            obj.touches_border,
            *(getattr(m, name) for name in _MEASUREMENTS),
        )
    elif summary is not None:  # a frame without objects: still a frame of the sample
        part = (message.image.sha256, *_NONE_OBJECT[1:])
    counts = (None,) * len(_COUNTS)
    if summary is not None:
        counts = tuple(getattr(summary, name) for name in _COUNTS)
    return (*part, *counts)


def existing_columns(cur: Any, dialect: str) -> set[str]:
    """The columns ``identifications`` has now."""
    if dialect == "sqlite":
        cur.execute("PRAGMA table_info(identifications)")
        return {str(row[1]) for row in cur.fetchall()}
    cur.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'identifications' AND table_schema = current_schema()"
    )
    return {str(row[0]) for row in cur.fetchall()}


def add_object_columns(cur: Any, dialect: str) -> list[str]:
    """Add the object columns that ``identifications`` lacks (see the module docstring);
    returns their names. Run inside the transaction that creates the schema."""
    return add_columns(cur, dialect, _COLUMNS)


def add_columns(cur: Any, dialect: str, columns: Sequence[tuple[str, str, str]]) -> list[str]:
    """Add those of ``columns`` (name, SQLite type, PostgreSQL type) that
    ``identifications`` lacks, as nullable columns; returns their names."""
    have = existing_columns(cur, dialect)
    added = []
    for name, sqlite_type, postgres_type in columns:
        if name in have:
            continue
        kind = sqlite_type if dialect == "sqlite" else postgres_type
        cur.execute(f"ALTER TABLE identifications ADD COLUMN {name} {kind}")
        added.append(name)
    return added
