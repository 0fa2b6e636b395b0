"""Faults a field station meets, against a real mosquitto: the broker going away and
coming back, the daemon killed with SIGKILL and restarted, SIGTERM, SIGHUP, systemd.

The promise under test: every image yields exactly one identification at a subscriber
that drops repeats by ``(device, seq)`` — none missing, none twice.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    EDGE_PREFIX,
    Broker,
    MqttRecorder,
    SpecimenImages,
    TinyBundles,
    retained_value,
    start_mosquitto,
    stop_mosquitto,
    toml_document,
)
from test_daemon import point, running, write_config

from fieldscope.edge.health import ModelInfo
from fieldscope.edge.message import Identification
from fieldscope.edge.topics import Topics

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

TOPICS = Topics(EDGE_PREFIX, "pond-3", "scope-a")


def unique_images(recorder: MqttRecorder) -> collections.Counter[str]:
    """How often each image was identified, after dropping repeats by (device, seq)."""
    seen: dict[tuple[str, int], str] = {}
    for payload in recorder.on(TOPICS.identification):
        message = Identification.from_json(payload)
        seen.setdefault(message.key, message.image.sha256)
    return collections.Counter(seen.values())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_broker_outage_mid_run_loses_and_repeats_nothing(
    tmp_path: Path,
    mosquitto: Broker,
    tiny_bundles: TinyBundles,
    specimen_images: SpecimenImages,
) -> None:
    images = specimen_images.copy(tmp_path / "images", 30)
    expected = {sha256(p) for p in images}
    cfg = write_config(tmp_path, mosquitto, tiny_bundles.v1, camera__replay={"rate_hz": 12})
    # A persistent session: the broker (with persistence) keeps what arrives for the
    # recorder while it is reconnecting after the restart.
    recorder = MqttRecorder(mosquitto, "collector", persistent=True)
    restarted: Broker | None = None
    try:
        with running(cfg) as daemon:
            assert recorder.wait_for(lambda r: r.count(TOPICS.identification) >= 6)
            stop_mosquitto(mosquitto)
            time.sleep(1.5)  # the station goes on identifying into its outbox
            assert daemon.station.outbox.depth() > 0
            restarted = start_mosquitto(mosquitto.config.parent, port=mosquitto.port)
            assert recorder.wait_for(lambda r: set(unique_images(r)) == expected, timeout=30)
            assert daemon.station.link.wait_online(10)
        counts = unique_images(recorder)
        assert set(counts) == expected
        assert set(counts.values()) == {1}
        assert retained_value(restarted, TOPICS.status) == b"stopped"
    finally:
        recorder.close()
        if restarted is not None:
            stop_mosquitto(restarted)


class NotifySocket:
    """What systemd's NOTIFY_SOCKET receives: one datagram per notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def start_daemon(
    config: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The daemon as systemd runs it: its own process, logging to stderr."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "fieldscope.edge.daemon", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env={**os.environ, **(env or {})},
        )


def test_kill_9_mid_run_then_a_restart_identifies_every_file_exactly_once(
    tmp_path: Path,
    mosquitto: Broker,
    tiny_bundles: TinyBundles,
    specimen_images: SpecimenImages,
    notify_socket: NotifySocket,
) -> None:
    incoming = tmp_path / "incoming"
    files = specimen_images.copy(incoming, 24)
    expected = {sha256(p) for p in files}
    cfg = write_config(
        tmp_path,
        mosquitto,
        tiny_bundles.v1,
        camera={"backend": "folder", "max_rate_hz": 10},
        camera__folder={"path": "incoming", "settle_s": 0, "scan_interval_s": 0.05},
    )
    assert cfg.source is not None
    log = tmp_path / "daemon.log"
    recorder = MqttRecorder(mosquitto)
    first = start_daemon(cfg.source, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        assert recorder.wait_for(lambda r: r.count(TOPICS.identification) >= 6, timeout=30)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        assert recorder.wait_for(lambda r: (TOPICS.status, b"offline", False) in r.messages)
        assert len(unique_images(recorder)) < len(files)  # it really died mid-run

        second = start_daemon(
            cfg.source,
            log,
            {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"},
        )
        assert recorder.wait_for(lambda r: set(unique_images(r)) == expected, timeout=30)
        assert set(unique_images(recorder).values()) == {1}, "an image was identified twice"
        assert retained_value(mosquitto, TOPICS.status) == b"online"

        # SIGHUP reloads the bundle (here: a new version behind the symlink).
        point(tmp_path / "bundles" / "current", tiny_bundles.v2)
        second.send_signal(signal.SIGHUP)
        assert recorder.wait_for(
            lambda r: any(ModelInfo.from_json(p).model.version == "2" for p in r.on(TOPICS.model))
        )

        # SIGTERM: a clean, quick exit with "stopped" retained.
        began = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
        assert time.monotonic() - began < 5.0
        assert retained_value(mosquitto, TOPICS.status) == b"stopped"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        recorder.close()
    text = log.read_text()
    assert "model swapped (SIGHUP)" in text, text
    assert "Traceback" not in text, text
    # systemd heard READY=1 first, watchdog pings while running, STOPPING=1 at the end.
    notes = notify_socket.messages
    assert notes, "nothing reached NOTIFY_SOCKET"
    assert notes[0].startswith("READY=1")
    assert "WATCHDOG=1" in notes
    assert any(n.startswith("STOPPING=1") for n in notes)
    assert notes.index("WATCHDOG=1") < next(
        i for i, n in enumerate(notes) if n.startswith("STOPPING=1")
    )


def test_a_bad_configuration_or_bundle_fails_the_start_with_one_line(
    tmp_path: Path, mosquitto: Broker, tiny_bundles: TinyBundles
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        toml_document(
            {
                "device": {"station": "pond-3", "id": "scope-a", "data_dir": "data"},
                "camera": {"backend": "replay", "trigger": "continuous"},
                "camera.replay": {"path": "images"},
                "model": {"bundle": str(tiny_bundles.damaged)},
                "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "prefix": EDGE_PREFIX},
            }
        )
    )
    run = [sys.executable, "-m", "fieldscope.edge.daemon", "--config", str(config)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fieldscope edge run: error: bundle ")
    assert "checksum mismatch" in last
    assert "Traceback" not in done.stderr

    config.write_text(config.read_text().replace('backend = "replay"', 'backend = "replya"'))
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "camera.backend: must be one of" in done.stderr
    assert "did you mean 'replay'" in done.stderr
    assert "Traceback" not in done.stderr
