"""Messages per second the collector stores from a real Mosquitto broker into SQLite.

Two numbers, both with realistic identification payloads (about 650 bytes, each
validated with ``Identification.from_json``):

* **drain**: N messages were queued by the broker for the collector's persistent
  session while it was stopped; the collector starts and stores them all. This is
  the collector alone, as after an outage — the number the goal (>= 5,000/s) is for.
* **live**: the collector runs while a separate publisher process sends N messages
  (QoS 1); on a 2-core machine publisher, broker and collector share the CPU.

Run: ``python benchmarks/collect_ingest.py [--messages 20000]`` (needs mosquitto).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import open_store
from fieldscope.collect.subscriber import Collector, CollectorSettings
from fieldscope.edge.topics import Topics

GOAL = 5000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = work / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\npersistence false\n"
    )
    proc = subprocess.Popen([binary, "-c", str(config)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def payloads(n: int, first: int = 0) -> list[bytes]:
    return [
        sample_identification(
            seq,
            device=f"scope-{seq % 8}",
            archived_path=f"/var/lib/fieldscope/archive/2026-11-23/img-{seq}.png",
        ).to_json()
        for seq in range(first, first + n)
    ]


def publish_all(port: int, data: list[bytes]) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.perf_counter()
    infos = []
    for i, payload in enumerate(data):
        topic = Topics("fieldscope", "pond-3", f"scope-{i % 8}").identification
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return elapsed


def wait_stored(collector: Collector, n: int, timeout: float = 300) -> float:
    start = time.perf_counter()
    while collector.stats.stored + collector.stats.duplicates < n:
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"only {collector.stats.stored} of {n} stored in {timeout} s")
        time.sleep(0.002)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    broker, port = start_broker(work)
    try:
        settings = CollectorSettings(host="127.0.0.1", port=port, client_id="bench-collector")
        with open_store(str(work / "drain.sqlite")) as store:
            # Create the persistent session, then stop: the broker queues for it.
            collector = Collector(settings, store)
            collector.start()
            collector.wait_subscribed(10)
            collector.stop()
            publish_all(port, payloads(n))
            collector = Collector(settings, store)
            start = time.perf_counter()
            collector.start()
            wait_stored(collector, n)
            drain = n / (time.perf_counter() - start)
            collector.stop()
            assert store.count() == n

        live_settings = CollectorSettings(host="127.0.0.1", port=port, client_id="bench-live")
        with open_store(str(work / "live.sqlite")) as store:
            collector = Collector(live_settings, store)
            collector.start()
            collector.wait_subscribed(10)
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import collect_ingest as b; b.publish_all({port}, b.payloads({n}))"
            )
            pub = subprocess.Popen([sys.executable, "-c", code])
            while collector.stats.received == 0:  # the publisher builds its payloads first
                time.sleep(0.001)
            live = n / wait_stored(collector, n)
            pub.wait(60)
            collector.stop()
            assert store.count() == n
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"collect ingest, {n} identifications, {os.cpu_count()} CPUs")
    print(f"  drain (broker backlog -> SQLite): {drain:8.0f} messages/s (goal >= {GOAL:.0f})")
    print(f"  live  (publisher process running): {live:8.0f} messages/s")
    return 0 if drain >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
