"""The broker connection shared by the edge link and the collector.

:class:`BrokerSettings` says how to reach the broker (address, identity, TLS,
password, MQTT version, session); :func:`make_client` is the one place a paho client
is made from it, so the station and the collector speak to the broker the same way
and a TLS or session fix lands in both at once.

Decisions:

* **MQTT 5 by default**, ``protocol = "3.1.1"`` for brokers without it. With 5 the
  broker keeps the session for ``session_expiry_s`` after a disconnect; 3.1.1 has no
  expiry, so there the session is simply persistent (``clean_session=False``).
* **TLS is on when ``tls`` is present.** ``tls.ca`` unset trusts the system's CAs;
  ``tls.cert`` + ``tls.key`` authenticate this client by certificate;
  ``tls.insecure`` skips the host-name check only (the chain is still verified).
* **The password never appears in ``repr``** (nor so in logs). It is given resolved
  (``password``) or read when the client is made: from the environment variable
  ``password_env`` or from ``password_file`` (first line, trailing newline stripped),
  so it needs to be neither in a config file nor on a command line.
* **Constraints are declarative** (``msgspec.Meta`` on the fields, checked by
  ``msgspec.convert`` or the station's config loader when a table is decoded, and by
  :meth:`BrokerSettings.all_problems` for settings built in code); cross-field rules are
  in ``problems()``, the protocol of ``fieldscope.edge.config``'s sections, whose loader
  checks the fields and the nested ``tls`` section itself. ``all_problems()`` is all of
  it at once, as ``(key, message)`` pairs, for the collector and :func:`make_client`.
* **This is the station's ``[mqtt]`` section** (``EdgeConfig.mqtt``): the ``Meta.extra``
  keys (``env``, ``unit``, ``expected``) are words for that loader
  (:mod:`fieldscope.edge.typed`); msgspec ignores them.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import msgspec

from fieldscope.edge.errors import ConfigError
from fieldscope.edge.topics import DEFAULT_PREFIX, TopicError, Topics, segment_problem, show

if TYPE_CHECKING:  # paho is imported where a client is made: the config loads without it
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "PAHO_MAX_INFLIGHT",
    "BrokerSettings",
    "MqttProtocol",
    "PahoLog",
    "Problems",
    "TlsSettings",
    "describe",
    "make_client",
    "read_password",
    "route_connection",
]

logger = logging.getLogger(__name__)

# What paho puts on the wire at once; mosquitto's default receive maximum (paho does
# not honour a smaller one announced by an MQTT 5 broker).
PAHO_MAX_INFLIGHT = 20
MQTT_PORT = 1883

Problems = list[tuple[str, str]]

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BACKOFF = {"expected": "an array of two numbers [min, max]"}
# A secret that may be written "${VAR}" in a config file (read from the environment).
_Secret = Annotated[str, msgspec.Meta(extra={"env": True})]


class MqttProtocol(StrEnum):
    """The MQTT protocol version spoken to the broker."""

    V5 = "5"
    V311 = "3.1.1"


def _paths(kind: type, value: Any) -> Any:
    """msgspec ``dec_hook``: ``Path`` fields from TOML/JSON strings (or Paths in code)."""
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    raise NotImplementedError(f"{kind} is not supported")


def field_problems(settings: msgspec.Struct) -> Problems:
    """The ``msgspec.Meta`` constraint and type violations of a Struct built in code
    (``__init__`` does not check them, ``msgspec.convert`` does), one per field."""
    out: Problems = []
    for info in msgspec.structs.fields(settings):
        value = getattr(settings, info.name)
        if isinstance(value, msgspec.Struct):
            continue  # a nested section reports through its own problems()
        try:
            msgspec.convert(value, info.type, strict=False, dec_hook=_paths)
        except msgspec.ValidationError as exc:
            out.append((info.name, f"{_expected(info.type, exc)}, got {show(value)}"))
    return out


def _expected(kind: Any, exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int` >= 1" as "must be an integer >= 1"."""
    args = getattr(kind, "__args__", (kind,))
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, StrEnum):
            return "must be one of " + ", ".join(f'"{m.value}"' for m in arg)
    text = str(exc).removeprefix("Expected ").replace("`", "").split(", got ")[0]
    for name, words in (("int", "an integer"), ("str", "a string"), ("bool", "true or false")):
        text = re.sub(rf"^{name}\b", words, text)
    return f"must be {text}"


def _prefix_problems(prefix: str) -> Problems:
    try:
        Topics(prefix, "station", "device")
    except TopicError as exc:
        return [("prefix", str(exc).removeprefix("prefix "))]
    return []


class TlsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[mqtt.tls]``: present means TLS is on. ``ca`` unset uses the system's CA
    store; ``cert`` and ``key`` (both or neither) authenticate this client by
    certificate. ``insecure = true`` skips the host-name check: for a broker reached
    by IP address or for tests, never to silence a wrong certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    def problems(self) -> Problems:
        """Missing files and a certificate without its key (or the reverse)."""
        out: Problems = []
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if isinstance(path, Path) and not path.is_file():
                out.append((name, f"no such file: {path}"))
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            out.append((given, f"needs {missing} as well (cert and key go together)"))
        return out

    def all_problems(self) -> Problems:
        """The fields' types and constraints, then :meth:`problems`."""
        return field_problems(self) + self.problems()

    def context(self, where: str = "mqtt") -> ssl.SSLContext:
        """The client's TLS context: the CA to trust, and the client certificate.

        Raises:
            ConfigError: a file is not a usable CA, certificate or key; names it.
        """
        try:
            context = ssl.create_default_context(cafile=None if self.ca is None else str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}.tls.ca: {self.ca} is not a usable CA file ({exc})") from exc
        if self.cert is not None and self.key is not None:
            try:
                context.load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"{where}.tls.cert {self.cert} / {where}.tls.key {self.key}: not a usable "
                    f"certificate and matching private key in PEM ({exc})"
                ) from exc
        return context


class BrokerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach the broker: the ``[mqtt]`` section of the station, the collector's
    broker options (``fieldscope/edge/examples/edge.toml`` documents every key).

    ``password`` holds the resolved secret (left out of ``repr``); when it is unset it
    is read by :func:`make_client` from ``password_env`` or ``password_file``.
    ``reconnect_backoff_s`` is ``[first, longest]`` whole seconds between reconnect
    attempts (doubling). ``max_in_flight`` bounds the messages published and not yet
    acknowledged (the station's outbox window; paho itself sends at most
    :data:`PAHO_MAX_INFLIGHT` at once). ``prefix`` is the first topic level.
    """

    host: Annotated[str, msgspec.Meta(description="the broker's host name or IP address")]
    client_id: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = MQTT_PORT
    tls: TlsSettings | None = None
    username: Annotated[str, msgspec.Meta(min_length=1, extra={"env": True})] | None = None
    password: _Secret | None = None
    password_env: str | None = None
    password_file: Path | None = None
    prefix: str = DEFAULT_PREFIX
    keepalive: Annotated[int, msgspec.Meta(ge=5, le=65535, extra={"unit": "seconds"})] = 60
    protocol: MqttProtocol = MqttProtocol.V5
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 3600
    reconnect_backoff_s: Annotated[tuple[float, float], msgspec.Meta(extra=_BACKOFF)] = (1.0, 60.0)
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100

    def __repr__(self) -> str:
        shown = (
            f"{name}={value!r}"
            for name in self.__struct_fields__
            if name != "password" and (value := getattr(self, name)) is not None
        )
        hidden = ", password=<hidden>" if self.password is not None else ""
        return f"BrokerSettings({', '.join(shown)}{hidden})"

    __str__ = __repr__

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        """For ``rich``: the fields without the password."""
        return [(n, getattr(self, n)) for n in self.__struct_fields__ if n != "password"]

    @property
    def tls_enabled(self) -> bool:
        """True when the connection uses TLS (a ``tls`` section is present)."""
        return self.tls is not None

    @property
    def mqtt_protocol(self) -> MqttProtocol:
        """``protocol`` as the enum, also when it was given as ``"3.1.1"`` in code."""
        return MqttProtocol(self.protocol)

    def problems(self) -> Problems:
        """The rules across fields and the values no type says (host, client id, prefix,
        backoff, password sources), as ``(key, message)`` with the key relative to the
        section. Not the fields' types and bounds nor ``tls``: see :meth:`all_problems`."""
        out: Problems = []
        if not self.host or self.host != self.host.strip():
            out.append(("host", f"must be a host name or IP address, got {show(self.host)}"))
        elif "://" in self.host or "/" in self.host:
            out.append(("host", f"give the host name or IP address only, got {show(self.host)}"))
        problem = segment_problem(self.client_id)
        if problem is not None:
            out.append(("client_id", f"{problem}, got {show(self.client_id)}"))
        out.extend(self._backoff_problems())
        out.extend(self._password_problems())
        out.extend(_prefix_problems(self.prefix))
        return out

    def all_problems(self) -> Problems:
        """Every problem at once, fields' types and bounds included, ``tls.*`` keys for
        the TLS section's (for ``file:line: mqtt.port: message`` or ``broker.port``)."""
        tls = [] if self.tls is None else self.tls.all_problems()
        out = field_problems(self) + self.problems()
        return out + [(f"tls.{key}", message) for key, message in tls]

    def _backoff_problems(self) -> Problems:
        first, longest = self.reconnect_backoff_s
        whole = first == int(first) and longest == int(longest)
        if whole and 1 <= first <= longest <= 3600:
            return []
        got = f"[{first:g}, {longest:g}]"
        rule = "whole seconds with 1 <= min <= max <= 3600"
        return [("reconnect_backoff_s", f"must be [min, max] {rule}, got {got}")]

    def _password_problems(self) -> Problems:
        out: Problems = []
        given = [n for n in ("password", "password_env", "password_file") if getattr(self, n)]
        if given and self.username is None:
            out.append((given[0], "needs username as well (MQTT sends no lone password)"))
        if self.password_env is not None and not ENV_NAME.fullmatch(self.password_env):
            out.append(
                (
                    "password_env",
                    "must name an environment variable (letters, digits, _), "
                    f"got {show(self.password_env)}",
                )
            )
        if self.password_file is not None:
            if self.password_env is not None or self.password is not None:
                out.append(("password_file", "give one of password, password_env, password_file"))
            if not Path(self.password_file).is_file():
                out.append(("password_file", f"no such file: {self.password_file}"))
        return out

    def check(self, where: str = "mqtt") -> None:
        """Raise one :class:`ConfigError` listing every problem, keys prefixed ``where.``."""
        problems = self.all_problems()
        if problems:
            raise ConfigError("; ".join(f"{where}.{key}: {message}" for key, message in problems))


def read_password(settings: BrokerSettings, where: str = "mqtt") -> str | None:
    """The broker password: ``password`` itself, else the environment variable
    ``password_env``, else the first line of ``password_file``; None without one.

    Raises:
        ConfigError: the variable is unset, or the file is unreadable or empty; the
            message names the variable or the file and what to do.
    """
    if settings.password is not None:
        return settings.password
    if settings.password_env is not None:
        value = os.environ.get(settings.password_env)
        if not value:
            raise ConfigError(
                f"{where}.password_env: the environment variable {settings.password_env} is "
                "not set or empty; export the broker password in it"
            )
        return value
    if settings.password_file is None:
        return None
    path = Path(settings.password_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"{where}.password_file: cannot read {path} ({reason}); it must be a UTF-8 text "
            "file readable by this user, holding the broker password"
        ) from exc
    password = text.splitlines()[0] if text.strip("\r\n") else ""
    if not password:
        raise ConfigError(
            f"{where}.password_file: {path} is empty; put the broker password on its first line"
        )
    return password


def describe(settings: BrokerSettings) -> str:
    """``mqtts://host:port as client-id (MQTT 5)``, for log lines."""
    s = settings
    scheme = "mqtts" if s.tls_enabled else "mqtt"
    return f"{scheme}://{s.host}:{s.port} as {s.client_id} (MQTT {s.mqtt_protocol.value})"


class PahoLog(logging.LoggerAdapter[logging.Logger]):
    """paho's log on the logger ``name``, minus the ERROR paho 2.2 writes after every
    deliberate disconnect ("Client is not connected"), which would otherwise end each
    clean shutdown in journald with a false alarm; ``closing()`` says it was ours."""

    def __init__(self, name: str, closing: Callable[[], bool]) -> None:
        super().__init__(logging.getLogger(name), {})
        self._closing = closing

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self._closing() and str(msg).startswith("Client is not connected"):
            return
        super().log(level, msg, *args, **kwargs)


def make_client(
    settings: BrokerSettings,
    *,
    fresh_session: bool = False,
    receive_maximum: int | None = None,
    manual_ack: bool = False,
    paho_logger: PahoLog | None = None,
    where: str = "mqtt",
) -> mqtt.Client:
    """A paho client set up from ``settings`` and addressed (``connect_async``): set
    the callbacks (and a will), then ``loop_start()`` connects, retrying with backoff.

    ``fresh_session``: MQTT 5 only; the first connection of this process starts a
    clean session (what was queued for a previous run is stale, e.g. commands), and
    reconnects resume it. Without it every connection resumes the session, so nothing
    published while this client was away is lost (the collector). 3.1.1 always resumes.
    ``receive_maximum`` (MQTT 5) is how many unacknowledged messages the broker may
    send at once; ``manual_ack`` defers PUBACKs to ``client.ack()``.

    Raises:
        ConfigError: a setting is invalid, or a TLS or password file is unusable;
            the message names the key (``where.key``) and the file.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    settings.check(where)
    s = settings
    v5 = s.mqtt_protocol is MqttProtocol.V5
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=s.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=manual_ack,
    )
    if paho_logger is not None:
        client.enable_logger(cast(logging.Logger, paho_logger))
    client.suppress_exceptions = True  # a bug in a callback must not kill the network
    client.reconnect_delay_set(int(s.reconnect_backoff_s[0]), int(s.reconnect_backoff_s[1]))
    client.max_inflight_messages_set(min(s.max_in_flight, PAHO_MAX_INFLIGHT))
    client.max_queued_messages_set(0)
    _authenticate(client, s, where)
    _address(client, s, fresh_session=fresh_session, receive_maximum=receive_maximum)
    return client


def _address(
    client: mqtt.Client, s: BrokerSettings, *, fresh_session: bool, receive_maximum: int | None
) -> None:
    """``connect_async``: where to, and the session (MQTT 5 properties, or persistent)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if s.mqtt_protocol is not MqttProtocol.V5:
        client.connect_async(s.host, s.port, s.keepalive)
        return
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = s.session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    clean_start = mqtt.MQTT_CLEAN_START_FIRST_ONLY if fresh_session else False
    client.connect_async(
        s.host, s.port, s.keepalive, clean_start=clean_start, properties=properties
    )


def _authenticate(client: mqtt.Client, s: BrokerSettings, where: str) -> None:
    """User name and password, TLS with the client certificate."""
    if s.username is not None:
        client.username_pw_set(s.username, read_password(s, where))
    if s.tls is not None:
        client.tls_set_context(s.tls.context(where))
        if s.tls.insecure:
            logger.warning("%s.tls.insecure: the broker's host name is not verified", where)
            client.tls_insecure_set(True)


def route_connection(
    client: mqtt.Client,
    settings: BrokerSettings,
    *,
    connected: Callable[[], None],
    failed: Callable[[str, bool], None],
    disconnected: Callable[[ReasonCode], None],
) -> None:
    """Route paho's connection callbacks to what the link and the collector act on:
    ``connected()``; ``failed(text, refused)`` (refused by the broker, or unreachable);
    ``disconnected(reason)``. A successful connect is logged here, for both.
    All run on paho's network thread: record and hand over, never block."""
    where = f"{settings.host}:{settings.port}"

    def on_connect(
        _client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            failed(f"the broker refused the connection: {reason}", True)
            return
        connected()
        logger.info("connected to %s (session present: %s)", where, flags.session_present)

    client.on_connect = on_connect
    client.on_connect_fail = lambda _client, _userdata: failed(
        f"cannot reach the broker at {where}", False
    )
    client.on_disconnect = lambda _client, _userdata, _flags, reason, _props: disconnected(reason)
