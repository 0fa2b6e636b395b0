"""BrokerSettings: every problem named at once, the password kept out of sight and read
from the environment or a file; the station's ``[mqtt]`` section is a BrokerSettings."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from fieldscope.edge.broker import (
    BrokerSettings,
    MqttProtocol,
    TlsSettings,
    make_client,
    read_password,
)
from fieldscope.edge.config import config_summary, load_config
from fieldscope.edge.errors import ConfigError


def test_problems_lists_every_problem_with_its_key(tmp_path: Path) -> None:
    settings = BrokerSettings(
        host="mqtt://broker",
        client_id="a/b",
        port=70000,
        keepalive=2,
        protocol="4",  # type: ignore[arg-type]
        session_expiry_s=-1,
        reconnect_backoff_s=(10.0, 5.0),
        password_env="NOT A NAME",
        password_file=tmp_path / "missing",
        prefix="a+b",
        tls=TlsSettings(ca=tmp_path / "ca.pem", key=tmp_path / "k.pem"),
    )
    found = settings.all_problems()
    problems = dict(found)
    assert sorted(problems) == [
        "client_id",
        "host",
        "keepalive",
        "password_env",
        "password_file",
        "port",
        "prefix",
        "protocol",
        "reconnect_backoff_s",
        "session_expiry_s",
        "tls.ca",
        "tls.key",
    ]
    assert problems["port"] == "must be an integer <= 65535, got 70000"
    assert problems["protocol"] == 'must be one of "5", "3.1.1", got \'4\''
    assert ("password_env", "needs username as well (MQTT sends no lone password)") in found
    assert ("password_file", f"no such file: {tmp_path / 'missing'}") in found
    assert problems["tls.key"] == "needs cert as well (cert and key go together)"
    with pytest.raises(ConfigError, match=r"broker\.port: .*; broker\.keepalive: "):
        settings.check("broker")
    assert BrokerSettings(host="localhost", client_id="scope-a").all_problems() == []
    # problems() is the config loader's protocol: only what no field declaration says
    # (the loader checks types, bounds and the nested tls section itself, once).
    own = dict(settings.problems())
    assert not {"port", "protocol", "tls.key"} & set(own)
    assert own["host"] == "give the host name or IP address only, got 'mqtt://broker'"


def test_the_password_is_never_in_repr() -> None:
    settings = BrokerSettings(host="h", client_id="c", username="u", password="s3cret")
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)
    assert "password=<hidden>" in repr(settings)
    assert "s3cret" not in repr(settings.__rich_repr__())


def test_the_password_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    from_file = BrokerSettings(host="h", client_id="c", username="u", password_file=secret)
    assert from_file.problems() == []
    assert read_password(from_file) == "s3cret"
    monkeypatch.setenv("BROKER_PW", "from-env")
    from_env = BrokerSettings(host="h", client_id="c", username="u", password_env="BROKER_PW")
    assert read_password(from_env) == "from-env"
    monkeypatch.delenv("BROKER_PW")
    with pytest.raises(ConfigError, match=r"mqtt\.password_env: .*BROKER_PW is not set"):
        read_password(from_env)


def test_an_empty_or_unreadable_password_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    settings = BrokerSettings(host="h", client_id="c", username="u", password_file=empty)
    with pytest.raises(ConfigError, match=rf"broker\.password_file: {empty} is empty"):
        make_client(settings, where="broker")
    folder = BrokerSettings(host="h", client_id="c", username="u", password_file=tmp_path)
    with pytest.raises(ConfigError, match=rf"password_file: cannot read {tmp_path} \("):
        read_password(folder)


def test_a_table_decodes_with_the_field_names_of_the_mqtt_section(tmp_path: Path) -> None:
    table = {
        "host": "broker.lan",
        "client_id": "scope-a",
        "port": 8883,
        "protocol": "3.1.1",
        "reconnect_backoff_s": [2, 30],
        "tls": {"ca": str(tmp_path / "ca.pem"), "insecure": True},
    }
    settings = msgspec.convert(table, BrokerSettings, dec_hook=lambda kind, value: kind(value))
    assert settings.mqtt_protocol is MqttProtocol.V311
    assert settings.tls == TlsSettings(ca=tmp_path / "ca.pem", insecure=True)
    assert settings.reconnect_backoff_s == (2.0, 30.0)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.port"):
        msgspec.convert({**table, "port": 0}, BrokerSettings, dec_hook=lambda k, v: k(v))
    with pytest.raises(msgspec.ValidationError, match="unknown field `qos`"):
        msgspec.convert({**table, "qos": 1}, BrokerSettings, dec_hook=lambda k, v: k(v))


def test_the_station_mqtt_section_is_a_broker_settings(tmp_path: Path) -> None:
    """edge.toml's [mqtt] loads as the BrokerSettings the link gets as it is: the same
    keys, password_file from the file's folder, the in-flight window from outbox.batch."""
    (tmp_path / "ca.pem").write_text("not read at load time")
    (tmp_path / "broker.pw").write_text("s3cret\n")
    path = tmp_path / "edge.toml"
    path.write_text(
        '[device]\nstation = "pond"\nid = "scope-a"\n[camera]\nbackend = "picamera2"\n'
        '[model]\nbundle = "b"\n[outbox]\nbatch = 7\n'
        '[mqtt]\nhost = "broker.lan"\nusername = "scope"\npassword_file = "broker.pw"\n'
        'protocol = "3.1.1"\nreconnect_backoff_s = [2, 20]\n'
        '[mqtt.tls]\nca = "ca.pem"\ninsecure = true\n',
        encoding="utf-8",
    )
    cfg = load_config(path, environ={})
    assert cfg.mqtt == BrokerSettings(
        host="broker.lan",
        client_id="fieldscope-pond-scope-a",
        port=8883,
        tls=TlsSettings(ca=tmp_path / "ca.pem", insecure=True),
        username="scope",
        password_file=tmp_path / "broker.pw",
        protocol=MqttProtocol.V311,
        reconnect_backoff_s=(2.0, 20.0),
        max_in_flight=7,
    )
    assert cfg.mqtt.mqtt_protocol is MqttProtocol.V311
    assert read_password(cfg.mqtt) == "s3cret"
    summary = config_summary(cfg)
    assert "password = (read from password_file)" in summary
    assert "max_in_flight" not in summary  # it is outbox.batch
    path.write_text(path.read_text().replace("[mqtt]\n", "[mqtt]\nmax_in_flight = 3\n"))
    with pytest.raises(ConfigError, match=r"mqtt\.max_in_flight: cannot be set here: .*batch"):
        load_config(path, environ={})
