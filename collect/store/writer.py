"""Writing one batch: identifications once by (device, seq), conflicts and invalid
messages kept apart, device rows updated; all in one transaction."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

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
from fieldscope.collect.store.image_columns import image_values
from fieldscope.collect.store.object_columns import object_values
from fieldscope.collect.store.rows import _IDENT_COLUMNS, StoreDataError, StoreError, WriteResult
from fieldscope.collect.store.site_columns import site_values
from fieldscope.edge.errors import MessageError
from fieldscope.edge.message import Identification

# Keys per query when looking for conflicting duplicates (2 parameters each).
_CONFLICT_CHUNK = 400


class StoreWriter(ABC):
    """The writing half of :class:`~fieldscope.collect.store.Store` (a mixin: the
    dialect hooks ``_sql``, ``_ts``, ``_guard``, ``_transaction`` come from Store)."""

    url: str

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

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._errors() as exc:
            raise StoreError(f"{self.url}: cannot {what}: {exc}") from exc

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
            *object_values(m),
            *site_values(m),
            *image_values(m),
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
            self._update_status(cur, update, now)
        elif isinstance(update, DeviceHeartbeat):
            self._update_heartbeat(cur, update, now)
        elif isinstance(update, DeviceModel):
            self._update_model(cur, update, now)

    def _update_status(self, cur: Any, update: DeviceStatusChange, now: Any) -> None:
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

    def _update_heartbeat(self, cur: Any, update: DeviceHeartbeat, now: Any) -> None:
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

    def _update_model(self, cur: Any, update: DeviceModel, now: Any) -> None:
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
