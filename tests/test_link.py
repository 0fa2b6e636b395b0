"""The MQTT link against a real mosquitto: delivery, outages, restarts, retained state, commands."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    EDGE_PREFIX,
    Broker,
    MqttRecorder,
    retained_value,
    start_mosquitto,
    stop_mosquitto,
)
from mqtt_security import make_certificates, mosquitto_dir, password_lines, start_configured

from fieldscope.edge.broker import BrokerSettings, MqttProtocol, TlsSettings
from fieldscope.edge.commands import CommandError, parse_command
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.health import CommandReply
from fieldscope.edge.link import MqttLink
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.topics import Topics

pytestmark = pytest.mark.mqtt

PREFIX = EDGE_PREFIX
MODEL = b'{"model":"tiny","version":1}'


def seq_payload(seq: int) -> bytes:
    return str(seq).encode()


# --- helpers: a subscriber, a station, brokers with special configurations ---------------------


class Collector(MqttRecorder):
    """The shared recorder (tests/conftest.py), reading the sequence numbers this
    file's stations publish as payloads; it rides out broker restarts."""

    def seqs(self, topic: str) -> list[int]:
        return [int(p) for p in self.on(topic)]

    def wait_for_seqs(self, topic: str, wanted: set[int], timeout: float = 20.0) -> bool:
        return self.wait_for(lambda c: wanted <= set(c.seqs(topic)), timeout)


@dataclass
class Station:
    """An outbox and a link, as the daemon wires them."""

    link: MqttLink
    outbox: Outbox
    topics: Topics
    stop: threading.Event
    commands: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, n: int) -> list[int]:
        topic = self.topics.identification
        return [self.outbox.add(topic, seq_payload).seq for _ in range(n)]

    def close(self, timeout: float = 2.0) -> bool:
        self.stop.set()
        try:
            return self.link.stop_clean(timeout)
        finally:
            self.outbox.close()


@pytest.fixture
def stations() -> Iterator[Callable[..., Station]]:
    """Build stations; any left running are stopped at the end of the test."""
    made: list[Station] = []

    def make(
        broker: Broker | tuple[str, int],
        db: Path,
        *,
        device: str = "scope-a",
        start: bool = True,
        outbox_args: dict[str, Any] | None = None,
        on_command: Callable[[str, bytes], None] | None = None,
        **settings: Any,
    ) -> Station:
        host, port = (broker.host, broker.port) if isinstance(broker, Broker) else broker
        topics = Topics(PREFIX, "pond-3", device)
        outbox = Outbox(db, **(outbox_args or {}))
        stop = threading.Event()
        commands: list[tuple[str, bytes]] = []
        settings = {"reconnect_backoff_s": (1.0, 2.0), **settings}
        link = MqttLink(
            BrokerSettings(host=host, port=port, client_id=f"fieldscope-{device}", **settings),
            topics,
            outbox,
            on_command=on_command or (lambda name, payload: commands.append((name, payload))),
            retained_model=lambda: MODEL,
            stop=stop,
        )
        station = Station(link, outbox, topics, stop, commands)
        made.append(station)
        if start:
            link.start()
        return station

    yield make
    for station in made:
        station.close(timeout=0.5)


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A directory mosquitto can write to (see :func:`mqtt_security.mosquitto_dir`)."""
    with mosquitto_dir() as path:
        yield path


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Test-side polling of state that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- delivery --------------------------------------------------------------------------------


def test_500_messages_are_all_delivered_in_order_and_acknowledged(
    mosquitto: Broker, tmp_path: Path, stations: Callable[..., Station]
) -> None:
    collector = Collector(mosquitto, "collector")
    try:
        station = stations(mosquitto, tmp_path / "outbox.db")
        assert station.link.wait_online(10)
        added = station.add(500)
        topic = station.topics.identification
        assert collector.wait_for_seqs(topic, set(added))
        assert wait_until(lambda: station.outbox.depth() == 0)
        seqs = collector.seqs(topic)
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == added  # oldest first
        health = station.link.health()
        assert health.acknowledged >= 500
        assert health.in_flight == 0
        assert health.connected
        assert health.last_connected_at is not None
        assert station.close() is True
    finally:
        collector.close()


def test_mqtt_3_1_1_works_as_well(
    mosquitto: Broker, tmp_path: Path, stations: Callable[..., Station]
) -> None:
    collector = Collector(mosquitto, "collector")
    try:
        station = stations(mosquitto, tmp_path / "outbox.db", protocol=MqttProtocol.V311)
        added = station.add(20)
        assert collector.wait_for_seqs(station.topics.identification, set(added))
        assert wait_until(lambda: station.outbox.depth() == 0)
    finally:
        collector.close()


@pytest.mark.slow
def test_a_broker_restart_mid_stream_loses_nothing(
    broker_dir: Path, tmp_path: Path, stations: Callable[..., Station]
) -> None:
    broker = start_mosquitto(broker_dir, persistence=True)
    collector = Collector(broker, "collector", persistent=True)
    try:
        station = stations(broker, tmp_path / "outbox.db")
        topic = station.topics.identification
        assert station.link.wait_online(10)
        producer_done = threading.Event()

        def produce() -> None:
            for _ in range(400):
                station.add(1)
                time.sleep(0.004)
            producer_done.set()

        producer = threading.Thread(target=produce)
        producer.start()
        assert collector.wait_for(lambda c: len(c.seqs(topic)) >= 100)
        stop_mosquitto(broker)  # mid-stream; it saves its state
        assert wait_until(lambda: not station.link.connected)
        time.sleep(0.5)
        broker = start_mosquitto(broker_dir, port=broker.port, persistence=True)
        producer.join(timeout=30)
        assert producer_done.is_set()
        assert collector.wait_for_seqs(topic, set(range(1, 401)), timeout=30)
        assert wait_until(lambda: station.outbox.depth() == 0)
        assert station.link.health().disconnects == 1
        assert station.link.wait_online(10)
        assert retained_value(broker, station.topics.status) == b"online"
    finally:
        collector.close()
        stop_mosquitto(broker)


def test_after_a_restart_the_backlog_goes_oldest_first_and_seq_continues(
    mosquitto: Broker, tmp_path: Path, stations: Callable[..., Station]
) -> None:
    db = tmp_path / "outbox.db"
    first = stations(mosquitto, db)
    assert first.link.wait_online(10)
    stop_mosquitto(mosquitto)
    assert wait_until(lambda: not first.link.connected)
    backlog = first.add(30)  # never acknowledged
    assert first.close(timeout=0.5) is False  # could not flush: it says so
    broker = start_mosquitto(tmp_path / "again", port=mosquitto.port)
    collector = Collector(broker, "collector")
    try:
        second = stations(broker, db, start=False)
        assert second.outbox.next_seq == 31
        assert second.outbox.depth() == 30
        newer = second.add(5)
        assert newer == [31, 32, 33, 34, 35]
        second.link.start()
        topic = second.topics.identification
        assert collector.wait_for_seqs(topic, set(backlog + newer))
        assert list(dict.fromkeys(collector.seqs(topic))) == backlog + newer
        assert wait_until(lambda: second.outbox.depth() == 0)
    finally:
        collector.close()
        stop_mosquitto(broker)


def test_a_station_booting_without_broker_keeps_the_newest_within_its_cap(
    tmp_path: Path, stations: Callable[..., Station]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    station = stations(
        ("127.0.0.1", port), tmp_path / "outbox.db", outbox_args={"max_messages": 10}
    )
    station.add(30)  # nobody listens yet: drop-oldest keeps 21..30
    assert not station.link.connected
    assert station.link.health().connect_failures >= 1
    assert "cannot reach the broker" in (station.link.health().last_error or "")
    broker = start_mosquitto(tmp_path / "late", port=port)
    collector = Collector(broker, "collector")
    try:
        topic = station.topics.identification
        assert collector.wait_for_seqs(topic, set(range(21, 31)), timeout=15)
        assert wait_until(lambda: station.outbox.depth() == 0)
        assert not set(collector.seqs(topic)) & set(range(1, 21))
        assert station.outbox.dropped() == 20
    finally:
        collector.close()
        stop_mosquitto(broker)


# --- retained state ----------------------------------------------------------------------------


def test_status_is_online_while_running_and_stopped_after_a_clean_stop(
    mosquitto: Broker,
    tmp_path: Path,
    stations: Callable[..., Station],
    caplog: pytest.LogCaptureFixture,
) -> None:
    station = stations(mosquitto, tmp_path / "outbox.db")
    assert station.link.wait_online(10)
    assert retained_value(mosquitto, station.topics.status) == b"online"
    assert retained_value(mosquitto, station.topics.model) == MODEL
    station.add(3)
    assert station.close() is True
    with Outbox(tmp_path / "outbox.db") as reopened:
        assert reopened.depth() == 0  # flushed before stopping
    assert retained_value(mosquitto, station.topics.status) == b"stopped"
    assert station.link.stop_clean(0.1) is True  # a second call changes nothing
    # A clean stop leaves no false alarm in the journal.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow
def test_the_model_is_republished_after_a_restart_of_a_broker_without_persistence(
    tmp_path: Path, stations: Callable[..., Station]
) -> None:
    broker = start_mosquitto(tmp_path / "b", persistence=False)
    try:
        station = stations(broker, tmp_path / "outbox.db")
        assert station.link.wait_online(10)
        assert retained_value(broker, station.topics.model) == MODEL
        stop_mosquitto(broker)
        assert wait_until(lambda: not station.link.connected)
        broker = start_mosquitto(tmp_path / "b", port=broker.port, persistence=False)
        assert station.link.wait_online(15)
        assert retained_value(broker, station.topics.model) == MODEL
        assert retained_value(broker, station.topics.status) == b"online"
    finally:
        stop_mosquitto(broker)


KILLED_STATION = textwrap.dedent(
    """
    import sys, threading, time
    from fieldscope.edge.broker import BrokerSettings
    from fieldscope.edge.link import MqttLink
    from fieldscope.edge.outbox import Outbox
    from fieldscope.edge.topics import Topics

    port, db = int(sys.argv[1]), sys.argv[2]
    topics = Topics("fs", "pond-3", "scope-k")
    outbox = Outbox(db)
    link = MqttLink(
        BrokerSettings(host="127.0.0.1", port=port, client_id="fieldscope-scope-k"),
        topics, outbox,
        on_command=lambda name, payload: None, retained_model=lambda: None,
        stop=threading.Event(),
    )
    link.start()
    if not link.wait_online(10):
        sys.exit(3)
    print("ONLINE", flush=True)
    while True:  # until SIGKILL
        outbox.add(topics.identification, lambda seq: str(seq).encode())
        time.sleep(0.002)
    """
)


@pytest.mark.slow
def test_kill_9_leaves_offline_and_a_restart_delivers_every_seq(
    mosquitto: Broker, tmp_path: Path, stations: Callable[..., Station]
) -> None:
    db = tmp_path / "outbox.db"
    collector = Collector(mosquitto, "collector")
    topics = Topics(PREFIX, "pond-3", "scope-k")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_STATION, str(mosquitto.port), str(db)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ONLINE"
        assert collector.wait_for(lambda c: len(c.seqs(topics.identification)) >= 50)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # The broker announces the last will at once: the socket died with the process.
        assert collector.wait_for(lambda c: (topics.status, b"offline", False) in c.messages)
        assert retained_value(mosquitto, topics.status) == b"offline"
        station = stations(mosquitto, db, device="scope-k")
        last = station.outbox.next_seq - 1
        assert last >= 50
        assert collector.wait_for_seqs(topics.identification, set(range(1, last + 1)))
        assert wait_until(lambda: station.outbox.depth() == 0)
        assert station.link.wait_online(10)
        assert retained_value(mosquitto, topics.status) == b"online"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        collector.close()


# --- commands, heartbeat, replies ---------------------------------------------------------


def test_commands_reach_on_command_and_replies_come_back(
    mosquitto: Broker, tmp_path: Path, stations: Callable[..., Station]
) -> None:
    replies: list[CommandReply] = []
    station_box: list[Station] = []

    def on_command(name: str, payload: bytes) -> None:
        # What the daemon does: parse, act, reply.
        try:
            command = parse_command(name, payload)
            reply = command.reply({"count": command.count})
        except CommandError as exc:
            reply = exc.reply()
        replies.append(reply)
        station_box[0].link.publish_command_result(name, reply)

    collector = Collector(mosquitto, "collector")
    try:
        topics = Topics(PREFIX, "pond-3", "scope-a")
        sender = collector.client
        # A retained command would run again on every reconnect: the station ignores it.
        sender.publish(topics.command("pause"), b"", qos=1, retain=True).wait_for_publish(5)
        station = stations(mosquitto, tmp_path / "outbox.db", on_command=on_command)
        station_box.append(station)
        assert station.link.wait_online(10)
        sender.publish(topics.command("capture"), b'{"request_id":"r1","count":2}', qos=1)
        sender.publish(topics.command("format-disk"), b'{"request_id":"r2"}', qos=1)
        ok_topic, bad_topic = topics.command_result("capture"), topics.command_result("format-disk")
        assert collector.wait_for(lambda c: bool(c.on(ok_topic) and c.on(bad_topic)))
        ok = CommandReply.from_json(collector.on(ok_topic)[0])
        assert (ok.ok, ok.command, ok.request_id, ok.data) == (True, "capture", "r1", {"count": 2})
        bad = CommandReply.from_json(collector.on(bad_topic)[0])
        assert (bad.ok, bad.request_id) == (False, "r2")
        assert "unknown command 'format-disk'" in (bad.error or "")
        assert [r.command for r in replies] == ["capture", "format-disk"]  # not "pause"
    finally:
        collector.close()


def test_heartbeats_and_a_failing_command_handler(
    mosquitto: Broker,
    tmp_path: Path,
    stations: Callable[..., Station],
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def flaky(name: str, payload: bytes) -> None:
        calls.append(name)
        if name == "status":
            raise RuntimeError("handler bug")

    collector = Collector(mosquitto, "collector")
    try:
        station = stations(mosquitto, tmp_path / "outbox.db", on_command=flaky)
        assert station.link.wait_online(10)
        assert station.link.publish_heartbeat(b'{"uptime_s":1}')
        assert collector.wait_for(lambda c: bool(c.on(station.topics.heartbeat)))
        collector.client.publish(station.topics.command("status"), b"", qos=1)
        collector.client.publish(station.topics.command("resume"), b"", qos=1)
        assert wait_until(lambda: calls == ["status", "resume"])  # survived the bug
        assert "the command handler failed" in caplog.text
        assert not station.link.publish_command_result("bad/name", b"{}")
    finally:
        collector.close()


def test_nothing_is_published_while_disconnected(
    tmp_path: Path, stations: Callable[..., Station]
) -> None:
    station = stations(("127.0.0.1", 9), tmp_path / "outbox.db", start=False)
    assert station.link.publish_heartbeat(b"{}") is False
    assert station.link.publish_model(MODEL) is False
    assert station.link.publish_command_result("status", b"{}") is False
    assert station.link.wait_online(0.05) is False


# --- security and broker refusals --------------------------------------------------------


def test_tls_with_username_and_password(broker_dir: Path, stations: Callable[..., Station]) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    certs = make_certificates(broker_dir)
    broker = start_configured(
        broker_dir, certs.broker_lines() + password_lines(broker_dir, "scope", "s3cret")
    )

    def scope(device: str, password: str) -> Station:
        """A station logging in as user ``scope`` over TLS (the broker's CA)."""
        return stations(
            broker,
            broker_dir / f"{device}.db",
            device=device,
            tls=TlsSettings(ca=certs.ca),
            username="scope",
            password=password,
        )

    try:
        good = scope("good", "s3cret")
        assert good.link.wait_online(10)
        good.add(3)
        assert wait_until(lambda: good.outbox.depth() == 0)
        bad = scope("bad", "nope")
        assert wait_until(lambda: "refused the connection" in (bad.link.health().last_error or ""))
        assert not bad.link.connected
        assert "s3cret" not in repr(good.link.settings)
    finally:
        stop_mosquitto(broker)


def test_a_refused_message_stays_in_the_outbox(
    broker_dir: Path, stations: Callable[..., Station]
) -> None:
    acl = broker_dir / "acl"
    acl.write_text(
        f"topic write {PREFIX}/pond-3/scope-a/status\ntopic write {PREFIX}/pond-3/scope-a/model\n"
    )
    acl.chmod(0o644)
    broker = start_configured(broker_dir, ["allow_anonymous true", f"acl_file {acl}"])
    try:
        station = stations(broker, broker_dir / "outbox.db")
        assert station.link.wait_online(10)
        station.add(2)
        assert wait_until(lambda: station.link.health().refused == 2)
        assert "Not authorized" in (station.link.health().last_error or "")
        assert station.outbox.depth() == 2  # kept for when the ACL is fixed
        assert station.link.in_flight == 0
    finally:
        stop_mosquitto(broker)


def test_bad_settings_stop_the_link_with_every_problem_named(tmp_path: Path) -> None:
    settings = BrokerSettings(
        host="localhost",
        port=0,
        client_id="a/b",
        password="x",
        tls=TlsSettings(ca=tmp_path / "missing.pem", cert=tmp_path / "c.pem"),
        reconnect_backoff_s=(10.0, 5.0),
    )
    assert settings.tls_enabled
    with Outbox(tmp_path / "o.db") as outbox, pytest.raises(ConfigError) as caught:
        MqttLink(
            settings,
            Topics(PREFIX, "pond-3", "dev"),
            outbox,
            on_command=lambda n, p: None,
            retained_model=lambda: None,
            stop=threading.Event(),
        )
    text = str(caught.value)
    assert "mqtt.port: must be an integer >= 1, got 0" in text
    assert "mqtt.client_id: must not contain '/'" in text
    assert "mqtt.password: needs username as well" in text
    assert f"mqtt.tls.ca: no such file: {tmp_path / 'missing.pem'}" in text
    assert "mqtt.tls.cert: needs key as well" in text
    assert "mqtt.reconnect_backoff_s: must be [min, max]" in text
