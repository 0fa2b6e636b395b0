"""Capture: camera backends behind one protocol, triggers, and a supervisor that reopens.

Every source of images — the Raspberry Pi camera, a USB microscope or RTSP stream via
OpenCV, a folder another acquisition program writes into, a folder replayed at a set
rate — is a :class:`Camera`: ``open()``, ``read(timeout)`` → :class:`Frame` or None,
``close()``. The daemon never knows which one it has; :func:`make_camera` picks it from
the configuration, and tests drive the same code through a fake ``picamera2`` module.

Failure model: ``read`` returns None when there is simply nothing yet and raises
:class:`CameraError` when the device failed. A failed camera is not the daemon's end:
:class:`CameraSupervisor` closes it, reopens it with exponential backoff (waiting on
the stop event, never sleeping) and reports the outage through callbacks, so health
messages can say "camera down since 03:12: USB device disappeared".

A :class:`Frame` carries a ``done`` callback. The daemon calls it once the
identification is durably in the outbox; only then does the folder camera record the
file as handled. That is what makes "each file exactly once, also across restarts"
true: a file read but not yet stored is simply read again after a crash.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.config import (
    DEFAULT_IMAGE_PATTERNS,
    FOLDER_HANDLING,
    CameraConfig,
    OpenCVOptions,
    Picamera2Options,
    mask_url,
)
from fieldscope.edge.errors import (
    ConfigError,
    FieldscopeError,
    ImageDecodeError,
    MissingDependencyError,
)
from fieldscope.edge.preprocess import decode_image

__all__ = [
    "STATE_DB_NAME",
    "Camera",
    "CameraError",
    "CameraSupervisor",
    "CommandTrigger",
    "ContinuousTrigger",
    "FolderCamera",
    "Frame",
    "IntervalTrigger",
    "OpenCVCamera",
    "Outage",
    "Picamera2Camera",
    "ProblemCallback",
    "ReplayCamera",
    "Trigger",
    "make_camera",
    "make_trigger",
    "open_with_backoff",
    "shown_path",
]

logger = logging.getLogger(__name__)

RGBImage = npt.NDArray[np.uint8]
# (source, message): a file that could not be used, for logs and health messages.
ProblemCallback = Callable[[str, str], None]
# The folder camera's bookkeeping, inside the daemon's data_dir.
STATE_DB_NAME = "folder-state.sqlite"

# How often a waiting trigger looks at the stop event. Waits are on events (a fired
# capture wakes them at once); only a stop set without ``wake()`` waits this long.
_STOP_CHECK_S = 0.25


class CameraError(FieldscopeError):
    """The camera failed (unplugged, driver error, folder gone); reopening may help."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured image.

    ``image`` is RGB uint8 (H, W, 3). ``encoded`` holds the original file's bytes for
    file sources (the image hash and the archive use them, so both match the file);
    live cameras have none. ``done`` (may be None) must be called once the frame's
    identification is durably stored; see the module docstring. ``key`` identifies
    the source of a frame that must be handled exactly once (the folder camera's
    file: name, size and modification time); the daemon stores it with the
    identification, so a frame offered again after a crash between storing and
    ``done`` is recognised and not identified twice.
    """

    image: RGBImage
    source: str
    captured_at: datetime
    encoded: bytes | None = None
    done: Callable[[], None] | None = field(default=None, repr=False)
    key: str | None = None
    # Called (with the reason) instead of ``done`` when the daemon failed on the frame:
    # a file source quarantines the file (``failed/``) rather than offer it forever.
    fail: Callable[[str], None] | None = field(default=None, repr=False)

    def digest(self) -> str:
        """SHA-256 (hex) identifying the image: of the file's bytes when there is a
        file, else of the raw RGB pixels with their shape (encoding a PNG per frame
        only to hash it would cost more than classifying it)."""
        if self.encoded is not None:
            return hashlib.sha256(self.encoded).hexdigest()
        h = hashlib.sha256(f"rgb8:{self.image.shape[0]}x{self.image.shape[1]}:".encode())
        h.update(np.ascontiguousarray(self.image).data)
        return h.hexdigest()


@runtime_checkable
class Camera(Protocol):
    """What the daemon needs from any image source.

    ``open`` raises :class:`CameraError` (or ``MissingDependencyError``, which no retry
    can fix); ``read`` blocks for at most about ``timeout`` seconds and returns None
    when no frame is there yet; ``close`` never raises and may be called twice.
    File-based backends also have ``finished``: True once they will never deliver
    another frame (a replay that reached its end).
    """

    name: str

    def open(self) -> None: ...

    def read(self, timeout: float) -> Frame | None: ...

    def close(self) -> None: ...


def _as_rgb(array: object, source: str) -> RGBImage:
    """A camera's array as C-contiguous RGB uint8, or CameraError saying what came."""
    if not isinstance(array, np.ndarray):
        raise CameraError(f"{source}: the camera returned {type(array).__name__}, not an array")
    if array.dtype != np.uint8:
        raise CameraError(f"{source}: the camera returned {array.dtype} pixels, expected uint8")
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif array.ndim == 2:
        array = np.repeat(array[:, :, np.newaxis], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CameraError(f"{source}: the camera returned an array of shape {array.shape}")
    return np.ascontiguousarray(array)


# ── Raspberry Pi camera ───────────────────────────────────────────────────────────────


class Picamera2Camera:
    """The Raspberry Pi camera through picamera2 (libcamera).

    picamera2 is imported only in :meth:`open`: it exists only on Raspberry Pi OS,
    where it comes from apt (``python3-picamera2``) because it needs the system's
    libcamera bindings; a virtual environment must be created with
    ``--system-site-packages`` to see it.

    Hardware quirk: picamera2 names formats by the libcamera/DRM convention, so
    ``"BGR888"`` arrives in numpy as [R, G, B] per pixel (and ``"RGB888"`` as
    [B, G, R]). We ask for ``BGR888`` and get RGB without a copy.
    ``capture_array`` waits for the next frame (one frame period); ``timeout`` is not
    passed on, because older picamera2 releases do not take one.
    """

    finished = False

    def __init__(self, options: Picamera2Options | None = None) -> None:
        self.options = options or Picamera2Options()
        self.name = f"picamera2:{self.options.camera_num}"
        self._camera: Any = None

    def open(self) -> None:
        if self._camera is not None:
            return
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise MissingDependencyError(
                f"the picamera2 backend needs the picamera2 module ({exc}); on Raspberry Pi "
                "OS run `sudo apt install python3-picamera2` and create the virtual "
                "environment with `python3 -m venv --system-site-packages`, so that it "
                "sees the apt package"
            ) from exc
        camera: Any = None
        try:
            camera = Picamera2(self.options.camera_num)
            main: dict[str, Any] = {"format": "BGR888"}  # arrives as [R, G, B]: see above
            if self.options.width is not None and self.options.height is not None:
                main["size"] = (self.options.width, self.options.height)
            camera.configure(camera.create_still_configuration(main=main, buffer_count=2))
            if self.options.controls:
                camera.set_controls(dict(self.options.controls))
            camera.start()
        # libcamera reports a missing or busy camera as RuntimeError, IndexError or
        # OSError depending on the release; at this hardware boundary all mean "failed".
        except Exception as exc:
            if camera is not None:
                with contextlib.suppress(Exception):
                    camera.close()
            raise CameraError(f"{self.name}: cannot start the camera: {exc}") from exc
        self._camera = camera

    def read(self, timeout: float) -> Frame | None:
        if self._camera is None:
            raise CameraError(f"{self.name}: read before open")
        try:
            array = self._camera.capture_array("main")
        except Exception as exc:  # the hardware boundary, see open()
            raise CameraError(f"{self.name}: capture failed: {exc}") from exc
        return Frame(image=_as_rgb(array, self.name), source=self.name, captured_at=_utc_now())

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is None:
            return
        for step in (camera.stop, camera.close):
            try:
                step()
            except Exception as exc:  # closing a failed camera may fail too; nothing to do
                logger.debug("%s: %s failed while closing: %s", self.name, step.__name__, exc)


# ── OpenCV (USB microscopes, streams, video files) ────────────────────────────────────


class OpenCVCamera:
    """A ``cv2.VideoCapture``: a device index, a device path, a video file or a URL.

    Streams get open and read timeouts (10 s) so that a dead RTSP server raises
    instead of hanging. Devices keep a one-frame buffer where the driver allows it,
    so a frame taken every few seconds is fresh rather than one the driver queued
    long ago. ``read`` blocks for one frame period (OpenCV offers no timeout). A video
    file ends: ``finished`` turns True and ``read`` returns None.
    """

    def __init__(self, options: OpenCVOptions | None = None) -> None:
        self.options = options or OpenCVOptions()
        source = self.options.source
        self.name = f"opencv:{source if isinstance(source, int) else mask_url(source)}"
        self.finished = False
        self._capture: Any = None
        self._is_file = False

    def open(self) -> None:
        if self._capture is not None:
            return
        source = self.options.source
        is_url = isinstance(source, str) and "://" in source
        if is_url:
            timeouts = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                10_000,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                10_000,
            ]
            capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)
        else:
            capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            capture.release()
            hint = (
                "is the device plugged in, and is the service user in the 'video' group?"
                if not is_url
                else "is the stream reachable?"
            )
            raise CameraError(f"{self.name}: cannot open the video source ({hint})")
        self._is_file = isinstance(source, str) and not is_url and Path(source).is_file()
        if not self._is_file:
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self.options.width is not None and self.options.height is not None:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.options.width)
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.options.height)
        if self.options.fps is not None:
            capture.set(cv2.CAP_PROP_FPS, self.options.fps)
        self._capture = capture
        self.finished = False

    def read(self, timeout: float) -> Frame | None:
        if self._capture is None:
            raise CameraError(f"{self.name}: read before open")
        if self.finished:
            return None
        try:
            ok, bgr = self._capture.read()
        except cv2.error as exc:
            raise CameraError(f"{self.name}: read failed: {exc}") from exc
        if not ok or bgr is None:
            if self._is_file:
                self.finished = True
                logger.info("%s: end of the video file", self.name)
                return None
            raise CameraError(f"{self.name}: the source stopped delivering frames (unplugged?)")
        array = np.asarray(bgr)
        if array.ndim == 3 and array.shape[2] in (3, 4):
            array = array[:, :, 2::-1]  # BGR(A) → RGB
        return Frame(image=_as_rgb(array, self.name), source=self.name, captured_at=_utc_now())

    def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()


# ── files: a watched folder, a replayed folder ────────────────────────────────────────


def _matches(name: str, patterns: Sequence[str]) -> bool:
    lower = name.lower()
    return not name.startswith(".") and any(fnmatch.fnmatchcase(lower, p.lower()) for p in patterns)


def shown_path(path: Path | str) -> str:
    """``path`` as text that can go anywhere: logs, SQLite, JSON, MQTT.

    POSIX file names are bytes; Python hands a name that is not UTF-8 over with lone
    surrogates (``b21_\\udcff.png``), which SQLite, JSON encoders and UTF-8 log streams
    refuse. Those bytes are written as ``\\xff`` escapes instead; a valid UTF-8 name is
    returned unchanged.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def _db_name(name: str) -> str | bytes:
    """A file name as the state database keeps it: text when it is UTF-8, else the raw
    bytes the OS gave (a BLOB), so every name round-trips exactly to the same file."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def _name_from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _walk_files(
    root: Path, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry below ``root`` that is not a folder, as (path relative to ``root`` with
    ``/``, entry); hidden folders and the top-level folders in ``skip`` are not entered.
    Raises OSError only for ``root`` itself: a subfolder that vanishes is skipped."""
    stack: list[tuple[str, Path]] = [("", root)]
    first = True
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            if first:
                raise
            continue
        first = False
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if not entry.name.startswith(".") and not (not prefix and entry.name in skip):
                    stack.append((f"{prefix}{entry.name}/", Path(entry.path)))
            else:
                yield f"{prefix}{entry.name}", entry


def _no_images_hint(path: Path, patterns: Sequence[str], recursive: bool, key: str) -> str:
    """Where an empty source looked and what it looked for, and what to change."""
    where = f"{path} and its subfolders" if recursive else f"{path} (not its subfolders)"
    text = f"no images matching {', '.join(patterns)} in {where}"
    if not recursive:
        try:
            deeper = sum(
                1 for rel, e in _walk_files(path) if "/" in rel and _matches(e.name, patterns)
            )
        except OSError:
            deeper = 0
        if deeper:
            text += f"; {deeper} are in subfolders: set {key}.recursive = true"
    else:
        text += f" (change {key}.patterns or {key}.path)"
    return text


class _FileKey(NamedTuple):
    """A file's identity: a name rewritten with new content is a new file."""

    name: str
    size: int
    mtime_ns: int

    def row(self) -> tuple[str | bytes, int, int]:
        """The key as bound to SQLite (see :func:`_db_name`)."""
        return (_db_name(self.name), self.size, self.mtime_ns)


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
                        _utc_now().isoformat(),
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
            key = _FileKey(_name_from_db(name), size, mtime_ns)
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
                entries = list(_walk_files(self.path, skip))
            else:
                entries = [(e.name, e) for e in os.scandir(self.path)]
        except OSError as exc:
            raise CameraError(
                f"{self.name}: cannot list the folder: {exc.strerror or exc}"
            ) from exc
        ready: list[tuple[int, str, _FileKey]] = []
        present: set[str] = set()
        for name, entry in entries:
            if not _matches(entry.name, self.patterns):
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
            captured_at=_utc_now(),
            encoded=data,
            done=functools.partial(self._done, key),
            key=f"folder:{shown_path(key.name)}:{key.size}:{key.mtime_ns}",
            fail=functools.partial(self._failed_later, key),
        )

    def _load(self, key: _FileKey, path: Path) -> tuple[bytes, RGBImage] | None:
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


class ReplayCamera:
    """The images of a folder, in name order, at ``rate_hz`` (0: as fast as asked).

    For tests, demos and benchmarks: a deterministic stream from files. ``loop``
    starts over at the end; ``limit`` stops after that many frames (0: no limit).
    ``finished`` turns True when no frame will come any more. Unreadable files are
    reported through ``on_problem`` once and skipped.
    """

    def __init__(
        self,
        path: Path,
        *,
        patterns: Sequence[str] = DEFAULT_IMAGE_PATTERNS,
        rate_hz: float = 1.0,
        loop: bool = False,
        limit: int = 0,
        recursive: bool = True,
        on_problem: ProblemCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.patterns = tuple(patterns)
        self.recursive = recursive
        self.period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        self.loop = loop
        self.limit = limit
        self.name = f"replay:{shown_path(self.path)}"
        self.finished = False
        self._announced = False
        self._on_problem = on_problem
        self._clock = clock
        self._closed = threading.Event()
        self._files: list[Path] | None = None
        self._bad: set[Path] = set()
        self._index = 0
        self._count = 0
        self._due = 0.0

    def open(self) -> None:
        try:
            if self.recursive:
                # In path order: a species folder after another, each in name order.
                found = sorted(
                    (rel, Path(e.path))
                    for rel, e in _walk_files(self.path)
                    if _matches(e.name, self.patterns) and e.is_file()
                )
                files = [p for _, p in found]
            else:
                files = sorted(
                    p
                    for p in self.path.iterdir()
                    if _matches(p.name, self.patterns) and p.is_file()
                )
        except OSError as exc:
            raise CameraError(
                f"{self.name}: cannot list the folder: {exc.strerror or exc}"
            ) from exc
        if not files:
            raise CameraError(
                f"{self.name}: "
                + _no_images_hint(self.path, self.patterns, self.recursive, "camera.replay")
            )
        self._files = files
        self._bad = set()
        self._index = self._count = 0
        self._due = self._clock()
        self.finished = False
        self._announced = False
        self._closed.clear()

    def read(self, timeout: float) -> Frame | None:
        files = self._files
        if files is None:
            raise CameraError(f"{self.name}: read before open")
        if self.finished:
            self._announce_end(len(files))
            self._closed.wait(max(0.0, timeout))
            return None
        wait = self._due - self._clock()
        if wait > timeout:
            self._closed.wait(max(0.0, timeout))
            return None
        if wait > 0 and self._closed.wait(wait):
            return None
        for _ in range(len(files)):
            path = files[self._index]
            self._index += 1
            if self._index == len(files):
                self._index = 0
                self.finished = not self.loop
            frame = self._load(path)
            if frame is not None:
                self._count += 1
                if self.limit and self._count >= self.limit:
                    self.finished = True
                self._due = max(self._due + self.period, self._clock())
                return frame
            if self.finished:
                return None
        self.finished = True  # every file is unreadable
        return None

    def _announce_end(self, files: int) -> None:
        """Say once that the replay is over: the daemon itself keeps running."""
        if self._announced:
            return
        self._announced = True
        why = (
            f"the limit of {self.limit} frames"
            if self.limit and self._count >= self.limit
            else (f"the end of its {files} file(s)")
        )
        skipped = f", {len(self._bad)} unreadable skipped" if self._bad else ""
        logger.info(
            "%s: replay finished after %d frame(s) (%s%s); no more frames will come "
            "(camera.replay.loop = true starts over)",
            self.name,
            self._count,
            why,
            skipped,
        )

    def _load(self, path: Path) -> Frame | None:
        if path in self._bad:
            return None
        try:
            data = path.read_bytes()
            image = decode_image(data, source=shown_path(path))
        except (OSError, ImageDecodeError) as exc:
            reason = str(exc) if isinstance(exc, ImageDecodeError) else (exc.strerror or str(exc))
            self._bad.add(path)
            logger.warning("%s: skipping %s: %s", self.name, shown_path(path.name), reason)
            if self._on_problem is not None:
                self._on_problem(shown_path(path), reason)
            return None
        return Frame(image=image, source=shown_path(path), captured_at=_utc_now(), encoded=data)

    def close(self) -> None:
        self._closed.set()
        self._files = None


def make_camera(
    cfg: CameraConfig, data_dir: Path, *, on_problem: ProblemCallback | None = None
) -> Camera:
    """The backend ``cfg.backend`` names, built from its options.

    ``data_dir`` is the daemon's own directory (the folder camera keeps its state
    database there); ``on_problem`` hears about files that could not be used.

    Raises:
        ConfigError: unknown backend, or a folder backend without a path.
    """
    if cfg.backend == "picamera2":
        return Picamera2Camera(cfg.picamera2)
    if cfg.backend == "opencv":
        return OpenCVCamera(cfg.opencv)
    if cfg.backend == "folder":
        if cfg.folder.path is None:
            raise ConfigError("camera.folder.path: required when camera.backend = 'folder'")
        return FolderCamera(
            cfg.folder.path,
            Path(data_dir) / STATE_DB_NAME,
            patterns=cfg.folder.patterns,
            settle_s=cfg.folder.settle_s,
            scan_interval_s=cfg.folder.scan_interval_s,
            handled=cfg.folder.handled,
            recursive=cfg.folder.recursive,
            on_problem=on_problem,
        )
    if cfg.backend == "replay":
        if cfg.replay.path is None:
            raise ConfigError("camera.replay.path: required when camera.backend = 'replay'")
        return ReplayCamera(
            cfg.replay.path,
            patterns=cfg.replay.patterns,
            rate_hz=cfg.replay.rate_hz,
            loop=cfg.replay.loop,
            limit=cfg.replay.limit,
            recursive=cfg.replay.recursive,
            on_problem=on_problem,
        )
    raise ConfigError(f"camera.backend: unknown backend {cfg.backend!r}")


# ── keeping a camera open ─────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Outage:
    """A camera that is down: the latest error, since when, how many failed tries."""

    error: str
    since: datetime
    attempts: int


class _Backoff:
    """Exponential delays from ``low`` doubling up to ``high``."""

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low <= high:
            raise ValueError(f"backoff needs 0 < min <= max, got {low}, {high}")
        self.low, self.high = low, high
        self.delay = low

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.high)
        return delay

    def reset(self) -> None:
        self.delay = self.low


class CameraSupervisor:
    """Keeps a camera working: reopens a failed one with exponential backoff.

    :meth:`read` never raises :class:`CameraError`: when the camera fails it is closed,
    the outage is recorded (``outage``, and ``on_outage(error, down_since)`` on every
    failed try) and reopening is tried after ``backoff_min_s``, doubling up to
    ``backoff_max_s``. Waits are on ``stop`` and bounded by ``read``'s timeout, so the
    capture thread stays responsive. The camera counts as recovered after its first
    successful read (not merely open: a camera that opens and then fails at once
    must keep backing off); ``on_recovered(down_since, seconds_down)`` is called then.
    ``MissingDependencyError`` is not retried: no wait can install a package.
    """

    def __init__(
        self,
        camera: Camera,
        stop: threading.Event,
        *,
        backoff_min_s: float = 1.0,
        backoff_max_s: float = 60.0,
        on_outage: Callable[[str, datetime], None] | None = None,
        on_recovered: Callable[[datetime, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.camera = camera
        self._stop = stop
        self._backoff = _Backoff(backoff_min_s, backoff_max_s)
        self._on_outage = on_outage
        self._on_recovered = on_recovered
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._retry_at = -float("inf")
        self._outage: Outage | None = None
        self._outage_started = 0.0  # on ``clock``: a wall-clock jump must not skew it

    @property
    def outage(self) -> Outage | None:
        """The current outage, or None while the camera works (for health messages)."""
        with self._lock:
            return self._outage

    def read(self, timeout: float) -> Frame | None:
        """A frame, or None: nothing yet, camera down (retrying), or ``stop`` is set."""
        if self._stop.is_set():
            return None
        if not self._open and not self._try_open(timeout):
            return None
        try:
            frame = self.camera.read(timeout)
        except CameraError as exc:
            self._failed(str(exc))
            return None
        except Exception as exc:
            # A bug or a library's own exception: treated as a camera failure (closed,
            # reopened with backoff), never allowed to end the capture thread.
            logger.error("camera %s: unexpected error", self.camera.name, exc_info=True)
            self._failed(f"unexpected {type(exc).__name__}: {str(exc)[:200]}")
            return None
        self._recovered()
        return frame

    def _try_open(self, timeout: float) -> bool:
        wait = self._retry_at - self._clock()
        if wait > 0 and (
            self._stop.wait(min(wait, max(0.0, timeout))) or self._clock() < self._retry_at
        ):
            return False
        try:
            self.camera.open()
        except CameraError as exc:
            self._failed(str(exc))
            return False
        self._open = True
        return True

    def _failed(self, error: str) -> None:
        self.camera.close()
        self._open = False
        delay = self._backoff.next()
        self._retry_at = self._clock() + delay
        with self._lock:
            if self._outage is None:
                self._outage = Outage(error, _utc_now(), 1)
                self._outage_started = self._clock()
            else:
                self._outage = Outage(error, self._outage.since, self._outage.attempts + 1)
            outage = self._outage
        logger.warning(
            "camera %s is down (try %d, since %s): %s; retrying in %.1f s",
            self.camera.name,
            outage.attempts,
            outage.since.isoformat(timespec="seconds"),
            error,
            delay,
        )
        if self._on_outage is not None:
            self._on_outage(error, outage.since)

    def _recovered(self) -> None:
        if self._outage is None:
            return
        with self._lock:
            outage, self._outage = self._outage, None
        self._backoff.reset()
        seconds = self._clock() - self._outage_started
        logger.warning("camera %s is back after %.1f s", self.camera.name, seconds)
        if self._on_recovered is not None:
            self._on_recovered(outage.since, seconds)

    def close(self) -> None:
        self.camera.close()
        self._open = False


def open_with_backoff(
    camera: Camera,
    stop: threading.Event,
    *,
    backoff_min_s: float = 1.0,
    backoff_max_s: float = 60.0,
    on_outage: Callable[[str, datetime], None] | None = None,
) -> bool:
    """Open ``camera``, retrying with exponential backoff until it opens (True) or
    ``stop`` is set (False). Waits on ``stop``, so a shutdown is never delayed."""
    backoff = _Backoff(backoff_min_s, backoff_max_s)
    since: datetime | None = None
    while not stop.is_set():
        try:
            camera.open()
        except CameraError as exc:
            since = since or _utc_now()
            delay = backoff.next()
            logger.warning("camera %s cannot open: %s; retrying in %.1f s", camera.name, exc, delay)
            if on_outage is not None:
                on_outage(str(exc), since)
            stop.wait(delay)
            continue
        return True
    return False


# ── triggers ──────────────────────────────────────────────────────────────────────────


class Trigger:
    """When to take the next frame. :meth:`wait` blocks until a frame is due (True)
    or ``stop`` is set (False). :meth:`fire` asks for one frame now, in any mode: it is
    what the MQTT ``capture`` command calls; requests queue up to ``max_pending``."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_pending: int = 16
    ) -> None:
        self._clock = clock
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._event = threading.Event()

    def fire(self) -> bool:
        """Request one capture now; False when ``max_pending`` requests already wait."""
        with self._lock:
            if self._pending >= self._max_pending:
                return False
            self._pending += 1
            self._event.set()
        return True

    def wake(self) -> None:
        """Make a waiting :meth:`wait` look at its stop event at once (after stop.set())."""
        self._event.set()

    def wait(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            with self._lock:
                if self._pending:
                    self._pending -= 1
                    if not self._pending:
                        self._event.clear()
                    return True
                self._event.clear()
            now = self._clock()
            due = self._due_in(now)
            if due is not None and due <= 0:
                self._taken(now)
                return True
            self._event.wait(_STOP_CHECK_S if due is None else min(due, _STOP_CHECK_S))
        return False

    def _due_in(self, now: float) -> float | None:
        """Seconds until the schedule wants a frame; None: never (command only)."""
        return None

    def _taken(self, now: float) -> None:
        """The schedule's frame was taken at ``now``."""


class ContinuousTrigger(Trigger):
    """As fast as the pipeline takes frames, but at most ``max_rate_hz`` (0: no limit)."""

    def __init__(self, max_rate_hz: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self.period = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0
        self._last = -float("inf")

    def _due_in(self, now: float) -> float:
        return self._last + self.period - now

    def _taken(self, now: float) -> None:
        self._last = now


class IntervalTrigger(Trigger):
    """Every ``interval_s`` on a fixed grid from the first wait (slots missed while
    the pipeline was busy are skipped, not made up in a burst)."""

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._next: float | None = None

    def _due_in(self, now: float) -> float:
        if self._next is None:
            self._next = now
        return self._next - now

    def _taken(self, now: float) -> None:
        assert self._next is not None
        while self._next <= now:
            self._next += self.interval_s


class CommandTrigger(Trigger):
    """Only when asked: each :meth:`fire` (the MQTT ``capture`` command) is one frame."""


def make_trigger(cfg: CameraConfig, *, clock: Callable[[], float] = time.monotonic) -> Trigger:
    """The trigger ``cfg.trigger`` names.

    Raises:
        ConfigError: unknown trigger.
    """
    if cfg.trigger == "continuous":
        return ContinuousTrigger(cfg.max_rate_hz, clock=clock)
    if cfg.trigger == "interval":
        return IntervalTrigger(cfg.interval_s, clock=clock)
    if cfg.trigger == "command":
        return CommandTrigger(clock=clock)
    raise ConfigError(f"camera.trigger: unknown trigger {cfg.trigger!r}")
