"""Images to the collector: the bounded copy of a frame published on the ``image`` topic.

Until now a collector saw a station's images only if someone copied its archive by
hand. With ``[upload]`` the station publishes, for the frames its policy chooses
(``uncertain``, ``all`` or a random ``percent``), a JPEG or PNG copy on
``{prefix}/{station}/{device}/image/{sha256}`` and names that SHA-256 in the
identification (``image.upload_sha256``). Decisions:

* **Its own durable queue.** Images wait in a second :class:`Outbox` (``images.sqlite``
  beside the outbox, capped by ``queue_bytes``, oldest given up first and counted),
  which the MQTT link drains with the room identifications leave
  (:mod:`fieldscope.edge.link_lane`): an outage loses no image within the cap, and a
  backlog of images can never push an identification out of the outbox. Its ``seq``
  never appears on the wire, so it leaves no gap in the identifications' ``seq``.
* **Queued before the identification** that names it: once the identification is
  stored, its image is on disk too. A file offered again after a crash makes the same
  bytes, so the collector, which stores by hash, keeps one copy.
* **Bounded on the station**: at most ``max_side`` pixels on the longer side and
  ``max_bytes`` bytes. A file's own JPEG or PNG bytes go unchanged when they fit (the
  image is then the very file, ``upload_sha256 == sha256``); otherwise the frame is
  shrunk and encoded as ``format``, a JPEG at falling quality, then smaller, until it
  fits.
* **Best effort, never fatal**: an image that cannot be encoded or stored is logged and
  counted; its identification goes out without ``upload_sha256``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.archive import ImageArchive
from fieldscope.edge.capture import Frame
from fieldscope.edge.config_sections import UPLOAD_QUEUE_FILE, UploadConfig
from fieldscope.edge.message import MAX_NAME_CHARS, ImageRef
from fieldscope.edge.outbox import Outbox, OutboxError
from fieldscope.edge.topics import TOPIC_SPECS, TopicKind, Topics

__all__ = [
    "QUEUE_FILE",
    "FrameImages",
    "ImageUploads",
    "bounded_image",
    "open_uploads",
    "source_name",
]

logger = logging.getLogger(__name__)

QUEUE_FILE: Final = UPLOAD_QUEUE_FILE
# An image queue never holds more entries than this (its byte cap comes first).
_MAX_QUEUED = 100_000
_JPEG_QUALITIES: Final = (90, 80, 70, 55, 40)
_SHRINK: Final = 0.7
_MIN_SIDE: Final = 16
_SIGNATURES: Final = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG


class _Captured(Protocol):
    """What :class:`FrameImages` reads of the pipeline's captured frame."""

    @property
    def frame(self) -> Frame | None: ...
    @property
    def digest(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def source_name(self) -> str | None: ...


def source_name(frame: Frame) -> str | None:
    """The original file name of a frame read from a file (folder and replay cameras
    keep the file's bytes), else None."""
    if frame.encoded is None:
        return None
    name = Path(frame.source).name.strip()[:MAX_NAME_CHARS]
    return name or None


def bounded_image(
    image: npt.NDArray[np.uint8], encoded: bytes | None, cfg: UploadConfig
) -> bytes | None:
    """The bytes to publish for ``image`` (RGB) within ``cfg``'s pixel and byte bounds;
    None when even a ``_MIN_SIDE``-pixel copy does not fit.

    ``encoded`` (the file's own bytes) is returned unchanged when it is a JPEG or PNG
    that already fits.
    """
    height, width = image.shape[:2]
    longer = max(height, width)
    fits = encoded is not None and len(encoded) <= cfg.max_bytes and longer <= cfg.max_side
    if fits and encoded is not None and encoded.startswith(_SIGNATURES):
        return encoded
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    scale = min(1.0, cfg.max_side / longer)
    while True:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = bgr if scale >= 1.0 else cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        for params in _attempts(cfg.format):
            ok, buffer = cv2.imencode(f".{cfg.format}", small, params)
            if ok and buffer.size <= cfg.max_bytes:
                return bytes(buffer.tobytes())
        if max(size) <= _MIN_SIDE:
            return None
        scale *= _SHRINK


def _attempts(fmt: str) -> list[list[int]]:
    if fmt == "jpg":
        return [[cv2.IMWRITE_JPEG_QUALITY, q] for q in _JPEG_QUALITIES]
    return [[cv2.IMWRITE_PNG_COMPRESSION, 6]]


class ImageUploads:
    """Chooses frames by policy and queues their bounded images for the link.

    Thread-safe (the store stage calls it; health reads the counts). ``rng`` draws the
    ``percent`` sample (tests pass a seeded one).
    """

    def __init__(
        self,
        cfg: UploadConfig,
        queue: Outbox,
        topics: Topics,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self._topics = topics
        self._random = rng or random.Random().random
        self._qos = TOPIC_SPECS[TopicKind.IMAGE].qos
        self._lock = threading.Lock()
        self.queued = 0
        self.failed = 0

    def chooses(self, status: str) -> bool:
        """Whether the policy publishes the image of a frame with ``status``."""
        policy = self.cfg.policy
        if policy == "percent":
            with self._lock:
                return self._random() * 100.0 < self.cfg.percent
        return policy == "all" or (policy == "uncertain" and status == "uncertain")

    def publish(self, frame: Frame, status: str) -> str | None:
        """Queue the frame's image if the policy chooses it; the SHA-256 it is published
        under, or None (not chosen, or it failed: logged and counted)."""
        if not self.chooses(status):
            return None
        try:
            data = bounded_image(frame.image, frame.encoded, self.cfg)
        except cv2.error as exc:
            return self._failed(frame, f"cannot encode it: {exc}")
        if data is None:
            return self._failed(frame, f"it does not fit in {self.cfg.max_bytes} bytes")
        digest = hashlib.sha256(data).hexdigest()
        try:
            self.queue.add(self._topics.image(digest), lambda _seq: data, self._qos)
        except OutboxError as exc:
            return self._failed(frame, f"the image queue cannot store it: {exc}")
        with self._lock:
            self.queued += 1
        return digest

    def _failed(self, frame: Frame, why: str) -> str | None:
        """Log and count an image that is not uploaded; None, for ``publish`` to return."""
        with self._lock:
            self.failed += 1
            failed = self.failed
        logger.warning("the image of %s is not uploaded: %s (%d so far)", frame.source, why, failed)
        return None

    def problem(self) -> str | None:
        """A heartbeat warning when images were lost (not encodable, not storable, or
        given up by the full queue), else None."""
        with self._lock:
            failed = self.failed
        dropped = self.queue.dropped()
        if not failed and not dropped:
            return None
        return (
            f"upload: {failed} image(s) could not be queued and {dropped} were given up by "
            f"the full image queue ({self.queue.depth()} waiting; raise upload.queue_bytes "
            "or lower max_bytes)"
        )

    def close(self) -> None:
        self.queue.close()


def open_uploads(cfg: UploadConfig, data_dir: Path, topics: Topics) -> ImageUploads | None:
    """The station's uploads, with their queue opened; None when the policy is ``none``
    or the queue cannot be opened even after setting a damaged file aside: images are
    best effort, so the station identifies without them rather than not at all."""
    if cfg.policy == "none":
        return None
    path = cfg.queue or data_dir / QUEUE_FILE
    queue = _open_queue(path, cfg)
    if queue is None:
        return None
    logger.info(
        "uploading images (%s) through %s, at most %d px and %d bytes each",
        cfg.policy if cfg.policy != "percent" else f"{cfg.percent:g} %",
        path,
        cfg.max_side,
        cfg.max_bytes,
    )
    return ImageUploads(cfg, queue, topics)


def _open_queue(path: Path, cfg: UploadConfig) -> Outbox | None:
    try:
        return Outbox(path, max_messages=_MAX_QUEUED, max_bytes=cfg.queue_bytes)
    except OutboxError as first:
        aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            path.rename(aside)
            queue = Outbox(path, max_messages=_MAX_QUEUED, max_bytes=cfg.queue_bytes)
        except (OSError, OutboxError) as exc:
            logger.error(
                "images are not uploaded: cannot open the image queue %s (%s; then %s); "
                "identifications go on. Free the disk or remove the file, then restart",
                path,
                first,
                exc,
            )
            return None
        logger.error("the image queue %s was unreadable (%s); set aside as %s", path, first, aside)
        return queue


class FrameImages:
    """What the store stage does with a frame's image: archive it, upload it, and
    describe it in the message (:class:`ImageRef`)."""

    def __init__(self, archive: ImageArchive, uploads: ImageUploads | None) -> None:
        self.archive = archive
        self.uploads = uploads

    @property
    def wanted(self) -> bool:
        """Whether the frame (its pixels and bytes) must be kept until ``store``."""
        return self.archive.mode != "none" or self.uploads is not None

    def keep(self, captured: _Captured, status: str, label: str | None) -> ImageRef:
        frame = captured.frame
        archived = upload = None
        if frame is not None and self.archive.wants(status):
            archived = self.archive.store(frame, status, label or status)
        if frame is not None and self.uploads is not None:
            upload = self.uploads.publish(frame, status)
        return ImageRef(
            captured.digest,
            captured.width,
            captured.height,
            None if archived is None else str(archived),
            upload_sha256=upload,
            source_name=captured.source_name,
        )
