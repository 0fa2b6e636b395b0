"""Images another acquisition program drops into a folder, each handled exactly once:
``camera.backend = "folder"``."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NamedTuple

import msgspec

from fieldscope.edge.capture.base import (
    DEFAULT_IMAGE_PATTERNS,
    FOLDER_HANDLING,
    STATE_DB_NAME,
    CameraBackend,
    CameraError,
    FileSourceOptions,
    FolderHandling,
    Frame,
    ProblemCallback,
    RGBImage,
    required_path,
    utc_now,
)
from fieldscope.edge.capture.files import (
    db_name,
    matches,
    name_from_db,
    shown_path,
    walk_files,
)
from fieldscope.edge.errors import ConfigError, ImageDecodeError
from fieldscope.edge.typed import seconds

__all__ = ["BACKEND", "FolderCamera", "FolderOptions"]

logger = logging.getLogger(__name__)


class FolderOptions(FileSourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[camera.folder]``: images another acquisition program drops into ``path``.

    A file is taken once its size and modification time have not changed for
    ``settle_s`` (so a half-written file is never read), and each file is handled
    exactly once, also across restarts. ``handled`` says what happens afterwards:
    ``keep`` leaves it (a state database remembers it), ``move`` moves it to
    ``path/done/``, ``delete`` removes it. Unreadable files go to ``path/failed/``
    (``keep``: they are only recorded as failed). ``recursive`` also takes the files
    of subfolders (not of ``done/`` and ``failed/`` when ``handled = "move"``).
    """

    settle_s: Annotated[float, seconds(0, 3600)] = 1.0
    scan_interval_s: Annotated[float, seconds(0.01, 3600)] = 0.5
    handled: FolderHandling = "keep"
    recursive: bool = False


class _FileKey(NamedTuple):
    """A file's identity: a name rewritten with new content is a new file."""

    name: str
    size: int
    mtime_ns: int

    def row(self) -> tuple[str | bytes, int, int]:
        """The key as bound to SQLite (see :func:`db_name`)."""
        return (db_name(self.name), self.size, self.mtime_ns)


@dataclass
class _Sighting:
    key: _FileKey
    since: float  # monotonic time from which the file has looked unchanged


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('taken', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, size, mtime_ns)
)
"""


class FolderCamera:
    """Images that another program drops into a folder, each handled exactly once.

    A file is offered once its size and modification time stayed the same for
    ``settle_s`` (two scans apart), so a file still being written is not read; files
    whose names start with ``.`` (the usual temporary names) are ignored. Files are
    offered oldest first. Between scans :meth:`read` waits on an event, and
    :meth:`close` wakes it.

    Bookkeeping lives in a small SQLite database (``state_db``, WAL): a file is
    recorded as *taken* before it is decoded, and as *done* when its frame's
    ``done()`` is called; ``handled`` then keeps, moves (to ``done/``) or deletes it.
    After a crash, a taken-but-not-done file is offered again; one taken
    ``max_attempts`` times without completing (a file that crashes the process each
    time) is marked failed instead, so a restart loop cannot form. Unreadable or
    corrupt files are reported through ``on_problem`` and marked failed — moved to
    ``failed/`` unless ``handled`` is ``keep`` — and never retried. A power cut can at
    worst offer the last file or two again (WAL with ``synchronous=NORMAL``); no file
    is ever skipped. A frame whose ``done`` is never called is not offered again until
    the next start.
    """

    finished = False

    def __init__(
        self,
        path: Path,
        state_db: Path,
        *,
        patterns: Sequence[str] = DEFAULT_IMAGE_PATTERNS,
        settle_s: float = 1.0,
        scan_interval_s: float = 0.5,
        handled: str = "keep",
        max_attempts: int = 3,
        recursive: bool = False,
        on_problem: ProblemCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if handled not in FOLDER_HANDLING:
            raise ConfigError(
                f"handled must be one of {', '.join(FOLDER_HANDLING)}, got {handled!r}"
            )
        self.path = Path(path)
        self.state_db = Path(state_db)
        self.patterns = tuple(patterns)
        self.settle_s = settle_s
        self.scan_interval_s = scan_interval_s
        self.handled = handled
        self.max_attempts = max_attempts
        self.recursive = recursive
        self.name = f"folder:{shown_path(self.path)}"
        self._on_problem = on_problem
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._db: sqlite3.Connection | None = None
        self._finished: set[_FileKey] = set()
        self._in_flight: set[_FileKey] = set()
        self._sightings: dict[str, _Sighting] = {}
        self._ready: list[_FileKey] = []
        self._last_scan = -float("inf")

    # -- state database ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.state_db.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.state_db, check_same_thread=False, timeout=10.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.commit()
        except (sqlite3.Error, OSError) as exc:
            raise CameraError(
                f"{self.name}: cannot open the state database {self.state_db}: {exc}"
            ) from exc
        return db

    def _record(self, key: _FileKey, state: str, reason: str | None = None) -> int:
        """Write ``key``'s state (under the lock); returns how often it was taken."""
        db = self._db
        temporary = db is None
        if db is None:  # done() after close(): the record still matters
            db = self._connect()
        try:
            with db:
                db.execute(
                    "INSERT INTO files (name, size, mtime_ns, state, attempts, reason, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (name, size, mtime_ns) DO UPDATE SET state = excluded.state,"
                    " attempts = attempts + excluded.attempts, reason = excluded.reason,"
                    " updated_at = excluded.updated_at",
                    (
                        *key.row(),
                        state,
                        1 if state == "taken" else 0,
                        reason,
                        utc_now().isoformat(),
                    ),
                )
                row = db.execute(
                    "SELECT attempts FROM files WHERE name = ? AND size = ? AND mtime_ns = ?",
                    key.row(),
                ).fetchone()
        except sqlite3.Error as exc:
            raise CameraError(f"{self.name}: cannot update the state database: {exc}") from exc
        finally:
            if temporary:
                db.close()
        return int(row[0]) if row else 0

    # -- Camera protocol -----------------------------------------------------------

    def open(self) -> None:
        if not self.path.is_dir():
            raise CameraError(f"{self.name}: the folder does not exist or is not a directory")
        with self._lock:
            if self._db is None:
                self._db = self._connect()
            self._wake.clear()
            self._ready = []
            self._sightings = {}
            self._last_scan = -float("inf")
            self._recover()

    def _recover(self) -> None:
        """Load the finished files; finish interrupted moves; forget vanished files."""
        assert self._db is not None
        try:
            rows = self._db.execute("SELECT name, size, mtime_ns, state FROM files").fetchall()
        except sqlite3.Error as exc:
            raise CameraError(f"{self.name}: cannot read the state database: {exc}") from exc
        self._finished = set()
        gone: list[_FileKey] = []
        for name, size, mtime_ns, state in rows:
            key = _FileKey(name_from_db(name), size, mtime_ns)
            try:
                st = (self.path / key.name).stat()
                present = (st.st_size, st.st_mtime_ns) == (size, mtime_ns)
            except OSError:
                present = False
            if not present:
                gone.append(key)
            elif state in ("done", "failed"):
                self._finished.add(key)
                self._dispose(key, state)  # a move or delete cut short by a crash
        if gone:
            with contextlib.suppress(sqlite3.Error), self._db:
                self._db.executemany(
                    "DELETE FROM files WHERE name = ? AND size = ? AND mtime_ns = ?",
                    [key.row() for key in gone],
                )

    def read(self, timeout: float) -> Frame | None:
        deadline = self._clock() + max(0.0, timeout)
        while True:
            if self._db is None:
                raise CameraError(f"{self.name}: read before open")
            frame = self._next()
            if frame is not None:
                return frame
            remaining = deadline - self._clock()
            if remaining <= 0 or self._wake.wait(min(remaining, self.scan_interval_s)):
                return None

    def close(self) -> None:
        self._wake.set()
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()

    # -- scanning and taking -------------------------------------------------------

    def _scan(self) -> list[_FileKey]:
        """Files ready to be taken, oldest first (under the lock)."""
        now = self._clock()
        try:
            if self.recursive:
                # With handled = "move" the finished files live in done/ and failed/.
                skip = frozenset(("done", "failed")) if self.handled == "move" else frozenset()
                entries = list(walk_files(self.path, skip))
            else:
                entries = [(e.name, e) for e in os.scandir(self.path)]
        except OSError as exc:
            raise CameraError(
                f"{self.name}: cannot list the folder: {exc.strerror or exc}"
            ) from exc
        ready: list[tuple[int, str, _FileKey]] = []
        present: set[str] = set()
        for name, entry in entries:
            if not matches(entry.name, self.patterns):
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue  # vanished between listing and stat
            key = _FileKey(name, st.st_size, st.st_mtime_ns)
            present.add(name)
            if key in self._finished or key in self._in_flight:
                continue
            seen = self._sightings.get(name)
            if seen is None or seen.key != key:
                self._sightings[name] = _Sighting(key, now)
                if self.settle_s > 0:
                    continue
            elif now - seen.since < self.settle_s:
                continue
            ready.append((key.mtime_ns, key.name, key))
        self._sightings = {n: s for n, s in self._sightings.items() if n in present}
        self._last_scan = now
        return [key for _, _, key in sorted(ready)]

    def _next(self) -> Frame | None:
        with self._lock:
            if not self._ready or self._clock() - self._last_scan >= self.scan_interval_s:
                self._ready = self._scan()
            while self._ready:
                key = self._ready.pop(0)
                try:
                    frame = self._take(key)
                except CameraError:
                    raise
                except Exception as exc:
                    frame = None
                    self._quarantine(key, exc)
                if frame is not None:
                    return frame
        return None

    def _quarantine(self, key: _FileKey, exc: Exception) -> None:
        """One file raised an unexpected error: it alone is set aside (failed), the
        rest of the folder is processed, and a restart does not meet it again."""
        logger.error(
            "%s: unexpected error taking %s", self.name, shown_path(key.name), exc_info=True
        )
        try:
            self._fail(key, f"unexpected {type(exc).__name__}: {str(exc)[:200]}")
        except Exception:
            logger.exception("%s: cannot record %s as failed", self.name, shown_path(key.name))
            self._in_flight.discard(key)
            self._finished.add(key)

    def _take(self, key: _FileKey) -> Frame | None:
        """The frame of a ready file, or None when it vanished, changed or failed."""
        path = self.path / key.name
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail(key, f"cannot read the file: {exc.strerror or exc}")
            return None
        if (st.st_size, st.st_mtime_ns) != (key.size, key.mtime_ns):
            return None  # changed since the scan: the next scan sees the new version
        attempts = self._record(key, "taken")  # before decoding: see max_attempts
        if attempts > self.max_attempts:
            self._fail(
                key,
                f"taken {attempts - 1} times without being completed (the daemon stopped "
                "while handling it each time); giving up on it",
            )
            return None
        loaded = self._load(key, path)
        if loaded is None:
            return None
        data, image = loaded
        self._in_flight.add(key)
        return Frame(
            image=image,
            source=shown_path(path),
            captured_at=utc_now(),
            encoded=data,
            done=functools.partial(self._done, key),
            key=f"folder:{shown_path(key.name)}:{key.size}:{key.mtime_ns}",
            fail=functools.partial(self._failed_later, key),
        )

    def _load(self, key: _FileKey, path: Path) -> tuple[bytes, RGBImage] | None:
        # Here: it loads OpenCV, and the configuration imports this module (FolderOptions).
        from fieldscope.edge.preprocess import decode_image

        try:
            data = path.read_bytes()
            return data, decode_image(data, source=shown_path(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail(key, f"cannot read the file: {exc.strerror or exc}")
        except ImageDecodeError as exc:
            self._fail(key, str(exc))
        except Exception as exc:
            # An error no decoder should raise (a bug, a library's own exception): this
            # file is quarantined, the folder goes on.
            logger.warning(
                "%s: unexpected error decoding %s", self.name, shown_path(key.name), exc_info=True
            )
            self._fail(key, f"unexpected {type(exc).__name__} while decoding: {str(exc)[:200]}")
        return None

    def _done(self, key: _FileKey) -> None:
        """Called by the daemon's storing thread: never raises into it."""
        with self._lock:
            self._in_flight.discard(key)
            if key in self._finished:
                return
            try:
                self._record(key, "done")
            except CameraError as exc:
                # The file will be offered again after a restart: a duplicate, not a loss.
                logger.error(
                    "%s: cannot record %s as done: %s", self.name, shown_path(key.name), exc
                )
                return
            self._finished.add(key)
            self._dispose(key, "done")

    def _failed_later(self, key: _FileKey, reason: str) -> None:
        """Called by the daemon when its pipeline failed on the file's frame (an
        unexpected error): the file is quarantined like an unreadable one — recorded
        failed, moved to ``failed/`` — and never offered again. Never raises."""
        with self._lock:
            if key in self._finished:
                self._in_flight.discard(key)
                return
            try:
                self._fail(key, reason, report=False)
            except CameraError as exc:
                # Not recorded: kept out for this run, offered again after a restart
                # (where max_attempts ends it).
                logger.error(
                    "%s: cannot record %s as failed: %s", self.name, shown_path(key.name), exc
                )
                self._finished.add(key)

    def _fail(self, key: _FileKey, reason: str, *, report: bool = True) -> None:
        """Record a file as failed for good and report why (under the lock); ``report``
        False when the daemon already counted and reported it (``Frame.fail``)."""
        path = self.path / key.name
        logger.warning("%s: skipping %s: %s", self.name, shown_path(key.name), reason)
        if report and self._on_problem is not None:
            self._on_problem(shown_path(path), reason)
        self._in_flight.discard(key)
        self._record(key, "failed", reason)
        self._finished.add(key)
        self._dispose(key, "failed")

    def _dispose(self, key: _FileKey, state: str) -> None:
        """Move or delete a finished file as ``handled`` says; failures are logged only
        (the state database already keeps the file from being offered again)."""
        if self.handled == "keep":
            return  # kept files, done or failed, are only recorded
        path = self.path / key.name
        try:
            if state == "done" and self.handled == "delete":
                path.unlink(missing_ok=True)
                return
            target = self.path / state / key.name  # a subfolder's file keeps its subfolder
            target.parent.mkdir(parents=True, exist_ok=True)
            n = 1
            while target.exists():
                target = target.with_name(f"{path.stem}.{n}{path.suffix}")
                n += 1
            path.rename(target)
        except OSError as exc:
            logger.warning(
                "%s: cannot %s %s: %s",
                self.name,
                "delete" if self.handled == "delete" and state == "done" else f"move to {state}/",
                shown_path(key.name),
                exc.strerror or exc,
            )


def _build(
    options: FolderOptions, data_dir: Path, on_problem: ProblemCallback | None
) -> FolderCamera:
    settings = msgspec.structs.asdict(options)
    settings["path"] = required_path(options.path, "folder")
    return FolderCamera(state_db=data_dir / STATE_DB_NAME, on_problem=on_problem, **settings)


BACKEND = CameraBackend(
    "folder", FolderOptions, _build, "files another program writes into a folder, each once"
)
