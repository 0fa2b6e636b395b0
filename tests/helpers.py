"""Helpers shared by the test modules: polling, MQTT clients, a running collector.

They live here, not in each test file, so that every test waits, connects and cleans
up the same way: a fix to how a test waits for the broker is then made once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldscope.cli.main import main
from fieldscope.collect.records import decode
from fieldscope.collect.store import Store, open_store
from fieldscope.collect.subscriber import Collector, CollectorSettings
from fieldscope.edge.bundle import MODEL_FILE, FileEntry, Manifest, Provenance, Quantization
from fieldscope.edge.capture import Camera, Frame
from fieldscope.edge.message import Identification
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.site import Sample, Site
from fieldscope.edge.topics import Topics

# A sampling site with every Darwin Core place field set, for the store and the exports.
SITE = Site(
    name="Etang de Thau, pontoon 3",
    decimal_latitude=43.4167,
    decimal_longitude=3.6,
    geodetic_datum="WGS84",
    coordinate_uncertainty_m=30.0,
    depth_m=1.5,
    country_code="FR",
    locality="Bouzigues",
)
# A sample taken there, with every field set.
SAMPLE = Sample(
    id="thau-a",
    started_at=datetime(2026, 11, 23, 17, 0, tzinfo=UTC),
    volume_l=2.5,
    operator="A. Martin",
    notes="net 20 µm",
)

# The smallest edge configuration that loads: a replay camera, a bundle folder and a
# broker, all relative to the file's folder. Tests add or replace one part of it.
MINIMAL_EDGE_CONFIG = """\
[device]
station = "pond-3"
id = "scope-a"

[camera]
backend = "replay"

[camera.replay]
path = "images"

[model]
bundle = "bundles/current"

[mqtt]
host = "127.0.0.1"
"""


def wait_for(
    condition: Callable[[], bool],
    timeout: float = 20.0,
    what: str = "condition",
    poll_s: float = 0.02,
) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def mqtt_client(
    host: str,
    port: int,
    client_id: str,
    *,
    username: str | None = None,
    protocol: int = mqtt.MQTTv5,
    **options: Any,
) -> Iterator[mqtt.Client]:
    """A connected paho client with its network loop running, disconnected on exit."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **options
    )
    if username:
        client.username_pw_set(username)
    client.connect(host, port)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def run_fieldscope(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``fieldscope`` command line as a user does, in a process of its own (what
    native code prints goes past Python), and capture what it prints as text."""
    return subprocess.run(
        [sys.executable, "-m", "fieldscope.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


@dataclass(frozen=True)
class CliOutcome:
    """What a command-line run in this process returned and printed."""

    code: int
    out: str
    err: str


def run_main(argv: list[str]) -> CliOutcome:
    """Run the ``fieldscope`` command line in this process, capturing what it prints:
    cheaper than a subprocess for commands that load TensorFlow anyway."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return CliOutcome(code, out.getvalue(), err.getvalue())


def missing_in_ci(reason: str) -> NoReturn:
    """Skip a test whose outside input (real images, weights) is missing here, but fail
    it under CI (``CI=true``), where a skip would hide that nothing was checked."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def ndsb24_dir() -> Path:
    """The real plankton images (24 class folders of NDSB's PlanktonSet 1.0) that lie
    beside the repository, never in it: ``$FIELDSCOPE_NDSB24`` or ``shared/data/ndsb24``
    next to the checkout; skips here and fails under CI when they are missing
    (:func:`missing_in_ci`)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "ndsb24"
    source = Path(os.environ.get("FIELDSCOPE_NDSB24") or default)
    if not source.is_dir():
        missing_in_ci(f"no ndsb24 images at {source} (set FIELDSCOPE_NDSB24 to the folder)")
    return source


def read_all(camera: Camera, timeout: float = 0.03, tries: int = 5) -> list[Frame]:
    """Every frame the camera gives until it has had nothing for ``tries`` reads in a
    row: what a capture loop would get from a folder before it runs dry."""
    frames: list[Frame] = []
    idle = 0
    while idle < tries:
        frame = camera.read(timeout)
        if frame is None:
            idle += 1
            continue
        idle = 0
        frames.append(frame)
    return frames


def publish_acknowledged(
    client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False
) -> None:
    """Publish with QoS 1 and wait for the PUBACK, as a station's link does."""
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(20)
    assert info.is_published()


@contextlib.contextmanager
def running_collector(db: Path, settings: CollectorSettings) -> Iterator[Collector]:
    """A started collector writing to the SQLite store ``db``, subscribed before it is
    handed over (so nothing published next is missed), stopped and closed on exit."""
    store = open_store(str(db))
    collector = Collector(settings, store)
    collector.start()
    try:
        assert collector.wait_subscribed(10), "the broker did not grant the subscriptions"
        yield collector
    finally:
        collector.stop()
        store.close()


def received(message: Identification, payload: bytes | None = None) -> object:
    """``message`` as the collector receives it: decoded from its own station's
    identification topic (``payload`` instead of its JSON, to send something else)."""
    topic = Topics("fieldscope", message.station, message.device).identification
    return decode(topic, message.to_json() if payload is None else payload, "fieldscope")


@contextlib.contextmanager
def store_holding(db: Path, messages: Iterable[Identification]) -> Iterator[Store]:
    """The SQLite store ``db`` after the collector stored ``messages``, opened for
    reading as the exports and the dashboard open it (``create=False``)."""
    with open_store(str(db)) as store:
        store.write([received(m) for m in messages])
    with open_store(str(db), create=False) as reader:
        yield reader


def identification_document() -> dict[str, Any]:
    """A valid identification message as parsed JSON: the base that poison and fuzz
    tests change one value of, so that only that value can be what a reader rejects."""
    sha = "0" * 64
    return {
        "version": 1,
        "device": "dev-a",
        "station": "atk",
        "seq": 1,
        "captured_at": "2026-12-07T01:43:34.280300Z",
        "status": "ok",
        "label": "a",
        "score": 0.9,
        "top_k": [{"label": "a", "score": 0.9}, {"label": "b", "score": 0.1}],
        "model": {"name": "r1", "version": "1", "sha256": sha},
        "image": {"sha256": sha, "width": 64, "height": 48},
        "quality": {"sharpness": 3.5, "exposure": 0.5},
        "timings_ms": {"capture": 1.0, "quality": 1.0, "preprocess": 1.0, "inference": 1.0},
    }


def model_info_document() -> dict[str, Any]:
    """A valid retained ``model`` message as parsed JSON (issue 15's reproduction before
    its threshold was poisoned)."""
    return {
        "labels": ["a", "b"],
        "loaded_at": "2026-12-07T01:43:34.280300Z",
        "model": {"name": "r1", "sha256": "0" * 64, "version": "1"},
        "runtime": {"name": "x", "version": "1"},
        "signed": True,
        "threshold": 0.5,
        "version": 1,
    }


def manifest_document(
    *, quantization: Quantization | None = None, preprocessing: PreprocessRecipe | None = None
) -> dict[str, Any]:
    """A valid bundle manifest as parsed JSON, for a bundle whose model file holds the
    five bytes ``b"model"``: the base that poison and fuzz tests change one value of."""
    return Manifest(
        model_name="m",
        model_version="1",
        labels=("a", "b"),
        input_shape=(1, 32, 32, 3),
        input_dtype="uint8",
        output_dtype="uint8",
        quantization=quantization,
        preprocessing=preprocessing or PreprocessRecipe(size=(32, 32)),
        threshold=0.5,
        provenance=Provenance(created_at="2026-11-02T10:15:00Z"),
        files={MODEL_FILE: FileEntry(hashlib.sha256(b"model").hexdigest(), 5)},
    ).to_dict()
