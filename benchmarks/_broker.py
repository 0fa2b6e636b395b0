"""A real mosquitto on 127.0.0.1 for the benchmarks: started, restarted and stopped by PID.

One copy for every script that needs a broker. Its configuration removes the two
limits that would make a benchmark measure mosquitto's defaults instead of our code:
``max_queued_messages`` (by default 1000 per client: past it mosquitto drops
messages for a slow or offline subscriber without any error) and the in-flight
window. ``persistence`` keeps sessions and queued messages across a restart
(mosquitto writes them when it is stopped with SIGTERM), so a restart test measures
what the *publisher* loses, not what an amnesic broker forgets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """``Broker(work)`` starts mosquitto with its config, database and log in ``work``."""

    def __init__(self, work: Path, *, persistence: bool = False) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.port = free_port()
        self.host = "127.0.0.1"
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / "mosquitto.conf"
        self.log = work / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {work}/",
            # As root mosquitto switches to the `mosquitto` user, which cannot write here.
            *(["user root"] if os.geteuid() == 0 else []),
            "log_dest stderr",
            "log_type error",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (again, on the same port and database)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mosquitto exited at start:\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.process.kill()
        raise SystemExit(f"mosquitto did not listen on port {self.port} within 10 s")

    def stop(self) -> None:
        """SIGTERM (as ``systemctl stop`` does; mosquitto saves its database), then wait."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
