"""The sections of the edge daemon's configuration, each a frozen ``msgspec.Struct``.

Declared once: names, types, defaults and constraints (``Annotated[..., Meta(...)]``),
read by :mod:`fieldscope.edge.typed` and checked by it for Structs built in code too.
Each ``problems()`` holds only what a declaration cannot say (keys that go together,
files that must exist, names that become MQTT topic levels). The whole tree,
:class:`~fieldscope.edge.config.EdgeConfig`, and the file reading are in
:mod:`fieldscope.edge.config`, which re-exports everything here.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from fieldscope.edge.broker import BrokerSettings, MqttProtocol, TlsSettings
from fieldscope.edge.capture import (
    CAMERA_BACKENDS,
    CAMERAS,
    FolderOptions,
    OpenCVOptions,
    Picamera2Options,
    ReplayOptions,
)
from fieldscope.edge.capture.base import FileSourceOptions
from fieldscope.edge.recipe import RecipeTable
from fieldscope.edge.runtime import RUNTIMES
from fieldscope.edge.topics import segment_problem, show
from fieldscope.edge.typed import Problems, Reader, one_of, seconds
from fieldscope.edge.untrusted import RejectedValueError, read_regular_file

Trigger = Literal["continuous", "interval", "command"]
OutboxWhenFull = Literal["drop-oldest", "reject-new"]
ArchiveMode = Literal["none", "all", "uncertain"]
ArchiveFormat = Literal["png", "jpg"]
UploadPolicy = Literal["none", "uncertain", "all", "percent"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

TRIGGERS: tuple[str, ...] = typing.get_args(Trigger)
OUTBOX_WHEN_FULL: tuple[str, ...] = typing.get_args(OutboxWhenFull)
ARCHIVE_MODES: tuple[str, ...] = typing.get_args(ArchiveMode)
ARCHIVE_FORMATS: tuple[str, ...] = typing.get_args(ArchiveFormat)
UPLOAD_POLICIES: tuple[str, ...] = typing.get_args(UploadPolicy)
# The images' queue in device.data_dir when [upload] queue is not set.
UPLOAD_QUEUE_FILE = "images.sqlite"
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)
MQTT_PROTOCOLS: tuple[str, ...] = tuple(p.value for p in MqttProtocol)
# The station's [mqtt] and [mqtt.tls] sections are the broker connection's own models.
MqttConfig = BrokerSettings
TlsConfig = TlsSettings

_MQTT_PORT = 1883
_MQTTS_PORT = 8883
# A station's config is a few kilobytes; anything over this is not one (and is refused
# before it is read whole).
MAX_CONFIG_BYTES = 1024 * 1024
_BACKOFF = {"expected": "an array of two numbers [min, max]"}


def _required(what: str) -> Meta:
    """A required key or section: ``what`` says what it is, in the missing-key message."""
    return Meta(description=what)


def _size(raw: object, reader: Reader) -> int:
    return parse_size(raw)


# ── the configuration tree ────────────────────────────────────────────────────────────


class DeviceConfig(msgspec.Struct, frozen=True):
    """``[device]``: who this station is, and the daemon's own directory.

    ``station`` and ``id`` become MQTT topic levels, so they follow the topic rules.
    ``data_dir`` (default ``data`` next to the config file) holds the outbox, the folder
    camera's state and the archive; it is the only place the daemon writes to (besides
    the watched folder's done/failed).
    """

    station: Annotated[str, _required("the station's name, an MQTT topic level")]
    id: Annotated[str, _required("this device's name within the station, an MQTT topic level")]
    data_dir: Path

    def problems(self) -> Problems:
        out: Problems = []
        for key, value in (("station", self.station), ("id", self.id)):
            problem = segment_problem(value)
            if problem is not None:
                out.append((key, f"{problem} (it is an MQTT topic level), got {show(value)}"))
        if self.data_dir.exists() and not self.data_dir.is_dir():
            out.append(("data_dir", f"{self.data_dir} exists and is not a directory"))
        return out


class CameraConfig(msgspec.Struct, frozen=True):
    """``[camera]``: which backend captures, and when.

    ``trigger``: ``continuous`` captures as fast as the pipeline allows but at most
    ``max_rate_hz`` (0 = no limit); ``interval`` captures every ``interval_s``;
    ``command`` captures only on the MQTT ``capture`` command (which also works in
    the other modes). A failed camera is reopened after ``reopen_backoff_s[0]``
    seconds, doubling up to ``reopen_backoff_s[1]``.

    The camera registry (``fieldscope.edge.capture.CAMERAS``) decides which backends
    exist and what options each has: ``[camera.<backend>]`` is the field of that name,
    of that backend's own options model (a test holds the two to each other).
    """

    backend: Annotated[str, _required(f"one of {', '.join(CAMERA_BACKENDS)}")]
    trigger: Trigger = "continuous"
    max_rate_hz: Annotated[float, seconds(0, 1000, "(0 = no limit)")] = 2.0
    interval_s: Annotated[float, seconds(0.01, 7 * 86400)] = 60.0
    reopen_backoff_s: Annotated[tuple[float, float], Meta(extra=_BACKOFF)] = (1.0, 60.0)
    picamera2: Picamera2Options = msgspec.field(default_factory=Picamera2Options)
    opencv: OpenCVOptions = msgspec.field(default_factory=OpenCVOptions)
    folder: FolderOptions = msgspec.field(default_factory=FolderOptions)
    replay: ReplayOptions = msgspec.field(default_factory=ReplayOptions)

    def problems(self) -> Problems:
        out: Problems = []
        low, high = self.reopen_backoff_s
        if not 0 < low <= high <= 86400:
            out.append(
                (
                    "reopen_backoff_s",
                    f"must be [min, max] seconds with 0 < min <= max <= 86400, got [{low}, {high}]",
                )
            )
        if self.backend not in CAMERAS:
            return out + one_of("backend", self.backend, CAMERA_BACKENDS)
        chosen = getattr(self, self.backend)
        if isinstance(chosen, FileSourceOptions) and chosen.path is None:
            name = self.backend
            out.append(
                (f"{name}.path", f"required when camera.backend = {name!r} (the image folder)")
            )
        return out


# ``[preprocessing]``: deliberate departures from the bundle's recipe, the table that
# training and ``fieldscope edge preview`` read too. The input size can never be
# overridden (it is fixed by the model's graph), nor how the bundle's images were shrunk.
PreprocessingOverrides = RecipeTable


class QualityConfig(msgspec.Struct, frozen=True):
    """``[quality]``: the gate that turns away frames not worth classifying.

    ``sharpness`` is the variance of a Laplacian of Gaussian on a grey copy
    ``quality.ANALYSIS_WIDTH`` pixels wide (so it does not depend on the camera's
    resolution); ``brightness`` is the mean grey level as a fraction 0..1; ``clipped``
    the fraction of pixels at 0 or 255. The defaults accept every synthetic specimen
    (sharpness >= 1.0 there) and reject a frame blurred with a Gaussian of sigma 8
    (<= 0.1) and black or white frames; calibrate ``min_sharpness`` on your own
    microscope from the values recorded in the messages. With ``enabled = false``
    the values are still measured and reported, but nothing is rejected.
    """

    enabled: bool = True
    min_sharpness: Annotated[float, Meta(ge=0)] = 0.5
    min_brightness: Annotated[float, Meta(ge=0, le=1, extra={"what": "a fraction"})] = 0.02
    max_brightness: Annotated[float, Meta(ge=0, le=1, extra={"what": "a fraction"})] = 0.98
    max_clipped: Annotated[float, Meta(ge=0, le=1, extra={"what": "a fraction"})] = 0.75

    def problems(self) -> Problems:
        low, high = self.min_brightness, self.max_brightness
        if 0 <= low <= 1 and 0 <= high <= 1 and low >= high:
            return [("max_brightness", f"must be above min_brightness ({low}), got {high}")]
        return []


class ModelConfig(msgspec.Struct, frozen=True):
    """``[model]``: the bundle to serve.

    ``bundle`` is typically a ``current`` symlink that a deployment re-points, so the
    path is kept as written (never resolved through the link): the daemon notices
    when its target changes. With ``public_key`` set, only signed bundles load.
    ``threads`` unset lets the runtime choose; ``runtime`` forces one of
    ``fieldscope.edge.runtime.RUNTIMES`` by name.
    """

    bundle: Annotated[Path, _required("the bundle directory, typically a 'current' symlink")]
    public_key: Path | None = None
    threads: Annotated[int | None, Meta(ge=1, le=64)] = None
    runtime: str | None = None
    top_k: Annotated[int, Meta(ge=1, le=100)] = 3

    def problems(self) -> Problems:
        out: Problems = []
        if self.public_key is not None:
            problem = _public_key_problem(self.public_key)
            if problem is not None:
                out.append(("public_key", problem))
        if self.runtime is not None:
            out.extend(one_of("runtime", self.runtime, tuple(r.name for r in RUNTIMES)))
        return out


class OutboxConfig(msgspec.Struct, frozen=True):
    """``[outbox]``: the durable queue between classification and the broker.

    When it holds ``max_messages`` unacknowledged messages (a long broker outage),
    ``when_full`` decides: ``drop-oldest`` (the default) deletes the oldest to make
    room, because a live station's newest observations are worth most and the gap
    in ``seq`` tells subscribers what was lost; ``reject-new`` keeps the backlog and
    drops each new identification instead. Either way the drop is counted and
    reported in health. ``max_bytes`` (unset: no cap) also caps the database file,
    for a small SD card. ``batch`` bounds how many messages are in flight at once.
    ``path`` defaults to ``outbox.sqlite`` in ``device.data_dir``.
    """

    path: Path
    max_messages: Annotated[int, Meta(ge=1, le=100_000_000)] = 100_000
    when_full: OutboxWhenFull = "drop-oldest"
    batch: Annotated[int, Meta(ge=1, le=10_000)] = 100
    max_bytes: Annotated[int | None, Meta(extra={"parse": _size})] = None

    def problems(self) -> Problems:
        out: Problems = []
        if self.path.is_dir():
            out.append(("path", f"{self.path} is a directory; give the database file's path"))
        if self.max_bytes is not None and self.max_bytes < 16_384:
            out.append(("max_bytes", f"must be at least 16 KiB, got {self.max_bytes} bytes"))
        return out


class ArchiveConfig(msgspec.Struct, frozen=True):
    """``[archive]``: images kept on the station's disk (``none``, ``all``, or only
    ``uncertain`` ones, the most useful for labelling), at most ``max_bytes`` in
    total (oldest deleted first). ``format`` applies to camera frames; files from a
    folder are kept byte for byte, so their hash matches the message's. ``dir``
    defaults to ``archive`` in ``device.data_dir``."""

    dir: Path
    mode: ArchiveMode = "none"
    max_bytes: Annotated[int, Meta(extra={"parse": _size})] = 1 << 30
    format: Annotated[ArchiveFormat, Meta(extra={"case": "lower"})] = "png"

    def problems(self) -> Problems:
        out: Problems = []
        if self.max_bytes < 1 << 20:
            out.append(("max_bytes", f"must be at least 1 MiB, got {self.max_bytes} bytes"))
        if self.dir.exists() and not self.dir.is_dir():
            out.append(("dir", f"{self.dir} exists and is not a directory"))
        return out


class UploadConfig(msgspec.Struct, frozen=True):
    """``[upload]``: which frames' images go to the collector, on the ``image`` topic.

    ``policy``: ``none``, ``uncertain`` (the images worth labelling), ``all``, or
    ``percent`` (that share of the frames, chosen at random). Each chosen image is
    published as ``format`` (``jpg`` or ``png``), shrunk so its longer side is at most
    ``max_side`` pixels and its bytes at most ``max_bytes`` (a JPEG is re-encoded at
    lower quality, then smaller, until it fits); a file's own JPEG or PNG bytes are
    sent unchanged when they already fit. Images wait in their own durable queue
    (``queue``, default ``images.sqlite`` in ``device.data_dir``) of at most
    ``queue_bytes``, the oldest given up first, so a long outage can never push out
    identifications."""

    policy: UploadPolicy = "none"
    percent: Annotated[float, Meta(gt=0, le=100)] = 10.0
    max_side: Annotated[int, Meta(ge=16, le=65535)] = 1600
    max_bytes: Annotated[int, Meta(extra={"parse": _size})] = 1 << 20
    format: Annotated[ArchiveFormat, Meta(extra={"case": "lower"})] = "jpg"
    queue: Path | None = None
    queue_bytes: Annotated[int, Meta(extra={"parse": _size})] = 256 << 20

    def problems(self) -> Problems:
        out: Problems = []
        if not 16 << 10 <= self.max_bytes <= 64 << 20:
            out.append(("max_bytes", f"must be from 16 KiB to 64 MiB, got {self.max_bytes} bytes"))
        if self.queue_bytes < max(1 << 20, 4 * self.max_bytes):
            message = "must be at least 1 MiB and four times upload.max_bytes"
            out.append(("queue_bytes", f"{message}, got {self.queue_bytes} bytes"))
        if self.queue is not None and self.queue.is_dir():
            out.append(("queue", f"{self.queue} is a directory; give the database file's path"))
        return out


class HeartbeatConfig(msgspec.Struct, frozen=True):
    """``[heartbeat]``: how often health is published."""

    interval_s: Annotated[float, seconds(1, 86400)] = 60.0


class LogConfig(msgspec.Struct, frozen=True):
    """``[log]``: the level of the daemon's log lines on stderr (journald), and how often
    a running daemon logs a one-line summary (frames by outcome, outbox depth, link),
    so a healthy station is not silent; 0 turns the summary off."""

    level: Annotated[LogLevel, Meta(extra={"case": "upper"})] = "INFO"
    summary_interval_s: float = 60.0

    def problems(self) -> Problems:
        interval = self.summary_interval_s
        if interval != 0 and not 1 <= interval <= 86400:
            message = f"must be 0 (off) or in [1, 86400] seconds, got {interval}"
            return [("summary_interval_s", message)]
        return []


def default_client_id(station: str, device: str) -> str:
    """The MQTT client id when none is configured: stable across restarts, so the
    broker recognises the station, and unique per device within a deployment."""
    return f"fieldscope-{station}-{device}"


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``"500 MB"``, ``"2GiB"`` or ``"1.5G"``.

    Units: B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024);
    K/M/G/T alone are taken as binary, as ``du -h`` prints them.

    Raises:
        ValueError: not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**63:
            raise ValueError(f"must be a size below 8 EiB, got {show(value)}")
        return value
    if not isinstance(value, str):
        raise ValueError(f'must be a byte count or a size such as "2 GiB", got {show(value)}')
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", value)
    if match is None:
        raise ValueError(f'must be a byte count or a size such as "2 GiB", got {show(value)}')
    number, prefix, binary, unit = match.groups()
    if not prefix and binary:
        raise ValueError(f'must be a byte count or a size such as "2 GiB", got {show(value)}')
    power = " KMGT".index(prefix.upper()) if prefix else 0
    base = 1024 if binary or not unit else 1000
    size = float(number) * base**power
    if not size < 2**63:  # also inf, from a number of 400 digits
        raise ValueError(f"must be a size below 8 EiB, got {show(value)}")
    return int(size)


def _public_key_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the public key that bundles are verified with, or None.

    A private key given here would also be refused when a bundle loads, but only then:
    check-config says so at once, and that the private key must stay off devices.
    """
    if not path.is_file():
        return f"no such file: {path}"
    try:
        data = read_regular_file(path, 64 * 1024)
    except (RejectedValueError, OSError) as exc:
        return f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    if b"PRIVATE KEY" in data:
        return (
            f"{path} is a PRIVATE key; give the public key (`openssl pkey -in KEY -pubout`) "
            "and keep the private key off the station"
        )
    if b"-----BEGIN PUBLIC KEY-----" not in data:
        return f"{path} is not a PEM public key (it has no BEGIN PUBLIC KEY line)"
    return None
