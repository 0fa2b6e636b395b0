"""BrokerSettings: every problem named at once, the password kept out of sight and read
from the environment or a file, the station's ``[mqtt]`` section carried over as is."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from fieldscope.edge.broker import (
    BrokerSettings,
    MqttProtocol,
    TlsSettings,
    broker_settings,
    make_client,
    read_password,
)
from fieldscope.edge.config import MqttConfig, TlsConfig
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
    found = settings.problems()
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
    assert BrokerSettings(host="localhost", client_id="scope-a").problems() == []


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


def test_the_station_config_carries_over(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    config = MqttConfig(
        host="broker.lan",
        client_id="scope-a",
        port=8883,
        tls=TlsConfig(ca=ca, insecure=True),
        username="scope",
        password="s3cret",
        password_env="SCOPE_PW",
        prefix="lab",
        keepalive=30,
        protocol="3.1.1",
        session_expiry_s=600,
        reconnect_backoff_s=(2.0, 20.0),
    )
    settings = broker_settings(config, max_in_flight=7)
    assert settings == BrokerSettings(
        host="broker.lan",
        client_id="scope-a",
        port=8883,
        tls=TlsSettings(ca=ca, insecure=True),
        username="scope",
        password="s3cret",
        password_env="SCOPE_PW",
        prefix="lab",
        keepalive=30,
        protocol=MqttProtocol.V311,
        session_expiry_s=600,
        reconnect_backoff_s=(2.0, 20.0),
        max_in_flight=7,
    )
    assert read_password(settings) == "s3cret"
