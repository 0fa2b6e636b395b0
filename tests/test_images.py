"""Images reach the collector (issue 18, item 2): the station publishes the bounded image
of the identifications its ``[upload]`` policy chooses on ``…/image/<sha256>`` from its
own durable queue; the collector checks and keeps them content-addressed; the
dashboard shows them with no copying by hand.

The broker, the daemon, the collector and the dashboard are the real ones (a
mosquitto stopped and started again on the same port for the outage).
"""

from __future__ import annotations

import hashlib
import random
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import cv2
import msgspec
import numpy as np
import pytest
from conftest import (
    EDGE_PREFIX,
    Broker,
    MqttRecorder,
    SpecimenImages,
    TinyBundles,
    start_mosquitto,
    stop_mosquitto,
)
from helpers import mqtt_client, wait_for
from test_daemon import running, write_config

from fieldscope.cli.main import main
from fieldscope.collect.images import ImageStore, image_kind
from fieldscope.collect.records import decode
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import IdentificationRow, open_store
from fieldscope.collect.subscriber import Collector, CollectorSettings
from fieldscope.collect.web import Dashboard, DashboardSettings
from fieldscope.collect.web.files import image_file, shows_image
from fieldscope.edge.broker import BrokerSettings
from fieldscope.edge.capture import Frame
from fieldscope.edge.config import UploadConfig
from fieldscope.edge.link import MqttLink
from fieldscope.edge.message import Identification
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.topics import Topics
from fieldscope.edge.uploads import ImageUploads, bounded_image

TOPICS = Topics(EDGE_PREFIX, "pond-3", "scope-a")


def noisy(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image[:, :, ::-1])
    assert ok
    return bytes(buffer.tobytes())


# --- the station's side: bounds and policy ----------------------------------------------------


def test_an_image_is_shrunk_and_re_encoded_until_it_fits_and_a_fitting_file_goes_unchanged() -> (
    None
):
    image = noisy(600, 900)
    cfg = UploadConfig(max_side=128, max_bytes=16_384, format="jpg")
    data = bounded_image(image, png(image), cfg)
    assert data is not None
    assert image_kind(data) == "jpg"
    assert len(data) <= 16_384
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert max(decoded.shape[:2]) <= 128
    assert decoded.shape[1] > decoded.shape[0]  # the aspect ratio is kept
    small = noisy(40, 30)
    original = png(small)
    roomy = UploadConfig(max_side=64, max_bytes=1 << 20, format="jpg")
    assert bounded_image(small, original, roomy) == original  # the very file
    as_png = bounded_image(small, None, UploadConfig(max_side=20, format="png"))
    assert as_png is not None
    assert image_kind(as_png) == "png"


def test_the_policy_chooses_uncertain_all_or_a_random_share(tmp_path: Path) -> None:
    opened: list[ImageUploads] = []

    def uploads(policy: str, **more: float) -> ImageUploads:
        cfg = UploadConfig(policy=policy, max_side=64, **more)  # type: ignore[arg-type]
        queue = Outbox(tmp_path / f"queue-{len(opened)}.sqlite")
        opened.append(ImageUploads(cfg, queue, TOPICS, rng=random.Random(7).random))
        return opened[-1]

    try:
        only = uploads("uncertain")
        assert only.chooses("uncertain")
        assert not only.chooses("ok")
        assert not only.chooses("rejected")
        everything = uploads("all")
        assert all(everything.chooses(s) for s in ("ok", "uncertain", "rejected"))
        share = uploads("percent", percent=25.0)
        chosen = sum(share.chooses("ok") for _ in range(2000))
        assert 400 < chosen < 600
        encoded = png(noisy(32, 32))
        frame = Frame(noisy(32, 32), "incoming/x.png", datetime.now(UTC), encoded=encoded)
        digest = everything.publish(frame, "ok")
        assert digest == hashlib.sha256(encoded).hexdigest()
        (entry,) = everything.queue.pending(10)
        assert (entry.topic, entry.payload, entry.qos) == (TOPICS.image(digest), encoded, 1)
        assert only.publish(frame, "ok") is None
        assert only.queue.depth() == 0
        assert everything.problem() is None
        broken = uploads("all")
        broken.queue.close()  # a queue that cannot store: the image is lost, and said so
        assert broken.publish(frame, "ok") is None
        assert broken.failed == 1
        assert "1 image(s) could not be queued" in (broken.problem() or "")
    finally:
        for each in opened:
            each.close()


# --- the collector's store ---------------------------------------------------------------------


def test_the_store_keeps_good_images_by_hash_and_refuses_bad_ones(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", max_bytes=50_000)
    good = png(noisy(20, 20))
    digest = hashlib.sha256(good).hexdigest()
    assert store.receive(TOPICS.image(digest), good, EDGE_PREFIX)
    kept = store.find(digest)
    assert kept == tmp_path / "images" / digest[:2] / digest[2:4] / f"{digest}.png"
    assert kept.read_bytes() == good
    assert store.receive(TOPICS.image(digest), good, EDGE_PREFIX)  # a repeat
    other = hashlib.sha256(b"other").hexdigest()
    big = png(noisy(300, 300))
    assert len(big) > 50_000
    assert store.receive(TOPICS.image(other), good, EDGE_PREFIX)  # refused, but done with
    assert store.receive(TOPICS.image(hashlib.sha256(big).hexdigest()), big, EDGE_PREFIX)
    text = b"not an image"
    assert store.receive(TOPICS.image(hashlib.sha256(text).hexdigest()), text, EDGE_PREFIX)
    assert store.receive(TOPICS.identification, good, EDGE_PREFIX)
    assert (store.counts.stored, store.counts.duplicates) == (1, 1)
    assert dict(store.counts.refused) == {
        "sha256 mismatch": 1,
        "oversize": 1,
        "format": 1,
        "topic": 1,
    }
    assert store.find(other) is None
    files = [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
    assert files == [kept]  # no temporary files left, nothing refused kept


def test_a_failed_image_write_is_retried_until_the_folder_takes_it(tmp_path: Path) -> None:
    """The broker would not send an unacknowledged image again before a reconnect, so a
    write that fails (here: a file where the shard folder belongs) is retried; a stopping
    collector gives up, leaving it unacknowledged for the next run."""
    store = ImageStore(tmp_path / "images")
    good = png(noisy(20, 20))
    digest = hashlib.sha256(good).hexdigest()
    blocker = tmp_path / "images" / digest[:2]
    blocker.write_bytes(b"in the way")
    stopping = threading.Event()
    assert not store.receive(TOPICS.image(digest), good, EDGE_PREFIX)
    stopping.set()
    assert not store.keep(TOPICS.image(digest), good, EDGE_PREFIX, stopping)
    stopping.clear()
    threading.Timer(0.8, blocker.unlink).start()
    assert store.keep(TOPICS.image(digest), good, EDGE_PREFIX, stopping)
    assert store.find(digest) is not None
    assert store.counts.failed >= 3
    assert store.counts.stored == 1


def test_leftovers_go_and_the_window_shrinks_with_the_image_limit(tmp_path: Path) -> None:
    from fieldscope.collect.images import receive_window

    shard = tmp_path / "images" / "ab" / "cd"
    shard.mkdir(parents=True)
    leftover = shard / f".{'ab' * 32}.jpg.0123.tmp"
    leftover.write_bytes(b"half an image")
    store = ImageStore(tmp_path / "images")
    assert not leftover.exists()
    assert receive_window(None, 5000) == 5000
    assert receive_window(store, 5000) == 64  # 1 GiB of 16 MiB images
    assert receive_window(ImageStore(tmp_path / "small", max_bytes=100_000), 5000) == 5000
    assert receive_window(ImageStore(tmp_path / "huge", max_bytes=1 << 30), 5000) == 16


def test_the_image_lane_hands_paho_a_few_images_at_a_time(tmp_path: Path) -> None:
    """paho keeps every handed-over message in memory until its PUBACK: after an outage a
    backlog of large images must not all be handed over at once."""
    from fieldscope.edge.link_lane import IMAGES_IN_FLIGHT, Lane

    queue = Outbox(tmp_path / "images.sqlite")
    try:
        identifications, images = Lane(queue), Lane(queue, IMAGES_IN_FLIGHT)
        assert identifications.room(100) == 100
        images.in_flight = set(range(IMAGES_IN_FLIGHT))
        assert (images.room(100), images.waiting) == (0, True)
        assert images.acknowledged(0) is True  # the link fills the lane again
        assert (images.room(100), images.acknowledged(1)) == (1, False)
    finally:
        queue.close()


def test_a_damaged_image_queue_is_set_aside_and_never_stops_the_station(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fieldscope.edge.uploads import QUEUE_FILE, open_uploads

    cfg = UploadConfig(policy="all")
    damaged = tmp_path / QUEUE_FILE
    damaged.write_bytes(b"this is not SQLite " * 100)
    uploads = open_uploads(cfg, tmp_path, TOPICS)
    assert uploads is not None  # a fresh queue in its place
    uploads.close()
    (aside,) = tmp_path.glob(f"{QUEUE_FILE}.bad-*")
    assert aside.read_bytes().startswith(b"this is not SQLite")
    blocked = tmp_path / "file"
    blocked.write_text("a file where the data folder should be")
    with caplog.at_level("ERROR", logger="fieldscope.edge"):
        assert open_uploads(cfg, blocked, TOPICS) is None
    assert "images are not uploaded" in caplog.text


# --- station to collector through a real broker ------------------------------------------------


@pytest.fixture
def kept(tmp_path: Path) -> tuple[Path, ImageStore]:
    return tmp_path / "collect.sqlite", ImageStore(tmp_path / "kept")


def collector_for(broker: Broker, db: Path, images: ImageStore, client_id: str) -> Collector:
    settings = CollectorSettings(
        broker=BrokerSettings(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            prefix=EDGE_PREFIX,  # the test stations' prefix
            reconnect_backoff_s=(1.0, 1.0),
        )
    )
    collector = Collector(settings, open_store(str(db)), images)
    collector.start()
    assert collector.wait_subscribed(10)
    return collector


@pytest.mark.mqtt
def test_images_stored_during_a_broker_outage_reach_the_collector_and_the_dashboard(
    tmp_path: Path,
    kept: tuple[Path, ImageStore],
    tiny_bundles: TinyBundles,
    specimen_images: SpecimenImages,
) -> None:
    db, images = kept
    broker = start_mosquitto(tmp_path / "broker")
    collector = collector_for(broker, db, images, "collector-images")
    try:
        stop_mosquitto(broker)  # the outage: the collector's session stays at the broker
        files = specimen_images.copy(tmp_path / "images", 5)
        cfg = write_config(
            tmp_path,
            broker,
            tiny_bundles.v1,
            upload={"policy": "all", "max_side": 64, "max_bytes": "64 kB"},
        )
        with running(cfg) as daemon:
            uploads = daemon.station.uploads
            assert uploads is not None
            wait_for(
                lambda: (
                    daemon.station.outbox.depth() == len(files)
                    and uploads.queue.depth() == len(files)
                ),
                what="every identification and image queued while the broker is down",
            )
            broker = start_mosquitto(tmp_path / "broker", port=broker.port)
            wait_for(
                lambda: collector.stats.stored == len(files) and images.counts.stored == len(files),
                timeout=40,
                what="identifications and images at the collector after the outage",
            )
            wait_for(lambda: uploads.queue.depth() == 0, what="every image acknowledged")
    finally:
        collector.stop()
        collector.store.close()
        stop_mosquitto(broker)
    with open_store(str(db), create=False) as store:
        rows = list(store.iter_identifications())
        assert store.gaps() == []  # images use their own queue: no hole in seq
    assert sorted(r.source_name or "" for r in rows) == sorted(p.name for p in files)
    for row in rows:
        path = images.find(row.upload_sha256)
        assert path is not None, row
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.upload_sha256
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert max(decoded.shape[:2]) <= 64  # bounded by the station's [upload]
        assert len(data) <= 64_000
    assert images.counts.refused == {}
    shown_without_copying(db, images.root, rows)


def fetch(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def shown_without_copying(db: Path, folder: Path, rows: list[IdentificationRow]) -> None:
    """The dashboard, given only the collector's image folder, shows every row's image
    (thumbnail and review size) and links it from the identifications table."""
    dashboard = Dashboard(DashboardSettings(db_url=str(db), port=0, images=folder))
    host, port = dashboard.start()
    url = f"http://{host}:{port}"
    try:
        status, page, _ = fetch(url + "/identifications")
        assert status == 200
        for row in rows:
            assert f"/thumb/{row.id}".encode() in page
            for path in (f"/thumb/{row.id}", f"/preview/{row.id}"):
                status, body, kind = fetch(url + path)
                assert (status, kind) == (200, "image/jpeg"), path
                decoded = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
                assert decoded is not None
                assert decoded.shape[0] > 0
        status, _, _ = fetch(url + "/thumb/999999")
        assert status == 404
    finally:
        dashboard.stop()


@pytest.mark.mqtt
def test_a_bad_hash_or_an_oversize_image_is_refused_and_counted_never_kept(
    mosquitto: Broker, kept: tuple[Path, ImageStore]
) -> None:
    db = kept[0]
    images = ImageStore(kept[1].root, max_bytes=40_000)
    collector = collector_for(mosquitto, db, images, "collector-refuses")
    good = png(noisy(16, 16))
    big = png(noisy(200, 200))
    wrong = hashlib.sha256(b"something else").hexdigest()
    try:
        with mqtt_client(mosquitto.host, mosquitto.port, "scope-a") as client:
            sent = [
                client.publish(TOPICS.image(wrong), good, qos=1),
                client.publish(TOPICS.image(hashlib.sha256(big).hexdigest()), big, qos=1),
                client.publish(TOPICS.image(hashlib.sha256(good).hexdigest()), good, qos=1),
            ]
            for info in sent:
                info.wait_for_publish(10)
            wait_for(lambda: images.counts.stored == 1, what="the good image kept")
            wait_for(lambda: sum(images.counts.refused.values()) == 2, what="two refused")
        assert collector.connected
    finally:
        collector.stop()
        collector.store.close()
    assert dict(images.counts.refused) == {"sha256 mismatch": 1, "oversize": 1}
    assert images.find(wrong) is None
    assert images.find(hashlib.sha256(big).hexdigest()) is None
    assert images.find(hashlib.sha256(good).hexdigest()) is not None


def test_collect_run_refuses_an_image_folder_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    db = tmp_path / "collect.sqlite"
    args = ["collect", "run", "--broker", "127.0.0.1:1", "--db", str(db), "--images", str(taken)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--images" in err
    assert str(taken) in err
    assert not db.exists()  # refused before anything was opened


def test_the_dashboard_looks_in_the_image_store_first_then_in_the_archive(tmp_path: Path) -> None:
    store_dir, archive = tmp_path / "images", tmp_path / "archive"
    images = ImageStore(store_dir)
    arrived = png(noisy(8, 8))
    digest = hashlib.sha256(arrived).hexdigest()
    assert images.receive(TOPICS.image(digest), arrived, EDGE_PREFIX)
    late = hashlib.sha256(b"not here yet").hexdigest()
    kept = archive / "pond-3" / "scope-a" / "2026-11-23" / "b.png"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(png(noisy(8, 8, seed=1)))
    messages = [
        sample_identification(1, archived_path="/data/archive/2026-11-23/a.png"),
        sample_identification(2, archived_path="/data/archive/2026-11-23/b.png"),
        sample_identification(3),
    ]
    uploads = [digest, late, late]
    with open_store(str(tmp_path / "collect.sqlite")) as store:
        store.write(
            [
                decode(TOPICS.identification, with_upload(m, u).to_json(), EDGE_PREFIX)
                for m, u in zip(messages, uploads, strict=True)
            ]
        )
        rows = sorted(store.iter_identifications(), key=lambda r: r.seq)
    both = DashboardSettings(db_url="x", images=store_dir, archive=archive)
    assert image_file(both, rows[0]) == images.find(digest)  # the store first
    assert image_file(both, rows[1]) == kept.resolve()  # not arrived: the archive copy
    assert image_file(both, rows[2]) == "The uploaded image has not arrived yet."
    assert all(shows_image(both, r) for r in rows)
    archive_only = DashboardSettings(db_url="x", archive=archive)
    assert not shows_image(archive_only, rows[2])
    assert shows_image(DashboardSettings(db_url="x", images=store_dir), rows[2])


def with_upload(message: Identification, sha256: str) -> Identification:
    image = msgspec.structs.replace(message.image, upload_sha256=sha256, source_name="a.png")
    return msgspec.structs.replace(message, image=image)


@pytest.mark.mqtt
def test_the_link_sends_identifications_before_images_and_deletes_both_once_acknowledged(
    mosquitto: Broker, tmp_path: Path
) -> None:
    recorder = MqttRecorder(mosquitto)
    outbox, queue = Outbox(tmp_path / "outbox.sqlite"), Outbox(tmp_path / "images.sqlite")
    stop = threading.Event()
    link = MqttLink(
        BrokerSettings(
            host=mosquitto.host, port=mosquitto.port, client_id="fieldscope-link", max_in_flight=4
        ),
        TOPICS,
        outbox,
        on_command=lambda _name, _payload: None,
        retained_model=lambda: None,
        stop=stop,
        images=queue,
    )
    # The images are older, yet the identifications go first: they never wait for images.
    for i in range(6):
        data = f"image {i}".encode()
        queue.add(TOPICS.image(hashlib.sha256(data).hexdigest()), lambda _seq, d=data: d)
    for _ in range(6):
        outbox.add(TOPICS.identification, lambda seq: str(seq).encode())
    link.start()
    try:
        wait_for(lambda: outbox.depth() == 0 and queue.depth() == 0, what="both queues sent")
        assert recorder.wait_for(
            lambda r: (
                sum("/image/" in t or t == TOPICS.identification for t, _, _ in r.messages) == 12
            )
        )
        order = [
            "image" if "/image/" in t else "identification"
            for t, _, _ in recorder.messages
            if "/image/" in t or t == TOPICS.identification
        ]
        assert order == ["identification"] * 6 + ["image"] * 6
        assert link.health().acknowledged == 12
    finally:
        stop.set()
        link.stop_clean(2.0)
        outbox.close()
        queue.close()
        recorder.close()
