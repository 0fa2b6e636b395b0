"""The durable outbox: every message is on disk before it is published.

An identification is stored here, under the next ``seq`` of the device, by the
thread that produced it; the MQTT link reads the backlog oldest-first and deletes
an entry only when the broker has acknowledged it (PUBACK). A broker outage, a
restart, ``kill -9`` or a power cut therefore loses nothing: what was not
acknowledged is sent again, and subscribers drop repeats by ``(device, seq)``.

Durability decisions:

* **SQLite in WAL mode with ``synchronous=FULL``.** In WAL mode ``NORMAL`` only
  syncs at checkpoints, so the last transactions before a power cut can roll back
  (the file stays consistent, but a message the pipeline believed stored, and a
  ``seq`` already handed out, would vanish). ``FULL`` fsyncs the WAL on every
  commit: once :meth:`Outbox.add` returns, the message survives a power cut. Acks
  cost an fsync as well, so the link deletes acknowledged entries in batches.
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
* **Where a new outbox starts counting.** ``seq`` is only unique per device while
  the outbox file lives; a re-flashed SD card or a deleted data directory starts a
  new file. Started at 1, its messages would carry the ``(device, seq)`` of
  messages collectors already stored and be dropped as duplicates. The daemon
  therefore creates outboxes with ``first_seq=`` :func:`clock_first_seq`, the wall
  clock in milliseconds (about 1.8e12 in 2027, far below the 2**53 JSON limit for
  the next 280,000 years): a new file's first ``seq`` exceeds every ``seq`` an older
  file of the same device handed out unless that one averaged more than 1,000
  messages a second over its whole life. ``first_seq`` only applies to a new file;
  an existing one always continues its own counter. (The library default stays 1.)
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
* **One process per outbox.** The file is opened in SQLite's exclusive locking
  mode, so a second daemon started with the same data directory fails at once
  instead of handing out the same ``seq`` twice.
* **Errors are values for health, not crashes.** A full disk, a read-only or
  damaged file raise :class:`OutboxError` with one line that says what to do; the
  daemon logs it, reports it in its heartbeat and keeps running.

Thread safety: one connection guarded by a lock. The writer is the classify
thread, the reader and acker the MQTT link; listeners registered with
:meth:`Outbox.add_listener` are called after each committed ``add`` so the link
wakes up without polling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from fieldscope.edge.errors import FieldscopeError

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

# 2 added the ``sources`` table; a version-1 file gains it when opened.
SCHEMA_VERSION = 2
FIRST_SEQ = 1
# How many source keys (see the module docstring) are remembered.
MAX_SOURCE_KEYS = 10_000
# JavaScript subscribers read seq as a double: it must stay exactly representable.
_MAX_SEQ = 2**53 - 1
# Seconds to wait for a lock held by another connection. The outbox is opened in
# exclusive mode, so waiting only ever means "another process has it": fail fast.
_BUSY_TIMEOUT_S = 1.0
# How many times a full database is retried after dropping older entries.
_MAX_FULL_RETRIES = 24

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS messages ("
    " seq INTEGER PRIMARY KEY,"
    " topic TEXT NOT NULL,"
    " qos INTEGER NOT NULL,"
    " payload BLOB NOT NULL,"
    " created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sources (key TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sources_by_seq ON sources (seq)",
    # Acknowledged messages kept for a ``resend`` (see keep_sent); needs no version bump.
    "CREATE TABLE IF NOT EXISTS sent ("
    " seq INTEGER PRIMARY KEY,"
    " topic TEXT NOT NULL,"
    " qos INTEGER NOT NULL,"
    " payload BLOB NOT NULL,"
    " created_at REAL NOT NULL)",
)
# How many acknowledged messages (by seq) the daemon keeps for a ``resend``.
DEFAULT_KEEP_SENT = 10_000
# The WAL's checkpoint threshold (pages) while sent messages are kept (see _open).
_KEEP_SENT_CHECKPOINT_PAGES = 64


def clock_first_seq(now: float | None = None) -> int:
    """The first ``seq`` for a brand-new outbox: the wall clock in milliseconds.

    See the module docstring for why. ``now`` is a Unix time (default: the clock).
    A clock that was obviously never set (before 2020, a Pi without RTC or network)
    is logged, because then the guarantee only holds against outboxes created
    before the clock's current value.
    """
    seconds = time.time() if now is None else now
    if seconds < 1_577_836_800:  # 2020-01-01
        logger.warning(
            "the system clock reads %s: a new outbox's first seq comes from the clock and "
            "may repeat seqs of an earlier outbox of this device; set the clock (NTP/RTC)",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)),
        )
    return max(FIRST_SEQ, min(_MAX_SEQ // 2, int(seconds * 1000)))


class OutboxError(FieldscopeError):
    """The outbox cannot store or read messages (full disk, read-only or damaged file).

    The daemon reports it as a health warning and keeps running; the message says
    what to do.
    """


class OutboxBusyError(OutboxError):
    """Another process (normally the running daemon) holds the outbox open."""


class OutboxFullError(OutboxError):
    """The outbox holds ``max_messages`` and its policy is ``reject-new``."""


class WhenFull(StrEnum):
    """What :meth:`Outbox.add` does when the outbox is at its cap."""

    DROP_OLDEST = "drop-oldest"
    REJECT_NEW = "reject-new"


@dataclass(frozen=True)
class Entry:
    """One stored message. ``seq`` is its identity and its key in the outbox."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    created_at: float  # Unix time it was stored; informational, never used for order

    @property
    def id(self) -> int:
        """The key to pass to :meth:`Outbox.ack` (the same number as ``seq``)."""
        return self.seq


@dataclass(frozen=True)
class OutboxStats:
    """What health reports about the outbox."""

    depth: int
    dropped: int
    next_seq: int
    oldest_age_s: float | None
    max_messages: int
    when_full: WhenFull


def _when_full(value: WhenFull | str) -> WhenFull:
    try:
        return WhenFull(value)
    except ValueError:
        choices = ", ".join(repr(w.value) for w in WhenFull)
        raise OutboxError(f"outbox when_full must be one of {choices}, got {value!r}") from None


def _error_name(exc: sqlite3.Error) -> str:
    return str(getattr(exc, "sqlite_errorname", "") or "")


# SQLite result codes (prefixes of the extended names) -> what to tell the operator.
_ADVICE: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("SQLITE_FULL",),
        "{where}: the disk or the outbox's size cap is full while {action} ({exc}); "
        "free space on the data directory or raise outbox.max_bytes",
    ),
    (
        ("SQLITE_READONLY",),
        "{where} is read-only while {action} ({exc}); "
        "make the file and its directory writable by the daemon's user",
    ),
    (
        ("SQLITE_BUSY", "SQLITE_LOCKED"),
        "{where} is locked by another process while {action}; is a second daemon "
        "running with the same data directory?",
    ),
    (
        ("SQLITE_CORRUPT", "SQLITE_NOTADB"),
        "{where} is damaged ({exc}); stop the daemon and move the file aside "
        "(its unsent messages are lost, and seq restarts)",
    ),
    (
        ("SQLITE_CANTOPEN",),
        "cannot open {where} ({exc}); check that its directory exists and is "
        "writable by the daemon's user",
    ),
    (("SQLITE_IOERR",), "{where}: I/O error while {action} ({exc}); the storage may be failing"),
)


def _filesystem_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written, when the filesystem or permissions say so."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return (
            "is on a read-only filesystem (an SD card is remounted read-only after I/O "
            "errors: check dmesg, then fsck or replace the card)"
        )
    if not os.access(existing, os.W_OK):
        return "is not writable by the daemon's user (check the owner and mode of the file)"
    return None


def _describe(exc: sqlite3.Error, path: Path, action: str) -> str:
    name = _error_name(exc)
    if name.startswith(("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")):
        problem = _filesystem_problem(path)
        if problem is not None:
            return f"outbox {path} {problem}; seen while {action} ({exc})"
    template = next(
        (text for prefixes, text in _ADVICE if name.startswith(prefixes)),
        "{where}: {action} failed ({exc})",
    )
    return template.format(where=f"outbox {path}", action=action, exc=exc)


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
        if isinstance(keep_sent, bool) or not isinstance(keep_sent, int) or keep_sent < 0:
            raise OutboxError(f"outbox keep_sent must be an integer >= 0, got {keep_sent!r}")
        if isinstance(first_seq, bool) or not isinstance(first_seq, int):
            raise OutboxError(f"outbox first_seq must be an integer, got {first_seq!r}")
        if not FIRST_SEQ <= first_seq <= _MAX_SEQ // 2:
            raise OutboxError(
                f"outbox first_seq must be from {FIRST_SEQ} to {_MAX_SEQ // 2}, got {first_seq}"
            )
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise OutboxError(f"outbox max_messages must be an integer >= 1, got {max_messages!r}")
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 16_384
        ):
            raise OutboxError(
                f"outbox max_bytes must be an integer >= 16384 (or unset), got {max_bytes!r}"
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox's directory {self.path.parent}: {exc.strerror or exc}"
            ) from exc
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            raise OutboxError(_describe(exc, self.path, "opening it")) from exc
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(
                    f"outbox {self.path}: SQLite refused WAL mode (got {mode!r}); "
                    "put the data directory on a local filesystem"
                )
            conn.execute("PRAGMA synchronous=FULL")
            if self.keep_sent:
                # Kept copies add WAL pages to every acknowledgement; a WAL that only
                # restarts after 1000 pages (4 MB) could then take the last free space
                # of a nearly full card. Checkpoint sooner, so it stays small.
                conn.execute(f"PRAGMA wal_autocheckpoint={_KEEP_SENT_CHECKPOINT_PAGES}")
            if self.max_bytes is not None:
                page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
                conn.execute(f"PRAGMA max_page_count={max(4, self.max_bytes // page_size)}")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox {self.path} was written by a newer fieldscope (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}); upgrade fieldscope or move the file aside"
                )
            # Taking the write lock here holds it (exclusive mode) until close.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            # Persisted at creation, so a restart before the first message keeps it.
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('next_seq', ?)",
                (self._first_seq,),
            )
            if version != SCHEMA_VERSION:
                # Only when it changes: opening an up-to-date outbox writes nothing, so a
                # daemon restarted on a full disk starts (and holds capture) instead of
                # failing at start-up until someone frees space.
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except OutboxError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError(_describe(exc, self.path, "opening it")) from exc
        return conn

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
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # the message is stored; a listener bug must not undo that
                logger.exception("outbox listener %r failed", listener)
        return entry

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
                cause = exc.__cause__
                full = isinstance(cause, sqlite3.Error) and _error_name(cause).startswith(
                    "SQLITE_FULL"
                )
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
                cause = exc.__cause__
                full = isinstance(cause, sqlite3.Error) and _error_name(cause).startswith(
                    "SQLITE_FULL"
                )
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
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:
                    logger.exception("outbox listener failed")
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


def peek_stats(
    path: Path | str,
    *,
    max_messages: int = 100_000,
    when_full: WhenFull | str = WhenFull.DROP_OLDEST,
) -> OutboxStats | None:
    """Depth, losses and next ``seq`` of an outbox file that no process has open.

    Read-only: for ``fieldscope edge status`` and deployment checks while the daemon
    is stopped. ``max_messages`` and ``when_full`` are the configured policy, which
    the file does not record. None when the file does not exist.

    Raises:
        OutboxBusyError: a process (the daemon) has the file open: ask it instead.
        OutboxError: the file is damaged or unreadable.
    """
    file = Path(path)
    if not file.exists():
        return None
    try:
        conn = sqlite3.connect(f"{file.absolute().as_uri()}?mode=ro", uri=True, timeout=0.2)
    except sqlite3.Error as exc:
        raise OutboxError(_describe(exc, file, "opening it read-only")) from exc
    try:
        depth = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        oldest = conn.execute("SELECT created_at FROM messages ORDER BY seq LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        if _error_name(exc).startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            raise OutboxBusyError(_describe(exc, file, "reading it")) from exc
        raise OutboxError(_describe(exc, file, "reading it")) from exc
    finally:
        conn.close()
    return OutboxStats(
        depth=int(depth),
        dropped=int(meta.get("dropped", 0)),
        next_seq=int(meta.get("next_seq", FIRST_SEQ)),
        oldest_age_s=None if oldest is None else max(0.0, time.time() - float(oldest[0])),
        max_messages=max_messages,
        when_full=_when_full(when_full),
    )
