"""A segmenting station (``[objects] mode = "segment"``) end to end against a real mosquitto:
a folder camera over synthetic frames of many specimens, the real Segmenter, a real
converted bundle; one identification per object, with its measurements, through the
outbox, and nothing lost or repeated across a restart that came between two objects."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from test_daemon import (
    TOPICS,
    Site,
    heartbeats,
    identifications,
    point,
    running,
    sha256,
    site,
    validator,
)

from fieldscope.edge.bundle import MODEL_FILE, Segmentation, read_bundle, write_bundle
from fieldscope.edge.config import EdgeConfig
from fieldscope.edge.message import Identification
from fieldscope.edge.objects import FrameObjects, ObjectsSettings, Segmenter
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.preprocess import load_image
from fieldscope.edge.specimen_frames import FrameRecipe, write_frames

pytestmark = pytest.mark.mqtt
__all__ = ["site", "validator"]  # the fixtures of test_daemon, used here

# Four separated specimens and some dust; and a frame of dust only, whose specks at the
# border are dropped, so that nothing is kept.
OBJECT_FRAMES = FrameRecipe(
    size=320, separated=4, touching_pairs=0, at_border=0, debris=6, tile_px=64
)
EMPTY_FRAMES = FrameRecipe(
    size=320, separated=0, touching_pairs=0, at_border=0, debris=30, tile_px=64
)
SEGMENT = {"mode": "segment", "min_area_um2": 200.0, "drop_border": True, "um_per_px": 1.5}


def _frames(site: Site) -> list[Path]:
    """Two frames of objects and one without, in the watched folder in name order."""
    made = write_frames(site.tmp / "frames", 2, seed=3, recipe=OBJECT_FRAMES)
    made += write_frames(site.tmp / "empty", 1, seed=3, recipe=EMPTY_FRAMES)
    incoming = site.tmp / "incoming"
    incoming.mkdir()
    files = []
    for i, path in enumerate(made):
        files.append(incoming / f"f{i}.png")
        shutil.copyfile(path, files[-1])
    return files


def _config(
    site: Site, objects: dict[str, Any] | None, extra: dict[str, dict[str, Any]] | None = None
) -> EdgeConfig:
    folder = {"path": "incoming", "settle_s": 0.1, "scan_interval_s": 0.05, "handled": "move"}
    tables: dict[str, dict[str, Any]] = {"camera": {"backend": "folder"}, "camera__folder": folder}
    tables.update(extra or {})
    if objects is not None:
        tables["objects"] = objects
    return site.config(**tables)


def _expected(cfg: EdgeConfig, files: list[Path]) -> dict[str, FrameObjects]:
    """What the station's own Segmenter finds in each file, by the file's SHA-256."""
    return {sha256(p): Segmenter(cfg.objects).segment(load_image(p)) for p in files}


def _by_frame(messages: list[Identification]) -> dict[str, list[Identification]]:
    out: dict[str, list[Identification]] = {}
    for m in messages:
        out.setdefault(m.image.sha256, []).append(m)
    return {k: sorted(v, key=lambda m: m.object.index if m.object else -1) for k, v in out.items()}


def test_n_objects_in_give_n_identifications_with_measurements(
    site: Site, validator: Draft202012Validator
) -> None:
    files = _frames(site)
    # Every object, and the frame without any, carries the site and the sample.
    place = {"locality": "flow cell bench", "elevation_m": 12.0}
    cfg = _config(site, SEGMENT, {"site": place, "sample": {"id": "bench-1", "volume_l": 0.5}})
    expected = _expected(cfg, files)
    objects = sum(len(found.objects) for found in expected.values())
    assert objects == 8  # the two frames' four specimens each; the dust frame has none
    total = objects + 1  # and one "no objects" message for the dust frame
    with running(cfg):
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) >= total)
        assert site.recorder.wait_for(
            lambda r: any(h.frames.objects == objects for h in heartbeats(r))
        )
        done = site.tmp / "incoming" / "done"
        assert site.recorder.wait_for(lambda r: len(list(done.glob("*.png"))) == len(files))
        time.sleep(0.3)  # give a wrong extra message time to show
    raw = site.recorder.on(TOPICS.identification)
    assert len(raw) == total
    for payload in raw:
        validator.validate(json.loads(payload))
    messages = identifications(site.recorder)
    assert len({m.seq for m in messages}) == total  # each object its own outbox entry
    for m in messages:
        assert m.site is not None
        assert (m.site.locality, m.site.elevation_m) == ("flow cell bench", 12.0)
        assert m.sample is not None
        assert (m.sample.id, m.sample.volume_l) == ("bench-1", 0.5)
    by_frame = _by_frame(messages)
    assert set(by_frame) == set(expected)
    for sha, found in expected.items():
        got = by_frame[sha]
        if not found.objects:
            (empty,) = got
            assert empty.status == "rejected"
            assert empty.reason == "no objects"
            assert empty.object is None
            assert empty.segmentation is not None
            assert empty.segmentation.kept == 0
            assert empty.segmentation.dropped_at_border >= 1
            continue
        assert len(got) == len(found.objects)
        for message, obj in zip(got, found.objects, strict=True):
            assert message.status in ("ok", "uncertain")
            assert message.object is not None
            assert message.object.frame_id == sha
            assert (message.object.index, message.object.count) == (obj.index, len(got))
            assert message.object.bbox == obj.bbox
            assert obj.measurements is not None
            got_m = message.object.measurements
            assert got_m.area_px == obj.measurements.area_px
            assert got_m.area_um2 == pytest.approx(obj.measurements.area_px * 1.5**2)
            assert got_m.esd_um == pytest.approx(obj.measurements.esd_um, abs=1e-3)
            assert message.segmentation is not None
            assert message.segmentation.kept == len(got)


def test_frame_mode_sends_one_message_per_frame_without_object_parts(site: Site) -> None:
    files = _frames(site)
    with running(_config(site, None)):
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) >= len(files))
        done = site.tmp / "incoming" / "done"
        assert site.recorder.wait_for(lambda r: len(list(done.glob("*.png"))) == len(files))
        time.sleep(0.3)
        assert all(h.frames.objects is None for h in heartbeats(site.recorder))
    raw = site.recorder.on(TOPICS.identification)
    assert len(raw) == len(files)
    for payload in raw:
        data = json.loads(payload)
        assert "object" not in data
        assert "segmentation" not in data


def test_a_restart_between_two_objects_of_a_file_loses_and_repeats_none(site: Site) -> None:
    files = _frames(site)
    cfg = _config(site, SEGMENT)
    expected = _expected(cfg, files)
    first = files[0]
    first_sha = sha256(first)  # the file moves to done/ once handled
    count = len(expected[first_sha].objects)
    # What a kill -9 after storing object 0 of the first file leaves: its key in the
    # outbox (with a message), the file itself not yet handled.
    st = first.stat()
    key = f"folder:{first.name}:{st.st_size}:{st.st_mtime_ns}#0"
    with Outbox(cfg.outbox.path) as outbox:
        stored = outbox.add(
            TOPICS.identification, lambda seq: b'{"object 0": true}', source_key=key
        )
    total = sum(max(1, len(found.objects)) for found in expected.values())
    with running(cfg):
        assert site.recorder.wait_for(lambda r: r.count(TOPICS.identification) >= total)
        done = site.tmp / "incoming" / "done"
        assert site.recorder.wait_for(lambda r: len(list(done.glob("*.png"))) == len(files))
        time.sleep(0.3)
    raw = site.recorder.on(TOPICS.identification)
    assert len(raw) == total  # the stored object 0, then everything else once
    assert raw[0] == b'{"object 0": true}'
    redone = _by_frame([Identification.from_json(p) for p in raw[1:]])[first_sha]
    assert [m.object.index for m in redone if m.object] == list(range(1, count))
    assert min(m.seq for m in redone) == stored.seq + 1


def _bundle_cut_with(site: Site, name: str, objects: ObjectsSettings) -> Path:
    """The tiny bundle again, its manifest recording the segmentation of its crops."""
    source = read_bundle(site.bundles.v1)
    m = source.manifest
    return write_bundle(
        site.tmp / name,
        source.path / MODEL_FILE,
        model_name=m.model_name,
        model_version=name,
        labels=m.labels,
        preprocessing=m.preprocessing,
        threshold=m.threshold,
        output=m.output,
        min_runtime=m.min_runtime,
        segmentation=Segmentation.of(objects),
    ).path


def test_the_station_warns_when_its_crops_differ_from_the_bundles(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    _frames(site)
    station = {**SEGMENT, "pad_px": 8}
    other = _bundle_cut_with(site, "seg-a", ObjectsSettings(**{**station, "um_per_px": 1.0}))
    folder = {"path": "incoming", "settle_s": 0.1, "scan_interval_s": 0.05, "handled": "move"}
    cfg = site.config(other, camera={"backend": "folder"}, camera__folder=folder, objects=station)
    same = _bundle_cut_with(site, "seg-b", cfg.objects)

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        return [m for m in found if "[objects] settings differ" in m]

    with caplog.at_level(logging.WARNING), running(cfg) as daemon:
        (line,) = warnings()
        assert "tiny-colour seg-a" in line
        assert line.endswith("um_per_px station 1.5 vs bundle 1")
        caplog.clear()
        # A swap to a bundle cut like the station: nothing to say.
        point(site.tmp / "bundles" / "current", same)
        assert daemon.reload("test").swapped
        assert warnings() == []
        # A swap to a bundle of whole frames while the station segments.
        point(site.tmp / "bundles" / "current", site.bundles.v1)
        assert daemon.reload("test").swapped
        assert warnings()
        assert all("bundle trained on whole frames" in w for w in warnings())
