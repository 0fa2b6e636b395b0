"""The outbox's SQLite file: its schema, opening it, error types and messages.

Split from :mod:`fieldscope.edge.outbox` (which re-exports the public names and
describes the queue's other decisions). Decisions about the file:

* **SQLite in WAL mode with ``synchronous=FULL``.** In WAL mode ``NORMAL`` only
  syncs at checkpoints, so the last transactions before a power cut can roll back
  (the file stays consistent, but a message the pipeline believed stored, and a
  ``seq`` already handed out, would vanish). ``FULL`` fsyncs the WAL on every
  commit: once :meth:`Outbox.add` returns, the message survives a power cut. Acks
  cost an fsync as well, so the link deletes acknowledged entries in batches.
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
* **One process per outbox.** The file is opened in SQLite's exclusive locking
  mode, so a second daemon started with the same data directory fails at once
  instead of handing out the same ``seq`` twice.
* **Errors are values for health, not crashes.** A full disk, a read-only or
  damaged file raise :class:`OutboxError` with one line that says what to do; the
  daemon logs it, reports it in its heartbeat and keeps running.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from fieldscope.edge.errors import FieldscopeError, create_folder

logger = logging.getLogger("fieldscope.edge.outbox")

__all__ = [
    "FIRST_SEQ",
    "SCHEMA_VERSION",
    "Entry",
    "OutboxBusyError",
    "OutboxError",
    "OutboxFullError",
    "OutboxStats",
    "WhenFull",
    "check_settings",
    "clock_first_seq",
    "is_disk_full",
    "open_database",
    "peek_stats",
]

# 2 added the ``sources`` table; a version-1 file gains it when opened.
SCHEMA_VERSION = 2
FIRST_SEQ = 1
# JavaScript subscribers read seq as a double: it must stay exactly representable.
_MAX_SEQ = 2**53 - 1
# Seconds to wait for a lock held by another connection. The outbox is opened in
# exclusive mode, so waiting only ever means "another process has it": fail fast.
_BUSY_TIMEOUT_S = 1.0

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
# The WAL's checkpoint threshold (pages) while sent messages are kept (see _open).
_KEEP_SENT_CHECKPOINT_PAGES = 64


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


def open_database(
    path: Path, *, first_seq: int, keep_sent: int, max_bytes: int | None
) -> sqlite3.Connection:
    """Open (or create) the outbox file in exclusive WAL mode with its schema up to date.

    Raises:
        OutboxError: the folder or file cannot be made, opened or upgraded (the message
            says what to do).
    """
    create_folder(path.parent, "the outbox's directory", OutboxError)
    try:
        conn = sqlite3.connect(
            path,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # guarded by the Outbox's lock
        )
    except sqlite3.Error as exc:
        raise OutboxError(_describe(exc, path, "opening it")) from exc
    try:
        _configure(conn, path, keep_sent=keep_sent, max_bytes=max_bytes)
        _create_schema(conn, path, first_seq)
    except OutboxError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise OutboxError(_describe(exc, path, "opening it")) from exc
    return conn


def _configure(
    conn: sqlite3.Connection, path: Path, *, keep_sent: int, max_bytes: int | None
) -> None:
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxError(
            f"outbox {path}: SQLite refused WAL mode (got {mode!r}); "
            "put the data directory on a local filesystem"
        )
    conn.execute("PRAGMA synchronous=FULL")
    if keep_sent:
        # Kept copies add WAL pages to every acknowledgement; a WAL that only
        # restarts after 1000 pages (4 MB) could then take the last free space
        # of a nearly full card. Checkpoint sooner, so it stays small.
        conn.execute(f"PRAGMA wal_autocheckpoint={_KEEP_SENT_CHECKPOINT_PAGES}")
    if max_bytes is not None:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA max_page_count={max(4, max_bytes // page_size)}")


def _create_schema(conn: sqlite3.Connection, path: Path, first_seq: int) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise OutboxError(
            f"outbox {path} was written by a newer fieldscope (schema {version}, "
            f"this one knows {SCHEMA_VERSION}); upgrade fieldscope or move the file aside"
        )
    # Taking the write lock here holds it (exclusive mode) until close.
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA:
        conn.execute(statement)
    # Persisted at creation, so a restart before the first message keeps it.
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('next_seq', ?)", (first_seq,))
    if version != SCHEMA_VERSION:
        # Only when it changes: opening an up-to-date outbox writes nothing, so a
        # daemon restarted on a full disk starts (and holds capture) instead of
        # failing at start-up until someone frees space.
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("COMMIT")


def check_settings(
    *, max_messages: int, max_bytes: int | None, first_seq: int, keep_sent: int
) -> None:
    """Refuse settings an outbox cannot honour, naming the setting and the allowed range.

    Raises:
        OutboxError: a setting is not an integer in its range.
    """
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


def is_disk_full(exc: OutboxError) -> bool:
    """Whether an OutboxError was caused by a full disk or a file at ``max_bytes``."""
    cause = exc.__cause__
    return isinstance(cause, sqlite3.Error) and _error_name(cause).startswith("SQLITE_FULL")
