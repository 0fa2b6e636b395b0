"""The edge daemon's configuration: one typed, frozen tree, loaded once from TOML.

A field station runs for months unattended, so a configuration mistake must be found
when the file is loaded — by ``fieldscope edge check-config`` or at start-up — and
never an hour later in a code path that happens to read a mistyped key. Hence:

* every key is known: an unknown key is an error with a did-you-mean suggestion, not
  silently ignored (a mistyped ``prot = 8883`` would otherwise leave the daemon on
  1883 in plain text);
* all problems are collected and reported at once, each as one line that names the
  file, the line where TOML allows us to find it, and the dotted key::

      edge.toml:12: mqtt.prot: unknown key (did you mean 'port'?)

* values are checked for type *and* range; relative paths are resolved against the
  configuration file's folder (not the working directory, which systemd sets to ``/``);
* secrets need not be in the file: ``password_env = "FIELDSCOPE_MQTT_PASSWORD"`` or
  ``password = "${FIELDSCOPE_MQTT_PASSWORD}"`` read the environment (systemd's
  ``EnvironmentFile=``), and a missing variable is an error naming it;
* the result holds no runtime state: the daemon builds its parts from it.

Plain dataclasses and ``tomllib`` keep the Raspberry Pi install small (no pydantic).
The dataclasses hold plain values and can be built directly (tests do); their
``problems()``/``validate()`` check values, while :func:`load_config` and
:func:`config_from_dict` add what only a file has: types, unknown keys, defaults that
derive from other keys, relative paths and environment variables.
``fieldscope/edge/examples/edge.toml`` shows every key with its default.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fieldscope.edge.errors import ConfigError, RecipeError
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.runtime import RUNTIMES
from fieldscope.edge.topics import (
    DEFAULT_PREFIX,
    TOPIC_SPECS,
    TopicError,
    Topics,
    segment_problem,
    show,
)
from fieldscope.edge.untrusted import RejectedValueError, read_number, read_regular_file

__all__ = [
    "ARCHIVE_FORMATS",
    "ARCHIVE_MODES",
    "CAMERA_BACKENDS",
    "DEFAULT_IMAGE_PATTERNS",
    "FOLDER_HANDLING",
    "LOG_LEVELS",
    "MQTT_PROTOCOLS",
    "OUTBOX_WHEN_FULL",
    "TRIGGERS",
    "ArchiveConfig",
    "CameraConfig",
    "ConfigFileError",
    "ConfigProblem",
    "DeviceConfig",
    "EdgeConfig",
    "FolderOptions",
    "HeartbeatConfig",
    "LogConfig",
    "ModelConfig",
    "MqttConfig",
    "OpenCVOptions",
    "OutboxConfig",
    "Picamera2Options",
    "PreprocessingOverrides",
    "QualityConfig",
    "ReplayOptions",
    "TlsConfig",
    "check_config",
    "config_from_dict",
    "config_summary",
    "config_warnings",
    "default_client_id",
    "load_config",
    "mask_url",
    "parse_size",
]

CAMERA_BACKENDS: tuple[str, ...] = ("picamera2", "opencv", "folder", "replay")
TRIGGERS: tuple[str, ...] = ("continuous", "interval", "command")
FOLDER_HANDLING: tuple[str, ...] = ("keep", "move", "delete")
OUTBOX_WHEN_FULL: tuple[str, ...] = ("drop-oldest", "reject-new")
ARCHIVE_MODES: tuple[str, ...] = ("none", "all", "uncertain")
ARCHIVE_FORMATS: tuple[str, ...] = ("png", "jpg")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
MQTT_PROTOCOLS: tuple[str, ...] = ("5", "3.1.1")
# What a microscope acquisition program writes; matched case-insensitively.
DEFAULT_IMAGE_PATTERNS: tuple[str, ...] = (
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.tif",
    "*.tiff",
    "*.bmp",
)

_DEFAULT_DATA_DIR = "data"
_MQTT_PORT = 1883
_MQTTS_PORT = 8883
# A station's config is a few kilobytes; anything over this is not one (and is refused
# before it is read whole).
MAX_CONFIG_BYTES = 1024 * 1024
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Problems = list[tuple[str, str]]  # (dotted key, message)


# ── the configuration tree ────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class DeviceConfig:
    """``[device]``: who this station is, and the daemon's own directory.

    ``station`` and ``id`` become MQTT topic levels, so they follow the topic rules.
    ``data_dir`` holds the outbox, the folder camera's state and the archive; it is
    the only place the daemon writes to (besides the watched folder's done/failed).
    """

    station: str
    id: str
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


@dataclass(frozen=True)
class Picamera2Options:
    """``[camera.picamera2]``: the Raspberry Pi camera (libcamera).

    ``width``/``height`` unset means the sensor's full resolution. ``controls`` are
    passed to ``Picamera2.set_controls`` as given (e.g. ``ExposureTime``,
    ``AnalogueGain``, ``AwbEnable``): fixed exposure keeps a microscope's images
    comparable, auto exposure drifts with the specimen.
    """

    camera_num: int = 0
    width: int | None = None
    height: int | None = None
    controls: Mapping[str, float | int | bool | tuple[float, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def problems(self) -> Problems:
        out: Problems = []
        if self.camera_num < 0:
            out.append(("camera_num", f"must be >= 0, got {self.camera_num}"))
        out.extend(_frame_size_problems(self.width, self.height))
        return out


@dataclass(frozen=True)
class OpenCVOptions:
    """``[camera.opencv]``: a USB/UVC microscope by index or device path, a video file,
    or an RTSP/HTTP stream URL. Unset ``width``/``height``/``fps`` keep the device's."""

    source: int | str = 0
    width: int | None = None
    height: int | None = None
    fps: float | None = None

    def problems(self) -> Problems:
        out: Problems = []
        if isinstance(self.source, int) and self.source < 0:
            out.append(("source", f"a device index must be >= 0, got {self.source}"))
        if isinstance(self.source, str) and not self.source:
            out.append(("source", "must not be empty"))
        out.extend(_frame_size_problems(self.width, self.height))
        if self.fps is not None and not 0 < self.fps <= 1000:
            out.append(("fps", f"must be in (0, 1000], got {self.fps}"))
        return out


@dataclass(frozen=True)
class FolderOptions:
    """``[camera.folder]``: images another acquisition program drops into ``path``.

    A file is taken once its size and modification time have not changed for
    ``settle_s`` (so a half-written file is never read), and each file is handled
    exactly once, also across restarts. ``handled`` says what happens afterwards:
    ``keep`` leaves it (a state database remembers it), ``move`` moves it to
    ``path/done/``, ``delete`` removes it. Unreadable files go to ``path/failed/``
    (``keep``: they are only recorded as failed). ``recursive`` also takes the files
    of subfolders (not of ``done/`` and ``failed/`` when ``handled = "move"``).
    """

    path: Path | None = None
    patterns: tuple[str, ...] = DEFAULT_IMAGE_PATTERNS
    settle_s: float = 1.0
    scan_interval_s: float = 0.5
    handled: str = "keep"
    recursive: bool = False

    def problems(self) -> Problems:
        out: Problems = []
        if not self.patterns or any(not p for p in self.patterns):
            out.append(("patterns", "must be a non-empty list of non-empty glob patterns"))
        if not 0 <= self.settle_s <= 3600:
            out.append(("settle_s", f"must be in [0, 3600] seconds, got {self.settle_s}"))
        if not 0.01 <= self.scan_interval_s <= 3600:
            out.append(
                ("scan_interval_s", f"must be in [0.01, 3600] seconds, got {self.scan_interval_s}")
            )
        out.extend(_one_of("handled", self.handled, FOLDER_HANDLING))
        return out


@dataclass(frozen=True)
class ReplayOptions:
    """``[camera.replay]``: the images of a folder in name order at ``rate_hz``
    (0 = as fast as they are asked for), for tests, demos and benchmarks.
    ``limit`` stops after that many frames (0 = no limit). ``recursive`` (the
    default) includes subfolders, so a ``fieldscope specimens`` folder (one subfolder
    per species) replays as it is."""

    path: Path | None = None
    patterns: tuple[str, ...] = DEFAULT_IMAGE_PATTERNS
    rate_hz: float = 1.0
    loop: bool = False
    limit: int = 0
    recursive: bool = True

    def problems(self) -> Problems:
        out: Problems = []
        if not self.patterns or any(not p for p in self.patterns):
            out.append(("patterns", "must be a non-empty list of non-empty glob patterns"))
        if not 0 <= self.rate_hz <= 10_000:
            out.append(("rate_hz", f"must be in [0, 10000] (0 = unlimited), got {self.rate_hz}"))
        if self.limit < 0:
            out.append(("limit", f"must be >= 0 (0 = no limit), got {self.limit}"))
        return out


@dataclass(frozen=True)
class CameraConfig:
    """``[camera]``: which backend captures, and when.

    ``trigger``: ``continuous`` captures as fast as the pipeline allows but at most
    ``max_rate_hz`` (0 = no limit); ``interval`` captures every ``interval_s``;
    ``command`` captures only on the MQTT ``capture`` command (which also works in
    the other modes). A failed camera is reopened after ``reopen_backoff_s[0]``
    seconds, doubling up to ``reopen_backoff_s[1]``.
    """

    backend: str
    trigger: str = "continuous"
    max_rate_hz: float = 2.0
    interval_s: float = 60.0
    reopen_backoff_s: tuple[float, float] = (1.0, 60.0)
    picamera2: Picamera2Options = field(default_factory=Picamera2Options)
    opencv: OpenCVOptions = field(default_factory=OpenCVOptions)
    folder: FolderOptions = field(default_factory=FolderOptions)
    replay: ReplayOptions = field(default_factory=ReplayOptions)

    def problems(self) -> Problems:
        out: Problems = []
        out.extend(_one_of("backend", self.backend, CAMERA_BACKENDS))
        out.extend(_one_of("trigger", self.trigger, TRIGGERS))
        if not 0 <= self.max_rate_hz <= 1000:
            out.append(
                ("max_rate_hz", f"must be in [0, 1000] (0 = no limit), got {self.max_rate_hz}")
            )
        if not 0.01 <= self.interval_s <= 7 * 86400:
            out.append(("interval_s", f"must be in [0.01, 604800] seconds, got {self.interval_s}"))
        low, high = self.reopen_backoff_s
        if not 0 < low <= high <= 86400:
            out.append(
                (
                    "reopen_backoff_s",
                    f"must be [min, max] seconds with 0 < min <= max <= 86400, got [{low}, {high}]",
                )
            )
        for name in ("picamera2", "opencv", "folder", "replay"):
            options = getattr(self, name)
            out.extend((f"{name}.{key}", message) for key, message in options.problems())
        for name in ("folder", "replay"):
            if self.backend == name and getattr(self, name).path is None:
                out.append(
                    (f"{name}.path", f"required when camera.backend = {name!r} (the image folder)")
                )
        return out


@dataclass(frozen=True)
class PreprocessingOverrides:
    """``[preprocessing]``: deliberate departures from the bundle's recipe.

    The bundle's recipe is what the model was trained with, so the normal setting is
    no override at all. A station whose camera is noisier than the training images
    may need a stronger filter, though. The input ``size`` can never be overridden:
    it is fixed by the model's graph.
    """

    denoise: str | None = None
    denoise_params: Mapping[str, float | int] | None = None
    resize: str | None = None
    fill: str | tuple[int, int, int] | None = None

    @property
    def empty(self) -> bool:
        """True when the bundle's recipe is used unchanged."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def apply(self, recipe: PreprocessRecipe) -> PreprocessRecipe:
        """The bundle's ``recipe`` with these overrides; the size always stays.

        A new denoise method starts from its own default parameters (the bundle's
        parameters belong to the bundle's method); the same method keeps the
        bundle's parameters, updated by ``denoise_params``.

        Raises:
            RecipeError: the combination is invalid for this bundle.
        """
        if self.empty:
            return recipe
        method = self.denoise if self.denoise is not None else recipe.denoise
        params: dict[str, float | int] = (
            dict(recipe.denoise_params) if method == recipe.denoise else {}
        )
        params.update(self.denoise_params or {})
        return PreprocessRecipe(
            size=recipe.size,
            denoise=method,
            denoise_params=params,
            resize=self.resize if self.resize is not None else recipe.resize,
            fill=self.fill if self.fill is not None else recipe.fill,
            resample=recipe.resample,
        )

    def problems(self) -> Problems:
        out: Problems = []
        if self.denoise_params is not None and self.denoise is None:
            out.append(
                (
                    "denoise_params",
                    "needs preprocessing.denoise as well (parameters belong to one method)",
                )
            )
        if self.empty:
            return out
        try:
            PreprocessRecipe(
                denoise=self.denoise if self.denoise is not None else "none",
                denoise_params=(self.denoise_params or {}) if self.denoise is not None else {},
                resize=self.resize if self.resize is not None else "letterbox",
                fill=self.fill if self.fill is not None else "border",
            )
        except RecipeError as exc:
            text = str(exc).removeprefix("invalid preprocessing recipe: ")
            for part in text.split("; "):
                key, _, rest = part.partition(" ")
                known = key.split(".", 1)[0] in {"denoise", "denoise_params", "resize", "fill"}
                out.append((key, rest) if known else ("", part))
        return out


@dataclass(frozen=True)
class QualityConfig:
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
    min_sharpness: float = 0.5
    min_brightness: float = 0.02
    max_brightness: float = 0.98
    max_clipped: float = 0.75

    def problems(self) -> Problems:
        out: Problems = []
        if not self.min_sharpness >= 0:
            out.append(("min_sharpness", f"must be >= 0, got {self.min_sharpness}"))
        for key in ("min_brightness", "max_brightness", "max_clipped"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                out.append((key, f"must be a fraction in [0, 1], got {value}"))
        in_range = 0 <= self.min_brightness <= 1 and 0 <= self.max_brightness <= 1
        if in_range and self.min_brightness >= self.max_brightness:
            out.append(
                (
                    "max_brightness",
                    f"must be above min_brightness ({self.min_brightness}), "
                    f"got {self.max_brightness}",
                )
            )
        return out


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the bundle to serve.

    ``bundle`` is typically a ``current`` symlink that a deployment re-points, so the
    path is kept as written (never resolved through the link): the daemon notices
    when its target changes. With ``public_key`` set, only signed bundles load.
    ``threads`` unset lets the runtime choose; ``runtime`` forces one of
    ``fieldscope.edge.runtime.RUNTIMES`` by name.
    """

    bundle: Path
    public_key: Path | None = None
    threads: int | None = None
    runtime: str | None = None
    top_k: int = 3

    def problems(self) -> Problems:
        out: Problems = []
        if self.public_key is not None:
            problem = _public_key_problem(self.public_key)
            if problem is not None:
                out.append(("public_key", problem))
        if self.threads is not None and not 1 <= self.threads <= 64:
            out.append(("threads", f"must be in 1..64, got {self.threads}"))
        if self.runtime is not None:
            out.extend(_one_of("runtime", self.runtime, tuple(r.name for r in RUNTIMES)))
        if not 1 <= self.top_k <= 100:
            out.append(("top_k", f"must be in 1..100, got {self.top_k}"))
        return out


@dataclass(frozen=True)
class TlsConfig:
    """``[mqtt.tls]``: present means TLS is on. ``ca`` unset uses the system's CA
    store; ``cert`` and ``key`` (both or neither) authenticate the station by
    certificate. ``insecure = true`` skips the host name check: for tests only."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    def problems(self) -> Problems:
        out: Problems = []
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                out.append((name, f"no such file: {path}"))
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            out.append((given, f"needs {missing} as well (cert and key go together)"))
        return out


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]``: the broker. QoS is not here: it is fixed per topic kind by the topic
    scheme (``fieldscope.edge.topics.TOPIC_SPECS``). ``password`` holds the resolved
    secret and is left out of ``repr`` so it cannot end up in a log line.

    ``protocol`` is the MQTT version; with 5, the broker keeps the session (and
    commands sent meanwhile) for ``session_expiry_s`` after a disconnect. A lost
    connection is retried after ``reconnect_backoff_s[0]`` seconds, doubling up to
    ``reconnect_backoff_s[1]``. The client id is an MQTT topic-level-like name.
    """

    host: str
    client_id: str
    port: int = _MQTT_PORT
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None  # where the password came from, for the summary
    prefix: str = DEFAULT_PREFIX
    keepalive: int = 60
    protocol: str = "5"
    session_expiry_s: int = 3600
    reconnect_backoff_s: tuple[float, float] = (1.0, 60.0)

    def problems(self) -> Problems:
        out: Problems = []
        if not self.host or self.host != self.host.strip():
            out.append(("host", f"must be a host name or IP address, got {show(self.host)}"))
        elif "://" in self.host or "/" in self.host:
            out.append(
                ("host", f"give the host name only (no scheme or path), got {show(self.host)}")
            )
        if not 1 <= self.port <= 65535:
            out.append(("port", f"must be in 1..65535, got {self.port}"))
        if not 5 <= self.keepalive <= 65535:
            out.append(("keepalive", f"must be in 5..65535 seconds, got {self.keepalive}"))
        problem = segment_problem(self.client_id)
        if problem is not None:
            out.append(("client_id", f"{problem}, got {show(self.client_id)}"))
        out.extend(_one_of("protocol", self.protocol, MQTT_PROTOCOLS))
        if not 0 <= self.session_expiry_s <= 2**32 - 1:
            out.append(
                ("session_expiry_s", f"must be in 0..4294967295, got {self.session_expiry_s}")
            )
        low, high = self.reconnect_backoff_s
        if not (1 <= low <= high <= 3600 and low == int(low) and high == int(high)):
            out.append(
                (
                    "reconnect_backoff_s",
                    "must be [min, max] whole seconds with 1 <= min <= max <= 3600, "
                    f"got [{low:g}, {high:g}]",
                )
            )
        if self.password is not None and self.username is None:
            out.append(("password", "needs mqtt.username as well (MQTT sends no lone password)"))
        try:
            Topics(self.prefix, "station", "device")
        except TopicError as exc:
            out.append(("prefix", str(exc).removeprefix("prefix ")))
        if self.tls is not None:
            out.extend((f"tls.{key}", message) for key, message in self.tls.problems())
        return out


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: the durable queue between classification and the broker.

    When it holds ``max_messages`` unacknowledged messages (a long broker outage),
    ``when_full`` decides: ``drop-oldest`` (the default) deletes the oldest to make
    room, because a live station's newest observations are worth most and the gap
    in ``seq`` tells subscribers what was lost; ``reject-new`` keeps the backlog and
    drops each new identification instead. Either way the drop is counted and
    reported in health. ``max_bytes`` (unset: no cap) also caps the database file,
    for a small SD card. ``batch`` bounds how many messages are in flight at once.
    """

    path: Path
    max_messages: int = 100_000
    when_full: str = "drop-oldest"
    batch: int = 100
    max_bytes: int | None = None

    def problems(self) -> Problems:
        out: Problems = []
        if self.path.is_dir():
            out.append(("path", f"{self.path} is a directory; give the database file's path"))
        if not 1 <= self.max_messages <= 100_000_000:
            out.append(("max_messages", f"must be in 1..100000000, got {self.max_messages}"))
        out.extend(_one_of("when_full", self.when_full, OUTBOX_WHEN_FULL))
        if not 1 <= self.batch <= 10_000:
            out.append(("batch", f"must be in 1..10000, got {self.batch}"))
        if self.max_bytes is not None and self.max_bytes < 16_384:
            out.append(("max_bytes", f"must be at least 16 KiB, got {self.max_bytes} bytes"))
        return out


@dataclass(frozen=True)
class ArchiveConfig:
    """``[archive]``: images kept on the station's disk (``none``, ``all``, or only
    ``uncertain`` ones, the most useful for labelling), at most ``max_bytes`` in
    total (oldest deleted first). ``format`` applies to camera frames; files from a
    folder are kept byte for byte, so their hash matches the message's."""

    dir: Path
    mode: str = "none"
    max_bytes: int = 1 << 30
    format: str = "png"

    def problems(self) -> Problems:
        out: Problems = []
        out.extend(_one_of("mode", self.mode, ARCHIVE_MODES))
        out.extend(_one_of("format", self.format, ARCHIVE_FORMATS))
        if self.max_bytes < 1 << 20:
            out.append(("max_bytes", f"must be at least 1 MiB, got {self.max_bytes} bytes"))
        if self.dir.exists() and not self.dir.is_dir():
            out.append(("dir", f"{self.dir} exists and is not a directory"))
        return out


@dataclass(frozen=True)
class HeartbeatConfig:
    """``[heartbeat]``: how often health is published."""

    interval_s: float = 60.0

    def problems(self) -> Problems:
        if not 1 <= self.interval_s <= 86400:
            return [("interval_s", f"must be in [1, 86400] seconds, got {self.interval_s}")]
        return []


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: the level of the daemon's log lines on stderr (journald), and how often
    a running daemon logs a one-line summary (frames by outcome, outbox depth, link),
    so a healthy station is not silent; 0 turns the summary off."""

    level: str = "INFO"
    summary_interval_s: float = 60.0

    def problems(self) -> Problems:
        out = _one_of("level", self.level, LOG_LEVELS)
        if self.summary_interval_s != 0 and not 1 <= self.summary_interval_s <= 86400:
            out.append(
                (
                    "summary_interval_s",
                    f"must be 0 (off) or in [1, 86400] seconds, got {self.summary_interval_s}",
                )
            )
        return out


@dataclass(frozen=True)
class EdgeConfig:
    """The whole configuration of one station's daemon.

    ``source`` is the file it came from (None when built in code). ``validate()``
    lists every problem; :func:`load_config` never returns a config that has one.
    """

    device: DeviceConfig
    camera: CameraConfig
    model: ModelConfig
    mqtt: MqttConfig
    outbox: OutboxConfig
    archive: ArchiveConfig
    preprocessing: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)
    quality: QualityConfig = field(default_factory=QualityConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None

    @property
    def topics(self) -> Topics:
        """This station's topics (the one place they are built is ``topics.Topics``)."""
        return Topics(self.mqtt.prefix, self.device.station, self.device.id)

    def problems(self) -> Problems:
        """Every problem as (dotted key, message)."""
        out: Problems = []
        sections: tuple[tuple[str, Problems], ...] = (
            ("device", self.device.problems()),
            ("camera", self.camera.problems()),
            ("preprocessing", self.preprocessing.problems()),
            ("quality", self.quality.problems()),
            ("model", self.model.problems()),
            ("mqtt", self.mqtt.problems()),
            ("outbox", self.outbox.problems()),
            ("archive", self.archive.problems()),
            ("heartbeat", self.heartbeat.problems()),
            ("log", self.log.problems()),
        )
        derived = self.mqtt.client_id == default_client_id(self.device.station, self.device.id)
        for name, problems in sections:
            for key, message in problems:
                note = ""
                if name == "mqtt" and key == "client_id" and derived:
                    if sections[0][1]:
                        continue  # a bad station or device id, already reported there
                    note = " (derived from device.station and device.id; set it)"
                out.append((f"{name}.{key}" if key else name, message + note))
        watched = self.camera.folder.path if self.camera.backend == "folder" else None
        if watched is not None and watched in (self.device.data_dir, self.archive.dir):
            out.append(
                (
                    "camera.folder.path",
                    "must not be the daemon's data_dir or archive dir (its files would be "
                    "taken for new images)",
                )
            )
        return out

    def validate(self) -> list[str]:
        """Every problem as ``"dotted.key: message"``; empty when the config is valid."""
        return [f"{key}: {message}" for key, message in self.problems()]


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


def _one_of(key: str, value: str, choices: Sequence[str]) -> Problems:
    if value in choices:
        return []
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return [(key, f"must be one of {', '.join(choices)}, got {show(value)}{hint}")]


def _frame_size_problems(width: int | None, height: int | None) -> Problems:
    if (width is None) != (height is None):
        given, missing = ("width", "height") if height is None else ("height", "width")
        return [(given, f"needs {missing} as well (width and height go together)")]
    out: Problems = []
    for key, value in (("width", width), ("height", height)):
        if value is not None and not 16 <= value <= 16384:
            out.append((key, f"must be in 16..16384 pixels, got {value}"))
    return out


def default_client_id(station: str, device: str) -> str:
    """The MQTT client id when none is configured: stable across restarts, so the
    broker recognises the station, and unique per device within a deployment."""
    return f"fieldscope-{station}-{device}"


# ── problems with positions ───────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake: the dotted key ("" for the file as a whole), and where it is."""

    key: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigFileError(ConfigError):
    """A configuration with one or more problems; ``str()`` has one line per problem."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_ONE_KEY = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED_KEY = rf"{_ONE_KEY}(?:[ \t]*\.[ \t]*{_ONE_KEY})*"
_HEADER = re.compile(rf"^[ \t]*\[\[?[ \t]*({_DOTTED_KEY})[ \t]*\]\]?[ \t]*(?:#.*)?$")
_ASSIGNMENT = re.compile(rf"^[ \t]*({_DOTTED_KEY})[ \t]*=[ \t]*(.*)$")


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for raw in re.findall(_ONE_KEY, dotted):
        if raw.startswith('"'):
            try:
                parts.append(str(json.loads(raw)))
            except ValueError:
                parts.append(raw[1:-1])
        elif raw.startswith("'"):
            parts.append(raw[1:-1])
        else:
            parts.append(raw)
    return parts


def _key_lines(text: str) -> dict[str, int]:
    """Line numbers of table headers and keys, by dotted key (first occurrence).

    tomllib reports no positions for valid documents, so the raw text is scanned: a
    header sets the current table, an assignment names a key within it. Lines inside
    multi-line strings and arrays are skipped; keys of an inline table are not
    listed, and a lookup falls back to the enclosing key's line.
    """
    lines: dict[str, int] = {}
    table: list[str] = []
    skip_until: str | None = None
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if skip_until is not None:
            if skip_until in line:
                skip_until = None
            continue
        if depth > 0:
            depth += line.count("[") - line.count("]")
            continue
        header = _HEADER.match(line)
        if header:
            table = _key_parts(header.group(1))
            lines.setdefault(".".join(table), number)
            continue
        assignment = _ASSIGNMENT.match(line)
        if not assignment:
            continue
        lines.setdefault(".".join(table + _key_parts(assignment.group(1))), number)
        value = assignment.group(2)
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                skip_until = quote
        if value.startswith("["):
            depth = value.split("#", 1)[0].count("[") - value.split("#", 1)[0].count("]")
    return lines


def _line_of(key: str, lines: Mapping[str, int]) -> int | None:
    parts = key.split(".")
    while parts:
        found = lines.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return None


# ── reading a TOML document ───────────────────────────────────────────────────────────

_MISSING: Any = object()


_TOML_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int to Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _kind(value: object) -> str:
    """A value's TOML type in words, for "must be X, got Y" messages."""
    return next(
        (word for cls, word in _TOML_KINDS if isinstance(value, cls)),
        f"a {type(value).__name__}",
    )


class _Context:
    """What all tables of one document share: problems, base folder, environment."""

    def __init__(self, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.problems: Problems = []
        self.tables: list[_Table] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append((key, message))

    @property
    def reported(self) -> set[str]:
        return {key for key, _ in self.problems}


class _Table:
    """One TOML table read key by key; a bad value is recorded and replaced by its
    default, so that reading goes on and every problem is reported at once."""

    def __init__(self, ctx: _Context, data: Mapping[str, Any], dotted: str, present: bool) -> None:
        self.ctx = ctx
        self.data = data
        self.dotted = dotted
        self.present = present
        self.known: list[str] = []
        ctx.tables.append(self)

    def key(self, name: str) -> str:
        return f"{self.dotted}.{name}" if self.dotted else name

    def _get(self, name: str) -> Any:
        self.known.append(name)
        return self.data.get(name, _MISSING)

    def _bad(self, name: str, expected: str, value: object) -> None:
        shown = str(value).lower() if isinstance(value, bool) else show(value)
        self.ctx.problem(self.key(name), f"must be {expected}, got {_kind(value)} {shown}")

    def _required(self, name: str, what: str) -> None:
        if self.present:  # a missing section is reported once, not once per key
            self.ctx.problem(self.key(name), f"required ({what})")

    def table(self, name: str, *, required: str | None = None) -> _Table:
        """The sub-table ``name``; an absent one reads as empty (all defaults)."""
        value = self._get(name)
        dotted = self.key(name)
        if value is _MISSING:
            if required is not None and self.present:
                self.ctx.problem(dotted, f"section [{dotted}] is missing ({required})")
            return _Table(self.ctx, {}, dotted, present=False)
        if not isinstance(value, dict):
            self._bad(name, f"a table ([{dotted}])", value)
            return _Table(self.ctx, {}, dotted, present=False)
        return _Table(self.ctx, value, dotted, present=True)

    def has(self, name: str) -> bool:
        return name in self.data

    def forbid(self, name: str, message: str) -> None:
        """A key people may expect here but which cannot be set: explain why."""
        if self._get(name) is not _MISSING:
            self.ctx.problem(self.key(name), message)

    def text(self, name: str, default: str) -> str:
        value = self._get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._bad(name, "a string", value)
            return default
        return value

    def required_text(self, name: str, what: str) -> str:
        value = self._get(name)
        if value is _MISSING:
            self._required(name, what)
            return ""
        if not isinstance(value, str):
            self._bad(name, "a string", value)
            return ""
        return value

    def optional_text(self, name: str) -> str | None:
        value = self._get(name)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            self._bad(name, "a string", value)
            return None
        return value

    def integer(self, name: str, default: int) -> int:
        value = self.optional_integer(name)
        return default if value is None else value

    def optional_integer(self, name: str) -> int | None:
        value = self._get(name)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self._bad(name, "an integer", value)
            return None
        return value

    def number(self, name: str, default: float) -> float:
        value = self.optional_number(name)
        return default if value is None else value

    def optional_number(self, name: str) -> float | None:
        value = self._get(name)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._bad(name, "a number", value)
            return None
        try:  # the shared bounded reader: a 400-digit integer is a problem, not OverflowError
            return read_number(value)
        except RejectedValueError:
            self._bad(name, "a finite number", value)
            return None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._bad(name, "true or false", value)
            return default
        return value

    def path(self, name: str, default: Path) -> Path:
        found = self.optional_path(name)
        return default if found is None else found

    def optional_path(self, name: str) -> Path | None:
        value = self._get(name)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not value:
            self._bad(name, "a non-empty path string", value)
            return None
        return self.resolve(value)

    def required_path(self, name: str, what: str) -> Path:
        if name not in self.data:
            self._get(name)
            self._required(name, what)
            return self.ctx.base_dir
        return self.path(name, self.ctx.base_dir)

    def resolve(self, value: str) -> Path:
        """``~`` expanded; a relative path is taken from the config file's folder.

        Never resolved through symlinks: ``model.bundle`` is usually a ``current``
        link that a deployment re-points, and the daemon must keep following it.
        """
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.ctx.base_dir / path

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._bad(name, "an array of strings", value)
            return default
        return tuple(value)

    def numbers_pair(self, name: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self._get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, list) or len(value) != 2 or not all(_finite(v) for v in value):
            self._bad(name, "an array of two numbers [min, max]", value)
            return default
        return read_number(value[0]), read_number(value[1])

    def raw(self, name: str) -> Any:
        """The value as TOML gave it (``_MISSING`` when absent), for special types."""
        return self._get(name)

    def secret(self, name: str) -> tuple[str | None, str | None]:
        """A string that may be ``"${VAR}"``: (value, the variable's name or None)."""
        value = self.optional_text(name)
        if value is None:
            return None, None
        match = _ENV_REFERENCE.match(value)
        if match is None:
            return value, None
        return self.env(name, match.group(1)), match.group(1)

    def env(self, name: str, variable: str) -> str | None:
        found = self.ctx.environ.get(variable)
        if found is None:
            self.ctx.problem(
                self.key(name),
                f"environment variable {variable} is not set "
                "(set it in the service's EnvironmentFile=, or export it)",
            )
            return None
        if not found:
            self.ctx.problem(self.key(name), f"environment variable {variable} is empty")
            return None
        return found


def _read_log(t: _Table) -> LogConfig:
    return LogConfig(
        level=t.text("level", LogConfig.level).upper(),
        summary_interval_s=t.number("summary_interval_s", LogConfig.summary_interval_s),
    )


def _unknown_key_problems(ctx: _Context) -> Problems:
    """Keys no reader asked for, each with a suggestion where one is likely."""
    elsewhere: dict[str, list[str]] = {}
    for table in ctx.tables:
        for name in table.known:
            elsewhere.setdefault(name, []).append(table.key(name))
    out: Problems = []
    for table in ctx.tables:
        for name, value in table.data.items():
            if name in table.known:
                continue
            what = "unknown section" if isinstance(value, dict) else "unknown key"
            close = difflib.get_close_matches(name, table.known, n=1, cutoff=0.6)
            # Where else the name is a key: anywhere for a top-level stray, else
            # within the same section (a key put one table too high or too low).
            section = table.dotted.split(".", 1)[0]
            near = [
                k
                for k in elsewhere.get(name, [])
                if not table.dotted or k.split(".", 1)[0] == section
            ]
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            elif near:
                hint = f" (did you mean {' or '.join(near[:3])}?)"
            elif table.known:
                hint = f" (known here: {', '.join(sorted(set(table.known)))})"
            else:
                hint = ""
            out.append((table.key(name), what + hint))
    return out


def _read_device(root: _Table) -> DeviceConfig:
    t = root.table("device", required="station and id are needed")
    return DeviceConfig(
        station=t.required_text("station", "the station's name, an MQTT topic level"),
        id=t.required_text("id", "this device's name within the station, an MQTT topic level"),
        data_dir=t.path("data_dir", t.resolve(_DEFAULT_DATA_DIR)),
    )


def _read_source(t: _Table) -> int | str:
    value = t.raw("source")
    if value is _MISSING:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        if "://" in value or value.startswith("/dev/"):
            return value
        return str(t.resolve(value))
    t.ctx.problem(
        t.key("source"),
        f"must be a device index (0, 1, ...) or a device path, file or URL string, "
        f"got {_kind(value)} {show(value)}",
    )
    return 0


def _finite(value: object) -> bool:
    """Whether ``value`` is a number a float can hold (not a 400-digit integer, not nan)."""
    try:
        read_number(value)
    except RejectedValueError:
        return False
    return True


def _read_controls(t: _Table) -> Mapping[str, float | int | bool | tuple[float, ...]]:
    value = t.raw("controls")
    if value is _MISSING:
        return MappingProxyType({})
    if not isinstance(value, dict):
        t.ctx.problem(t.key("controls"), f"must be a table, got {_kind(value)} {show(value)}")
        return MappingProxyType({})
    out: dict[str, float | int | bool | tuple[float, ...]] = {}
    for name, item in value.items():
        if isinstance(item, bool) or (isinstance(item, int | float) and _finite(item)):
            out[name] = item
        elif isinstance(item, list) and all(_finite(v) for v in item):
            out[name] = tuple(read_number(v) for v in item)
        else:
            t.ctx.problem(
                f"{t.key('controls')}.{name}",
                f"must be a number, a boolean or an array of numbers, got {show(item)}",
            )
    return MappingProxyType(out)


def _read_camera(root: _Table) -> CameraConfig:
    t = root.table("camera", required="backend is needed")
    backend = t.required_text("backend", f"one of {', '.join(CAMERA_BACKENDS)}")
    pc = t.table("picamera2")
    picamera2 = Picamera2Options(
        camera_num=pc.integer("camera_num", 0),
        width=pc.optional_integer("width"),
        height=pc.optional_integer("height"),
        controls=_read_controls(pc),
    )
    cv = t.table("opencv")
    opencv = OpenCVOptions(
        source=_read_source(cv),
        width=cv.optional_integer("width"),
        height=cv.optional_integer("height"),
        fps=cv.optional_number("fps"),
    )
    fo = t.table("folder")
    folder = FolderOptions(
        path=fo.optional_path("path"),
        patterns=fo.strings("patterns", DEFAULT_IMAGE_PATTERNS),
        settle_s=fo.number("settle_s", FolderOptions.settle_s),
        scan_interval_s=fo.number("scan_interval_s", FolderOptions.scan_interval_s),
        handled=fo.text("handled", FolderOptions.handled),
        recursive=fo.boolean("recursive", FolderOptions.recursive),
    )
    rp = t.table("replay")
    replay = ReplayOptions(
        path=rp.optional_path("path"),
        patterns=rp.strings("patterns", DEFAULT_IMAGE_PATTERNS),
        rate_hz=rp.number("rate_hz", ReplayOptions.rate_hz),
        loop=rp.boolean("loop", ReplayOptions.loop),
        limit=rp.integer("limit", ReplayOptions.limit),
        recursive=rp.boolean("recursive", ReplayOptions.recursive),
    )
    return CameraConfig(
        backend=backend,
        trigger=t.text("trigger", CameraConfig.trigger),
        max_rate_hz=t.number("max_rate_hz", CameraConfig.max_rate_hz),
        interval_s=t.number("interval_s", CameraConfig.interval_s),
        reopen_backoff_s=t.numbers_pair("reopen_backoff_s", CameraConfig.reopen_backoff_s),
        picamera2=picamera2,
        opencv=opencv,
        folder=folder,
        replay=replay,
    )


def _read_preprocessing(root: _Table) -> PreprocessingOverrides:
    t = root.table("preprocessing")
    t.forbid(
        "size",
        "cannot be overridden: the input size is fixed by the model in the bundle",
    )
    params_raw = t.raw("denoise_params")
    params: dict[str, float | int] | None = None
    if params_raw is not _MISSING:
        if isinstance(params_raw, dict):
            params = {}
            for name, value in params_raw.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    t.ctx.problem(
                        f"{t.key('denoise_params')}.{name}",
                        f"must be a number, got {_kind(value)} {show(value)}",
                    )
                else:
                    params[name] = value
        else:
            t.ctx.problem(
                t.key("denoise_params"),
                f"must be a table, got {_kind(params_raw)} {show(params_raw)}",
            )
    fill_raw = t.raw("fill")
    fill: str | tuple[int, int, int] | None = None
    if isinstance(fill_raw, str):
        fill = fill_raw
    elif isinstance(fill_raw, list) and len(fill_raw) == 3:
        fill = (fill_raw[0], fill_raw[1], fill_raw[2])
    elif fill_raw is not _MISSING:
        t.ctx.problem(
            t.key("fill"),
            f'must be "border" or [R, G, B], got {_kind(fill_raw)} {show(fill_raw)}',
        )
    return PreprocessingOverrides(
        denoise=t.optional_text("denoise"),
        denoise_params=params,
        resize=t.optional_text("resize"),
        fill=fill,
    )


def _read_quality(root: _Table) -> QualityConfig:
    t = root.table("quality")
    d = QualityConfig()
    return QualityConfig(
        enabled=t.boolean("enabled", d.enabled),
        min_sharpness=t.number("min_sharpness", d.min_sharpness),
        min_brightness=t.number("min_brightness", d.min_brightness),
        max_brightness=t.number("max_brightness", d.max_brightness),
        max_clipped=t.number("max_clipped", d.max_clipped),
    )


def _read_model(root: _Table) -> ModelConfig:
    t = root.table("model", required="bundle is needed")
    return ModelConfig(
        bundle=t.required_path("bundle", "the bundle directory, typically a 'current' symlink"),
        public_key=t.optional_path("public_key"),
        threads=t.optional_integer("threads"),
        runtime=t.optional_text("runtime"),
        top_k=t.integer("top_k", ModelConfig.top_k),
    )


def _read_mqtt(root: _Table, device: DeviceConfig) -> MqttConfig:
    t = root.table("mqtt", required="host is needed")
    t.forbid(
        "qos",
        "cannot be set: QoS is fixed per topic by the topic scheme ("
        + ", ".join(f"{kind.value} {spec.qos}" for kind, spec in TOPIC_SPECS.items())
        + ")",
    )
    tls: TlsConfig | None = None
    if t.has("tls"):
        tt = t.table("tls")
        if tt.present:
            tls = TlsConfig(
                ca=tt.optional_path("ca"),
                cert=tt.optional_path("cert"),
                key=tt.optional_path("key"),
                insecure=tt.boolean("insecure", False),
            )
    else:
        t.known.append("tls")
    username, _ = t.secret("username")
    password, password_var = t.secret("password")
    env_name = t.optional_text("password_env")
    if env_name is not None:
        if t.has("password"):
            t.ctx.problem(t.key("password_env"), "give either password or password_env, not both")
        elif not _ENV_NAME.match(env_name):
            t.ctx.problem(
                t.key("password_env"),
                f"must name an environment variable (letters, digits, _), got {show(env_name)}",
            )
        else:
            password, password_var = t.env("password_env", env_name), env_name
    port = t.optional_integer("port")
    client_id = t.optional_text("client_id")
    return MqttConfig(
        host=t.required_text("host", "the broker's host name or IP address"),
        port=port if port is not None else (_MQTTS_PORT if tls is not None else _MQTT_PORT),
        tls=tls,
        username=username,
        password=password,
        password_env=password_var,
        prefix=t.text("prefix", DEFAULT_PREFIX),
        keepalive=t.integer("keepalive", MqttConfig.keepalive),
        protocol=t.text("protocol", MqttConfig.protocol),
        session_expiry_s=t.integer("session_expiry_s", MqttConfig.session_expiry_s),
        reconnect_backoff_s=t.numbers_pair("reconnect_backoff_s", MqttConfig.reconnect_backoff_s),
        client_id=client_id
        if client_id is not None
        else default_client_id(device.station, device.id),
    )


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


def _read_size(t: _Table, name: str) -> int | None:
    raw = t.raw(name)
    if raw is _MISSING:
        return None
    try:
        return parse_size(raw)
    except ValueError as exc:
        t.ctx.problem(t.key(name), str(exc))
        return None


def _read_outbox(root: _Table, data_dir: Path) -> OutboxConfig:
    t = root.table("outbox")
    return OutboxConfig(
        path=t.path("path", data_dir / "outbox.sqlite"),
        max_messages=t.integer("max_messages", OutboxConfig.max_messages),
        when_full=t.text("when_full", OutboxConfig.when_full),
        batch=t.integer("batch", OutboxConfig.batch),
        max_bytes=_read_size(t, "max_bytes"),
    )


def _read_archive(root: _Table, data_dir: Path) -> ArchiveConfig:
    t = root.table("archive")
    max_bytes = _read_size(t, "max_bytes")
    return ArchiveConfig(
        dir=t.path("dir", data_dir / "archive"),
        mode=t.text("mode", ArchiveConfig.mode),
        max_bytes=ArchiveConfig.max_bytes if max_bytes is None else max_bytes,
        format=t.text("format", ArchiveConfig.format).lower(),
    )


def config_from_dict(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    source: str | None = None,
    text: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> EdgeConfig:
    """Build and validate a config from parsed TOML (what :func:`load_config` does
    after reading the file). ``base_dir`` anchors relative paths; ``text`` (the raw
    document) lets problems name their line; ``environ`` defaults to ``os.environ``.

    Raises:
        ConfigFileError: every problem, one per line.
    """
    ctx = _Context(Path(base_dir).absolute(), os.environ if environ is None else environ)
    root = _Table(ctx, data, "", present=True)
    device = _read_device(root)
    config = EdgeConfig(
        device=device,
        camera=_read_camera(root),
        preprocessing=_read_preprocessing(root),
        quality=_read_quality(root),
        model=_read_model(root),
        mqtt=_read_mqtt(root, device),
        outbox=_read_outbox(root, device.data_dir),
        archive=_read_archive(root, device.data_dir),
        heartbeat=HeartbeatConfig(
            interval_s=root.table("heartbeat").number("interval_s", HeartbeatConfig.interval_s)
        ),
        log=_read_log(root.table("log")),
        source=None if source is None else Path(source),
    )
    problems = ctx.problems + _unknown_key_problems(ctx)
    reported = ctx.reported
    # A value that failed its type check was replaced by its default; a key already
    # reported (or one below it) is not reported again by the value checks.
    problems += [
        (key, message)
        for key, message in config.problems()
        if not any(key == r or key.startswith(r + ".") for r in reported)
    ]
    if problems:
        lines = _key_lines(text) if text is not None else {}
        found = [
            ConfigProblem(key, message, source, _line_of(key, lines)) for key, message in problems
        ]
        found.sort(key=lambda p: math.inf if p.line is None else p.line)
        raise ConfigFileError(found)
    return config


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> EdgeConfig:
    """Read, type-check and validate the daemon's TOML configuration, once.

    Relative paths in the file are taken from the file's folder. ``environ``
    (default ``os.environ``) supplies ``password_env`` and ``"${VAR}"`` secrets.

    Raises:
        ConfigFileError: the file is missing, unreadable, not TOML, or has problems;
            the message has one line per problem: file, line, dotted key, what to do.
    """
    file = Path(path)
    name = str(path)
    try:
        text = read_regular_file(file, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigFileError([ConfigProblem("", "no such file", name)]) from None
    except RejectedValueError as exc:  # a directory, FIFO or device, or far too big for a config
        why = "is a directory, not a file" if file.is_dir() else str(exc)
        raise ConfigFileError([ConfigProblem("", why, name)]) from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            [ConfigProblem("", f"is not UTF-8 text ({exc.reason})", name)]
        ) from None
    except OSError as exc:
        raise ConfigFileError(
            [ConfigProblem("", f"cannot read it: {exc.strerror or exc}", name)]
        ) from None
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ConfigFileError(
            [ConfigProblem("", "not valid TOML: arrays or tables nested too deeply", name)]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column \d+\)$", message)
        line = int(found.group(1)) if found else None
        reason = message[: found.start()].strip() if found else message
        raise ConfigFileError(
            [ConfigProblem("", f"not valid TOML: {reason}", name, line)]
        ) from None
    except ValueError:  # an integer of more than 4300 digits, refused by int() itself
        raise ConfigFileError(
            [
                ConfigProblem(
                    "", "not valid TOML for a config: a number with thousands of digits", name
                )
            ]
        ) from None
    return config_from_dict(data, base_dir=file.parent, source=name, text=text, environ=environ)


# ── a readable summary for check-config ───────────────────────────────────────────────


def mask_url(value: str) -> str:
    """An URL with any password replaced by ``***`` (RTSP cameras often embed one)."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _format(value: object) -> str:
    """A value as TOML would write it (``(not set)`` for None), URLs masked."""
    if isinstance(value, str | Path):
        text = mask_url(str(value)).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_format(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "(not set)" if value is None else repr(value)


# What an unset optional key means, where "(not set)" would not say it.
_UNSET_MEANING: Mapping[str, str] = MappingProxyType(
    {
        "preprocessing": "(the bundle's)",
        "mqtt.tls": "(off)",
        "model.threads": "(runtime default)",
        "outbox.max_bytes": "(no cap)",
    }
)


def _section_lines(name: str, section: object) -> Iterator[str]:
    assert is_dataclass(section)
    yield f"[{name}]"
    nested: list[tuple[str, object]] = []
    for f in fields(section):
        value = getattr(section, f.name)
        unset = _UNSET_MEANING.get(f"{name}.{f.name}", _UNSET_MEANING.get(name))
        if value is None and unset is not None:
            yield f"{f.name} = {unset}"
        elif is_dataclass(value):
            nested.append((f"{name}.{f.name}", value))
        elif f.name == "password":
            origin = "" if value is None else "***"
            source = section.password_env if isinstance(section, MqttConfig) else None
            if value is not None and source:
                origin += f" (from ${source})"
            yield f"password = {origin or '(not set)'}"
        elif f.name != "password_env":
            yield f"{f.name} = {_format(value)}"
    for sub_name, sub in nested:
        yield ""
        yield from _section_lines(sub_name, sub)


def config_summary(cfg: EdgeConfig) -> str:
    """The effective configuration, defaults filled in and secrets masked, for
    ``fieldscope edge check-config``: what the daemon will really do."""
    lines = [f"# {cfg.source}" if cfg.source else "# (built in code)"]
    lines.append(f"# topics: {cfg.topics.base}/...")
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if not is_dataclass(section):
            continue
        lines.append("")
        if f.name == "camera":
            assert isinstance(section, CameraConfig)
            lines.append("[camera]")
            for g in fields(section):
                if g.name not in ("picamera2", "opencv", "folder", "replay"):
                    lines.append(f"{g.name} = {_format(getattr(section, g.name))}")
            lines.append("")
            lines.extend(
                _section_lines(f"camera.{section.backend}", getattr(section, section.backend))
            )
        else:
            lines.extend(_section_lines(f.name, section))
    return "\n".join(lines) + "\n"


def config_warnings(cfg: EdgeConfig) -> list[str]:
    """Things that are valid but probably not ready yet on this machine: a bundle or
    image folder not deployed, a data directory the daemon cannot create or write, a
    password kept in plain text in the file."""
    out: list[str] = []
    if not cfg.model.bundle.exists():
        out.append(f"model.bundle: {cfg.model.bundle} does not exist (yet)")
    backend = cfg.camera.backend
    if backend in ("folder", "replay"):
        folder = getattr(cfg.camera, backend).path
        if folder is not None and not folder.is_dir():
            out.append(f"camera.{backend}.path: {folder} is not a directory (yet)")
    existing = cfg.device.data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        out.append(f"device.data_dir: {existing} is not writable by this user")
    if cfg.mqtt.password is not None and cfg.mqtt.password_env is None:
        out.append(
            "mqtt.password: the password is written in the config file in plain text; "
            'use password_env = "FIELDSCOPE_MQTT_PASSWORD" (or password = '
            '"${FIELDSCOPE_MQTT_PASSWORD}") with the variable in the service\'s '
            "EnvironmentFile=, readable by the service only"
        )
    return out


def check_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> str:
    """What ``fieldscope edge check-config`` prints: the effective configuration with
    secrets masked, then any warnings as comments.

    Raises:
        ConfigFileError: as :func:`load_config`.
    """
    cfg = load_config(path, environ)
    text = config_summary(cfg)
    warnings = config_warnings(cfg)
    if warnings:
        text += "\n" + "".join(f"# warning: {w}\n" for w in warnings)
    return text
