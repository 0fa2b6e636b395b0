"""The collector speaks MQTT 3.1.1 too (``--protocol 3.1.1``), for brokers without MQTT 5
such as the demo's embedded amqtt: its session must persist across a restart there as
well, or what a station publishes while the collector is down would be lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import start_mosquitto, stop_mosquitto
from helpers import mqtt_client, running_collector, wait_for

from fieldscope.cli.broker import DEMO_USERNAME, start_broker
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import open_store
from fieldscope.collect.subscriber import Collector, CollectorSettings
from fieldscope.edge.broker import BrokerSettings, MqttProtocol
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.topics import Topics


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    username: str | None


@pytest.fixture(
    params=[pytest.param("mosquitto", marks=pytest.mark.mqtt), pytest.param("embedded")]
)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Endpoint]:
    if request.param == "mosquitto":
        mosquitto = start_mosquitto(tmp_path / "mosquitto")
        try:
            yield Endpoint(mosquitto.host, mosquitto.port, None)
        finally:
            stop_mosquitto(mosquitto)
    else:
        embedded = start_broker("embedded", tmp_path / "embedded")
        try:
            # amqtt keeps messages for a persistent session only of a named client.
            yield Endpoint(embedded.host, embedded.port, DEMO_USERNAME)
        finally:
            embedded.stop()


def publish_as_station(broker: Endpoint, seqs: range) -> None:
    """QoS 1 over MQTT 3.1.1, waiting for every PUBACK, as a station's link does."""
    with mqtt_client(
        broker.host, broker.port, "station", username=broker.username,
        protocol=mqtt.MQTTv311, clean_session=False,
    ) as client:  # fmt: skip
        topic = Topics("fieldscope", "pond-3", "scope-a").identification
        infos = [client.publish(topic, sample_identification(s).to_json(), qos=1) for s in seqs]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()


def stored_seqs(db: Path) -> list[int]:
    if not db.exists():
        return []
    with open_store(str(db), create=False) as store:
        return sorted(r.seq for r in store.iter_identifications())


def test_a_3_1_1_collector_gets_what_was_published_while_it_was_stopped(
    broker: Endpoint, tmp_path: Path
) -> None:
    db = tmp_path / "collect.sqlite"
    settings = CollectorSettings(
        broker=BrokerSettings(
            host=broker.host,
            port=broker.port,
            client_id="collector-311",
            username=broker.username,
            protocol=MqttProtocol.V311,
        )
    )

    def run_collector(until: Callable[[Collector], bool]) -> None:
        with running_collector(db, settings) as collector:
            wait_for(lambda: until(collector), 20, "the collector")

    # First run: subscribe; the broker now keeps a session for this client id.
    run_collector(lambda c: True)
    publish_as_station(broker, range(10))
    # Second run under the same id: the 10 published while it was stopped arrive.
    run_collector(lambda c: c.stats.stored == 10)
    publish_as_station(broker, range(10, 25))
    run_collector(lambda c: c.stats.stored == 15)
    assert stored_seqs(db) == list(range(25))


def test_the_protocol_is_checked(tmp_path: Path) -> None:
    bad = CollectorSettings(broker=BrokerSettings(host="localhost", client_id="c", protocol="4"))  # type: ignore[arg-type]
    assert ("broker.protocol", 'must be one of "5", "3.1.1", got \'4\'') in bad.problems()
    store = open_store(str(tmp_path / "c.sqlite"))
    with pytest.raises(ConfigError, match=r'broker\.protocol: must be one of "5", "3\.1\.1"'):
        Collector(bad, store)
    store.close()
    assert BrokerSettings(host="localhost", client_id="c").mqtt_protocol is MqttProtocol.V5
    as_text = BrokerSettings(host="localhost", client_id="c", protocol="3.1.1")  # type: ignore[arg-type]
    assert as_text.mqtt_protocol is MqttProtocol.V311


@pytest.mark.mqtt
def test_collect_run_protocol_flag(tmp_path: Path) -> None:
    mosquitto = start_mosquitto(tmp_path / "mosquitto")
    endpoint = Endpoint(mosquitto.host, mosquitto.port, None)
    db = tmp_path / "collect.sqlite"
    log = tmp_path / "collector.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldscope.cli", "-v", "collect", "run", "--protocol",
             "3.1.1", "--broker", f"{mosquitto.host}:{mosquitto.port}", "--db", str(db),
             "--client-id", "cli-311"],
            stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "connected to" in log.read_text(), 30, "the collector to connect")
        time.sleep(0.3)  # the SUBSCRIBE follows the CONNACK
        publish_as_station(endpoint, range(5))
        wait_for(lambda: len(stored_seqs(db)) == 5, 20, "five stored identifications")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_mosquitto(mosquitto)
    assert "(MQTT 3.1.1)" in log.read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "fieldscope.cli", "collect", "run", "--protocol", "4",
         "--broker", "localhost"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--protocol" in bad.stderr
    assert "3.1.1" in bad.stderr
