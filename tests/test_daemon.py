"""The edge daemon against a real mosquitto: identifications, retained state, heartbeats,
commands and model swaps, with real bundles of the tiny colour model and real images.

The daemon runs in a thread of the test process here (its parts are real: outbox,
interpreter, link); tests/test_daemon_faults.py runs it as a separate process to
kill it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    EDGE_PREFIX,
    Broker,
    MqttRecorder,
    SpecimenImages,
    TinyBundles,
    retained_value,
    toml_document,
)
from jsonschema import Draft202012Validator

from fieldscope.edge.capture import CameraError, Frame
from fieldscope.edge.config import EdgeConfig, load_config
from fieldscope.edge.daemon import STATE_FILE_NAME, Daemon
from fieldscope.edge.daemon_cli import station_status
from fieldscope.edge.health import CameraState, CommandReply, Heartbeat, ModelInfo
from fieldscope.edge.message import Identification, schema_path
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.preprocess import decode_image
from fieldscope.edge.systemd import Notifier
from fieldscope.edge.topics import Topics

pytestmark = pytest.mark.mqtt

TOPICS = Topics(EDGE_PREFIX, "pond-3", "scope-a")


# --- helpers ---------------------------------------------------------------------------------


def point(link: Path, target: Path) -> None:
    """Re-point the ``current`` symlink atomically, as a deployment does."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def write_config(
    tmp_path: Path, broker: Broker, bundle: Path, **tables: dict[str, Any]
) -> EdgeConfig:
    """An edge.toml for a replay station (tables override or extend the defaults)."""
    (tmp_path / "bundles").mkdir(exist_ok=True)
    point(tmp_path / "bundles" / "current", bundle)
    sections: dict[str, dict[str, Any]] = {
        "device": {"station": "pond-3", "id": "scope-a", "data_dir": "data"},
        "camera": {
            "backend": "replay",
            "trigger": "continuous",
            "max_rate_hz": 0,
            "reopen_backoff_s": [0.2, 0.5],
        },
        "camera.replay": {"path": "images", "rate_hz": 0},
        "model": {"bundle": "bundles/current"},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "prefix": EDGE_PREFIX,
            "keepalive": 5,
            "reconnect_backoff_s": [1, 1],
        },
        "heartbeat": {"interval_s": 1},
    }
    for name, values in tables.items():
        sections.setdefault(name.replace("__", "."), {}).update(values)
    path = tmp_path / "edge.toml"
    path.write_text(toml_document(sections))
    return load_config(path)


@contextlib.contextmanager
def running(cfg: EdgeConfig, **kwargs: Any) -> Iterator[Daemon]:
    """Run a daemon in a thread; stop it cleanly at the end and check it exited 0."""
    daemon = Daemon(cfg, **kwargs)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["rc"] = daemon.run()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="test-daemon")
    thread.start()
    try:
        started = daemon.started.wait(30)
        if not started:
            thread.join(5)
        assert started, f"the daemon did not start: {outcome.get('error')!r}"
        yield daemon
    finally:
        daemon.request_stop()
        thread.join(20)
    assert not thread.is_alive(), "the daemon did not stop within 20 s"
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["rc"] == 0


def identifications(recorder: MqttRecorder) -> list[Identification]:
    return [Identification.from_json(p) for p in recorder.on(TOPICS.identification)]


def heartbeats(recorder: MqttRecorder) -> list[Heartbeat]:
    return [Heartbeat.from_json(p) for p in recorder.on(TOPICS.heartbeat)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(recorder: MqttRecorder, name: str, payload: bytes = b"") -> CommandReply:
    """Send a command and wait for its (next) reply."""
    topic = TOPICS.command_result(name)
    before = recorder.count(topic)
    recorder.client.publish(TOPICS.command(name), payload, qos=1).wait_for_publish(5)
    assert recorder.wait_for(lambda r: r.count(topic) > before), f"no reply to {name}"
    return CommandReply.from_json(recorder.on(topic)[before])


def refusal(recorder: MqttRecorder, name: str, payload: bytes, says: str) -> CommandReply:
    """Send a command the station must refuse; its error reply must say ``says``."""
    reply = command(recorder, name, payload)
    assert not reply.ok, reply
    assert says in (reply.error or ""), reply.error
    return reply


@dataclass(frozen=True)
class Site:
    """A test station's surroundings: its folder, the broker, a recording subscriber,
    the bundles and the specimen images."""

    tmp: Path
    broker: Broker
    recorder: MqttRecorder
    bundles: TinyBundles
    images: SpecimenImages

    def config(self, bundle: Path | None = None, **tables: dict[str, Any]) -> EdgeConfig:
        return write_config(self.tmp, self.broker, bundle or self.bundles.v1, **tables)

    def folder_config(self) -> EdgeConfig:
        """A station watching ``incoming/`` with the folder camera, as a microscope's
        capture software fills it: handled files move to ``done/`` or ``failed/``."""
        return self.config(
            camera={"backend": "folder"},
            camera__folder={
                "path": "incoming",
                "settle_s": 0.1,
                "scan_interval_s": 0.05,
                "handled": "move",
            },
        )


@pytest.fixture
def site(
    tmp_path: Path,
    mosquitto: Broker,
    tiny_bundles: TinyBundles,
    specimen_images: SpecimenImages,
) -> Iterator[Site]:
    recorder = MqttRecorder(mosquitto)
    yield Site(tmp_path, mosquitto, recorder, tiny_bundles, specimen_images)
    recorder.close()


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(schema_path().read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


# --- a replay station from start to stop ------------------------------------------------------


def test_one_valid_identification_per_image_with_status_model_and_heartbeats(
    site: Site, validator: Draft202012Validator
) -> None:
    images = site.images.copy(site.tmp / "images", 6, blurred=True)
    cfg = site.config(archive={"mode": "all"})
    clock_ms = time.time() * 1000
    with running(cfg) as daemon:
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) >= len(images))
        assert retained_value(site.broker, TOPICS.status) == b"online"
        model = ModelInfo.from_json(retained_value(site.broker, TOPICS.model) or b"")
        assert (model.model.name, model.model.version) == ("tiny-colour", "1")
        assert model.labels == site.bundles.labels
        # Heartbeats come every second and end up counting every frame.
        assert site.recorder.wait_for(
            lambda r: any(
                h.frames.seen == len(images) and h.outbox_depth == 0 for h in heartbeats(r)
            )
        )
        # While it runs, `fieldscope edge status` reads the state file (the outbox is locked).
        status = station_status(cfg.source or Path())
        assert status["running"] is True
        assert status["model"]["version"] == "1"
        assert daemon.station.outbox.depth() == 0

    messages = identifications(site.recorder)
    assert len(messages) == len(images)  # one per image: nothing repeated, nothing lost
    for raw in site.recorder.on(TOPICS.identification):
        validator.validate(json.loads(raw))
    by_image = {m.image.sha256: m for m in messages}
    assert set(by_image) == {sha256(p) for p in images}
    blurred = by_image[sha256(images[-1])]
    assert blurred.status == "rejected"
    assert blurred.reason is not None
    assert "too blurry" in blurred.reason
    assert blurred.quality is not None
    assert blurred.quality.sharpness is not None
    assert blurred.quality.sharpness < 0.5
    assert all(m.status in ("ok", "uncertain") for m in messages if m is not blurred)
    assert all(m.model.sha256 == model.model.sha256 for m in messages)
    assert all((m.width, m.height) == (96, 96) for m in (x.image for x in messages))
    # Archived byte for byte under the archive folder, so the file's hash is the message's.
    for m in messages:
        assert m.image.archived_path is not None
        archived = Path(m.image.archived_path)
        assert archived.is_relative_to(cfg.archive.dir)
        assert sha256(archived) == m.image.sha256
    # seq: consecutive, and a new outbox starts at the wall clock in ms (no reuse after
    # a re-flash).
    seqs = sorted(m.seq for m in messages)
    assert seqs == list(range(seqs[0], seqs[0] + len(images)))
    assert clock_ms - 1 <= seqs[0] <= time.time() * 1000
    # A clean stop leaves the retained status "stopped" and an empty outbox.
    assert retained_value(site.broker, TOPICS.status) == b"stopped"
    state = json.loads((cfg.device.data_dir / STATE_FILE_NAME).read_text())
    assert state["state"] == "stopped"
    after = station_status(cfg.source or Path())
    assert after["running"] is False
    assert after["outbox"]["depth"] == 0
    assert after["outbox"]["next_seq"] == seqs[-1] + 1


def test_a_running_daemon_logs_a_summary_and_the_end_of_its_replay(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A station that works was silent until it stopped: now a line every
    log.summary_interval_s, and one when the replay is over."""
    images = site.images.copy(site.tmp / "images", 3)
    cfg = site.config(log={"summary_interval_s": 1})
    caplog.set_level(logging.INFO, logger="fieldscope.edge")

    def logged(fragment: str) -> bool:
        return any(fragment in r.getMessage() for r in caplog.records)

    with running(cfg):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not logged(f"running: {len(images)} frames"):
            time.sleep(0.1)
    assert logged(f"replay finished after {len(images)} frame(s) (the end of its 3 file(s))")
    line = next(
        r.getMessage() for r in caplog.records if f"running: {len(images)} frames" in r.getMessage()
    )
    assert re.search(r"\(\d+ ok, \d+ uncertain, \d+ rejected, 0 failed\)", line), line
    assert "outbox 0 waiting; broker connected; camera " in line
    # Said once, however often the finished camera is asked for another frame.
    assert sum("replay finished" in r.getMessage() for r in caplog.records) == 1


# --- commands ----------------------------------------------------------------------------------


def test_each_command_gets_its_reply_and_a_bad_one_changes_nothing(site: Site) -> None:
    site.images.copy(site.tmp / "images", 4)
    cfg = site.config(
        camera={"trigger": "command"},
        heartbeat={"interval_s": 60},
    )
    with running(cfg) as daemon:
        assert daemon.station.link.wait_online(10)
        # Nothing is captured until asked.
        assert site.recorder.count(TOPICS.identification) == 0
        reply = command(site.recorder, "capture", b'{"request_id": "r-1", "count": 2}')
        assert (reply.ok, reply.request_id, reply.data) == (
            True,
            "r-1",
            {"requested": 2, "queued": 2},
        )
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 2)

        reply = command(site.recorder, "pause")
        assert (reply.ok, reply.data) == (True, {"paused": True})
        refused = refusal(site.recorder, "capture", b'{"request_id": "r-2"}', "paused")
        assert refused.request_id == "r-2"

        # Malformed and unknown commands get an error reply and change nothing.
        refusal(site.recorder, "resume", b"{not json", "not valid JSON")
        assert daemon.station.pipeline.paused  # still paused
        unknown = refusal(site.recorder, "format-disk", b'{"request_id": "r-3"}', "unknown command")
        assert unknown.request_id == "r-3"
        refusal(site.recorder, "capture", b'{"count": 1000}', "count")

        status = command(site.recorder, "status", b'{"request_id": "s"}')
        assert status.ok
        assert status.data is not None
        assert status.data["paused"] is True
        assert status.data["frames"]["seen"] == 2
        assert status.data["model"]["version"] == "1"

        assert command(site.recorder, "resume").data == {"paused": False}
        assert command(site.recorder, "capture").ok
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 3)
    assert site.recorder.count(TOPICS.identification) == 3


def test_every_identification_carries_the_site_and_the_sample_command_survives_a_restart(
    site: Site, validator: Draft202012Validator
) -> None:
    site.images.copy(site.tmp / "images", 4)
    cfg = site.config(
        camera={"trigger": "command"},
        heartbeat={"interval_s": 60},
        site={"decimal_latitude": 43.4167, "decimal_longitude": 3.6, "depth_m": 1.5},
        sample={"id": "from-config", "volume_l": 1.0},
    )

    def capture_one() -> Identification:
        before = site.recorder.count(TOPICS.identification)
        assert command(site.recorder, "capture").ok
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) > before)
        payload = site.recorder.on(TOPICS.identification)[before]
        validator.validate(json.loads(payload))
        return Identification.from_json(payload)

    with running(cfg) as daemon:
        assert daemon.station.link.wait_online(10)
        first = capture_one()
        assert first.site is not None
        assert (first.site.decimal_latitude, first.site.geodetic_datum) == (43.4167, "WGS84")
        assert first.sample is not None
        assert (first.sample.id, first.sample.volume_l) == ("from-config", 1.0)
        start = b'{"request_id": "s1", "action": "start", "id": "thau-a", "operator": "A. M."}'
        reply = command(site.recorder, "sample", start)
        assert (reply.ok, reply.request_id) == (True, "s1")
        assert reply.data is not None
        assert reply.data["ended"]["id"] == "from-config"
        refusal(site.recorder, "sample", b'{"action": "start"}', "action 'start' needs id")
        refusal(site.recorder, "sample", start, "sample 'thau-a' is already running")
        second = capture_one()
        assert second.sample is not None
        assert (second.sample.id, second.sample.operator) == ("thau-a", "A. M.")
    # A restart keeps the sample the command started, not the configured one.
    with running(cfg) as daemon:
        assert daemon.station.link.wait_online(10)
        assert capture_one().sample == second.sample
        assert command(site.recorder, "sample", b'{"action": "end"}').ok
        refusal(site.recorder, "sample", b'{"action": "end"}', "no sample is running")
        third = capture_one()
        assert (third.sample, third.site) == (None, first.site)
        assert command(site.recorder, "sample").data == {"sample": None}


# --- model swaps ------------------------------------------------------------------------------


def test_a_new_bundle_is_swapped_between_frames_and_a_bad_one_is_refused(site: Site) -> None:
    site.images.copy(site.tmp / "images", 4)
    cfg = site.config(camera__replay={"rate_hz": 20, "loop": True})
    current = site.tmp / "bundles" / "current"

    def versions(r: MqttRecorder) -> list[str]:
        return [Identification.from_json(p).model.version for p in r.on(TOPICS.identification)]

    with running(cfg) as daemon:
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) >= 3)
        # A deployment re-points the symlink: the daemon notices and swaps by itself.
        point(current, site.bundles.v2)
        assert site.recorder.wait_for(lambda r: versions(r)[-3:] == ["2", "2", "2"], timeout=15)
        seen = versions(site.recorder)
        switch = seen.index("2")
        assert set(seen[:switch]) == {"1"}  # every frame is entirely one model's
        assert set(seen[switch:]) == {"2"}
        info = ModelInfo.from_json(retained_value(site.broker, TOPICS.model) or b"")
        assert info.model.version == "2"

        # A damaged bundle is refused with the reason; version 2 keeps serving.
        point(current, site.bundles.damaged)
        reply = refusal(site.recorder, "reload", b'{"request_id": "deploy-3"}', "checksum mismatch")
        assert reply.request_id == "deploy-3"
        assert reply.data is not None
        assert reply.data["model"]["version"] == "2"
        assert reply.data["swapped"] is False
        n = site.recorder.count(TOPICS.identification)
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) >= n + 3)
        assert set(versions(site.recorder)[n:]) == {"2"}
        assert site.recorder.wait_for(
            lambda r: any("checksum mismatch" in w for h in heartbeats(r) for w in h.warnings)
        )
        assert (
            ModelInfo.from_json(retained_value(site.broker, TOPICS.model) or b"").model.version
            == "2"
        )

        # Back to a good bundle with the reload command.
        point(current, site.bundles.v1)
        reply = command(site.recorder, "reload")
        assert reply.ok
        assert reply.data is not None
        assert reply.data["model"]["version"] == "1"
        assert daemon.station.slot.refused is None


# --- faults that must not stop the station --------------------------------------------------


class FlakyCamera:
    """A camera (the Camera protocol) whose device fails: opening fails ``open_failures``
    times, then it delivers frames but every read after ``fail_after`` frames fails
    until ``repaired`` is set — like a USB microscope that is unplugged and back."""

    def __init__(self, images: list[Path], open_failures: int, fail_after: int) -> None:
        self.name = "flaky-usb"
        self.finished = False
        self._images = [(p, p.read_bytes()) for p in images]
        self._open_failures = open_failures
        self._fail_after = fail_after
        self.repaired = threading.Event()
        self.opens = 0
        self.reads = 0
        self._stop = threading.Event()

    def open(self) -> None:
        self.opens += 1
        if self.opens <= self._open_failures:
            raise CameraError(f"{self.name}: no such device /dev/video0")

    def read(self, timeout: float) -> Frame | None:
        if self.reads >= self._fail_after and not self.repaired.is_set():
            raise CameraError(f"{self.name}: the device stopped delivering frames (unplugged?)")
        if self.reads >= len(self._images):
            self._stop.wait(timeout)
            return None
        path, data = self._images[self.reads]
        self.reads += 1
        return Frame(decode_image(data), str(path), datetime.now(UTC), data)

    def close(self) -> None:
        pass


def test_a_failing_camera_is_reopened_and_its_outage_reported(site: Site) -> None:
    images = site.images.copy(site.tmp / "images", 4)
    camera = FlakyCamera(images, open_failures=2, fail_after=2)
    cfg = site.config()
    with running(cfg, camera=camera) as daemon:
        # Two frames, then the device goes away: the daemon keeps running and says so.
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 2)
        assert site.recorder.wait_for(
            lambda r: any(
                h.camera_state is CameraState.OUTAGE
                and "stopped delivering frames" in (h.camera_outage or "")
                for h in heartbeats(r)
            )
        )
        assert daemon.station.supervisor.outage is not None
        camera.repaired.set()
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 4)
        assert site.recorder.wait_for(
            lambda r: any("camera: back" in w for h in heartbeats(r) for w in h.warnings)
        )
        assert site.recorder.wait_for(
            lambda r: heartbeats(r)[-1:] != [] and heartbeats(r)[-1].camera_state is CameraState.OK
        )
    assert camera.opens >= 4  # 2 failed opens, the first good one, the reopen after the outage


def test_corrupt_and_unreadable_files_in_a_watched_folder_are_reported_and_skipped(
    site: Site,
) -> None:
    incoming = site.tmp / "incoming"
    good = site.images.copy(incoming, 3)
    late = site.images.sharp[10]
    expected = {sha256(p) for p in [*good, late]}  # before the files are moved to done/
    (incoming / "half-written.png").write_bytes(good[0].read_bytes()[:300])
    unreadable = incoming / "unreadable.png"
    if os.geteuid() == 0:
        # Root reads any mode: a file whose read fails with EIO (a dying SD card) instead.
        unreadable.symlink_to("/proc/self/mem")
    else:
        unreadable.write_bytes(good[1].read_bytes())
        unreadable.chmod(0)
    cfg = site.folder_config()
    with running(cfg):
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 3)
        assert site.recorder.wait_for(lambda r: any(h.frames.failed == 2 for h in heartbeats(r)))
        # Each problem is reported (once, in the next heartbeat) with the file's name.
        warnings = " ".join(w for h in heartbeats(site.recorder) for w in h.warnings)
        assert "half-written.png" in warnings
        assert "truncated PNG" in warnings
        assert "unreadable.png" in warnings
        # Still working: a new file is identified.
        (incoming / "late.png").write_bytes(late.read_bytes())
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 4)
    assert sorted(p.name for p in (incoming / "failed").iterdir()) == [
        "half-written.png",
        "unreadable.png",
    ]
    assert len(list((incoming / "done").iterdir())) == 4
    shas = {m.image.sha256 for m in identifications(site.recorder)}
    assert shas == expected


def test_a_file_stored_just_before_a_crash_is_not_identified_twice(site: Site) -> None:
    incoming = site.tmp / "incoming"
    files = site.images.copy(incoming, 3)
    shas = [sha256(p) for p in files]
    cfg = site.folder_config()
    # The state a kill -9 between the outbox commit and frame.done() leaves: the first
    # file's identification is in the outbox, but the folder camera never recorded it.
    st = files[0].stat()
    with Outbox(cfg.outbox.path) as outbox:
        stored = outbox.add(
            TOPICS.identification,
            lambda seq: json.dumps({"seq": seq, "file": files[0].name}).encode(),
            source_key=f"folder:{files[0].name}:{st.st_size}:{st.st_mtime_ns}",
        )
    with running(cfg):
        # The backlog message plus the two other files; the first file is not redone.
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) == 3)
        assert site.recorder.wait_for(lambda r: len(list((incoming / "done").glob("*.png"))) == 3)
        time.sleep(0.5)  # give a wrong second identification of files[0] time to show
    payloads = site.recorder.on(TOPICS.identification)
    assert json.loads(payloads[0]) == {"seq": stored.seq, "file": files[0].name}
    redone = [Identification.from_json(p) for p in payloads[1:]]
    assert {m.image.sha256 for m in redone} == set(shas[1:])
    assert [m.seq for m in redone] == [stored.seq + 1, stored.seq + 2]


class HangingCamera:
    """A camera with nothing to deliver (idle, healthy) whose driver can hang in a read."""

    name = "hanging-usb"
    finished = False

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Frame | None:
        if self.hang.is_set():
            self.release.wait(30)
            self.hang.clear()
        self.release.wait(min(timeout, 0.05))
        return None

    def close(self) -> None:
        self.release.set()


def test_the_watchdog_is_fed_while_idle_and_withheld_while_a_stage_hangs(site: Site) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(site.tmp / "notify"))
    listener.settimeout(0.05)
    camera = HangingCamera()
    notifier = Notifier(str(site.tmp / "notify"), watchdog_usec=100_000)  # ping every 50 ms

    def pings(seconds: float) -> int:
        deadline, n = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                n += listener.recv(100) == b"WATCHDOG=1"
        return n

    try:
        with running(site.config(), camera=camera, notifier=notifier, stall_limit_s=0.5):
            assert pings(0.5) >= 3  # nothing to capture, all healthy: fed
            camera.hang.set()
            pings(1.0)  # the stall limit passes
            assert pings(1.0) == 0  # stuck in a read: withheld, so systemd would restart it
            camera.release.set()
            assert pings(1.0) >= 3  # moving again: fed again
    finally:
        listener.close()
