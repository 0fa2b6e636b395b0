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
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from conftest import (
    EDGE_PREFIX,
)

from fieldscope.edge.capture import Frame
from fieldscope.edge.config import UploadConfig
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.topics import Topics
from fieldscope.edge.uploads import ImageUploads, bounded_image

TOPICS = Topics(EDGE_PREFIX, "pond-3", "scope-a")


def noisy(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_kind(data: bytes) -> str | None:
    return "png" if data.startswith(b"\x89PNG") else "jpg" if data.startswith(b"\xff\xd8") else None


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
    finally:
        for each in opened:
            each.close()
