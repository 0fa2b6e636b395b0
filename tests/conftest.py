"""Shared fixtures: a real Mosquitto broker on 127.0.0.1, started and stopped by the tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Broker:
    """A running mosquitto the test may connect to, restart or stop."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within 10 s")


def start_mosquitto(workdir: Path, port: int | None = None, persistence: bool = True) -> Broker:
    """Start a mosquitto process with a config file written here; tests may call it to restart."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (.ci/run does)")
    port = port or _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    log = workdir / "mosquitto.log"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        # Mosquitto silently drops messages for slow subscribers past the default 1000.
        "max_queued_messages 1000000",
        "max_inflight_messages 0",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    config.write_text("\n".join(lines) + "\n")
    with log.open("ab") as fh:
        proc = subprocess.Popen([binary, "-c", str(config)], stdout=fh, stderr=subprocess.STDOUT)
    _wait_for_port("127.0.0.1", port, proc, log)
    return Broker("127.0.0.1", port, proc, config, log)


def stop_mosquitto(broker: Broker) -> None:
    """Stop the broker by its PID, the way systemd would (SIGTERM, then SIGKILL)."""
    if broker.process.poll() is None:
        broker.process.send_signal(signal.SIGTERM)
        try:
            broker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            broker.process.kill()
            broker.process.wait(timeout=5)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker per test, on a free 127.0.0.1 port."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        stop_mosquitto(broker)
