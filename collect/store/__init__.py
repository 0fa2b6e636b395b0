"""The collector's store: SQLite (a file, the default) or PostgreSQL, one schema.

Decisions:

* **Identity is** ``(device, seq)`` (see docs/mqtt.md): a ``UNIQUE`` constraint and
  ``INSERT ... ON CONFLICT DO NOTHING`` store a QoS-1 redelivery or an outbox replay
  once, even when several collectors write into one database at the same time.
* **A seq reused with other content** (a station whose outbox was wiped starts again
  at 0) is *not* a duplicate: the second message is kept in ``invalid_messages`` with
  the reason, so it is never lost silently. Checking costs one indexed query per
  batch that had a conflict, and nothing for batches without one.
* **One transaction per batch**: the collector acknowledges a message to the broker
  only after the transaction that stored it has committed.
* **SQLite** runs in WAL mode (readers such as the dashboard never block the
  writer), with ``BEGIN IMMEDIATE`` and a busy timeout so that several collectors can
  share one file. ``synchronous=NORMAL`` survives a crash or ``kill -9`` of the
  collector; ``durable=True`` (``synchronous=FULL``) also survives a power cut of
  the collector's host, at the price of an fsync per batch.
* **Times** are stored in UTC: ``TIMESTAMPTZ`` in PostgreSQL, and in SQLite text of
  one fixed width (``2026-11-23T18:39:00.123456Z``) whose order is time order.
* The whole received payload is kept next to the columns, so a field that a later
  message version adds is never lost by an older collector.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from fieldscope.collect.store.base import Store
from fieldscope.collect.store.dialects import PostgresStore, SqliteStore
from fieldscope.collect.store.objects import (
    OBJECT_GROUPS,
    LabelObjects,
    LabelSizes,
    ObjectGroup,
    SizeDistribution,
    size_edges,
)
from fieldscope.collect.store.reviews import (
    NOT_A_TAXON,
    REVIEW_STATUSES,
    AnnotationError,
    AnnotationRow,
    QueueItem,
    UnknownIdentificationError,
)
from fieldscope.collect.store.rows import (
    BUSY_TIMEOUT_S,
    DEFAULT_DB,
    MAX_GAP,
    RECORD_COLUMNS,
    SCHEMA_VERSION,
    DeviceRow,
    Filters,
    IdentificationRow,
    InvalidRow,
    SeqGap,
    StoreDataError,
    StoreError,
    WriteResult,
)

__all__ = [
    "BUSY_TIMEOUT_S",
    "DEFAULT_DB",
    "MAX_GAP",
    "NOT_A_TAXON",
    "OBJECT_GROUPS",
    "RECORD_COLUMNS",
    "REVIEW_STATUSES",
    "SCHEMA_VERSION",
    "AnnotationError",
    "AnnotationRow",
    "DeviceRow",
    "Filters",
    "IdentificationRow",
    "InvalidRow",
    "LabelObjects",
    "LabelSizes",
    "ObjectGroup",
    "PostgresStore",
    "QueueItem",
    "SeqGap",
    "SizeDistribution",
    "SqliteStore",
    "Store",
    "StoreDataError",
    "StoreError",
    "UnknownIdentificationError",
    "WriteResult",
    "open_store",
    "size_edges",
]


def open_store(url: str, *, create: bool = True, durable: bool = False) -> Store:
    """The store at ``url``: ``postgresql://...``, ``sqlite:///path`` or a plain file path.

    ``create`` makes the database and its tables when missing (the collector);
    readers (export, dashboard) pass False and get a clear error for a wrong URL
    instead of an empty new database.

    Raises:
        StoreError: it cannot be opened, or it belongs to a newer fieldscope.
        MissingDependencyError: PostgreSQL without psycopg installed.
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreError(
            f"--db must be a file path, sqlite:///PATH or postgresql://..., got {url!r}"
        )
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, create=create)
    if scheme == "sqlite":
        path_text = unquote(url.split("://", 1)[1])
        if path_text.startswith("/") and not path_text.startswith("//"):
            # sqlite:///relative/path (three slashes) as in SQLAlchemy; four for absolute.
            path_text = path_text[1:]
        elif path_text.startswith("//"):
            path_text = path_text[1:]
        if not path_text:
            raise StoreError(f"--db {url!r} names no file; use sqlite:///collect.sqlite")
        return SqliteStore(Path(path_text), create=create, durable=durable)
    if scheme:
        raise StoreError(
            f"--db {url!r}: unknown database scheme {scheme!r}; use a file path, "
            "sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    return SqliteStore(Path(url), create=create, durable=durable)
