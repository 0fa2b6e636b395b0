"""Capture backends, the reopening supervisor and triggers, on real files and real SQLite.

The Raspberry Pi camera cannot exist here, so ``FakePicamera2`` stands in at the
picamera2 interface (injected as the ``picamera2`` module), including the way
picamera2 orders colour channels and a camera that dies after some frames.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from helpers import read_all

from fieldscope.edge.capture import (
    STATE_DB_NAME,
    Camera,
    CameraError,
    CameraSupervisor,
    CommandTrigger,
    ContinuousTrigger,
    FolderCamera,
    Frame,
    IntervalTrigger,
    OpenCVCamera,
    Picamera2Camera,
    ReplayCamera,
    make_camera,
    make_trigger,
    open_with_backoff,
)
from fieldscope.edge.config import (
    CameraConfig,
    FolderOptions,
    OpenCVOptions,
    Picamera2Options,
    ReplayOptions,
)
from fieldscope.edge.errors import MissingDependencyError

# ── helpers ─────────────────────────────────────────────────────────────────────────


def rgb_image(value: int, width: int = 32, height: int = 24) -> np.ndarray:
    """A small image whose left half is pure red and whose green channel is ``value``."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 1] = value
    image[:, : width // 2, 0] = 255
    return image


def write_png(path: Path, value: int) -> Path:
    assert cv2.imwrite(str(path), rgb_image(value)[:, :, ::-1])
    return path


def green(frame: Frame) -> int:
    return int(frame.image[0, -1, 1])


def replay_to_end(camera: Camera) -> list[Frame]:
    """Open a file camera and read it until it says ``finished``: all a replay gives."""
    camera.open()
    frames = []
    while not getattr(camera, "finished", True):
        frame = camera.read(0.1)
        if frame is not None:
            frames.append(frame)
    return frames


def folder_camera(folder: Path, state: Path, **kwargs: Any) -> FolderCamera:
    kwargs.setdefault("settle_s", 0.0)
    kwargs.setdefault("scan_interval_s", 0.01)
    return FolderCamera(folder, state / STATE_DB_NAME, **kwargs)


# ── a fake picamera2, at its interface ──────────────────────────────────────────────


@dataclass
class FakeSensor:
    """The hardware behind the fake: what it delivers and how it fails."""

    width: int = 64
    height: int = 48
    fail_after: int | None = None  # capture_array raises after this many frames per start
    fail_opens: int = 0  # the next N constructions raise, as with an unplugged ribbon
    events: list[str] = field(default_factory=list)
    controls: dict[str, Any] = field(default_factory=dict)


def fake_picamera2_module(sensor: FakeSensor) -> types.ModuleType:
    """A ``picamera2`` module whose ``Picamera2`` behaves like the real one, as far as
    Picamera2Camera uses it."""

    class Picamera2:
        def __init__(self, camera_num: int = 0) -> None:
            if sensor.fail_opens > 0:
                sensor.fail_opens -= 1
                raise RuntimeError("Camera __init__ sequence did not complete.")
            if camera_num != 0:
                raise IndexError("list index out of range")
            self.config: dict[str, Any] | None = None
            self.started = False
            self.frames = 0
            sensor.events.append("init")

        def create_still_configuration(
            self, main: dict[str, Any] | None = None, buffer_count: int = 1, **_: Any
        ) -> dict[str, Any]:
            main = {"format": "BGR888", "size": (sensor.width, sensor.height), **(main or {})}
            return {"use_case": "still", "main": main, "buffer_count": buffer_count}

        def configure(self, config: dict[str, Any]) -> None:
            if config["main"]["format"] not in ("BGR888", "RGB888", "XBGR8888", "XRGB8888"):
                raise RuntimeError(f"unsupported format {config['main']['format']}")
            self.config = config
            sensor.events.append(f"configure {config['main']['format']} {config['main']['size']}")

        def set_controls(self, controls: dict[str, Any]) -> None:
            sensor.controls.update(controls)

        def start(self) -> None:
            if self.config is None:
                raise RuntimeError("Camera has not been configured")
            self.started = True
            sensor.events.append("start")

        def capture_array(self, name: str = "main") -> np.ndarray:
            if not self.started or self.config is None:
                raise RuntimeError("Camera must be started before capturing")
            if sensor.fail_after is not None and self.frames >= sensor.fail_after:
                raise RuntimeError("Camera frontend has timed out!")
            self.frames += 1
            width, height = self.config["main"]["size"]
            rgb = rgb_image(self.frames % 256, width, height)
            # libcamera's names: BGR888 is [R, G, B] in memory, RGB888 is [B, G, R].
            fmt = self.config["main"]["format"]
            pixels = rgb if fmt in ("BGR888", "XBGR8888") else rgb[:, :, ::-1]
            if fmt.startswith("X"):
                pixels = np.dstack([pixels, np.full((height, width), 255, np.uint8)])
            return np.ascontiguousarray(pixels)

        def stop(self) -> None:
            self.started = False
            sensor.events.append("stop")

        def close(self) -> None:
            sensor.events.append("close")

    module = types.ModuleType("picamera2")
    module.Picamera2 = Picamera2  # type: ignore[attr-defined]
    return module


@pytest.fixture
def sensor(monkeypatch: pytest.MonkeyPatch) -> FakeSensor:
    sensor = FakeSensor()
    monkeypatch.setitem(sys.modules, "picamera2", fake_picamera2_module(sensor))
    return sensor


def test_picamera2_frames_are_rgb_at_the_configured_size(sensor: FakeSensor) -> None:
    camera = Picamera2Camera(
        Picamera2Options(width=40, height=30, controls={"ExposureTime": 20000, "AwbEnable": False})
    )
    assert isinstance(camera, Camera)
    camera.open()
    frames = [camera.read(1.0) for _ in range(3)]
    camera.close()
    camera.close()  # twice is harmless
    assert sensor.events == ["init", "configure BGR888 (40, 30)", "start", "stop", "close"]
    assert sensor.controls == {"ExposureTime": 20000, "AwbEnable": False}
    for n, frame in enumerate(frames, start=1):
        assert frame is not None
        assert frame.image.shape == (30, 40, 3)
        assert frame.image.dtype == np.uint8
        assert tuple(frame.image[0, 0]) == (255, n, 0)  # red stays red
        assert frame.encoded is None
        assert frame.source == "picamera2:0"
        assert frame.captured_at.tzinfo is not None
        assert len(frame.digest()) == 64
    assert frames[0] is not None
    assert frames[1] is not None
    assert frames[0].digest() != frames[1].digest()


def test_picamera2_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # makes the import fail
    camera = Picamera2Camera()
    with pytest.raises(MissingDependencyError, match="apt install python3-picamera2") as info:
        camera.open()
    assert "--system-site-packages" in str(info.value)


def test_picamera2_failures_become_camera_errors(sensor: FakeSensor) -> None:
    sensor.fail_opens = 1
    camera = Picamera2Camera()
    with pytest.raises(CameraError, match="cannot start the camera: Camera __init__"):
        camera.open()
    with pytest.raises(CameraError, match="cannot start the camera: list index out of range"):
        Picamera2Camera(Picamera2Options(camera_num=1)).open()
    sensor.fail_after = 2
    camera.open()
    assert camera.read(1.0) is not None
    assert camera.read(1.0) is not None
    with pytest.raises(CameraError, match="capture failed: Camera frontend has timed out"):
        camera.read(1.0)
    camera.close()
    with pytest.raises(CameraError, match="read before open"):
        camera.read(1.0)


def test_supervisor_reopens_a_failing_camera_with_backoff(sensor: FakeSensor) -> None:
    sensor.fail_after = 3
    stop = threading.Event()
    outages: list[tuple[str, datetime]] = []
    recoveries: list[tuple[datetime, float]] = []
    supervisor = CameraSupervisor(
        Picamera2Camera(),
        stop,
        backoff_min_s=0.02,
        backoff_max_s=0.05,
        on_outage=lambda error, since: outages.append((error, since)),
        on_recovered=lambda since, seconds: recoveries.append((since, seconds)),
    )
    frames = []
    deadline = time.monotonic() + 5
    while len(frames) < 3 and time.monotonic() < deadline:
        frame = supervisor.read(0.1)
        if frame is not None:
            frames.append(frame)
    assert supervisor.outage is None
    # The fourth capture fails: outage reported, camera closed, no exception.
    assert supervisor.read(0.1) is None
    outage = supervisor.outage
    assert outage is not None
    assert "Camera frontend has timed out" in outage.error
    assert outages == [(outage.error, outage.since)]
    assert sensor.events[-2:] == ["stop", "close"]
    # While the camera will not open, each try is reported with the same start time.
    sensor.fail_opens = 2
    sensor.fail_after = None
    frame = None
    deadline = time.monotonic() + 5
    while frame is None and time.monotonic() < deadline:
        frame = supervisor.read(0.1)
    assert frame is not None
    assert len(outages) == 3
    assert {since for _, since in outages} == {outage.since}
    assert "Camera __init__ sequence did not complete" in outages[-1][0]
    assert supervisor.outage is None
    assert len(recoveries) == 1
    assert recoveries[0][0] == outage.since
    assert recoveries[0][1] > 0
    supervisor.close()


def test_backoff_doubles_up_to_the_maximum_and_stop_ends_it(tmp_path: Path) -> None:
    attempts: list[float] = []

    class Unplugged:
        name = "unplugged"
        finished = False

        def open(self) -> None:
            attempts.append(time.monotonic())
            raise CameraError("no such device")

        def read(self, timeout: float) -> Frame | None:
            raise AssertionError("never opened")

        def close(self) -> None:
            pass

    stop = threading.Event()
    supervisor = CameraSupervisor(Unplugged(), stop, backoff_min_s=0.02, backoff_max_s=0.08)
    deadline = time.monotonic() + 5
    while len(attempts) < 6 and time.monotonic() < deadline:
        assert supervisor.read(0.5) is None
    gaps = np.diff(attempts)
    expected = [0.02, 0.04, 0.08, 0.08, 0.08]
    assert all(gap >= want * 0.95 for gap, want in zip(gaps, expected, strict=True)), gaps
    assert supervisor.outage is not None
    assert supervisor.outage.attempts == 6
    # A read waits at most its timeout, and not at all once stop is set.
    started = time.monotonic()
    assert supervisor.read(0.01) is None
    assert time.monotonic() - started < 0.5
    stop.set()
    count = len(attempts)
    assert supervisor.read(10.0) is None
    assert len(attempts) == count

    outages: list[str] = []
    stop2 = threading.Event()
    timer = threading.Timer(0.1, stop2.set)
    timer.start()
    started = time.monotonic()
    assert not open_with_backoff(
        Unplugged(),
        stop2,
        backoff_min_s=0.01,
        backoff_max_s=0.02,
        on_outage=lambda e, _: outages.append(e),
    )
    assert time.monotonic() - started < 2.0
    assert outages
    assert outages[0] == "no such device"


def test_open_with_backoff_succeeds_once_the_camera_is_back(sensor: FakeSensor) -> None:
    sensor.fail_opens = 2
    camera = Picamera2Camera()
    assert open_with_backoff(camera, threading.Event(), backoff_min_s=0.01, backoff_max_s=0.02)
    assert camera.read(1.0) is not None
    camera.close()


def test_missing_dependency_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)
    supervisor = CameraSupervisor(Picamera2Camera(), threading.Event())
    with pytest.raises(MissingDependencyError):
        supervisor.read(0.1)


# ── OpenCV ──────────────────────────────────────────────────────────────────────────


def test_opencv_reads_a_real_video_file_as_rgb_until_its_end(tmp_path: Path) -> None:
    video = tmp_path / "slide.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for value in (40, 120, 200):
        writer.write(np.ascontiguousarray(rgb_image(value, 64, 48)[:, :, ::-1]))
    writer.release()
    camera = make_camera(
        CameraConfig(backend="opencv", opencv=OpenCVOptions(source=str(video))), tmp_path
    )
    assert isinstance(camera, OpenCVCamera)
    camera.open()
    frames = [camera.read(1.0) for _ in range(3)]
    assert camera.read(1.0) is None
    assert camera.finished
    camera.close()
    for frame, value in zip(frames, (40, 120, 200), strict=True):
        assert frame is not None
        assert frame.image.shape == (48, 64, 3)
        red, grn, blue = (int(c) for c in frame.image[24, 8])  # MJPG is lossy: ranges
        assert red > 200
        assert blue < 40
        assert abs(grn - value) < 25


def test_opencv_source_that_cannot_open_is_a_camera_error(tmp_path: Path) -> None:
    camera = OpenCVCamera(OpenCVOptions(source=str(tmp_path / "no-such.avi")))
    with pytest.raises(CameraError, match="cannot open the video source"):
        camera.open()
    with pytest.raises(CameraError, match="read before open"):
        camera.read(0.1)
    masked = OpenCVCamera(OpenCVOptions(source="rtsp://admin:secret@10.9.9.9/s"))
    assert "secret" not in masked.name


# ── the watched folder ──────────────────────────────────────────────────────────────


def test_folder_each_file_exactly_once_across_restarts(tmp_path: Path) -> None:
    folder, state = tmp_path / "incoming", tmp_path / "state"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"img{i}.png", 10 + i)
    camera = folder_camera(folder, state)
    camera.open()
    frames = read_all(camera)
    assert sorted(green(f) for f in frames) == [10, 11, 12]
    for frame in frames[:2]:
        assert frame.done is not None
        frame.done()
    # Offered once per run even without done(): the third is in flight.
    assert read_all(camera) == []
    camera.close()  # a crash before the third identification was stored

    camera = folder_camera(folder, state)
    camera.open()
    again = read_all(camera)
    assert [f.source for f in again] == [frames[2].source]
    assert again[0].encoded == (folder / Path(frames[2].source).name).read_bytes()
    assert again[0].done is not None
    again[0].done()
    write_png(folder / "img3.png", 13)
    new = read_all(camera)
    assert [green(f) for f in new] == [13]
    assert new[0].done is not None
    new[0].done()
    camera.close()

    camera = folder_camera(folder, state)
    camera.open()
    assert read_all(camera) == []
    camera.close()
    # keep mode leaves every file in place
    assert sorted(p.name for p in folder.iterdir()) == [f"img{i}.png" for i in range(4)]


def test_folder_waits_until_a_file_stops_changing(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    data = cv2.imencode(".png", rgb_image(77))[1].tobytes()
    target = folder / "slow.png"
    target.write_bytes(data[: len(data) // 2])  # the writer is still busy
    camera = folder_camera(folder, tmp_path, settle_s=0.3, scan_interval_s=0.02)
    camera.open()
    started = time.monotonic()
    assert camera.read(0.15) is None
    with target.open("ab") as handle:
        handle.write(data[len(data) // 2 :])
    frame = camera.read(3.0)
    waited = time.monotonic() - started
    camera.close()
    assert frame is not None
    assert frame.encoded == data
    assert waited >= 0.3 + 0.15 * 0.9


def test_folder_corrupt_files_are_reported_moved_and_never_retried(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "a-good.png", 1)
    (folder / "b-empty.png").write_bytes(b"")
    good = cv2.imencode(".png", rgb_image(2))[1].tobytes()
    (folder / "c-truncated.png").write_bytes(good[:-20])
    (folder / "d-text.jpg").write_text("not an image")
    write_png(folder / "e-good.png", 3)
    (folder / ".hidden.png").write_bytes(good)
    (folder / "notes.txt").write_text("ignored")
    (folder / "sub.png").mkdir()
    problems: list[tuple[str, str]] = []
    camera = folder_camera(
        folder, tmp_path, handled="move", on_problem=lambda s, m: problems.append((s, m))
    )
    camera.open()
    frames = read_all(camera)
    assert [green(f) for f in frames] == [1, 3]
    for frame in frames:
        assert frame.done is not None
        frame.done()
    assert sorted(Path(source).name for source, _ in problems) == [
        "b-empty.png",
        "c-truncated.png",
        "d-text.jpg",
    ]
    assert any("empty" in message for _, message in problems)
    assert any("truncated" in message for _, message in problems)
    assert sorted(p.name for p in (folder / "failed").iterdir()) == [
        "b-empty.png",
        "c-truncated.png",
        "d-text.jpg",
    ]
    assert sorted(p.name for p in (folder / "done").iterdir()) == ["a-good.png", "e-good.png"]
    camera.close()
    camera = folder_camera(
        folder, tmp_path, handled="move", on_problem=lambda s, m: problems.append((s, m))
    )
    camera.open()
    assert read_all(camera) == []
    camera.close()
    assert len(problems) == 3
    assert sorted(p.name for p in folder.iterdir()) == [
        ".hidden.png",
        "done",
        "failed",
        "notes.txt",
        "sub.png",
    ]


def test_folder_keep_mode_records_failures_in_the_state_db(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    problems: list[str] = []
    for _ in range(2):  # a restart does not retry it
        camera = folder_camera(folder, tmp_path, on_problem=lambda s, m: problems.append(m))
        camera.open()
        assert read_all(camera) == []
        camera.close()
    assert len(problems) == 1
    assert (folder / "bad.png").exists()
    with sqlite3.connect(tmp_path / STATE_DB_NAME) as db:
        rows = db.execute("SELECT name, state, reason FROM files").fetchall()
    assert [(name, state) for name, state, _ in rows] == [("bad.png", "failed")]


def test_folder_delete_mode_and_a_rewritten_file_counts_as_new(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "x.png", 5)
    camera = folder_camera(folder, tmp_path, handled="delete")
    camera.open()
    (frame,) = read_all(camera)
    assert (folder / "x.png").exists()  # not before done()
    assert frame.done is not None
    frame.done()
    assert not (folder / "x.png").exists()
    # The acquisition program reuses the name: a new image, taken again.
    write_png(folder / "x.png", 6)
    (again,) = read_all(camera)
    assert green(again) == 6
    camera.close()
    # done() after close() is still recorded (the daemon drains after stopping capture).
    assert again.done is not None
    again.done()
    assert not (folder / "x.png").exists()


def test_folder_gives_up_on_a_file_that_never_completes(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "poison.png", 9)
    problems: list[str] = []
    for _ in range(3):  # taken, then the daemon dies each time before done()
        camera = folder_camera(folder, tmp_path, max_attempts=3)
        camera.open()
        assert len(read_all(camera)) == 1
        camera.close()
    camera = folder_camera(
        folder, tmp_path, max_attempts=3, on_problem=lambda s, m: problems.append(m)
    )
    camera.open()
    assert read_all(camera) == []
    camera.close()
    assert len(problems) == 1
    assert "taken 3 times without being completed" in problems[0]


def test_folder_that_disappears_is_a_camera_error_the_supervisor_survives(tmp_path: Path) -> None:
    folder = tmp_path / "usb"
    camera = folder_camera(folder, tmp_path)
    with pytest.raises(CameraError, match="does not exist"):
        camera.open()
    stop = threading.Event()
    supervisor = CameraSupervisor(camera, stop, backoff_min_s=0.01, backoff_max_s=0.02)
    assert supervisor.read(0.05) is None
    assert supervisor.outage is not None
    folder.mkdir()
    write_png(folder / "a.png", 4)
    frame = None
    deadline = time.monotonic() + 5
    while frame is None and time.monotonic() < deadline:
        frame = supervisor.read(0.05)
    assert frame is not None
    assert supervisor.outage is None
    # Unmounted while open: the scan fails, the supervisor reports it.
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    assert supervisor.read(0.05) is None
    assert supervisor.outage is not None
    assert "cannot list the folder" in supervisor.outage.error
    supervisor.close()


def test_close_wakes_a_waiting_read(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    camera = folder_camera(folder, tmp_path, scan_interval_s=5.0)
    camera.open()
    timer = threading.Timer(0.1, camera.close)
    timer.start()
    started = time.monotonic()
    assert camera.read(10.0) is None
    assert time.monotonic() - started < 2.0
    timer.join()


# ── replay ──────────────────────────────────────────────────────────────────────────


def test_replay_in_name_order_at_the_set_rate(tmp_path: Path) -> None:
    for i in (3, 1, 2):
        write_png(tmp_path / f"{i:02d}.png", i)
    camera = make_camera(
        CameraConfig(backend="replay", replay=ReplayOptions(path=tmp_path, rate_hz=20.0)),
        tmp_path / "data",
    )
    assert isinstance(camera, ReplayCamera)
    camera.open()
    times, frames = [], []
    while not camera.finished:
        frame = camera.read(1.0)
        if frame is not None:
            frames.append(frame)
            times.append(time.monotonic())
    camera.close()
    assert [green(f) for f in frames] == [1, 2, 3]
    assert all(gap >= 0.05 * 0.9 for gap in np.diff(times))
    assert frames[0].encoded == (tmp_path / "01.png").read_bytes()
    assert frames[0].done is None


def test_replay_loop_limit_and_corrupt_files(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"broken")
    write_png(tmp_path / "c.png", 3)
    problems: list[str] = []
    camera = ReplayCamera(
        tmp_path, rate_hz=0, loop=True, limit=5, on_problem=lambda s, m: problems.append(s)
    )
    frames = replay_to_end(camera)
    assert [green(f) for f in frames] == [1, 3, 1, 3, 1]
    assert problems == [str(tmp_path / "b.png")]  # reported once, skipped on every loop
    assert camera.read(0.01) is None
    camera.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CameraError, match="no images matching"):
        ReplayCamera(empty).open()


def test_replay_takes_subfolders_so_a_specimens_folder_replays_as_it_is(
    tmp_path: Path,
) -> None:
    """`fieldscope specimens` writes one folder per species; the replay camera used to
    see none of it and said only "no images matching"."""
    data = tmp_path / "specimens"
    for species, value in (("globigerina", 1), ("ammonia", 2)):
        (data / species).mkdir(parents=True)
        write_png(data / species / "0001.png", value)
    (data / ".hidden").mkdir()
    write_png(data / ".hidden" / "x.png", 9)
    write_png(data / "top.png", 3)
    camera = make_camera(
        CameraConfig(backend="replay", replay=ReplayOptions(path=data, rate_hz=0)),
        tmp_path / "state",
    )
    frames = replay_to_end(camera)
    camera.close()
    # In path order: ammonia/, globigerina/, then top.png; hidden folders are skipped.
    assert [green(f) for f in frames] == [2, 1, 3]

    # Not recursive: the error says where it looked, for what, and what to change.
    (data / "top.png").unlink()
    with pytest.raises(CameraError) as caught:
        ReplayCamera(data, recursive=False).open()
    message = str(caught.value)
    assert "no images matching *.png, *.jpg" in message
    assert f"in {data} (not its subfolders)" in message
    assert "2 are in subfolders: set camera.replay.recursive = true" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CameraError, match=f"in {empty} and its subfolders .*camera.replay.patterns"
    ):
        ReplayCamera(empty).open()


def test_folder_camera_recursive_takes_subfolders_and_moves_them_keeping_the_subfolder(
    tmp_path: Path,
) -> None:
    folder, state = tmp_path / "incoming", tmp_path / "state"
    (folder / "slide-1").mkdir(parents=True)
    write_png(folder / "slide-1" / "a.png", 11)
    write_png(folder / "b.png", 12)
    camera = folder_camera(folder, state, recursive=True, handled="move")
    camera.open()
    frames = read_all(camera)
    assert sorted(green(f) for f in frames) == [11, 12]
    for frame in frames:
        assert frame.done is not None
        frame.done()
    # done/ is not scanned again; the subfolder's file keeps its subfolder there.
    assert read_all(camera) == []
    camera.close()
    assert (folder / "done" / "slide-1" / "a.png").is_file()
    assert (folder / "done" / "b.png").is_file()
    # Not recursive (the default for folder): only the top level.
    write_png(folder / "slide-1" / "c.png", 13)
    camera = folder_camera(folder, tmp_path / "state2")
    camera.open()
    assert read_all(camera) == []
    camera.close()


def test_replay_read_honours_its_timeout(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    write_png(tmp_path / "b.png", 2)
    camera = ReplayCamera(tmp_path, rate_hz=0.5)
    camera.open()
    assert camera.read(0.0) is not None
    started = time.monotonic()
    assert camera.read(0.05) is None  # the next one is due in 2 s
    assert time.monotonic() - started < 1.0
    camera.close()


def test_make_camera_builds_each_backend(tmp_path: Path) -> None:
    folder = make_camera(
        CameraConfig(backend="folder", folder=FolderOptions(path=tmp_path, handled="move")),
        tmp_path / "data",
    )
    assert isinstance(folder, FolderCamera)
    assert folder.state_db == tmp_path / "data" / STATE_DB_NAME
    assert isinstance(make_camera(CameraConfig(backend="picamera2"), tmp_path), Picamera2Camera)
    for camera in (folder, make_camera(CameraConfig(backend="picamera2"), tmp_path)):
        assert isinstance(camera, Camera)


# ── triggers ────────────────────────────────────────────────────────────────────────


def test_continuous_trigger_limits_the_rate() -> None:
    trigger = make_trigger(CameraConfig(backend="replay", max_rate_hz=50.0))
    assert isinstance(trigger, ContinuousTrigger)
    stop = threading.Event()
    times = []
    for _ in range(5):
        assert trigger.wait(stop)
        times.append(time.monotonic())
    assert all(gap >= 0.02 * 0.9 for gap in np.diff(times))
    unlimited = ContinuousTrigger(0)
    started = time.monotonic()
    assert all(unlimited.wait(stop) for _ in range(1000))
    assert time.monotonic() - started < 1.0


def test_interval_trigger_keeps_a_fixed_grid() -> None:
    now = [100.0]
    trigger = IntervalTrigger(10.0, clock=lambda: now[0])
    stop = threading.Event()
    assert trigger.wait(stop)  # the first frame at once
    now[0] = 125.0  # the pipeline was busy: the slot at 110 is skipped, not made up
    assert trigger.wait(stop)
    now[0] = 129.0
    stop_soon = threading.Timer(0.05, stop.set)
    stop_soon.start()
    assert not trigger.wait(stop)  # the next slot is 130
    stop_soon.join()
    now[0] = 130.0
    assert trigger.wait(threading.Event())


def test_command_trigger_waits_for_fire_and_stop_ends_the_wait() -> None:
    trigger = make_trigger(CameraConfig(backend="replay", trigger="command"))
    assert isinstance(trigger, CommandTrigger)
    stop = threading.Event()
    timer = threading.Timer(0.05, trigger.fire)
    timer.start()
    started = time.monotonic()
    assert trigger.wait(stop)
    assert 0.04 <= time.monotonic() - started < 1.0
    timer.join()
    assert trigger.fire()
    assert trigger.fire()
    assert trigger.wait(stop)
    assert trigger.wait(stop)  # each fire is one frame
    stop_now = threading.Timer(0.05, lambda: (stop.set(), trigger.wake()))
    stop_now.start()
    started = time.monotonic()
    assert not trigger.wait(stop)
    assert time.monotonic() - started < 0.2
    stop_now.join()
    full = CommandTrigger()
    assert all(full.fire() for _ in range(16))
    assert not full.fire()


def test_fire_works_in_interval_mode_too() -> None:
    trigger = IntervalTrigger(3600.0)
    stop = threading.Event()
    assert trigger.wait(stop)
    trigger.fire()
    started = time.monotonic()
    assert trigger.wait(stop)
    assert time.monotonic() - started < 0.2
