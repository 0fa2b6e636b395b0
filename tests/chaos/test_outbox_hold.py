"""What the pipeline does while the outbox cannot store, in one process and fast.

The chaos scenario ``test_full_disk`` shows the whole story with processes; this test
pins the accounting: a held identification is not a loss, and what a station stopped
while held could not store is lost only for a live camera, whose frames cannot be
taken again — counted in the outbox's ``dropped``, never silently.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SpecimenImages, TinyBundles, start_mosquitto, stop_mosquitto
from test_daemon import running, write_config

from fieldscope.edge.outbox import peek_stats

pytestmark = [pytest.mark.chaos, pytest.mark.mqtt]


def test_a_held_frame_is_not_lost_and_a_stop_while_held_counts_what_it_drops(
    tmp_path: Path, tiny_bundles: TinyBundles, specimen_images: SpecimenImages
) -> None:
    # A broker that is gone: nothing is ever acknowledged, so a 64 KiB outbox fills up.
    gone = start_mosquitto(tmp_path / "mosquitto")
    stop_mosquitto(gone)
    specimen_images.copy(tmp_path / "images", 6)
    cfg = write_config(
        tmp_path,
        gone,
        tiny_bundles.v1,
        camera__replay={"rate_hz": 0, "loop": True},  # a live camera: frames have no file
        outbox={"max_bytes": 65536, "when_full": "reject-new"},
    )
    with running(cfg) as daemon:
        pipeline, outbox = daemon.station.pipeline, daemon.station.outbox
        deadline = time.monotonic() + 30
        while pipeline.storage_problem is None:
            assert time.monotonic() < deadline, "the outbox never filled up"
            time.sleep(0.05)
        problem = pipeline.storage_problem
        assert problem is not None
        assert "full" in problem.error
        warnings = daemon.health(drain_events=False).warnings
        assert any("capture is held until it can" in w for w in warnings), warnings
        # Held, not dropping: nothing more is stored, nothing counted as lost, and the
        # stage waits (idle) rather than looking stuck to the watchdog.
        depth = outbox.depth()
        time.sleep(1.2)
        assert outbox.depth() == depth
        assert outbox.dropped() == 0
        assert pipeline.stalled(0.5) == []
        assert pipeline.storage_problem is not None
        assert pipeline.storage_problem.attempts >= 2
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5.0, "the retry backoff delayed the stop"
    frames = daemon.counters.snapshot()
    stored = frames.accepted + frames.uncertain + frames.rejected
    stats = peek_stats(cfg.outbox.path)
    assert stats is not None
    assert stats.depth == stored  # every stored identification is still waiting
    assert frames.seen - stored - frames.failed >= 1
    assert stats.dropped == frames.seen - stored - frames.failed
