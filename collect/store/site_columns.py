"""The columns of an identification's site and sample (``[site]``, the ``sample``
command; docs/mqtt.md, "Site and sample"), and the migration that adds them.

They are nullable columns of ``identifications``, named as in the message (the site's
``name`` as ``site_name``, the sample's members with a ``sample_`` prefix), so a count
per sample or a map of the stations is one query and the exports carry them as columns.
A message without the parts (an older station, a station without ``[site]``, no sample
running) leaves them null. ``sample_started_at`` is the UTC text the message writes.

Migration as for the object columns (:mod:`.object_columns`): a writer adds what an
older database lacks, a reader reads the missing columns as null.
"""

from __future__ import annotations

from typing import Any

from fieldscope.collect.store.object_columns import add_columns
from fieldscope.edge.message import Identification
from fieldscope.edge.wire import utc_text

__all__ = ["SITE_COLUMNS", "SITE_FLOAT_COLUMNS", "add_site_columns", "site_values"]

# name, SQLite type, PostgreSQL type; in the order of RECORD_COLUMNS (and the CSV export).
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("site_name", "TEXT", "TEXT"),
    ("decimal_latitude", "REAL", "DOUBLE PRECISION"),
    ("decimal_longitude", "REAL", "DOUBLE PRECISION"),
    ("geodetic_datum", "TEXT", "TEXT"),
    ("coordinate_uncertainty_m", "REAL", "DOUBLE PRECISION"),
    ("elevation_m", "REAL", "DOUBLE PRECISION"),
    ("depth_m", "REAL", "DOUBLE PRECISION"),
    ("country_code", "TEXT", "TEXT"),
    ("locality", "TEXT", "TEXT"),
    ("sample_id", "TEXT", "TEXT"),
    ("sample_started_at", "TEXT", "TEXT"),
    ("sample_volume_l", "REAL", "DOUBLE PRECISION"),
    ("sample_operator", "TEXT", "TEXT"),
    ("sample_notes", "TEXT", "TEXT"),
)
SITE_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _COLUMNS)
SITE_FLOAT_COLUMNS = frozenset(n for n, lite, _ in _COLUMNS if lite == "REAL")
_SAMPLE_INDEX = (
    "CREATE INDEX IF NOT EXISTS identifications_sample ON identifications (sample_id, captured_at)"
)


def site_values(message: Identification) -> tuple[Any, ...]:
    """The message's values for :data:`SITE_COLUMNS` (nulls where it has no parts)."""
    site, sample = message.site, message.sample
    where: tuple[Any, ...] = (None,) * 9
    if site is not None:
        where = (
            site.name,
            site.decimal_latitude,
            site.decimal_longitude,
            site.geodetic_datum,
            site.coordinate_uncertainty_m,
            site.elevation_m,
            site.depth_m,
            site.country_code,
            site.locality,
        )
    what: tuple[Any, ...] = (None,) * 5
    if sample is not None:
        started = None if sample.started_at is None else utc_text(sample.started_at)
        what = (sample.id, started, sample.volume_l, sample.operator, sample.notes)
    return (*where, *what)


def add_site_columns(cur: Any, dialect: str) -> list[str]:
    """Add the site and sample columns ``identifications`` lacks, and the index that
    makes a sample's identifications one lookup; returns the columns added."""
    added = add_columns(cur, dialect, _COLUMNS)
    cur.execute(_SAMPLE_INDEX)
    return added
