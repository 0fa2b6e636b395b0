"""The collector against a real Mosquitto broker: once, never lost, load shared.

Payloads are real ``Identification`` messages (the edge's dataclasses), published
with QoS 1 by a paho client the way a station's link publishes them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, stop_mosquitto
from helpers import mqtt_client, running_collector, wait_for
from mqtt_security import make_certificates, mosquitto_dir, password_lines, start_configured

from fieldscope.cli.main import main
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import open_store
from fieldscope.collect.subscriber import Collector, CollectorSettings
from fieldscope.edge.broker import BrokerSettings, MqttProtocol, TlsSettings
from fieldscope.edge.link import MqttLink
from fieldscope.edge.message import Identification
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.topics import Topics

pytestmark = pytest.mark.mqtt


@pytest.fixture
def publisher(mosquitto: Broker) -> Iterator[mqtt.Client]:
    with mqtt_client(mosquitto.host, mosquitto.port, "station") as client:
        yield client


def publish(client: mqtt.Client, messages: Sequence[Identification | tuple[str, bytes]]) -> None:
    """Publish with QoS 1 and wait for every PUBACK, as a station's link does."""
    infos = []
    for m in messages:
        if isinstance(m, Identification):
            topic, payload = Topics("fieldscope", m.station, m.device).identification, m.to_json()
        else:
            topic, payload = m
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(20)
        assert info.is_published()


def stored_count(db: Path) -> int:
    if not db.exists():
        return 0
    with open_store(str(db), create=False) as store:
        return store.count()


def test_duplicates_are_stored_once_and_invalid_payloads_kept_apart(
    mosquitto: Broker, publisher: mqtt.Client, tmp_path: Path
) -> None:
    db = tmp_path / "collect.sqlite"
    settings = CollectorSettings(
        broker=BrokerSettings(host=mosquitto.host, port=mosquitto.port, client_id="collector-1")
    )
    with running_collector(db, settings) as collector:
        messages = [sample_identification(seq) for seq in range(50)]
        t = Topics("fieldscope", "pond-3", "scope-a")
        bad = [
            (t.identification, b'{"version": 1, "device": "scope-a"}'),
            (t.identification, b"\xff\xfe not utf-8"),
            (Topics("fieldscope", "pond-3", "scope-b").identification, messages[0].to_json()),
        ]
        # Every message twice (a QoS-1 redelivery, an outbox replay after a restart).
        publish(publisher, [*messages, *bad, *messages[:25], *messages[25:]])
        wait_for(lambda: collector.stats.received >= 103, what="all messages received")
        wait_for(lambda: collector.stats.stored + collector.stats.duplicates == 100, what="stored")
    assert collector.stats.stored == 50
    assert collector.stats.duplicates == 50
    assert collector.stats.invalid == 3
    with open_store(str(db), create=False) as reader:
        assert reader.count() == 50
        assert sorted(r.seq for r in reader.iter_identifications()) == list(range(50))
        invalid = reader.invalid_messages()
        reasons = " | ".join(r.reason for r in invalid)
        assert "seq is required" in reasons or "is required" in reasons
        assert "not UTF-8" in reasons
        assert "does not match the topic's device" in reasons
        assert {r.payload for r in invalid} >= {b"\xff\xfe not utf-8"}


def _start_cli_collector(
    broker: Broker, db: Path, log: Path, client_id: str, *options: str
) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "fieldscope.cli", "-v", "collect", "run",
             "--broker", f"{broker.host}:{broker.port}", "--db", str(db),
             "--client-id", client_id, *options],
            stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Whatever a failed test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return "connected to" in log.read_text()

    wait_for(ready, 30, "the collector to connect")
    time.sleep(0.3)  # the SUBSCRIBE follows the CONNACK


@pytest.mark.slow
def test_a_killed_collector_misses_nothing_published_meanwhile(
    mosquitto: Broker, publisher: mqtt.Client, tmp_path: Path
) -> None:
    db = tmp_path / "collect.sqlite"
    log = tmp_path / "collector.log"
    proc = _start_cli_collector(mosquitto, db, log, "collector-kill")
    try:
        _wait_ready(proc, log)
        first = [sample_identification(seq) for seq in range(3000)]
        publish(publisher, first)
        # Kill -9 while it is still storing the burst: whatever it had not committed, it
        # had not acknowledged either, and the broker keeps it for the session.
        wait_for(lambda: stored_count(db) > 0, what="the first rows")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = stored_count(db)
        # Published while no collector runs.
        second = [sample_identification(seq) for seq in range(3000, 3500)]
        publish(publisher, second)
        proc = _start_cli_collector(mosquitto, db, log, "collector-kill")
        wait_for(lambda: stored_count(db) == 3500, 60, "every message after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        _kill(proc)
    text = log.read_text()
    assert "session present: True" in text
    assert "stopped:" in text  # the summary of a clean SIGTERM shutdown
    with open_store(str(db), create=False) as reader:
        seqs = sorted(r.seq for r in reader.iter_identifications())
    assert seqs == list(range(3500))
    assert 0 < killed_at < 3000, f"the kill should land mid-burst, {killed_at} rows were stored"


def test_two_collectors_on_a_shared_subscription_store_each_message_once(
    mosquitto: Broker, publisher: mqtt.Client, tmp_path: Path
) -> None:
    db = tmp_path / "shared.sqlite"
    with contextlib.ExitStack() as running:
        collectors = [
            running.enter_context(
                running_collector(
                    db,
                    CollectorSettings(
                        broker=BrokerSettings(
                            host=mosquitto.host, port=mosquitto.port, client_id=name
                        ),
                        share_group="fleet",
                    ),
                )
            )
            for name in ("collector-a", "collector-b")
        ]
        messages = [sample_identification(seq, device=f"scope-{seq % 4}") for seq in range(1000)]
        publish(publisher, messages)
        publisher.publish(Topics("fieldscope", "pond-3", "scope-0").status, b"online", 1, True)
        wait_for(
            lambda: sum(c.stats.stored + c.stats.duplicates for c in collectors) >= 1000,
            what="both collectors to store",
        )
        wait_for(lambda: all(c.stats.device_updates >= 1 for c in collectors), what="status")
    a, b = (c.stats for c in collectors)
    # The broker split the identifications: each went to one collector only.
    assert a.stored > 0
    assert b.stored > 0
    assert a.stored + b.stored == 1000
    assert a.duplicates + b.duplicates == 0
    with open_store(str(db), create=False) as reader:
        assert reader.count() == 1000
        (device,) = reader.devices()
        # Status is not shared: every collector hears it (retained, idempotent).
        assert device.status == "online"


# --- secured brokers: client certificates, passwords from files, MQTT 3.1.1 -------------


@pytest.fixture
def secure_dir() -> Iterator[Path]:
    with mosquitto_dir() as path:
        yield path


@contextlib.contextmanager
def station_link(settings: BrokerSettings, db: Path) -> Iterator[Outbox]:
    """A station's link publishing its outbox with ``settings``; yields the outbox."""
    outbox = Outbox(db)
    stop = threading.Event()
    link = MqttLink(
        settings,
        Topics("fieldscope", "pond-3", "scope-a"),
        outbox,
        on_command=lambda name, payload: None,
        retained_model=lambda: None,
        stop=stop,
    )
    link.start()
    try:
        assert link.wait_online(10), link.health().last_error
        yield outbox
    finally:
        stop.set()
        link.stop_clean(2.0)
        outbox.close()


def add_identifications(outbox: Outbox, n: int) -> None:
    topic = Topics("fieldscope", "pond-3", "scope-a").identification
    for _ in range(n):
        outbox.add(topic, lambda seq: sample_identification(seq).to_json())


def test_the_collector_connects_with_a_client_certificate_and_is_refused_without(
    secure_dir: Path, tmp_path: Path
) -> None:
    certs = make_certificates(secure_dir)
    lines = [*certs.broker_lines(require_certificate=True), "allow_anonymous true"]
    broker = start_configured(secure_dir, lines)
    with_cert = TlsSettings(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    store = open_store(str(tmp_path / "collect.sqlite"))
    try:
        collector = Collector(
            CollectorSettings(
                broker=BrokerSettings(
                    host=broker.host, port=broker.port, client_id="c-cert", tls=with_cert
                )
            ),
            store,
        )
        collector.start()
        try:
            assert collector.wait_subscribed(10)
            station = BrokerSettings(
                host=broker.host, port=broker.port, client_id="scope-a", tls=with_cert
            )
            with station_link(station, tmp_path / "outbox.db") as outbox:
                add_identifications(outbox, 5)
                wait_for(lambda: collector.stats.stored == 5, what="five stored")
        finally:
            collector.stop()
        without = Collector(
            CollectorSettings(
                broker=BrokerSettings(
                    host=broker.host,
                    port=broker.port,
                    client_id="c-none",
                    tls=TlsSettings(ca=certs.ca),
                )
            ),
            store,
        )
        without.start()
        try:
            assert not without.wait_subscribed(3)
            assert not without.connected
        finally:
            without.stop(timeout=1)
    finally:
        store.close()
        stop_mosquitto(broker)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_collect_run_with_client_certificate_password_file_and_mqtt_3_1_1(
    secure_dir: Path, tmp_path: Path
) -> None:
    """Both sides speak 3.1.1 and authenticate with a client certificate and a
    password read from a file (trailing newline and all)."""
    certs = make_certificates(secure_dir)
    lines = certs.broker_lines(require_certificate=True)
    broker = start_configured(secure_dir, lines + password_lines(secure_dir, "fleet", "s3cret"))
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    db, log = tmp_path / "collect.sqlite", tmp_path / "collector.log"
    tls = ["--ca-file", str(certs.ca), "--tls-cert", str(certs.client_cert)]
    tls += ["--tls-key", str(certs.client_key)]
    login = ["--username", "fleet", "--password-file", str(password)]
    proc = _start_cli_collector(broker, db, log, "cli-secure", "--protocol", "3.1.1", *tls, *login)
    try:
        _wait_ready(proc, log)
        station = BrokerSettings(
            host=broker.host,
            port=broker.port,
            client_id="scope-a",
            tls=TlsSettings(ca=certs.ca, cert=certs.client_cert, key=certs.client_key),
            username="fleet",
            password_file=password,
            protocol=MqttProtocol.V311,
        )
        with station_link(station, tmp_path / "outbox.db") as outbox:
            add_identifications(outbox, 5)
            wait_for(lambda: stored_count(db) == 5, what="five stored")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        _kill(proc)
        stop_mosquitto(broker)
    assert "mqtts://127.0.0.1" in log.read_text()
    assert "(MQTT 3.1.1)" in log.read_text()
    assert "s3cret" not in log.read_text()


def test_collect_run_names_an_empty_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "password"
    empty.write_text("")
    db = tmp_path / "collect.sqlite"
    argv = ["collect", "run", "--broker", "127.0.0.1:1", "--db", str(db)]
    assert main([*argv, "--username", "u", "--password-file", str(empty)]) == 2
    assert f"broker.password_file: {empty} is empty" in capsys.readouterr().err
    assert main([*argv, "--tls-key", str(empty)]) == 2
    assert "broker.tls.key: needs cert as well" in capsys.readouterr().err
    assert not db.exists()
