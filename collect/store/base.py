"""The store's connection, lifecycle and queries (reading); writing is in ``writer``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from fieldscope.collect.store.objects import ObjectStore
from fieldscope.collect.store.reviews import ReviewStore
from fieldscope.collect.store.rows import (
    _ROW_COLUMNS,
    MAX_GAP,
    SCHEMA_VERSION,
    DeviceRow,
    Filters,
    IdentificationRow,
    InvalidRow,
    SeqGap,
    StoreError,
    _Where,
)
from fieldscope.collect.store.writer import StoreWriter

# --- the store ---------------------------------------------------------------------------------


class Store(StoreWriter, ReviewStore, ObjectStore):
    """One connection to the collector's database; not thread-safe (one per thread).

    Create with :func:`open_store`. Use as a context manager or call :meth:`close`.
    """

    url: str
    _conn: Any
    # Columns an older database lacks, read as null (a reader does not migrate it).
    _absent: frozenset[str] = frozenset()

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._guard("read"):
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(sql), list(params))
                return [tuple(row) for row in cur.fetchall()]
            finally:
                cur.close()

    def _write_one(self, sql: str, params: Sequence[Any]) -> Any:
        """Run one ``INSERT ... RETURNING`` in its own transaction; the value returned."""
        with self._guard("write"), self._transaction() as cur:
            cur.execute(self._sql(sql), list(params))
            return cur.fetchone()[0]

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
        if filters.samples:
            # An older database without the column holds no sample: nothing matches.
            if "sample_id" in self._absent:
                clauses.append("1 = 0")
            else:
                clauses.append(f"sample_id IN ({', '.join('?' for _ in filters.samples)})")
                params.extend(filters.samples)
        if filters.since is not None:
            clauses.append("captured_at >= ?")
            params.append(self._ts(filters.since))
        if filters.until is not None:
            clauses.append("captured_at < ?")
            params.append(self._ts(filters.until))
        for bound, op in ((filters.min_score, ">="), (filters.max_score, "<=")):
            if bound is not None:
                clauses.append(f"score {op} ?")
                params.append(float(bound))
        return _Where(" WHERE " + " AND ".join(clauses) if clauses else "", params)

    def _row(self, values: Sequence[Any]) -> IdentificationRow:
        data = dict(zip(_ROW_COLUMNS, values, strict=True))
        data["captured_at"] = self._ts_out(data["captured_at"])
        data["received_at"] = self._ts_out(data["received_at"])
        data["top_k"] = tuple(
            (str(c["label"]), float(c["score"])) for c in self._json_out(data["top_k"])
        )
        if data["touches_border"] is not None:  # SQLite keeps booleans as 0/1
            data["touches_border"] = bool(data["touches_border"])
        return IdentificationRow(**data)

    def _columns(self) -> str:
        """The row columns of a SELECT, an older database's missing ones as null."""
        return ", ".join(f"NULL AS {c}" if c in self._absent else c for c in _ROW_COLUMNS)

    def count(self, filters: Filters = Filters()) -> int:
        """How many identifications match ``filters``."""
        where = self._where(filters)
        return int(
            self._query(f"SELECT COUNT(*) FROM identifications{where.sql}", where.params)[0][0]
        )

    def identifications(
        self,
        filters: Filters = Filters(),
        *,
        limit: int = 100,
        offset: int = 0,
        before: tuple[datetime, int] | None = None,
    ) -> list[IdentificationRow]:
        """The latest matching identifications, newest capture first.

        ``before`` = (captured_at, id) of the last row of a previous page: the rows
        after it in this order (keyset paging, stable while new rows arrive).
        """
        where = self._where(filters)
        params = list(where.params)
        sql = f"SELECT {self._columns()} FROM identifications{where.sql}"
        if before is not None:
            sql += (" AND" if where.sql else " WHERE") + " (captured_at, id) < (?, ?)"
            params += [self._ts(before[0]), before[1]]
        sql += " ORDER BY captured_at DESC, id DESC LIMIT ? OFFSET ?"
        return [self._row(v) for v in self._query(sql, [*params, limit, offset])]

    def group_counts(
        self, filters: Filters = Filters(), by: str = "label"
    ) -> list[tuple[str, int]]:
        """Matching identifications per ``label`` (an uncertain or rejected one as
        ``(uncertain)``/``(rejected)``), per ``device`` or per UTC ``day``; by key."""
        expressions = {
            "label": "COALESCE(label, '(' || status || ')')",
            "device": "device",
            "day": self._bucket_expr("day"),
        }
        if by not in expressions:
            raise StoreError(f"counts are by label, device or day, got {by!r}")
        where = self._where(filters)
        sql = (
            f"SELECT {expressions[by]} AS k, COUNT(*) FROM identifications{where.sql} "
            "GROUP BY 1 ORDER BY 1"
        )
        return [(str(k), int(n)) for k, n in self._query(sql, where.params)]

    def iter_identifications(
        self, filters: Filters = Filters(), *, chunk: int = 2000
    ) -> Iterator[IdentificationRow]:
        """Every matching identification, oldest capture first, read in chunks (exports)."""
        where = self._where(filters)
        last: tuple[Any, int] | None = None
        while True:
            sql = f"SELECT {self._columns()} FROM identifications{where.sql}"
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
            f"SELECT {self._columns()} FROM identifications WHERE id = ?", [ident_id]
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
        """The values of ``station``, ``device``, ``label``, ``status`` or ``sample_id``
        seen so far."""
        if column not in ("station", "device", "label", "status", "sample_id"):
            raise StoreError(f"no distinct listing for column {column!r}")
        if column in self._absent:
            return []
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
