"""Poison inputs against the station (issue 15): one bad file never stops it.

The inputs are generated here. The folder camera meets file names that are not
UTF-8 (a name is bytes on POSIX; ``\\xff\\xfe`` once killed the capture thread on
every start); the pipeline must survive an error in any stage, set the frame aside
and restart a stage that died.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import Broker, MqttRecorder, SpecimenImages, TinyBundles
from helpers import read_all, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldscope.edge.archive import ImageArchive
from fieldscope.edge.capture import (
    STATE_DB_NAME,
    CameraSupervisor,
    ContinuousTrigger,
    FolderCamera,
)
from fieldscope.edge.config import ModelConfig, PreprocessingOverrides, QualityConfig
from fieldscope.edge.model_slot import ModelSlot, load_model
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.pipeline import FrameCounters, Pipeline
from fieldscope.edge.topics import Topics

BAD_NAME = os.fsdecode(b"b21_\xff\xfe.png")  # what os.listdir hands over for those bytes


def write_png(path: Path, value: int, size: int = 32) -> None:
    rng = np.random.default_rng(value)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    image[:, :, 0] = value
    ok, data = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(data.tobytes())


def folder(tmp_path: Path, **kwargs: object) -> FolderCamera:
    kwargs.setdefault("settle_s", 0.0)
    kwargs.setdefault("scan_interval_s", 0.01)
    return FolderCamera(tmp_path / "incoming", tmp_path / "state" / STATE_DB_NAME, **kwargs)  # type: ignore[arg-type]


def test_a_non_utf8_file_name_is_captured_and_the_folder_goes_on(tmp_path: Path) -> None:
    """Issue 15 item 2: ``cp ok.png "$(printf 'incoming/b21_\\xff\\xfe.png')"`` killed
    the capture thread and every restart. Now it is captured like any file, its name
    is shown with escapes wherever text is needed, and the rest of the folder too."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_png(incoming / "a.png", 10)
    write_png(incoming / BAD_NAME, 20)
    write_png(incoming / "z.png", 30)
    camera = folder(tmp_path, handled="move")
    camera.open()
    frames = read_all(camera)
    assert len(frames) == 3
    odd = next(f for f in frames if "b21_" in f.source)
    assert odd.source.endswith("b21_\\xff\\xfe.png")
    assert odd.key is not None
    # Everything that leaves the camera is plain text: JSON, SQLite and UTF-8 logs take it.
    json.dumps({"source": odd.source, "key": odd.key}, ensure_ascii=False).encode("utf-8")
    for frame in frames:
        assert frame.done is not None
        frame.done()
    camera.close()
    done = sorted(os.fsencode(p.name) for p in (incoming / "done").iterdir())
    assert done == [b"a.png", b"b21_\xff\xfe.png", b"z.png"]
    # A restart neither dies on the name nor offers anything again.
    camera = folder(tmp_path, handled="move")
    camera.open()
    assert read_all(camera) == []
    camera.close()


def test_a_non_utf8_name_taken_but_not_done_is_offered_again_after_a_crash(
    tmp_path: Path,
) -> None:
    """The state database keeps the name's bytes (a BLOB) and finds the file again."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_png(incoming / BAD_NAME, 20)
    camera = folder(tmp_path)
    camera.open()
    (frame,) = read_all(camera)
    camera.close()  # a crash before the identification was stored
    camera = folder(tmp_path)
    camera.open()
    (again,) = read_all(camera)
    assert again.source == frame.source
    assert again.key == frame.key
    assert again.done is not None
    again.done()
    camera.close()
    camera = folder(tmp_path)
    camera.open()
    assert read_all(camera) == []
    camera.close()


def test_a_frame_a_stage_fails_on_is_set_aside_in_failed(tmp_path: Path) -> None:
    """``Frame.fail`` quarantines the file: moved to failed/, recorded, never offered."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_png(incoming / BAD_NAME, 20)
    camera = folder(tmp_path, handled="move")
    problems: list[tuple[str, str]] = []
    camera._on_problem = lambda source, reason: problems.append((source, reason))
    camera.open()
    (frame,) = read_all(camera)
    assert frame.fail is not None
    frame.fail("prepare failed: MemoryError()")
    assert [os.fsencode(p.name) for p in (incoming / "failed").iterdir()] == [b"b21_\xff\xfe.png"]
    assert problems == []  # the pipeline that failed has counted and reported it already
    camera.close()
    camera = folder(tmp_path, handled="move")
    camera.open()
    assert read_all(camera) == []
    camera.close()


# --- the pipeline: real model, real outbox, real folder camera --------------------------------


class _BuggyTrigger(ContinuousTrigger):
    """A trigger with a bug that raises on its first few waits (a stand-in for any
    error outside one frame that once ended a stage's thread for good)."""

    def __init__(self, failures: int) -> None:
        super().__init__(max_rate_hz=1000.0)
        self.failures = failures

    def wait(self, stop: threading.Event) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("trigger bug")
        return super().wait(stop)


def _pipeline(
    tmp_path: Path, tiny_bundles: TinyBundles, trigger: ContinuousTrigger
) -> tuple[Pipeline, threading.Event, Outbox, list[str]]:
    incoming = tmp_path / "incoming"
    camera = FolderCamera(
        incoming, tmp_path / "state" / STATE_DB_NAME, settle_s=0.0, scan_interval_s=0.01,
        handled="move",
    )  # fmt: skip
    stop = threading.Event()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    events: list[str] = []
    model = load_model(ModelConfig(bundle=tiny_bundles.v1), PreprocessingOverrides())
    pipeline = Pipeline(
        camera=CameraSupervisor(camera, stop),
        trigger=trigger,
        slot=ModelSlot(model),
        outbox=outbox,
        archive=ImageArchive(tmp_path / "archive", mode="none"),
        quality=QualityConfig(enabled=False),
        topics=Topics("fieldscope", "pond", "scope"),
        stop=stop,
        counters=FrameCounters(),
        on_event=events.append,
    )
    return pipeline, stop, outbox, events


@pytest.mark.slow
def test_the_pipeline_identifies_a_non_utf8_file_and_restarts_a_stage_that_died(
    tmp_path: Path, tiny_bundles: TinyBundles
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_png(incoming / "a.png", 200)
    write_png(incoming / BAD_NAME, 210)
    write_png(incoming / "z.png", 220)
    pipeline, stop, outbox, events = _pipeline(tmp_path, tiny_bundles, _BuggyTrigger(2))
    pipeline.start()
    try:
        wait_for(lambda: outbox.depth() == 3, what="three identifications in the outbox")
        wait_for(lambda: len(list((incoming / "done").iterdir())) == 3, what="three files done")
        assert pipeline.restarts["capture"] == 2
        assert any("capture stage died" in e for e in events)
        assert pipeline.stalled(60) == []
    finally:
        stop.set()
        pipeline.wake()
        assert pipeline.join(10)
        outbox.close()


@settings(max_examples=25, deadline=None)
@given(
    names=st.lists(
        st.binary(min_size=1, max_size=40)
        .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_").lstrip(b".") + b".png")
        .filter(lambda b: len(b) > 4 and b not in (b"done.png", b"failed.png")),
        min_size=1,
        max_size=6,
        unique=True,
    )
)
def test_fuzz_any_byte_file_names_are_each_captured_once(names: list[bytes]) -> None:
    """Any bytes a POSIX name may hold: each file captured once, moved to done/."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        incoming = root / "incoming"
        incoming.mkdir()
        for i, name in enumerate(names):
            write_png(incoming / os.fsdecode(name), 50 + i)
        camera = folder(root, handled="move")
        camera.open()
        frames = read_all(camera)
        for frame in frames:
            json.dumps(frame.source, ensure_ascii=False).encode("utf-8")
            assert frame.done is not None
            frame.done()
        camera.close()
        assert len(frames) == len(names)
        moved = sorted(os.fsencode(p.name) for p in (incoming / "done").iterdir())
        assert moved == sorted(names)


# --- item 9, the station's side: re-send a range from the outbox's retention ------------------


def test_outbox_keeps_sent_messages_and_requeues_a_range(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", keep_sent=5) as outbox:
        for i in range(8):
            outbox.add("t", lambda _seq, i=i: f"m{i}".encode(), 1)
        seqs = [e.seq for e in outbox.pending(100)]
        assert outbox.ack_many(seqs) == 8
        assert outbox.depth() == 0
        assert outbox.kept_range() == (seqs[3], seqs[7])  # the last five seqs
        moved, queued = outbox.requeue(seqs[0], seqs[4])
        assert (moved, queued) == (2, 0)  # seqs 3 and 4; 0..2 are no longer kept
        assert [e.payload for e in outbox.pending(100)] == [b"m3", b"m4"]
        assert outbox.requeue(seqs[3], seqs[4]) == (0, 2)  # already queued again


@pytest.mark.slow
@pytest.mark.mqtt
def test_a_station_publishes_a_range_again_on_resend(
    tmp_path: Path,
    mosquitto: Broker,
    tiny_bundles: TinyBundles,
    specimen_images: SpecimenImages,
) -> None:
    """A collector that found a gap asks for it: ``resend`` republishes the kept
    identifications under their own seq, and says how many were no longer kept."""
    from test_daemon import TOPICS as DAEMON_TOPICS
    from test_daemon import command, running, write_config

    from fieldscope.edge.message import Identification

    recorder = MqttRecorder(mosquitto)
    try:
        specimen_images.copy(tmp_path / "images", 3)
        cfg = write_config(tmp_path, mosquitto, tiny_bundles.v1)
        topic = DAEMON_TOPICS.identification
        with running(cfg) as daemon:
            assert recorder.wait_for(lambda r: r.count(topic) == 3)
            wait_for(lambda: daemon.station.outbox.depth() == 0, what="all acknowledged")
            seqs = sorted(Identification.from_json(p).seq for p in recorder.on(topic))
            payload = json.dumps({"request_id": "gap-1", "first": seqs[0] - 5, "last": seqs[-1]})
            reply = command(recorder, "resend", payload.encode())
            assert reply.ok, reply.error
            assert reply.data is not None
            assert (reply.data["requeued"], reply.data["not_kept"]) == (3, 5)
            assert recorder.wait_for(lambda r: r.count(topic) == 6)
        again = sorted(Identification.from_json(p).seq for p in recorder.on(topic)[3:])
        assert again == seqs
    finally:
        recorder.close()


def test_kept_sent_messages_never_cost_a_new_message_or_an_ack(tmp_path: Path) -> None:
    """With a byte cap, the copies kept for resend are given up first."""
    with Outbox(tmp_path / "o.sqlite", keep_sent=10_000, max_bytes=64 * 1024) as outbox:
        for i in range(300):
            outbox.add("t", lambda _seq, i=i: bytes([i % 256]) * 900, 1)
            outbox.ack_many(e.seq for e in outbox.pending(100))
        assert outbox.depth() == 0
        assert outbox.dropped() == 0
        kept = outbox.kept_range()
        assert kept is not None
        assert kept[1] == outbox.next_seq - 1  # the latest are kept
