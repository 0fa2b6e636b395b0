"""Messages per second stored from a real Mosquitto broker into SQLite: collector vs naive.

Baseline, the research-script way: a paho subscriber (persistent session, QoS 1)
whose ``on_message`` parses the JSON and runs ``INSERT`` + ``commit()`` on SQLite,
one message at a time, in paho's network thread (no validation, no de-duplication).

Ours: ``fieldscope collect``'s ``Collector`` — every payload validated with
``Identification.from_json``, de-duplicated by ``(device, seq)``, stored in batches
by a writer thread and acknowledged to the broker only after the commit.

Two figures each, with realistic identification payloads (about 650 bytes):

* **drain**: N messages were queued by the broker for the subscriber's persistent
  session while it was stopped; it starts and stores them all. This is the
  subscriber alone, as after an outage — the number the goal (>= 5,000/s) is for.
* **live**: the subscriber runs while a separate publisher process sends N messages
  (QoS 1); on a 2-core machine publisher, broker and subscriber share the CPU.

The baseline commits (and fsyncs) once per message, so it gets ``--baseline-messages``
(fewer; its rate does not depend on N).

    python benchmarks/collect_ingest.py [--messages 20000] [--baseline-messages 1000]
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _broker import Broker
from _machine import Figure, Goal, Report, benchmark_parser, positive_int
from paho.mqtt.enums import CallbackAPIVersion

from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import Store, open_store
from fieldscope.collect.subscriber import BrokerSettings, Collector, CollectorSettings
from fieldscope.edge.topics import Topics

GOAL = 5000.0
PREFIX = "fieldscope"


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
        topic = Topics(PREFIX, "pond-3", f"scope-{i % 8}").identification
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return elapsed


class NaiveSubscriber:
    """The baseline: parse and INSERT + commit each message in paho's callback."""

    def __init__(self, port: int, db: Path, client_id: str) -> None:
        self.port = port
        self.stored = 0
        self.received = 0
        self.conn = sqlite3.connect(db, check_same_thread=False)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS identifications (device TEXT, seq INTEGER, "
            "captured_at TEXT, label TEXT, score REAL, payload TEXT)"
        )
        self.conn.commit()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        topic = f"{PREFIX}/+/+/identification"
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        self.received += 1
        data = json.loads(msg.payload)
        self.conn.execute(
            "INSERT INTO identifications VALUES (?, ?, ?, ?, ?, ?)",
            (
                data["device"],
                data["seq"],
                data["captured_at"],
                data["label"],
                data["score"],
                msg.payload.decode(),
            ),
        )
        self.conn.commit()
        self.stored += 1

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM identifications").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def wait_until(done: Callable[[], int], n: int, what: str, timeout: float = 300) -> float:
    start = time.perf_counter()
    while done() < n:
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"{what}: only {done()} of {n} stored in {timeout:.0f} s")
        time.sleep(0.002)
    return time.perf_counter() - start


def start_publisher(port: int, n: int) -> subprocess.Popen[bytes]:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import collect_ingest as b; b.publish_all({port}, b.payloads({n}))"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def _settings(port: int, client_id: str) -> CollectorSettings:
    return CollectorSettings(
        broker=BrokerSettings(host="127.0.0.1", port=port, client_id=client_id)
    )


def _check_stored(store: Store, n: int, what: str) -> None:
    """The collector kept every message: a figure over fewer would flatter it."""
    if store.count() != n:
        raise SystemExit(f"{what}: {store.count()} stored, expected {n}")


def ours(port: int, n: int, work: Path) -> tuple[float, float]:
    settings = _settings(port, "bench-collector")
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
        stats = collector.stats
        wait_until(lambda: stats.stored + stats.duplicates, n, "collector drain")
        drain = n / (time.perf_counter() - start)
        collector.stop()
        _check_stored(store, n, "collector drain")

    with open_store(str(work / "live.sqlite")) as store:
        collector = Collector(_settings(port, "bench-live"), store)
        collector.start()
        collector.wait_subscribed(10)
        pub = start_publisher(port, n)
        stats = collector.stats
        while stats.received == 0:  # the publisher builds its payloads first
            time.sleep(0.001)
        live = n / wait_until(lambda: stats.stored + stats.duplicates, n, "collector live")
        pub.wait(60)
        collector.stop()
        _check_stored(store, n, "collector live")
    return drain, live


def naive(port: int, n: int, work: Path) -> tuple[float, float]:
    sub = NaiveSubscriber(port, work / "naive-drain.sqlite", "bench-naive")
    sub.start()
    sub.wait_subscribed(10)
    sub.stop()
    publish_all(port, payloads(n))
    start = time.perf_counter()
    sub.start()
    wait_until(lambda: sub.stored, n, "naive drain")
    drain = n / (time.perf_counter() - start)
    sub.stop()
    sub.close()

    sub = NaiveSubscriber(port, work / "naive-live.sqlite", "bench-naive-live")
    sub.start()
    sub.wait_subscribed(10)
    pub = start_publisher(port, n)
    while sub.received == 0:
        time.sleep(0.001)
    live = n / wait_until(lambda: sub.stored, n, "naive live")
    pub.wait(60)
    sub.stop()
    sub.close()
    return drain, live


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--messages", type=positive_int, default=20_000, help="messages for ours")
    parser.add_argument(
        "--baseline-messages", type=positive_int, default=1000, help="messages for the baseline"
    )
    args = parser.parse_args()
    if args.quick:
        args.messages, args.baseline_messages = 400, 100
    report = Report(
        "collect_ingest",
        "identifications stored per second from a real mosquitto into SQLite",
        baseline="paho on_message: json.loads + SQLite INSERT + commit per message",
        ours="fieldscope Collector: validated, de-duplicated, batched commits, ack after commit",
        quick=args.quick,
    )
    with report.started() as work, Broker(work / "broker") as broker:
        print(f"collector, {args.messages} messages ...", flush=True)
        drain, live = ours(broker.port, args.messages, work)
        print(f"naive subscriber, {args.baseline_messages} messages ...", flush=True)
        base_drain, base_live = naive(broker.port, args.baseline_messages, work)
    report.add(
        Figure(
            "drain (broker backlog -> SQLite)",
            drain,
            "msg/s",
            baseline=base_drain,
            goal=Goal(">=", GOAL),
        )
    )
    report.add(Figure("live (publisher process running)", live, "msg/s", baseline=base_live))
    report.details = {"messages": args.messages, "baseline_messages": args.baseline_messages}
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
