"""The images of a folder replayed in name order at a set rate, for tests, demos and
benchmarks: ``camera.backend = "replay"``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import msgspec

from fieldscope.edge.capture.base import (
    DEFAULT_IMAGE_PATTERNS,
    CameraBackend,
    CameraError,
    FileSourceOptions,
    Frame,
    ProblemCallback,
    required_path,
    utc_now,
)
from fieldscope.edge.capture.files import matches, no_images_hint, shown_path, walk_files
from fieldscope.edge.errors import ImageDecodeError
from fieldscope.edge.typed import seconds

__all__ = ["BACKEND", "ReplayCamera", "ReplayOptions"]

logger = logging.getLogger(__name__)


class ReplayOptions(FileSourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[camera.replay]``: the images of a folder in name order at ``rate_hz``
    (0 = as fast as they are asked for), for tests, demos and benchmarks.
    ``limit`` stops after that many frames (0 = no limit). ``recursive`` (the
    default) includes subfolders, so a ``fieldscope specimens`` folder (one subfolder
    per species) replays as it is."""

    rate_hz: Annotated[float, seconds(0, 10_000, "(0 = unlimited)")] = 1.0
    loop: bool = False
    limit: Annotated[int, msgspec.Meta(ge=0, extra={"unit": "(0 = no limit)"})] = 0
    recursive: bool = True


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
                    for rel, e in walk_files(self.path)
                    if matches(e.name, self.patterns) and e.is_file()
                )
                files = [p for _, p in found]
            else:
                files = sorted(
                    p for p in self.path.iterdir() if matches(p.name, self.patterns) and p.is_file()
                )
        except OSError as exc:
            raise CameraError(
                f"{self.name}: cannot list the folder: {exc.strerror or exc}"
            ) from exc
        if not files:
            raise CameraError(
                f"{self.name}: "
                + no_images_hint(self.path, self.patterns, self.recursive, "camera.replay")
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
        from fieldscope.edge.preprocess import decode_image  # (OpenCV): see folder.py

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
        return Frame(image=image, source=shown_path(path), captured_at=utc_now(), encoded=data)

    def close(self) -> None:
        self._closed.set()
        self._files = None


def _build(
    options: ReplayOptions, data_dir: Path, on_problem: ProblemCallback | None
) -> ReplayCamera:
    settings = msgspec.structs.asdict(options)
    settings["path"] = required_path(options.path, "replay")
    return ReplayCamera(on_problem=on_problem, **settings)


BACKEND = CameraBackend(
    "replay", ReplayOptions, _build, "a folder's images replayed at a set rate (tests, demos)"
)
