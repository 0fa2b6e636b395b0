"""The collector's image store: the stations' uploaded images, content-addressed on disk.

A station publishes the image of an identification its ``[upload]`` policy chose on
``{prefix}/{station}/{device}/image/{sha256}`` (:mod:`fieldscope.edge.uploads`), and
names the SHA-256 in the identification (``image.upload_sha256``). The collector
(``fieldscope collect run --images DIR``) keeps each payload here, so the dashboard
shows it without anyone copying a station's archive by hand. Decisions:

* **Content-addressed, sharded by the hash's first bytes**: ``DIR/ab/cd/abcd….jpg``
  (or ``.png``, from the bytes' own signature). A repeat (QoS 1 is at least once; a
  file offered again after a station's crash) is the same name and is not written
  twice; no two stations can overwrite each other's images; at most 65,536 folders.
* **Checked before kept**: the payload must be a JPEG or PNG of at most ``max_bytes``
  whose SHA-256 is the topic's last level. Anything else is dropped with a logged
  reason and counted (``refused``), never stored and never a crash; it is
  acknowledged, since sending it again cannot make it right.
* **Atomic**: written to a temporary file in its folder, flushed to disk, then renamed,
  so a crash never leaves half an image under a final name, and the folder synced before
  the PUBACK. A write that fails (a full disk) is retried with backoff (:meth:`ImageStore.keep`),
  holding the batch: the broker would send it again only after a reconnect.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, TypeVar

from fieldscope.edge.bundle_files import fsync_dir
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.topics import TopicError, TopicKind, parse, show

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MEDIA_TYPES",
    "ImageCounts",
    "ImageStore",
    "ImageStoreError",
    "find_image",
    "image_kind",
    "is_image_topic",
    "receive_window",
    "take_images",
]

logger = logging.getLogger(__name__)

# A station's default [upload] max_bytes is 1 MiB; this leaves room for larger settings.
DEFAULT_MAX_BYTES: Final = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WINDOW_BYTES: Final = 1 << 30
_RETRY_S: Final = (0.5, 30.0)
_SIGNATURES: Final = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))
MEDIA_TYPES: Final = {"png": "image/png", "jpg": "image/jpeg"}


class ImageStoreError(FieldscopeError):
    """The image folder cannot be used (not a folder, not writable)."""


def image_kind(data: bytes) -> str | None:
    """``"jpg"`` or ``"png"`` from the bytes' signature, or None for anything else."""
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


@dataclass
class ImageCounts:
    """What the store did since start: kept, repeats, refused (by reason), failed writes."""

    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        refused = ", ".join(f"{n} {why}" for why, n in sorted(self.refused.items())) or "none"
        return (
            f"images stored {self.stored}, duplicates {self.duplicates}, refused {refused}, "
            f"failed writes {self.failed}"
        )


class ImageStore:
    """Images by SHA-256 under ``root``; ``max_bytes`` bounds one image.

    ``receive`` is for the collector's writer thread; ``find`` may be called from any
    thread (the dashboard): it only looks at files.

    Raises:
        ImageStoreError: ``root`` exists and is not a folder, or cannot be created.
    """

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ImageStoreError(f"the image size limit must be >= 1 byte, got {max_bytes}")
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.counts = ImageCounts()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageStoreError(
                f"cannot use {self.root} as the image folder: {exc.strerror or exc}; "
                "give --images a writable folder"
            ) from exc
        if not self.root.is_dir():
            raise ImageStoreError(f"{self.root} is not a folder; give --images a folder")
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files a killed collector left (never acknowledged, so sent again)."""
        for leftover in self.root.glob("??/??/.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                logger.info("removed %s, left by a write that did not finish", leftover)

    def path(self, sha256: str, kind: str) -> Path:
        """Where the image ``sha256`` of ``kind`` (``jpg``/``png``) is (or would be) kept."""
        if not _SHA256.match(sha256) or kind not in MEDIA_TYPES:
            raise ValueError(f"not an image key: {show(sha256)} ({show(kind)})")
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.{kind}"

    def find(self, sha256: str | None) -> Path | None:
        """The kept image ``sha256`` (lower-case hex), or None."""
        return find_image(self.root, sha256)

    def receive(self, topic: str, payload: bytes, prefix: str) -> bool:
        """Check and keep one image message; False only when writing failed (see
        :meth:`keep`). A refused one is logged, counted and True: it is done with."""
        why, sha256 = _problem(topic, payload, prefix, self.max_bytes)
        if why is not None:
            self.counts.refused[why.split(":")[0]] += 1
            logger.warning("image on %s dropped: %s", show(topic, 160), why)
            return True
        kind = image_kind(payload)
        assert kind is not None  # _problem checked it
        assert sha256 is not None
        target = self.path(sha256, kind)
        try:
            if target.is_file():  # stat can fail too (EACCES, EIO): a failed write
                self.counts.duplicates += 1
                return True
            _write_atomically(target, payload)
        except OSError as exc:
            self.counts.failed += 1
            logger.error(
                "cannot keep the image %s in %s (%s); not acknowledged, retried (free the "
                "disk or fix the folder)",
                sha256,
                self.root,
                exc.strerror or exc,
            )
            return False
        self.counts.stored += 1
        return True

    def keep(self, topic: str, payload: bytes, prefix: str, stopping: threading.Event) -> bool:
        """:meth:`receive`, retried with backoff until the write succeeds or ``stopping``
        is set (False then): like a failed database write, since the broker would not
        send the image again before a reconnect (full disk, a network folder away)."""
        delay, longest = _RETRY_S
        while not self.receive(topic, payload, prefix):
            if stopping.is_set():
                return False
            stopping.wait(delay)
            delay = min(delay * 2, longest)
        return True


class Delivered(Protocol):
    """What :func:`take_images` reads of a received MQTT message."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def mid(self) -> int: ...


M = TypeVar("M", bound=Delivered)


def take_images(
    images: ImageStore | None, batch: list[M], prefix: str, stopping: threading.Event
) -> tuple[list[M], set[int]]:
    """Keep the batch's images (:meth:`ImageStore.keep`); the other messages, and the
    mids of the images not kept because ``stopping`` was set (not to be acknowledged)."""
    if images is None:
        return batch, set()
    rest: list[M] = []
    unkept: set[int] = set()
    for m in batch:
        if not is_image_topic(m.topic, prefix):
            rest.append(m)
        elif not images.keep(m.topic, m.payload, prefix, stopping):
            unkept.add(m.mid)
    return rest, unkept


def receive_window(images: ImageStore | None, most: int) -> int:
    """How many unacknowledged messages a collector lets the broker send: ``most`` small
    ones, but with images about 1 GiB of the largest allowed (64 at 16 MiB), since all of
    them can wait in its memory at once."""
    if images is None:
        return most
    return max(16, min(most, _WINDOW_BYTES // images.max_bytes))


def find_image(root: Path, sha256: str | None) -> Path | None:
    """The image ``sha256`` kept under ``root`` (an image store's folder), or None; only
    a 64-digit lower-case hex key is looked up, so no request can name another file."""
    if sha256 is None or not _SHA256.match(sha256):
        return None
    for kind in MEDIA_TYPES:
        candidate = root / sha256[:2] / sha256[2:4] / f"{sha256}.{kind}"
        if candidate.is_file():
            return candidate
    return None


def is_image_topic(topic: str, prefix: str) -> bool:
    """Whether ``topic`` is an image topic of the scheme (``…/image/<sha256>``)."""
    if f"/{TopicKind.IMAGE.value}/" not in topic:
        return False  # the quick answer for every other message
    try:
        return parse(topic, prefix).kind is TopicKind.IMAGE
    except TopicError:
        return False


def _problem(
    topic: str, payload: bytes, prefix: str, max_bytes: int
) -> tuple[str | None, str | None]:
    """Why an image message is refused (a short reason first, then details), and its
    SHA-256 from the topic."""
    try:
        parsed = parse(topic, prefix)
    except TopicError as exc:
        return f"topic: {exc}", None
    if parsed.kind is not TopicKind.IMAGE or parsed.command is None:
        return f"topic: {show(topic)} is not an image topic", None
    if len(payload) > max_bytes:
        return f"oversize: {len(payload)} bytes, the limit is {max_bytes}", None
    if image_kind(payload) is None:
        return "format: the payload is neither a JPEG nor a PNG", None
    actual = hashlib.sha256(payload).hexdigest()
    if actual != parsed.command:
        return f"sha256 mismatch: the payload's is {actual}, the topic names {parsed.command}", None
    return None, actual


def _write_atomically(target: Path, data: bytes) -> None:
    """Write, fsync, rename, and fsync the folders whose entries changed: the collector
    acknowledges the image right after, so it must survive a power cut from then on."""
    created = [p for p in (target.parent.parent, target.parent) if not p.is_dir()]
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(target)
        for folder in (target.parent, *(p.parent for p in reversed(created))):
            fsync_dir(folder)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
