"""The two databases: SQLite (one file, WAL) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fieldscope.collect.store.base import Store
from fieldscope.collect.store.image_columns import IMAGE_COLUMNS, add_image_columns
from fieldscope.collect.store.object_columns import (
    OBJECT_COLUMNS,
    add_object_columns,
    existing_columns,
)
from fieldscope.collect.store.reviews import POSTGRES_REVIEWS, SQLITE_REVIEWS
from fieldscope.collect.store.rows import BUSY_TIMEOUT_S, StoreError
from fieldscope.collect.store.schema import _POSTGRES_SCHEMA, _SQLITE_SCHEMA
from fieldscope.collect.store.site_columns import SITE_COLUMNS, add_site_columns
from fieldscope.edge.errors import MissingDependencyError

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
                    for statement in (_SQLITE_SCHEMA + SQLITE_REVIEWS).split(";"):
                        if statement.strip():
                            cur.execute(statement)
                    self._check_version(cur)
                    add_object_columns(cur, "sqlite")
                    add_site_columns(cur, "sqlite")
                    add_image_columns(cur, "sqlite")
            else:
                self._conn.execute("PRAGMA query_only=1")
                try:
                    self._conn.execute("SELECT 1 FROM fieldscope_schema").fetchall()
                except sqlite3.OperationalError:
                    raise StoreError(
                        f"{path} is not a fieldscope collector database (no fieldscope_schema "
                        "table)"
                    ) from None
                self._absent = _absent(self._conn.cursor(), "sqlite")

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
    _review_table_sql = "SELECT COUNT(to_regclass('annotations'))"

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
                    cur.execute(POSTGRES_REVIEWS)
                    self._check_version(cur)
                    add_object_columns(cur, "postgres")
                    add_site_columns(cur, "postgres")
                    add_image_columns(cur, "postgres")
            else:
                cur = self._conn.cursor()
                cur.execute("SELECT to_regclass('fieldscope_schema')")
                row = cur.fetchone()
                if row is None or row[0] is None:
                    raise StoreError(
                        f"{self.url} has no fieldscope collector tables; start "
                        "`fieldscope collect --db ...` on it first"
                    )
                self._absent = _absent(cur, "postgres")

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


def _absent(cur: Any, dialect: str) -> frozenset[str]:
    """The object, site, sample and image columns an older database (not yet opened by
    a writer) lacks."""
    optional = (*OBJECT_COLUMNS, *SITE_COLUMNS, *IMAGE_COLUMNS)
    return frozenset(optional) - existing_columns(cur, dialect)


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
    return parsed._replace(netloc=netloc).geturl()
