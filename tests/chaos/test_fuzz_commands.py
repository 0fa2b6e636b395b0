"""Fuzzing the command handler of a running station (real daemon, real broker).

Two ways in: ``Daemon.on_command`` called with any name a topic level could decode to
and any payload bytes, and commands published over MQTT to random topics under the
station's ``command/`` level (QoS 0 or 1). The properties: no
exception ever escapes the handler (not into the caller, not into the link's
dispatcher thread, where it would be logged with a traceback), every command that
can be answered is answered with a valid reply — a bad one with ``ok`` false and a
one-line reason — and the station still answers ``status`` at the end.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from chaos_harness import FUZZ_SETTINGS, TOPICS, TallyOf
from conftest import Broker, SpecimenImages, TinyBundles, start_mosquitto, stop_mosquitto
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_daemon import running, write_config

from fieldscope.edge.commands import CommandError, CommandName, parse_command
from fieldscope.edge.daemon import Daemon
from fieldscope.edge.health import CommandReply
from fieldscope.edge.topics import TopicError

pytestmark = [pytest.mark.chaos, pytest.mark.mqtt]


class Replies:
    """Every reply the station publishes, by topic, and every traceback it logs."""

    def __init__(self, broker: Broker) -> None:
        self._cv = threading.Condition()
        self.by_topic: dict[str, list[bytes]] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzz-commander")
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{TOPICS.base}/command/+/result", qos=1)
        self.client.loop_start()
        assert subscribed.wait(5), "cannot subscribe to the replies"

    def _on_message(self, _c: Any, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cv:
            self.by_topic.setdefault(msg.topic, []).append(bytes(msg.payload))
            self._cv.notify_all()

    def count(self, topic: str) -> int:
        with self._cv:
            return len(self.by_topic.get(topic, []))

    def next_after(self, topic: str, before: int, timeout: float = 10.0) -> CommandReply:
        with self._cv:
            arrived = self._cv.wait_for(lambda: len(self.by_topic.get(topic, [])) > before, timeout)
            assert arrived, f"no reply on {topic!r} within {timeout} s"
            return CommandReply.from_json(self.by_topic[topic][before])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Tracebacks(logging.Handler):
    """Collects log records that carry an exception (what an escaped one produces)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@dataclass(frozen=True)
class Station:
    daemon: Daemon
    broker: Broker
    replies: Replies
    tracebacks: Tracebacks


@pytest.fixture(scope="module")
def station(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bundles: TinyBundles,
    specimen_images: SpecimenImages,
) -> Iterator[Station]:
    tmp = tmp_path_factory.mktemp("fuzz-station")
    broker = start_mosquitto(tmp / "mosquitto")
    tracebacks = Tracebacks()
    logging.getLogger("fieldscope").addHandler(tracebacks)
    replies: Replies | None = None
    try:
        specimen_images.copy(tmp / "images", 4)
        cfg = write_config(
            tmp,
            broker,
            tiny_bundles.v1,
            camera={"trigger": "command"},
            camera__replay={"loop": True},
            heartbeat={"interval_s": 60},
        )
        replies = Replies(broker)
        with running(cfg) as daemon:
            assert daemon.station.link.wait_online(10)
            yield Station(daemon, broker, replies, tracebacks)
            # After all the fuzzing: alive, and answering.
            daemon.on_command("resume", b"")
            before = replies.count(TOPICS.command_result("status"))
            daemon.on_command("status", b'{"request_id": "final"}')
            final = replies.next_after(TOPICS.command_result("status"), before)
            assert (final.ok, final.request_id) == (True, "final")
            assert daemon.station.pipeline.stalled(30.0) == []
        assert tracebacks.records == [], [r.getMessage() for r in tracebacks.records]
    finally:
        logging.getLogger("fieldscope").removeHandler(tracebacks)
        if replies is not None:
            replies.close()
        stop_mosquitto(broker)


def _reply_topic(name: str) -> str | None:
    """Where the reply to ``name`` goes, or None when it cannot be a topic level."""
    try:
        return TOPICS.command_result(name)
    except TopicError:
        return None


def _expect(name: str, payload: bytes, reply: CommandReply) -> str:
    """What the reply must say, judged by the parser alone; the outcome."""
    try:
        command = parse_command(name, payload)
    except CommandError as exc:
        refused = str(exc)
    else:
        refused = None
    if refused is not None:
        assert reply.ok is False
        assert reply.error == refused
        assert "\n" not in refused
        return "refused with an error reply"
    assert reply.command == command.name.value
    assert reply.request_id == command.request_id
    if not reply.ok:  # valid, but not possible now (paused, a capture queue full ...)
        assert reply.error
        return "valid, answered not now"
    return "carried out"


NO_REPLY = "no reply possible (not a topic level)"


known_names = st.sampled_from([c.value for c in CommandName])
any_names = known_names | st.text(max_size=30) | st.text(st.characters(), max_size=8)
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12)
payloads = (
    st.binary(max_size=200)
    | st.fixed_dictionaries(
        {},
        optional={
            "request_id": json_scalars,
            "count": json_scalars | st.integers(-3, 120),
            "bundle": st.just("/etc/shadow"),
        },
    ).map(lambda d: json.dumps(d).encode())
    # Hypothesis needs no help with deep nesting: ask for it.
    | st.integers(1, 80).map(lambda n: b"[" * n + b"]" * n)
)


@settings(FUZZ_SETTINGS, max_examples=150)
@given(name=any_names, payload=payloads)
# Found by this test: a blank name is a valid topic level but no valid reply "command".
@example(name=" ", payload=b"")
def test_fuzz_the_handler_answers_every_command_and_never_raises(
    station: Station, chaos_tally: TallyOf, name: str, payload: bytes
) -> None:
    topic = _reply_topic(name)
    before = 0 if topic is None else station.replies.count(topic)
    station.daemon.on_command(name, payload)  # must not raise, whatever it got
    outcome = NO_REPLY
    if topic is not None:
        outcome = _expect(name, payload, station.replies.next_after(topic, before))
    chaos_tally("fuzz Daemon.on_command").counts[outcome] += 1


# Names that can travel in a PUBLISH topic (no wildcard, '/', NUL or lone surrogate).
wire_names = known_names | st.text(
    st.characters(exclude_characters="/+#", exclude_categories=("Cc", "Cs", "Cn")), max_size=20
)


@settings(FUZZ_SETTINGS, max_examples=150)
@given(name=wire_names, payload=payloads, qos=st.sampled_from([0, 1]))
def test_fuzz_commands_over_mqtt_are_answered_and_never_kill_the_dispatcher(
    station: Station, chaos_tally: TallyOf, name: str, payload: bytes, qos: int
) -> None:
    topic = _reply_topic(name)
    before = 0 if topic is None else station.replies.count(topic)
    info = station.replies.client.publish(f"{TOPICS.base}/command/{name}", payload, qos=qos)
    info.wait_for_publish(5)
    outcome = NO_REPLY
    if topic is not None:
        outcome = _expect(name, payload, station.replies.next_after(topic, before))
    chaos_tally("fuzz commands over MQTT").counts[outcome] += 1
