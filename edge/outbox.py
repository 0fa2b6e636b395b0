"""The durable outbox: every message is on disk before it is published.

An identification is stored here, under the next ``seq`` of the device, by the
thread that produced it; the MQTT link reads the backlog oldest-first and deletes
an entry only when the broker has acknowledged it (PUBACK). A broker outage, a
restart, ``kill -9`` or a power cut therefore loses nothing: what was not
acknowledged is sent again, and subscribers drop repeats by ``(device, seq)``.

Durability decisions:

* **The SQLite file** (WAL with ``synchronous=FULL``, exclusive locking, errors as
  values): see :mod:`fieldscope.edge.outbox_db`.
* **``seq`` is its own persisted counter** (table ``meta``), allocated in the same
  transaction that stores the payload built for it, so a message and its ``seq``
  can never diverge, and a ``seq`` is never reused, even after every row has been
  deleted. The entry's key *is* its ``seq``: order is by ``seq``, never by a
  clock, so a clock that jumps (a Pi without an RTC setting its time from NTP)
  reorders nothing.
* **A size cap with a stated policy.** ``drop-oldest`` (the default) deletes the
  oldest entries to make room — the station keeps reporting what it sees now;
  ``reject-new`` refuses the new message with :class:`OutboxFullError` and keeps
  the backlog. Either way the ``seq`` of a lost message is used up, so a
  subscriber sees the loss as a gap, and the persisted ``dropped`` count lets
  health report losses honestly. ``max_bytes`` caps the file (``max_page_count``);
  the same policy applies when it is reached.
* **Where a new outbox starts counting:** :func:`clock_first_seq` (see
  :mod:`fieldscope.edge.outbox_db`).
* **Source keys for exactly-once files.** A message may carry a ``source_key``
  (the folder camera's file identity), stored in the same transaction as the
  message and kept after the message is acknowledged. If the daemon dies after
  storing a file's identification but before the camera recorded the file as
  handled, the file is offered again at the next start; :meth:`Outbox.source_seq`
  finds its key, and the daemon marks the file handled instead of publishing it a
  second time under a new ``seq`` (a duplicate ``(device, seq)`` cannot catch).
  Keys of the last :data:`MAX_SOURCE_KEYS` seqs are kept; a file is marked handled
  right after its commit, so only the last few can ever be asked for.
* **Sent messages kept for re-sending.** With ``keep_sent=N`` an acknowledged
  message moves to the ``sent`` table instead of being deleted, in the same
  transaction, and the last ``N`` seqs stay there. A collector that found a gap
  (messages the broker lost after acknowledging them) asks the station to
  re-send a range (the ``resend`` command): :meth:`Outbox.requeue` moves those rows
  back into the queue, and the link publishes them again under their own ``seq``.
  Kept rows are the first thing given up when the file reaches ``max_bytes``. An
  older fieldscope ignores the table.

Thread safety: one connection guarded by a lock. The writer is the classify
thread, the reader and acker the MQTT link; listeners registered with
:meth:`Outbox.add_listener` are called after each committed ``add`` so the link
wakes up without polling.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from fieldscope.edge.outbox_db import (
    FIRST_SEQ,
    SCHEMA_VERSION,
    Entry,
    OutboxBusyError,
    OutboxError,
    OutboxFullError,
    OutboxStats,
    WhenFull,
    _describe,
    _when_full,
    check_settings,
    clock_first_seq,
    is_disk_full,
    open_database,
    peek_stats,
)

__all__ = [
    "DEFAULT_KEEP_SENT",
    "FIRST_SEQ",
    "MAX_SOURCE_KEYS",
    "SCHEMA_VERSION",
    "Entry",
    "Outbox",
    "OutboxBusyError",
    "OutboxError",
    "OutboxFullError",
    "OutboxStats",
    "WhenFull",
    "clock_first_seq",
    "peek_stats",
]

logger = logging.getLogger(__name__)

# How many source keys (see the module docstring) are remembered.
MAX_SOURCE_KEYS = 10_000
# How many acknowledged messages (by seq) the daemon keeps for a ``resend``.
DEFAULT_KEEP_SENT = 10_000
# How many times a full database is retried after dropping older entries.
_MAX_FULL_RETRIES = 24


class Outbox:
    """A durable, ordered, capped queue of messages keyed by the device's ``seq``.

    ``Outbox(path)`` creates the file if needed and continues its ``seq``; a new file
    starts at ``first_seq`` (the daemon passes :func:`clock_first_seq`). Use it from
    any thread; close it (or use ``with``) when the daemon stops.

    Raises:
        OutboxError: the file cannot be opened (see the message for what to do).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_messages: int = 100_000,
        when_full: WhenFull | str = WhenFull.DROP_OLDEST,
        max_bytes: int | None = None,
        first_seq: int = FIRST_SEQ,
        keep_sent: int = 0,
    ) -> None:
        check_settings(
            max_messages=max_messages, max_bytes=max_bytes, first_seq=first_seq, keep_sent=keep_sent
        )
        self.path = Path(path)
        self.max_messages = max_messages
        self.when_full = _when_full(when_full)
        self.max_bytes = max_bytes
        self.keep_sent = keep_sent
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._dropping = False
        self._unsaved_losses = 0
        self._first_seq = first_seq
        self._conn = self._open()
        try:
            with self._lock:
                self._depth = int(self._scalar("SELECT count(*) FROM messages"))
                self._next_seq = self._meta("next_seq", first_seq)
                self._dropped = self._meta("dropped", 0)
        except sqlite3.Error as exc:
            self._conn.close()
            raise OutboxError(_describe(exc, self.path, "reading it")) from exc
        if self._depth:
            logger.info(
                "outbox %s: %d unsent message(s) from before, next seq %d",
                self.path,
                self._depth,
                self._next_seq,
            )

    # --- opening ------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        return open_database(
            self.path,
            first_seq=self._first_seq,
            keep_sent=self.keep_sent,
            max_bytes=self.max_bytes,
        )

    def _scalar(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def _meta(self, key: str, default: int) -> int:
        value = self._scalar("SELECT value FROM meta WHERE key = ?", (key,))
        return default if value is None else int(value)

    def _set_meta(self, key: str, value: int) -> None:
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT, with SQLite errors turned into OutboxError.

        Must be entered with ``self._lock`` held. On any error the transaction is
        rolled back (SQLite has already done so itself for a full disk).
        """
        self._check_open()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            yield
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise OutboxError(_describe(exc, self.path, action)) from exc
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    # --- writing --------------------------------------------------------------------------

    def add(
        self,
        topic: str,
        payload_factory: Callable[[int], bytes],
        qos: int = 1,
        *,
        source_key: str | None = None,
        lost_if_unstored: bool = True,
    ) -> Entry:
        """Store the message built for the next ``seq`` and return it, durably committed.

        ``payload_factory(seq)`` builds the payload (e.g. the identification carrying
        that ``seq``); it runs under the outbox's lock and the ``seq`` is committed in
        the same transaction as the payload, so it is consumed only if the message is
        stored. If the factory raises, nothing is stored and its exception propagates.
        ``source_key`` (e.g. a watched file's identity) is recorded in the same
        transaction; :meth:`source_seq` finds it later (see the module docstring).
        ``lost_if_unstored=False`` is for a caller that keeps the message and tries
        again when storing fails (the daemon's pipeline does): a failed try is then not
        a loss, and :meth:`note_lost` counts the message if the caller gives up on it.

        Raises:
            OutboxFullError: the outbox is full and its policy is ``reject-new`` (the
                ``seq`` is used up and the loss is counted in ``dropped``).
            OutboxError: the disk is full or the file is read-only or damaged; nothing
                was stored and no ``seq`` used up; unless ``lost_if_unstored`` is False
                the message counts as lost in ``dropped``.
        """
        if qos not in (0, 1, 2):
            raise OutboxError(f"outbox qos must be 0, 1 or 2, got {qos!r}")
        with self._lock:
            if self.when_full is WhenFull.REJECT_NEW and self._depth >= self.max_messages:
                self._reject()
            seq = self._next_seq
            payload = payload_factory(seq)
            if not isinstance(payload, bytes):
                raise TypeError(f"payload_factory must return bytes, got {type(payload).__name__}")
            entry = Entry(seq, topic, payload, qos, time.time())
            try:
                self._store(entry, source_key)
            except OutboxError:
                if lost_if_unstored:
                    # Not storable and not retried: count it now, persist with the next write.
                    self._unsaved_losses += 1
                raise
        self._notify()
        return entry

    def _notify(self) -> None:
        """Tell the listeners a message was stored (outside the lock)."""
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # the message is stored; a listener bug must not undo that
                logger.exception("outbox listener %r failed", listener)

    def note_lost(self, count: int = 1) -> None:
        """Count ``count`` messages the caller gave up storing (see :meth:`add`); the
        count is persisted with the next message that is stored."""
        with self._lock:
            self._unsaved_losses += max(0, count)

    def _reject(self) -> None:
        seq = self._next_seq
        with self._transaction("counting a rejected message"):
            self._set_meta("next_seq", seq + 1)
            self._set_meta("dropped", self._dropped + self._unsaved_losses + 1)
        self._next_seq = seq + 1
        self._dropped += self._unsaved_losses + 1
        self._unsaved_losses = 0
        if not self._dropping:
            logger.warning(
                "outbox %s is full (%d messages, policy reject-new): new messages are "
                "refused until the broker takes the backlog",
                self.path,
                self._depth,
            )
        self._dropping = True
        raise OutboxFullError(
            f"outbox {self.path} is full ({self._depth} of {self.max_messages} messages, "
            f"policy reject-new): message seq {seq} was dropped"
        )

    def _store(self, entry: Entry, source_key: str | None = None) -> None:
        """Insert ``entry``; under drop-oldest, make room by count and by ``max_bytes``.

        Dropping only helps against the outbox's own byte cap: SQLite never gives
        file space back, so on a really full disk the insert fails and the message
        is lost (counted), until the daemon's other files make room.
        """
        excess = self._depth + 1 - self.max_messages
        to_drop = max(0, excess) if self.when_full is WhenFull.DROP_OLDEST else 0
        can_make_room = self.when_full is WhenFull.DROP_OLDEST and self.max_bytes is not None
        for _ in range(_MAX_FULL_RETRIES):
            try:
                dropped = self._insert(entry, to_drop, source_key)
            except OutboxError as exc:
                full = is_disk_full(exc)
                if full and self._give_up_sent():
                    continue  # kept sent messages go first, then (below) the oldest unsent
                if not (full and can_make_room and to_drop < self._depth):
                    raise
                # Freed rows give their pages back only once whole leaves empty: widen.
                to_drop = min(self._depth, max(1, 2 * to_drop))
                continue
            if dropped:
                if not self._dropping:
                    logger.warning(
                        "outbox %s is full: dropping the oldest messages (policy drop-oldest)",
                        self.path,
                    )
                self._dropping = True
            elif self._depth < self.max_messages:
                self._dropping = False
            return
        raise OutboxError(f"outbox {self.path}: still full after dropping old messages")

    def _insert(self, entry: Entry, to_drop: int, source_key: str | None = None) -> int:
        with self._transaction(f"storing a {len(entry.payload)}-byte message"):
            dropped = 0
            if to_drop > 0:
                cursor = self._conn.execute(
                    "DELETE FROM messages WHERE seq IN "
                    "(SELECT seq FROM messages ORDER BY seq LIMIT ?)",
                    (to_drop,),
                )
                dropped = max(0, cursor.rowcount)
            if dropped or self._unsaved_losses:
                self._set_meta("dropped", self._dropped + self._unsaved_losses + dropped)
            self._conn.execute(
                "INSERT INTO messages(seq, topic, qos, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                (entry.seq, entry.topic, entry.qos, entry.payload, entry.created_at),
            )
            if source_key is not None:
                self._conn.execute(
                    "INSERT OR REPLACE INTO sources(key, seq) VALUES (?, ?)",
                    (source_key, entry.seq),
                )
                self._conn.execute(
                    "DELETE FROM sources WHERE seq <= ?", (entry.seq - MAX_SOURCE_KEYS,)
                )
            self._set_meta("next_seq", entry.seq + 1)
        self._next_seq = entry.seq + 1
        self._dropped += self._unsaved_losses + dropped
        self._unsaved_losses = 0
        self._depth += 1 - dropped
        return dropped

    def _give_up_sent(self) -> bool:
        """Delete the kept sent messages to make room (under the lock); True if any."""
        try:
            with self._transaction("deleting kept sent messages"):
                cursor = self._conn.execute("DELETE FROM sent")
        except OutboxError:
            return False
        if cursor.rowcount > 0:
            logger.warning(
                "outbox %s is full: gave up the %d sent message(s) kept for resend",
                self.path,
                cursor.rowcount,
            )
            return True
        return False

    def ack(self, entry_id: int) -> bool:
        """Delete an acknowledged entry; False if it was already gone (a repeated PUBACK).

        Raises:
            OutboxError: the file cannot be written (the entry stays and is sent again).
        """
        return self.ack_many((entry_id,)) == 1

    def ack_many(self, entry_ids: Iterable[int]) -> int:
        """Delete several acknowledged entries in one transaction (one fsync); the count.

        Raises:
            OutboxError: the file cannot be written (the entries stay and are sent again).
        """
        ids = sorted({int(i) for i in entry_ids})
        if not ids:
            return 0
        with self._lock:
            try:
                deleted = self._delete_acked(ids, keep=self.keep_sent > 0)
            except OutboxError as exc:
                full = is_disk_full(exc)
                if not (full and self.keep_sent):
                    raise
                # No room to keep copies: an acknowledgement must never fail for that.
                self._give_up_sent()
                deleted = self._delete_acked(ids, keep=False)
            # Only once committed: a failed COMMIT deleted nothing.
            self._depth -= deleted
            if self._depth < self.max_messages:
                self._dropping = False
        return deleted

    def _delete_acked(self, ids: list[int], *, keep: bool) -> int:
        """Delete acknowledged entries (under the lock), keeping copies if ``keep``."""
        with self._transaction("deleting acknowledged messages"):
            if keep:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO sent(seq, topic, qos, payload, created_at) "
                    "SELECT seq, topic, qos, payload, created_at FROM messages WHERE seq = ?",
                    [(i,) for i in ids],
                )
                self._conn.execute(
                    "DELETE FROM sent WHERE seq <= ?", (self._next_seq - 1 - self.keep_sent,)
                )
            cursor = self._conn.executemany(
                "DELETE FROM messages WHERE seq = ?", [(i,) for i in ids]
            )
            return max(0, cursor.rowcount)

    def requeue(self, first: int, last: int) -> tuple[int, int]:
        """Put the kept sent messages ``first``..``last`` back in the queue, to be
        published again under their own ``seq`` (the ``resend`` command); listeners
        are told. Returns (requeued, still queued): a seq of the range in neither is no
        longer kept (older than ``keep_sent``, or never existed).

        Raises:
            OutboxError: the file cannot be written.
        """
        if first > last:
            return 0, 0
        with self._lock:
            with self._transaction("re-queueing sent messages"):
                queued = int(
                    self._scalar(
                        "SELECT count(*) FROM messages WHERE seq BETWEEN ? AND ?", (first, last)
                    )
                )
                cursor = self._conn.execute(
                    "INSERT OR IGNORE INTO messages(seq, topic, qos, payload, created_at) "
                    "SELECT seq, topic, qos, payload, created_at FROM sent "
                    "WHERE seq BETWEEN ? AND ?",
                    (first, last),
                )
                moved = max(0, cursor.rowcount)
                self._conn.execute("DELETE FROM sent WHERE seq BETWEEN ? AND ?", (first, last))
            self._depth += moved
        if moved:
            self._notify()
        return moved, queued

    def kept_range(self) -> tuple[int, int] | None:
        """The lowest and highest seq kept for a resend, or None."""
        with self._lock:
            self._check_open()
            try:
                row = self._conn.execute("SELECT min(seq), max(seq) FROM sent").fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(_describe(exc, self.path, "reading sent messages")) from exc
        return None if row is None or row[0] is None else (int(row[0]), int(row[1]))

    # --- reading --------------------------------------------------------------------------

    def pending(self, limit: int, *, after: int = 0) -> list[Entry]:
        """Up to ``limit`` stored entries with ``seq > after``, oldest first.

        Raises:
            OutboxError: the file cannot be read.
        """
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            try:
                rows = self._conn.execute(
                    "SELECT seq, topic, payload, qos, created_at FROM messages "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(_describe(exc, self.path, "reading messages")) from exc
        return [Entry(int(s), str(t), bytes(p), int(q), float(c)) for s, t, p, q, c in rows]

    def source_seq(self, source_key: str) -> int | None:
        """The ``seq`` of the message stored with ``source_key``, or None if none was.

        Raises:
            OutboxError: the file cannot be read.
        """
        with self._lock:
            self._check_open()
            try:
                seq = self._scalar("SELECT seq FROM sources WHERE key = ?", (source_key,))
            except sqlite3.Error as exc:
                raise OutboxError(_describe(exc, self.path, "reading source keys")) from exc
        return None if seq is None else int(seq)

    def depth(self) -> int:
        """How many messages wait for an acknowledgement."""
        with self._lock:
            return self._depth

    def dropped(self) -> int:
        """How many messages were ever lost: to the size cap, or not storable.

        Persisted across restarts (a loss counted while the disk was full is written
        with the next message that can be stored).
        """
        with self._lock:
            return self._dropped + self._unsaved_losses

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next stored message gets."""
        with self._lock:
            return self._next_seq

    def oldest_age_s(self) -> float | None:
        """Seconds since the oldest waiting message was stored; None when empty.

        Wall-clock based (it must survive restarts), so it is clamped at 0 after a
        clock jump backwards; it is for health only and never orders anything.
        """
        with self._lock:
            self._check_open()
            try:
                created = self._scalar("SELECT created_at FROM messages ORDER BY seq LIMIT 1")
            except sqlite3.Error as exc:
                raise OutboxError(_describe(exc, self.path, "reading messages")) from exc
        if created is None:
            return None
        return max(0.0, time.time() - float(created))

    def stats(self) -> OutboxStats:
        """Depth, losses and age of the backlog, for the heartbeat."""
        age = self.oldest_age_s()
        with self._lock:
            return OutboxStats(
                depth=self._depth,
                dropped=self._dropped + self._unsaved_losses,
                next_seq=self._next_seq,
                oldest_age_s=age,
                max_messages=self.max_messages,
                when_full=self.when_full,
            )

    # --- wiring and lifetime ----------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every stored message (on the adding thread).

        The MQTT link registers its ``notify`` here; a listener must only wake
        someone up, never block.
        """
        self._listeners.append(listener)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and release the file lock.

        Losses counted since the last stored message (see :meth:`dropped`) are written
        first, if the file still takes a write, so a restart reports them too.
        """
        with self._lock:
            if self._closed:
                return
            if self._unsaved_losses:
                self._save_losses()
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def _save_losses(self) -> None:
        losses = self._unsaved_losses
        try:
            with self._transaction("counting lost messages"):
                self._set_meta("dropped", self._dropped + losses)
        except OutboxError as exc:
            logger.warning("%d lost message(s) are not counted on disk: %s", losses, exc)
            return
        self._dropped += losses
        self._unsaved_losses = 0

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
