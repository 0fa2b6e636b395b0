"""A ``cv2.VideoCapture`` — USB microscope, device path, video file or RTSP/HTTP
stream: ``camera.backend = "opencv"``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from fieldscope.edge.capture.base import (
    CameraBackend,
    CameraError,
    Frame,
    FrameSide,
    ProblemCallback,
    Problems,
    frame_size_problems,
    live_frame,
)
from fieldscope.edge.topics import show
from fieldscope.edge.typed import Reader, kind

__all__ = ["BACKEND", "OpenCVCamera", "OpenCVOptions"]

logger = logging.getLogger(__name__)


def _source(raw: object, reader: Reader) -> int | str:
    """The config loader's reading of ``source``: a device index, device path or URL as
    given; a file path taken from the configuration file's folder."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw:
        if "://" in raw or raw.startswith("/dev/"):
            return raw
        return str(reader.resolve(raw))
    raise ValueError(
        "must be a device index (0, 1, ...) or a device path, file or URL string, "
        f"got {kind(raw)} {show(raw)}"
    )


class OpenCVOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[camera.opencv]``: a USB/UVC microscope by index or device path, a video file,
    or an RTSP/HTTP stream URL. Unset ``width``/``height``/``fps`` keep the device's."""

    source: Annotated[int | str, msgspec.Meta(extra={"parse": _source})] = 0
    width: FrameSide | None = None
    height: FrameSide | None = None
    fps: Annotated[float, msgspec.Meta(gt=0, le=1000)] | None = None

    def problems(self) -> Problems:
        """What the declarations cannot say: a usable source; width and height together."""
        out: Problems = []
        if isinstance(self.source, int) and self.source < 0:
            out.append(("source", f"a device index must be >= 0, got {self.source}"))
        if isinstance(self.source, str) and not self.source:
            out.append(("source", "must not be empty"))
        return out + frame_size_problems(self.width, self.height)


def _masked(source: str) -> str:
    """``source`` with a stream URL's password hidden, for names that reach logs."""
    # Imported here: edge/config.py imports the options models from this package.
    from fieldscope.edge.config import mask_url

    return mask_url(source)


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
        self.name = f"opencv:{source if isinstance(source, int) else _masked(source)}"
        self.finished = False
        self._capture: Any = None
        self._is_file = False

    def open(self) -> None:
        import cv2  # here: the configuration loads this module for OpenCVOptions

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
        import cv2

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
        return live_frame(array, self.name)

    def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()


def _build(
    options: OpenCVOptions, data_dir: Path, on_problem: ProblemCallback | None
) -> OpenCVCamera:
    return OpenCVCamera(options)


BACKEND = CameraBackend(
    "opencv", OpenCVOptions, _build, "a USB microscope, video file or stream (OpenCV)"
)
