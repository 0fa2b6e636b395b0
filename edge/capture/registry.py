"""The camera backends: the one list of their names, and :func:`make_camera`.

A backend is a module of this package that declares its camera class, its options
model and a ``BACKEND`` entry (:class:`~fieldscope.edge.capture.base.CameraBackend`);
:data:`CAMERAS` lists the built-in ones. To add one, write that module and add its
``BACKEND`` here. :data:`CAMERAS` is immutable: a test or a program with a backend of
its own passes ``CAMERAS.adding(name, entry)`` to :func:`make_camera`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from fieldscope.edge.capture import folder, opencv, picamera2, replay
from fieldscope.edge.capture.base import Camera, CameraBackend, ProblemCallback
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.registry import Registry

if TYPE_CHECKING:
    from fieldscope.edge.config import CameraConfig

__all__ = ["CAMERAS", "CAMERA_BACKENDS", "make_camera"]

CAMERAS: Registry[CameraBackend] = Registry(
    "camera backend",
    (
        (entry.name, entry)
        for entry in (picamera2.BACKEND, opencv.BACKEND, folder.BACKEND, replay.BACKEND)
    ),
)
CAMERA_BACKENDS: tuple[str, ...] = CAMERAS.names()


def make_camera(
    cfg: CameraConfig,
    data_dir: Path,
    *,
    on_problem: ProblemCallback | None = None,
    backends: Registry[CameraBackend] = CAMERAS,
) -> Camera:
    """The backend ``cfg.backend`` names, built from its options (``cfg.<backend>``).

    ``data_dir`` is the daemon's own directory (the folder camera keeps its state
    database there); ``on_problem`` hears about files that could not be used.
    A backend whose options the configuration does not carry gets its defaults.

    Raises:
        ConfigError: unknown backend (the message lists the known ones), or a
            folder backend without a path.
    """
    backend = backends.lookup(cfg.backend, ConfigError, "camera.backend")
    return backend.build(_own_options(backend, cfg), Path(data_dir), on_problem)


def _own_options(backend: CameraBackend, cfg: CameraConfig) -> Any:
    """``cfg``'s options for ``backend`` as the backend's own options model: the
    configuration may hold them as another class with the same fields (or none)."""
    options = getattr(cfg, backend.name, None)
    if options is None or isinstance(options, backend.options):
        return options if options is not None else backend.options()
    fields = msgspec.structs.fields(backend.options)
    return backend.options(**{f.name: getattr(options, f.name) for f in fields})
