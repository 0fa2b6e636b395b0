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
  ``password_file`` names a file read when the daemon connects;
* the result holds no runtime state: the daemon builds its parts from it.

Each section is a frozen ``msgspec.Struct`` declared once: names, types, defaults and
constraints (``Annotated[..., Meta(...)]``) in one place, read by the generic loader
in :mod:`fieldscope.edge.typed` (msgspec keeps the Raspberry Pi install small; see
issue 17 for the measurements). ``[mqtt]`` is the broker connection's own model
(:class:`fieldscope.edge.broker.BrokerSettings`, handed to the link as it is) and each
``[camera.<backend>]`` the options model of that backend in :mod:`fieldscope.edge.capture`.
The Structs can be built directly (tests do); ``validate()`` checks them with the same
declarations the loader uses, while :func:`load_config` and :func:`config_from_dict`
add what only a file has: types, unknown keys, defaults derived from other keys,
relative paths, environment variables.
``fieldscope/edge/examples/edge.toml`` shows every key with its default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from fieldscope.edge.broker import ENV_NAME, BrokerSettings
from fieldscope.edge.capture import (
    CAMERA_BACKENDS,
    DEFAULT_IMAGE_PATTERNS,
    FOLDER_HANDLING,
    FolderOptions,
    OpenCVOptions,
    Picamera2Options,
    ReplayOptions,
)
from fieldscope.edge.config_sections import (
    _MQTT_PORT,
    _MQTTS_PORT,
    ARCHIVE_FORMATS,
    ARCHIVE_MODES,
    LOG_LEVELS,
    MAX_CONFIG_BYTES,
    MQTT_PROTOCOLS,
    OUTBOX_WHEN_FULL,
    TRIGGERS,
    UPLOAD_QUEUE_FILE,
    ArchiveConfig,
    CameraConfig,
    DeviceConfig,
    HeartbeatConfig,
    LogConfig,
    ModelConfig,
    MqttConfig,
    OutboxConfig,
    PreprocessingOverrides,
    QualityConfig,
    TlsConfig,
    UploadConfig,
    _required,
    default_client_id,
    parse_size,
)
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.objects import ObjectsSettings
from fieldscope.edge.site import SampleConfig, SiteConfig
from fieldscope.edge.topics import TOPIC_SPECS, Topics
from fieldscope.edge.typed import (
    ConfigFileError,
    ConfigProblem,
    Problems,
    Reader,
    problems_of,
    read_toml,
)

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
    "ConfigError",
    "ConfigFileError",
    "ConfigProblem",
    "DeviceConfig",
    "EdgeConfig",
    "FolderOptions",
    "HeartbeatConfig",
    "LogConfig",
    "ModelConfig",
    "MqttConfig",
    "ObjectsSettings",
    "OpenCVOptions",
    "OutboxConfig",
    "Picamera2Options",
    "PreprocessingOverrides",
    "QualityConfig",
    "ReplayOptions",
    "SampleConfig",
    "SiteConfig",
    "TlsConfig",
    "UploadConfig",
    "check_config",
    "config_from_dict",
    "config_summary",
    "config_warnings",
    "default_client_id",
    "load_config",
    "mask_url",
    "parse_size",
]


class EdgeConfig(msgspec.Struct, frozen=True):
    """The whole configuration of one station's daemon.

    ``source`` is the file it came from (None when built in code). ``validate()``
    lists every problem; :func:`load_config` never returns a config that has one.
    """

    device: Annotated[DeviceConfig, _required("station and id are needed")]
    camera: Annotated[CameraConfig, _required("backend is needed")]
    model: Annotated[ModelConfig, _required("bundle is needed")]
    mqtt: Annotated[BrokerSettings, _required("host is needed")]
    outbox: OutboxConfig
    archive: ArchiveConfig
    upload: UploadConfig = msgspec.field(default_factory=UploadConfig)
    preprocessing: PreprocessingOverrides = msgspec.field(default_factory=PreprocessingOverrides)
    quality: QualityConfig = msgspec.field(default_factory=QualityConfig)
    objects: ObjectsSettings = msgspec.field(default_factory=ObjectsSettings)
    heartbeat: HeartbeatConfig = msgspec.field(default_factory=HeartbeatConfig)
    site: SiteConfig = msgspec.field(default_factory=SiteConfig)
    sample: SampleConfig = msgspec.field(default_factory=SampleConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    source: Annotated[Path | None, Meta(extra={"internal": True})] = None

    @property
    def topics(self) -> Topics:
        """This station's topics (the one place they are built is ``topics.Topics``)."""
        return Topics(self.mqtt.prefix, self.device.station, self.device.id)

    def problems(self) -> Problems:
        """The checks across sections (each section checks its own keys)."""
        out: Problems = []
        watched = self.camera.folder.path if self.camera.backend == "folder" else None
        if watched is not None and watched in (self.device.data_dir, self.archive.dir):
            message = (
                "must not be the daemon's data_dir or archive dir (its files would be "
                "taken for new images)"
            )
            out.append(("camera.folder.path", message))
        queue = self.upload.queue or self.device.data_dir / UPLOAD_QUEUE_FILE
        if queue == self.outbox.path:
            message = f"must not be the outbox ({queue}): images wait in their own queue"
            out.append(("upload.queue" if self.upload.queue else "outbox.path", message))
        if self.mqtt.max_in_flight != self.outbox.batch:
            message = f"must be outbox.batch ({self.outbox.batch}), the link's in-flight window"
            out.append(("mqtt.max_in_flight", f"{message}, got {self.mqtt.max_in_flight}"))
        return out

    def validate(self) -> list[str]:
        """Every problem as ``"dotted.key: message"``; empty when the config is valid."""
        return [f"{key}: {message}" for key, message in _edge_problems(self)]


def _edge_problems(cfg: EdgeConfig) -> Problems:
    """Every problem of the tree; a client id derived from bad device names is left to
    those names, and a derived one that is bad by itself says what to set."""
    found = problems_of(cfg)
    derived = cfg.mqtt.client_id == default_client_id(cfg.device.station, cfg.device.id)
    device_bad = any(key.startswith("device.") for key, _ in found)
    out: Problems = []
    note = " (derived from device.station and device.id; set it)"
    for key, message in found:
        if key == "mqtt.client_id" and derived:
            if not device_bad:
                out.append((key, message + note))
        else:
            out.append((key, message))
    return out


# ── reading a file ────────────────────────────────────────────────────────────────────

# Defaults that depend on other keys, computed after the keys they depend on.
_DERIVED: Mapping[str, Any] = MappingProxyType(
    {
        "device.data_dir": lambda r: r.resolve("data"),
        "mqtt.client_id": lambda r: default_client_id(
            r.values["device.station"], r.values["device.id"]
        ),
        "mqtt.port": lambda r: _MQTTS_PORT if r.values["mqtt.tls"] is not None else _MQTT_PORT,
        "outbox.path": lambda r: r.values["device.data_dir"] / "outbox.sqlite",
        "archive.dir": lambda r: r.values["device.data_dir"] / "archive",
    }
)
# Keys people may expect but cannot set, with why.
_FORBIDDEN: Mapping[str, str] = MappingProxyType(
    {
        "mqtt.qos": "cannot be set: QoS is fixed per topic by the topic scheme ("
        + ", ".join(f"{kind.value} {spec.qos}" for kind, spec in TOPIC_SPECS.items())
        + ")",
        "mqtt.max_in_flight": "cannot be set here: it is outbox.batch (how many outbox "
        "messages are published and not yet acknowledged at once)",
        "preprocessing.size": "cannot be overridden: the input size is fixed by the model "
        "in the bundle",
        "preprocessing.resample": "cannot be overridden: it is how the bundle's model saw "
        "its training images shrunk",
    }
)


def _loaded_mqtt(
    reader: Reader, data: Mapping[str, Any], mqtt: BrokerSettings, batch: int
) -> BrokerSettings:
    """``[mqtt]`` with what the file states elsewhere: the in-flight window is
    ``outbox.batch``, and ``password_env = "VAR"`` is read from the environment now, so
    that a missing variable is found at load time. Either way ``password_env`` ends up
    naming the variable the password came from (or None); a name that is not one is
    left to :meth:`BrokerSettings.problems`."""
    mqtt = msgspec.structs.replace(mqtt, max_in_flight=batch)
    raw = data.get("mqtt")
    name = mqtt.password_env
    if name is None or not isinstance(raw, dict):
        return msgspec.structs.replace(mqtt, password_env=reader.env_names.get("mqtt.password"))
    if "password" in raw:
        reader.problem("mqtt.password_env", "give either password or password_env, not both")
    elif ENV_NAME.fullmatch(name):
        return msgspec.structs.replace(mqtt, password=reader.env("mqtt.password_env", name))
    return mqtt


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
    reader = Reader(
        Path(base_dir).absolute(),
        os.environ if environ is None else environ,
        derived=_DERIVED,
        forbidden=_FORBIDDEN,
    )
    config: EdgeConfig = reader.read(EdgeConfig, data)
    config = msgspec.structs.replace(
        config,
        mqtt=_loaded_mqtt(reader, data, config.mqtt, config.outbox.batch),
        source=None if source is None else Path(source),
    )
    problems = reader.located(config, text, source, _edge_problems)
    if problems:
        raise ConfigFileError(problems)
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
    data, text = read_toml(file, MAX_CONFIG_BYTES)
    return config_from_dict(
        data, base_dir=file.parent, source=str(path), text=text, environ=environ
    )


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


# What an unset optional key means, where "(not set)" would not say it ("section.*":
# any key of the section).
_UNSET_MEANING: Mapping[str, str] = MappingProxyType(
    {
        "preprocessing.*": "(the bundle's)",
        "mqtt.tls": "(off)",
        "mqtt.tls.ca": "(the system's CA store)",
        "model.threads": "(runtime default)",
        "outbox.max_bytes": "(no cap)",
        "objects.blank": "(none)",
        "objects.max_area_um2": "(no limit)",
    }
)


def _section_lines(name: str, section: msgspec.Struct) -> Iterator[str]:
    yield f"[{name}]"
    nested: list[tuple[str, msgspec.Struct]] = []
    for key in section.__struct_fields__:
        value = getattr(section, key)
        unset = _UNSET_MEANING.get(f"{name}.{key}", _UNSET_MEANING.get(f"{name}.*"))
        if f"{name}.{key}" in _FORBIDDEN or key == "password_env":
            continue
        if value is None and unset is not None:
            yield f"{key} = {unset}"
        elif isinstance(value, msgspec.Struct):
            nested.append((f"{name}.{key}", value))
        elif key == "password" and isinstance(section, BrokerSettings):
            yield f"password = {_password_text(section)}"
        else:
            yield f"{key} = {_format(value)}"
    for sub_name, sub in nested:
        yield ""
        yield from _section_lines(sub_name, sub)


def _password_text(mqtt: BrokerSettings) -> str:
    if mqtt.password is None:
        return "(read from password_file)" if mqtt.password_file else "(not set)"
    return f"*** (from ${mqtt.password_env})" if mqtt.password_env else "***"


def config_summary(cfg: EdgeConfig) -> str:
    """The effective configuration, defaults filled in and secrets masked, for
    ``fieldscope edge check-config``: what the daemon will really do."""
    lines = [f"# {cfg.source}" if cfg.source else "# (built in code)"]
    lines.append(f"# topics: {cfg.topics.base}/...")
    for name in cfg.__struct_fields__:
        section = getattr(cfg, name)
        if not isinstance(section, msgspec.Struct):
            continue
        lines.append("")
        if isinstance(section, CameraConfig):  # only the chosen backend's options
            lines.append("[camera]")
            for key in section.__struct_fields__:
                if key not in CAMERA_BACKENDS:
                    lines.append(f"{key} = {_format(getattr(section, key))}")
            lines.append("")
            lines.extend(
                _section_lines(f"camera.{section.backend}", getattr(section, section.backend))
            )
        else:
            lines.extend(_section_lines(name, section))
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
