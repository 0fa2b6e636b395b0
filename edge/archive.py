"""The image archive: frames kept on the station's disk, within a size cap.

Archived images are what a station contributes to the next training round — above
all the *uncertain* ones, which are the images the model most needs labelled. They
must never fill the SD card, and a full or failing disk must never stop the
daemon. Hence:

* ``mode``: ``none``, ``all``, or ``uncertain`` (frames whose status is uncertain);
* files are named by UTC capture time and image hash, in one folder per UTC day
  (``2026-11-23/20261123T183900_123456Z_3f2a9c1b0d4e_globigerina.png``), so name
  order is age order and a day's images are easy to copy off;
* when the total exceeds ``max_bytes`` the oldest files are deleted first; the total
  is kept as a running sum, and the folder is scanned only once, at start-up;
* every write goes to a temporary file that is renamed into place, so a power cut
  leaves no half image under a final name (leftovers are removed at start-up);
* a disk error is logged (at most once a minute) and counted, and ``store`` returns
  None: archiving is best effort and never takes the pipeline down;
* names are built only from sanitised parts, so nothing is written outside ``dir``.

Frames read from files are archived byte for byte in their own format, so the
archived file's SHA-256 is the one in the identification message; camera frames are
encoded as ``fmt`` (PNG, lossless, or JPEG at quality 95).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.capture import Frame
from fieldscope.edge.config import ARCHIVE_FORMATS, ARCHIVE_MODES
from fieldscope.edge.errors import ConfigError

__all__ = ["ImageArchive"]

logger = logging.getLogger(__name__)

_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_HINT = 40
_ERROR_LOG_INTERVAL_S = 60.0
_JPEG_QUALITY = 95
# Magic numbers of the formats decode_image reads, to keep a file's own extension.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (b"II+\x00", "tif"),
    (b"MM\x00+", "tif"),
    (b"BM", "bmp"),
)


def _extension(data: bytes) -> str | None:
    return next((ext for magic, ext in _SIGNATURES if data.startswith(magic)), None)


def _safe(text: str) -> str:
    """``text`` reduced to characters that are safe in a file name anywhere."""
    return _UNSAFE.sub("-", text).strip(".-")[:_MAX_HINT].strip(".-")


class ImageArchive:
    """Stores frames under ``dir`` by ``mode``, keeping the total under ``max_bytes``.

    Thread-safe. ``total_bytes`` and ``file_count`` describe the archive and
    ``errors`` counts failed writes (for health messages).

    Raises:
        ConfigError: unknown ``mode`` or ``fmt``, or ``max_bytes`` < 1.
    """

    def __init__(
        self, dir: Path, mode: str = "none", max_bytes: int = 1 << 30, fmt: str = "png"
    ) -> None:
        if mode not in ARCHIVE_MODES:
            raise ConfigError(
                f"archive.mode must be one of {', '.join(ARCHIVE_MODES)}, got {mode!r}"
            )
        if fmt not in ARCHIVE_FORMATS:
            raise ConfigError(
                f"archive.format must be one of {', '.join(ARCHIVE_FORMATS)}, got {fmt!r}"
            )
        if max_bytes < 1:
            raise ConfigError(f"archive.max_bytes must be >= 1, got {max_bytes}")
        self.dir = Path(dir).absolute()
        self.mode = mode
        self.max_bytes = max_bytes
        self.fmt = fmt
        self.errors = 0
        self._lock = threading.Lock()
        self._files: deque[tuple[Path, int]] = deque()
        self._total = 0
        self._last_error_log = -float("inf")
        if mode != "none":
            self._scan()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    @property
    def file_count(self) -> int:
        with self._lock:
            return len(self._files)

    def wants(self, status: str) -> bool:
        """Whether a frame with this status would be stored (to skip work early)."""
        return self.mode == "all" or (self.mode == "uncertain" and status == "uncertain")

    def _scan(self) -> None:
        """Learn what is already archived (oldest first) and remove interrupted writes."""
        found: list[tuple[str, str, Path, int]] = []
        try:
            days = [d for d in self.dir.iterdir() if _DAY_FOLDER.match(d.name) and d.is_dir()]
        except FileNotFoundError:
            return
        except OSError as exc:
            self._error(f"cannot list the archive {self.dir}: {exc.strerror or exc}")
            return
        for day in days:
            try:
                entries = list(os.scandir(day))
            except OSError as exc:
                self._error(f"cannot list {day}: {exc.strerror or exc}")
                continue
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        Path(entry.path).unlink()
                        continue
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
                found.append((day.name, entry.name, Path(entry.path), size))
        found.sort()
        self._files = deque((path, size) for _, _, path, size in found)
        self._total = sum(size for _, _, _, size in found)
        logger.info(
            "archive %s: %d images, %.1f MB (cap %.1f MB)",
            self.dir,
            len(self._files),
            self._total / 1e6,
            self.max_bytes / 1e6,
        )
        with self._lock:
            self._evict(keep=None)

    def store(
        self,
        item: Frame | npt.NDArray[np.uint8],
        status: str,
        name_hint: str | None = None,
        *,
        captured_at: datetime | None = None,
    ) -> Path | None:
        """Archive ``item`` if ``mode`` wants a frame with ``status``; returns its path.

        ``name_hint`` (e.g. the label) is appended to the name, sanitised.
        ``captured_at`` defaults to the frame's capture time (or now, for an array).
        Returns None when the mode does not want it, when writing failed (logged and
        counted), or when the image alone is larger than ``max_bytes``.
        """
        if not self.wants(status):
            return None
        if isinstance(item, Frame):
            image, encoded = item.image, item.encoded
            when = captured_at or item.captured_at
        else:
            image, encoded = item, None
            when = captured_at or datetime.now(UTC)
        data, ext = self._encode(image, encoded)
        if data is None:
            return None
        when = when.astimezone(UTC)
        digest = hashlib.sha256(data).hexdigest()[:12]
        stem = f"{when:%Y%m%dT%H%M%S_%f}Z_{digest}"
        hint = _safe(name_hint) if name_hint else ""
        name = f"{stem}_{hint}.{ext}" if hint else f"{stem}.{ext}"
        day = self.dir / f"{when:%Y-%m-%d}"
        target = day / name
        if target.parent.parent != self.dir:  # cannot happen with sanitised parts
            raise AssertionError(f"archive path {target} escapes {self.dir}")
        with self._lock:
            if not self._write(target, data):
                return None
            self._files.append((target, len(data)))
            self._total += len(data)
            self._evict(keep=target)
            if self._files and self._files[-1][0] == target:
                return target
        logger.warning(
            "archive: %s (%d bytes) is larger than the whole archive cap (%d bytes); not kept",
            name,
            len(data),
            self.max_bytes,
        )
        return None

    def _encode(
        self, image: npt.NDArray[np.uint8], encoded: bytes | None
    ) -> tuple[bytes | None, str]:
        if encoded is not None:
            ext = _extension(encoded)
            if ext is not None:
                return encoded, ext
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if self.fmt == "jpg" else []
        try:
            ok, buffer = cv2.imencode(f".{self.fmt}", bgr, params)
        except cv2.error as exc:
            self._error(f"cannot encode an image as {self.fmt}: {exc}")
            return None, self.fmt
        if not ok:
            self._error(f"cannot encode an image as {self.fmt}")
            return None, self.fmt
        return buffer.tobytes(), self.fmt

    def _write(self, target: Path, data: bytes) -> bool:
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            self._error(f"cannot write {target}: {exc.strerror or exc}")
            return False
        return True

    def _evict(self, keep: Path | None) -> None:
        """Delete the oldest files until the total fits (under the lock)."""
        emptied: set[Path] = set()
        while self._total > self.max_bytes and self._files:
            path, size = self._files.popleft()
            self._total -= size
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error(f"cannot delete {path}: {exc.strerror or exc}")
            emptied.add(path.parent)
            if path == keep:
                break
        for folder in emptied:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when the day's folder is empty

    def _error(self, message: str) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            logger.warning(
                "archive: %s (%d errors so far; archiving goes on)", message, self.errors
            )
