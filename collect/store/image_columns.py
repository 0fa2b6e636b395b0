"""The columns of an identification's uploaded image (``image.upload_sha256``, the key
of the copy the station published on its ``image`` topic, and ``image.source_name``,
the file the frame came from), and the migration that adds them.

With them the dashboard finds a row's image in the collector's image store
(:mod:`fieldscope.collect.images`) by one column, without reading the payload.
Migration as for the object and site columns (:mod:`.object_columns`): a writer adds
what an older database lacks, a reader reads the missing columns as null.
"""

from __future__ import annotations

from typing import Any

from fieldscope.collect.store.object_columns import add_columns
from fieldscope.edge.message import Identification

__all__ = ["IMAGE_COLUMNS", "add_image_columns", "image_values"]

# name, SQLite type, PostgreSQL type; in the order of RECORD_COLUMNS (and the CSV export).
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("upload_sha256", "TEXT", "TEXT"),
    ("source_name", "TEXT", "TEXT"),
)
IMAGE_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _COLUMNS)


def image_values(message: Identification) -> tuple[Any, ...]:
    """The message's values for :data:`IMAGE_COLUMNS` (null where it has none)."""
    return (message.image.upload_sha256, message.image.source_name)


def add_image_columns(cur: Any, dialect: str) -> list[str]:
    """Add the image columns ``identifications`` lacks; returns the columns added."""
    return add_columns(cur, dialect, _COLUMNS)
