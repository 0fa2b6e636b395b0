"""What every camera backend shares: :class:`Frame`, the :class:`Camera` protocol,
:class:`CameraError`, the :class:`CameraBackend` registry entry, and the helpers
their options models use to describe a problem.

A backend module (``picamera2.py``, ``opencv.py``, ...) declares a camera class, an
options model (a frozen ``msgspec.Struct`` whose ``problems()`` lists what is wrong
with it) and a ``BACKEND`` entry; ``registry.py`` lists the entries. Nothing here
imports ``fieldscope.edge.config``: the configuration imports the options models
from the backends, not the reverse.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import msgspec
import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import ConfigError, FieldscopeError

RGBImage = npt.NDArray[np.uint8]
# (source, message): a file that could not be used, for logs and health messages.
ProblemCallback = Callable[[str, str], None]
# (key relative to the options' section, message), as edge/config.py's problems() give.
Problems = list[tuple[str, str]]
# The folder camera's bookkeeping, inside the daemon's data_dir.
STATE_DB_NAME = "folder-state.sqlite"
# What a microscope acquisition program writes; matched case-insensitively.
DEFAULT_IMAGE_PATTERNS: tuple[str, ...] = (
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.tif",
    "*.tiff",
    "*.bmp",
)
# A frame's width or height, where a backend lets the configuration choose it. The
# ``Meta.extra`` keys are words for the configuration loader's messages
# (``fieldscope.edge.typed``: ``unit``, ``parse``, ``item``); msgspec ignores them.
FrameSide = Annotated[int, msgspec.Meta(ge=16, le=16384, extra={"unit": "pixels"})]
# An image folder. msgspec has no Path type of its own: a loader decoding text into
# it passes a ``dec_hook`` (and resolves it against the configuration file's folder).
ImageFolder = Annotated[
    Path, msgspec.Meta(extra_json_schema={"type": "string", "description": "a folder"})
]
# What the folder camera does with a file once it is handled.
FolderHandling = Literal["keep", "move", "delete"]
FOLDER_HANDLING: tuple[str, ...] = typing.get_args(FolderHandling)


class CameraError(FieldscopeError):
    """The camera failed (unplugged, driver error, folder gone); reopening may help."""


def utc_now() -> datetime:
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


def as_rgb(array: object, source: str) -> RGBImage:
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


@dataclass(frozen=True)
class CameraBackend:
    """One camera backend as the registry knows it.

    ``options`` is its options model (``[camera.<name>]``); ``build(options, data_dir,
    on_problem)`` makes the camera from such options, the daemon's own directory and
    the callback that hears about unusable files. ``summary`` is one line for help
    texts and docs.
    """

    name: str
    options: type[Any]
    build: Callable[[Any, Path, ProblemCallback | None], Camera]
    summary: str = ""


def live_frame(array: object, source: str) -> Frame:
    """A live camera's frame, taken now: its array checked and made RGB."""
    return Frame(image=as_rgb(array, source), source=source, captured_at=utc_now())


def required_path(path: Path | None, backend: str) -> Path:
    """A file backend's folder, which its options may leave unset only for other backends."""
    if path is None:
        raise ConfigError(f"camera.{backend}.path: required when camera.backend = {backend!r}")
    return path


def frame_size_problems(width: int | None, height: int | None) -> Problems:
    """A frame size is both ``width`` and ``height`` or neither (each one's range is
    its :data:`FrameSide` declaration)."""
    if (width is None) != (height is None):
        given, missing = ("width", "height") if height is None else ("height", "width")
        return [(given, f"needs {missing} as well (width and height go together)")]
    return []


class FileSourceOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the file backends' options (folder, replay) begin with: the folder, and
    which of its files are images."""

    path: ImageFolder | None = None
    patterns: tuple[str, ...] = DEFAULT_IMAGE_PATTERNS

    def problems(self) -> Problems:
        """File name patterns must be a non-empty list of non-empty globs (the fields'
        types and bounds are declared, and checked by whoever decodes or loads them)."""
        if not self.patterns or any(not p for p in self.patterns):
            return [("patterns", "must be a non-empty list of non-empty glob patterns")]
        return []
