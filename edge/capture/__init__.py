"""Capture: camera backends behind one protocol, triggers, and a supervisor that reopens.

Every source of images — the Raspberry Pi camera, a USB microscope or RTSP stream via
OpenCV, a folder another acquisition program writes into, a folder replayed at a set
rate — is a :class:`Camera`: ``open()``, ``read(timeout)`` → :class:`Frame` or None,
``close()``. The daemon never knows which one it has; :func:`make_camera` picks it from
the configuration through the backend registry (``registry.py``), and tests drive the
same code through a fake ``picamera2`` module. One module per backend
(``picamera2.py``, ``opencv.py``, ``folder.py``, ``replay.py``) holds its camera class
and its options model.

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

from fieldscope.edge.capture.base import (
    DEFAULT_IMAGE_PATTERNS,
    FOLDER_HANDLING,
    STATE_DB_NAME,
    Camera,
    CameraBackend,
    CameraError,
    Frame,
    ProblemCallback,
)
from fieldscope.edge.capture.files import shown_path
from fieldscope.edge.capture.folder import FolderCamera, FolderOptions
from fieldscope.edge.capture.opencv import OpenCVCamera, OpenCVOptions
from fieldscope.edge.capture.picamera2 import Picamera2Camera, Picamera2Options
from fieldscope.edge.capture.registry import CAMERA_BACKENDS, CAMERAS, make_camera
from fieldscope.edge.capture.replay import ReplayCamera, ReplayOptions
from fieldscope.edge.capture.supervisor import CameraSupervisor, Outage, open_with_backoff
from fieldscope.edge.capture.triggers import (
    CommandTrigger,
    ContinuousTrigger,
    IntervalTrigger,
    Trigger,
    make_trigger,
)

__all__ = [
    "CAMERAS",
    "CAMERA_BACKENDS",
    "DEFAULT_IMAGE_PATTERNS",
    "FOLDER_HANDLING",
    "STATE_DB_NAME",
    "Camera",
    "CameraBackend",
    "CameraError",
    "CameraSupervisor",
    "CommandTrigger",
    "ContinuousTrigger",
    "FolderCamera",
    "FolderOptions",
    "Frame",
    "IntervalTrigger",
    "OpenCVCamera",
    "OpenCVOptions",
    "Outage",
    "Picamera2Camera",
    "Picamera2Options",
    "ProblemCallback",
    "ReplayCamera",
    "ReplayOptions",
    "Trigger",
    "make_camera",
    "make_trigger",
    "open_with_backoff",
    "shown_path",
]
