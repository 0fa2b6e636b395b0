"""The MQTT topic scheme: built in one place, parsed back by collectors, used on a real broker."""

from __future__ import annotations

import hashlib
import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker
from hypothesis import given
from hypothesis import strategies as st

from fieldscope.edge.errors import ConfigError
from fieldscope.edge.message import (
    Candidate,
    Identification,
    ImageRef,
    ModelRef,
    Status,
    Timings,
)
from fieldscope.edge.topics import (
    COLLECTED_KINDS,
    TOPIC_SPECS,
    DeviceStatus,
    ParsedTopic,
    Subscription,
    TopicError,
    TopicKind,
    Topics,
    parse,
    shared,
    subscription_filters,
)

TOPICS = Topics("fieldscope", "pond-3", "scope-a")


# --- building --------------------------------------------------------------------------------


def test_each_topic_is_prefix_station_device_kind() -> None:
    assert TOPICS.identification == "fieldscope/pond-3/scope-a/identification"
    assert TOPICS.status == "fieldscope/pond-3/scope-a/status"
    assert TOPICS.heartbeat == "fieldscope/pond-3/scope-a/heartbeat"
    assert TOPICS.model == "fieldscope/pond-3/scope-a/model"
    assert TOPICS.command("reload") == "fieldscope/pond-3/scope-a/command/reload"
    assert TOPICS.command_filter == "fieldscope/pond-3/scope-a/command/+"
    assert TOPICS.topic("model") == TOPICS.model


def test_prefix_may_have_several_levels() -> None:
    topics = Topics("lab/fieldscope", "pond-3", "scope-a")
    assert topics.status == "lab/fieldscope/pond-3/scope-a/status"
    assert parse(topics.status, "lab/fieldscope") == ParsedTopic(
        "pond-3", "scope-a", TopicKind.STATUS, None
    )


def test_specs_give_qos_and_retain_per_kind() -> None:
    assert set(TOPIC_SPECS) == set(TopicKind)
    ident = TOPIC_SPECS[TopicKind.IDENTIFICATION]
    assert (ident.qos, ident.retain, ident.inbound) == (1, False, False)
    status = TOPIC_SPECS[TopicKind.STATUS]
    assert (status.qos, status.retain) == (1, True)
    model = TOPIC_SPECS[TopicKind.MODEL]
    assert (model.qos, model.retain) == (1, True)
    heartbeat = TOPIC_SPECS[TopicKind.HEARTBEAT]
    assert (heartbeat.qos, heartbeat.retain) == (0, False)
    command = TOPIC_SPECS[TopicKind.COMMAND]
    # A retained command would run again each time the device reconnects.
    assert (command.qos, command.retain, command.inbound) == (1, False, True)
    assert TOPICS.spec("status") is status
    assert TopicKind.COMMAND not in COLLECTED_KINDS


def test_last_will_is_retained_offline_on_status() -> None:
    will = TOPICS.last_will()
    assert will == (TOPICS.status, b"offline", 1, True)
    assert will.payload.decode() == DeviceStatus.OFFLINE
    assert {s.value for s in DeviceStatus} == {"online", "offline", "stopped"}


def test_topic_kind_and_command_name_are_checked() -> None:
    with pytest.raises(TopicError, match="unknown topic kind 'nope'"):
        TOPICS.topic("nope")
    with pytest.raises(TopicError, match="a command topic needs the command's name"):
        TOPICS.topic(TopicKind.COMMAND)
    with pytest.raises(TopicError, match="only command topics take a command name"):
        TOPICS.topic(TopicKind.STATUS, "reload")
    with pytest.raises(TopicError, match="command name must not contain '#'"):
        TOPICS.command("#")


# --- bad segments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "station", "device", "expected"),
    [
        ("fs", "", "d", "station must not be empty"),
        ("fs", "a/b", "d", "station must not contain '/', got 'a/b'"),
        ("fs", "s", "a+b", "device must not contain '+', got 'a+b'"),
        ("fs", "s", "a#", "device must not contain '#'"),
        ("fs", "s", "$SYS", "device must not start with '$'"),
        ("fs", "s", "d\x00", "device must not contain control characters"),
        ("fs", "s\n", "d", "station must not contain control characters"),
        ("fs", "s", "x" * 129, "device must be at most 128 bytes in UTF-8 (has 129)"),
        ("fs", "s", "é" * 65, "device must be at most 128 bytes in UTF-8 (has 130)"),
        ("fs", "s", "\ud800", "device must not contain lone surrogates"),
        ("fs", 7, "d", "station must be a string, not int"),
        ("", "s", "d", "prefix must not be empty"),
        ("fs/", "s", "d", "prefix must not start or end with '/' nor contain '//'"),
        ("/fs", "s", "d", "prefix must not start or end with '/'"),
        ("a//b", "s", "d", "prefix must not start or end with '/' nor contain '//'"),
        ("fs/+", "s", "d", "prefix level 2 ('+') must not contain '+'"),
        ("fs/#", "s", "d", "prefix level 2 ('#') must not contain '#'"),
        ("$share", "s", "d", "prefix must not start with '$'"),
        ("ab/" * 85 + "ab", "s", "d", "prefix must be at most 256 bytes in UTF-8 (has 257)"),
    ],
)
def test_bad_segments_are_rejected_by_name(
    prefix: str, station: str, device: str, expected: str
) -> None:
    with pytest.raises(TopicError) as info:
        Topics(prefix, station, device)
    assert expected in str(info.value)
    # Station and device come from the config file: it is a configuration error.
    assert isinstance(info.value, ConfigError)


def test_long_values_are_shortened_in_the_error() -> None:
    with pytest.raises(TopicError) as info:
        Topics("fs", "s", "x" * 10_000)
    assert len(str(info.value)) < 200


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [k for k in TopicKind if k not in (TopicKind.COMMAND, TopicKind.IMAGE)]
)
def test_parse_round_trips_each_kind(kind: TopicKind) -> None:
    assert parse(TOPICS.topic(kind), "fieldscope") == ("pond-3", "scope-a", kind, None)


def test_parse_round_trips_commands() -> None:
    parsed = parse(TOPICS.command("reload"), "fieldscope")
    assert parsed == ParsedTopic("pond-3", "scope-a", TopicKind.COMMAND, "reload")
    station, device, kind, command = parsed
    assert (station, device, kind, command) == ("pond-3", "scope-a", "command", "reload")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("other/pond-3/scope-a/status", "is not under the prefix 'fieldscope'"),
        ("fieldscopex/pond-3/scope-a/status", "is not under the prefix 'fieldscope'"),
        ("fieldscope/pond-3/scope-a/nope", "ends in unknown kind 'nope'"),
        ("fieldscope/pond-3/scope-a", "does not fit the scheme"),
        ("fieldscope/pond-3/scope-a/command", "does not fit the scheme"),
        ("fieldscope/pond-3/scope-a/status/extra", "does not fit the scheme"),
        ("fieldscope/pond-3//status", "device must not be empty"),
        ("fieldscope/pond-3/$x/status", "device must not start with '$'"),
        ("fieldscope/pond-3/scope-a/command/", "command name must not be empty"),
    ],
)
def test_parse_rejects_topics_outside_the_scheme(topic: str, expected: str) -> None:
    with pytest.raises(TopicError, match=expected.replace("$", r"\$")):
        parse(topic, "fieldscope")


_segment = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#"),
    min_size=1,
    max_size=30,
).filter(lambda s: not s.startswith("$") and len(s.encode()) <= 128)


@given(
    prefix=st.lists(_segment, min_size=1, max_size=3).map("/".join),
    station=_segment,
    device=_segment,
    command=_segment,
)
def test_any_valid_names_build_topics_that_parse_back_and_match_the_filters(
    prefix: str, station: str, device: str, command: str
) -> None:
    topics = Topics(prefix, station, device)
    filters = {s.filter for s in subscription_filters(prefix)}
    for kind in COLLECTED_KINDS:
        topic = topics.topic(kind)
        assert parse(topic, prefix) == (station, device, kind, None)
        assert [f for f in filters if mqtt.topic_matches_sub(f, topic)] == [
            f"{prefix}/+/+/{kind.value}"
        ]
    topic = topics.command(command)
    assert parse(topic, prefix) == (station, device, TopicKind.COMMAND, command)
    assert mqtt.topic_matches_sub(topics.command_filter, topic)
    assert not any(mqtt.topic_matches_sub(f, topic) for f in filters)


# --- subscription filters --------------------------------------------------------------------


def test_collector_filters_cover_every_device_and_never_commands() -> None:
    subs = subscription_filters("fieldscope")
    assert subs == (
        Subscription("fieldscope/+/+/identification", 1),
        Subscription("fieldscope/+/+/status", 1),
        Subscription("fieldscope/+/+/heartbeat", 0),
        Subscription("fieldscope/+/+/model", 1),
    )
    other = Topics("fieldscope", "lake", "scope-z")
    for topics in (TOPICS, other):
        for kind in COLLECTED_KINDS:
            matching = [s for s in subs if mqtt.topic_matches_sub(s.filter, topics.topic(kind))]
            assert [s.qos for s in matching] == [TOPIC_SPECS[kind].qos]
        assert not any(mqtt.topic_matches_sub(s.filter, topics.command("reload")) for s in subs)
    assert not any(
        mqtt.topic_matches_sub(s.filter, Topics("elsewhere", "pond-3", "scope-a").status)
        for s in subs
    )


def test_filters_narrow_to_a_station_or_a_device_and_kinds() -> None:
    (station_only,) = subscription_filters("fieldscope", "pond-3", kinds=["identification"])
    assert station_only.filter == "fieldscope/pond-3/+/identification"
    assert mqtt.topic_matches_sub(station_only.filter, TOPICS.identification)
    assert not mqtt.topic_matches_sub(
        station_only.filter, Topics("fieldscope", "lake", "scope-a").identification
    )
    (one_device,) = subscription_filters("fieldscope", "+", "scope-a", kinds=[TopicKind.STATUS])
    assert one_device.filter == "fieldscope/+/scope-a/status"
    (commands,) = subscription_filters("fieldscope", kinds=[TopicKind.COMMAND])
    assert mqtt.topic_matches_sub(commands.filter, TOPICS.command("reload"))


def test_shared_form_prefixes_the_same_filters() -> None:
    plain = subscription_filters("fieldscope")
    subs = subscription_filters("fieldscope", share_group="collectors")
    assert [s.filter for s in subs] == [f"$share/collectors/{s.filter}" for s in plain]
    assert [s.qos for s in subs] == [s.qos for s in plain]
    assert shared("g1", "fieldscope/+/+/identification") == (
        "$share/g1/fieldscope/+/+/identification"
    )


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: subscription_filters("fieldscope", "a/b"), "station must not contain '/'"),
        (lambda: subscription_filters("fieldscope", "+", "#"), "device must not contain '#'"),
        (lambda: subscription_filters("fs/#"), "must not contain '#'"),
        (lambda: subscription_filters("fs", kinds=["nope"]), "unknown topic kind 'nope'"),
        (lambda: subscription_filters("fs", share_group="a/b"), "share group must not contain"),
        (lambda: subscription_filters("fs", share_group="+"), "share group must not contain"),
        (lambda: shared("g", "$share/h/x"), "a shared subscription needs a plain topic filter"),
    ],
)
def test_bad_filter_arguments_are_rejected(call: object, expected: str) -> None:
    assert callable(call)
    with pytest.raises(TopicError, match=expected.replace("$", r"\$")):
        call()


# --- on a real broker ------------------------------------------------------------------------


def _identification(seq: int) -> Identification:
    return Identification(
        device=TOPICS.device,
        station=TOPICS.station,
        seq=seq,
        captured_at=datetime(2026, 11, 23, 18, 39, 0, 123456, tzinfo=UTC),
        status=Status.OK,
        label="Paramecium",
        score=0.91,
        top_k=(Candidate("Paramecium", 0.91), Candidate("Euglena", 0.06)),
        model=ModelRef("protists", "1.2.0", hashlib.sha256(b"m").hexdigest()),
        image=ImageRef(hashlib.sha256(b"i").hexdigest(), 1280, 960),
        timings_ms=Timings(35.1, 2.4, 11.8, 3.2, 55.0),
    )


def _client(broker: Broker, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(broker.host, broker.port)
    return client


@pytest.fixture
def clients() -> Iterator[list[mqtt.Client]]:
    made: list[mqtt.Client] = []
    yield made
    for client in made:
        # Disconnecting first wakes the network thread, so loop_stop returns at once.
        client.disconnect()
        client.loop_stop()


def _subscribe(
    broker: Broker,
    client_id: str,
    subs: tuple[Subscription, ...],
    clients: list[mqtt.Client],
    inbox: queue.Queue[tuple[str, mqtt.MQTTMessage]] | None = None,
) -> queue.Queue[tuple[str, mqtt.MQTTMessage]]:
    """A subscriber whose messages arrive in ``inbox`` tagged with its client id."""
    inbox = queue.Queue() if inbox is None else inbox
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_message = lambda _c, _u, msg: inbox.put((client_id, msg))
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(broker.host, broker.port)
    clients.append(client)
    client.subscribe(list(subs))
    client.loop_start()
    assert subscribed.wait(5), f"{client_id}: no SUBACK"
    return inbox


@pytest.mark.mqtt
def test_identification_round_trip_through_mosquitto(
    mosquitto: Broker, clients: list[mqtt.Client]
) -> None:
    subs = subscription_filters("fieldscope", kinds=[TopicKind.IDENTIFICATION])
    inbox = _subscribe(mosquitto, "collector", subs, clients)

    publisher = _client(mosquitto, "scope-a")
    clients.append(publisher)
    publisher.loop_start()
    sent = _identification(seq=42)
    spec = TOPICS.spec(TopicKind.IDENTIFICATION)
    info = publisher.publish(TOPICS.identification, sent.to_json(), spec.qos, spec.retain)
    info.wait_for_publish(timeout=5)
    assert info.is_published()

    _, msg = inbox.get(timeout=5)
    assert (msg.qos, bool(msg.retain)) == (1, False)
    assert parse(msg.topic, "fieldscope") == ("pond-3", "scope-a", TopicKind.IDENTIFICATION, None)
    received = Identification.from_json(msg.payload)
    assert received == sent
    assert received.key == ("scope-a", 42)


@pytest.mark.mqtt
def test_shared_subscription_splits_identifications_between_collectors(
    mosquitto: Broker, clients: list[mqtt.Client]
) -> None:
    subs = subscription_filters(
        "fieldscope", kinds=[TopicKind.IDENTIFICATION], share_group="collectors"
    )
    inbox = _subscribe(mosquitto, "collector-0", subs, clients)
    _subscribe(mosquitto, "collector-1", subs, clients, inbox)
    publisher = _client(mosquitto, "scope-a")
    clients.append(publisher)
    publisher.loop_start()
    infos = [
        publisher.publish(TOPICS.identification, _identification(seq).to_json(), qos=1)
        for seq in range(20)
    ]
    for info in infos:
        info.wait_for_publish(timeout=5)

    got: dict[str, list[int]] = {"collector-0": [], "collector-1": []}
    for _ in range(20):
        client_id, msg = inbox.get(timeout=5)
        got[client_id].append(Identification.from_json(msg.payload).seq)
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.3)
    assert sorted(got["collector-0"] + got["collector-1"]) == list(range(20))
    assert got["collector-0"], "the broker gave every message to one collector"
    assert got["collector-1"], "the broker gave every message to one collector"


@pytest.mark.mqtt
def test_killed_device_leaves_retained_offline_status(
    mosquitto: Broker, clients: list[mqtt.Client]
) -> None:
    """The will registered from ``last_will()`` reaches collectors after a ``kill -9``."""
    script = textwrap.dedent(
        f"""
        import sys, time
        import paho.mqtt.client as mqtt
        from fieldscope.edge.topics import DeviceStatus, Topics
        topics = Topics("fieldscope", "pond-3", "scope-a")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="doomed")
        c.will_set(*topics.last_will())
        c.connect("{mosquitto.host}", {mosquitto.port})
        c.loop_start()
        spec = topics.spec("status")
        online = DeviceStatus.ONLINE.value
        c.publish(topics.status, online, spec.qos, spec.retain).wait_for_publish(5)
        print("online", flush=True)
        time.sleep(60)
        """
    )
    device = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert device.stdout is not None
        assert device.stdout.readline() == b"online\n", (
            device.stderr.read() if device.stderr else ""
        )
        subs = subscription_filters("fieldscope", kinds=[TopicKind.STATUS])
        inbox = _subscribe(mosquitto, "collector", subs, clients)
        _, first = inbox.get(timeout=5)
        assert (first.topic, first.payload, bool(first.retain)) == (TOPICS.status, b"online", True)
        device.kill()
        device.wait(timeout=5)
        _, will = inbox.get(timeout=5)
        assert (will.topic, will.payload) == (TOPICS.status, b"offline")
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(timeout=5)
        for stream in (device.stdout, device.stderr):
            if stream is not None:
                stream.close()

    # A collector that starts later still learns the device is offline.
    late = _subscribe(mosquitto, "late-collector", subs, clients)
    _, msg = late.get(timeout=5)
    assert (msg.payload, bool(msg.retain)) == (b"offline", True)


def test_image_topics_are_named_by_their_sha256_and_parse_back() -> None:
    digest = "ab" * 32
    topic = TOPICS.image(digest)
    assert topic == f"{TOPICS.base}/image/{digest}"
    assert parse(topic, "fieldscope") == ("pond-3", "scope-a", TopicKind.IMAGE, digest)
    spec = TOPIC_SPECS[TopicKind.IMAGE]
    assert (spec.qos, spec.retain, spec.inbound) == (1, False, False)
    assert TopicKind.IMAGE not in COLLECTED_KINDS  # only a collector that keeps images
    (images,) = subscription_filters("fieldscope", kinds=[TopicKind.IMAGE])
    assert images.filter == "fieldscope/+/+/image/+"
    assert mqtt.topic_matches_sub(images.filter, topic)
    with pytest.raises(TopicError, match="image sha256 must be 64 lower-case hex digits"):
        TOPICS.image("AB" * 32)
    with pytest.raises(TopicError, match="needs the image's sha256"):
        TOPICS.topic(TopicKind.IMAGE)
    with pytest.raises(TopicError, match="image sha256 must be 64 lower-case hex"):
        parse(f"{TOPICS.base}/image/nothex", "fieldscope")
    with pytest.raises(TopicError, match="does not fit the scheme"):
        parse(f"{TOPICS.base}/image", "fieldscope")
