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

import contextlib
import hashlib
import json
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fieldscope.collect.records import (
    DeviceHeartbeat,
    DeviceModel,
    DeviceStatusChange,
    Invalid,
    Record,
    StoredIdentification,
    heartbeat_json,
    model_json,
    top_k_json,
)
from fieldscope.edge.errors import FieldscopeError, MessageError, MissingDependencyError
from fieldscope.edge.message import Identification

__all__ = [
    "DEFAULT_DB",
    "MAX_GAP",
    "SCHEMA_VERSION",
    "DeviceRow",
    "Filters",
    "IdentificationRow",
    "InvalidRow",
    "SeqGap",
    "Store",
    "StoreDataError",
    "StoreError",
    "WriteResult",
    "open_store",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_DB = "fieldscope-collect.sqlite"
BUSY_TIMEOUT_S = 30.0
# A jump in a device's seq larger than this is a new outbox on the station (a new file
# starts at the clock in milliseconds), not lost identifications: see Store.gaps.
MAX_GAP = 1_000_000
# Keys per query when looking for conflicting duplicates (2 parameters each).
_CONFLICT_CHUNK = 400

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
)
_IDENT_COLUMNS = (*RECORD_COLUMNS, "topic", "payload", "payload_sha256")
# What a listing reads back (the payload stays in the database).
_ROW_COLUMNS = ("id", *RECORD_COLUMNS, "topic")

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS fieldscope_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identifications (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    station TEXT NOT NULL,
    seq INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    status TEXT NOT NULL,
    label TEXT,
    score REAL,
    top_k TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    archived_path TEXT,
    quality_sharpness REAL,
    quality_exposure REAL,
    reason TEXT,
    capture_ms REAL NOT NULL,
    quality_ms REAL NOT NULL,
    preprocess_ms REAL NOT NULL,
    inference_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    message_version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_sha256 TEXT NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS identifications_captured_at ON identifications (captured_at);
CREATE INDEX IF NOT EXISTS identifications_station ON identifications (station, captured_at);
CREATE INDEX IF NOT EXISTS identifications_label ON identifications (label, captured_at);
CREATE TABLE IF NOT EXISTS invalid_messages (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    station TEXT NOT NULL,
    status TEXT,
    status_at TEXT,
    heartbeat_at TEXT,
    heartbeat_received_at TEXT,
    heartbeat TEXT,
    outbox_depth INTEGER,
    model_name TEXT,
    model_version TEXT,
    model_sha256 TEXT,
    model_info TEXT,
    updated_at TEXT NOT NULL
);
"""

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS fieldscope_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identifications (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device TEXT NOT NULL,
    station TEXT NOT NULL,
    seq BIGINT NOT NULL,
    captured_at TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    status TEXT NOT NULL,
    label TEXT,
    score DOUBLE PRECISION,
    top_k JSONB NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    archived_path TEXT,
    quality_sharpness DOUBLE PRECISION,
    quality_exposure DOUBLE PRECISION,
    reason TEXT,
    capture_ms DOUBLE PRECISION NOT NULL,
    quality_ms DOUBLE PRECISION NOT NULL,
    preprocess_ms DOUBLE PRECISION NOT NULL,
    inference_ms DOUBLE PRECISION NOT NULL,
    total_ms DOUBLE PRECISION NOT NULL,
    message_version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BYTEA NOT NULL,
    payload_sha256 TEXT NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS identifications_captured_at ON identifications (captured_at);
CREATE INDEX IF NOT EXISTS identifications_station ON identifications (station, captured_at);
CREATE INDEX IF NOT EXISTS identifications_label ON identifications (label, captured_at);
CREATE TABLE IF NOT EXISTS invalid_messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT,
    reason TEXT NOT NULL,
    payload BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    station TEXT NOT NULL,
    status TEXT,
    status_at TIMESTAMPTZ,
    heartbeat_at TIMESTAMPTZ,
    heartbeat_received_at TIMESTAMPTZ,
    heartbeat JSONB,
    outbox_depth BIGINT,
    model_name TEXT,
    model_version TEXT,
    model_sha256 TEXT,
    model_info JSONB,
    updated_at TIMESTAMPTZ NOT NULL
);
"""


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
    since: datetime | None = None
    until: datetime | None = None

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


@dataclass(frozen=True)
class IdentificationRow:
    """One stored identification, flattened (``top_k`` as (label, score) pairs)."""

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


@dataclass(frozen=True)
class DeviceRow:
    """A device as the collector last heard of it."""

    device: str
    station: str
    status: str | None
    status_at: datetime | None
    heartbeat_at: datetime | None
    heartbeat_received_at: datetime | None
    heartbeat: Mapping[str, Any] | None
    outbox_depth: int | None
    model_name: str | None
    model_version: str | None
    model_sha256: str | None
    model_info: Mapping[str, Any] | None
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


# --- the store ---------------------------------------------------------------------------------


class Store(ABC):
    """One connection to the collector's database; not thread-safe (one per thread).

    Create with :func:`open_store`. Use as a context manager or call :meth:`close`.
    """

    url: str
    _conn: Any

    # Dialect hooks --------------------------------------------------------------------------

    @abstractmethod
    def _ts(self, value: datetime) -> Any: ...

    @abstractmethod
    def _ts_out(self, value: Any) -> datetime: ...

    @abstractmethod
    def _json_out(self, value: Any) -> Any: ...

    @abstractmethod
    def _sql(self, sql: str) -> str:
        """The statement in the driver's parameter style (written with ``?``)."""

    @abstractmethod
    def _bucket_expr(self, bucket: str) -> str: ...

    @abstractmethod
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor inside one write transaction, committed when the block ends."""

    @abstractmethod
    def _errors(self) -> tuple[type[BaseException], ...]: ...

    @abstractmethod
    def _data_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's errors that blame the data, not the database (see StoreDataError)."""

    _json_param = "?"

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._errors() as exc:
            raise StoreError(f"{self.url}: cannot {what}: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._guard("read"):
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(sql), list(params))
                return [tuple(row) for row in cur.fetchall()]
            finally:
                cur.close()

    def _check_version(self, cur: Any) -> None:
        cur.execute("SELECT version FROM fieldscope_schema")
        rows = cur.fetchall()
        if not rows:
            cur.execute(self._sql("INSERT INTO fieldscope_schema (version) VALUES (?)"), [1])
            return
        version = int(rows[0][0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.url}: the database has schema version {version}, this fieldscope "
                f"knows up to {SCHEMA_VERSION}; upgrade fieldscope"
            )

    # Writing --------------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> WriteResult:
        """Store one batch in one transaction (see the module docstring).

        Raises:
            StoreDataError: a value of the batch cannot be stored; nothing was stored.
            StoreError: the transaction failed; nothing of the batch was stored.
        """
        idents = [r for r in records if isinstance(r, StoredIdentification)]
        invalid = [r for r in records if isinstance(r, Invalid)]
        updates = [
            r for r in records if isinstance(r, DeviceStatusChange | DeviceHeartbeat | DeviceModel)
        ]
        try:
            with self._guard("write"), self._transaction() as cur:
                stored, conflicts, kept = self._write_batch(cur, idents, invalid, updates)
        except StoreError as exc:
            if isinstance(exc.__cause__, self._data_errors()):
                raise StoreDataError(str(exc)) from exc.__cause__
            raise
        except (OverflowError, ValueError, TypeError, UnicodeError) as exc:
            # Raised by the driver while binding a parameter (an integer beyond 64 bits, a
            # string it cannot encode): the data is at fault, not the database.
            raise StoreDataError(
                f"{self.url}: cannot store a value of this batch: {type(exc).__name__}: "
                f"{str(exc)[:200]}"
            ) from exc
        return WriteResult(
            stored=stored,
            duplicates=len(idents) - stored - len(conflicts),
            invalid=len(kept),
            conflicts=len(conflicts),
            device_updates=len(updates),
        )

    def _write_batch(
        self,
        cur: Any,
        idents: Sequence[StoredIdentification],
        invalid: Sequence[Invalid],
        updates: Sequence[Record],
    ) -> tuple[int, list[Invalid], list[Invalid]]:
        """The statements of :meth:`write`, inside its transaction."""
        stored = 0
        conflicts: list[Invalid] = []
        if idents:
            stored = self._insert_identifications(cur, idents)
            if stored < len(idents):
                conflicts = self._conflicts(cur, idents)
        kept = [*invalid, *conflicts]
        if kept:
            cur.executemany(
                self._sql(
                    "INSERT INTO invalid_messages (received_at, topic, kind, reason, payload)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                [(self._ts(r.received_at), r.topic, r.kind, r.reason, r.payload) for r in kept],
            )
        for update in updates:
            self._update_device(cur, update)
        return stored, conflicts, kept

    def _insert_identifications(self, cur: Any, idents: Sequence[StoredIdentification]) -> int:
        names = ", ".join(_IDENT_COLUMNS)
        marks = ", ".join(self._json_param if c == "top_k" else "?" for c in _IDENT_COLUMNS)
        sql = (
            f"INSERT INTO identifications ({names}) VALUES ({marks}) "
            "ON CONFLICT (device, seq) DO NOTHING"
        )
        cur.executemany(self._sql(sql), [self._ident_values(r) for r in idents])
        return int(cur.rowcount)

    def _ident_values(self, r: StoredIdentification) -> tuple[Any, ...]:
        m = r.message
        q = m.quality
        t = m.timings_ms
        return (
            m.device,
            m.station,
            m.seq,
            self._ts(m.captured_at),
            self._ts(r.received_at),
            m.status.value,
            m.label,
            m.score,
            top_k_json(m),
            m.model.name,
            m.model.version,
            m.model.sha256,
            m.image.sha256,
            m.image.width,
            m.image.height,
            m.image.archived_path,
            None if q is None else q.sharpness,
            None if q is None else q.exposure,
            m.reason,
            t.capture,
            t.quality,
            t.preprocess,
            t.inference,
            t.total,
            m.version,
            r.topic,
            r.payload,
            r.payload_sha256,
        )

    def _conflicts(self, cur: Any, idents: Sequence[StoredIdentification]) -> list[Invalid]:
        """Messages of this batch whose (device, seq) is stored with other content."""
        stored: dict[tuple[str, int], str] = {}
        keys = list(dict.fromkeys(r.message.key for r in idents))
        for start in range(0, len(keys), _CONFLICT_CHUNK):
            chunk = keys[start : start + _CONFLICT_CHUNK]
            values = ", ".join("(?, ?)" for _ in chunk)
            cur.execute(
                self._sql(
                    "SELECT device, seq, payload_sha256 FROM identifications "
                    f"WHERE (device, seq) IN (VALUES {values})"
                ),
                [v for key in chunk for v in key],
            )
            stored.update({(row[0], int(row[1])): row[2] for row in cur.fetchall()})
        conflicts: list[Invalid] = []
        for r in idents:
            digest = stored.get(r.message.key)
            if digest is None or digest == r.payload_sha256:
                continue
            # Other bytes may still be the same message (another JSON encoder): compare content.
            cur.execute(
                self._sql("SELECT payload FROM identifications WHERE device = ? AND seq = ?"),
                [r.message.device, r.message.seq],
            )
            (payload,) = cur.fetchone()
            try:
                same = Identification.from_json(bytes(payload)) == r.message
            except MessageError:
                same = False
            if not same:
                reason = (
                    f"seq {r.message.seq} of device {r.message.device!r} is already stored "
                    "with other content (was the station's outbox reset?); the stored one "
                    "was kept"
                )
                conflicts.append(
                    Invalid(r.topic, "identification", r.payload, reason, r.received_at)
                )
        return conflicts

    def _update_device(self, cur: Any, update: Record) -> None:
        now = self._ts(datetime.now(UTC))
        if isinstance(update, DeviceStatusChange):
            status = None if update.status is None else update.status.value
            cur.execute(
                self._sql(
                    "INSERT INTO devices (device, station, status, status_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET "
                    "station = excluded.station, status = excluded.status, "
                    "status_at = excluded.status_at, updated_at = excluded.updated_at"
                ),
                [update.device, update.station, status, self._ts(update.received_at), now],
            )
        elif isinstance(update, DeviceHeartbeat):
            hb = update.heartbeat
            model = hb.model
            cur.execute(
                self._sql(
                    "INSERT INTO devices (device, station, heartbeat_at, heartbeat_received_at, "
                    "heartbeat, outbox_depth, model_name, model_version, model_sha256, updated_at)"
                    f" VALUES (?, ?, ?, ?, {self._json_param}, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (device) DO UPDATE SET station = excluded.station, "
                    "heartbeat_at = excluded.heartbeat_at, "
                    "heartbeat_received_at = excluded.heartbeat_received_at, "
                    "heartbeat = excluded.heartbeat, outbox_depth = excluded.outbox_depth, "
                    "model_name = COALESCE(excluded.model_name, devices.model_name), "
                    "model_version = COALESCE(excluded.model_version, devices.model_version), "
                    "model_sha256 = COALESCE(excluded.model_sha256, devices.model_sha256), "
                    "updated_at = excluded.updated_at"
                ),
                [
                    update.device,
                    update.station,
                    self._ts(hb.time),
                    self._ts(update.received_at),
                    heartbeat_json(hb),
                    hb.outbox_depth,
                    None if model is None else model.name,
                    None if model is None else model.version,
                    None if model is None else model.sha256,
                    now,
                ],
            )
        elif isinstance(update, DeviceModel):
            info = update.info
            cur.execute(
                self._sql(
                    "INSERT INTO devices (device, station, model_name, model_version, "
                    f"model_sha256, model_info, updated_at) VALUES (?, ?, ?, ?, ?, "
                    f"{self._json_param}, ?) ON CONFLICT (device) DO UPDATE SET "
                    "station = excluded.station, model_name = excluded.model_name, "
                    "model_version = excluded.model_version, "
                    "model_sha256 = excluded.model_sha256, model_info = excluded.model_info, "
                    "updated_at = excluded.updated_at"
                ),
                [
                    update.device,
                    update.station,
                    None if info is None else info.model.name,
                    None if info is None else info.model.version,
                    None if info is None else info.model.sha256,
                    None if info is None else model_json(info),
                    now,
                ],
            )

    # Reading --------------------------------------------------------------------------------

    def _where(self, filters: Filters) -> _Where:
        clauses: list[str] = []
        params: list[Any] = []
        for column, values in (
            ("station", filters.stations),
            ("device", filters.devices),
            ("label", filters.labels),
            ("status", filters.statuses),
        ):
            if values:
                clauses.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params.extend(values)
        if filters.since is not None:
            clauses.append("captured_at >= ?")
            params.append(self._ts(filters.since))
        if filters.until is not None:
            clauses.append("captured_at < ?")
            params.append(self._ts(filters.until))
        return _Where(" WHERE " + " AND ".join(clauses) if clauses else "", params)

    def _row(self, values: Sequence[Any]) -> IdentificationRow:
        data = dict(zip(_ROW_COLUMNS, values, strict=True))
        data["captured_at"] = self._ts_out(data["captured_at"])
        data["received_at"] = self._ts_out(data["received_at"])
        data["top_k"] = tuple(
            (str(c["label"]), float(c["score"])) for c in self._json_out(data["top_k"])
        )
        return IdentificationRow(**data)

    def count(self, filters: Filters = Filters()) -> int:
        """How many identifications match ``filters``."""
        where = self._where(filters)
        return int(
            self._query(f"SELECT COUNT(*) FROM identifications{where.sql}", where.params)[0][0]
        )

    def identifications(
        self, filters: Filters = Filters(), *, limit: int = 100, offset: int = 0
    ) -> list[IdentificationRow]:
        """The latest matching identifications, newest capture first."""
        where = self._where(filters)
        sql = (
            f"SELECT {', '.join(_ROW_COLUMNS)} FROM identifications{where.sql} "
            "ORDER BY captured_at DESC, id DESC LIMIT ? OFFSET ?"
        )
        return [self._row(v) for v in self._query(sql, [*where.params, limit, offset])]

    def iter_identifications(
        self, filters: Filters = Filters(), *, chunk: int = 2000
    ) -> Iterator[IdentificationRow]:
        """Every matching identification, oldest capture first, read in chunks (exports)."""
        where = self._where(filters)
        last: tuple[Any, int] | None = None
        while True:
            sql = f"SELECT {', '.join(_ROW_COLUMNS)} FROM identifications{where.sql}"
            params = list(where.params)
            if last is not None:
                # Keyset pagination: stable and fast however far the export has got.
                sql += (" AND" if where.sql else " WHERE") + " (captured_at, id) > (?, ?)"
                params.extend(last)
            sql += " ORDER BY captured_at, id LIMIT ?"
            rows = self._query(sql, [*params, chunk])
            for values in rows:
                yield self._row(values)
            if len(rows) < chunk:
                return
            row = rows[-1]
            last = (row[_ROW_COLUMNS.index("captured_at")], int(row[0]))

    def identification(self, ident_id: int) -> IdentificationRow | None:
        rows = self._query(
            f"SELECT {', '.join(_ROW_COLUMNS)} FROM identifications WHERE id = ?", [ident_id]
        )
        return self._row(rows[0]) if rows else None

    def label_counts(
        self, filters: Filters = Filters(), bucket: str = "day"
    ) -> list[tuple[datetime, str, int]]:
        """Counts per (time bucket, label) — an uncertain or rejected capture counts under
        ``(uncertain)`` or ``(rejected)``. ``bucket`` is ``day`` or ``hour`` (UTC)."""
        if bucket not in ("day", "hour"):
            raise StoreError(f"bucket must be day or hour, got {bucket!r}")
        where = self._where(filters)
        expr = self._bucket_expr(bucket)
        sql = (
            f"SELECT {expr} AS bucket, COALESCE(label, '(' || status || ')') AS name, COUNT(*) "
            f"FROM identifications{where.sql} GROUP BY 1, 2 ORDER BY 1, 2"
        )
        fmt = "%Y-%m-%d" if bucket == "day" else "%Y-%m-%dT%H"
        return [
            (datetime.strptime(b, fmt).replace(tzinfo=UTC), str(name), int(n))
            for b, name, n in self._query(sql, where.params)
        ]

    def time_range(self, filters: Filters = Filters()) -> tuple[datetime, datetime] | None:
        where = self._where(filters)
        rows = self._query(
            f"SELECT MIN(captured_at), MAX(captured_at) FROM identifications{where.sql}",
            where.params,
        )
        if not rows or rows[0][0] is None:
            return None
        return self._ts_out(rows[0][0]), self._ts_out(rows[0][1])

    def distinct(self, column: str) -> list[str]:
        """The values of ``station``, ``device``, ``label`` or ``status`` seen so far."""
        if column not in ("station", "device", "label", "status"):
            raise StoreError(f"no distinct listing for column {column!r}")
        rows = self._query(
            f"SELECT DISTINCT {column} FROM identifications WHERE {column} IS NOT NULL "
            f"ORDER BY {column}"
        )
        return [str(r[0]) for r in rows]

    def devices(self) -> list[DeviceRow]:
        """Every device heard of, by station then name."""
        columns = (
            "device, station, status, status_at, heartbeat_at, heartbeat_received_at, "
            "heartbeat, outbox_depth, model_name, model_version, model_sha256, model_info, "
            "updated_at"
        )
        rows = self._query(f"SELECT {columns} FROM devices ORDER BY station, device")
        out = []
        for r in rows:
            out.append(
                DeviceRow(
                    device=r[0],
                    station=r[1],
                    status=r[2],
                    status_at=None if r[3] is None else self._ts_out(r[3]),
                    heartbeat_at=None if r[4] is None else self._ts_out(r[4]),
                    heartbeat_received_at=None if r[5] is None else self._ts_out(r[5]),
                    heartbeat=None if r[6] is None else self._json_out(r[6]),
                    outbox_depth=r[7],
                    model_name=r[8],
                    model_version=r[9],
                    model_sha256=r[10],
                    model_info=None if r[11] is None else self._json_out(r[11]),
                    updated_at=self._ts_out(r[12]),
                )
            )
        return out

    def device_activity(self) -> dict[str, tuple[int, datetime]]:
        """Per device: identifications stored and the latest capture time."""
        rows = self._query(
            "SELECT device, COUNT(*), MAX(captured_at) FROM identifications GROUP BY device"
        )
        return {str(r[0]): (int(r[1]), self._ts_out(r[2])) for r in rows}

    def invalid_messages(self, *, limit: int = 100) -> list[InvalidRow]:
        """The latest messages kept apart, newest first."""
        rows = self._query(
            "SELECT id, received_at, topic, kind, reason, payload FROM invalid_messages "
            "ORDER BY id DESC LIMIT ?",
            [limit],
        )
        return [
            InvalidRow(int(r[0]), self._ts_out(r[1]), r[2], r[3], r[4], bytes(r[5])) for r in rows
        ]

    def count_invalid(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM invalid_messages")[0][0])

    # Gaps in each device's seq ---------------------------------------------------------------

    # Between two stored neighbours (ordered by seq) of one device. Before the first one
    # stored nothing can be said: a station's first seq comes from its clock. A jump of
    # more than MAX_GAP is a new outbox on the station (its first seq is the clock in
    # milliseconds), not lost messages.
    _GAPS_SQL = (
        "SELECT device, station, prev + 1, seq - 1 FROM ("
        "SELECT device, station, seq, LAG(seq) OVER (PARTITION BY device ORDER BY seq) AS prev "
        "FROM identifications{where}) AS ordered WHERE seq - prev > 1 AND seq - prev <= ?"
    )

    def gaps(self, devices: Sequence[str] = (), *, limit: int = 1000) -> list[SeqGap]:
        """The gaps in each device's ``seq`` (see :class:`SeqGap`), by device then seq;
        at most ``limit`` of them. Computed from the stored rows, so always current."""
        where, params = self._device_where(devices)
        sql = self._GAPS_SQL.format(where=where) + " ORDER BY device, prev LIMIT ?"
        return [
            SeqGap(str(r[0]), str(r[1]), int(r[2]), int(r[3]))
            for r in self._query(sql, [*params, MAX_GAP + 1, limit])
        ]

    def missing_counts(self, devices: Sequence[str] = ()) -> dict[str, int]:
        """Per device with a gap: how many identifications are missing in all its gaps."""
        where, params = self._device_where(devices)
        sql = (
            "SELECT device, SUM(missing) FROM (SELECT device, seq - prev - 1 AS missing FROM ("
            "SELECT device, seq, LAG(seq) OVER (PARTITION BY device ORDER BY seq) AS prev "
            f"FROM identifications{where}) AS ordered WHERE seq - prev > 1 "
            "AND seq - prev <= ?) AS gaps GROUP BY device"
        )
        return {str(r[0]): int(r[1]) for r in self._query(sql, [*params, MAX_GAP + 1])}

    def max_seq(self, device: str) -> int | None:
        """The highest ``seq`` stored for ``device``, or None."""
        rows = self._query("SELECT MAX(seq) FROM identifications WHERE device = ?", [device])
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    @staticmethod
    def _device_where(devices: Sequence[str]) -> tuple[str, list[Any]]:
        if not devices:
            return "", []
        return f" WHERE device IN ({', '.join('?' for _ in devices)})", list(devices)


# --- SQLite --------------------------------------------------------------------------------------


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class SqliteStore(Store):
    """The default store: one file, WAL mode."""

    def __init__(self, path: Path, *, create: bool = True, durable: bool = False) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        if not create and not path.is_file():
            raise StoreError(
                f"no collector database at {path}; start `fieldscope collect --db {path}` "
                "first, or pass the right --db"
            )
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite database {path}: {exc}") from exc
        with self._guard("set up the database"):
            if create:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                with self._transaction() as cur:
                    for statement in _SQLITE_SCHEMA.split(";"):
                        if statement.strip():
                            cur.execute(statement)
                    self._check_version(cur)
            else:
                self._conn.execute("PRAGMA query_only=1")
                try:
                    self._conn.execute("SELECT 1 FROM fieldscope_schema").fetchall()
                except sqlite3.OperationalError:
                    raise StoreError(
                        f"{path} is not a fieldscope collector database (no fieldscope_schema "
                        "table)"
                    ) from None

    def _ts(self, value: datetime) -> Any:
        return _utc_text(value)

    def _ts_out(self, value: Any) -> datetime:
        return datetime.fromisoformat(str(value)).astimezone(UTC)

    def _json_out(self, value: Any) -> Any:
        return json.loads(value)

    def _sql(self, sql: str) -> str:
        return sql

    def _bucket_expr(self, bucket: str) -> str:
        return f"substr(captured_at, 1, {10 if bucket == 'day' else 13})"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _data_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.DataError, sqlite3.IntegrityError)


# --- PostgreSQL ----------------------------------------------------------------------------------

# Any constant: serialises schema creation between collectors starting together.
_SCHEMA_LOCK = int.from_bytes(hashlib.sha256(b"fieldscope.collect").digest()[:4], "big")


class PostgresStore(Store):
    """PostgreSQL through psycopg 3, for a fleet beyond one SQLite file."""

    _json_param = "?::jsonb"

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise MissingDependencyError(
                "PostgreSQL needs psycopg: pip install 'fieldscope[collect]' "
                "(or pip install 'psycopg[binary]')"
            ) from exc
        self._psycopg = psycopg
        self.url = _redact(url)
        try:
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {self.url}: {exc}".strip()) from exc
        with self._guard("set up the database"):
            if create:
                with self._transaction() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
                    cur.execute(_POSTGRES_SCHEMA)
                    self._check_version(cur)
            else:
                cur = self._conn.cursor()
                cur.execute("SELECT to_regclass('fieldscope_schema')")
                row = cur.fetchone()
                if row is None or row[0] is None:
                    raise StoreError(
                        f"{self.url} has no fieldscope collector tables; start "
                        "`fieldscope collect --db ...` on it first"
                    )

    def _ts(self, value: datetime) -> Any:
        return value.astimezone(UTC)

    def _ts_out(self, value: Any) -> datetime:
        if isinstance(value, str):
            return datetime.fromisoformat(value).astimezone(UTC)
        assert isinstance(value, datetime)
        return value.astimezone(UTC)

    def _json_out(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _bucket_expr(self, bucket: str) -> str:
        fmt = "YYYY-MM-DD" if bucket == "day" else 'YYYY-MM-DD"T"HH24'
        return f"to_char(captured_at AT TIME ZONE 'UTC', '{fmt}')"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._conn.transaction(), self._conn.cursor() as cur:
            yield cur

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)

    def _data_errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.DataError, self._psycopg.IntegrityError)


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
    return parsed._replace(netloc=netloc).geturl()


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
