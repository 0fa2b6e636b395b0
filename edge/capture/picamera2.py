"""The Raspberry Pi camera through picamera2 (libcamera): ``camera.backend = "picamera2"``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import msgspec

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
from fieldscope.edge.errors import MissingDependencyError

__all__ = ["BACKEND", "Picamera2Camera", "Picamera2Options"]

logger = logging.getLogger(__name__)

_Control = float | int | bool | tuple[float, ...]


def _no_controls() -> Mapping[str, _Control]:
    return MappingProxyType({})


class Picamera2Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[camera.picamera2]``: the Raspberry Pi camera (libcamera).

    ``width``/``height`` unset means the sensor's full resolution. ``controls`` are
    passed to ``Picamera2.set_controls`` as given (e.g. ``ExposureTime``,
    ``AnalogueGain``, ``AwbEnable``): fixed exposure keeps a microscope's images
    comparable, auto exposure drifts with the specimen.
    """

    camera_num: Annotated[int, msgspec.Meta(ge=0)] = 0
    width: FrameSide | None = None
    height: FrameSide | None = None
    controls: Annotated[
        Mapping[str, _Control],
        msgspec.Meta(extra={"item": "a number, a boolean or an array of numbers"}),
    ] = msgspec.field(default_factory=_no_controls)

    def problems(self) -> Problems:
        """What the declarations cannot say: width and height go together."""
        return frame_size_problems(self.width, self.height)


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
        return live_frame(array, self.name)

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is None:
            return
        for step in (camera.stop, camera.close):
            try:
                step()
            except Exception as exc:  # closing a failed camera may fail too; nothing to do
                logger.debug("%s: %s failed while closing: %s", self.name, step.__name__, exc)


def _build(
    options: Picamera2Options, data_dir: Path, on_problem: ProblemCallback | None
) -> Picamera2Camera:
    return Picamera2Camera(options)


BACKEND = CameraBackend(
    "picamera2", Picamera2Options, _build, "the Raspberry Pi camera (picamera2, from apt)"
)
