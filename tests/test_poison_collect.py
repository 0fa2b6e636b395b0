"""Poison inputs against the collector (issue 15): one bad message never stops it.

Every input is generated here (no committed binaries) and goes through a real
Mosquitto broker into a real collector and SQLite store. The collector must keep
storing valid messages after each poison one, keep the poison one apart with its
reason, and count it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from conftest import Broker
from helpers import (
    mqtt_client,
    publish_acknowledged,
    run_fieldscope,
    running_collector,
    wait_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldscope.collect.records import decode
from fieldscope.collect.samples import sample_heartbeat, sample_identification, sample_model_info
from fieldscope.collect.store import open_store
from fieldscope.collect.subscriber import BrokerSettings, Collector, CollectorSettings
from fieldscope.edge.topics import Topics

pytestmark = pytest.mark.mqtt

PREFIX = "fs"
TOPICS = Topics(PREFIX, "atk", "dev-a")
HUGE = "9" * 400  # an integer JSON number beyond any float: float(int) raises OverflowError


def _retained_poison_model() -> bytes:
    """The reproduction of issue 15 item 1, byte for byte."""
    return (
        '{"labels":["a","b"],"loaded_at":"2026-12-07T01:43:34.280300Z","model":{"name":"r1",'
        '"sha256":"' + "0" * 64 + '","version":"1"},"runtime":{"name":"x","version":"1"},'
        '"signed":true,"threshold":' + HUGE + ',"version":1}'
    ).encode()


def _with(payload: bytes, path: tuple[str, ...], raw: str) -> bytes:
    """``payload`` (JSON) with the value at ``path`` replaced by the raw JSON text ``raw``."""
    marker = "__POISON__"
    obj = json.loads(payload)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = marker
    return json.dumps(obj).replace(f'"{marker}"', raw).encode()


def poison_corpus() -> list[tuple[str, str, bytes]]:
    """(name, topic, payload): every payload here crashed or could crash a reader."""
    ident = _ident_payload(0)
    beat = sample_heartbeat().to_json()
    model = sample_model_info().to_json()
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("model threshold 400 digits", TOPICS.model, _retained_poison_model()),
        ("model threshold 5000 digits", TOPICS.model, _with(model, ("threshold",), "9" * 5000)),
        (
            "sharpness 400 digits",
            TOPICS.identification,
            _with(ident, ("quality", "sharpness"), HUGE),
        ),
        (
            "timings capture 400 digits",
            TOPICS.identification,
            _with(ident, ("timings_ms", "capture"), HUGE),
        ),
        ("score 400 digits", TOPICS.identification, _with(ident, ("score",), HUGE)),
        ("seq 400 digits", TOPICS.identification, _with(ident, ("seq",), HUGE)),
        ("seq beyond 64 bits", TOPICS.identification, _with(ident, ("seq",), str(2**70))),
        ("uptime 400 digits", TOPICS.heartbeat, _with(beat, ("uptime_s",), HUGE)),
        ("identification nested 100000 deep", TOPICS.identification, deep),
        ("heartbeat nested 100000 deep", TOPICS.heartbeat, deep),
        ("model nested 100000 deep", TOPICS.model, deep),
        ("not UTF-8", TOPICS.identification, b"\xff\xfe\xfd"),
        ("NaN literal", TOPICS.identification, _with(ident, ("score",), "NaN")),
        ("1e999", TOPICS.identification, _with(ident, ("score",), "1e999")),
        ("empty heartbeat", TOPICS.heartbeat, b""),
        ("a JSON string", TOPICS.identification, b'"just a string"'),
    ]


def _ident_payload(seq: int) -> bytes:
    when = datetime(2026, 12, 7, tzinfo=UTC) + timedelta(seconds=seq % 86_400)
    return sample_identification(seq, device="dev-a", station="atk", captured_at=when).to_json()


@pytest.mark.parametrize(("name", "topic", "payload"), poison_corpus(), ids=lambda v: str(v)[:40])
def test_decode_never_raises_on_the_corpus(name: str, topic: str, payload: bytes) -> None:
    """The intake's pure part: every poison payload becomes a record, never an exception."""
    record = decode(topic, payload, PREFIX)
    if name == "empty heartbeat":
        assert type(record).__name__ == "Invalid"
    assert record is not None


@pytest.fixture
def publisher(mosquitto: Broker) -> Iterator[mqtt.Client]:
    with mqtt_client(mosquitto.host, mosquitto.port, "attacker") as client:
        yield client


def _settings(host: str, port: int, client_id: str) -> CollectorSettings:
    """The settings of a collector that subscribes under this suite's topic prefix."""
    return CollectorSettings(
        broker=BrokerSettings(host=host, port=port, prefix=PREFIX, client_id=client_id)
    )


def test_a_poison_retained_model_message_does_not_stop_a_new_collector(
    mosquitto: Broker, publisher: mqtt.Client, tmp_path: Path
) -> None:
    """Issue 15 item 1: a retained model message with a 400-digit threshold killed even
    a brand-new collector; now it is kept apart and valid messages are stored."""
    publish_acknowledged(publisher, TOPICS.model, _retained_poison_model(), retain=True)
    db = tmp_path / "new.sqlite"
    with running_collector(db, _settings(mosquitto.host, mosquitto.port, "brand-new")) as collector:
        wait_for(lambda: collector.stats.invalid >= 1, what="the retained poison kept apart")
        for seq in range(5):
            publish_acknowledged(publisher, TOPICS.identification, _ident_payload(seq))
        wait_for(lambda: collector.stats.stored == 5, what="the valid identifications stored")
        assert collector._writer is not None
        assert collector._writer.is_alive()
    with open_store(str(db), create=False) as reader:
        assert sorted(r.seq for r in reader.iter_identifications()) == list(range(5))
        (kept,) = reader.invalid_messages()
        assert kept.topic == TOPICS.model
        assert kept.kind == "model"
        assert kept.payload == _retained_poison_model()
        # The bounded reader (edge/untrusted.py) names the 400-digit number; without it
        # the writer's survival path would have kept the OverflowError as the reason.
        assert "400 digits" in kept.reason or "OverflowError" in kept.reason


def test_the_whole_corpus_over_a_real_broker_leaves_the_collector_storing(
    mosquitto: Broker, publisher: mqtt.Client, tmp_path: Path
) -> None:
    """Each poison payload is followed by a valid identification: all valid ones are
    stored, every poison one is kept apart with a reason, and the writer lives."""
    corpus = poison_corpus()
    db = tmp_path / "collect.sqlite"
    with running_collector(db, _settings(mosquitto.host, mosquitto.port, "c-corpus")) as collector:
        for seq, (_name, topic, payload) in enumerate(corpus):
            publish_acknowledged(publisher, topic, payload, retain=topic == TOPICS.model)
            publish_acknowledged(publisher, TOPICS.identification, _ident_payload(seq))
        n = len(corpus)
        wait_for(lambda: collector.stats.stored == n, what=f"{n} valid identifications stored")
        wait_for(lambda: collector.stats.invalid >= n, what="every poison message kept apart")
        assert collector._writer is not None
        assert collector._writer.is_alive()
    with open_store(str(db), create=False) as reader:
        assert reader.count() == len(corpus)
        kept = reader.invalid_messages(limit=1000)
        assert len(kept) == len(corpus)
        assert all(r.reason for r in kept)
    # Clear the retained poison so it does not leak into another test on this broker.
    publish_acknowledged(publisher, TOPICS.model, b"", retain=True)


def test_a_value_the_database_cannot_hold_is_kept_apart_and_the_rest_stored(
    tmp_path: Path,
) -> None:
    """Defence in depth behind the readers: should a record ever carry a value SQLite
    cannot bind (an integer beyond 64 bits raises OverflowError in the driver), the
    batch is stored message by message and only that message is kept apart."""
    from fieldscope.collect.subscriber import _Received

    store = open_store(str(tmp_path / "c.sqlite"))
    collector = Collector(_settings("127.0.0.1", 1, "unit"), store)
    now = datetime.now(UTC)
    batch = [
        _Received(TOPICS.identification, _ident_payload(seq), 0, 0, 0, now) for seq in range(3)
    ]
    poison = _Received(TOPICS.identification, _ident_payload(99), 0, 0, 0, now)
    records = [collector._decode(m) for m in [*batch, poison]]
    # A reader that forgot a bound: the parsed message carries a 70-bit seq.
    msgspec.structs.force_setattr(records[-1].message, "seq", 2**70)  # type: ignore[union-attr]
    result = collector._write([*batch, poison], records)
    assert result.stored == 3
    assert result.invalid == 1
    assert collector.stats.poisoned == 1
    assert store.count() == 3
    (kept,) = store.invalid_messages()
    assert "OverflowError" in kept.reason
    assert kept.kind == "identification"
    store.close()


FORMULAS = ('=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "'=already quoted")


def test_exports_escape_labels_a_spreadsheet_would_run(tmp_path: Path) -> None:
    """Issue 15 item 10: a label ``=HYPERLINK(...)`` went unescaped into CSV and EcoTaxa.
    Now every text cell that a spreadsheet would take as a formula starts with a quote,
    and read_csv gives the original label back."""
    import csv

    from fieldscope.collect.export import export, read_csv

    db = tmp_path / "c.sqlite"
    with open_store(str(db)) as store:
        store.write(
            [
                decode(
                    TOPICS.identification,
                    sample_identification(
                        seq, device="dev-a", station="atk", label=label, labels=(label, "b", "c")
                    ).to_json(),
                    PREFIX,
                )
                for seq, label in enumerate(FORMULAS)
            ]
        )
        assert store.count() == len(FORMULAS)
        export(store, "csv", tmp_path / "out.csv")
        export(store, "ecotaxa", tmp_path / "out.tsv")
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as fh:
        cells = [cell for row in csv.reader(fh) for cell in row]
    for cell in cells:
        assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), cell
    assert sorted(r["label"] for r in read_csv(tmp_path / "out.csv")) == sorted(FORMULAS)
    lines = (tmp_path / "out.tsv").read_text(encoding="utf-8").splitlines()[2:]
    categories = [line.split("\t")[4] for line in lines]
    assert sorted(categories) == sorted("'" + f for f in FORMULAS)
    for line in lines:
        for cell in line.split("\t"):
            assert cell[:1] not in ("=", "+", "-", "@"), cell


# --- the dashboard -----------------------------------------------------------------------------


@pytest.fixture
def dashboard_url(tmp_path: Path) -> Iterator[str]:
    from fieldscope.collect.web import Dashboard, DashboardSettings

    db = tmp_path / "dash.sqlite"
    with open_store(str(db)) as store:
        store.write(
            [decode(TOPICS.identification, _ident_payload(seq), PREFIX) for seq in range(3)]
        )
    archive = tmp_path / "archive"
    archive.mkdir()
    dashboard = Dashboard(
        DashboardSettings(db_url=str(db), port=0, archive=archive, request_timeout_s=0.5)
    )
    host, port = dashboard.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        dashboard.stop()


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/identifications?page=" + "9" * 30, 400, "page must be a whole number"),
        ("/identifications?page=" + "9" * 5000, 400, "page must be a whole number"),
        ("/identifications?page=99999999999999999999", 400, "page must be a whole number"),
        ("/identifications?page=0", 400, "page must be a whole number"),
        ("/identifications?page=7", 404, "no page 7"),
        ("/identifications?page=1", 200, "dev-a"),
        ("/thumb/" + "9" * 30, 404, "No such thumbnail"),
        ("/thumb/9223372036854775808", 404, "No such thumbnail"),
        ("/thumb/" + "9" * 5000, 404, "No such thumbnail"),
        ("/thumb/%C2%B2", 404, "No such thumbnail"),
    ],
    ids=lambda v: str(v)[:50],
)
def test_dashboard_answers_huge_numbers_with_a_clear_4xx(
    dashboard_url: str, path: str, status: int, says: str
) -> None:
    """Issue 15 item 11: ``?page=<huge>`` and ``/thumb/<huge>`` answered 500."""
    got, page = _get(dashboard_url + path)
    assert got == status, page[:500]
    assert says in page


def test_stalled_uploads_are_disconnected_and_free_their_threads(dashboard_url: str) -> None:
    """Issue 15 item 11: 300 stalled uploads held 305 threads with no timeout. Now a
    client that stops sending is disconnected after request_timeout_s."""
    import socket
    import threading
    from urllib.parse import urlsplit

    address = urlsplit(dashboard_url)
    host, port = address.hostname, address.port
    assert host is not None
    assert port is not None
    before = threading.active_count()
    clients = []
    for _ in range(20):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )
        clients.append(s)
    # A slowloris that never finishes its request line, too.
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET /ident")
    clients.append(s)
    started = time.monotonic()
    for s in clients:
        s.settimeout(10)
        try:
            rest = s.recv(65536)
            while rest:
                rest = s.recv(65536)
        except ConnectionResetError:
            pass  # closed by the server: what is wanted
        s.close()
    assert time.monotonic() - started < 8
    wait_for(lambda: threading.active_count() <= before, 10, "the handler threads to end")
    assert _get(dashboard_url + "/healthz")[0] == 200


# --- item 9: loss at the broker is detected and reported ---------------------------------------


def test_a_broker_killed_with_an_offline_collectors_queue_shows_as_a_seq_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 item 9: with the collector offline, a broker SIGKILL lost the queued
    identifications of its persistent session and nothing noticed. Now the gap in the
    device's seq is logged when the next one arrives, counted per device in the store,
    shown on the dashboard and listed by ``fieldscope collect gaps``."""
    import logging
    import signal

    from conftest import start_mosquitto, stop_mosquitto

    from fieldscope.collect.web import Dashboard, DashboardSettings

    workdir = tmp_path / "mosquitto"
    broker = start_mosquitto(workdir)
    db = tmp_path / "collect.sqlite"
    base = 1_800_000_000_000  # a station's first seq is its clock in milliseconds

    collector_settings = _settings(broker.host, broker.port, "c-gaps")
    try:
        with mqtt_client(broker.host, broker.port, "dev-a") as pub:
            publish_acknowledged(pub, TOPICS.status, b"online", retain=True)
            with running_collector(db, collector_settings) as first:
                for seq in range(base, base + 10):
                    publish_acknowledged(pub, TOPICS.identification, _ident_payload(seq))
                wait_for(lambda: first.stats.stored == 10, what="the first ten stored")
            # The collector is offline; the broker keeps its session and queues for it.
            for seq in range(base + 10, base + 40):
                publish_acknowledged(pub, TOPICS.identification, _ident_payload(seq))
        broker.process.send_signal(signal.SIGKILL)  # the queue of 30 dies with it
        broker.process.wait(10)
        broker = start_mosquitto(workdir, broker.port)
        with (
            mqtt_client(broker.host, broker.port, "dev-a") as pub,
            caplog.at_level(logging.WARNING, logger="fieldscope.collect.subscriber"),
        ):
            publish_acknowledged(pub, TOPICS.status, b"online", retain=True)
            # The session died with the broker: the collector subscribes afresh, and
            # the station goes on with its next seq.
            with running_collector(db, collector_settings) as second:
                for seq in range(base + 40, base + 50):
                    publish_acknowledged(pub, TOPICS.identification, _ident_payload(seq))
                wait_for(lambda: second.stats.stored == 10, what="the last ten stored")
    finally:
        stop_mosquitto(broker)
    assert second.stats.gaps == 1
    assert second.stats.missing == 30
    assert f"skipped seq {base + 10}..{base + 39} (30 identifications missing)" in caplog.text
    with open_store(str(db), create=False) as reader:
        assert reader.count() == 20
        (gap,) = reader.gaps()
        assert (gap.device, gap.first, gap.last, gap.missing) == ("dev-a", base + 10, base + 39, 30)
        assert reader.missing_counts() == {"dev-a": 30}
    dashboard = Dashboard(DashboardSettings(db_url=str(db), port=0))
    host, port = dashboard.start()
    try:
        status, page = _get(f"http://{host}:{port}/")
    finally:
        dashboard.stop()
    assert status == 200
    assert 'data-missing="30"' in page
    assert f"seq {base + 10}..{base + 39}" in page
    cli = run_fieldscope("collect", "gaps", "--db", str(db), timeout=60)
    assert cli.returncode == 1, cli.stderr
    assert f"atk/dev-a: seq {base + 10}..{base + 39} missing (30)" in cli.stdout


def test_a_gap_closes_when_the_missing_arrive_late_and_a_new_outbox_is_no_gap(
    tmp_path: Path,
) -> None:
    base = 1_800_000_000_000
    with open_store(str(tmp_path / "g.sqlite")) as store:

        def put(*seqs: int) -> None:
            store.write([decode(TOPICS.identification, _ident_payload(s), PREFIX) for s in seqs])

        put(base, base + 1, base + 5)
        assert [(g.first, g.last) for g in store.gaps()] == [(base + 2, base + 4)]
        put(base + 3)
        assert [(g.first, g.last) for g in store.gaps()] == [
            (base + 2, base + 2),
            (base + 4, base + 4),
        ]
        put(base + 2, base + 4)
        assert store.gaps() == []
        # A station whose outbox was replaced starts again at its clock in milliseconds.
        put(base + 86_400_000)
        assert store.gaps() == []
        assert store.missing_counts() == {}


# --- fuzzing the intake: numbers of any size, any nesting ------------------------------------

_NUMBER_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("identification", ("seq",)),
    ("identification", ("score",)),
    ("identification", ("quality", "sharpness")),
    ("identification", ("timings_ms", "capture")),
    ("identification", ("image", "width")),
    ("heartbeat", ("uptime_s",)),
    ("heartbeat", ("fps",)),
    ("heartbeat", ("outbox", "depth")),
    ("model", ("threshold",)),
)


def _number_text() -> st.SearchStrategy[str]:
    digits = st.text("0123456789", min_size=1, max_size=5000)
    return st.one_of(
        st.integers().map(str),
        digits.map(lambda d: d.lstrip("0") or "0"),
        digits.map(lambda d: "-" + (d.lstrip("0") or "0")),
        st.tuples(digits, st.integers(-100_000, 100_000)).map(lambda t: f"1.{t[0]}e{t[1]}"),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "0.0"]),
    )


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(_NUMBER_FIELDS), raw=_number_text())
def test_fuzz_decode_numbers_of_any_size_never_raise(
    field: tuple[str, tuple[str, ...]], raw: str
) -> None:
    kind, path = field
    payloads = {
        "identification": (TOPICS.identification, _ident_payload(0)),
        "heartbeat": (TOPICS.heartbeat, sample_heartbeat().to_json()),
        "model": (TOPICS.model, sample_model_info().to_json()),
    }
    topic, payload = payloads[kind]
    record = decode(topic, _with(payload, path, raw), PREFIX)
    assert record is not None


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(1, 200_000),
    opener=st.sampled_from([("[", "]"), ('{"a":', "}")]),
    topic=st.sampled_from([TOPICS.identification, TOPICS.heartbeat, TOPICS.model]),
)
def test_fuzz_decode_deep_nesting_never_raises(
    depth: int, opener: tuple[str, str], topic: str
) -> None:
    start, end = opener
    payload = (start * depth + "1" + end * depth).encode()
    record = decode(topic, payload, PREFIX)
    assert record is not None
