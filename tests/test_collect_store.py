"""The collector's store on real SQLite files and a real PostgreSQL server.

The PostgreSQL server is a throw-away cluster made with ``initdb`` and started with
``pg_ctl`` in a temporary folder on a free port (as the ``postgres`` user when the
tests run as root); those tests are skipped, saying why, only when no server can
be started (``apt-get install -y postgresql``).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from helpers import SAMPLE, SITE, received

from fieldscope.collect.records import (
    DeviceHeartbeat,
    DeviceModel,
    DeviceStatusChange,
    Invalid,
    StoredIdentification,
    decode,
)
from fieldscope.collect.samples import (
    demo_model,
    sample_heartbeat,
    sample_identification,
    sample_model_info,
)
from fieldscope.collect.store import Filters, IdentificationRow, Store, StoreError, open_store
from fieldscope.edge.message import Identification
from fieldscope.edge.site import Sample, Site
from fieldscope.edge.topics import DeviceStatus, Topics

PREFIX = "fieldscope"


def topics(device: str = "scope-a", station: str = "pond-3") -> Topics:
    return Topics(PREFIX, station, device)


# --- a real PostgreSQL server --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL cluster of its own; yields a URL of its maintenance database."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql); .ci/run does")
    bindir = bins[-1].parent
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
    work = Path(tempfile.mkdtemp(prefix="fieldscope-pg-"))
    data = work / "data"
    data.mkdir()
    if user is not None:
        for path in (work, data):
            os.chown(path, user.pw_uid, user.pw_gid)
    work.chmod(0o700)
    port = _free_port()
    run_as = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid}
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    started = False
    try:
        result = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "fieldscope", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, env=env, check=False, **run_as,
        )  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"initdb failed, no PostgreSQL for these tests: {result.stderr[-500:]}")
        options = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(work / "log"), "-o", options,
             "-w", "-t", "30", "start"],
            capture_output=True, text=True, env=env, check=False, **run_as,
        )  # fmt: skip
        if result.returncode != 0:
            log = (work / "log").read_text() if (work / "log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {result.stderr[-300:]} {log[-500:]}")
        started = True
        yield f"postgresql://fieldscope@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True, env=env, check=False, **run_as,
            )  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A fresh, empty database on the test server (one per test keeps them apart)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "collect.sqlite")
    server = request.getfixturevalue("postgres_server")
    return new_database(server)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    try:
        yield s
    finally:
        s.close()


# --- decoding received messages (pure) --------------------------------------------------------


def test_decode_keeps_every_kind_of_bad_message_with_a_reason() -> None:
    good = sample_identification(1)
    assert isinstance(received(good), StoredIdentification)

    bad_json = received(good, b"{not json")
    assert isinstance(bad_json, Invalid)
    assert "not JSON" in bad_json.reason
    assert bad_json.payload == b"{not json"

    wrong_score = good.to_json().replace(b'"score":0.91', b'"score":1.7', 1)
    invalid = received(good, wrong_score)
    assert isinstance(invalid, Invalid)
    assert "score" in invalid.reason

    # A station that publishes under another device's topic is kept apart, not stored.
    spoofed = decode(topics("scope-b").identification, good.to_json(), PREFIX)
    assert isinstance(spoofed, Invalid)
    assert "does not match the topic's device" in spoofed.reason

    outside = decode("elsewhere/pond-3/scope-a/identification", good.to_json(), PREFIX)
    assert isinstance(outside, Invalid)
    assert "outside the scheme" in outside.reason
    assert outside.kind is None

    status = decode(topics().status, b"sleeping", PREFIX)
    assert isinstance(status, Invalid)
    assert "online" in status.reason

    heartbeat = decode(topics().heartbeat, b'{"version": 1}', PREFIX)
    assert isinstance(heartbeat, Invalid)
    assert heartbeat.kind == "heartbeat"

    huge = received(good, b"x" * 300_000)
    assert isinstance(huge, Invalid)
    assert len(huge.payload) == 256 * 1024
    assert "cut to" in huge.reason


def test_decode_device_payloads() -> None:
    t = topics()
    online = decode(t.status, b"online", PREFIX)
    assert isinstance(online, DeviceStatusChange)
    assert online.status is DeviceStatus.ONLINE
    cleared = decode(t.status, b"", PREFIX)
    assert isinstance(cleared, DeviceStatusChange)
    assert cleared.status is None
    hb = decode(t.heartbeat, sample_heartbeat(outbox_depth=7).to_json(), PREFIX)
    assert isinstance(hb, DeviceHeartbeat)
    assert hb.heartbeat.outbox_depth == 7
    model = decode(t.model, sample_model_info().to_json(), PREFIX)
    assert isinstance(model, DeviceModel)
    assert model.info is not None


# --- the store, on both databases --------------------------------------------------------------


def test_duplicates_are_stored_once(store: Store) -> None:
    messages = [sample_identification(seq) for seq in range(10)]
    first = store.write([received(m) for m in messages])
    assert (first.stored, first.duplicates) == (10, 0)
    # A QoS-1 redelivery or an outbox replay: same messages again, also within one batch.
    again = store.write([received(m) for m in messages[:5] + messages[:5]])
    assert (again.stored, again.duplicates, again.invalid) == (0, 10, 0)
    assert store.count() == 10
    rows = list(store.iter_identifications())
    assert [r.seq for r in rows] == list(range(10))
    assert rows[3].label == "Paramecium"
    assert rows[3].top_k[0] == ("Paramecium", 0.91)
    assert rows[3].captured_at == messages[3].captured_at


def test_same_seq_with_other_content_is_kept_as_invalid(store: Store) -> None:
    original = sample_identification(5, label="Euglena")
    store.write([received(original)])
    # The station's outbox was wiped: seq 5 comes again, now meaning another capture.
    reused = sample_identification(5, label="Amoeba", captured_at=datetime(2027, 1, 1, tzinfo=UTC))
    result = store.write([received(reused)])
    assert (result.stored, result.duplicates, result.conflicts, result.invalid) == (0, 0, 1, 1)
    (row,) = store.identifications()
    assert row.label == "Euglena"  # the first one stays
    (kept,) = store.invalid_messages()
    assert "already stored with other content" in kept.reason
    assert kept.payload == reused.to_json()


def test_same_content_in_other_bytes_is_a_duplicate(store: Store) -> None:
    message = sample_identification(1)
    store.write([received(message)])
    import json

    reordered = json.dumps(message.to_dict(), indent=2).encode()  # other bytes, same message
    result = store.write([received(message, reordered)])
    assert (result.duplicates, result.conflicts) == (1, 0)


def test_invalid_messages_are_kept_with_topic_payload_and_reason(store: Store) -> None:
    good = sample_identification(1)
    bad = received(good, b'{"version": 99}')
    result = store.write([bad, received(good)])
    assert (result.stored, result.invalid) == (1, 1)
    (row,) = store.invalid_messages()
    assert row.topic == topics().identification
    assert row.payload == b'{"version": 99}'
    assert "version 99 is not supported" in row.reason
    assert row.kind == "identification"
    assert store.count_invalid() == 1


def test_device_table_follows_status_heartbeat_and_model(store: Store) -> None:
    t = topics()
    store.write(
        [
            decode(t.status, b"online", PREFIX),
            decode(t.heartbeat, sample_heartbeat(outbox_depth=3).to_json(), PREFIX),
            decode(t.model, sample_model_info().to_json(), PREFIX),
        ]
    )
    (device,) = store.devices()
    assert (device.device, device.station, device.status) == ("scope-a", "pond-3", "online")
    assert device.outbox_depth == 3
    assert device.model_name == demo_model().name
    assert device.heartbeat is not None
    assert device.heartbeat["fps"] == 0.5
    assert device.model_info is not None
    assert device.model_info["threshold"] == 0.6
    store.write([decode(t.status, b"offline", PREFIX)])
    (device,) = store.devices()
    assert device.status == "offline"
    assert device.outbox_depth == 3  # a status change keeps what the heartbeat said


def test_filters_and_label_counts(store: Store) -> None:
    base = datetime(2026, 11, 20, tzinfo=UTC)
    messages = [
        sample_identification(0, device="a", station="s1", label="Amoeba", captured_at=base),
        sample_identification(1, device="a", station="s1", label="Euglena",
                              captured_at=base + timedelta(hours=1)),
        sample_identification(0, device="b", station="s2", label="Amoeba",
                              captured_at=base + timedelta(days=1)),
        sample_identification(1, device="b", station="s2", label=None, score=0.4,
                              captured_at=base + timedelta(days=1, hours=2)),
    ]  # fmt: skip
    store.write([received(m) for m in messages])
    assert store.count(Filters(stations=("s1",))) == 2
    assert store.count(Filters(labels=("Amoeba",))) == 2
    assert store.count(Filters(statuses=("uncertain",))) == 1
    assert store.count(Filters(since=base + timedelta(hours=1))) == 3
    assert store.count(Filters(until=base + timedelta(hours=1))) == 1
    assert store.count(Filters(devices=("b",), labels=("Amoeba",))) == 1
    days = store.label_counts(bucket="day")
    assert days == [
        (base, "Amoeba", 1),
        (base, "Euglena", 1),
        (base + timedelta(days=1), "(uncertain)", 1),
        (base + timedelta(days=1), "Amoeba", 1),
    ]
    hours = store.label_counts(Filters(stations=("s1",)), bucket="hour")
    assert [(h, n) for h, _, n in hours] == [(base, 1), (base + timedelta(hours=1), 1)]
    assert store.distinct("label") == ["Amoeba", "Euglena"]
    assert store.time_range() == (base, base + timedelta(days=1, hours=2))
    assert store.device_activity()["b"] == (2, base + timedelta(days=1, hours=2))


def test_score_bounds_keyset_pages_and_group_counts(store: Store) -> None:
    """What the dashboard's API asks of both databases."""
    base = datetime(2026, 11, 20, 23, 0, tzinfo=UTC)
    messages = [
        sample_identification(
            seq,
            device="ab"[seq % 2],
            label="XY"[seq % 3 == 0],
            score=0.5 + seq * 0.05,
            captured_at=base + timedelta(minutes=20 * seq),
        )
        for seq in range(6)
    ]
    # Two captures at the same instant: the id breaks the tie, so no row is skipped.
    messages.append(sample_identification(6, device="a", captured_at=base, score=0.99))
    store.write([received(m) for m in messages])
    assert store.count(Filters(min_score=0.6, max_score=0.7)) == 3  # 0.6, 0.65, 0.7
    assert store.count(Filters(min_score=0.99)) == 1
    pages: list[list[int]] = []
    before = None
    while True:
        rows = store.identifications(limit=3, before=before)
        if not rows:
            break
        pages.append([r.seq for r in rows])
        before = (rows[-1].captured_at, rows[-1].id)
    assert pages == [[5, 4, 3], [2, 1, 6], [0]]  # newest first; the tie by id, descending
    assert store.group_counts(by="device") == [("a", 4), ("b", 3)]
    assert store.group_counts(Filters(devices=("b",)), by="label") == [("X", 2), ("Y", 1)]
    assert store.group_counts(by="day") == [("2026-11-20", 4), ("2026-11-21", 3)]
    with pytest.raises(StoreError, match="by label, device or day"):
        store.group_counts(by="week")


def test_iteration_reads_in_chunks_in_capture_order(store: Store) -> None:
    messages = [sample_identification(seq) for seq in range(25)]
    store.write([received(m) for m in reversed(messages)])
    seqs = [r.seq for r in store.iter_identifications(chunk=4)]
    assert seqs == list(range(25))


# --- SQLite specifics -----------------------------------------------------------------------------


def test_sqlite_is_in_wal_mode_and_readers_need_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with pytest.raises(StoreError, match="no collector database"):
        open_store(str(path), create=False)
    with open_store(f"sqlite:///{path}") as store:
        assert store._query("PRAGMA journal_mode")[0][0] == "wal"
        store.write([received(sample_identification(1))])
    with open_store(str(path), create=False) as reader:
        assert reader.count() == 1
        with pytest.raises(StoreError, match="cannot write"):
            reader.write([received(sample_identification(2))])
    not_ours = tmp_path / "other.sqlite"
    import sqlite3

    sqlite3.connect(not_ours).execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(StoreError, match="not a fieldscope collector database"):
        open_store(str(not_ours), create=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x/y", "unknown database scheme"),
        ("", "must be a file path"),
        ("sqlite://", "names no file"),
    ],
)
def test_bad_database_urls_give_one_clear_error(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(url)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    open_store(str(path)).close()
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("UPDATE fieldscope_schema SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(str(path))


def test_postgres_unreachable_is_one_clear_error() -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(StoreError, match="cannot connect") as info:
        open_store(f"postgresql://someone:secret@127.0.0.1:{port}/x")
    assert "secret" not in str(info.value)


def test_seq_gaps_per_device_in_both_databases(store: Store) -> None:
    """Issue 15 item 9: identifications lost on the way show as gaps in each device's
    seq (the window query is the same SQL in SQLite and PostgreSQL)."""
    base = 1_800_000_000_000
    seqs = {"scope-a": [0, 1, 4, 5, 9], "scope-b": [2, 3]}
    store.write(
        [
            received(
                sample_identification(
                    base + s, device=d, captured_at=datetime(2026, 12, 7, tzinfo=UTC)
                )
            )
            for d, offsets in seqs.items()
            for s in offsets
        ]
    )
    gaps = store.gaps()
    assert [(g.device, g.first - base, g.last - base, g.missing) for g in gaps] == [
        ("scope-a", 2, 3, 2),
        ("scope-a", 6, 8, 3),
    ]
    assert store.missing_counts() == {"scope-a": 5}
    assert store.gaps(["scope-b"]) == []
    assert store.max_seq("scope-a") == base + 9


# --- a segmenting station's objects ---------------------------------------------------------


def test_objects_are_stored_with_their_measurements_and_frame_counts(store: Store) -> None:
    from fieldscope.collect.samples import sample_objects

    objects = sample_objects(10, 3)
    empty = sample_objects(20, 0)
    frame = sample_identification(30)
    result = store.write([received(m) for m in [*objects, *empty, frame]])
    assert result.stored == 5
    rows = {r.seq: r for r in store.iter_identifications()}
    second = rows[11]
    assert second.frame_id == objects[0].image.sha256
    assert (second.object_index, second.object_count) == (1, 3)
    assert (second.bbox_x, second.bbox_y, second.bbox_width, second.bbox_height) == (40, 30, 31, 31)
    assert rows[10].touches_border is True
    assert second.touches_border is False
    assert second.area_px == 707
    assert second.area_um2 == pytest.approx(1590.75)
    assert second.esd_um == pytest.approx(45.0045)
    assert (second.eccentricity, second.solidity, second.mean_intensity) == (0.574, 0.97, 81.0)
    assert (second.objects_found, second.objects_kept, second.objects_rejected_by_size) == (5, 3, 2)
    # The frame without objects: counted as a frame of the sample, with its counts.
    nothing = rows[20]
    assert nothing.status == "rejected"
    assert nothing.frame_id == empty[0].image.sha256
    assert nothing.object_index is None
    assert nothing.objects_kept == 0
    # A one-frame station's row has no object fields.
    assert rows[30].frame_id is None
    assert rows[30].area_um2 is None
    assert rows[30].objects_found is None


def _execute(db_url: str, statements: Sequence[str]) -> None:
    """Run ``statements`` on the SQLite file or PostgreSQL database behind the store."""
    if db_url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
        return
    import sqlite3

    conn = sqlite3.connect(db_url)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _older_row(db_url: str, statements: Sequence[str]) -> IdentificationRow:
    """One identification stored, then the database made older by ``statements`` (what
    an earlier collector left); the row as a reader, which migrates nothing, sees it."""
    with open_store(db_url) as store:
        store.write([received(sample_identification(1))])
    _execute(db_url, statements)
    with open_store(db_url, create=False) as reader:
        (old,) = list(reader.iter_identifications())
    return old


def test_an_older_database_is_read_as_it_is_and_migrated_by_a_writer(db_url: str) -> None:
    from fieldscope.collect.samples import sample_objects
    from fieldscope.collect.store.object_columns import OBJECT_COLUMNS

    # What a collector before the object columns left; read by a reader (an export,
    # the dashboard), which does not change the database: nulls.
    old = _older_row(
        db_url, [f"ALTER TABLE identifications DROP COLUMN {name}" for name in OBJECT_COLUMNS]
    )
    assert old.seq == 1
    assert old.area_um2 is None
    # The next collector adds the columns; the old row stays, objects are stored.
    with open_store(db_url) as store:
        assert store.write([received(m) for m in sample_objects(2, 2)]).stored == 2
        rows = {r.seq: r for r in store.iter_identifications()}
    assert sorted(rows) == [1, 2, 3]
    assert rows[1].esd_um is None
    assert rows[3].object_index == 1
    assert rows[3].esd_um is not None
    with open_store(db_url) as again:  # idempotent: a second writer adds nothing
        assert again.count() == 3


# --- counts and sizes of objects (the dashboard's Objects page) ------------------------------


def _fill_objects(store: Store) -> list[Identification]:
    """pond-3/scope-a: a frame of 3 objects (Amoeba ESD 30 µm, Euglena 45, Amoeba 60) and
    a frame without objects; river-1/scope-b: a frame of 2 (Euglena 30 and 45); and a
    one-frame-one-specimen identification, which is no object."""
    from fieldscope.collect.samples import sample_objects

    messages = [
        *sample_objects(0, 3, labels=("Amoeba", "Euglena")),
        *sample_objects(10, 0),
        *sample_objects(20, 2, device="scope-b", station="river-1", labels=("Euglena",)),
        sample_identification(40),
    ]
    assert store.write([received(m) for m in messages]).stored == 7
    return messages


def test_object_counts_per_label_frames_and_objects_per_frame(store: Store) -> None:
    assert store.has_objects() is False
    assert store.object_summary() == []
    messages = _fill_objects(store)
    assert store.has_objects() is True
    (whole,) = store.object_summary()
    assert whole.key == {}
    assert (whole.frames, whole.frames_without_objects, whole.objects) == (3, 1, 5)
    assert whole.objects_per_frame == pytest.approx(5 / 3, abs=1e-4)
    # Each frame's counts once, however many object messages carry them.
    assert (whole.rejected_by_size, whole.touching_border, whole.truncated) == (6, 2, 0)
    euglena, amoeba = whole.labels
    assert (euglena.label, euglena.objects, amoeba.label, amoeba.objects) == (
        "Euglena", 3, "Amoeba", 2,
    )  # fmt: skip
    assert euglena.per_frame == pytest.approx(1.0)
    assert (euglena.esd_min_um, euglena.esd_max_um) == pytest.approx((29.99, 45.0), abs=0.02)
    assert amoeba.esd_mean_um == pytest.approx(45.0, abs=0.02)

    pond, river = store.object_summary(by=["station", "device"])
    assert pond.key == {"station": "pond-3", "device": "scope-a"}
    assert (pond.frames, pond.frames_without_objects, pond.objects) == (2, 1, 3)
    assert river.key == {"station": "river-1", "device": "scope-b"}
    assert (river.frames, river.objects, [x.label for x in river.labels]) == (1, 2, ["Euglena"])

    # A label narrows the objects, not the frames; a time range narrows both.
    (only,) = store.object_summary(Filters(labels=("Euglena",)))
    assert (only.frames, only.objects, only.objects_per_frame) == (3, 3, 1.0)
    since = messages[4].captured_at  # the first of scope-b's frame
    (late,) = store.object_summary(Filters(since=since))
    assert (late.frames, late.objects) == (1, 2)
    assert store.object_summary(Filters(devices=("nobody",))) == []
    with pytest.raises(StoreError, match="group by station, device, sample, not 'site'"):
        store.object_summary(by=["site"])


def test_size_distribution_per_label_on_shared_edges(store: Store) -> None:
    from fieldscope.collect.store import size_edges

    assert store.size_distribution().objects == 0
    _fill_objects(store)
    sizes = store.size_distribution(bins=3)
    assert (sizes.scale, sizes.edges_um, sizes.objects) == ("linear", [20.0, 40.0, 60.0, 80.0], 5)
    assert [(s.label, s.counts) for s in sizes.labels] == [
        ("Euglena", [1, 2, 0]),
        ("Amoeba", [1, 0, 1]),
    ]
    (amoeba,) = store.size_distribution(Filters(labels=("Amoeba",)), bins=3).labels
    assert (amoeba.label, amoeba.objects) == ("Amoeba", 2)
    log = store.size_distribution(bins=3, scale="log")
    assert log.scale == "log"
    assert sum(sum(s.counts) for s in log.labels) == 5
    # Sizes over a tenfold range or more are binned on a log scale.
    scale, edges = size_edges(8.0, 400.0, 10)
    assert scale == "log"
    assert edges[0] <= 8.0
    assert edges[-1] >= 400.0
    ratios = [b / a for a, b in itertools.pairwise(edges[1:-1])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-3)
    assert size_edges(30.0, 60.0, 3) == ("linear", [30.0, 40.0, 50.0, 60.0])


# --- site and sample -----------------------------------------------------------------------------


def placed(seq: int, site: Site | None = SITE, sample: Sample | None = SAMPLE) -> Identification:
    return msgspec.structs.replace(sample_identification(seq), site=site, sample=sample)


def test_site_and_sample_are_stored_as_columns(store: Store) -> None:
    sent = [placed(1), placed(2, sample=None), sample_identification(3)]
    assert store.write([received(m) for m in sent]).stored == 3
    rows = {r.seq: r for r in store.iter_identifications()}
    first = rows[1]
    assert (first.site_name, first.decimal_latitude, first.decimal_longitude) == (
        "Etang de Thau, pontoon 3",
        43.4167,
        3.6,
    )
    assert (first.geodetic_datum, first.coordinate_uncertainty_m) == ("WGS84", 30.0)
    assert (first.depth_m, first.elevation_m, first.country_code) == (1.5, None, "FR")
    assert first.locality == "Bouzigues"
    assert (first.sample_id, first.sample_started_at) == ("thau-a", "2026-11-23T17:00:00.000000Z")
    assert (first.sample_volume_l, first.sample_operator) == (2.5, "A. Martin")
    assert first.sample_notes == "net 20 µm"
    assert (rows[2].decimal_latitude, rows[2].sample_id) == (43.4167, None)
    assert (rows[3].site_name, rows[3].sample_id, rows[3].depth_m) == (None, None, None)


def test_a_database_without_site_columns_is_read_and_migrated(db_url: str) -> None:
    from fieldscope.collect.store.site_columns import SITE_COLUMNS

    # What a collector before the site and sample columns left.
    old = _older_row(
        db_url,
        [
            "DROP INDEX IF EXISTS identifications_sample",
            *(f"ALTER TABLE identifications DROP COLUMN {name}" for name in SITE_COLUMNS),
        ],
    )
    assert (old.seq, old.sample_id, old.decimal_latitude) == (1, None, None)
    with open_store(db_url) as store:
        assert store.write([received(placed(2))]).stored == 1
        rows = {r.seq: r for r in store.iter_identifications()}
    assert rows[1].sample_id is None
    assert (rows[2].sample_id, rows[2].depth_m) == ("thau-a", 1.5)
    with open_store(db_url) as again:
        assert again.count() == 2


def test_objects_per_sample_and_the_sample_filter(store: Store) -> None:
    """A sample's counts and sizes are one filter or group away; objects taken between
    samples group under ''."""
    from fieldscope.collect.samples import sample_objects

    other = msgspec.structs.replace(SAMPLE, id="thau-b")
    messages = [
        *(msgspec.structs.replace(m, sample=SAMPLE) for m in sample_objects(0, 3)),
        *(msgspec.structs.replace(m, sample=other) for m in sample_objects(10, 2)),
        *(msgspec.structs.replace(m, sample=other) for m in sample_objects(20, 0)),
        *sample_objects(30, 1),
    ]
    assert store.write([received(m) for m in messages]).stored == 7
    groups = {g.key["sample"]: g for g in store.object_summary(by=["sample"])}
    assert sorted(groups) == ["", "thau-a", "thau-b"]
    assert (groups["thau-a"].frames, groups["thau-a"].objects) == (1, 3)
    assert (groups["thau-b"].frames, groups["thau-b"].frames_without_objects) == (2, 1)
    assert groups["thau-b"].objects_per_frame == pytest.approx(1.0)
    assert (groups[""].frames, groups[""].objects) == (1, 1)
    (only,) = store.object_summary(Filters(samples=("thau-b",)))
    assert (only.frames, only.objects) == (2, 2)
    assert store.size_distribution(Filters(samples=("thau-a",))).objects == 3
    assert store.count(Filters(samples=("thau-a", "thau-b"))) == 6
    assert store.distinct("sample_id") == ["thau-a", "thau-b"]
