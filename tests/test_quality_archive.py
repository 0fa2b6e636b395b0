"""The quality gate on synthetic specimens, and the size-capped image archive on real files."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from fieldscope.edge.archive import ImageArchive
from fieldscope.edge.capture import Frame
from fieldscope.edge.config import QualityConfig
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.message import Quality
from fieldscope.edge.preprocess import decode_image
from fieldscope.edge.quality import ANALYSIS_WIDTH, assess, measure
from fieldscope.edge.specimens import render_specimen, species_names

DEFAULTS = QualityConfig()


def specimens(seeds: int = 3, size: int = 256) -> list[np.ndarray]:
    return [
        render_specimen(name, np.random.default_rng(seed), size)
        for name in species_names()
        for seed in range(seeds)
    ]


# ── quality gate ────────────────────────────────────────────────────────────────────


def test_defaults_accept_every_synthetic_specimen() -> None:
    for image in specimens() + specimens(seeds=1, size=512):
        result = assess(image, DEFAULTS)
        assert result.ok, result
        assert result.reason is None


def test_defaults_reject_a_heavily_blurred_specimen() -> None:
    for image in specimens():
        blurred = cv2.GaussianBlur(image, (0, 0), 8)
        result = assess(blurred, DEFAULTS)
        assert not result.ok
        assert result.reason is not None
        assert result.reason.startswith("too blurry: sharpness")
        assert result.sharpness < assess(image, DEFAULTS).sharpness / 5


def test_defaults_reject_black_and_white_frames() -> None:
    black = np.zeros((480, 640, 3), np.uint8)
    white = np.full((480, 640, 3), 255, np.uint8)
    dark = assess(black, DEFAULTS)
    bright = assess(white, DEFAULTS)
    assert not dark.ok
    assert dark.reason is not None
    assert dark.reason.startswith("too dark")
    assert (dark.brightness, dark.clipped, dark.sharpness) == (0.0, 1.0, 0.0)
    assert not bright.ok
    assert bright.reason is not None
    assert bright.reason.startswith("too bright")
    assert bright.brightness == 1.0
    # Mid-grey but mostly saturated: clipped, though neither too dark nor too bright.
    half = np.zeros((100, 100, 3), np.uint8)
    half[:, 50:] = 255
    half[40:60] = 128
    clipped = assess(half, DEFAULTS)
    assert not clipped.ok
    assert clipped.reason is not None
    assert clipped.reason.startswith("badly exposed")


def test_sharpness_does_not_depend_on_the_camera_resolution() -> None:
    image = render_specimen(species_names()[0], np.random.default_rng(7), 512)
    for size in (512, 1024, 2048):
        resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        assert measure(resized)[0] == pytest.approx(measure(image)[0], rel=0.25)
    assert ANALYSIS_WIDTH == 256


def test_disabled_gate_passes_everything_but_still_measures() -> None:
    black = np.zeros((64, 64, 3), np.uint8)
    result = assess(black, QualityConfig(enabled=False))
    assert result.ok
    assert result.reason is None
    assert result.brightness == 0.0
    assert result.to_message() == Quality(sharpness=0.0, exposure=0.0)


def test_thresholds_come_from_the_config() -> None:
    image = specimens(seeds=1)[0]
    sharpness = measure(image)[0]
    strict = assess(image, QualityConfig(min_sharpness=sharpness * 2))
    assert not strict.ok
    assert strict.reason is not None
    assert "too blurry" in strict.reason


def test_bad_input_is_a_value_error() -> None:
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32)):
        with pytest.raises(ValueError, match="RGB uint8"):
            measure(bad)


# ── archive ─────────────────────────────────────────────────────────────────────────


WHEN = datetime(2026, 11, 23, 18, 39, 0, 123456, tzinfo=UTC)


def noise_image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def frame_from_file(data: bytes, when: datetime = WHEN) -> Frame:
    return Frame(decode_image(data), source="in.png", captured_at=when, encoded=data)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_modes_decide_what_is_stored(tmp_path: Path) -> None:
    image = noise_image(0)
    none = ImageArchive(tmp_path / "none", "none")
    assert none.store(image, "uncertain") is None
    assert not (tmp_path / "none").exists()
    uncertain = ImageArchive(tmp_path / "u", "uncertain")
    assert uncertain.store(image, "ok") is None
    assert uncertain.store(image, "rejected") is None
    assert uncertain.store(image, "uncertain") is not None
    everything = ImageArchive(tmp_path / "a", "all")
    assert all(everything.store(image, s) is not None for s in ("ok", "uncertain", "rejected"))
    assert everything.file_count == 3
    with pytest.raises(ConfigError, match=r"archive\.mode"):
        ImageArchive(tmp_path, "some")
    with pytest.raises(ConfigError, match=r"archive\.format"):
        ImageArchive(tmp_path, "all", fmt="gif")


def test_file_frames_are_kept_byte_for_byte_under_a_dated_name(tmp_path: Path) -> None:
    data = cv2.imencode(".png", noise_image(1))[1].tobytes()
    frame = frame_from_file(data)
    archive = ImageArchive(tmp_path, "all")
    path = archive.store(frame, "ok", "Globigerina bulloides")
    assert path is not None
    digest = hashlib.sha256(data).hexdigest()
    assert (
        path
        == tmp_path
        / "2026-11-23"
        / f"20261123T183900_123456Z_{digest[:12]}_Globigerina-bulloides.png"
    )
    assert path.read_bytes() == data
    assert hashlib.sha256(path.read_bytes()).hexdigest() == frame.digest()
    assert archive.total_bytes == len(data)
    jpeg = cv2.imencode(".jpg", noise_image(2))[1].tobytes()
    kept = archive.store(frame_from_file(jpeg), "ok")
    assert kept is not None
    assert kept.suffix == ".jpg"
    assert kept.read_bytes() == jpeg


def test_camera_frames_are_encoded_in_the_configured_format(tmp_path: Path) -> None:
    image = noise_image(3)
    camera_frame = Frame(image, source="picamera2:0", captured_at=WHEN)
    png = ImageArchive(tmp_path / "png", "all", fmt="png").store(camera_frame, "ok")
    assert png is not None
    assert png.suffix == ".png"
    assert np.array_equal(decode_image(png.read_bytes()), image)  # lossless
    jpg = ImageArchive(tmp_path / "jpg", "all", fmt="jpg").store(camera_frame, "ok")
    assert jpg is not None
    assert jpg.suffix == ".jpg"
    assert decode_image(jpg.read_bytes()).shape == image.shape


def test_names_never_leave_the_archive(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = ImageArchive(root, "all")
    for hint in ("../../etc/passwd", "/abs/path", "..", "a\nb", "é ü", ""):
        path = archive.store(noise_image(4), "ok", hint)
        assert path is not None
        assert path.parent.parent == root
        assert path.resolve().is_relative_to(root.resolve())
    assert all_files(tmp_path) == all_files(root)


def test_oldest_files_are_deleted_first_when_over_the_cap(tmp_path: Path) -> None:
    images = [cv2.imencode(".png", noise_image(10 + i))[1].tobytes() for i in range(6)]
    size = len(images[0])
    assert all(len(data) == size for data in images)
    archive = ImageArchive(tmp_path, "all", max_bytes=size * 3 + size // 2)
    days = [WHEN - timedelta(days=5 - i) for i in range(6)]  # oldest first
    paths = []
    for data, when in zip(images, days, strict=True):
        path = archive.store(frame_from_file(data, when), "ok")
        assert path is not None
        paths.append(path)
        assert archive.total_bytes <= archive.max_bytes
    assert all_files(tmp_path) == paths[3:]
    assert archive.total_bytes == 3 * size
    # Emptied day folders are removed as well.
    assert sorted(d.name for d in tmp_path.iterdir()) == [p.parent.name for p in paths[3:]]


def test_restart_scans_once_and_cleans_interrupted_writes(tmp_path: Path) -> None:
    images = [cv2.imencode(".png", noise_image(20 + i))[1].tobytes() for i in range(4)]
    size = len(images[0])
    first = ImageArchive(tmp_path, "all", max_bytes=size * 10)
    paths = [
        first.store(frame_from_file(d, WHEN + timedelta(seconds=i)), "ok")
        for i, d in enumerate(images)
    ]
    leftover = tmp_path / "2026-11-23" / ".20261123T183905_000000Z_x.png.abc.tmp"
    leftover.write_bytes(b"half")
    # Restarted with a smaller cap: the existing total is known, the oldest go.
    second = ImageArchive(tmp_path, "all", max_bytes=size * 2)
    assert not leftover.exists()
    assert second.file_count == 2
    assert second.total_bytes == 2 * size
    assert all_files(tmp_path) == paths[2:]


def test_an_image_larger_than_the_cap_is_not_kept(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path, "all", max_bytes=100)
    assert archive.store(noise_image(5), "ok") is None
    assert all_files(tmp_path) == []
    assert archive.total_bytes == 0


def test_disk_errors_are_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = ImageArchive(tmp_path / "archive", "all")
    # The disk goes bad after start-up: a file where the archive folder should be.
    (tmp_path / "archive").write_text("not a folder")
    assert archive.store(noise_image(6), "ok") is None
    assert archive.store(noise_image(7), "ok") is None
    assert archive.errors == 2
    assert archive.file_count == 0
    warnings = [r for r in caplog.records if r.name == "fieldscope.edge.archive"]
    assert len(warnings) == 1  # rate-limited: one line, not one per frame
    assert "cannot write" in warnings[0].getMessage()
